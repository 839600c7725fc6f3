"""Non-finite gradients: "apply" propagates them as torch does, "skip" changes nothing; GradScaler."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import (TOL, assert_close_report, assert_state_match, assert_unchanged, grad_like, make_params,
                      set_grads, snapshot)

import pyco

INF, NAN = math.inf, math.nan
SHAPES = [(4097,), (3,), ()]
RULES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01, maximize=True)),
]


def poison(params, where: int, index, value: float) -> None:
    params[where].grad.view(-1)[index] = value


def pair(kind, hyper):
    """The same parameters, in two groups, for pyco and for torch (for-loop)."""
    ours, theirs = make_params(SHAPES, seed=1), make_params(SHAPES, seed=1)
    return (ours, getattr(pyco.optim, kind)([dict(params=ours[:1]), dict(params=ours[1:])], **hyper),
            theirs, getattr(torch.optim, kind)([dict(params=theirs[:1]), dict(params=theirs[1:])], foreach=False,
                                               **hyper))


@pytest.mark.parametrize("kind, hyper", RULES)
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_apply_propagates_like_torch(kind, hyper, value):
    ours, opt, theirs, ref = pair(kind, hyper)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        set_grads([ours, theirs], step, gen)
        if step == 1:
            for params in (ours, theirs):
                poison(params, 0, 5, value)
                poison(params, 2, 0, value)
        opt.step()
        ref.step()
        assert opt.last_stats.finite == (step == 0)
        assert not opt.last_stats.skipped
    assert opt.skipped_steps == 0
    assert not torch.isfinite(ours[0]).all()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close_report(a.detach(), b.detach(), *TOL[torch.float64], f"param {i}", equal_nan=True)
        for key, v in ref.state[b].items():
            assert_close_report(opt.state[a][key], v, *TOL[torch.float64], f"{key} of param {i}", equal_nan=True)


SKIP_CASES = [  # (rule, dtype, shapes, which parameter, flat index, value)
    ("Adam", torch.float64, SHAPES, 0, 0, NAN),
    ("Adam", torch.float32, [(278011,), (3,)], 0, 278010, INF),
    ("AdamW", torch.bfloat16, SHAPES, 2, 0, -INF),
    ("SGD", torch.float64, SHAPES, 1, 2, INF),
    ("SGD", torch.float16, SHAPES, 0, 4096, NAN),
    ("Adam", torch.complex64, SHAPES, 1, 1, NAN),
]
SKIP_HYPER = {"SGD": dict(lr=0.1, momentum=0.9), "Adam": dict(lr=0.01, amsgrad=True), "AdamW": dict(lr=0.01)}


@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("kind, dtype, shapes, where, index, value", SKIP_CASES)
def test_skip_changes_nothing_then_continues(kind, dtype, shapes, where, index, value, stats, caplog):
    """The bad step is a no-op; the run then continues exactly as a run that never saw it."""
    ours, clean = make_params(shapes, dtype, seed=1), make_params(shapes, dtype, seed=1)
    opt = getattr(pyco.optim, kind)([dict(params=ours[:1]), dict(params=ours[1:])], **SKIP_HYPER[kind],
                                    nonfinite="skip", stats=stats)
    clean_opt = getattr(pyco.optim, kind)([dict(params=clean[:1]), dict(params=clean[1:])], **SKIP_HYPER[kind])
    gen = torch.Generator().manual_seed(3)
    for step in range(5):
        set_grads([ours, clean], step, gen)
        if step == 2:
            ours[where].grad = ours[where].grad.clone()
            poison(ours, where, index, value)
            before = snapshot(opt, ours)
            with caplog.at_level(logging.WARNING, logger="pyco"):
                opt.step()
            assert "step skipped" in caplog.text
            assert_unchanged(before, opt, ours, skipped=1)
            if stats:
                assert opt.last_stats.skipped and opt.last_stats.names == opt.block_names
                assert torch.equal(opt.last_stats.values, torch.zeros(2, 4, dtype=torch.float64))
            else:
                assert opt.last_stats is None
            continue
        opt.step()
        clean_opt.step()
        assert stats == (opt.last_stats is not None) and (not stats or not opt.last_stats.skipped)
    assert opt.skipped_steps == 1
    for i, (a, b) in enumerate(zip(ours, clean)):
        assert torch.equal(a, b), f"param {i}"
        for key, v in clean_opt.state[b].items():
            assert torch.equal(opt.state[a][key], v), f"{key} of param {i}"


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_skip_on_first_step_creates_no_state(kind):
    params = make_params(SHAPES, seed=4)
    opt = getattr(pyco.optim, kind)(params, lr=0.1, **({"momentum": 0.9} if kind == "SGD" else {}),
                                    nonfinite="skip")
    set_grads([params], 0, torch.Generator().manual_seed(5))
    poison(params, 1, 0, NAN)
    before = snapshot(opt, params)
    opt.step()
    assert_unchanged(before, opt, params, skipped=1)
    assert len(opt.state) == 0


def test_skip_policy_ignores_params_without_grad_and_finite_steps():
    params = make_params(SHAPES, seed=6)
    opt = pyco.optim.Adam(params, nonfinite="skip")
    with torch.no_grad():
        params[0].fill_(NAN)  # a non-finite *parameter* without gradient is no reason to skip
    gen = torch.Generator().manual_seed(7)
    for step in range(3):
        set_grads([params], step, gen, lambda s, i: i != 0)
        opt.step()
    assert opt.skipped_steps == 0 and not opt.last_stats.skipped
    assert opt.state[params[1]]["step"].item() == 3


# ---- GradScaler ----------------------------------------------------------------------------------------

def scaled_backward(scaler, params, grads):
    """loss = Σ p·g, so the gradient is exactly g (times the scale, a power of two)."""
    loss = sum((p * g).sum() for p, g in zip(params, grads))
    scaler.scale(loss).backward()


SCALER_CASES = [  # (rule, hyper, steps where one gradient holds inf, unscale_ before step)
    ("Adam", dict(lr=0.01), (), False),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1), (3,), False),
    ("AdamW", dict(lr=0.01), (0, 4), False),
    ("SGD", dict(lr=0.1, momentum=0.9), (2,), False),
    ("Adam", dict(lr=0.01), (), True),
    ("AdamW", dict(lr=0.01, amsgrad=True), (3,), True),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True), (1,), True),
]


@pytest.mark.parametrize("kind, hyper, inf_steps, unscale_first", SCALER_CASES)
def test_grad_scaler(kind, hyper, inf_steps, unscale_first):
    """pyco under GradScaler == torch (for-loop) on the unscaled gradients, skipping the inf steps.
    .grad holds the unscaled gradient after the step (and is not unscaled twice after unscale_)."""
    ours = make_params(SHAPES, torch.float32, seed=8)
    theirs = make_params(SHAPES, torch.float32, seed=8)
    opt = getattr(pyco.optim, kind)(ours, **hyper)
    ref = getattr(torch.optim, kind)(theirs, foreach=False, **hyper)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    gen = torch.Generator().manual_seed(9)
    scales = []
    for step in range(8):
        grads = [grad_like(p, gen) for p in ours]
        if step in inf_steps:
            grads[1].view(-1)[1] = INF
        opt.zero_grad()
        scaled_backward(scaler, ours, grads)
        scale = scaler.get_scale()
        scales.append(scale)
        assert torch.equal(ours[0].grad, grads[0] * scale)
        if unscale_first:
            scaler.unscale_(opt)
            assert torch.equal(ours[0].grad, grads[0])
        before = snapshot(opt, ours)
        skipped = opt.skipped_steps
        scaler.step(opt)
        scaler.update()
        if step in inf_steps:
            assert_unchanged(before, opt, ours, grads=False, skipped=1)
            assert opt.last_stats.skipped
            assert scaler.get_scale() == scale * 0.5
            continue
        assert opt.skipped_steps == skipped and not opt.last_stats.skipped
        for p, g in zip(ours, grads):
            assert torch.equal(p.grad, g), "after the step .grad holds the unscaled gradient"
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        ref.step()
        assert_state_match(opt, ours, ref, theirs, *TOL[torch.float32])
    assert len(set(scales)) > 1, "the scale should have changed during the run"


def test_grad_scaler_disabled_is_plain_step():
    params = make_params(SHAPES, torch.float32, seed=10)
    twins = make_params(SHAPES, torch.float32, seed=10)
    opt, twin_opt = pyco.optim.Adam(params), pyco.optim.Adam(twins)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(11)
    grads = [grad_like(p, gen) for p in params]
    scaled_backward(scaler, params, grads)
    for p, g in zip(twins, grads):
        p.grad = g.clone()
    scaler.step(opt)
    twin_opt.step()
    for a, b in zip(params, twins):
        assert torch.equal(a, b)


def test_amsgrad_max_propagates_nan_like_torch():
    """torch.maximum propagates NaN into max_exp_avg_sq; under nonfinite="apply" pyco's state must too."""
    states = []
    for mod in (torch.optim, pyco.optim):
        p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        opt = mod.Adam([p], lr=0.01, amsgrad=True)
        p.grad = torch.ones(2, dtype=torch.float64)
        opt.step()
        p.grad = torch.tensor([NAN, 1.0], dtype=torch.float64)
        opt.step()
        states.append(opt.state[p]["max_exp_avg_sq"])
    theirs, ours = states
    assert torch.isnan(theirs[0])
    assert torch.isnan(ours[0]), f"pyco's max_exp_avg_sq kept {ours[0].item()} where torch's holds NaN"
