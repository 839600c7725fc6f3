"""The door to the kernels: every tensor a launch touches is checked before the first byte moves.

A step is prepared in two ways:

- **planned** (the common case): the optimizer keeps a :class:`pyco._C.Plan` per kind of launch (a full
  step; each set of blocks moved by ``step_blocks``). The plan holds the records of a table that was checked
  and launched before, and references to the tensors and storages they address. ``Plan.refresh`` re-checks,
  in C++ through the tensors' own methods, only what can change between steps (the param groups'
  membership, every gradient, the state tensors' identity, address and in-place changes) and costs about a
  microsecond per tensor.
- **prepared in Python** (the first step, and any step after the plan no longer holds): :func:`prepare`
  checks every parameter, gradient and state tensor with an error that names the parameter and the state
  entry, creates missing state *pending* (it enters ``optimizer.state`` only when the launch goes ahead)
  and builds a :class:`pyco._kernels.Table`, with working copies where the kernel cannot read a tensor's
  memory as a flat array. A table without copies becomes the next plan.

What is kept alive: the table or plan holds every tensor of the launch and its storage until the launch is
over, so another thread that replaces ``p.data``, a state tensor or ``p.grad`` meanwhile cannot free memory
the kernel is writing (the kernel then updates the old memory; the replacement wins). The optimizer's lock
serialises steps of one optimizer.
"""

from __future__ import annotations

import logging

import torch

from pyco import _dtensor
from pyco import blocks as _blocks
from pyco._ext import _C
from pyco._kernels import STATE_FIELDS, STEP_FIELD, Table, has_internal_overlap

__all__ = ["Prepared", "prepare", "check_state_tensor_for_step", "make_plan"]

log = logging.getLogger("pyco")

# Launch kinds whose plans an optimizer keeps (a full step, and sets of blocks moved by step_blocks).
MAX_PLANS = 64


def _describe(t: torch.Tensor) -> str:
    bits = "".join(f", {name} bit set" for name, on in (("negation", t.is_neg()), ("conjugation", t.is_conj())) if on)
    return f"{t.dtype}, shape {list(t.shape)} on {t.device}{bits}"


def check_state_tensor_for_step(owner: str, where: str, name: str, p: torch.Tensor, t) -> None:
    """A state tensor the kernel will read and write as a flat array of ``p.numel()`` elements of p's dtype:
    anything else is refused with torch's exception type for such mismatches (RuntimeError)."""
    if not isinstance(t, torch.Tensor):
        raise RuntimeError(f"{owner}: {where}: state '{name}' is a {type(t).__name__}, expected a tensor shaped "
                           f"like the parameter ({_describe(p)})")
    problem = None
    if t.layout != torch.strided:
        problem = f"has layout {t.layout}"
    elif t.dtype != p.dtype:
        problem = f"is {t.dtype}"
    elif t.shape != p.shape:
        problem = f"has shape {list(t.shape)}"
    elif t.device != p.device:
        problem = f"is on {t.device}"
    elif has_internal_overlap(t):
        problem = f"has overlapping elements (strides {list(t.stride())})"
    if problem is not None:
        raise RuntimeError(
            f"{owner}: {where}: state '{name}' {problem}, but the parameter is {_describe(p)}; pyco updates "
            f"state tensors of the parameter's dtype, shape and device only. Was p.data replaced, or the state "
            f"edited or loaded for another parameter? Clear it (`optimizer.state[p].clear()` starts this "
            f"parameter afresh) or load a state_dict that fits"
        )


def check_written_param(owner: str, where: str, p: torch.Tensor) -> None:
    if has_internal_overlap(p):
        raise RuntimeError(f"{owner}: {where} has overlapping elements (strides {list(p.stride())}); it cannot "
                           "be updated in place, as torch.optim cannot either")


class Prepared:
    """One launch prepared in Python: its table, the state it creates (``pending``: parameter -> entries,
    applied by :meth:`commit` only when the launch goes ahead) and what a plan needs to take it over."""

    def __init__(self, candidates: list[torch.Tensor]):
        self.table = Table()
        self.candidates = candidates  # every parameter considered, in order (with or without gradient)
        self.pending: dict[torch.Tensor, dict] = {}
        self.kept: dict[int, tuple[int, list]] = {}  # id(param) -> (record index, [(field, key, tensor)])
        self._undo: list = []  # what commit changed: (state, param, created, previous values, new keys)

    def commit(self, state) -> None:
        """Puts the pending state into ``state`` (the optimizer's); :meth:`rollback` undoes it."""
        for p, new in self.pending.items():
            created = p not in state
            entry = state.setdefault(p, {})
            self._undo.append((state, p, created, {k: entry[k] for k in new if k in entry}, list(new)))
            entry.update(new)

    def rollback(self) -> None:
        for state, p, created, old, keys in reversed(self._undo):
            if created:
                state.pop(p, None)
                continue
            for k in keys:
                state[p].pop(k, None)
            state[p].update(old)
        self._undo.clear()


def prepare(opt, work, index: dict[int, int], candidates: list[torch.Tensor], *, sharded: bool = False) -> Prepared:
    """Checks every tensor of ``work`` (from ``FusedOptimizer._collect``: gradients already checked) and
    packs the table. Raises before anything changed; ``opt.state`` is not touched (new state is pending).

    ``sharded``: the parameters are DTensors (their gradients in ``work`` are already local shards). Their
    state tensors are DTensors placed like them (new ones too, as torch.optim makes them); the table holds
    the local shards, each checked as any tensor is, and never becomes a plan."""
    prepared = Prepared(candidates)
    owner = type(opt).__name__
    table = prepared.table
    for gi, group, pairs in work:
        for pi, p, g in pairs:
            where = _blocks.describe_param(gi, pi, p)
            if sharded:
                states, step, flags, kept = opt._states(p, group, prepared.pending, where)
                local, states = _local_shards(owner, where, p, opt._slots(group), states)
                check_written_param(owner, where, local)
                record = table.add(local, g, states, step=step, group=gi, block=index[id(p)], flags=flags)
            else:
                check_written_param(owner, where, p)
                states, step, flags, kept = opt._states(p, group, prepared.pending, where)
                record = table.add(p, g, states, step=step, group=gi, block=index[id(p)], flags=flags)
            prepared.kept[id(p)] = (record, kept)
    if sharded:
        table.cacheable = False
    return prepared


def _local_shards(owner: str, where: str, p, names, states) -> tuple:
    """The local shards of DTensor parameter ``p`` and of its state tensors (checked to be DTensors placed like
    it, then as any state tensor against the parameter's shard)."""
    local = p.to_local()
    shards = []
    for name, t in zip(names, states):
        if t is None:
            shards.append(None)
            continue
        shard = _dtensor.local_state(owner, where, name, p, t)
        check_state_tensor_for_step(owner, where, name, local, shard)
        shards.append(shard)
    return local, (*shards, *states[len(shards):])


def make_plan(opt, prepared: Prepared, groups: list[list]):
    """A :class:`pyco._C.Plan` that takes over ``prepared`` (already launched) for later steps, or None when
    its table needed working copies (such layouts are prepared in Python every step)."""
    if not prepared.table.cacheable:
        return None
    entries = []
    for p in prepared.candidates:
        record, kept = prepared.kept.get(id(p), (-1, []))
        entries.append((p, record, kept))
    try:
        return _C.Plan(groups, entries, prepared.table.records)
    except (ValueError, RuntimeError, TypeError) as exc:
        # A tensor changed since the table was packed (another thread replaced p.data while the kernel
        # ran): the step is done; the next one is prepared in Python again.
        log.debug("no plan for this launch: %s", exc)
        return None


def kept_state(p: torch.Tensor, slots, step=None) -> list:
    """The plan's view of one parameter's state: (record field, state key, tensor) for each state tensor
    and the step counter."""
    kept = [(field, key, t) for field, (key, t) in zip(STATE_FIELDS, slots) if t is not None]
    if step is not None:
        kept.append((STEP_FIELD, "step", step))
    return kept

