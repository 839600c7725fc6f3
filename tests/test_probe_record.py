"""pyco.probe.record: the real step's decomposition, with the model, optimizer state, gradients, random state
and batch-norm buffers left bitwise as the plain step leaves them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyco

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd momentum nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5),
}


def make_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 4)).to(dtype)


def batch(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=gen).to(dtype), torch.randint(0, 4, (16,), generator=gen)


def make_closure(model, opt, x, y, micro_batches=1):
    def closure():
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            loss = F.cross_entropy(model(xs), ys) / micro_batches
            loss.backward()
            total = total + loss.detach()
        return total
    return closure


def everything(model, opt) -> dict:
    return {
        "state_dict": copy.deepcopy(model.state_dict()),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "opt": copy.deepcopy(opt.state_dict()),
        "rng": torch.get_rng_state(),
    }


def assert_bitwise(a: dict, b: dict) -> None:
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"{k} differs"
    for i, (x, y) in enumerate(zip(a["grads"], b["grads"])):
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f"grad {i} differs"
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            va, vb = sa[i][key], sb[i][key]
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, f"state {key} of {i} differs"
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    assert torch.equal(a["rng"], b["rng"]), "random state differs"


def run(optimizer, probe_step, *, steps=3, **record_kw):
    """Three steps; with probe_step, that step runs through record. Returns (everything, [(report, θ_before,
    θ_after)])."""
    model = make_model()
    opt = OPTIMIZERS[optimizer](model.parameters())
    x, y = batch()
    torch.manual_seed(123)
    reports = []
    for step in range(steps):
        closure = make_closure(model, opt, x, y)
        if step == probe_step:
            before = [p.detach().clone() for p in model.parameters()]
            reports.append((pyco.probe.record(opt, closure, pyco.blocks.by_module(model), **record_kw), before,
                            [p.detach().clone() for p in model.parameters()]))
        else:
            opt.step(closure)
    return everything(model, opt), reports


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_record_leaves_everything_as_a_plain_step(optimizer):
    plain, _ = run(optimizer, probe_step=None)
    probed, reports = run(optimizer, probe_step=1)
    assert_bitwise(plain, probed)
    report, before, after = reports[0]
    assert report.names == ("0", "1", "4") and report.mode == "full" and report.C.shape == (3, 3)


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_record_decomposes_the_step_it_took(dtype):
    probed, reports = run("adam", probe_step=0, dtype=dtype)
    report, before, after = reports[0]
    model = make_model()  # the same initial model: evaluate the loss at θ_before and θ_after directly
    x, y = batch()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    values = []
    for point in (before, after):
        with torch.no_grad():
            for p, v in zip(model.parameters(), point):
                p.copy_(v)
        torch.set_rng_state(rng)
        values.append(F.cross_entropy(model(x), y).item())
    tol = 0.0 if dtype is None else 1e-6
    assert report.loss_before == pytest.approx(values[0], rel=tol, abs=tol)
    assert report.loss_after == pytest.approx(values[1], rel=max(tol, 1e-7))
    assert report.dtype == ("float32" if dtype is None else "float64")
    assert report.actual < 0 and report.first_order.sum().item() < 0


def test_record_sums_micro_batches():
    model = make_model(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(torch.float64)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    report = pyco.probe.record(opt, make_closure(model, opt, x, y, micro_batches=2))
    model2 = make_model(torch.float64)
    torch.set_rng_state(rng)
    with torch.no_grad():
        expected = sum(F.cross_entropy(model2(xs), ys).item() / 2 for xs, ys in zip(x.chunk(2), y.chunk(2)))
    assert report.loss_before == pytest.approx(expected, rel=1e-14)
    assert report.names == ("group0",)


def test_record_errors():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    only_first = pyco.blocks.Blocks([("first", list(model[0].parameters()))])
    with pytest.raises(ValueError, match=r"in no block: every parameter needs exactly one block"):
        pyco.probe.record(opt, make_closure(model, opt, x, y), only_first)

    def no_backward():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        return loss

    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"the closure called no backward"):
        pyco.probe.record(opt, no_backward)
    # the real step still ran (zero gradients: SGD leaves the weights, batch norm moved once)
    assert not torch.equal(model.state_dict()["1.running_mean"], state["1.running_mean"])
