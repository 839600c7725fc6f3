"""What the update orders share: an optimizer-shaped wrapper around any torch optimizer and a block partition,
and the one primitive every order is built from, "step only these blocks".

An order owns no update rule. To move a subset of blocks it hands the inner optimizer a step in which only
those blocks' parameters have a ``.grad`` (torch's optimizers skip a parameter whose ``.grad`` is None, so
the others' values and optimizer state stay as they were); pyco's own optimizers do the same in one kernel
launch through :meth:`pyco.optim.SGD.step_blocks`, without touching ``.grad`` at all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch.optim import Optimizer

from pyco import blocks as _blocks
from pyco.optim._fused import FusedOptimizer
from pyco.stats import BlockStats

# The key under which a wrapper stores its own state in the inner optimizer's state_dict. Everything else is
# the inner optimizer's, in its own layout, so a wrapper's checkpoint also loads into the bare optimizer.
ORDER_KEY = "pyco_order"


class OrderWrapper(Optimizer):
    """Base of the orders: behaves as the wrapped optimizer (``param_groups``, ``state``, ``defaults``,
    ``zero_grad``, ``state_dict``, lr schedulers) and knows the blocks.

    Subclasses implement ``step`` and ``_order_state`` / ``_load_order_state`` (their own state: step count,
    schedule position, random generator), which travels in ``state_dict()[ORDER_KEY]``.
    """

    def __init__(self, optimizer: Optimizer, blocks):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__} wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, OrderWrapper):
            raise TypeError(f"{type(self).__name__} cannot wrap another order ({type(optimizer).__name__}); "
                            "wrap the inner optimizer (its .optimizer) instead")
        self.optimizer = optimizer
        self._is_fused = isinstance(optimizer, FusedOptimizer)
        self.blocks = _blocks.by_group(optimizer) if blocks is None else _blocks.Blocks.of(blocks)
        what = f"the optimizer ({type(optimizer).__name__})"
        self.blocks.check_covers([p for g in optimizer.param_groups for p in g["params"]], what=what)
        for name in self.blocks:
            if not self.blocks[name]:
                raise ValueError(f"block {name!r} holds no parameters; remove it from the blocks")
        self.steps = 0
        self.last_stats: BlockStats | None = None
        # What torch.optim.Optimizer.__init__ sets up for hooks and the profiler, without copying param groups.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # ---- behaving as the inner optimizer --------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError(
            f"{type(self).__name__}.add_param_group: the blocks are fixed at construction; add the group to the "
            "inner optimizer and build a new wrapper with blocks that cover it"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r}, blocks={list(self.blocks)})"

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)

    @property
    def block_names(self) -> tuple[str, ...]:
        return self.blocks.names

    # ---- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The inner optimizer's state_dict (its own layout) plus this order's state under ``"pyco_order"``."""
        state = self.optimizer.state_dict()
        state[ORDER_KEY] = {"order": type(self).__name__, "blocks": list(self.blocks), "steps": self.steps,
                            **self._order_state()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict from :meth:`state_dict`. The order's entry is checked before anything is loaded."""
        if not isinstance(state_dict, dict) or ORDER_KEY not in state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state_dict has no {ORDER_KEY!r} entry (was it saved "
                f"from the bare optimizer?); load it into the inner optimizer with .optimizer.load_state_dict(...) "
                "to start this order afresh"
            )
        state_dict = dict(state_dict)
        own = state_dict.pop(ORDER_KEY)
        if not isinstance(own, dict):
            raise ValueError(f"{type(self).__name__}.load_state_dict: the {ORDER_KEY!r} entry is a "
                             f"{type(own).__name__}, expected the dict that state_dict() writes")
        if own.get("order") != type(self).__name__ or own.get("blocks") != list(self.blocks):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state_dict was saved by {own.get('order')} with blocks "
                f"{own.get('blocks')}; this is {type(self).__name__} with blocks {list(self.blocks)}"
            )
        steps = own.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"{type(self).__name__}.load_state_dict: 'steps' of the {ORDER_KEY!r} entry must be "
                             f"a non-negative int, got {steps!r}")
        self._check_order_state(own)  # everything of the order's own, checked before anything is loaded
        self.optimizer.load_state_dict(state_dict)  # checks its part first, too (pyco's and torch's optimizers)
        self.steps = steps
        self._load_order_state(own)

    def _order_state(self) -> dict:
        return {}

    def _check_order_state(self, own: dict) -> None:
        """Raises if ``own`` cannot be loaded; must change nothing. After it, ``_load_order_state`` cannot fail."""

    def _load_order_state(self, own: dict) -> None:
        pass

    # ---- the primitive: step only some blocks ------------------------------------------------------------

    def _step_blocks(self, active: Sequence[int]) -> BlockStats | None:
        """One step of the inner optimizer that moves only the blocks with indices in ``active``, from the
        gradients their parameters hold now. Returns per-block statistics with pyco's optimizers."""
        if self._is_fused:
            return self.optimizer.step_blocks(self.blocks, [self.blocks.names[b] for b in active])
        with _without_grads(self._params_outside(active)):
            self.optimizer.step()
        return None

    def _params_outside(self, active: Sequence[int]) -> list[torch.Tensor]:
        keep = set(active)
        return [p for b, name in enumerate(self.blocks.names) if b not in keep for p in self.blocks[name]]

    def _block_params(self, b: int) -> tuple[torch.Tensor, ...]:
        return self.blocks[self.blocks.names[b]]


@contextmanager
def _without_grads(params: Sequence[torch.Tensor]):
    """Hides the gradients of ``params`` (``.grad = None``) for the duration, then puts them back."""
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


@contextmanager
def frozen(params: Sequence[torch.Tensor]):
    """``requires_grad=False`` on ``params`` for the duration (autograd then computes no gradient for them and
    stops below the lowest parameter that still requires one); the flags are restored even on an error."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class Fingerprint:
    """A cheap record of the values of some tensors, to tell afterwards which of them changed: each tensor's
    version counter (bumped by every in-place operation on it or on a view of it, which is how optimizers
    update parameters) and its norm (one fused pass over all of them, for updates made through ``.data``,
    which bypasses the counter)."""

    @torch.no_grad()
    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = params
        self.versions = [p._version for p in params]
        self.norms = torch._foreach_norm(list(params)) if params else ()

    def first_changed(self) -> int | None:
        """Index of the first tensor whose version or norm differs now, or None."""
        now = Fingerprint(self.params)
        for i, (v, w) in enumerate(zip(self.versions, now.versions)):
            if v != w:
                return i
        for i, (a, b) in enumerate(zip(self.norms, now.norms)):
            if not torch.equal(a, b) and not (a.isnan() and b.isnan()):
                return i
        return None


def check_seed(seed, who: str) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"{who}: Invalid seed: {seed!r} (expected an int)")
    return seed


def evaluate(closure: Callable[[], torch.Tensor], who: str):
    """Runs the closure with autograd on and checks that it returned the loss (a scalar)."""
    if not callable(closure):
        raise TypeError(f"{who}: the closure must be callable, got {type(closure).__name__}")
    with torch.enable_grad():
        loss = closure()
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"{who}: the closure returned a tensor of shape {list(loss.shape)}; it must return "
                             "the loss, a scalar (reduce it, e.g. with .mean())")
    elif not isinstance(loss, (int, float)) or isinstance(loss, bool):
        raise TypeError(f"{who}: the closure returned {type(loss).__name__}; it must compute the gradients "
                        "(loss.backward()) and return the loss")
    return loss
