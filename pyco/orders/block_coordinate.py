"""Block-coordinate steps around any optimizer: each step updates an active subset of blocks, and the others
are frozen for the backward pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim import Optimizer

from pyco import _dtensor
from pyco.orders._wrapper import Fingerprint, OrderWrapper, check_seed, evaluate, frozen
from pyco.orders.gauss_seidel import check_generator_state
from pyco.orders.schedules import BlockSchedule
from pyco.stats import BlockStats

STATE_POLICIES = ("keep", "reset")


class BlockCoordinate(OrderWrapper):
    r"""Block-coordinate steps, wrapping any ``torch.optim.Optimizer``: a step moves only the active blocks A,

    .. math::
        \theta'_b = \theta_b + U_b(\nabla_{\theta_b} L(\theta)) \ \ (b \in A), \qquad \theta'_b = \theta_b
        \ \ (b \notin A)

    with U the inner optimizer's rule. While the closure runs, the parameters of inactive blocks have
    ``requires_grad=False``: autograd computes no weight gradient for them and the backward stops below the
    lowest active block (so with only the top block active a step costs little more than a forward). The flags
    are restored afterwards, even when the closure raises.

    The active set is ``always`` plus ``active`` blocks chosen by ``schedule`` among the others, and changes
    every ``every`` steps. The schedules (see :class:`pyco.orders.schedules.BlockSchedule`): "cyclic",
    "cyclic-descending", "reshuffle" (a random permutation per epoch), "random-subset" (i.i.d.), and "greedy"
    (the largest gradient norms). Greedy needs every block's gradient: at the steps where the set changes the
    closure runs with all blocks requiring grad (a full backward), then the choice is made and only the chosen
    blocks move. Random schedules draw from the wrapper's seeded generator, saved in ``state_dict``.

    After every step the wrapper checks that exactly the active blocks moved (``verify=True``): each active
    block must have received a gradient, and no inactive block may have changed (with pyco's optimizers
    from the kernel's per-block statistics, at no cost; with others from the inactive parameters' version
    counters and norms, one fused read). It raises otherwise, naming the block and the parameter.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (pyco's or torch's).
        blocks: a :class:`pyco.blocks.Blocks`, a dict name -> tensors, or None for one block per param group.
        schedule (default "cyclic"): one of ``pyco.orders.SCHEDULES``.
        active (default 1): how many scheduled blocks are active at a time (besides ``always``).
        every (default 1): the active set changes every ``every`` steps.
        always (default none): names of blocks that are active at every step.
        state (default "keep"): the inner optimizer's state of blocks that are not active: "keep" it (momentum
            and Adam moments resume where they were), or "reset" it (dropped when the block leaves the active
            set, so it starts afresh when re-activated; blocks inactive at the first step start afresh too).
        seed (default 0): seeds the schedule's generator.
        verify (default True): check after every step that exactly the active blocks moved.

    The step takes the usual closure (``loss.backward()`` inside); without one, the gradients already on the
    parameters are used (and no backward is saved). ``active_blocks`` names the blocks of the last step. A
    closure that raises leaves the wrapper as before the step (schedule, active set, optimizer state, the
    parameters' gradients); the closure runs once, as for a plain optimizer, so what its forward consumed
    (random draws, batch-norm statistics) is its own.

    Under ``torch.nn.parallel.DistributedDataParallel`` build DDP with ``find_unused_parameters=True``: the
    frozen blocks take no part in the backward, and DDP's reducer otherwise waits for their gradients (and
    fails at the next forward). With it, their gradients stay None on every rank and the active blocks' are
    averaged as usual, so the step equals the single-process step on the whole batch. A DDP without it
    (``static_graph=True`` does not help: the graph changes with the active set) is refused with an error,
    at construction when the blocks come from ``by_module(ddp)``, else at the first forward through it.

    Example::

        opt = pyco.BlockCoordinate(pyco.optim.AdamW(model.parameters()), pyco.blocks.by_module(model),
                                   schedule="cyclic-descending", every=100, state="reset")

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    """

    def __init__(self, optimizer: Optimizer, blocks=None, schedule: str = "cyclic", *, active: int = 1,
                 every: int = 1, always: Sequence[str] = (), state: str = "keep", seed: int = 0,
                 verify: bool = True):
        check_seed(seed, type(self).__name__)
        super().__init__(optimizer, blocks)
        _check_ddp(self.blocks.module)
        names = self.blocks.names
        if not isinstance(always, (str, list, tuple)):
            raise TypeError(f"Invalid always: {always!r} (expected a block name or a list of block names)")
        always = [always] if isinstance(always, str) else list(always)
        unknown = [n for n in always if n not in names]
        if unknown or len(set(always)) != len(always):
            raise ValueError(f"Invalid always: {always} (expected distinct block names among {list(names)})")
        pool = [b for b, n in enumerate(names) if n not in always]
        if not isinstance(active, int) or isinstance(active, bool) or not 0 <= active <= len(pool):
            raise ValueError(f"Invalid active: {active!r} (expected an int, 0 <= active <= {len(pool)}, the number of "
                             "blocks not in always)")
        if active + len(always) == 0:
            raise ValueError("active=0 with no always blocks would update nothing; set active >= 1 or always")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"Invalid every: {every!r} (expected an int >= 1)")
        if state not in STATE_POLICIES:
            raise ValueError(f"Invalid state: {state!r} (expected one of {STATE_POLICIES})")
        self.schedule = BlockSchedule(schedule, pool, active, seed)
        self.every = every
        self.state_policy = state
        self.verify = bool(verify)
        self._always = [names.index(n) for n in always]
        self._active: list[int] | None = None
        self._inactive: list[torch.Tensor] = []  # the parameters of the blocks not in _active

    @property
    def active_blocks(self) -> tuple[str, ...]:
        """Names of the blocks the last step updated (empty before the first step)."""
        return tuple(self.blocks.names[b] for b in self._active or ())

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Updates the active blocks; returns the closure's loss (None without closure)."""
        was = self._active, self._inactive, self.schedule.state_dict(), [(p, p.grad) for p in self.blocks.params()]
        previous = self._active
        try:
            switching = self._active is None or self.steps % self.every == 0
            needs_all = switching and self.schedule.needs_gradients
            if switching and not needs_all:
                self._switch(self.schedule.next())
            loss = None
            if closure is not None:
                with frozen([] if needs_all else self._inactive), _refusing_ddp_without_unused():
                    loss = evaluate(closure, f"{type(self).__name__}.step")
            if needs_all:
                self._switch(self.schedule.next(self._grad_norms()))
            if self.verify:
                self._check_active_have_grads()
        except BaseException:  # nothing has moved yet: put the schedule's position and the gradients back
            self._active, self._inactive = was[0], was[1]
            self.schedule.load_state_dict(was[2])
            for p, g in was[3]:
                p.grad = g
            raise
        if switching and self.state_policy == "reset":
            self._reset_leaving(previous)
        self.last_stats = self._step_active()
        self.steps += 1
        return loss

    def _switch(self, scheduled: Sequence[int]) -> None:
        self._active = sorted({*scheduled, *self._always})
        self._inactive = self._params_outside(self._active)

    def _reset_leaving(self, previous: Sequence[int] | None) -> None:
        """state="reset": drops the optimizer state of the blocks that left the active set (at the first step,
        of every inactive block: state from before wrapping)."""
        leaving = range(len(self.blocks)) if previous is None else previous
        for b in leaving:
            if b not in self._active:
                for p in self._block_params(b):
                    self.optimizer.state.pop(p, None)

    def _grad_norms(self) -> torch.Tensor:
        """‖g_b‖ per block (float64), from the gradients the parameters hold. DTensor gradients (FSDP2): from
        the local shards' squared norms, summed over the mesh (one all-reduce), the same on every rank."""
        sharding = _dtensor.sharding_of(type(self).__name__, [(None, p) for p in self.blocks.params()],
                                        lambda _, p: self.blocks.describe(p))
        if sharding is not None:
            squares = torch.zeros(len(self.blocks), dtype=torch.float64)
            for b in range(len(self.blocks)):
                for p in self._block_params(b):
                    if p.grad is not None:
                        squares[b] += float(torch.linalg.vector_norm(p.grad.detach().to_local())) ** 2
            return sharding.sum_(squares).sqrt()
        norms = torch.zeros(len(self.blocks), dtype=torch.float64)
        for b in range(len(self.blocks)):
            grads = [p.grad.detach() for p in self._block_params(b) if p.grad is not None]
            if grads:
                norms[b] = sum(float(torch.linalg.vector_norm(g)) ** 2 for g in grads) ** 0.5
        return norms

    def _check_active_have_grads(self) -> None:
        for b in self._active:
            params = self._block_params(b)
            if all(p.grad is None for p in params):
                raise RuntimeError(
                    f"block {self.blocks.names[b]!r} is active at step {self.steps} but none of its parameters "
                    f"({self.blocks.describe(params[0])}, ...) has a gradient: does the closure's forward use it "
                    "and call backward? (verify=False allows a step that leaves an active block unmoved)"
                )

    def _step_active(self) -> BlockStats | None:
        """Steps the active blocks and, with ``verify``, checks that no inactive block moved."""
        if not self.verify:
            return self._step_blocks(self._active)
        if self._is_fused:  # the kernel's statistics tell which blocks moved, at no extra cost
            stats = self._step_blocks(self._active)
            if stats is not None:
                moved = stats.update_sq != 0
                moved[self._active] = False
                if bool(moved.any()):  # with CUDA parameters, this reads the statistics back from the device
                    self._raise_moved(self._block_params(int(moved.nonzero()[0]))[0])
            return stats
        before = Fingerprint(self._inactive)
        self._step_blocks(self._active)
        changed = before.first_changed()
        if changed is not None:
            self._raise_moved(self._inactive[changed])
        return None

    def _raise_moved(self, p: torch.Tensor) -> None:
        name = self.blocks.names[self.blocks.index(p)]
        raise RuntimeError(
            f"block {name!r} is inactive at step {self.steps} but {type(self.optimizer).__name__} changed its "
            f"{self.blocks.describe(p)}: the optimizer updates parameters whose .grad is None (weight decay or "
            "momentum applied regardless?), so it cannot run block-coordinate steps; use one that skips them "
            "(torch.optim's and pyco.optim's do)"
        )

    # ---- checkpoints ----------------------------------------------------------------------------------

    def _order_state(self) -> dict:
        return {"schedule": self.schedule.kind, "active": None if self._active is None else list(self.active_blocks),
                **{f"schedule_{k}": v for k, v in self.schedule.state_dict().items()}}

    def _check_order_state(self, own: dict) -> None:
        if own.get("schedule") != self.schedule.kind:
            raise ValueError(f"BlockCoordinate.load_state_dict: the state_dict was saved with schedule "
                             f"{own.get('schedule')!r}, this wrapper has {self.schedule.kind!r}")
        who = "BlockCoordinate.load_state_dict"
        active = own.get("active")
        if active is not None and (not isinstance(active, list) or any(n not in self.blocks for n in active)):
            raise ValueError(f"{who}: active blocks {active!r} must be None or a list of names among "
                             f"{list(self.blocks)}")
        cursor, permutation = own.get("schedule_cursor"), own.get("schedule_permutation")
        k = len(self.blocks)
        if not isinstance(cursor, int) or isinstance(cursor, bool) or cursor < 0:
            raise ValueError(f"{who}: 'schedule_cursor' must be a non-negative int, got {cursor!r}")
        if not isinstance(permutation, list) or any(
                not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < k for b in permutation):
            raise ValueError(f"{who}: 'schedule_permutation' must be a list of block indices in [0, {k}), "
                             f"got {permutation!r}")
        check_generator_state(own.get("schedule_generator"), type(self).__name__)

    def _load_order_state(self, own: dict) -> None:
        active = own["active"]
        self._active = None if active is None else [self.blocks.names.index(n) for n in active]
        self._inactive = [] if active is None else self._params_outside(self._active)
        self.schedule.load_state_dict({k[len("schedule_"):]: v for k, v in own.items() if k.startswith("schedule_")})


def _check_ddp(module) -> None:
    if (isinstance(module, nn.parallel.DistributedDataParallel) and not module.find_unused_parameters):
        raise ValueError(
            "BlockCoordinate under DistributedDataParallel needs find_unused_parameters=True: the inactive blocks "
            "are frozen and get no gradient, which DDP's reducer otherwise waits for; build it as "
            "DistributedDataParallel(model, find_unused_parameters=True)"
        )


@contextmanager
def _refusing_ddp_without_unused():
    """While the closure runs: a forward through a DDP without find_unused_parameters raises (before DDP runs
    it), when torch.distributed is in use."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    handle = nn.modules.module.register_module_forward_pre_hook(lambda module, args: _check_ddp(module))
    try:
        yield
    finally:
        handle.remove()
