"""Faults injected on purpose: non-finite gradients in one block, closures that raise in the middle of a sweep,
a study interrupted with Ctrl-C. Every fault is reported, and nothing is half-applied or lost."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from _orders_common import batch, mlp
from torch import nn

import pyco
from pyco import cli

# ---- non-finite gradients in one block ------------------------------------------------------------------

RULES = {
    "SGD": lambda ps, **kw: pyco.optim.SGD(ps, lr=0.1, momentum=0.9, **kw),
    "Adam": lambda ps, **kw: pyco.optim.Adam(ps, lr=0.01, amsgrad=True, **kw),
    "AdamW": lambda ps, **kw: pyco.optim.AdamW(ps, lr=0.01, **kw),
}
BAD_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def three_blocks(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64)) for shape in [(5,), (3, 2), (4,)]]
    return params, {"a": params[:1], "b": params[1:2], "c": params[2:]}


def grads_for(params, step: int):
    gen = torch.Generator().manual_seed(50 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("rule", RULES)
def test_skip_block_skips_only_the_nonfinite_block(rule, bad):
    """Block b gets a non-finite gradient at step 1: it stays as it was (values and state), the others move as
    if b had no gradient, the step is reported, and the run goes on as a run without b's bad step would."""
    params, blocks = three_blocks()
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    opt = RULES[rule](params, blocks=blocks, nonfinite="skip-block")
    ref = RULES[rule](twin, blocks={"a": twin[:1], "b": twin[1:2], "c": twin[2:]})
    for step in range(4):
        grads = grads_for(params, step)
        for p, q, g in zip(params, twin, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 1:
            params[1].grad[0, 1] = BAD_VALUES[bad]
            twin[1].grad = None  # the reference: block b has no gradient at this step
            b_before = (params[1].detach().clone(), {k: v.clone() for k, v in opt.state[params[1]].items()})
        opt.step()
        ref.step()
        if step == 1:
            assert opt.last_stats.skipped_blocks == ("b",) and not opt.last_stats.skipped
            assert torch.equal(opt.last_stats.values[1], torch.zeros(4, dtype=torch.float64))
            assert opt.last_stats.finite and opt.skipped_steps == 0
            assert torch.equal(params[1], b_before[0])
            assert all(torch.equal(opt.state[params[1]][k], v) for k, v in b_before[1].items())
        else:
            assert opt.last_stats.skipped_blocks == ()
        for i, (p, q) in enumerate(zip(params, twin)):
            assert torch.equal(p, q), f"{rule}: parameter {i} at step {step}"
            assert all(torch.equal(opt.state[p][k], ref.state[q][k]) for k in ref.state[q]), f"state {i}"


@pytest.mark.parametrize("policy, moved, skipped", [
    ("skip", set(), True),             # the whole step
    ("skip-block", {"a", "c"}, False),  # only the bad block
    ("apply", {"a", "b", "c"}, False),  # as torch.optim: the values are applied (and the stats show it)
])
def test_nonfinite_policies(policy, moved, skipped):
    params, blocks = three_blocks()
    opt = pyco.optim.SGD(params, lr=0.1, blocks=blocks, nonfinite=policy)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    params[1].grad[0, 0] = math.nan
    before = [p.detach().clone() for p in params]
    opt.step()
    assert {n for n, p, b in zip("abc", params, before) if not torch.equal(p, b)} == moved
    assert opt.last_stats.skipped == skipped and opt.skipped_steps == int(skipped)
    assert opt.last_stats.finite == (policy != "apply")


def test_skip_block_through_gauss_seidel():
    """Under an order the bad block is skipped inside its own launch and named in the order's last_stats."""
    model = mlp()
    x, y = batch()
    blocks = pyco.blocks.by_module(model)
    opt = pyco.GaussSeidel(pyco.optim.Adam(model.parameters(), lr=0.01, nonfinite="skip-block"), blocks)
    handle = model[2].weight.register_hook(lambda g: torch.full_like(g, math.nan))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    handle.remove()
    assert opt.last_stats.skipped_blocks == ("2",)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"0.weight", "0.bias", "4.weight", "4.bias"}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.step(closure)  # the next step is clean
    assert opt.last_stats.skipped_blocks == () and opt.last_stats.finite


def test_skip_block_refuses_cuda_clearly():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    p = nn.Parameter(torch.ones(3, device="cuda"))
    opt = pyco.optim.SGD([p], lr=0.1, nonfinite="skip-block")
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"skip-block' is implemented for CPU parameters only"):
        opt.step()


# ---- a closure that raises in the middle of a sweep ---------------------------------------------------------

class Boom(Exception):
    pass


INNER = {
    "pyco.SGD": lambda ps: pyco.optim.SGD(ps, lr=0.1, momentum=0.9),
    "pyco.Adam": lambda ps: pyco.optim.Adam(ps, lr=0.01, amsgrad=True),
    "torch.Adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}
# The model has dropout and batch norm: the random state and the running statistics must come back too. (A
# block-coordinate step runs the closure once, as a plain optimizer does: the buffers and random draws a failed
# closure consumed are the closure's own, so its model has neither.)
ORDERS = {
    "gauss-seidel-backward": lambda inner, model: pyco.GaussSeidel(inner, pyco.blocks.by_module(model)),
    "gauss-seidel-random": lambda inner, model: pyco.GaussSeidel(inner, pyco.blocks.by_module(model), "random"),
    "chain-forward": lambda inner, model: pyco.ChainGaussSeidel(inner, model, _loss, sweep="forward"),
    "chain-backward": lambda inner, model: pyco.ChainGaussSeidel(inner, model, _loss),
    "block-coordinate-reshuffle": lambda inner, model: pyco.BlockCoordinate(
        inner, pyco.blocks.by_module(model), "reshuffle", state="reset"),
}
_calls = {"n": 0, "fail_at": None, "error": Boom}


def _loss(out, target):
    _calls["n"] += 1
    if _calls["n"] == _calls["fail_at"]:
        raise _calls["error"]("injected")
    return nn.functional.mse_loss(out, target)


def _step(opt, model, x, y):
    if isinstance(opt, pyco.ChainGaussSeidel):
        return opt.step(x, y)

    def closure():
        opt.zero_grad()
        loss = _loss(model(x), y)
        loss.backward()
        return loss

    return opt.step(closure)


def everything(model, opt) -> dict:
    """What a step may change, copied."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "state": [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
                  if p in opt.state else None for p in model.parameters()],
        "rng": torch.get_rng_state(),
        "order": opt.state_dict()["pyco_order"],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_same(a: dict, b: dict) -> None:
    for key in ("params", "buffers"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
    assert all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a["grads"], b["grads"])), "grads"
    for i, (x, y) in enumerate(zip(a["state"], b["state"])):
        assert (x is None) == (y is None), f"state of parameter {i} appeared or vanished"
        assert x is None or (x.keys() == y.keys() and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k]))
                                                          for k in x)), f"state of parameter {i}"
    assert torch.equal(a["rng"], b["rng"]), "random state"
    assert a["requires_grad"] == b["requires_grad"]
    oa, ob = a["order"], b["order"]
    assert oa.keys() == ob.keys()
    for k in oa:
        same = torch.equal(oa[k], ob[k]) if isinstance(oa[k], torch.Tensor) else oa[k] == ob[k]
        assert same, f"order state {k!r}: {oa[k]!r} != {ob[k]!r}"


# (order, which evaluation of the step raises): a sweep over 3 blocks evaluates 3 times, a block-coordinate step once
FAILURES = [(order, at) for order in ORDERS for at in ((1,) if order.startswith("block") else (1, 2, 3))]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("order, fail_at", FAILURES)
def test_a_step_that_raises_changes_nothing(order, fail_at, inner, error):
    runs = []
    for inject in (False, True):
        plain = order.startswith("block")
        model = mlp((3, 6, 5, 2), dropout=0.0 if plain else 0.3, batchnorm=not plain)
        model.train()
        opt = ORDERS[order](INNER[inner](model.parameters()), model)
        torch.manual_seed(7)
        for step in range(2):  # some state and some statistics first
            _step(opt, model, *batch(seed=step))
        if inject:
            before = everything(model, opt)
            _calls.update(n=0, fail_at=fail_at, error=error)
            with pytest.raises(error, match="injected"):
                _step(opt, model, *batch(seed=2))
            _calls.update(fail_at=None)
            assert_same(everything(model, opt), before)
        for step in range(2, 4):  # and the run goes on as if the failed step had never been tried
            _step(opt, model, *batch(seed=step))
        runs.append(everything(model, opt))
    assert_same(runs[1], runs[0])


# ---- a study interrupted with Ctrl-C ------------------------------------------------------------------------

def test_interrupted_study_leaves_partial_results(tmp_path, monkeypatch, capsys):
    from pyco import studies

    def run(args, out):
        out.csv("progress.csv", [{"step": 0, "loss": 1.0}])  # something measured before the interrupt
        raise KeyboardInterrupt

    fake = types.SimpleNamespace(NAME="dosage", QUESTION="?", add_arguments=lambda p: None, run=run)
    monkeypatch.setattr(studies, "load", lambda name: fake)
    out = tmp_path / "run"
    assert cli.main(["study", "dosage", "--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == f"pyco: interrupted; partial results in {out / 'results.json'}"
    results = json.loads((out / "results.json").read_text())
    assert results["partial"] is True and results["interrupted"] is True and results["study"] == "dosage"
    assert results["seconds"] >= 0 and (out / "progress.csv").is_file()
    assert not list(out.glob("*.tmp"))


def test_interrupt_outside_a_study_is_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_info", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "pyco: interrupted\n"
