"""pyco.optim's SGD, Adam and AdamW follow torch.optim's trajectories: parameters and state, step by step."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import (TOL, assert_close_report, assert_state_match, grad_like, make_params, run_side_by_side,
                      run_with_float64_twin)

import pyco

STEPS = 20
SMALL_SHAPES = [(1,), (3,), (4097,), (), (0,), (2, 3)]
LARGE_SHAPE = (278011,)


def random_hyper(kind: str, rng: random.Random) -> dict:
    if kind == "SGD":
        momentum = rng.choice([0.0, 0.9, 0.5])
        nesterov = momentum > 0 and rng.random() < 0.5
        return dict(lr=rng.choice([1e-3, 0.05, 0.2]), momentum=momentum,
                    dampening=0.0 if nesterov else rng.choice([0.0, 0.1, 0.5]), nesterov=nesterov,
                    weight_decay=rng.choice([0.0, 1e-2, 0.1]), maximize=rng.random() < 0.3)
    return dict(lr=rng.choice([1e-4, 1e-2, 0.05]), betas=(rng.choice([0.9, 0.8, 0.3, 0.0]), rng.choice([0.999, 0.9])),
                eps=rng.choice([1e-8, 1e-6, 1e-3]), weight_decay=rng.choice([0.0, 1e-2, 0.1]),
                amsgrad=rng.random() < 0.5, maximize=rng.random() < 0.3)


def random_configs(n: int = 30, seed: int = 20240601) -> list[dict]:
    """Each config: a rule, a dtype, 1-3 param groups with their own hyper-parameters and shapes, the torch
    implementation to compare with, and whether one parameter skips every other step (grad None)."""
    rng = random.Random(seed)
    configs = []
    for i in range(n):
        kind = ("SGD", "Adam", "AdamW")[i % 3]
        dtype = (torch.float64, torch.float32)[(i // 3) % 2]
        shapes = SMALL_SHAPES + ([LARGE_SHAPE] if i % 4 == 0 else [])
        rng.shuffle(shapes)
        n_groups = rng.randint(1, 3)
        cut = sorted(rng.sample(range(1, len(shapes)), n_groups - 1))
        groups = [(random_hyper(kind, rng), shapes[a:b]) for a, b in zip([0, *cut], [*cut, len(shapes)])]
        ref = "fused" if i % 5 == 4 else "foreach" if i % 5 == 2 else "forloop"
        configs.append(dict(kind=kind, dtype=dtype, groups=groups, ref=ref, intermittent=i % 2 == 1))
    return configs


CONFIGS = random_configs()


def config_id(c: dict) -> str:
    return f"{c['kind']}-{str(c['dtype'])[6:]}-{len(c['groups'])}g-{c['ref']}" + ("-gaps" if c["intermittent"] else "")


def build(kind: str, groups, dtype, ref: str, layout=None, seed: int = 0):
    """The same parameters for pyco and torch, split into the given groups, plus both optimizers."""
    shapes = [s for _, group_shapes in groups for s in group_shapes]
    ours = make_params(shapes, dtype, seed, layout)
    theirs = make_params(shapes, dtype, seed, layout)
    spans, start = [], 0
    for _, group_shapes in groups:
        spans.append((start, start + len(group_shapes)))
        start += len(group_shapes)
    ref_kw = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[ref]
    opt_ours = getattr(pyco.optim, kind)([dict(params=ours[a:b], **h) for (h, _), (a, b) in zip(groups, spans)])
    opt_theirs = getattr(torch.optim, kind)(
        [dict(params=theirs[a:b], **h) for (h, _), (a, b) in zip(groups, spans)], **ref_kw)
    return ours, opt_ours, theirs, opt_theirs


@pytest.mark.parametrize("config", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_random_configs_match_torch(config):
    ours, opt_ours, theirs, opt_theirs = build(config["kind"], config["groups"], config["dtype"], config["ref"])
    n = len(ours)
    last = n - 1
    # Parameter 0 never has a gradient; with "gaps" the last one has one every other step only.
    has_grad = (lambda step, i: i != 0 and (i != last or step % 2 == 0)) if config["intermittent"] else \
        (lambda step, i: i != 0)
    run_side_by_side(opt_ours, ours, opt_theirs, theirs, STEPS, seed=1, has_grad=has_grad)
    rtol, atol = TOL[config["dtype"]]
    assert_state_match(opt_ours, ours, opt_theirs, theirs, rtol, atol, check_step_dtype=config["ref"] != "fused")
    assert ours[0] not in opt_ours.state, "a parameter without gradient got optimizer state"
    if config["kind"] != "SGD":
        expected_steps = (STEPS + 1) // 2 if config["intermittent"] else STEPS
        assert opt_ours.state[ours[last]]["step"].item() == expected_steps


@pytest.mark.parametrize("kind, hyper", [
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True)),
    ("AdamW", dict(lr=0.01, betas=(0.8, 0.99))),
])
@pytest.mark.parametrize("ref", ["foreach", "fused"])
def test_large_tensor_against_multi_tensor_implementations(kind, hyper, ref):
    groups = [(hyper, [LARGE_SHAPE, (4097,), ()])]
    ours, opt_ours, theirs, opt_theirs = build(kind, groups, torch.float64, ref)
    run_side_by_side(opt_ours, ours, opt_theirs, theirs, STEPS, seed=2)
    assert_state_match(opt_ours, ours, opt_theirs, theirs, *TOL[torch.float64], check_step_dtype=ref != "fused")


SCHEDULER_CASES = [
    ("SGD", dict(lr=0.1, momentum=0.9), lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5)),
    ("Adam", dict(lr=0.01), lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.3)),
    ("SGD", dict(lr=0.1, momentum=0.9), lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.5, total_steps=STEPS, cycle_momentum=True)),
    ("Adam", dict(lr=0.01), lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.05, total_steps=STEPS, cycle_momentum=True)),
    ("AdamW", dict(lr=0.01, amsgrad=True), lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.05, total_steps=STEPS, cycle_momentum=True, base_momentum=0.5, max_momentum=0.9)),
]


@pytest.mark.parametrize("kind, hyper, make_scheduler", SCHEDULER_CASES)
def test_lr_schedulers_follow_torch(kind, hyper, make_scheduler):
    ours, opt_ours, theirs, opt_theirs = build(kind, [(hyper, [(4097,), (3,)])], torch.float64, "forloop")
    sched_ours, sched_theirs = make_scheduler(opt_ours), make_scheduler(opt_theirs)
    seen = []

    def each_step(step):
        sched_ours.step()
        sched_theirs.step()
        assert opt_ours.param_groups[0]["lr"] == opt_theirs.param_groups[0]["lr"]
        key = "momentum" if kind == "SGD" else "betas"
        assert opt_ours.param_groups[0][key] == opt_theirs.param_groups[0][key]
        seen.append((opt_ours.param_groups[0]["lr"], opt_ours.param_groups[0][key]))

    run_side_by_side(opt_ours, ours, opt_theirs, theirs, STEPS - 1, seed=3, each_step=each_step)
    assert len(set(seen)) > 2, "the scheduler did not change the hyper-parameters"
    assert_state_match(opt_ours, ours, opt_theirs, theirs, *TOL[torch.float64])


TENSOR_LR_CASES = [(kind, hyper, dtype) for kind, hyper in [
    ("SGD", dict(momentum=0.9)), ("Adam", dict(weight_decay=0.1)), ("AdamW", dict(amsgrad=True))]
    for dtype in (torch.float64, torch.float32)]


@pytest.mark.parametrize("kind, hyper, dtype", TENSOR_LR_CASES)
def test_tensor_lr(kind, hyper, dtype):
    """A 1-element tensor lr of the parameters' dtype. (torch computes lr/(1-beta1^t) and 1-lr*wd in the
    tensor's dtype, so a float32 lr on float64 parameters is not a like-for-like comparison.)"""
    lr = torch.tensor(0.01, dtype=dtype)
    ours, opt_ours, theirs, opt_theirs = build(kind, [(dict(lr=lr, **hyper), [(4097,), ()])], dtype, "forloop")
    run_side_by_side(opt_ours, ours, opt_theirs, theirs, STEPS, seed=4)
    assert_state_match(opt_ours, ours, opt_theirs, theirs, *TOL[dtype])


HALF_CASES = [
    ("Adam", dict(lr=0.01, weight_decay=0.01)),
    ("Adam", dict(lr=0.05, betas=(0.5, 0.9), eps=1e-3, maximize=True)),
    ("AdamW", dict(lr=0.01, amsgrad=True, maximize=True)),
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.5, nesterov=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind, hyper", HALF_CASES)
def test_reduced_precision(dtype, kind, hyper):
    """bfloat16/float16 storage with float32 arithmetic, rounded once per stored value.

    Adam/AdamW: torch's fused=True does the same and agrees within one ulp of the storage type. SGD: torch
    2.13's fused CPU SGD leaves reduced-precision tensors of 16+ elements unchanged (a torch bug), and its
    for-loop SGD rounds lr to the storage type and rounds between operations, so it is no ulp-level
    reference. Every case is held against a float64 run on the same (rounded) gradients: pyco's error is
    no larger than torch's own, and small."""
    shapes = [(4097,), (17,), ()]
    ref = "fused" if kind != "SGD" else "forloop"
    ours, opt_ours, theirs, opt_theirs = build(kind, [(hyper, shapes)], dtype, ref)
    wide = run_with_float64_twin(kind, hyper, opt_ours, ours, opt_theirs, theirs, STEPS, seed=5)
    eps = torch.finfo(dtype).eps
    if kind != "SGD":  # same arithmetic, one rounding per stored value: at most an ulp apart
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close_report(a.detach().float(), b.detach().float(), eps, 1e-6, f"param {i} vs torch")
    for i, (a, b, w) in enumerate(zip(ours, theirs, wide)):
        err_ours = (a.detach().double() - w.detach()).abs().max().item() if a.numel() else 0.0
        err_theirs = (b.detach().double() - w.detach()).abs().max().item() if a.numel() else 0.0
        assert err_ours <= 1.5 * err_theirs + 2 * eps, f"param {i}: pyco {err_ours:.3g} vs torch {err_theirs:.3g}"
        assert_close_report(a.detach().double(), w.detach(), 8 * eps, STEPS * eps, f"param {i} vs float64")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hyper", [dict(lr=0.05), dict(lr=0.05, momentum=0.9, weight_decay=0.1)])
def test_reduced_precision_sgd_rounds_once(dtype, hyper):
    """The first SGD step (momentum or not) is θ − lr·(g + wd·θ) in float32, rounded once to the storage type."""
    p, = make_params([(4097,)], dtype, seed=8)
    before = p.detach().float()
    p.grad = grad_like(p, torch.Generator().manual_seed(9))
    pyco.optim.SGD([p], **hyper).step()
    lr, wd = torch.tensor(hyper["lr"]), torch.tensor(hyper.get("weight_decay", 0.0))
    expected = (before - lr * (p.grad.float() + wd * before)).to(dtype)
    assert_close_report(p.detach(), expected, 0.0, 0.0, "first step")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("kind, hyper", [
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, maximize=True)),
])
def test_complex(dtype, kind, hyper):
    ours, opt_ours, theirs, opt_theirs = build(kind, [(hyper, [(4097,), (3, 2), ()])], dtype, "forloop")
    run_side_by_side(opt_ours, ours, opt_theirs, theirs, STEPS, seed=6)
    assert_state_match(opt_ours, ours, opt_theirs, theirs, *TOL[dtype])


LAYOUTS = {  # (shape of the base tensor, the view that becomes the parameter)
    "transposed": ((7, 5), lambda t: t.t()),  # dense, not contiguous: updated in place
    "strided": ((10, 10), lambda t: t[:, ::2]),  # not dense: updated through a contiguous copy
    "strided-3d": ((4, 6, 5), lambda t: t.transpose(0, 2)[1:, :, ::3]),
}


def view_of(shape, view):
    return lambda t: view(t) if t.shape == shape else t


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind, hyper", [
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1)), ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
])
def test_non_contiguous_parameters(layout, kind, hyper, dtype):
    shape, view = LAYOUTS[layout]
    ours, opt_ours, theirs, opt_theirs = build(kind, [(hyper, [shape, (3,)])], dtype, "forloop",
                                                  layout=view_of(shape, view))
    base = ours[0]
    assert not base.is_contiguous()
    strides = base.stride()
    run_side_by_side(opt_ours, ours, opt_theirs, theirs, STEPS, seed=7)
    assert ours[0].stride() == strides
    assert_state_match(opt_ours, ours, opt_theirs, theirs, *TOL[dtype])
    for key, value in opt_theirs.state[theirs[0]].items():
        if value.dim():
            assert opt_ours.state[ours[0]][key].stride() == value.stride(), key


@pytest.mark.parametrize("kind, hyper", [
    ("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.01, amsgrad=True)), ("AdamW", dict(lr=0.01)),
])
def test_mixed_dtypes_in_one_group(kind, hyper):
    """One launch updates float64, float32 and complex64 tensors of the same group; each matches torch."""
    dtypes = [torch.float64, torch.float32, torch.complex64, torch.float64]
    ours = [make_params([s], d, seed=i)[0] for i, (s, d) in enumerate(zip([(4097,), (300,), (7,), ()], dtypes))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = getattr(pyco.optim, kind)(ours, **hyper)
    opt_theirs = getattr(torch.optim, kind)(theirs, foreach=False, **hyper)
    run_side_by_side(opt_ours, ours, opt_theirs, theirs, STEPS, seed=10)
    for i, d in enumerate(dtypes):
        assert_state_match(opt_ours, ours[i:i + 1], opt_theirs, theirs[i:i + 1], *TOL[d])


def test_non_dense_parameter_updates_its_storage():
    """The strided view is the parameter: the elements between its columns are never touched."""
    base = torch.randn(10, 10, dtype=torch.float64)
    param = torch.nn.Parameter(base[:, ::2])
    untouched = base[:, 1::2].clone()
    opt = pyco.optim.Adam([param], lr=0.1)
    param.grad = torch.ones_like(param)
    before = param.detach().clone()
    opt.step()
    assert torch.equal(base[:, 1::2], untouched)
    assert torch.equal(base[:, ::2], param.detach())
    assert not torch.equal(param.detach(), before)


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_closure_returns_loss(kind):
    params = make_params([(5,)])
    target = torch.arange(5.0, dtype=torch.float64)
    opt = getattr(pyco.optim, kind)(params, lr=0.1)
    calls = []

    def closure():
        opt.zero_grad()
        loss = ((params[0] - target) ** 2).sum()
        loss.backward()
        calls.append(loss.item())
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor) and first.item() == calls[0]
    assert opt.step() is None
    for _ in range(40):
        opt.step(closure)
    assert calls[-1] < calls[0]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    params = make_params([(3,), (4,)])
    opt = pyco.optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=set_to_none)
    for p in params:
        assert p.grad is None if set_to_none else torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdamW"])
def test_step_hooks_fire(kind):
    params = make_params([(3,)])
    opt = getattr(pyco.optim, kind)(params, lr=0.1)
    events = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: events.append(("pre", o, params[0].detach().clone())))
    post = opt.register_step_post_hook(lambda o, args, kwargs: events.append(("post", o, params[0].detach().clone())))
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert [e[0] for e in events] == ["pre", "post"] and all(e[1] is opt for e in events)
    assert not torch.equal(events[0][2], events[1][2]), "the pre hook must see the parameters before the step"
    pre.remove()
    post.remove()
    opt.step()
    assert len(events) == 2
