"""pyco.probe.cross_terms as a specification: the split of a step's loss change against the dense Hessian,
closed forms, the η³ remainder, a real Gauss–Seidel sweep, and the errors it raises."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyco
from pyco.probe import reference

F64 = torch.float64
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
LOSSES = {
    "cross_entropy": (lambda out, y: F.cross_entropy(out, y), lambda n, gen: torch.randint(0, 3, (n,), generator=gen)),
    "mse": (lambda out, y: F.mse_loss(out, y), lambda n, gen: torch.randn(n, 3, generator=gen, dtype=F64)),
}


def small_mlp(act: str, seed: int = 0, dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 6)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(6))
    layers += [ACTIVATIONS[act](), nn.Linear(6, 5), ACTIVATIONS[act]()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(5, 3))
    return nn.Sequential(*layers).to(F64)


def problem(act="tanh", loss="cross_entropy", seed=0, **kw):
    """(model, loss_fn, loss_of_model) on a fixed batch of 8."""
    model = small_mlp(act, seed, **kw)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(8, 4, generator=gen, dtype=F64)
    criterion, target = LOSSES[loss]
    y = target(8, gen)
    return model, (lambda: criterion(model(x), y)), (lambda m: criterion(m(x), y))


def gradient_step(loss_fn, params, lr):
    return [-lr * g for g in torch.autograd.grad(loss_fn(), params)]


def random_step(params, scale, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def dense(model, blocks, loss_of_model, update):
    loss_of = reference.loss_of_module(model, blocks.params(), loss_of_model)
    return reference.cross_terms(loss_of, blocks.params(), [len(blocks[n]) for n in blocks], update, names=blocks.names)


def assert_matches(report, ref, rel=1e-10):
    scale = ref.C.abs().max().item()
    for name in ("C", "first_order", "row_sums", "alone"):
        a, b = getattr(report, name), getattr(ref, name)
        err = (a - b).abs().max().item()
        assert err <= rel * max(scale, b.abs().max().item()), f"{name}: max |diff| {err:.3e} (scale {scale:.3e})"
    for name in ("loss_before", "loss_after", "quadratic"):
        a, b = getattr(report, name), getattr(ref, name)
        assert abs(a - b) <= rel * max(abs(b), scale), f"{name}: {a!r} vs {b!r}"


# ---- against the dense Hessian -------------------------------------------------------------------------

BLOCKINGS = {"by_module": pyco.blocks.by_module, "by_param": pyco.blocks.by_param}


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("blocking", list(BLOCKINGS))
def test_c_matches_dense_hessian(act, loss, blocking):
    model, loss_fn, loss_of_model = problem(act, loss)
    blocks = BLOCKINGS[blocking](model)
    update = random_step(blocks.params(), 0.3)
    report = pyco.probe.cross_terms(loss_fn, blocks, update)
    assert_matches(report, dense(model, blocks, loss_of_model, update))
    assert report.names == blocks.names and report.dtype == "float64"


@pytest.mark.parametrize("max_batch", [1, 2, 64])
def test_batched_and_one_by_one_agree(max_batch):
    model, loss_fn, loss_of_model = problem("gelu", "mse", seed=3)
    blocks = pyco.blocks.by_param(model)
    update = random_step(blocks.params(), 0.2, seed=4)
    report = pyco.probe.cross_terms(loss_fn, blocks, update, max_batch=max_batch)
    assert_matches(report, dense(model, blocks, loss_of_model, update))


def test_blocks_out_of_forward_order():
    model, loss_fn, loss_of_model = problem("tanh", "mse", seed=5)
    named = dict(model.named_parameters())
    blocks = pyco.blocks.Blocks([("head", [named["4.weight"], named["4.bias"]]), ("first", [named["0.weight"]]),
                                 ("mixed", [named["2.bias"], named["0.bias"], named["2.weight"]])])
    update = {p: d for p, d in zip(blocks.params(), random_step(blocks.params(), 0.3))}
    report = pyco.probe.cross_terms(loss_fn, blocks, update)
    assert_matches(report, dense(model, blocks, loss_of_model, [update[p] for p in blocks.params()]))


class TiedResidual(nn.Module):
    """A weight used at both ends (tied), a residual branch, and a parameter the loss never reads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(15)
        self.w = nn.Parameter(torch.randn(3, 4, dtype=F64))
        self.branch = nn.Linear(4, 4).to(F64)
        self.unused = nn.Parameter(torch.randn(2, dtype=F64))

    def forward(self, x):
        h = x @ self.w
        h = h + torch.tanh(self.branch(h))
        return h @ self.w.t()


@pytest.mark.parametrize("blocking", list(BLOCKINGS))
def test_tied_weights_residuals_and_unused_parameters(blocking):
    model = TiedResidual()
    x, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    blocks = BLOCKINGS[blocking](model)
    update = random_step(blocks.params(), 0.3, seed=16)
    report = pyco.probe.cross_terms(lambda: F.mse_loss(model(x), y), blocks, update)
    assert_matches(report, dense(model, blocks, lambda m: F.mse_loss(m(x), y), update))
    if blocking == "by_param":
        unused = blocks.names.index("unused")
        assert report.C[unused].abs().max() == 0 and report.first_order[unused] == 0 and report.alone[unused] == 0


def test_rows_mode_gives_row_sums():
    model, loss_fn, loss_of_model = problem("tanh", "cross_entropy", seed=6)
    blocks = pyco.blocks.by_module(model)
    update = random_step(blocks.params(), 0.3)
    rows = pyco.probe.cross_terms(loss_fn, blocks, update, mode="rows")
    ref = dense(model, blocks, loss_of_model, update)
    assert rows.C is None and rows.cross is None and rows.within is None and rows.gauss_seidel_gap is None
    torch.testing.assert_close(rows.row_sums, ref.C.sum(dim=1), rtol=1e-10, atol=1e-14)
    assert math.isclose(rows.quadratic, ref.quadratic, rel_tol=1e-10)
    assert math.isclose(rows.remainder, ref.remainder, rel_tol=1e-8, abs_tol=1e-14)


def test_dropout_is_replayed_and_batchnorm_restored():
    model, loss_fn, _ = problem("tanh", "mse", seed=7, dropout=0.5, batchnorm=True)
    blocks = pyco.blocks.by_module(model)
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    buffers = copy.deepcopy(dict(model.named_buffers()))
    update = random_step(blocks.params(), 0.2)

    def loss_of_model(m):  # the reference replays the same random state before every evaluation
        torch.set_rng_state(rng)
        return F.mse_loss(m(problem_x), problem_y)

    gen = torch.Generator().manual_seed(107)
    problem_x, problem_y = torch.randn(8, 4, generator=gen, dtype=F64), torch.randn(8, 3, generator=gen, dtype=F64)
    report = pyco.probe.cross_terms(lambda: F.mse_loss(model(problem_x), problem_y), blocks, update)
    assert torch.equal(torch.get_rng_state(), rng), "the probe consumed random numbers"
    for name, buf in model.named_buffers():
        assert torch.equal(buf, buffers[name]), f"buffer {name} changed"
    ref = dense(model, blocks, loss_of_model, update)
    for name, buf in model.named_buffers():
        buf.copy_(buffers[name])
    assert_matches(report, ref)


# ---- closed forms --------------------------------------------------------------------------------------

def test_scalar_chain_closed_form():
    """ŷ = x·w_1·…·w_n, L = (ŷ − y)²: g_i = 2r·x·P_i, H_ii = 2(x·P_i)², H_ij = 2x²·P_i·P_j + 2r·x·P_ij (i≠j),
    with r = ŷ − y, P_i the product of the w's but w_i and P_ij the product but w_i and w_j."""
    x, y, w0 = 0.7, -0.4, [1.3, -0.8, 1.1, 0.9, -1.2]
    ws = [nn.Parameter(torch.tensor(v, dtype=F64)) for v in w0]
    dw = [0.05, -0.03, 0.02, 0.04, -0.01]
    n = len(ws)

    def prod(skip):
        return math.prod(w0[i] for i in range(n) if i not in skip)

    r = x * prod(()) - y
    f = [2 * r * x * prod((i,)) * dw[i] for i in range(n)]
    c = [[(2 * (x * prod((i,))) ** 2 if i == j else 2 * x * x * prod((i,)) * prod((j,)) + 2 * r * x * prod((i, j)))
          * dw[i] * dw[j] for j in range(n)] for i in range(n)]
    loss = lambda: (x * torch.stack(ws).prod() - y) ** 2  # noqa: E731
    blocks = pyco.blocks.Blocks([(f"w{i}", [w]) for i, w in enumerate(ws)])
    report = pyco.probe.cross_terms(loss, blocks, [torch.tensor(d, dtype=F64) for d in dw])
    torch.testing.assert_close(report.C, torch.tensor(c, dtype=F64), rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(report.first_order, torch.tensor(f, dtype=F64), rtol=1e-12, atol=1e-16)
    alone = [(x * prod((i,)) * (w0[i] + dw[i]) - y) ** 2 - r * r for i in range(n)]
    torch.testing.assert_close(report.alone, torch.tensor(alone, dtype=F64), rtol=1e-12, atol=1e-16)
    after = (x * math.prod(w + d for w, d in zip(w0, dw)) - y) ** 2
    assert math.isclose(report.actual, after - r * r, rel_tol=1e-12)


@pytest.mark.parametrize("grouping", ["x|y|z", "xy|z"])
def test_bilinear_closed_form(grouping):
    """f = (x+y)·z is bilinear: C holds only the x–z and y–z products, R = 0, and the non-additivity
    (all orders) equals the cross term."""
    x, y, z = (nn.Parameter(torch.tensor(v, dtype=F64)) for v in (0.3, -1.1, 2.0))
    dx, dy, dz = 0.25, -0.5, 0.75
    groups = {"x|y|z": [("x", [x]), ("y", [y]), ("z", [z])], "xy|z": [("xy", [x, y]), ("z", [z])]}[grouping]
    blocks = pyco.blocks.Blocks(groups)
    update = {x: torch.tensor(dx, dtype=F64), y: torch.tensor(dy, dtype=F64), z: torch.tensor(dz, dtype=F64)}
    report = pyco.probe.cross_terms(lambda: (x + y) * z, blocks, update)
    if grouping == "x|y|z":
        c = [[0, 0, dx * dz], [0, 0, dy * dz], [dx * dz, dy * dz, 0]]
        f = [2.0 * dx, 2.0 * dy, (0.3 - 1.1) * dz]
    else:
        c = [[0, (dx + dy) * dz], [(dx + dy) * dz, 0]]
        f = [2.0 * (dx + dy), (0.3 - 1.1) * dz]
    torch.testing.assert_close(report.C, torch.tensor(c, dtype=F64), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(report.first_order, torch.tensor(f, dtype=F64), rtol=1e-15, atol=1e-15)
    assert abs(report.remainder) < 1e-15
    assert math.isclose(report.nonadditivity, (dx + dy) * dz, rel_tol=1e-12)
    assert math.isclose(report.cross, (dx + dy) * dz, rel_tol=1e-15)
    assert report.within.abs().max() == 0


def test_remainder_scales_as_eta_cubed():
    model, loss_fn, _ = problem("tanh", "cross_entropy", seed=8)
    blocks = pyco.blocks.by_module(model)
    grads = torch.autograd.grad(loss_fn(), blocks.params())
    etas = [2e-3 * 2 ** i for i in range(5)]
    rem = [abs(pyco.probe.cross_terms(loss_fn, blocks, [-eta * g for g in grads], alone=False).remainder)
           for eta in etas]
    logs = [(math.log(e), math.log(r)) for e, r in zip(etas, rem)]
    mx, my = sum(a for a, _ in logs) / len(logs), sum(b for _, b in logs) / len(logs)
    slope = sum((a - mx) * (b - my) for a, b in logs) / sum((a - mx) ** 2 for a, _ in logs)
    assert abs(slope - 3) <= 0.2, f"log-log slope {slope:.3f}, remainders {rem}"


def test_alone_and_nonadditivity_are_exact():
    model, loss_fn, _ = problem("relu", "mse", seed=9)
    blocks = pyco.blocks.by_module(model)
    update = random_step(blocks.params(), 0.4)
    report = pyco.probe.cross_terms(loss_fn, blocks, update)
    with torch.no_grad():
        before = loss_fn().item()
        start, alone = 0, []
        for name in blocks.names:
            ps = blocks[name]
            for p, d in zip(ps, update[start:start + len(ps)]):
                p.add_(d)
            alone.append(loss_fn().item() - before)
            for p, d in zip(ps, update[start:start + len(ps)]):
                p.sub_(d)
            start += len(ps)
    assert report.alone.tolist() == pytest.approx(alone, rel=1e-13, abs=1e-15)
    assert report.nonadditivity == pytest.approx(report.actual - sum(alone), rel=1e-12, abs=1e-15)


# ---- the Gauss–Seidel prediction against a real sweep ---------------------------------------------------

def gauss_seidel_sweep(loss_fn, blocks, lr, order):
    """SGD block by block in ``order``, each block's gradient recomputed after the blocks before it moved;
    returns ΔL and restores the parameters."""
    saved = [p.detach().clone() for p in blocks.params()]
    before = loss_fn().item()
    for name in order:
        grads = torch.autograd.grad(loss_fn(), blocks[name])
        with torch.no_grad():
            for p, g in zip(blocks[name], grads):
                p.sub_(lr * g)
    after = loss_fn().item()
    with torch.no_grad():
        for p, s in zip(blocks.params(), saved):
            p.copy_(s)
    return after - before


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_gauss_seidel_gap_predicts_a_real_sweep(order):
    model, loss_fn, _ = problem("tanh", "mse", seed=10)
    blocks = pyco.blocks.by_module(model)
    lr = 0.01  # the prediction's error is O(lr) relative to the gap: about 2% here
    report = pyco.probe.cross_terms(loss_fn, blocks, gradient_step(loss_fn, blocks.params(), lr))
    assert abs(report.remainder) < 0.01 * abs(report.actual)
    names = list(blocks.names) if order == "forward" else list(reversed(blocks.names))
    gap = gauss_seidel_sweep(loss_fn, blocks, lr, names) - report.actual
    assert report.gauss_seidel_gap == pytest.approx(gap, rel=0.05), f"predicted {report.gauss_seidel_gap}, real {gap}"
    shares = report.gauss_seidel_gap_by_block(names)
    assert shares.sum().item() == pytest.approx(report.gauss_seidel_gap, rel=1e-12)
    assert shares[blocks.names.index(names[0])] == 0  # the first block swept sees no gradient change


# ---- float64 evaluation of a float32 model ---------------------------------------------------------------

def test_float64_evaluation_of_a_float32_model_leaves_it_bitwise():
    model = small_mlp("tanh", seed=12, batchnorm=True).float()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    blocks = pyco.blocks.by_module(model)
    update = [u.float() for u in random_step(blocks.params(), 0.1)]
    state = copy.deepcopy(model.state_dict())
    ptrs = [p.data_ptr() for p in model.parameters()]
    report = pyco.probe.cross_terms(lambda: F.cross_entropy(model(x), y), blocks, update, dtype=F64)
    assert report.dtype == "float64"
    for k, v in model.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), f"{k} changed"
    assert ptrs == [p.data_ptr() for p in model.parameters()]
    twin = copy.deepcopy(model).double()
    twin_blocks = pyco.blocks.by_module(twin)
    expected = pyco.probe.cross_terms(lambda: F.cross_entropy(twin(x.double()), y), twin_blocks,
                                      [u.double() for u in update])
    torch.testing.assert_close(report.C, expected.C, rtol=1e-12, atol=1e-15)
    assert report.loss_after == pytest.approx(expected.loss_after, rel=1e-14)


# ---- errors --------------------------------------------------------------------------------------------

def error_cases():
    model, loss_fn, _ = problem("tanh", "mse", seed=13)
    blocks = pyco.blocks.by_module(model)
    params = blocks.params()
    zeros = [torch.zeros_like(p) for p in params]
    frozen = nn.Parameter(torch.zeros(2, dtype=F64), requires_grad=False)
    return {
        "short list": (loss_fn, blocks, zeros[:-1], {}, ValueError, r"update has 5 tensors but the blocks hold 6"),
        "wrong shape": (loss_fn, blocks, [zeros[0].t()] + zeros[1:], {}, ValueError,
                        r"block '0' \(param 0.weight\) has shape \[4, 6\], expected the parameter's \[6, 4\]"),
        "dict missing": (loss_fn, blocks, dict(zip(params[1:], zeros[1:])), {}, ValueError,
                         r"no step for block '0' \(param 0.weight\)"),
        "dict extra": (loss_fn, blocks, {**dict(zip(params, zeros)), frozen: frozen}, {}, ValueError,
                       r"in no block"),
        "not a tensor": (loss_fn, blocks, [1.0] * 6, {}, TypeError, r"expected a tensor"),
        "non-scalar loss": (lambda: model(torch.randn(3, 4, dtype=F64)), blocks, zeros, {}, ValueError,
                            r"scalar loss, got a tensor of shape \[3, 3\]"),
        "not a loss": (lambda: 1.0, blocks, zeros, {}, TypeError, r"scalar tensor, got float"),
        "frozen block": (loss_fn, pyco.blocks.Blocks([("frozen", [frozen])]), [torch.zeros(2, dtype=F64)], {},
                         ValueError, r"block 'frozen' .* does not require grad"),
        "no blocks": (loss_fn, pyco.blocks.Blocks([]), [], {}, ValueError, r"blocks hold no parameters"),
        "bad mode": (loss_fn, blocks, zeros, {"mode": "diag"}, ValueError, r"Invalid mode: 'diag'"),
        "bad dtype": (loss_fn, blocks, zeros, {"dtype": torch.int64}, ValueError, r"Invalid dtype"),
        "bad max_batch": (loss_fn, blocks, zeros, {"max_batch": 0}, ValueError, r"Invalid max_batch: 0"),
    }


@pytest.mark.parametrize("case", list(error_cases()))
def test_errors(case):
    loss_fn, blocks, update, kwargs, exc, pattern = error_cases()[case]
    with pytest.raises(exc, match=pattern):
        pyco.probe.cross_terms(loss_fn, blocks, update, **kwargs)


def test_an_error_inside_leaves_the_model_as_it_was():
    model = small_mlp("tanh", seed=14, batchnorm=True).float()
    state = copy.deepcopy(model.state_dict())
    blocks = pyco.blocks.by_module(model)
    calls = []

    def loss_fn():  # runs the model in float64, then fails
        calls.append(1)
        return model(torch.randn(8, 4)).sum(dim=1)

    with pytest.raises(ValueError, match="scalar loss"):
        pyco.probe.cross_terms(loss_fn, blocks, [torch.zeros_like(p) for p in blocks.params()], dtype=F64)
    assert calls
    for k, v in model.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), f"{k} changed"


def test_blocks_of_another_copy_of_the_model_are_refused():
    """Blocks the loss does not depend on (made from another copy of the model) would give C = 0 in no time;
    the probe says what is wrong instead, and the model is left as it was."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    other = copy.deepcopy(model)
    x = torch.randn(5, 3)
    blocks = pyco.blocks.by_module(other)
    update = [torch.randn_like(p) for p in blocks.params()]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="does not depend on any of the blocks"):
        pyco.probe.cross_terms(lambda: model(x).square().mean(), blocks, update)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
