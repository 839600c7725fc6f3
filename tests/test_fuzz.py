"""Property-based tests (Hypothesis): over random parameter layouts, dtypes, param groups, rules, missing and
oddly laid out gradients, and edits a user can make to the optimizer's state or to ``p.data`` between steps,
every pyco step agrees with torch.optim's on twin tensors, or raises and changes nothing
(see ``_agreement.step_both`` for the exact property)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from _agreement import KINDS, odd_grad, pair, plain, run_child, step_both
from conftest import random_tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SHAPES = [(), (0,), (1,), (3,), (17,), (4097,), (2, 3), (3, 3), (0, 3), (5, 17), (2, 3, 4, 5), (3, 1, 2, 2)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64, torch.complex128]
LAYOUTS = ["contiguous", "transposed", "strided", "channels_last"]
GRADS = ["dense", "dense", "none", "expanded", "negbit", "imag_of_conj", "conj"]

# Another dtype of the same kind, for a state tensor (OTHER_DTYPE) and for p.data (OTHER_PARAM_DTYPE).
OTHER_DTYPE = {torch.float32: torch.float16, torch.float64: torch.float32, torch.float16: torch.float32,
               torch.bfloat16: torch.float16, torch.complex64: torch.complex128, torch.complex128: torch.complex64}
OTHER_PARAM_DTYPE = {torch.float32: torch.float64, torch.float64: torch.float32, torch.float16: torch.float32,
                     torch.bfloat16: torch.float32, torch.complex64: torch.complex128,
                     torch.complex128: torch.complex64}


def reversed_strides(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, the memory order of the dimensions reversed (dense, not contiguous)."""
    order = list(reversed(range(t.dim())))
    return t.permute(order).contiguous().permute(order)


def strided_copy(v: torch.Tensor) -> torch.Tensor:
    """Same shape and values, every element two apart in memory."""
    return torch.empty((*v.shape, 2), dtype=v.dtype)[..., 0].copy_(v)


def resize_grow(v: torch.Tensor) -> None:
    n = v.numel()
    v.resize_(2 * n + 1)  # a new, larger storage: the old address is freed
    v[n:] = 0  # the new elements are uninitialized memory: both twins must see the same values


def resize_and_back(v: torch.Tensor) -> None:
    shape = v.shape
    v.resize_(2 * v.numel() + 8)  # a new, larger storage: the old address is freed
    v.resize_(shape)


# Edits of one state tensor: a replacement (returns the new tensor) or in place (returns None).
STATE_EDITS = {
    "state_shape": lambda v: v.reshape(-1).unsqueeze(0).clone(),
    "state_numel": lambda v: torch.zeros(v.numel() + 5, dtype=v.dtype),
    "state_four": lambda v: torch.zeros(4, dtype=v.dtype),
    "state_dtype": lambda v: v.to(OTHER_DTYPE.get(v.dtype, torch.float32)),  # an int64 one (state_int): float32
    "state_int": lambda v: (v.real if v.is_complex() else v).to(torch.int64),
    "state_meta": lambda v: torch.empty_like(v, device="meta"),
    "state_strided": strided_copy,
    "state_resize_grow": resize_grow,
    "state_resize_back": resize_and_back,
}
STEP_EDITS = {  # s.reshape(-1)[0]: the count, also after an earlier step_two
    "step_two": lambda s: torch.full((2,), s.reshape(-1)[0].item(), dtype=s.dtype),
    "step_int64": lambda s: torch.tensor(int(s.reshape(-1)[0].item())),
    "step_float64": lambda s: torch.tensor(s.reshape(-1)[0].item(), dtype=torch.float64),
}
# Edits of p.data: fresh is a random tensor of numel + 7 elements of the parameter's dtype.
DATA_EDITS = {
    "data_larger": lambda d, fresh: fresh,
    "data_smaller": lambda d, fresh: d.reshape(-1)[1:].clone(),
    "data_other_dtype": lambda d, fresh: d.to(OTHER_PARAM_DTYPE[d.dtype]),
    "data_transposed": lambda d, fresh: d.mT if d.dim() >= 2 else d,
    "data_relayout": lambda d, fresh: reversed_strides(d),
}
EDITS = [*STATE_EDITS, *STEP_EDITS, *DATA_EDITS]

CURRENT_CASE = "PYCO_FUZZ_CURRENT_CASE"  # a file each example's description is written to before it runs


@dataclass(frozen=True)
class Edit:
    step: int  # applied before this step (>= 1: there is state to edit)
    param: int  # index into the flat parameter list (modulo its length)
    kind: str
    key: int  # which state tensor (modulo the number the parameter has)


@dataclass(frozen=True)
class Case:
    kind: str
    groups: list  # [(hyper, [(shape, dtype, layout)])]
    grads: list  # per step, per parameter: one of GRADS
    seed: int
    edits: list = field(default_factory=list)


def sgd_hyper(lr, momentum, dampening, nesterov, weight_decay, maximize) -> dict:
    nesterov = bool(nesterov and momentum)  # torch: Nesterov needs momentum and no dampening
    return dict(lr=lr, momentum=momentum, dampening=0.0 if nesterov else dampening, nesterov=nesterov,
                weight_decay=weight_decay, maximize=maximize)


def adam_hyper(lr, betas, eps, weight_decay, amsgrad, maximize) -> dict:
    return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)


def hypers(kind: str):
    if kind == "SGD":
        return st.builds(sgd_hyper, st.sampled_from([1e-3, 0.05, 0.2]), st.sampled_from([0.0, 0.5, 0.9]),
                         st.sampled_from([0.0, 0.5]), st.booleans(), st.sampled_from([0.0, 0.1]), st.booleans())
    return st.builds(adam_hyper, st.sampled_from([1e-3, 0.01, 0.1]),
                     st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]), st.sampled_from([1e-8, 1e-3]),
                     st.sampled_from([0.0, 0.1]), st.booleans(), st.booleans())


param_specs = st.tuples(st.sampled_from(SHAPES), st.sampled_from(DTYPES), st.sampled_from(LAYOUTS))


@st.composite
def cases(draw, max_edits: int):
    kind = draw(st.sampled_from(KINDS))
    groups = draw(st.lists(st.tuples(hypers(kind), st.lists(param_specs, min_size=1, max_size=3)),
                           min_size=1, max_size=3))
    if kind != "SGD":  # torch's float16 Adam adds eps in float16, where 1e-8 is 0 (then it divides by zero)
        groups = [({**hyper, "eps": 1e-3} if any(dtype == torch.float16 for _, dtype, _ in specs) else hyper, specs)
                  for hyper, specs in groups]
    n = sum(len(specs) for _, specs in groups)
    steps = draw(st.integers(1, 3) if max_edits == 0 else st.integers(2, 3))
    grads = draw(st.lists(st.lists(st.sampled_from(GRADS), min_size=n, max_size=n), min_size=steps, max_size=steps))
    edits = [] if max_edits == 0 else draw(st.lists(
        st.builds(Edit, st.integers(1, steps - 1), st.integers(0, n - 1), st.sampled_from(EDITS), st.integers(0, 2)),
        min_size=1, max_size=max_edits))
    return Case(kind, groups, grads, draw(st.integers(0, 2**16)), edits)


def make_param(shape, dtype, layout, gen) -> torch.nn.Parameter:
    if layout == "transposed" and len(shape) >= 2:
        t = random_tensor(shape[::-1], dtype, gen).permute(*reversed(range(len(shape))))
    elif layout == "strided" and len(shape) >= 1:  # every other element of a larger tensor, from offset 1
        t = random_tensor((*shape[:-1], 2 * shape[-1] + 1), dtype, gen)[..., 1::2]
    elif layout == "channels_last" and len(shape) == 4:
        t = random_tensor(shape, dtype, gen).contiguous(memory_format=torch.channels_last)
    else:
        t = random_tensor(shape, dtype, gen)
    return torch.nn.Parameter(t)


def apply_edit(edit: Edit, opt, p: torch.Tensor, fresh: torch.Tensor) -> None:
    entry = opt.state.get(p)  # .get: looking must not create an entry
    if edit.kind in DATA_EDITS:
        p.data = DATA_EDITS[edit.kind](p.data, fresh.clone())
    elif edit.kind in STEP_EDITS:
        if entry and isinstance(entry.get("step"), torch.Tensor):
            entry["step"] = STEP_EDITS[edit.kind](entry["step"])
    elif entry:
        keys = sorted(k for k, v in entry.items() if k != "step" and isinstance(v, torch.Tensor))
        if keys:
            key = keys[edit.key % len(keys)]
            new = STATE_EDITS[edit.kind](entry[key])
            if new is not None:
                entry[key] = new


def run(case: Case) -> None:
    current = os.environ.get(CURRENT_CASE)
    if current:  # for the report of a crash, which ends the process before Hypothesis can report
        with open(current, "w") as f:
            f.write(repr(case))
    gen = torch.Generator().manual_seed(case.seed)
    groups = [(hyper, [make_param(*spec, gen) for spec in specs]) for hyper, specs in case.groups]
    opt_ours, ours, opt_theirs, theirs = pair(case.kind, groups)
    history = [{p.dtype} for p in ours]
    for step, grads in enumerate(case.grads):
        for p, q in zip(ours, theirs):
            p.grad = q.grad = None
        for edit in case.edits:
            if edit.step == step:
                i = edit.param % len(ours)
                fresh = random_tensor((ours[i].numel() + 7,), ours[i].dtype, gen)
                apply_edit(edit, opt_ours, ours[i], fresh)
                apply_edit(edit, opt_theirs, theirs[i], fresh)
        for i, (p, q, how) in enumerate(zip(ours, theirs, grads)):
            history[i].add(p.dtype)
            if how != "none":
                g = odd_grad(p, how, gen)
                p.grad, q.grad = g, plain(g, q)
        if step_both(opt_ours, ours, opt_theirs, theirs, history) != "agreed":
            return


FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(FUZZ, max_examples=300)
@given(case=cases(max_edits=0))
def check_layouts_dtypes_groups_and_gradients(case):
    run(case)


@settings(FUZZ, max_examples=600)
@given(case=cases(max_edits=2))
def check_state_and_data_edits(case):
    run(case)


def fuzz_in_child(check: str, tmp_path) -> None:
    """Runs the Hypothesis search ``check`` in a child process: a crash fails this test (naming the example
    that was running) instead of ending the test session, and a heap corrupted by one example cannot fail
    later tests. Hypothesis' report of a failing example is in the child's output."""
    current = tmp_path / "case.txt"
    run_child(f"import test_fuzz\ntest_fuzz.{check}()\n", timeout=900, env={CURRENT_CASE: str(current)},
              note=lambda: f"last example started: {current.read_text() if current.exists() else '(none)'}")


def test_layouts_dtypes_groups_and_gradients_agree_with_torch(tmp_path):
    """No edits: every step must agree with torch.optim (pyco has no documented reason to refuse any)."""
    fuzz_in_child("check_layouts_dtypes_groups_and_gradients", tmp_path)


def test_state_and_data_edits_agree_with_torch_or_change_nothing(tmp_path):
    """Edits of the state, the step counter or p.data between steps: agree, or raise and change nothing."""
    fuzz_in_child("check_state_and_data_edits", tmp_path)
