"""pyco.GaussSeidel, and what every order wrapper shares (behaving as the inner optimizer, checkpoints, lr
schedulers, errors). Each test states the piece it pins down."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyco
from pyco.blocks import Blocks, by_group, by_module
from _orders_common import OPTIMIZERS, TWINS, batch, make_closure, max_difference, mlp

SGD_KINDS = {"torch.SGD": torch.optim.SGD, "pyco.SGD": pyco.optim.SGD}


# ---- a 2-block quadratic, by hand ------------------------------------------------------------------------
# L(x, y) = ½·2x² + ½·3y² + x·y − x,  g_x = 2x + y − 1,  g_y = 3y + x;  x0 = 0.5, y0 = −1, lr 0.1, plain SGD.
# backward sweep (y, then x at the new y): g_y = −2.5 → y1 = −0.75; g_x(0.5, −0.75) = −0.75 → x1 = 0.575
# forward sweep (x, then y at the new x):  g_x = −1 → x1 = 0.6;     g_y(0.6, −1) = −2.4 → y1 = −0.76
# L(x0, y0) = 0.25 + 1.5 − 0.5 − 0.5 = 0.75
QUADRATIC_SWEEPS = [
    # sweep, (x1, y1), gradient each block was updated with (g_x, g_y)
    ("backward", (0.575, -0.75), (-0.75, -2.5)),
    (["y", "x"], (0.575, -0.75), (-0.75, -2.5)),
    ("forward", (0.6, -0.76), (-1.0, -2.4)),
    (["x", "y"], (0.6, -0.76), (-1.0, -2.4)),
]


def quadratic():
    x = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    y = nn.Parameter(torch.tensor([-1.0], dtype=torch.float64))

    def closure():
        loss = (x * x + 1.5 * y * y + x * y - x).sum()
        loss.backward()
        return loss

    return x, y, closure


@pytest.mark.parametrize("kind", SGD_KINDS)
@pytest.mark.parametrize("sweep, expected, used", QUADRATIC_SWEEPS, ids=lambda v: str(v))
def test_quadratic_two_blocks_by_hand(kind, sweep, expected, used):
    x, y, closure = quadratic()
    opt = pyco.GaussSeidel(SGD_KINDS[kind]([x, y], lr=0.1), {"x": [x], "y": [y]}, sweep)
    loss = opt.step(closure)
    assert loss.item() == pytest.approx(0.75, abs=1e-15)
    assert (x.item(), y.item()) == pytest.approx(expected, abs=1e-15)
    # each parameter keeps the gradient its block was updated with
    assert (x.grad.item(), y.grad.item()) == pytest.approx(used, abs=1e-15)


# ---- block Gauss–Seidel on least squares ---------------------------------------------------------------------

class ExactBlockStep(torch.optim.Optimizer):
    """θ_b ← θ_b − H_bb⁻¹ g_b with the block's own Hessian in its param group: on a quadratic, the exact
    minimizer over block b with the other blocks fixed."""

    def __init__(self, groups):
        super().__init__(groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p -= group["inverse_hessian"] @ p.grad
        return None


def least_squares(n=20, sizes=(3, 2, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, sum(sizes), generator=gen, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    return a, b, list(torch.split(torch.arange(sum(sizes)), list(sizes)))


def classic_block_gauss_seidel(a, b, slices, order, sweeps):
    """The textbook iteration on the normal equations M θ = c (M = AᵀA, c = Aᵀb): for each block i in turn,
    θ_i ← M_ii⁻¹ (c_i − Σ_{j≠i} M_ij θ_j) with the newest θ_j."""
    m, c = a.T @ a, a.T @ b
    theta = torch.zeros(a.shape[1], dtype=torch.float64)
    for _ in range(sweeps):
        for i in order:
            s = slices[i]
            rest = c[s] - m[s] @ theta + m[s][:, s] @ theta[s]
            theta[s] = torch.linalg.solve(m[s][:, s], rest)
    return theta


@pytest.mark.parametrize("sweep, order", [("forward", [0, 1, 2]), ("backward", [2, 1, 0]),
                                          (["b1", "b0", "b2"], [1, 0, 2])])
def test_exact_block_steps_reproduce_classic_block_gauss_seidel(sweep, order):
    a, b, slices = least_squares()
    theta = [nn.Parameter(torch.zeros(len(s), dtype=torch.float64)) for s in slices]
    m = a.T @ a
    groups = [{"params": [t], "name": f"b{i}", "inverse_hessian": torch.linalg.inv(m[s][:, s])}
              for i, (t, s) in enumerate(zip(theta, slices))]
    inner = ExactBlockStep(groups)
    opt = pyco.GaussSeidel(inner, by_group(inner), sweep)

    def closure():
        loss = 0.5 * (a @ torch.cat(theta) - b).square().sum()
        loss.backward()
        return loss

    for sweeps in range(1, 6):
        opt.step(closure)
        expected = classic_block_gauss_seidel(a, b, slices, order, sweeps)
        torch.testing.assert_close(torch.cat(theta).detach(), expected, rtol=1e-12, atol=1e-12)
    solution = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
    first = (classic_block_gauss_seidel(a, b, slices, order, 1) - solution).norm()
    assert (torch.cat(theta).detach() - solution).norm() < first  # and it converges


# ---- same batch: dropout masks, batch-norm statistics, optimizer state ------------------------------------------

def masked_twin(model: nn.Sequential, mask: torch.Tensor) -> nn.Module:
    """The dropout model with its one Dropout replaced by multiplication with a fixed mask."""
    fixed = copy.deepcopy(model)

    class FixedMask(nn.Module):
        def forward(self, h):
            return h * mask

    index = next(i for i, m in enumerate(fixed) if isinstance(m, nn.Dropout))
    fixed[index] = FixedMask()
    return fixed


@pytest.mark.parametrize("sweep", ["backward", "forward", "random"])
def test_dropout_masks_are_replayed_and_rng_left_as_one_evaluation(sweep):
    model = mlp((3, 6, 2), dropout=0.5)
    x, y = batch()
    torch.manual_seed(7)
    mask = nn.functional.dropout(torch.ones(8, 6, dtype=torch.float64), 0.5)  # the draw the Dropout will make
    after_one_evaluation = torch.get_rng_state()
    reference = masked_twin(model, mask)
    ref_opt = pyco.GaussSeidel(torch.optim.SGD(reference.parameters(), lr=0.1), by_module(reference), sweep)
    ref_opt.step(make_closure(reference, x, y))

    opt = pyco.GaussSeidel(torch.optim.SGD(model.parameters(), lr=0.1), by_module(model), sweep)
    torch.manual_seed(7)
    opt.step(make_closure(model, x, y))
    assert torch.equal(torch.get_rng_state(), after_one_evaluation)
    assert max_difference(model, reference) < 1e-15


@pytest.mark.parametrize("sweep", ["backward", "forward"])
def test_batchnorm_statistics_advance_once_per_step(sweep):
    model = mlp((3, 6, 5, 2), batchnorm=True)
    x, y = batch()
    once = copy.deepcopy(model)
    once(x)  # one training-mode forward at the parameters before the step
    opt = pyco.GaussSeidel(torch.optim.SGD(model.parameters(), lr=0.5), by_module(model), sweep)
    opt.step(make_closure(model, x, y))
    for (name, got), expected in zip(model.named_buffers(), once.buffers()):
        assert torch.equal(got, expected), name
    assert int(model[1].num_batches_tracked) == 1


class CountingScale(nn.Module):
    """Multiplies by the number of times it ran: an output that depends on a buffer the forward changes."""

    def __init__(self, counting: bool = True):
        super().__init__()
        self.counting = counting
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, h):
        if not self.counting:
            return h
        self.calls += 1
        return h * self.calls


@pytest.mark.parametrize("order", ["GaussSeidel", "ChainGaussSeidel"])
@pytest.mark.parametrize("sweep", ["backward", "forward"])
def test_every_recomputation_sees_the_buffers_of_the_first_evaluation(order, sweep):
    # Every evaluation within a step sees calls = 0 before it runs, so the scale is 1 throughout: the same
    # update as a model without the buffer; and the step advances the buffer once.
    x, y = batch()

    def run(counting):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), CountingScale(counting), nn.Tanh(), nn.Linear(4, 2)).double()
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        if order == "GaussSeidel":
            pyco.GaussSeidel(inner, by_module(model), sweep).step(make_closure(model, x, y))
        else:
            pyco.ChainGaussSeidel(inner, model, nn.functional.mse_loss, sweep=sweep).step(x, y)
        return model

    counted, plain = run(True), run(False)
    assert counted[1].calls.item() == 1
    assert all(torch.equal(a, b) for a, b in zip(counted.parameters(), plain.parameters()))


@pytest.mark.parametrize("kind", ["torch.Adam", "pyco.Adam", "pyco.AdamW"])
def test_each_block_state_advances_once_per_step(kind):
    model = mlp()
    x, y = batch()
    opt = pyco.GaussSeidel(OPTIMIZERS[kind](model.parameters()), by_module(model), "random")
    for _ in range(3):
        opt.step(make_closure(model, x, y))
    assert {opt.state[p]["step"].item() for p in model.parameters()} == {3.0}


@pytest.mark.parametrize("torch_kind, pyco_kind", TWINS)
def test_pyco_and_torch_inner_optimizers_agree(torch_kind, pyco_kind):
    a = mlp()
    b = copy.deepcopy(a)
    x, y = batch()
    opt_a = pyco.GaussSeidel(OPTIMIZERS[torch_kind](a.parameters()), by_module(a), "backward")
    opt_b = pyco.GaussSeidel(OPTIMIZERS[pyco_kind](b.parameters()), by_module(b), "backward")
    for _ in range(4):
        opt_a.step(make_closure(a, x, y))
        opt_b.step(make_closure(b, x, y))
    assert max_difference(a, b) < 1e-12
    assert opt_a.last_stats is None


def test_statistics_of_a_sweep_are_per_block():
    model = mlp()
    x, y = batch()
    blocks = by_module(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = pyco.GaussSeidel(pyco.optim.SGD(model.parameters(), lr=0.1), blocks)
    opt.step(make_closure(model, x, y))
    names = {id(p): n for n, p in model.named_parameters()}
    moved = [sum(float((p.detach() - before[names[id(p)]]).square().sum()) for p in blocks[b]) for b in blocks]
    assert opt.last_stats.names == blocks.names
    torch.testing.assert_close(opt.last_stats.update_sq, torch.tensor(moved, dtype=torch.float64), rtol=1e-12, atol=0)


def test_one_block_is_the_inner_step():
    a = mlp()
    b = copy.deepcopy(a)
    x, y = batch()
    opt = pyco.GaussSeidel(torch.optim.Adam(a.parameters(), lr=0.01), {"all": list(a.parameters())})
    plain = torch.optim.Adam(b.parameters(), lr=0.01)
    for _ in range(3):
        opt.step(make_closure(a, x, y))
        plain.step(make_closure(b, x, y))
    assert max_difference(a, b) == 0.0


# ---- errors ----------------------------------------------------------------------------------------------------

def test_step_without_closure_is_an_error():
    model = mlp()
    opt = pyco.GaussSeidel(torch.optim.SGD(model.parameters(), lr=0.1), by_module(model))
    with pytest.raises(RuntimeError, match=r"GaussSeidel\.step needs a closure.*opt\.step\(closure\)"):
        opt.step()


@pytest.mark.parametrize("returns, error, message", [
    (lambda loss: None, TypeError, r"closure returned NoneType; it must compute the gradients"),
    (lambda loss: torch.stack([loss, loss]), ValueError, r"tensor of shape \[2\]; it must return the loss, a scalar"),
])
def test_closure_must_return_the_loss(returns, error, message):
    model = mlp()
    x, y = batch()
    opt = pyco.GaussSeidel(torch.optim.SGD(model.parameters(), lr=0.1), by_module(model))

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return returns(loss)

    with pytest.raises(error, match=message):
        opt.step(closure)


def blocks_with_stranger(model):
    return Blocks([*by_module(model).items(), ("stranger", [nn.Parameter(torch.zeros(2))])])


def blocks_missing_last(model):
    return Blocks(list(by_module(model).items())[:-1], {id(p): n for n, p in model.named_parameters()})


# (what, make blocks from model, error, message)
BLOCK_ERRORS = [
    ("foreign parameter", blocks_with_stranger, ValueError,
     r"block 'stranger' holds a parameter of shape \[2\], which is not a parameter of the optimizer \(SGD\)"),
    ("uncovered parameter", blocks_missing_last, ValueError,
     r"2 more|of the optimizer \(SGD\) in no block: every parameter needs exactly one block"),
    ("overlap", lambda m: {"a": list(m[0].parameters()), "b": [m[0].weight, *m[2].parameters()]}, ValueError,
     r"blocks 'a' and 'b' overlap"),
    ("empty block", lambda m: {**by_module(m), "empty": []}, ValueError, r"block 'empty' holds no parameters"),
]


@pytest.mark.parametrize("order", ["GaussSeidel", "BlockCoordinate"])
@pytest.mark.parametrize("what, make_blocks, error, message", BLOCK_ERRORS, ids=[e[0] for e in BLOCK_ERRORS])
def test_blocks_must_partition_the_optimizers_parameters(order, what, make_blocks, error, message):
    model = mlp()
    with pytest.raises(error, match=message):
        getattr(pyco, order)(torch.optim.SGD(model.parameters(), lr=0.1), make_blocks(model))


@pytest.mark.parametrize("sweep, message", [
    ("sideways", r"Invalid sweep: 'sideways'"),
    (["0", "2"], r"missing \['4'\]"),
    (["0", "2", "4", "4"], r"repeated \['4'\]"),
    (["0", "2", "9"], r"unknown \['9'\]"),
])
def test_invalid_sweeps(sweep, message):
    model = mlp()
    with pytest.raises(ValueError, match=message):
        pyco.GaussSeidel(torch.optim.SGD(model.parameters(), lr=0.1), by_module(model), sweep)


def test_wraps_only_optimizers():
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"wraps a torch\.optim\.Optimizer, got Sequential"):
        pyco.GaussSeidel(model, by_module(model))
    with pytest.raises(TypeError, match=r"cannot wrap another order"):
        pyco.BlockCoordinate(pyco.GaussSeidel(inner, by_module(model)), by_module(model))
    with pytest.raises(NotImplementedError, match=r"blocks are fixed at construction"):
        pyco.GaussSeidel(inner, by_module(model)).add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


# ---- behaving as the inner optimizer: checkpoints and lr schedulers, for every order --------------------------

def gauss_seidel(model, inner):
    return pyco.GaussSeidel(inner, by_module(model), "random", seed=3)


def chain(model, inner):
    return pyco.ChainGaussSeidel(inner, model, nn.functional.mse_loss, sweep="random", seed=3)


def block_coordinate(schedule, always_last=False, **kw):
    def make(model, inner):
        blocks = by_module(model)
        always = [blocks.names[-1]] if always_last else []
        return pyco.BlockCoordinate(inner, blocks, schedule, seed=5, always=always, **kw)

    return make


WRAPPERS = {
    "GaussSeidel-random": gauss_seidel,
    "BlockCoordinate-cyclic": block_coordinate("cyclic"),
    "ChainGaussSeidel-random": chain,
    "BlockCoordinate-reshuffle": block_coordinate("reshuffle", active=2),
    "BlockCoordinate-random-subset-reset": block_coordinate("random-subset", state="reset"),
    "BlockCoordinate-greedy-every-2": block_coordinate("greedy", every=2),
    "BlockCoordinate-cyclic-every-3-always": block_coordinate("cyclic", every=3, always_last=True),
    "Coupled-every-2": lambda model, inner: pyco.Coupled(inner, by_module(model), every=2),
}


def step(opt, model, x, y):
    if isinstance(opt, pyco.ChainGaussSeidel):
        return opt.step(x, y)
    return opt.step(make_closure(model, x, y))


@pytest.mark.parametrize("kind", ["torch.Adam", "pyco.AdamW"])
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_state_dict_round_trip_continues_identically(wrapper, kind):
    x, y = batch()
    model = mlp((3, 5, 4, 4, 2), dropout=0.2)
    opt = WRAPPERS[wrapper](model, OPTIMIZERS[kind](model.parameters()))
    for _ in range(5):  # mid-epoch, mid-period: every piece of the order's state matters
        step(opt, model, x, y)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    for _ in range(5):
        step(opt, model, x, y)

    resumed = mlp((3, 5, 4, 4, 2), dropout=0.2, seed=99)
    resumed.load_state_dict(saved_model)
    other = WRAPPERS[wrapper](resumed, OPTIMIZERS[kind](resumed.parameters()))
    other.load_state_dict(saved)
    torch.set_rng_state(rng)
    for _ in range(5):
        step(other, resumed, x, y)
    assert max_difference(model, resumed) == 0.0
    assert other.steps == opt.steps == 10


def test_state_dict_keeps_the_inner_layout_and_checks_the_order():
    model = mlp()
    opt = pyco.GaussSeidel(torch.optim.Adam(model.parameters()), by_module(model), "random")
    opt.step(make_closure(model, *batch()))
    saved = opt.state_dict()
    assert saved["pyco_order"]["order"] == "GaussSeidel" and saved["pyco_order"]["steps"] == 1
    bare = torch.optim.Adam(model.parameters())
    bare.load_state_dict(saved)  # the inner optimizer's own layout: it loads into the bare optimizer
    assert bare.state[model[0].weight]["step"].item() == 1
    with pytest.raises(ValueError, match=r"no 'pyco_order' entry.*\.optimizer\.load_state_dict"):
        opt.load_state_dict(bare.state_dict())
    other = pyco.BlockCoordinate(torch.optim.Adam(model.parameters()), by_module(model))
    with pytest.raises(ValueError, match=r"saved by GaussSeidel .* this is BlockCoordinate"):
        other.load_state_dict(saved)


@pytest.mark.parametrize("wrapper", ["GaussSeidel-random", "ChainGaussSeidel-random", "BlockCoordinate-cyclic"])
@pytest.mark.parametrize("kind", ["torch.SGD", "pyco.SGD"])
def test_lr_scheduler_through_the_wrapper(wrapper, kind):
    # A linear loss has a constant gradient c = ∂L/∂θ, so plain SGD moves θ by exactly −lr·c: the update shows
    # the learning rate each step used.
    model = nn.Sequential(nn.Linear(3, 1, bias=False)).double()
    x = torch.ones(1, 3, dtype=torch.float64)
    inner = SGD_KINDS[kind](model.parameters(), lr=1.0)
    opt = WRAPPERS[wrapper](model, inner)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    linear = lambda out, _: out.sum()  # noqa: E731
    for expected_lr in (1.0, 0.5, 0.25):
        before = model[0].weight.detach().clone()
        if isinstance(opt, pyco.ChainGaussSeidel):
            opt.loss_fn = linear
            opt.step(x, None)
        else:
            opt.step(make_closure(model, x, None, linear))
        expected = torch.full((1, 3), -expected_lr, dtype=torch.float64)
        torch.testing.assert_close(model[0].weight.detach() - before, expected)
        scheduler.step()
    assert inner.param_groups[0]["lr"] == 0.125 and opt.param_groups is inner.param_groups


@pytest.mark.parametrize("wrapper", ["GaussSeidel-random", "ChainGaussSeidel-random", "BlockCoordinate-cyclic",
                                     "Coupled-every-2"])
def test_step_hooks_and_delegation(wrapper):
    model = mlp()
    x, y = batch()
    inner = torch.optim.Adam(model.parameters())
    opt = WRAPPERS[wrapper](model, inner)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    step(opt, model, x, y)
    assert calls == ["pre", "post"]
    assert opt.state is inner.state and opt.defaults is inner.defaults and opt.param_groups is inner.param_groups
    assert repr(opt).startswith(f"{type(opt).__name__}(Adam (")
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
