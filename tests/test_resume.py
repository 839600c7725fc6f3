"""Exact resume: a run interrupted, saved with torch.save and resumed into fresh objects continues bitwise as the
uninterrupted run, for every order, schedule and rule; pyco's optimizers and the orders survive deepcopy and
pickle with their own attributes."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from _orders_common import batch, make_closure, mlp
from torch import nn

import pyco

STEPS, INTERRUPT = 7, 3  # interrupted after step 3, in the middle of a BlockCoordinate window of every=2

RULES = {
    "SGD-momentum": lambda ps, **kw: pyco.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                                                    **kw),
    "Adam-amsgrad": lambda ps, **kw: pyco.optim.Adam(ps, lr=0.01, amsgrad=True, **kw),
    "AdamW": lambda ps, **kw: pyco.optim.AdamW(ps, lr=0.01, weight_decay=0.1, **kw),
}


def closure_step(opt, model, x, y):
    return opt.step(make_closure(model, x, y))


def bc(schedule, **kw):
    return lambda inner, model: pyco.BlockCoordinate(inner, pyco.blocks.by_module(model), schedule, seed=4, **kw)


# name -> (wrap the inner optimizer for a model (None: the inner optimizer itself), take one step)
ORDERS = {
    "simultaneous": (lambda inner, model: inner, closure_step),
    **{f"gauss-seidel-{sweep}": ((lambda sweep: lambda inner, model: pyco.GaussSeidel(
        inner, pyco.blocks.by_module(model), sweep, seed=5))(sweep), closure_step)
       for sweep in ("forward", "backward", "random")},
    "chain-gauss-seidel-random": (lambda inner, model: pyco.ChainGaussSeidel(
        inner, model, nn.functional.mse_loss, sweep="random", seed=6), lambda opt, model, x, y: opt.step(x, y)),
    **{f"block-coordinate-{schedule}-{state}": (bc(schedule, active=2, every=2, state=state), closure_step)
       for schedule in ("cyclic", "cyclic-descending", "reshuffle", "random-subset", "greedy")
       for state in ("keep", "reset")},
}


def fresh_model(seed: int) -> nn.Sequential:
    return mlp((3, 6, 5, 4, 2), dropout=0.2, seed=seed)  # dropout: the random state is part of the run


def data(step: int):
    return batch(n=8, d_in=3, d_out=2, seed=1000 + step)


def run(order: str, rule: str, steps: range, model=None, opt=None):
    wrap, step = ORDERS[order]
    if model is None:
        torch.manual_seed(0)
        model = fresh_model(seed=0)
        opt = wrap(RULES[rule](model.parameters()), model)
    losses = [step(opt, model, *data(s)).item() for s in steps]
    return model, opt, losses


def checkpoint(model, opt) -> dict:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only (torch's default): a checkpoint holds tensors, numbers and strings


def assert_bitwise(model_a, opt_a, model_b, opt_b, what: str) -> None:
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), f"{what}: parameter {name} differs by {float((a - b).abs().max()):.3e}"
    for i, (a, b) in enumerate(zip(model_a.parameters(), model_b.parameters())):
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sa.keys() == sb.keys(), f"{what}: state keys of parameter {i}: {sorted(sa)} != {sorted(sb)}"
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), f"{what}: state {key} of {i}"


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("order", ORDERS)
def test_interrupted_run_resumes_bitwise(order, rule):
    full_model, full_opt, full_losses = run(order, rule, range(STEPS))

    model, opt, losses = run(order, rule, range(INTERRUPT))
    saved = checkpoint(model, opt)
    del model, opt
    # Fresh objects, built as at the start but from other weights: everything must come from the checkpoint.
    model = fresh_model(seed=99)
    opt = ORDERS[order][0](RULES[rule](model.parameters()), model)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    model, opt, rest = run(order, rule, range(INTERRUPT, STEPS), model, opt)

    assert losses + rest == full_losses
    assert_bitwise(model, opt, full_model, full_opt, f"{order}/{rule}")
    if isinstance(opt, pyco.BlockCoordinate):
        assert opt.active_blocks == full_opt.active_blocks and opt.steps == full_opt.steps == STEPS


# ---- deepcopy and pickle ------------------------------------------------------------------------------------

COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("rule", RULES)
def test_copy_keeps_pyco_attributes_and_continues_bitwise(rule, how):
    torch.manual_seed(0)
    model = fresh_model(seed=0)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    blocks = {"body": [p for m in linears[:-1] for p in m.parameters()], "head": list(linears[-1].parameters())}
    opt = RULES[rule](model.parameters(), blocks=blocks, nonfinite="skip-block")
    for s in range(2):
        closure_step(opt, model, *data(s))
    opt.skipped_steps = 5  # some value that is not the default

    model2, opt2 = COPIES[how]((model, opt))
    for name in ("stats", "nonfinite", "skipped_steps", "block_names"):
        assert getattr(opt2, name) == getattr(opt, name), name
    assert torch.equal(opt2.last_stats.values, opt.last_stats.values)
    assert [id(p) for p in opt2._block_spec.params()] == [id(p) for p in model2.parameters()]
    state = torch.get_rng_state()  # dropout draws from the global generator: both runs see the same masks
    closure_step(opt, model, *data(9))
    torch.set_rng_state(state)
    closure_step(opt2, model2, *data(9))
    assert_bitwise(model2, opt2, model, opt, how)
    assert torch.equal(opt2.last_stats.values, opt.last_stats.values)


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("order", ["gauss-seidel-random", "chain-gauss-seidel-random",
                                   "block-coordinate-reshuffle-reset"])
def test_copied_order_continues_bitwise(order, how):
    model, opt, _ = run(order, "Adam-amsgrad", range(INTERRUPT))
    model2, opt2 = COPIES[how]((model, opt))
    state = torch.get_rng_state()
    _, _, a = run(order, "Adam-amsgrad", range(INTERRUPT, STEPS), model, opt)
    torch.set_rng_state(state)
    _, _, b = run(order, "Adam-amsgrad", range(INTERRUPT, STEPS), model2, opt2)
    assert a == b
    assert_bitwise(model2, opt2, model, opt, f"{order} ({how})")
