"""The workload a study runs on, and the SPEC that names one.

A :class:`Workload` is what every study consumes: a model, its training batches, the loss of a batch, the
metrics on held-out data and the blocks of parameters the study reports on. A *workload factory* is a
function ``make(seed: int) -> Workload``; the seed moves the initialisation and the order of the training
batches, the data itself stays as it is. A SPEC names a factory: a built-in workload's name
(``pyco study --list``) or ``module.path:function``, imported from ``sys.path``::

    factory = pyco.studies.load_workload("mnist1d-cnn")             # a built-in
    factory = pyco.studies.load_workload("mymodels:make")           # your own make(seed) -> Workload
    results = pyco.studies.load("coadaptation").run(factory, steps=200)

Keyword options bound to a factory (``load_workload(spec, size="tiny", depth=2)``) are passed to it on
every call: the built-in factories take ``size`` (``"tiny"``, ``"cpu"``, ``"gpu"``), ``depth``,
``width`` and ``device``; a factory of your own takes whichever its signature names.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pyco.blocks import Blocks, by_module

OPTIMIZERS = ("sgd", "adam", "adamw")


class WorkloadError(ValueError):
    """A SPEC that names no factory, a factory that returns something else, a workload that breaks the
    interface (a loss that is not a scalar, blocks that miss parameters): the message says what was expected."""


@dataclass
class Recipe:
    """How a workload trains: optimizer (``"sgd"``, ``"adam"`` or ``"adamw"``, pyco's fused ones), learning
    rate, the default budget in steps, and the optimizer's other settings."""

    optimizer: str = "adam"
    lr: float = 1e-3
    steps: int = 500
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise WorkloadError(f"recipe optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise WorkloadError(f"recipe lr must be a number > 0, got {self.lr!r}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise WorkloadError(f"recipe steps must be an int >= 1, got {self.steps!r}")

    def make(self, params, *, lr: float | None = None, optimizer: str | None = None, blocks=None):
        """The recipe's optimizer over ``params`` (``lr`` and ``optimizer`` override the recipe's)."""
        import pyco

        name, lr = optimizer or self.optimizer, self.lr if lr is None else lr
        if name == "sgd":
            return pyco.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                  blocks=blocks)
        if name not in ("adam", "adamw"):
            raise WorkloadError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
        cls = pyco.optim.Adam if name == "adam" else pyco.optim.AdamW
        return cls(params, lr=lr, betas=tuple(self.betas), weight_decay=self.weight_decay, blocks=blocks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Workload:
    """The one interface every study consumes.

    Attributes:
        name: what the reports call it.
        model: the ``nn.Module`` that trains (already on its device).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the training loss of one batch.
        train_batches: the training batches, in the form ``loss_fn`` takes. An iterable (a list, a
            ``DataLoader``) is iterated again whenever it runs out, so a finite one cycles; an iterator is
            drawn from and must not run out before the study has its batches.
        eval_fn: ``eval_fn(model) -> {"loss": ..., "accuracy": ...}``, metrics on held-out data (floats), or
            None when there are none.
        blocks: the partition of the trainable parameters the studies report on (default
            ``pyco.blocks.by_module(model)``); it must hold every trainable parameter exactly once.
        recipe: how it trains (:class:`Recipe`): optimizer, learning rate and the default budget.
        chain_loss: for a chain (``model`` an ``nn.Sequential``, batches ``(input, target)``),
            ``chain_loss(output, target)`` with ``loss_fn(model, (x, y)) == chain_loss(model(x), y)``: lets
            ``pyco.ChainGaussSeidel`` run on it. None: not a chain.
        description: one line: size, data, what it trains to.
        config: what built it (sizes, data), written to every study's results.
    """

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    train_batches: Iterable
    eval_fn: Callable[[nn.Module], Mapping[str, float] | None] | None = None
    blocks: Blocks | None = None
    recipe: Recipe = field(default_factory=Recipe)
    chain_loss: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    description: str = ""
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise WorkloadError(f"Workload.name must be a non-empty str, got {self.name!r}")
        where = f"workload {self.name!r}"
        if not isinstance(self.model, nn.Module):
            raise WorkloadError(f"{where}: model must be an nn.Module, got {type(self.model).__name__}")
        for attr in ("loss_fn", "eval_fn", "chain_loss"):
            value = getattr(self, attr)
            if value is not None and not callable(value):
                raise WorkloadError(f"{where}: {attr} must be callable, got {type(value).__name__}")
        if self.loss_fn is None:
            raise WorkloadError(f"{where}: loss_fn(model, batch) is required")
        if isinstance(self.train_batches, (str, bytes, torch.Tensor)) or not isinstance(self.train_batches, Iterable):
            raise WorkloadError(f"{where}: train_batches must be an iterable or iterator of batches, got "
                                f"{type(self.train_batches).__name__}")
        if not isinstance(self.recipe, Recipe):
            raise WorkloadError(f"{where}: recipe must be a pyco.studies.Recipe, got {type(self.recipe).__name__}")
        if self.blocks is None:
            try:
                self.blocks = by_module(self.model)
            except ValueError as exc:
                raise WorkloadError(f"{where}: default blocks by_module(model) failed: {exc}; pass blocks=") from None
        elif not isinstance(self.blocks, Blocks):  # a dict name -> parameters or a list of pairs: named from the model
            spec = self.blocks
            try:
                items = list(spec.items()) if isinstance(spec, Mapping) else list(spec)
                self.blocks = Blocks(items, {id(p): n for n, p in self.model.named_parameters()}, self.model)
            except (TypeError, ValueError) as exc:
                raise WorkloadError(f"{where}: blocks: {exc}") from None
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise WorkloadError(f"{where}: the model has no trainable parameter")
        try:
            self.blocks.check_covers(trainable, what=f"{where}'s model")
        except ValueError as exc:
            raise WorkloadError(f"{where}: blocks must hold every trainable parameter exactly once: {exc}") from None
        if self.chain_loss is not None and not isinstance(self.model, nn.Sequential):
            raise WorkloadError(f"{where}: chain_loss is for a chain: model must be an nn.Sequential, got "
                                f"{type(self.model).__name__}")

    # -- what the studies call --------------------------------------------------------------------------
    @property
    def is_chain(self) -> bool:
        return self.chain_loss is not None

    @property
    def parameters(self) -> int:
        """Trainable parameters (a tied weight counts once)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        return next(iter(self.model.parameters())).device

    def loss(self, batch, model: nn.Module | None = None) -> torch.Tensor:
        """``loss_fn(model, batch)``, checked to be a floating-point scalar tensor."""
        out = self.loss_fn(self.model if model is None else model, batch)
        if not isinstance(out, torch.Tensor):
            raise WorkloadError(f"workload {self.name!r}: loss_fn(model, batch) must return a scalar tensor, got "
                                f"{type(out).__name__}")
        if out.numel() != 1:
            raise WorkloadError(f"workload {self.name!r}: loss_fn(model, batch) must return a scalar tensor, got "
                                f"one of shape {list(out.shape)}; reduce it (loss.mean()) inside loss_fn")
        if not out.is_floating_point():
            raise WorkloadError(f"workload {self.name!r}: loss_fn(model, batch) returned a {out.dtype} tensor; "
                                f"expected a floating-point loss")
        return out.reshape(())

    def batches(self) -> Iterator:
        """An endless stream of training batches (see ``train_batches``)."""
        return _Cycle(self.train_batches, self.name)

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """``eval_fn(model)`` as a dict of floats ({} without an eval_fn)."""
        if self.eval_fn is None:
            return {}
        out = self.eval_fn(self.model if model is None else model)
        if out is None:
            return {}
        if not isinstance(out, Mapping):
            raise WorkloadError(f"workload {self.name!r}: eval_fn(model) must return a dict of metrics "
                                f"(name -> float) or None, got {type(out).__name__}")
        try:
            return {str(k): float(v) for k, v in out.items()}
        except (TypeError, ValueError) as exc:
            raise WorkloadError(f"workload {self.name!r}: eval_fn(model) must return numbers: {exc}") from None

    def check(self) -> None:
        """Evaluates the loss on the first training batch (without touching the gradients): a loss that is
        not a scalar, or batches that do not fit the model, fail here rather than in the middle of a study."""
        batch = next(iter(_Cycle(self.train_batches, self.name)))
        with torch.no_grad():
            self.loss(batch)

    def summary(self) -> dict:
        """What a study's results name the workload by."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters,
                "blocks": list(self.blocks.names), "block_sizes": self.blocks.numel(),
                "chain": self.is_chain, "recipe": self.recipe.to_dict(), "config": dict(self.config)}


class _Cycle:
    """Endless batches from an iterable (iterated again when it runs out) or an iterator (drawn from)."""

    def __init__(self, source: Iterable, name: str):
        self.source, self.name = source, name
        self.current = iter(source)
        self.one_shot = self.current is source
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        for attempt in range(2):
            try:
                batch = next(self.current)
                self.count += 1
                return batch
            except StopIteration:
                if self.one_shot:
                    raise WorkloadError(
                        f"workload {self.name!r}: train_batches, an iterator, ran out after {self.count} batches; "
                        f"give an iterable the study can iterate again (a list, a DataLoader) or an endless "
                        f"iterator") from None
                if attempt == 0:
                    self.current = iter(self.source)
        raise WorkloadError(f"workload {self.name!r}: train_batches yields no batch")


# ---- factories and SPECs ----------------------------------------------------------------------------

class WorkloadFactory:
    """``factory(seed) -> Workload``: a factory with its SPEC and options bound, whose result is checked."""

    def __init__(self, make: Callable[..., Workload], spec: str, options: Mapping[str, Any] | None = None):
        self.make, self.spec, self.options = make, spec, dict(options or {})

    def __call__(self, seed: int) -> Workload:
        if not isinstance(seed, int):
            raise TypeError(f"a workload factory takes an int seed, got {type(seed).__name__}")
        workload = self.make(seed, **self.options)
        if not isinstance(workload, Workload):
            raise WorkloadError(f"workload factory {self.spec!r} returned {_what(workload)}; expected a "
                                f"pyco.studies.Workload (name, model, loss_fn, train_batches, eval_fn, blocks)")
        return workload

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"WorkloadFactory({self.spec!r}{opts})"

    def to_dict(self) -> dict:
        return {"spec": self.spec, "options": dict(self.options)}


def _what(x) -> str:
    return "None" if x is None else f"a {type(x).__name__}"


def load(spec, **options) -> WorkloadFactory:
    """The factory a SPEC names, with ``options`` bound (see the module docstring).

    spec: a built-in workload's name, ``"module.path:function"`` (imported from ``sys.path``), or a callable
    ``make(seed, ...) -> Workload``. Raises :class:`WorkloadError` naming what was expected when the SPEC
    does not import, names nothing callable, or the factory takes none of the given options.
    """
    from pyco.studies import workloads

    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(spec, WorkloadFactory):
        return WorkloadFactory(spec.make, spec.spec, {**spec.options, **options})
    if callable(spec):
        make, name = spec, f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', repr(spec))}"
    elif not isinstance(spec, str) or not spec:
        raise WorkloadError(f"a workload SPEC is a built-in name or 'module.path:function', got {spec!r}")
    elif spec in workloads.names():
        make, name = workloads.factory(spec), spec
    elif ":" in spec:
        make, name = _import(spec), spec
    else:
        raise WorkloadError(f"unknown workload {spec!r}; built-in workloads: {', '.join(workloads.names())}; or "
                            f"name your own factory as module.path:function (imported from sys.path)")
    _check_options(make, name, options)
    return WorkloadFactory(make, name, options)


def _import(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise WorkloadError(f"workload {spec!r}: expected module.path:function, e.g. mymodels:make")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WorkloadError(f"workload {spec!r}: cannot import module {module_name!r} ({exc}); it is imported from "
                            f"sys.path: run from its directory with PYTHONPATH=. or install it") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise WorkloadError(f"workload {spec!r}: module {module_name!r} has no {attr!r}; expected a function "
                                f"make(seed) -> pyco.studies.Workload")
        obj = getattr(obj, part)
    if not callable(obj):
        raise WorkloadError(f"workload {spec!r}: {attr!r} is a {type(obj).__name__}, not a function make(seed) -> "
                            f"pyco.studies.Workload")
    return obj


def _check_options(make: Callable, name: str, options: Mapping[str, Any]) -> None:
    try:
        signature = inspect.signature(make)
    except (TypeError, ValueError):  # a builtin or extension callable: nothing to check
        return
    try:
        signature.bind(0, **options)
    except TypeError:
        params = signature.parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return
        try:
            signature.bind(0)
        except TypeError:
            raise WorkloadError(f"workload {name!r}: the factory must take the seed as its one required argument, "
                                f"make(seed) -> pyco.studies.Workload; its signature is {signature}") from None
        takes = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][1:]
        extra = [k for k in options if k not in takes] or sorted(options)
        raise WorkloadError(f"workload {name!r}: the factory takes no option {extra[0]!r}; it takes "
                            f"{', '.join(takes) if takes else 'only the seed'}") from None


def map_tensors(batch, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``batch`` with ``fn`` applied to every tensor in it (tuples, lists and dicts are walked)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)((k, map_tensors(v, fn)) for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        items = [map_tensors(v, fn) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def cast_batch(batch, dtype: torch.dtype):
    """``batch`` with its floating-point tensors in ``dtype`` (integer tensors, targets, stay)."""
    return map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)
