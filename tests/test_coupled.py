"""pyco.Coupled: exactness on losses that are exactly quadratic in the parameters (float64 least squares with
correlated features), the box and the outcomes, and the same-batch rules every order keeps (random state,
buffers, optimizer state, checkpoints, all-or-nothing steps)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import pyco
from pyco.orders import _block_scales
from _orders_common import batch, make_closure, max_difference, mlp

SIZES = (3, 2, 4)
INNER = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
    "pyco-adamw": lambda ps: pyco.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
}


class LeastSquares:
    """L(θ) = ½ mean((Aθ − y)²) with correlated columns, θ split into blocks of SIZES: exactly quadratic, so the
    loss over the block-scaled subspace θ0 + Σ α_i Δ_i is a linear least-squares problem in α."""

    def __init__(self, seed: int = 0, n: int = 40, sizes=SIZES):
        gen = torch.Generator().manual_seed(seed)
        d = sum(sizes)
        mix = torch.eye(d, dtype=torch.float64) + 0.6 * torch.randn(d, d, generator=gen, dtype=torch.float64)
        self.a = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix
        self.y = torch.randn(n, generator=gen, dtype=torch.float64)
        self.params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in sizes]
        self.blocks = {f"b{i}": [p] for i, p in enumerate(self.params)}

    def loss_at(self, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.a @ theta - self.y) ** 2).mean()

    def theta(self) -> torch.Tensor:
        return torch.cat([p.detach() for p in self.params]).clone()

    def closure(self):
        loss = self.loss_at(torch.cat(list(self.params)))
        loss.backward()
        return loss

    def proposal(self, inner: torch.optim.Optimizer) -> list[torch.Tensor]:
        """Δ of the inner optimizer's next step, taken on deep copies (nothing here changes)."""
        twin = copy.deepcopy((self.params, inner))
        params, opt = twin
        opt.zero_grad()
        loss = self.loss_at(torch.cat(list(params)))
        loss.backward()
        before = [p.detach().clone() for p in params]
        opt.step()
        return [p.detach() - b for p, b in zip(params, before)]

    def subspace(self, theta0: torch.Tensor, deltas: list[torch.Tensor]):
        """(M, r0): the loss of θ0 + Σ α_i Δ_i is ½ mean((r0 + M α)²)."""
        cols = []
        start = 0
        for d in deltas:
            full = torch.zeros_like(theta0)
            full[start:start + d.numel()] = d
            cols.append(self.a @ full)
            start += d.numel()
        return torch.stack(cols, dim=1), self.a @ theta0 - self.y

    def model_terms(self, theta0, deltas):
        """f and C of the quadratic model m(α), computed here independently of the probe."""
        m, r0 = self.subspace(theta0, deltas)
        n = self.a.shape[0]
        return m.T @ r0 / n, m.T @ m / n


def scaled(theta0: torch.Tensor, deltas, alpha) -> torch.Tensor:
    return theta0 + torch.cat([float(a) * d for a, d in zip(alpha, deltas)])


# ---- exactness ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", INNER)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unconstrained_step_lands_on_the_minimiser_over_the_block_scaled_subspace(kind, seed):
    ls = LeastSquares(seed)
    opt = pyco.Coupled(INNER[kind](ls.params), ls.blocks, trust=None)
    for _ in range(4):  # later steps carry momentum / Adam moments: Δ is the inner optimizer's real step
        theta0, deltas = ls.theta(), ls.proposal(opt.optimizer)
        m, r0 = ls.subspace(theta0, deltas)
        best = torch.linalg.lstsq(m, -r0.reshape(-1, 1)).solution.reshape(-1)
        opt.step(ls.closure)
        assert opt.last_outcome == "interior"
        assert torch.allclose(torch.tensor(list(opt.last_alpha.values()), dtype=torch.float64), best,
                              rtol=0, atol=1e-10)
        assert torch.allclose(ls.theta(), scaled(theta0, deltas, best), rtol=0, atol=1e-10)
        # and nothing in the subspace is lower: the gradient there is orthogonal to every Δ_i
        assert float(ls.loss_at(ls.theta())) <= float(ls.loss_at(scaled(theta0, deltas, best * 1.001)))


def test_one_block_is_the_exact_line_search_along_the_proposal():
    ls = LeastSquares(3, sizes=(9,))
    opt = pyco.Coupled(torch.optim.SGD(ls.params, lr=0.01), ls.blocks, trust=None)
    theta0, deltas = ls.theta(), ls.proposal(opt.optimizer)
    f, c = ls.model_terms(theta0, deltas)
    opt.step(ls.closure)
    alpha = opt.last_alpha["b0"]
    assert alpha == pytest.approx(float(-f[0] / c[0, 0]), abs=1e-10)
    assert alpha > 1  # plain gradient descent with a small lr undershoots; the line search goes further
    line = [float(ls.loss_at(scaled(theta0, deltas, [alpha + e]))) for e in (-1e-3, 0.0, 1e-3)]
    assert line[1] < line[0] and line[1] < line[2]
    assert opt.last_predicted == pytest.approx(float(ls.loss_at(ls.theta()) - ls.loss_at(theta0)), abs=1e-12)


def brute_force_box(f, c, lower, upper):
    """min of αᵀf + ½αᵀCα over the box by trying every face (each α_i at its lower, its upper bound, or free)."""
    k = f.numel()
    best, best_value = None, float("inf")
    for faces in itertools.product((-1, 0, 1), repeat=k):
        x = torch.where(torch.tensor(faces) < 0, lower, upper).clone()
        free = [i for i in range(k) if faces[i] == 0]
        fixed = [i for i in range(k) if faces[i] != 0]
        if free:
            rhs = -(f[free] + c[free][:, fixed] @ x[fixed])
            x[free] = torch.linalg.solve(c[free][:, free], rhs)
        if bool(((x >= lower - 1e-12) & (x <= upper + 1e-12)).all()):
            value = float(x @ f + 0.5 * x @ c @ x)
            if value < best_value:
                best, best_value = x, value
    return best


@pytest.mark.parametrize("trust", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 4])
def test_a_binding_trust_region_gives_the_constrained_optimum_of_the_model(trust, seed):
    ls = LeastSquares(seed)
    opt = pyco.Coupled(torch.optim.SGD(ls.params, lr=0.01), ls.blocks, trust=trust)
    theta0, deltas = ls.theta(), ls.proposal(opt.optimizer)
    f, c = ls.model_terms(theta0, deltas)
    ones = torch.ones(len(SIZES), dtype=torch.float64)
    expected = brute_force_box(f, c, ones - trust, ones + trust)
    opt.step(ls.closure)
    alpha = torch.tensor(list(opt.last_alpha.values()), dtype=torch.float64)
    assert opt.last_outcome == "trust_bound"  # lr 0.01 is far from the subspace's minimiser: the box binds
    assert bool(((alpha - 1).abs() <= trust + 1e-15).all())
    assert torch.allclose(alpha, expected, rtol=0, atol=1e-10)
    assert torch.allclose(ls.theta(), scaled(theta0, deltas, expected), rtol=0, atol=1e-10)


def test_without_cross_terms_each_block_does_its_own_line_search():
    ls = LeastSquares(5)
    opt = pyco.Coupled(torch.optim.SGD(ls.params, lr=0.01), ls.blocks, trust=None, cross=False)
    theta0, deltas = ls.theta(), ls.proposal(opt.optimizer)
    f, c = ls.model_terms(theta0, deltas)
    opt.step(ls.closure)
    alpha = torch.tensor(list(opt.last_alpha.values()), dtype=torch.float64)
    assert torch.allclose(alpha, -f / torch.diagonal(c), rtol=0, atol=1e-10)
    # the cross terms are real here, so the two choices differ
    coupled = torch.linalg.solve(c, -f)
    assert float((coupled - alpha).abs().max()) > 1e-3
    assert opt.last_report.cross != 0.0


def test_damping_pulls_towards_the_proposal():
    ls = LeastSquares(6)
    theta0 = ls.theta()
    inner = torch.optim.SGD(ls.params, lr=0.01)
    deltas = ls.proposal(inner)
    f, c = ls.model_terms(theta0, deltas)
    d = 3 * float(torch.diagonal(c).max())
    expected = torch.linalg.solve(c + d * torch.eye(3, dtype=torch.float64), -f + d)
    opt = pyco.Coupled(inner, ls.blocks, trust=None, damping=d)
    opt.step(ls.closure)
    alpha = torch.tensor(list(opt.last_alpha.values()), dtype=torch.float64)
    assert torch.allclose(alpha, expected, rtol=0, atol=1e-10)
    undamped = torch.linalg.solve(c, -f)
    assert float((alpha - 1).abs().max()) < float((undamped - 1).abs().max())


# ---- outcomes: indefinite, non-finite, the bare step --------------------------------------------------------

def saddle(seed: int = 0):
    """L(θ) = ½ θᵀQθ + bᵀθ with Q indefinite, θ in two blocks of 2: the model of any step has negative
    curvature in some direction of α."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.diag(torch.tensor([2.0, 1.0, -1.5, 0.5], dtype=torch.float64))
    rot = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))[0]
    q = rot @ q @ rot.T
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    ps = [nn.Parameter(torch.randn(2, generator=gen, dtype=torch.float64)) for _ in range(2)]

    def closure():
        th = torch.cat(ps)
        loss = 0.5 * th @ q @ th + b @ th
        loss.backward()
        return loss

    return ps, closure


def find_indefinite(trust, lr=0.3, indefinite="inner"):
    """(seed, the Coupled step's wrapper and parameters) for the first seed whose model is indefinite."""
    for seed in range(50):
        ps, closure = saddle(seed)
        opt = pyco.Coupled(torch.optim.SGD(ps, lr=lr), {"a": [ps[0]], "b": [ps[1]]}, trust=trust,
                           indefinite=indefinite)
        opt.step(closure)
        if opt.last_outcome == "indefinite":
            return seed, opt, ps
    raise AssertionError("no seed gave an indefinite model")


def bare_step(seed, lr=0.3):
    ps, closure = saddle(seed)
    opt = torch.optim.SGD(ps, lr=lr)
    opt.zero_grad()
    closure()
    opt.step()
    return ps


@pytest.mark.parametrize("trust, indefinite", [(None, "inner"), (2.0, "inner"), (None, "box")])
def test_indefinite_falls_back_to_the_inner_step_bitwise(trust, indefinite):
    seed, opt, ps = find_indefinite(trust, indefinite=indefinite)
    assert opt.last_alpha == {"a": 1.0, "b": 1.0}
    assert opt.outcomes["indefinite"] == 1 and opt.outcomes["interior"] == 0
    assert float(torch.linalg.eigvalsh(opt.last_report.C).min()) < 0
    for p, q in zip(ps, bare_step(seed)):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("trust", [0.5, 2.0])
def test_indefinite_inside_a_box_is_a_local_minimiser_no_worse_than_the_proposal(trust):
    seed, opt, ps = find_indefinite(trust, indefinite="box")
    report = opt.last_report
    alpha = torch.tensor(list(opt.last_alpha.values()), dtype=torch.float64)
    f, c = report.first_order, report.C
    ones = torch.ones(2, dtype=torch.float64)
    assert bool(((alpha - 1).abs() <= trust + 1e-15).all())
    assert _block_scales.model(f, c, alpha) <= _block_scales.model(f, c, ones) + 1e-15
    assert opt.last_predicted == pytest.approx(_block_scales.model(f, c, alpha), abs=1e-14)
    # first-order conditions of the box problem: a free α_i has zero model gradient, one on an edge points out
    gradient = c @ alpha + f
    for i in range(2):
        if abs(float(alpha[i]) - 1) < trust - 1e-12:
            assert abs(float(gradient[i])) < 1e-8
        else:
            assert float(gradient[i]) * (float(alpha[i]) - 1) <= 1e-12
    # the loss is exactly quadratic, so the model's prediction is the real change
    assert report.remainder == pytest.approx(0.0, abs=1e-12)


class WritesInf(torch.optim.SGD):
    """SGD whose proposal for the first parameter is inf (a diverged step)."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        first = self.param_groups[0]["params"][0]
        if first.grad is not None:
            first.fill_(float("inf"))


def test_a_nonfinite_proposal_is_applied_as_the_inner_step_and_counted():
    ls = LeastSquares(7)
    opt = pyco.Coupled(WritesInf(ls.params, lr=0.01), ls.blocks)
    opt.step(ls.closure)
    assert opt.last_outcome == "nonfinite" and opt.outcomes["nonfinite"] == 1
    assert opt.last_alpha == {"b0": 1.0, "b1": 1.0, "b2": 1.0}
    assert opt.last_report is None
    assert bool(torch.isinf(ls.params[0]).all())


def test_nonfinite_model_terms_give_alpha_one():
    f = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    scales = _block_scales.solve(f, torch.eye(2, dtype=torch.float64), trust=2.0)
    assert scales.outcome == "nonfinite" and scales.alpha.tolist() == [1.0, 1.0]


def test_zero_trust_is_the_inner_step_bitwise():
    ls, twin = LeastSquares(8), LeastSquares(8)
    opt = pyco.Coupled(torch.optim.Adam(ls.params, lr=0.1), ls.blocks, trust=0.0)
    bare = torch.optim.Adam(twin.params, lr=0.1)
    for _ in range(3):
        opt.step(ls.closure)
        bare.zero_grad()
        twin.closure()
        bare.step()
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(ls.params, twin.params))
    assert opt.outcomes["trust_bound"] == 3


@pytest.mark.parametrize("seed", range(20))
def test_box_minimiser_matches_brute_force_on_random_problems(seed):
    gen = torch.Generator().manual_seed(seed)
    k = 2 + seed % 4
    r = torch.randn(k, k, generator=gen, dtype=torch.float64)
    a = r @ r.T + 0.05 * torch.eye(k, dtype=torch.float64)
    b = 3 * torch.randn(k, generator=gen, dtype=torch.float64)
    lower = -torch.rand(k, generator=gen, dtype=torch.float64)
    upper = torch.rand(k, generator=gen, dtype=torch.float64)
    got = _block_scales.box_minimiser(a, b, lower, upper)
    assert torch.allclose(got, brute_force_box(b, a, lower, upper), rtol=0, atol=1e-10)


# ---- every=N, checkpoints -----------------------------------------------------------------------------------

def test_every_reuses_alpha_between_solves():
    ls = LeastSquares(9)
    opt = pyco.Coupled(torch.optim.SGD(ls.params, lr=0.01, momentum=0.5), ls.blocks, trust=None, every=3)
    solved = []
    for step in range(7):
        theta0, deltas = ls.theta(), ls.proposal(opt.optimizer)
        previous = torch.tensor(list(opt.last_alpha.values()), dtype=torch.float64)
        opt.step(ls.closure)
        alpha = torch.tensor(list(opt.last_alpha.values()), dtype=torch.float64)
        if step % 3 == 0:
            assert opt.last_outcome == "interior"
            solved.append(alpha)
        else:
            assert opt.last_outcome == "reused"
            assert torch.equal(alpha, previous)
        assert torch.allclose(ls.theta(), scaled(theta0, deltas, alpha), rtol=0, atol=1e-12)
    assert opt.outcomes["reused"] == 4 and opt.outcomes["interior"] == 3
    assert not torch.equal(solved[0], solved[1])


@pytest.mark.parametrize("kind", ["adam", "pyco-adamw"])
def test_state_dict_round_trip_continues_identically(kind):
    ls = LeastSquares(10)
    opt = pyco.Coupled(INNER[kind](ls.params), ls.blocks, every=2)
    for _ in range(3):
        opt.step(ls.closure)
    state = copy.deepcopy(opt.state_dict())
    assert state["pyco_order"]["order"] == "Coupled" and len(state["pyco_order"]["alpha"]) == 3
    resumed = LeastSquares(10)
    with torch.no_grad():
        for p, q in zip(resumed.params, ls.params):
            p.copy_(q)
    other = pyco.Coupled(INNER[kind](resumed.params), resumed.blocks, every=2)
    other.load_state_dict(state)
    assert other.last_alpha == opt.last_alpha and other.outcomes == opt.outcomes
    for _ in range(3):  # a reused step first (step 3), then a solve
        opt.step(ls.closure)
        other.step(resumed.closure)
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(ls.params, resumed.params))


def test_load_state_dict_checks_the_order_state_before_loading():
    ls = LeastSquares(11)
    opt = pyco.Coupled(torch.optim.Adam(ls.params, lr=0.1), ls.blocks, trust=None)
    opt.step(ls.closure)
    saved_alpha, saved_inner = opt.last_alpha, copy.deepcopy(opt.optimizer.state_dict())
    opt.step(ls.closure)
    alpha, inner = opt.last_alpha, copy.deepcopy(opt.optimizer.state_dict())
    assert alpha != saved_alpha
    for key, value in [("alpha", [1.0, float("nan"), 1.0]), ("alpha", [1.0, 1.0]),
                       ("outcomes", {"interior": -1})]:
        bad = {**copy.deepcopy(saved_inner), "pyco_order": {**opt.state_dict()["pyco_order"], key: value}}
        with pytest.raises(ValueError, match=f"'{key}' must"):
            opt.load_state_dict(bad)
        assert opt.last_alpha == alpha and opt.steps == 2  # nothing was loaded
        assert opt.optimizer.state_dict()["state"][0]["step"] == inner["state"][0]["step"]


# ---- the same-batch rules -----------------------------------------------------------------------------------

def test_dropout_the_probe_sees_the_masks_of_the_first_evaluation_and_rng_ends_as_one_evaluation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.3), nn.Linear(6, 3)).double()
    x, y = batch(16, 6, 3, seed=2)
    closure = make_closure(model, x, y)
    linear = model[1]
    blocks = {"weight": [linear.weight], "bias": [linear.bias]}
    opt = pyco.Coupled(torch.optim.SGD(model.parameters(), lr=0.05), blocks, model=model, trust=None)
    start = torch.get_rng_state()
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    after_step = torch.get_rng_state()
    torch.set_rng_state(start)
    closure()  # one plain evaluation from the same state
    assert torch.equal(after_step, torch.get_rng_state())
    # the loss with the first evaluation's masks is quadratic in the parameters; the step is its minimiser over
    # the block-scaled subspace, so its gradient there (same masks) is orthogonal to every block's Δ
    moved = [p.detach().clone() for p in model.parameters()]
    torch.set_rng_state(start)
    closure()
    grads = [p.grad.clone() for p in model.parameters()]
    alpha = list(opt.last_alpha.values())
    deltas = [(m - t) for m, t in zip(moved, theta0)]
    for b, (g, d) in enumerate(zip(grads, deltas)):
        assert abs(float((g * d).sum())) < 1e-12 * max(1.0, abs(alpha[b]))
    assert len(alpha) == 2 and alpha[0] != alpha[1]
    assert opt.last_report.remainder == pytest.approx(0.0, abs=1e-12)


def test_batchnorm_statistics_advance_once_per_step():
    model = mlp((3, 5, 4, 2), batchnorm=True)
    twin = copy.deepcopy(model)
    x, y = batch(8)
    opt = pyco.Coupled(torch.optim.SGD(model.parameters(), lr=0.1), pyco.blocks.by_module(model))
    opt.step(make_closure(model, x, y))
    make_closure(twin, x, y)()  # one forward in train mode
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.equal(a, b)


def test_each_state_advances_once_and_grads_are_the_gradient_at_theta():
    model = mlp()
    x, y = batch(8)
    closure = make_closure(model, x, y)
    probe = copy.deepcopy(model)
    make_closure(probe, x, y)()
    opt = pyco.Coupled(torch.optim.Adam(model.parameters(), lr=0.01), pyco.blocks.by_module(model))
    opt.step(closure)
    for p, q in zip(model.parameters(), probe.parameters()):
        assert opt.optimizer.state[p]["step"].item() == 1
        assert torch.equal(p.grad, q.grad)


class RaiseOnCall:
    """A closure that raises on its n-th call (the probe's re-evaluation is call 2)."""

    def __init__(self, closure, n):
        self.closure, self.n, self.calls = closure, n, 0

    def __call__(self):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("boom")
        return self.closure()


@pytest.mark.parametrize("n", [1, 2])
def test_a_raising_closure_rolls_everything_back(n):
    model = mlp((3, 5, 4, 2), batchnorm=True, dropout=0.2)
    x, y = batch(8)
    opt = pyco.Coupled(torch.optim.Adam(model.parameters(), lr=0.01), pyco.blocks.by_module(model), every=1)
    opt.step(make_closure(model, x, y))
    twin, twin_state = copy.deepcopy(model), copy.deepcopy(opt.optimizer.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    alpha, outcomes = opt.last_alpha, dict(opt.outcomes)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(RaiseOnCall(make_closure(model, x, y), n))
    assert max_difference(model, twin) == 0.0
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng)
    assert opt.last_alpha == alpha and opt.outcomes == outcomes and opt.steps == 1
    # the optimizer state is as before: the next step equals a step from the saved state
    other_model = copy.deepcopy(twin)
    other = pyco.Coupled(torch.optim.Adam(other_model.parameters(), lr=0.01), pyco.blocks.by_module(other_model))
    other.optimizer.load_state_dict(twin_state)
    other.steps = 1
    torch.set_rng_state(rng)
    opt.step(make_closure(model, x, y))
    torch.set_rng_state(rng)
    other.step(make_closure(other_model, x, y))
    assert max_difference(model, other_model) == 0.0


def test_pyco_and_torch_inner_optimizers_agree():
    a, b = LeastSquares(12), LeastSquares(12)
    one = pyco.Coupled(torch.optim.Adam(a.params, lr=0.05), a.blocks)
    two = pyco.Coupled(pyco.optim.Adam(b.params, lr=0.05), b.blocks)
    for _ in range(5):
        one.step(a.closure)
        two.step(b.closure)
    assert all(torch.allclose(p, q, rtol=1e-9, atol=1e-12) for p, q in zip(a.params, b.params))


def test_float64_probe_of_a_float32_model():
    model = mlp(dtype=torch.float32)
    x, y = batch(8, dtype=torch.float32)
    opt = pyco.Coupled(torch.optim.SGD(model.parameters(), lr=0.1), pyco.blocks.by_module(model),
                       dtype=torch.float64)
    opt.step(make_closure(model, x, y))
    assert opt.last_report.dtype == "float64"
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---- errors -----------------------------------------------------------------------------------------------------

def test_step_without_closure_is_an_error():
    ls = LeastSquares(13)
    opt = pyco.Coupled(torch.optim.SGD(ls.params, lr=0.1), ls.blocks)
    with pytest.raises(RuntimeError, match="Coupled.step needs a closure"):
        opt.step()
    assert opt.steps == 0


@pytest.mark.parametrize("kwargs, error, message", [
    ({"trust": -1.0}, ValueError, "Invalid trust: -1.0"),
    ({"trust": float("inf")}, ValueError, "Invalid trust"),
    ({"trust": True}, ValueError, "Invalid trust"),
    ({"damping": -0.1}, ValueError, "Invalid damping"),
    ({"every": 0}, ValueError, "Invalid every: 0"),
    ({"every": 1.5}, ValueError, "Invalid every"),
    ({"cross": 1}, TypeError, "Invalid cross"),
    ({"dtype": torch.int32}, ValueError, "Invalid dtype"),
    ({"indefinite": "clip"}, ValueError, "Invalid indefinite: 'clip'"),
])
def test_invalid_options(kwargs, error, message):
    ls = LeastSquares(14)
    with pytest.raises(error, match=message):
        pyco.Coupled(torch.optim.SGD(ls.params, lr=0.1), ls.blocks, **kwargs)


def test_frozen_parameters_in_the_blocks_are_refused():
    ls = LeastSquares(15)
    ls.params[1].requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        pyco.Coupled(torch.optim.SGD(ls.params, lr=0.1), ls.blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the same step on the GPU)")
def test_the_step_on_a_gpu_equals_the_cpu_step():
    cpu, gpu = LeastSquares(16), LeastSquares(16)
    gpu.a, gpu.y = gpu.a.cuda(), gpu.y.cuda()
    gpu.params = [nn.Parameter(p.detach().cuda()) for p in gpu.params]
    gpu.blocks = {f"b{i}": [p] for i, p in enumerate(gpu.params)}
    one = pyco.Coupled(torch.optim.Adam(cpu.params, lr=0.1), cpu.blocks, trust=None)
    two = pyco.Coupled(torch.optim.Adam(gpu.params, lr=0.1), gpu.blocks, trust=None)
    for _ in range(3):
        one.step(cpu.closure)
        two.step(gpu.closure)
        assert one.last_outcome == two.last_outcome
    for p, q in zip(cpu.params, gpu.params):
        assert torch.allclose(p, q.cpu(), rtol=1e-9, atol=1e-12)


def test_last_stats_are_the_proposals_and_survive_a_raising_step():
    model = mlp()
    x, y = batch(8)
    opt = pyco.Coupled(pyco.optim.Adam(model.parameters(), lr=0.01), pyco.blocks.by_module(model))
    opt.step(make_closure(model, x, y))
    stats = opt.last_stats
    assert stats is not None and list(stats.names) == list(opt.blocks.names)
    assert bool((stats.values[:, 0] > 0).all())  # Σg² of every block: each had a gradient
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(RaiseOnCall(make_closure(model, x, y), 2))
    assert opt.last_stats is stats
