"""Named partitions of parameters into blocks: the unit of pyco's statistics, orders and probe.

    blocks = pyco.blocks.by_module(model)     # one block per module that owns parameters directly
    blocks = pyco.blocks.by_module(model, shared="first")   # tied weights: in their first owner's block
    blocks = pyco.blocks.by_param(model)      # one block per parameter
    blocks = pyco.blocks.by_group(optimizer)  # one block per param group
    blocks = pyco.blocks.by_names(model, {"body": ["0.*", "2.*"], "head": ["4.*"]})

A :class:`Blocks` is an ordered mapping ``name -> tuple of parameters``; every parameter is in at most one
block (``check_covers`` verifies that a set of parameters is covered exactly once).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn


def describe_param(group_index: int, param_index: int, p: torch.Tensor) -> str:
    return f"param {param_index} of group {group_index} (shape {list(p.shape)}, {p.dtype})"


class Blocks(Mapping):
    """An ordered, named partition of parameters. ``blocks[name]`` is a tuple of tensors.

    ``module`` is the model the blocks were built from (by :func:`by_module`, :func:`by_param`,
    :func:`by_names`; None otherwise): the orders use it to find the buffers a forward pass changes."""

    def __init__(self, items: Iterable[tuple[str, Iterable[torch.Tensor]]],
                 param_names: Mapping[int, str] | None = None, module: nn.Module | None = None):
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
            raise TypeError(f"Blocks takes a list of (name, parameters) pairs, got {type(items).__name__}; for a dict "
                            f"name -> parameters use Blocks.of(...)")
        self.module = module
        self._names: list[str] = []
        self._params: dict[str, tuple[torch.Tensor, ...]] = {}
        self._owner: dict[int, int] = {}
        self._param_names = dict(param_names or {})
        for bi, item in enumerate(items):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"blocks must map names (str) to tensors; entry {bi} is {item!r:.60}")
            name, tensors = item
            if name in self._params:
                raise ValueError(f"block name {name!r} appears twice")
            tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
            for p in tensors:
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"block {name!r} holds a {type(p).__name__}, expected tensors (parameters)")
                if id(p) in self._owner:
                    other = self._names[self._owner[id(p)]]
                    raise ValueError(f"blocks {other!r} and {name!r} overlap: both hold {self.describe(p)}")
                self._owner[id(p)] = len(self._names)
            self._names.append(name)
            self._params[name] = tensors

    def __reduce__(self):
        # The lookups are keyed by id(tensor), which a copy or an unpickled object does not keep: rebuild them
        # from the tensors themselves (deepcopy and pickle map them to the copies the optimizer holds).
        items = [(name, list(self._params[name])) for name in self._names]
        names = [(p, self._param_names[id(p)]) for name in self._names for p in self._params[name]
                 if id(p) in self._param_names]
        return _rebuild_blocks, (items, names, self.module)

    @classmethod
    def of(cls, spec: "Blocks | Mapping | Sequence") -> "Blocks":
        """A Blocks from a Blocks, a dict name -> tensors, or a list of (name, tensors) pairs."""
        if isinstance(spec, Blocks):
            return spec
        if isinstance(spec, Mapping):
            return cls(list(spec.items()))
        if isinstance(spec, (str, bytes)) or not isinstance(spec, Iterable):
            raise TypeError(f"blocks must be a pyco.blocks.Blocks, a dict name -> parameters or a list of (name, "
                            f"parameters) pairs, got {type(spec).__name__}")
        return cls(list(spec))

    # Mapping interface
    def __getitem__(self, name: str) -> tuple[torch.Tensor, ...]:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"no block named {name!r}; blocks are {self._names}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {sum(p.numel() for p in ps)}" for n, ps in self._params.items())
        return f"Blocks({sizes})"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._names)

    def params(self) -> list[torch.Tensor]:
        """Every parameter, block by block."""
        return [p for n in self._names for p in self._params[n]]

    def index(self, p: torch.Tensor) -> int:
        """Index of the block holding p (KeyError if none does)."""
        try:
            return self._owner[id(p)]
        except KeyError:
            raise KeyError(f"{self.describe(p)} is in no block") from None

    def describe(self, p: torch.Tensor) -> str:
        name = self._param_names.get(id(p))
        return f"param {name}" if name else f"a parameter of shape {list(p.shape)}"

    def numel(self) -> list[int]:
        return [sum(p.numel() for p in self._params[n]) for n in self._names]

    def check_covers(self, params: Iterable[torch.Tensor], *, what: str = "the optimizer") -> None:
        """Raises unless every tensor in ``params`` is in exactly one block and every block's tensors are
        among ``params``."""
        params = list(params)
        known = {id(p) for p in params}
        for name in self._names:
            for p in self._params[name]:
                if id(p) not in known:
                    raise ValueError(
                        f"block {name!r} holds {self.describe(p)}, which is not a parameter of {what}; build the "
                        f"blocks from the same parameters {what} was given"
                    )
        missing = [p for p in params if id(p) not in self._owner]
        if missing:
            names = ", ".join(self.describe(p) for p in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ValueError(f"{names}{more} of {what} in no block: every parameter needs exactly one block")


def _rebuild_blocks(items, names, module) -> Blocks:
    return Blocks(items, {id(p): n for p, n in names}, module)


def _trainable(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters() if p.requires_grad}


SHARED = ("error", "first")


def by_module(model: nn.Module, *, shared: str = "error") -> Blocks:
    """One block per module that directly owns trainable parameters, in registration order, named by the
    module's path (``"0"``, ``"encoder.layer.3.attn"``; the root module is ``"(root)"``).

    shared: what to do with a parameter that several modules own (tied weights, such as a language model's
    input embedding and output head). ``"error"`` (default) refuses, naming both modules; ``"first"`` puts
    it in the block of its first owner in registration order, and a later owner keeps only its other
    parameters (a module left with none gets no block). Example::

        model.head.weight = model.embed.weight            # tied input and output embeddings
        blocks = by_module(model, shared="first")         # the shared weight is in block "embed"
    """
    if shared not in SHARED:
        raise ValueError(f"by_module: shared must be one of {SHARED}, got {shared!r}")
    names = _trainable(model)
    items = []
    owner: dict[int, str] = {}
    for path, module in model.named_modules():
        path = path or "(root)"
        own = []
        for p in module.parameters(recurse=False):
            if id(p) not in names:
                continue
            if id(p) in owner:
                if shared == "first":
                    continue
                raise ValueError(f"blocks {owner[id(p)]!r} and {path!r} overlap: both hold param {names[id(p)]} "
                                 f"(a tied weight); by_module(model, shared='first') puts a shared parameter in "
                                 f"its first owner's block")
            owner[id(p)] = path
            own.append(p)
        if own:
            items.append((path, own))
    return Blocks(items, names, model)


def by_param(model: nn.Module) -> Blocks:
    """One block per trainable parameter, named by the parameter's path (``"0.weight"``)."""
    names = _trainable(model)
    return Blocks([(n, [p]) for n, p in model.named_parameters() if id(p) in names], names, model)


def by_group(optimizer: torch.optim.Optimizer) -> Blocks:
    """One block per param group, named by the group's ``"name"`` entry or ``group{i}``."""
    return Blocks([(str(g.get("name", f"group{i}")), list(g["params"])) for i, g in enumerate(optimizer.param_groups)])


def by_names(model: nn.Module, patterns: Mapping[str, Sequence[str] | str]) -> Blocks:
    """Blocks from glob patterns over parameter names: ``{"embed": ["wte.*", "wpe.*"], "rest": ["*"]}``.
    A parameter matching several blocks' patterns is an error, as is a trainable parameter matching none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"by_names: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(patterns, Mapping):
        raise TypeError(f"by_names: patterns must be a dict block name -> glob pattern(s), got "
                        f"{type(patterns).__name__}; e.g. {{'body': ['0.*', '2.*'], 'head': '4.*'}}")
    names = _trainable(model)
    items = []
    owner: dict[str, str] = {}
    for block, pats in patterns.items():
        if not isinstance(block, str):
            raise TypeError(f"by_names: block names must be str, got {block!r}")
        pats = [pats] if isinstance(pats, str) else pats
        if not isinstance(pats, Iterable) or not all(isinstance(pat, str) for pat in pats):
            raise TypeError(f"by_names: block {block!r}: patterns must be a str or a list of str, got {pats!r}")
        pats = list(pats)
        members = []
        for pname, p in model.named_parameters():
            if id(p) in names and any(fnmatch.fnmatchcase(pname, pat) for pat in pats):
                if pname in owner:
                    raise ValueError(f"blocks {owner[pname]!r} and {block!r} overlap: both match param {pname}")
                owner[pname] = block
                members.append(p)
        if not members:
            raise ValueError(f"block {block!r}: patterns {pats} match no trainable parameter")
        items.append((block, members))
    unmatched = [n for n in names.values() if n not in owner]
    if unmatched:
        raise ValueError(f"params {unmatched[:5]} match no block's patterns: every parameter needs exactly one block")
    return Blocks(items, names, model)


def default_names(param_groups: Sequence[dict]) -> list[str]:
    """One block per param group, named by the group's "name" entry or ``group{i}``."""
    return [str(g.get("name", f"group{i}")) for i, g in enumerate(param_groups)]


def resolve(param_groups: Sequence[dict], blocks) -> tuple[tuple[str, ...], dict[int, int]]:
    """For an optimizer: block names and a map id(param) -> block index covering every parameter exactly
    once. ``blocks=None`` gives one block per param group; otherwise anything :meth:`Blocks.of` takes."""
    if blocks is None:
        names = default_names(param_groups)
        if len(set(names)) != len(names):
            raise ValueError(f"param group names must be unique to serve as block names, got {names}")
        return tuple(names), {id(p): gi for gi, g in enumerate(param_groups) for p in g["params"]}
    spec = Blocks.of(blocks)
    spec.check_covers([p for g in param_groups for p in g["params"]])
    return spec.names, {id(p): spec.index(p) for g in param_groups for p in g["params"]}
