"""Exact Gauss–Seidel (layer-sequential) steps around any optimizer: blocks move one at a time, each from
its gradient recomputed on the same batch at the parameters the blocks before it left."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from pyco.orders._replay import BufferReplay, RandomState
from pyco.orders._wrapper import OrderWrapper, check_seed, evaluate
from pyco.stats import BlockStats

SWEEPS = ("backward", "forward", "random")


class GaussSeidel(OrderWrapper):
    r"""Gauss–Seidel sweeps over blocks of parameters, wrapping any ``torch.optim.Optimizer``.

    One step visits the blocks in a sweep order π(1), …, π(k). Block π(j) is updated from its gradient at
    the parameters already updated by the blocks before it in the sweep, on the same batch:

    .. math::
        g_{\pi(j)} = \nabla_{\theta_{\pi(j)}} L(\theta'_{\pi(1)}, \dots, \theta'_{\pi(j-1)},
                     \theta_{\pi(j)}, \dots, \theta_{\pi(k)}), \qquad
        \theta'_{\pi(j)} = \theta_{\pi(j)} + U_{\pi(j)}(g_{\pi(j)})

    where U is the inner optimizer's rule (its learning rate, momentum, Adam moments...). With k = 1 this is
    the inner optimizer's own step. "Same batch" is exact:

    - the closure is evaluated once per block; before every evaluation after the first the random-number
      state (CPU and, where initialized, CUDA) is replayed, so dropout draws the same masks; afterwards the
      generators are left as one plain evaluation would have left them;
    - the buffers of ``model`` (batch norm's running statistics) are replayed too: every recomputation
      starts from their values before the step (one copy of the buffers each), and afterwards they are as
      the first evaluation left them, so running statistics advance once per step;
    - each block's optimizer state advances exactly once per step: the inner optimizer steps once per block,
      with only that block's parameters holding a gradient (pyco's optimizers: one launch for the block).

    A step is all or nothing: if the closure (or anything else) raises in the middle of a sweep, the blocks
    already moved get their values and optimizer state back, the gradients, buffers, random-number state and
    the sweep's generator are as before the step, and the exception propagates (each block's values and state
    are copied just before it moves: one copy of the parameters and their state per step).

    The step returns the loss of the first evaluation (at the parameters before the step). Afterwards each
    parameter's ``.grad`` is the gradient its block was updated with. The wrapper clears the gradients before
    every evaluation, so the closure need not call ``zero_grad`` (it may). The generic path costs k full
    evaluations; for ``nn.Sequential`` models :class:`pyco.orders.ChainGaussSeidel` recomputes only what
    changed.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (pyco's or torch's); its param groups, state, lr schedulers
            and ``state_dict`` are reached through the wrapper.
        blocks: a :class:`pyco.blocks.Blocks` (``by_module(model)``...), a dict name -> tensors, or None for one
            block per param group. Must cover the optimizer's parameters exactly once.
        sweep (default "backward"): "backward" (last block first), "forward" (blocks in their order),
            "random" (a fresh permutation every step, from the wrapper's seeded generator), or a list naming
            every block once.
        model: the module whose buffers are replayed; default ``blocks.module`` (set by ``by_module``,
            ``by_param`` and ``by_names``). None (blocks from a dict or ``by_group``) replays no buffers.
        seed (default 0): seeds the generator of the "random" sweep (saved in ``state_dict``).

    Example::

        opt = pyco.GaussSeidel(torch.optim.SGD(model.parameters(), lr=0.1), pyco.blocks.by_module(model))

        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
    """

    def __init__(self, optimizer: Optimizer, blocks=None, sweep: str | Sequence[str] = "backward", *,
                 model: nn.Module | None = None, seed: int = 0):
        check_seed(seed, type(self).__name__)
        super().__init__(optimizer, blocks)
        self.sweep = _check_sweep(sweep, self.blocks.names)
        self.model = model if model is not None else self.blocks.module
        self._buffers = BufferReplay([] if self.model is None else [self.model])
        self._generator = torch.Generator().manual_seed(int(seed))

    def sweep_order(self) -> list[str]:
        """The block names in the order the next step visits them (draws the next "random" permutation)."""
        return [self.blocks.names[b] for b in self._next_sweep()]

    def _next_sweep(self) -> list[int]:
        k = len(self.blocks)
        if self.sweep == "forward":
            return list(range(k))
        if self.sweep == "backward":
            return list(range(k - 1, -1, -1))
        if self.sweep == "random":
            return torch.randperm(k, generator=self._generator).tolist()
        return [self.blocks.names.index(name) for name in self.sweep]

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One sweep: k evaluations of ``closure`` and k block updates. Returns the first evaluation's loss.

        Args:
            closure: computes the loss on the batch, calls ``backward()`` and returns the loss (required).
        """
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step needs a closure: each block's gradient is recomputed on the same "
                "batch after the blocks before it moved. Pass one, e.g. "
                "def closure(): loss = loss_fn(model(x), y); loss.backward(); return loss; opt.step(closure)"
            )
        used: dict[int, list] = {}
        rows: dict[int, BlockStats | None] = {}
        with Sweep(self) as sweep:  # snapshots the sweep generator too: take it before drawing the order
            order = self._next_sweep()
            for j, b in enumerate(order):
                if j > 0:  # the same batch: same random draws, same buffers as the first evaluation saw
                    sweep.before.restore()
                    self._buffers.replay()
                self.optimizer.zero_grad(set_to_none=True)
                value = evaluate(closure, f"{type(self).__name__}.step (block {self.blocks.names[b]!r})")
                if j == 0:
                    loss = value
                    sweep.first_evaluation_done()
                used[b] = [p.grad for p in self._block_params(b)]
                sweep.undo.before_update(self._block_params(b))
                rows[b] = self._step_blocks([b])
        self._restore_used_grads(used)
        self.last_stats = combine_stats(self.blocks.names, rows)
        self.steps += 1
        return loss

    def _restore_used_grads(self, used: dict[int, list]) -> None:
        """Leaves on every parameter the gradient its block's update used (the later evaluations replaced it)."""
        for b, grads in used.items():
            for p, g in zip(self._block_params(b), grads):
                p.grad = g

    # ---- checkpoints ----------------------------------------------------------------------------------

    def _order_state(self) -> dict:
        sweep = self.sweep if isinstance(self.sweep, str) else list(self.sweep)
        return {"sweep": sweep, "generator": self._generator.get_state()}

    def _check_order_state(self, own: dict) -> None:
        check_generator_state(own.get("generator"), type(self).__name__)

    def _load_order_state(self, own: dict) -> None:
        self._generator.set_state(own["generator"])


def _check_sweep(sweep, names: tuple[str, ...]) -> str | tuple[str, ...]:
    if isinstance(sweep, str):
        if sweep not in SWEEPS:
            raise ValueError(f"Invalid sweep: {sweep!r} (expected one of {SWEEPS} or a list naming every block once)")
        return sweep
    if not isinstance(sweep, (list, tuple)):
        raise TypeError(f"Invalid sweep: {sweep!r} (expected one of {SWEEPS} or a list naming every block once)")
    order = tuple(sweep)
    unknown = [n for n in order if n not in names]
    repeated = sorted({n for n in order if order.count(n) > 1})
    missing = [n for n in names if n not in order]
    if unknown or repeated or missing:
        raise ValueError(
            f"Invalid sweep {list(order)}: it must name every block exactly once (blocks are {list(names)}); "
            f"unknown {unknown}, repeated {repeated}, missing {missing}"
        )
    return order


def combine_stats(names: tuple[str, ...], rows: dict[int, BlockStats | None]) -> BlockStats | None:
    """One BlockStats for a step made of several launches (each launch fills its own blocks' rows)."""
    if not rows or any(r is None for r in rows.values()):
        return None
    values, skipped, skipped_blocks = 0, False, set()
    for r in rows.values():
        values, skipped = values + r.values, skipped | r.skipped  # device tensors stay there: no host sync
        skipped_blocks.update(r.skipped_blocks)
    return BlockStats(names, values, skipped, tuple(n for n in names if n in skipped_blocks))


class Sweep:
    """One sweep as a transaction: the random state at entry (``before``) is what every recomputation replays;
    after the first evaluation the state it left is recorded and restored at exit, so the generators end as
    one plain evaluation leaves them. If the sweep raises, parameters, optimizer state, gradients, buffers and
    random state go back to their values at entry (``undo``) and the exception propagates."""

    def __init__(self, wrapper: "GaussSeidel"):
        self.wrapper = wrapper
        self.undo = Rollback(wrapper)
        self.before = RandomState()
        self.after: RandomState | None = None

    def first_evaluation_done(self) -> None:
        self.after = RandomState()
        self.wrapper._buffers.first_done()

    def __enter__(self) -> "Sweep":
        self.wrapper._buffers.begin()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None:
                self.after = None
                self.undo.restore(self.before)
        finally:
            if self.after is not None:
                self.after.restore()
            self.wrapper._buffers.finish()
        return False


class Rollback:
    """Undoes a Gauss–Seidel step that raised: what the step changes is kept as it goes (the gradients and
    the sweep's generator at the start; each block's values and optimizer state just before it moves) and
    :meth:`restore` puts it back, with the buffers and the random-number state from before the step."""

    def __init__(self, wrapper: GaussSeidel):
        self.wrapper = wrapper
        self.grads = [(p, p.grad) for p in wrapper.blocks.params()]
        generator = getattr(wrapper, "_generator", None)  # orders without a random sweep have none
        self.generator = None if generator is None else generator.get_state()
        inner = wrapper.optimizer
        self.inner = {k: getattr(inner, k) for k in ("last_stats", "skipped_steps") if hasattr(inner, k)}
        self.moved: list[tuple[torch.Tensor, torch.Tensor, dict | None]] = []

    @torch.no_grad()
    def before_update(self, params: Sequence[torch.Tensor]) -> None:
        state = self.wrapper.optimizer.state
        for p in params:
            entry = state.get(p)  # .get: the state is a defaultdict, and looking must not create an entry
            saved = None if entry is None else {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                                                for k, v in entry.items()}
            self.moved.append((p, p.detach().clone(), saved))

    @torch.no_grad()
    def restore(self, rng: RandomState) -> None:
        state = self.wrapper.optimizer.state
        for p, value, saved in reversed(self.moved):
            p.copy_(value)
            if saved is None:
                state.pop(p, None)
                continue
            entry = state[p]
            for key in [k for k in entry if k not in saved]:
                del entry[key]
            for key, old in saved.items():  # in place where possible: a captured CUDA graph keeps addresses
                now = entry.get(key)
                if (isinstance(old, torch.Tensor) and isinstance(now, torch.Tensor) and now.shape == old.shape
                        and now.dtype == old.dtype and now.device == old.device):
                    now.copy_(old)
                else:
                    entry[key] = old
        for p, g in self.grads:
            p.grad = g
        if self.generator is not None:
            self.wrapper._generator.set_state(self.generator)
        for key, value in self.inner.items():
            setattr(self.wrapper.optimizer, key, value)
        self.wrapper._buffers.rollback()
        rng.restore()


def check_generator_state(state, who: str) -> None:
    """Raises unless ``state`` loads into a torch.Generator (tried on a scratch one)."""
    if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1):
        raise ValueError(f"{who}.load_state_dict: 'generator' must be the uint8 tensor of "
                         f"torch.Generator.get_state(), got {type(state).__name__}")
    try:
        torch.Generator().set_state(state)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{who}.load_state_dict: 'generator' is not a torch.Generator state ({exc})") from None