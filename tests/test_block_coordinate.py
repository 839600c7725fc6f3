"""pyco.BlockCoordinate: exactly the active blocks move, inactive blocks are frozen for the backward, the
schedules, switching every K steps, always-on blocks, and the keep/reset state policy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyco
from pyco.blocks import by_module
from _orders_common import OPTIMIZERS, batch, clone_values, make_closure, mlp, moved_blocks

WIDTHS = (3, 5, 5, 4, 2)  # by_module: blocks "0", "2", "4", "6"

# (schedule and keywords, active blocks of steps 0..5)
SCHEDULES = [
    ("cyclic", {}, [["0"], ["2"], ["4"], ["6"], ["0"], ["2"]]),
    ("cyclic-descending", {}, [["6"], ["4"], ["2"], ["0"], ["6"], ["4"]]),
    ("cyclic", {"active": 2}, [["0", "2"], ["4", "6"], ["0", "2"], ["4", "6"], ["0", "2"], ["4", "6"]]),
    ("cyclic", {"active": 3}, [["0", "2", "4"], ["0", "2", "6"], ["0", "4", "6"], ["2", "4", "6"],
                               ["0", "2", "4"], ["0", "2", "6"]]),
    ("cyclic", {"every": 2}, [["0"], ["0"], ["2"], ["2"], ["4"], ["4"]]),
    ("cyclic", {"always": ["6"]}, [["0", "6"], ["2", "6"], ["4", "6"], ["0", "6"], ["2", "6"], ["4", "6"]]),
    ("cyclic-descending", {"always": ["0"], "every": 3}, [["0", "6"]] * 3 + [["0", "4"]] * 3),
    ("random-subset", {"active": 0, "always": ["2"]}, [["2"]] * 6),
]


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("schedule, kw, expected", SCHEDULES, ids=[f"{s}-{kw}" for s, kw, _ in SCHEDULES])
def test_exactly_the_scheduled_blocks_move(schedule, kw, expected, kind):
    model = mlp(WIDTHS)
    x, y = batch()
    blocks = by_module(model)
    opt = pyco.BlockCoordinate(OPTIMIZERS[kind](model.parameters()), blocks, schedule, **kw)
    log: list[set[str]] = []
    for step, active in enumerate(expected):
        before = clone_values(model)
        opt.step(make_closure(model, x, y, log=log))
        assert list(opt.active_blocks) == active, f"step {step}"
        assert moved_blocks(blocks, model, before) == set(active), f"step {step}"
        # while the closure ran only the active blocks required grad; afterwards every flag is back
        assert log[-1] == {n for n, _ in model.named_parameters() if n.split(".")[0] in active}
        assert all(p.requires_grad for p in model.parameters())
        if opt.last_stats is not None:  # pyco's kernels: statistics rows of inactive blocks are zero
            assert [b for b in blocks if opt.last_stats[b]["update_sq"] > 0] == active


def test_backward_stops_below_the_lowest_active_block():
    model = mlp(WIDTHS)
    x, y = batch()
    reached: list[set[str]] = []  # per step: the Linear layers whose output the backward reached

    def watch(name):
        def hook(module, inputs, output):
            if output.requires_grad:  # False: the layer is not even in the graph
                output.register_hook(lambda grad: reached[-1].add(name))
        return hook

    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(watch(name))
    opt = pyco.BlockCoordinate(torch.optim.SGD(model.parameters(), lr=0.1), by_module(model), "cyclic-descending")
    for lowest in ("6", "4", "2", "0"):
        reached.append(set())
        opt.step(make_closure(model, x, y))
        assert reached[-1] == {n for n in ("0", "2", "4", "6") if int(n) >= int(lowest)}
        # no weight gradient for the inactive blocks
        assert [n for n, p in model.named_parameters() if p.grad is not None] == [f"{lowest}.weight", f"{lowest}.bias"]


def test_requires_grad_is_restored_when_the_closure_raises():
    model = mlp(WIDTHS)
    model[2].bias.requires_grad_(False)  # a user's own choice is restored as it was
    opt = pyco.BlockCoordinate(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                               by_module(model))

    def closure():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        opt.step(closure)
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False, True, True, True, True]


@pytest.mark.parametrize("active", [1, 3])
def test_reshuffle_visits_every_block_once_per_epoch(active):
    model = mlp(WIDTHS)
    x, y = batch()
    runs = []
    for _ in range(2):
        opt = pyco.BlockCoordinate(torch.optim.SGD(model.parameters(), lr=0.01), by_module(model), "reshuffle",
                                   active=active, seed=11)
        sequence = []
        for _ in range(8):
            opt.step(make_closure(model, x, y))
            sequence.append(opt.active_blocks)
        runs.append(sequence)
    assert runs[0] == runs[1]  # seeded
    assert all(len(s) == active for s in runs[0])
    if active == 1:
        for epoch in (runs[0][:4], runs[0][4:]):
            assert sorted(b for s in epoch for b in s) == ["0", "2", "4", "6"]
    else:  # 4 blocks, 3 at a time: the second window of each epoch holds the last block plus two others
        assert set(runs[0][0]) | set(runs[0][1]) == {"0", "2", "4", "6"}


def test_random_subset_draws_distinct_blocks_reproducibly():
    model = mlp(WIDTHS)
    x, y = batch()
    draws = []
    for seed in (4, 4):
        opt = pyco.BlockCoordinate(torch.optim.SGD(model.parameters(), lr=0.01), by_module(model), "random-subset",
                                   active=2, seed=seed)
        for _ in range(20):
            opt.step(make_closure(model, x, y))
            draws.append(opt.active_blocks)
    assert draws[:20] == draws[20:]
    assert all(len(set(d)) == 2 for d in draws) and {b for d in draws for b in d} == {"0", "2", "4", "6"}


def test_greedy_picks_the_largest_gradient_norm_with_all_gradients():
    # L = Σ_b s_b ‖w_b − 1‖²: ‖g_b‖ = 2 s_b ‖w_b − 1‖, block "1" largest first; exact steps (lr = 1/(2 s_b)) zero
    # a block's gradient, so the next step picks the next largest.
    scales = [1.0, 100.0, 10.0, 0.1]
    weights = nn.ParameterList([nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in scales])
    inner = torch.optim.SGD([{"params": [w], "lr": 0.5 / s, "name": str(i)} for i, (w, s) in
                             enumerate(zip(weights, scales))])
    opt = pyco.BlockCoordinate(inner, None, "greedy", every=2)
    log = []

    def closure():
        log.append([w.requires_grad for w in weights])
        inner.zero_grad()
        loss = sum(s * (w - 1).square().sum() for w, s in zip(weights, scales))
        loss.backward()
        return loss

    picks = []
    for _ in range(6):
        opt.step(closure)
        picks.append(opt.active_blocks)
    assert picks == [("1",), ("1",), ("2",), ("2",), ("0",), ("0",)]
    # switching steps see every gradient; the steps in between freeze the inactive blocks
    assert log[0] == [True] * 4 and log[1] == [False, True, False, False] and log[2] == [True] * 4


@pytest.mark.parametrize("kind", ["torch.Adam", "pyco.Adam"])
@pytest.mark.parametrize("policy, steps_of_first_block", [("keep", [1, 1, 2]), ("reset", [1, None, 1])])
def test_state_policy(kind, policy, steps_of_first_block):
    model = mlp((3, 4, 2))  # blocks "0" and "2", alternating
    x, y = batch()
    inner = OPTIMIZERS[kind](model.parameters())
    opt = pyco.BlockCoordinate(inner, by_module(model), state=policy)
    for expected in steps_of_first_block:
        opt.step(make_closure(model, x, y))
        entry = inner.state.get(model[0].weight)
        assert (entry["step"].item() if entry else None) == expected


def test_reset_drops_state_of_blocks_inactive_at_the_first_step():
    model = mlp((3, 4, 2))
    x, y = batch()
    inner = torch.optim.Adam(model.parameters())
    inner.step(make_closure(model, x, y))  # every block has state before wrapping
    pyco.BlockCoordinate(inner, by_module(model), state="reset").step(make_closure(model, x, y))
    assert inner.state[model[0].weight]["step"].item() == 2 and model[2].weight not in inner.state


def test_without_closure_the_existing_gradients_of_active_blocks_are_used():
    model = mlp(WIDTHS)
    x, y = batch()
    make_closure(model, x, y)()  # every block has a gradient
    before = clone_values(model)
    blocks = by_module(model)
    opt = pyco.BlockCoordinate(torch.optim.SGD(model.parameters(), lr=0.1), blocks, always=["4"], active=0)
    assert opt.step() is None
    assert moved_blocks(blocks, model, before) == {"4"}
    assert model[0].weight.grad is not None  # the hidden gradients are put back


class DecayEverything(torch.optim.Optimizer):
    """Weight decay on every parameter, gradient or not (in place, or through .data as old code does, which
    bypasses the version counter): breaks block-coordinate steps."""

    def __init__(self, params, through_data=False):
        super().__init__(params, {})
        self.through_data = through_data

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                (p.data if self.through_data else p).mul_(0.9)


@pytest.mark.parametrize("through_data", [False, True])
def test_an_inactive_block_that_moves_is_an_error(through_data):
    model = mlp(WIDTHS)
    opt = pyco.BlockCoordinate(DecayEverything(model.parameters(), through_data), by_module(model))
    with pytest.raises(RuntimeError, match=r"block '2' is inactive at step 0 but DecayEverything changed its param "
                                           r"2\.weight: the optimizer updates parameters whose \.grad is None"):
        opt.step(make_closure(model, *batch()))
    quiet = pyco.BlockCoordinate(DecayEverything(model.parameters()), by_module(model), verify=False)
    quiet.step(make_closure(model, *batch()))


def test_an_active_block_without_gradient_is_an_error():
    model = mlp(WIDTHS)
    x, y = batch()
    opt = pyco.BlockCoordinate(torch.optim.SGD(model.parameters(), lr=0.1), by_module(model))
    with pytest.raises(RuntimeError, match=r"block '0' is active at step 0 but none of its parameters \(param "
                                           r"0\.weight, \.\.\.\) has a gradient"):
        opt.step(lambda: nn.functional.mse_loss(model(x), y))  # forgot backward


@pytest.mark.parametrize("kw, message", [
    ({"schedule": "sometimes"}, r"Invalid schedule: 'sometimes'"),
    ({"active": 5}, r"Invalid active: 5 \(expected an int, 0 <= active <= 4"),
    ({"active": 4, "always": ["0"]}, r"0 <= active <= 3"),
    ({"active": 0}, r"active=0 with no always blocks would update nothing"),
    ({"every": 0}, r"Invalid every: 0"),
    ({"always": ["9"]}, r"Invalid always: \['9'\]"),
    ({"state": "forget"}, r"Invalid state: 'forget' \(expected one of \('keep', 'reset'\)\)"),
])
def test_invalid_arguments(kw, message):
    model = mlp(WIDTHS)
    with pytest.raises(ValueError, match=message):
        pyco.BlockCoordinate(torch.optim.SGD(model.parameters(), lr=0.1), by_module(model), **kw)
