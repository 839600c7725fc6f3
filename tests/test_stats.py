"""Per-block statistics of a step (Σg², Σu², Σg·u, Σθ²) against a plain float64 computation, block names,
determinism across thread counts."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_report, grad_like, make_params, set_grads

import pyco
from pyco.stats import FIELDS

SHAPES = [(4097,), (3,), (), (0,), (50, 7), (1,)]
# Sums of float32 products (float32 arithmetic for float32/bfloat16/float16 storage) vs float64 sums.
STATS_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.complex128: 1e-12, torch.complex64: 1e-5,
              torch.bfloat16: 1e-5, torch.float16: 1e-5}


def flat_real(t: torch.Tensor) -> torch.Tensor:
    return (torch.view_as_real(t) if t.is_complex() else t).detach().reshape(-1).double()


def reference_stats(blocks: list[list[torch.Tensor]], before: dict, grads: dict) -> torch.Tensor:
    """[k, 4] float64: Σg², Σu², Σg·u, Σθ² per block over the parameters that had a gradient."""
    rows = []
    for members in blocks:
        row = torch.zeros(4, dtype=torch.float64)
        for p in members:
            if grads[id(p)] is None:
                continue
            g, theta = flat_real(grads[id(p)]), flat_real(before[id(p)])
            u = flat_real(p) - theta
            row += torch.stack([(g * g).sum(), (u * u).sum(), (g * u).sum(), (theta * theta).sum()])
        rows.append(row)
    return torch.stack(rows)


def assert_stats_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """Σg·u may cancel: its error is measured against the Cauchy-Schwarz bound sqrt(Σg²·Σu²)."""
    assert actual.dtype == torch.float64 and actual.shape == expected.shape
    for j, field in enumerate(FIELDS):
        for b in range(expected.shape[0]):
            scale = (expected[b, 0] * expected[b, 1]).sqrt() if field == "grad_dot_update" else expected[b, j].abs()
            assert_close_report(actual[b, j], expected[b, j], 0.0, rtol * float(scale) + 1e-300,
                                f"{what} block {b} {field}")


def step_and_check(opt, params, blocks, rtol, gen, has_grad=None, step=0):
    set_grads([params], step, gen, has_grad)
    before = {id(p): p.detach().clone() for p in params}
    grads = {id(p): None if p.grad is None else p.grad.clone() for p in params}
    opt.step()
    expected = reference_stats(blocks, before, grads)
    assert opt.last_stats is not None and not opt.last_stats.skipped
    assert_stats_close(opt.last_stats.values, expected, rtol, f"step {step}")
    return expected


CASES = [
    ("SGD", dict(lr=0.1), torch.float64),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True), torch.float64),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5), torch.float32),
    ("Adam", dict(lr=0.01), torch.float64),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True), torch.float32),
    ("AdamW", dict(lr=0.01, weight_decay=0.1), torch.float64),
    ("AdamW", dict(lr=0.01, amsgrad=True), torch.float32),
    ("Adam", dict(lr=0.01), torch.complex128),
    ("SGD", dict(lr=0.1, momentum=0.9), torch.complex64),
    ("Adam", dict(lr=0.05), torch.bfloat16),
    ("SGD", dict(lr=0.1, momentum=0.9), torch.float16),
]


@pytest.mark.parametrize("kind, hyper, dtype", CASES)
def test_default_blocks_are_param_groups(kind, hyper, dtype):
    params = make_params(SHAPES, dtype, seed=1)
    groups = [dict(params=params[:2]), dict(params=params[2:4], name="body"), dict(params=params[4:])]
    opt = getattr(pyco.optim, kind)(groups, **hyper)
    assert opt.block_names == ("group0", "body", "group2")
    gen = torch.Generator().manual_seed(2)
    blocks = [g["params"] for g in opt.param_groups]
    no_grad_last = lambda step, i: i != len(params) - 1  # noqa: E731  (one parameter never has a gradient)
    for step in range(5):
        step_and_check(opt, params, blocks, STATS_RTOL[dtype], gen, no_grad_last, step)
    assert opt.last_stats.names == ("group0", "body", "group2")
    assert opt.last_stats.finite


@pytest.mark.parametrize("kind, hyper, dtype", CASES[::2])
@pytest.mark.parametrize("form", ["dict", "pairs"])
def test_explicit_blocks_across_groups(kind, hyper, dtype, form):
    params = make_params(SHAPES, dtype, seed=3)
    spec = {"a": [params[0], params[3], params[5]], "b": [params[1], params[2]], "c": [params[4]]}
    blocks_arg = spec if form == "dict" else list(spec.items())
    opt = getattr(pyco.optim, kind)([dict(params=params[:3]), dict(params=params[3:])], blocks=blocks_arg, **hyper)
    assert opt.block_names == ("a", "b", "c")
    gen = torch.Generator().manual_seed(4)
    # Block "c" never has a gradient this run: its row is zero.
    expected = step_and_check(opt, params, list(spec.values()), STATS_RTOL[dtype], gen, lambda s, i: i != 4)
    assert torch.equal(opt.last_stats.values[2], torch.zeros(4, dtype=torch.float64))
    assert (expected[:2] != 0).all()
    for step in range(1, 4):
        step_and_check(opt, params, list(spec.values()), STATS_RTOL[dtype], gen, step=step)


def test_block_stats_accessors():
    params = make_params([(5,), (3,)], seed=5)
    opt = pyco.optim.SGD(params, lr=0.5, blocks={"w": [params[0]], "b": [params[1]]})
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    stats = opt.last_stats
    assert isinstance(stats, pyco.BlockStats)
    assert stats.values.shape == (2, 4) and stats.values.dtype == torch.float64
    w = stats["w"]
    assert list(w) == list(FIELDS)
    assert w["grad_sq"] == 5.0 and w["update_sq"] == 5 * 0.25 and w["grad_dot_update"] == -2.5
    assert w["param_sq"] == pytest.approx(float((before[0] ** 2).sum()), rel=1e-15)
    assert stats.to_dict() == {"w": stats["w"], "b": stats["b"]}
    for j, field in enumerate(FIELDS):
        assert torch.equal(getattr(stats, field), stats.values[:, j])
    with pytest.raises(KeyError, match="no block named 'nope'"):
        stats["nope"]
    assert stats.finite and not stats.skipped


@pytest.mark.parametrize("kind, hyper", [
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bitwise_identical_across_thread_counts(kind, hyper, dtype, threads):
    """Chunking never depends on the thread count and partial sums are added in a fixed order."""
    results = []
    for n in (1, 2, 3):
        threads(n)
        params = make_params([(278011,), (4097,), (3,)], dtype, seed=6)
        opt = getattr(pyco.optim, kind)(
            [dict(params=params[:1]), dict(params=params[1:])], **hyper)
        gen = torch.Generator().manual_seed(7)
        stats = []
        for step in range(4):
            set_grads([params], step, gen)
            opt.step()
            stats.append(opt.last_stats.values.clone())
        results.append((params, opt, stats))
    (p1, o1, s1) = results[0]
    for params, opt, stats in results[1:]:
        for i, (a, b) in enumerate(zip(p1, params)):
            assert torch.equal(a, b), f"param {i} differs between thread counts"
            for key, value in o1.state[a].items():
                assert torch.equal(value, opt.state[b][key]), f"state {key!r} of param {i} differs"
        for step, (x, y) in enumerate(zip(s1, stats)):
            assert torch.equal(x, y), f"stats of step {step} differ between thread counts: {x} vs {y}"


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_stats_false(kind):
    results = []
    for stats in (True, False):
        params = make_params([(4097,), (3,)], seed=8)
        opt = getattr(pyco.optim, kind)(params, lr=0.01, stats=stats)
        gen = torch.Generator().manual_seed(9)
        for step in range(3):
            set_grads([params], step, gen)
            opt.step()
        results.append((params, opt))
    (on, opt_on), (off, opt_off) = results
    assert opt_on.last_stats is not None
    assert opt_off.last_stats is None
    for a, b in zip(on, off):
        assert torch.equal(a, b), "statistics must not change the update"


@pytest.mark.parametrize("blocks", [None, "explicit"])
def test_add_param_group_adds_a_block(blocks):
    params = make_params([(7,), (3,), (5,), (2,)], seed=10)
    spec = None if blocks is None else {"first": [params[0]], "second": [params[1]]}
    opt = pyco.optim.Adam([params[0], params[1]] if spec else [params[0]], lr=0.01, blocks=spec)
    before = opt.block_names
    opt.add_param_group(dict(params=[params[2]], lr=0.1))
    opt.add_param_group(dict(params=[params[3]], name="late"))
    new_index = len(opt.param_groups) - 2
    assert opt.block_names == (*before, f"group{new_index}", "late")
    gen = torch.Generator().manual_seed(11)
    blocks_lists = ([[params[0]], [params[1]], [params[2]], [params[3]]] if spec
                    else [[params[0]], [params[2]], [params[3]]])
    for step in range(3):
        step_and_check(opt, params, blocks_lists, 1e-12, gen, step=step)
    assert (opt.last_stats.values != 0).all()
    assert opt.param_groups[-2]["lr"] == 0.1


def test_unscaled_gradient_in_stats_under_grad_scaler():
    """With GradScaler, Σg² is of the unscaled gradient (what .grad holds after the step)."""
    params = make_params([(4097,), (3,)], torch.float32, seed=12)
    opt = pyco.optim.Adam(params, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    gen = torch.Generator().manual_seed(13)
    grads = [grad_like(p, gen) for p in params]
    loss = sum((p * g).sum() for p, g in zip(params, grads))  # d loss / d p = g
    before = {id(p): p.detach().clone() for p in params}
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)
    expected = reference_stats([params], before, {id(p): g for p, g in zip(params, grads)})
    assert_stats_close(opt.last_stats.values, expected, 1e-5)
