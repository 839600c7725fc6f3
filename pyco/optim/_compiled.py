"""pyco's update kernels as torch custom operators, for steps traced by ``torch.compile``.

An eager step goes through :mod:`pyco.optim._door` and the cached :class:`pyco._C.Plan` (the fast path).
Under ``torch.compile`` (``torch.compiler.is_compiling()``) the optimizer's Python step is traced instead:
it checks the tensors' metadata and creates missing state as the eager path does, then calls one custom
operator per launch, ``pyco::adam_step`` or ``pyco::sgd_step``. Their fake implementations tell the
compiler what they write (``mutates_args``: parameters, state tensors and step counters; gradients are only
read) and that they return a new float64 ``[k, 4]`` tensor of per-block statistics (``[0, 4]`` without
statistics). Their real implementation runs when the compiled step runs, with the tensors the graph holds
then: it checks every tensor again, with the eager path's checks and errors, packs the same table
(:class:`pyco._kernels.Table`, working copies included) and launches the same kernel. So what a compiled step
launches is checked as an eager one is, and float32 results are bitwise those of an eager step.

The operators take flat lists: ``written`` holds, per record, the parameter, its state tensors and its step
counter (if any); ``layout`` holds ``RECORD_INTS`` ints per record (group, index in group, block row, kernel
flags, number of state tensors, has a step counter); ``hypers`` holds each group's hyper-parameters, and a
hyper-parameter given as a tensor travels in ``hyper_tensors`` (read when the step runs) with its position
in ``hyper_slots``.
"""

from __future__ import annotations

import math

import torch

from pyco import blocks as _blocks
from pyco._kernels import SUPPORTED_DTYPES, Table

__all__ = ["RECORD_INTS", "RULES", "launch"]

RECORD_INTS = 6  # group, index in group, block row, flags, number of state tensors, has a step counter

# rule ("adam", "sgd") -> optimizer class: its _STATE_NAMES, _group_from_values, _check_group, _hyper, _kernel
RULES: dict[str, type] = {}


def _scalar(t: torch.Tensor, what: str) -> float:
    if t.numel() != 1:
        raise ValueError(f"Tensor {what} must be 1-element, got shape {list(t.shape)}")
    return float(t)


def _hypers_of(cls, hypers, hyper_tensors, hyper_slots, group_flags, num_groups):
    values = list(hypers)
    for slot, t in zip(hyper_slots, hyper_tensors):
        values[slot] = _scalar(t, cls._HYPER_NAMES[slot % len(cls._HYPER_NAMES)])
    n, f = len(cls._HYPER_NAMES), len(cls._HYPER_FLAGS)
    if len(values) != n * num_groups or len(group_flags) != f * num_groups:
        raise ValueError(f"pyco::{cls._rule}_step: {len(values)} hyper-parameters and {len(group_flags)} flags for "
                         f"{num_groups} groups")
    structs = []
    for gi in range(num_groups):
        group = cls._group_from_values(values[gi * n:(gi + 1) * n], group_flags[gi * f:(gi + 1) * f])
        cls._check_group(group)
        structs.append(cls._hyper(group))
    return structs


def _check_step_counter(owner: str, where: str, step: torch.Tensor) -> None:
    if (step.numel() != 1 or step.dtype not in (torch.float32, torch.float64) or not step.is_cpu
            or step.layout != torch.strided or step.is_neg()):
        raise RuntimeError(f"{owner}: {where}: 'step' is {step.dtype}, shape {list(step.shape)} on {step.device}; "
                           "expected a one-element float32/float64 tensor on the CPU, the count of steps taken")


def _check_record(owner: str, where: str, p: torch.Tensor, g: torch.Tensor, names, states) -> None:
    """The eager door's checks (pyco.optim._fused._collect/_reject_grad and pyco.optim._door.prepare) on one
    record, with the same exception types."""
    from pyco.optim._door import check_state_tensor_for_step, check_written_param

    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{owner}: {where} has unsupported dtype {p.dtype}; pyco updates float32, float64, float16, "
                        "bfloat16 and complex64/complex128 parameters")
    if not p.is_cpu:
        raise ValueError(f"{owner}: {where} is on {p.device}; a compiled pyco step runs the CPU kernels only (CUDA "
                         "parameters take the eager path)")
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"{owner}: {where} has a sparse gradient ({g.layout}), which pyco does not support; use "
                           "torch.optim.SparseAdam or a dense embedding (nn.Embedding(sparse=False))")
    if g.dtype != p.dtype or g.shape != p.shape or not g.is_cpu:
        raise ValueError(f"{owner}: {where} has a gradient of {g.dtype}, shape {list(g.shape)} on {g.device}; it "
                         "must match the parameter's dtype, shape and device")
    check_written_param(owner, where, p)
    for name, t in zip(names, states):
        check_state_tensor_for_step(owner, where, name, p, t)


def launch(rule: str, owner: str, written, grads, layout, hypers, hyper_tensors, hyper_slots, group_flags,
           num_groups: int, num_blocks: int, stats: bool) -> torch.Tensor:
    """The operators' real implementation: checks everything, then one kernel launch."""
    cls = RULES[rule]
    structs = _hypers_of(cls, hypers, hyper_tensors, hyper_slots, group_flags, num_groups)
    if len(layout) != RECORD_INTS * len(grads):
        raise ValueError(f"pyco::{rule}_step: layout has {len(layout)} ints for {len(grads)} records")
    records, at = [], 0
    for r, g in enumerate(grads):
        gi, pi, block, flags, n_states, has_step = layout[RECORD_INTS * r:RECORD_INTS * (r + 1)]
        if not (0 <= gi < num_groups and 0 <= block < max(num_blocks, 1) and 0 <= n_states <= 3
                and at + 1 + n_states + has_step <= len(written)):
            raise ValueError(f"pyco::{rule}_step: record {r} does not fit the tensors given")
        p, states = written[at], tuple(written[at + 1:at + 1 + n_states])
        step = written[at + 1 + n_states] if has_step else None
        at += 1 + n_states + has_step
        where = _blocks.describe_param(gi, pi, p)
        _check_record(owner, where, p, g, cls._STATE_NAMES[:n_states], states)
        if step is not None:
            _check_step_counter(owner, where, step)
        records.append((p, g, states, step, gi, block, flags))
    if at != len(written):
        raise ValueError(f"pyco::{rule}_step: {len(written) - at} tensors in written belong to no record")
    # Everything is checked: pack and launch. The table holds every tensor's storage until the launch is over.
    table = Table()
    for p, g, states, step, gi, block, flags in records:
        if rule == "adam" and len(states) == 2:
            states = (*states, None)
        table.add(p, g, states, step=step, group=gi, block=block, flags=flags)
    values = torch.zeros(num_blocks if stats else 0, 4, dtype=torch.float64)
    cls._kernel(table.records, structs, grad_scale=1.0, stats=values.data_ptr() if stats else 0,
                num_blocks=num_blocks, num_threads=torch.get_num_threads())
    table.write_back(grads=False)
    return values


def _fake(written, grads, layout, hypers, hyper_tensors, hyper_slots, group_flags, owner, num_groups, num_blocks,
          stats):
    return torch.empty(num_blocks if stats else 0, 4, dtype=torch.float64, device="cpu")


@torch.library.custom_op("pyco::adam_step", mutates_args=("written",))
def adam_step(written: list[torch.Tensor], grads: list[torch.Tensor], layout: list[int], hypers: list[float],
              hyper_tensors: list[torch.Tensor], hyper_slots: list[int], group_flags: list[int], owner: str,
              num_groups: int, num_blocks: int, stats: bool) -> torch.Tensor:
    """One launch of pyco's Adam/AdamW kernel over every record (see the module's docstring)."""
    return launch("adam", owner, written, grads, layout, hypers, hyper_tensors, hyper_slots, group_flags,
                  num_groups, num_blocks, stats)


@torch.library.custom_op("pyco::sgd_step", mutates_args=("written",))
def sgd_step(written: list[torch.Tensor], grads: list[torch.Tensor], layout: list[int], hypers: list[float],
             hyper_tensors: list[torch.Tensor], hyper_slots: list[int], group_flags: list[int], owner: str,
             num_groups: int, num_blocks: int, stats: bool) -> torch.Tensor:
    """One launch of pyco's SGD kernel over every record (see the module's docstring)."""
    return launch("sgd", owner, written, grads, layout, hypers, hyper_tensors, hyper_slots, group_flags,
                  num_groups, num_blocks, stats)


adam_step.register_fake(_fake)
sgd_step.register_fake(_fake)
OPS = {"adam": adam_step, "sgd": sgd_step}


def without_tensors(group: dict) -> dict:
    """The group with its tensor hyper-parameters replaced by 0.0, for checks that run while tracing (a tensor's
    value is checked when the step runs, by the operator)."""
    out = {k: (0.0 if isinstance(v, torch.Tensor) else v) for k, v in group.items() if k != "params"}
    if "betas" in out and isinstance(out["betas"], (tuple, list)):
        out["betas"] = tuple(0.0 if isinstance(b, torch.Tensor) else b for b in out["betas"])
    return out


def hyper_args(cls, groups) -> tuple[list, list, list, list]:
    """(hypers, hyper_tensors, hyper_slots, group_flags) of the param groups: floats inline, tensors apart."""
    hypers, tensors, slots, flags = [], [], [], []
    for group in groups:
        values, group_flags = cls._hyper_values(group)
        for value in values:
            if isinstance(value, torch.Tensor):
                slots.append(len(hypers))
                tensors.append(value)
                hypers.append(math.nan)
            else:
                hypers.append(float(value))
        flags.extend(int(f) for f in group_flags)
    return hypers, tensors, slots, flags
