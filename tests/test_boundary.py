"""One regression test per class of crash or silent corruption at the Python-kernel boundary: tensors the kernels
would read or write out of bounds, memory freed under a running kernel, gradients whose values are not their
memory, steps that fail half-way, wrappers and probes that change things before they raise, hyper-parameters
of other numeric types, and torch's own error inputs.

Cases that could crash the interpreter run in a child process (``_agreement.run_child``): a segfault or a
sanitizer abort fails the test instead of ending the session."""

from __future__ import annotations

import copy
import pickle
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from _agreement import KINDS, assert_agree, odd_grad, pair, plain, run_child, step_both
from _orders_common import batch, mlp
from conftest import assert_unchanged, random_tensor, snapshot
from torch import nn

import pyco

# ---- state and data the kernels cannot address: refused, nothing written ---------------------------------------

# (id, rule, hyper-parameters, parameter dtype, edit after one step (p: the parameter), state entry named)
REFUSALS = [
    ("larger-data-SGD", "SGD", dict(lr=0.1, momentum=0.9), "float32",
     "p.data = torch.randn(4_000_000); p.grad = torch.randn(4_000_000)", "momentum_buffer"),
    ("larger-data-Adam", "Adam", {}, "float32",
     "p.data = torch.randn(4_000_000); p.grad = torch.randn(4_000_000)", "exp_avg"),
    ("float64-data-SGD", "SGD", dict(lr=0.1, momentum=0.9), "float32",
     "p.data = p.data.double(); p.grad = p.grad.double()", "momentum_buffer"),
    ("float64-data-Adam", "Adam", {}, "float32", "p.data = p.data.double(); p.grad = p.grad.double()", "exp_avg"),
    ("short-momentum-buffer", "SGD", dict(lr=0.1, momentum=0.9), "float32",
     "opt.state[p]['momentum_buffer'] = torch.zeros(4)", "momentum_buffer"),
    ("float16-exp_avg", "Adam", {}, "float32", "opt.state[p]['exp_avg'] = opt.state[p]['exp_avg'].half()", "exp_avg"),
    ("complex64-moments-complex128-param", "Adam", {}, "complex128",
     "for key in ('exp_avg', 'exp_avg_sq'): opt.state[p][key] = opt.state[p][key].to(torch.complex64)", "exp_avg"),
    ("int64-momentum-buffer", "SGD", dict(lr=0.1, momentum=0.9), "float32",
     "opt.state[p]['momentum_buffer'] = torch.zeros(p.shape, dtype=torch.int64)", "momentum_buffer"),
    ("two-element-step", "Adam", {}, "float32", "opt.state[p]['step'] = torch.tensor([1.0, 1.0])", "step"),
]


@pytest.mark.parametrize("kind, hyper, dtype, edit, entry", [pytest.param(*c[1:], id=c[0]) for c in REFUSALS])
def test_state_or_data_that_does_not_fit_is_refused(kind, hyper, dtype, edit, entry):
    """After the edit step() raises RuntimeError naming the parameter and the state entry, and nothing changed
    (bitwise): no kernel ran over memory sized for another tensor."""
    out = run_child(f"""
        opt, params = optimizer_with_grads({kind!r}, dtype=torch.{dtype}, **{hyper!r})
        p = params[0]
        {edit}
        print(expect_refusal(opt, params, RuntimeError, "param 0 of group 0", {entry!r}))
    """)
    assert out.split() == ["RAISED", "RuntimeError"]


def test_failed_step_creates_no_state():
    """The second parameter's bad momentum buffer fails the step: the first parameter, which had no state, gets
    none (a buffer created then would count as an old one: with dampening the next step would differ from
    torch's); once the buffer is fixed both steps equal torch.optim.SGD's."""
    out = run_child("""
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(1000, generator=gen)) for _ in range(2)]
        opt, ours, ref, theirs = pair("SGD", [(dict(lr=0.1, momentum=0.9, dampening=0.5), params)])

        def grads(which):
            for i, (p, q) in enumerate(zip(ours, theirs)):
                g = torch.randn(1000, generator=gen) if i in which else None
                p.grad, q.grad = g, None if g is None else g.clone()

        grads({1})
        assert step_both(opt, ours, ref, theirs) == "agreed"
        good = opt.state[ours[1]]["momentum_buffer"]
        opt.state[ours[1]]["momentum_buffer"] = torch.zeros(4)
        grads({0, 1})
        print(expect_refusal(opt, ours, RuntimeError, "param 1 of group 0", "momentum_buffer"))
        assert ours[0] not in opt.state, "the failed step created state for param 0"
        opt.state[ours[1]]["momentum_buffer"] = good
        assert step_both(opt, ours, ref, theirs) == "agreed"
        grads({0, 1})
        assert step_both(opt, ours, ref, theirs) == "agreed"
        print("OK")
    """)
    assert out.split() == ["RAISED", "RuntimeError", "OK"]


def test_int64_scalar_step_follows_torch():
    """torch.optim.Adam counts in an int64 scalar ``step`` it is given; pyco takes it too, same trajectory."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(random_tensor((5, 3), torch.float64, gen)) for _ in range(2)]
    opt, ours, ref, theirs = pair("Adam", [(dict(lr=0.01, amsgrad=True), params)])
    for step in range(4):
        for p, q in zip(ours, theirs):
            p.grad = random_tensor(p.shape, p.dtype, gen)
            q.grad = p.grad.clone()
        if step == 1:
            for o, ps in ((opt, ours), (ref, theirs)):
                for p in ps:
                    o.state[p]["step"] = torch.tensor(3)
        assert step_both(opt, ours, ref, theirs) == "agreed"
    assert ref.state[theirs[0]]["step"].dtype == torch.int64  # what this test is about: torch kept int64
    assert opt.state[ours[0]]["step"].item() == 6


# ---- memory freed under a running kernel, concurrent steps ------------------------------------------------------

UNMAP_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: blocks from 64 KiB up are mapped, and unmapped on free

@pytest.mark.parametrize("replace", [
    pytest.param("opt.state[p]['exp_avg'] = torch.zeros_like(p)", id="exp_avg"),
    pytest.param("p.data = torch.zeros_like(p)", id="p.data"),
    pytest.param("p.grad = torch.zeros_like(p)", id="p.grad"),
])
def test_tensors_replaced_by_another_thread_during_steps(replace):
    """Another thread replaces a tensor of a 1M-element parameter (same shape) while step() runs, hundreds of
    times: the kernel must never write into freed memory (the child must not crash). glibc is told to give
    every large block back to the system when it is freed, so that a write into one faults even without a
    sanitizer; the parameter is not the last one, whose tensors a launch may happen to hold."""
    out = run_child(f"""
        import threading
        import time
        opt, params = optimizer_with_grads("Adam", shapes=((1_000_000,), (3,)), lr=1e-3)
        p = params[0]
        stop = threading.Event()

        def replace():
            while not stop.is_set():
                time.sleep(2e-4)  # without the GIL: the replacement lands while a kernel runs
                {replace}

        thread = threading.Thread(target=replace)
        thread.start()
        try:
            for _ in range(300):
                opt.step()
        finally:
            stop.set()
            thread.join()
        assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["exp_avg"]).all()
        print("OK")
    """, env=UNMAP_FREED)
    assert out.split() == ["OK"]


def test_concurrent_steps_equal_sequential_steps():
    """Two threads call step() on one optimizer (from no state, so they also race to create it): no crash, and
    the result is bitwise that of as many sequential steps (fixed gradients)."""
    out = run_child("""
        import threading
        for kind, hyper in (("SGD", dict(lr=0.01, momentum=0.9)), ("Adam", dict(lr=1e-3, amsgrad=True))):
            shapes = ((1_000_000,), (3, 5))
            opt, params = optimizer_with_grads(kind, shapes, steps=0, **hyper)
            ref, ref_params = optimizer_with_grads(kind, shapes, steps=0, **hyper)

            def steps():
                for _ in range(100):
                    opt.step()

            threads = [threading.Thread(target=steps) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for _ in range(200):
                ref.step()
            for i, (p, q) in enumerate(zip(params, ref_params)):
                assert torch.equal(p, q), f"{kind}: param {i} differs from 200 sequential steps"
                for key, value in ref.state[q].items():
                    assert torch.equal(opt.state[p][key], value), f"{kind}: param {i}: state {key!r} differs"
            print(kind, "OK")
    """)
    assert out.split() == ["SGD", "OK", "Adam", "OK"]


# ---- gradients whose memory is not their values -----------------------------------------------------------------

def test_expanded_gradient_follows_torch():
    """A stride-0 gradient (one value for every element): read as such, not as p.numel() elements of memory;
    also with state tensors that are non-contiguous views (updated through working copies)."""
    out = run_child("""
        gen = torch.Generator().manual_seed(1)
        for kind, hyper in (("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.01))):
            for strided_state in (False, True):
                opt, ours, ref, theirs = pair(kind, [(hyper, [torch.nn.Parameter(torch.randn(1000, generator=gen))])])
                for step in range(3):
                    g = torch.randn(1, generator=gen).expand_as(ours[0])
                    ours[0].grad, theirs[0].grad = g, g.clone()
                    if step == 1 and strided_state:
                        entry = opt.state[ours[0]]
                        for key in [k for k in entry if k != "step"]:
                            entry[key] = torch.empty(2000)[::2].copy_(entry[key])
                    assert step_both(opt, ours, ref, theirs) == "agreed"
                print(kind, strided_state, "OK")
    """)
    assert out.split() == ["SGD", "False", "OK", "SGD", "True", "OK", "Adam", "False", "OK", "Adam", "True", "OK"]


@pytest.mark.parametrize("how, dtype", [("negbit", torch.float32), ("negbit", torch.float64),
                                        ("imag_of_conj", torch.float32), ("negbit", torch.complex64),
                                        ("conj", torch.complex128)])
@pytest.mark.parametrize("kind", KINDS)
def test_negation_and_conjugation_bits_of_gradients_are_honoured(kind, how, dtype):
    """A gradient with the negation bit set (memory holds -g: contiguous from torch._neg_view, strided from
    ``.conj().imag``) or the conjugation bit: the update uses g's values, as torch.optim's does."""
    gen = torch.Generator().manual_seed(2)
    hyper = dict(lr=0.1, momentum=0.9) if kind == "SGD" else dict(lr=0.01)
    opt, ours, ref, theirs = pair(kind, [(hyper, [nn.Parameter(random_tensor((64,), dtype, gen))])])
    for _ in range(3):
        g = odd_grad(ours[0], how, gen)
        assert g.is_neg() or g.is_conj()
        ours[0].grad, theirs[0].grad = g, plain(g, theirs[0])
        assert step_both(opt, ours, ref, theirs) == "agreed"


# ---- the orders and the probe: checked before anything changes -----------------------------------------------

class World:
    """A small model (one block per Linear), pyco's Adam over it and the usual closure."""

    def __init__(self):
        self.model = mlp()
        self.params = list(self.model.parameters())
        self.blocks = pyco.blocks.by_module(self.model)
        self.opt = pyco.optim.Adam(self.params, lr=0.01)
        self.x, self.y = batch()

    def closure(self):
        self.opt.zero_grad()
        loss = nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()
        return loss


def set_order_entry(key, value):
    def edit(own):
        own[key] = value
        return own
    return edit


ORDERS = {"GaussSeidel": lambda w: pyco.GaussSeidel(w.opt, w.blocks, sweep="random"),
          "BlockCoordinate": lambda w: pyco.BlockCoordinate(w.opt, w.blocks, schedule="reshuffle")}
GENERATOR_KEY = {"GaussSeidel": "generator", "BlockCoordinate": "schedule_generator"}
ORDER_EDITS = {
    "not-a-dict": lambda order: lambda own: [own],
    "steps-not-a-number": lambda order: set_order_entry("steps", "three"),
    "steps-missing": lambda order: lambda own: {k: v for k, v in own.items() if k != "steps"},
    "generator-too-short": lambda order: set_order_entry(GENERATOR_KEY[order], torch.zeros(3, dtype=torch.uint8)),
    "generator-float": lambda order: set_order_entry(GENERATOR_KEY[order], torch.zeros(5056)),
    "unknown-active-block": lambda order: set_order_entry("active", ["no such block"]),
    "cursor-not-a-number": lambda order: set_order_entry("schedule_cursor", "x"),
}
ORDER_CASES = [(order, edit) for order in ORDERS for edit in ORDER_EDITS
               if order == "BlockCoordinate" or edit not in ("unknown-active-block", "cursor-not-a-number")]


@pytest.mark.parametrize("order, edit", ORDER_CASES, ids=[f"{o}-{e}" for o, e in ORDER_CASES])
def test_order_load_state_dict_with_a_bad_order_entry_changes_nothing(order, edit):
    """The inner optimizer's part of the state_dict is valid (from an earlier step, with another lr), the
    wrapper's own entry is not: load_state_dict raises and neither the inner optimizer (state, param_groups)
    nor the wrapper's own state changed."""
    w = World()
    wrapper = ORDERS[order](w)
    wrapper.step(w.closure)
    sd = copy.deepcopy(wrapper.state_dict())
    sd["param_groups"][0]["lr"] = 0.5
    sd["pyco_order"] = ORDER_EDITS[edit](order)(sd["pyco_order"])
    wrapper.step(w.closure)
    before, own_before = snapshot(w.opt, w.params), copy.deepcopy(wrapper.state_dict()["pyco_order"])
    with pytest.raises((ValueError, TypeError)):
        wrapper.load_state_dict(sd)
    assert_unchanged(before, w.opt, w.params)
    own = wrapper.state_dict()["pyco_order"]
    assert own.keys() == own_before.keys() and all(
        torch.equal(v, own_before[k]) if isinstance(v, torch.Tensor) else v == own_before[k] for k, v in own.items())


RECORD_ERRORS = {
    "closure-not-callable": lambda w: dict(closure=5),
    "optimizer-not-an-optimizer": lambda w: dict(optimizer=w.model),
    "blocks-miss-a-parameter": lambda w: dict(blocks={"a": w.params[:2]}),
    "mode": lambda w: dict(mode="diagonal"),
    "dtype": lambda w: dict(dtype=torch.int32),
    "alone": lambda w: dict(alone="yes"),
    "max_batch": lambda w: dict(max_batch=0),
    "process_group-without-distributed": lambda w: dict(process_group=object()),
}


@pytest.mark.parametrize("bad", RECORD_ERRORS)
def test_probe_record_with_bad_arguments_takes_no_step(bad):
    """record() validates every argument before the real step: when it raises, the parameters, gradients and
    optimizer state are bitwise as before (the step was not applied)."""
    w = World()
    w.closure()
    w.opt.step()
    w.closure()
    before = snapshot(w.opt, w.params)
    args = {"optimizer": w.opt, "closure": w.closure, **RECORD_ERRORS[bad](w)}
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        pyco.probe.record(args.pop("optimizer"), args.pop("closure"), **args)
    assert_unchanged(before, w.opt, w.params)


# ---- step_blocks ------------------------------------------------------------------------------------------------

def three_params(seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(random_tensor(shape, torch.float64, gen)) for shape in [(5,), (3, 2), (4,)]]


def give_grads(param_lists, gen):
    for ps in zip(*param_lists):
        g = random_tensor(ps[0].shape, ps[0].dtype, gen)
        for p in ps:
            p.grad = g.clone()


def test_step_blocks_refuses_a_block_named_twice():
    """["A", "A"] would move block A twice in one launch: ValueError naming it; nothing moved."""
    params = three_params()
    opt = pyco.optim.SGD(params, lr=0.1, momentum=0.9)
    blocks = pyco.blocks.Blocks.of({"A": params[:1], "B": params[1:]})
    give_grads([params], torch.Generator().manual_seed(0))
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"'A'"):
        opt.step_blocks(blocks, ["A", "A"])
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("edit", ["removed", "replaced"])
def test_step_blocks_after_param_groups_were_edited(edit):
    """param_groups[0]["params"] edited in place after a step_blocks (the last parameter removed, or replaced by
    a new one): blocks that still name the old parameter are refused with ValueError and it does not move;
    blocks that match the edited groups work, as torch.optim.SGD on the edited groups."""
    opt, ours, ref, theirs = pair("SGD", [(dict(lr=0.1, momentum=0.9), three_params())])
    gen = torch.Generator().manual_seed(1)
    blocks = pyco.blocks.Blocks.of({"A": ours[:1], "B": ours[1:]})
    give_grads([ours, theirs], gen)
    opt.step_blocks(blocks, ["A", "B"])
    ref.step()
    newcomers = [nn.Parameter(torch.ones(2, dtype=torch.float64)) for _ in range(2)]
    for o, new in ((opt, newcomers[0]), (ref, newcomers[1])):
        group = o.param_groups[0]["params"]
        if edit == "removed":
            group.pop()
        else:
            group[-1] = new
    give_grads([ours, theirs], gen)
    give_grads([newcomers[:1], newcomers[1:]], gen)
    before = snapshot(opt, ours)
    with pytest.raises(ValueError):
        opt.step_blocks(blocks, ["B"])
    assert_unchanged(before, opt, ours)
    kept = ours[:2] + ([newcomers[0]] if edit == "replaced" else [])
    opt.step_blocks(pyco.blocks.Blocks.of({"A": kept[:1], "B": kept[1:]}), ["A", "B"])
    ref.step()
    assert_agree(opt, ours, ref, theirs)  # the removed parameter moved in neither
    if edit == "replaced":
        assert_agree(opt, newcomers[:1], ref, newcomers[1:])


# ---- hyper-parameters of other numeric types --------------------------------------------------------------------

NUMPY_HYPERS = {
    "SGD-lr-python-float": ("SGD", dict(lr=0.1)),  # numpy only through LambdaLR
    "SGD-lr-float32": ("SGD", dict(lr=np.float32(0.1), momentum=np.float32(0.9))),
    "SGD-lr-float64": ("SGD", dict(lr=np.float64(0.1), weight_decay=np.float64(0.01))),
    "SGD-lr-0d-array": ("SGD", dict(lr=np.array(0.1), momentum=0.5)),
    "Adam-lr-float32": ("Adam", dict(lr=np.float32(0.01), betas=(np.float32(0.9), np.float32(0.999)))),
    "Adam-lr-0d-array": ("Adam", dict(lr=np.array(0.01), eps=np.float64(1e-6))),
    "AdamW-lr-float64": ("AdamW", dict(lr=np.float64(0.01), weight_decay=np.float32(0.1))),
}


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant", "LambdaLR-float32"])
@pytest.mark.parametrize("case", NUMPY_HYPERS)
def test_numpy_hyper_parameters_follow_torch(case, scheduled):
    """numpy scalars and 0-d arrays as hyper-parameters, and a LambdaLR whose lambda returns np.float32 (which
    puts an np.float32 into every group's lr): accepted, and the trajectory is torch.optim's with the same
    values (float32 parameters: torch does part of its scalar arithmetic in the numpy type)."""
    kind, hyper = NUMPY_HYPERS[case]
    gen = torch.Generator().manual_seed(5)
    params = [nn.Parameter(random_tensor(shape, torch.float32, gen)) for shape in [(7,), (2, 3)]]
    opt, ours, ref, theirs = pair(kind, [(hyper, params)])
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: np.float32(0.5) ** epoch)
                  for o in (opt, ref)] if scheduled else []
    for _ in range(4):
        give_grads([ours, theirs], gen)
        assert step_both(opt, ours, ref, theirs) == "agreed"
        for s in schedulers:
            s.step()
    if scheduled:
        assert isinstance(opt.param_groups[0]["lr"], np.floating)  # the case this test is about


# ---- torch's own error inputs -------------------------------------------------------------------------------------

# Run in a child process: importing torch's test utilities changes torch for the rest of the process (it
# freezes torch.backends' flags, patches TorchScript's call). The inputs come back pickled (parameters that appear
# twice stay one object).
COLLECT_TORCH_ERROR_INPUTS = f"""
import pickle, sys, torch
from torch.testing._internal.common_optimizers import optim_db
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
found = []
for info in optim_db:
    kind = info.optim_cls.__name__
    if kind in {KINDS!r} and info.optim_cls is getattr(torch.optim, kind):
        for device in devices:
            for e in info.optim_error_inputs_func(device=device, dtype=torch.float32):
                i = e.optimizer_error_input
                found.append((kind, device, i.desc, i.params, i.kwargs, e.error_on.name, e.error_type))
pickle.dump((devices, found), sys.stdout.buffer)
"""
STAGES = {"CONSTRUCTION_ERROR": "construction", "STEP_ERROR": "step"}


def torch_error_inputs():
    """torch's ErrorOptimizerInputs for SGD, Adam and AdamW, as pytest params; the CUDA-only ones as a skipped
    param per rule where no CUDA device is present."""
    child = subprocess.run([sys.executable, "-c", COLLECT_TORCH_ERROR_INPUTS], capture_output=True, check=True)
    devices, found = pickle.loads(child.stdout)
    cases = [pytest.param(kind, params, kwargs, STAGES[stage], error_type,
                          id=f"{kind}-{device}-" + re.sub(r"[^A-Za-z0-9]+", "-", desc).strip("-"))
             for kind, device, desc, params, kwargs, stage, error_type in found]
    if "cuda" not in devices:
        cases += [pytest.param(kind, None, None, None, None, id=f"{kind}-cuda", marks=pytest.mark.skip(
            reason="torch's CUDA-only error inputs (fused with foreach, fused with differentiable) need a CUDA "
                   "device")) for kind in KINDS]
    return cases


def outcome(cls, params, kwargs):
    """(stage, exception type or warning category) of constructing ``cls`` and taking one step, or (None, None)."""
    params = copy.deepcopy(params) if params is not None else [nn.Parameter(torch.randn(2))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt = cls(params, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the type is what is compared
            return "construction", type(exc)
        if caught:
            return "construction", caught[0].category
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        try:
            opt.step()
        except Exception as exc:  # noqa: BLE001
            return "step", type(exc)
        if caught:
            return "step", caught[0].category
    return None, None


@pytest.mark.parametrize("kind, params, kwargs, stage, error_type", torch_error_inputs())
def test_torch_error_inputs_raise_the_same_exception_type_at_the_same_stage(kind, params, kwargs, stage, error_type):
    """Where torch.optim raises (at construction or at the step), pyco raises the same exception type at the same
    stage; where torch warns (a parameter twice in one group), pyco gives the same warning category."""
    assert outcome(getattr(torch.optim, kind), params, kwargs) == (stage, error_type)  # the input is what it says
    got = outcome(getattr(pyco.optim, kind), params, kwargs)
    assert got == (stage, error_type), f"torch.optim.{kind} gives {error_type.__name__} at {stage}"
