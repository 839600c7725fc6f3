"""The orders study: its flip counter and frozen pattern on hand-made cases, the probe's Gauss–Seidel gap on a
smooth network against real sweeps, the compute accounting, and the results' schema on a tiny run."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from pyco.studies import load_workload, orders  # noqa: E402
from pyco.studies.intervals import Summary  # noqa: E402


def hand_made():
    """z_ij = x_i + b_j for x = (0.5, 1.5, 2.5) and b = (0, -1, -2): signs [[+,-,-], [+,+,-], [+,+,+]]."""
    lin = nn.Linear(1, 3).double()
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.copy_(torch.tensor([0.0, -1.0, -2.0]))
    return nn.Sequential(lin, nn.ReLU()), torch.tensor([[0.5], [1.5], [2.5]], dtype=torch.float64)


def test_flip_counter_counts_sign_changes_on_a_hand_made_case():
    model, x = hand_made()
    relu = model[1]
    with orders.PreActivations([relu]) as rec:
        model(x)
        before = rec.take()
        with torch.no_grad():
            model[0].bias.sub_(1.0)  # b = (-1, -2, -3): the diagonal entries (0.5, 0.5, 0.5) become -0.5
        model(x)
        after = rec.take()
    assert [b.tolist() for b in before] == [[[True, False, False], [True, True, False], [True, True, True]]]
    assert orders.flip_fraction(before, after) == pytest.approx(3 / 9)
    assert orders.flip_fraction(before, before) == 0.0
    with orders.PreActivations([relu]) as rec:  # hooks are gone outside the block
        pass
    model(x)
    assert rec.signs == []
    with pytest.raises(ValueError):
        orders.flip_fraction(before, [])


def test_frozen_pattern_keeps_the_start_point_mask():
    model, x = hand_made()
    with orders.PreActivations([model[1]]) as rec:
        start = model(x).detach()
        masks = rec.take()
    with orders.FrozenPattern([model[1]], masks):
        assert torch.equal(model(x), start)  # at the start point it is the ReLU network
        with torch.no_grad():
            model[0].bias.sub_(1.0)
        out = model(x)
    # the units that flipped negative keep their slope of 1: x_i + b_i = -0.5 on the diagonal
    assert out.diagonal().tolist() == [-0.5, -0.5, -0.5]
    assert torch.equal(model(x), torch.relu(model[0](x)))  # hooks removed on exit


def gap_errors(factory, lrs, seeds=(0, 1, 2), points=(0, 75, 150, 225), over=statistics.fmean, frozen=False):
    """Per lr, each seed's relative error of the predicted gap over the points and both sweeps (``over``: the
    mean, or the median as the study summarises it), along a run of the workload's recipe."""
    errors = {lr: [] for lr in lrs}
    for seed in seeds:
        workload = factory(seed)
        opt = workload.recipe.make(workload.model.parameters())
        batches = workload.batches()
        rows = []
        for step in range(points[-1] + 1):
            batch = next(batches)
            if step in points:
                rows += orders.point_gaps(workload, batch, lrs, freeze=frozen)
            opt.step(orders.closure_for(workload, opt, batch))
        for lr in lrs:
            errors[lr].append(over([e for r in rows if r["lr"] == lr
                                    for e in orders.relative_errors(r, frozen_pattern=frozen)]))
    return errors


def test_gelu_gap_prediction_within_5_percent_at_lr_0_01(threads):
    # a smooth network (GELU, the 3x32 digits MLP), float64: the second-order prediction against real sweeps
    threads(1)  # small models: one thread is faster, and a shared machine is not oversubscribed
    errors = gap_errors(load_workload("digits-mlp", activation="gelu"), (0.001, 0.01))
    assert max(errors[0.01]) < 0.05, errors
    assert max(errors[0.001]) < 0.01, errors
    # what is left is third order: the relative error grows like η (x10 here), not faster
    for small, large in zip(errors[0.001], errors[0.01]):
        assert 5 < large / small < 20, errors


def test_the_first_orders_set_up_reproduces_the_reviewed_gap_errors(threads):
    # nn.Linear's own initialisation, plain SGD at lr 0.1, points 0, 38, 75, 112 of 150 steps: the set-up an
    # outside review measured at lr 0.01 as 0.7% (GELU), 40.7% (ReLU) and 1.5% (ReLU, pattern frozen)
    threads(1)
    setup = dict(init="torch", lr=0.1, momentum=0.0)
    seeds, points = (0, 1, 2), (0, 38, 75, 112)
    gelu, relu = (load_workload("digits-mlp", activation=act, **setup) for act in ("gelu", "relu"))
    median = statistics.median
    gelu = gap_errors(gelu, (0.001, 0.01), seeds, points, median)
    frozen = gap_errors(relu, (0.01,), seeds, points, median, frozen=True)
    relu = gap_errors(relu, (0.01,), seeds, points, median)
    assert max(gelu[0.01]) < 0.02, gelu
    for small, large in zip(gelu[0.001], gelu[0.01]):  # third order: ∝ η
        assert 5 < large / small < 20, gelu
    assert min(relu[0.01]) > 0.2, relu  # the kink: ReLU misses by tens of percent ...
    assert max(frozen[0.01]) < 0.05, frozen  # ... and with its pattern frozen it does not


def test_the_headline_gap_error_is_each_seeds_median_with_the_mean_beside_it():
    def row(seed, step, fwd, bwd):
        return {"activation": "gelu", "lr": 0.01, "seed": seed, "step": step, "predicted_gap": 1.0,
                "measured_gap_forward": fwd, "measured_gap_backward": bwd, "first_order": -1.0,
                "simultaneous_dl": -1.0}

    # seed 1 has one point that misses by 300% on a sweep: it carries that seed's mean, not its median
    gaps = [row(0, 0, 1.01, 1.02), row(0, 50, 1.03, 1.04), row(1, 0, 1.01, 1.02), row(1, 50, 4.0, 1.02)]
    summary = Summary()
    orders.gap_summary(summary, gaps, {"activations": ["gelu"]}, (0, 1), (0.01,))
    median, mean = summary["gap_relative_error/gelu/lr=0.01"], summary["gap_relative_error_mean/gelu/lr=0.01"]
    assert median.mean == pytest.approx((0.025 + 0.02) / 2)
    assert mean.mean == pytest.approx((0.025 + (0.01 + 0.02 + 3.0 + 0.02) / 4) / 2)
    assert summary["gap_relative_error/gelu/lr=0.01/step=50"].mean == pytest.approx((0.035 + 1.51) / 2)


def test_measured_gap_matches_a_hand_written_sweep():
    workload = load_workload("digits-mlp", size="tiny", activation="gelu")(0)
    batch = next(workload.batches())
    row = orders.point_gaps(workload, batch, [0.01])[0]
    model = workload.model.double()
    x, y = batch[0].double(), batch[1]
    blocks = [list(m.parameters()) for m in model if list(m.parameters())]
    params = [p for b in blocks for p in b]
    loss = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    theta = [p.detach().clone() for p in params]
    g = torch.autograd.grad(loss(), params)
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.sub_(0.01 * gi)
        sim = loss().item()
        for p, t in zip(params, theta):
            p.copy_(t)
    for block in blocks:  # a forward sweep, gradients recomputed after each block moved
        gb = torch.autograd.grad(loss(), block)
        with torch.no_grad():
            for p, gi in zip(block, gb):
                p.sub_(0.01 * gi)
    with torch.no_grad():
        forward = loss().item()
    assert row["measured_gap_forward"] == pytest.approx(forward - sim, rel=1e-9, abs=1e-15)
    assert "measured_gap_frozen_forward" not in row and row["sign_changes"] >= 0  # no ReLU: nothing to freeze


SMALL = dict(steps=12, cost_repeats=3, gap_points=2, gap_lrs=(0.001, 0.01), lr_factors=(1.0, 3.0), checkpoints=4,
             wall_repeats=2, wall_steps=2, train_eval_batches=2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("orders")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = orders.run(load_workload("digits-mlp", size="tiny"), out=out, seed=1, **SMALL)
    finally:
        torch.set_num_threads(saved)
    return res, out


def test_schema_and_summary_names(tiny_run):
    res, _ = tiny_run
    summary = res["summary"]
    assert res["study"] == "orders" and "question 000" in res["question"] and res["partial"] is False
    assert res["config"]["seeds"] == [1, 2, 3]
    for act in ("relu", "gelu"):
        for lr in ("0.001", "0.01"):
            assert f"gap_relative_error/{act}/lr={lr}" in summary
            assert f"pattern_flips/{act}/lr={lr}" in summary
    assert "gap_relative_error/relu-frozen/lr=0.01" in summary
    for order in orders.ORDERS:
        for name in ("final_train_loss", "evals_to_target", "tuned_final_train_loss", "final_heldout_loss"):
            assert f"{name}/{order}" in summary
    for name, est in summary.items():
        assert set(est) == {"mean", "ci95", "n"} and est["n"] == 3, name
    # the measured fractions of a full evaluation: every single block and every pair of the 3 blocks
    fractions = {c["active"]: c for c in res["costs"]}
    assert set(fractions) == {"layer0", "layer1", "layer2", "layer0+layer1", "layer0+layer2", "layer1+layer2"}
    for c in fractions.values():
        assert 0 < c["mean"] < 3 and c["repeats"] == 3 * 3
    assert res["chosen_lr"]["by"] == "heldout_loss"
    assert set(res["chosen_lr"]) - {"by"} == set(orders.ORDERS)


def test_compute_accounting(tiny_run):
    res, _ = tiny_run
    k = res["config"]["blocks"]
    singles = [v for c in res["costs"] if c["blocks"] == 1 for v in c["values"]]
    pairs = [v for c in res["costs"] if c["blocks"] == 2 for v in c["values"]]
    for run in res["runs"]:
        if run["diverged"]:
            continue
        if run["order"] == "simultaneous":
            assert run["steps"] == 12 and run["spent"] == 12
        elif run["order"].startswith("gauss-seidel"):  # k full evaluations per sweep
            assert run["steps"] == math.ceil(12 / k) and run["spent"] == k * run["steps"]
        else:  # each step costs its active set's measured fraction; the budget is spent, overshot by < one step
            costs = pairs if run["order"].endswith("random-subset") else singles
            assert min(costs) * run["steps"] <= run["spent"] <= max(costs) * run["steps"] + 1e-9
            assert 12 <= run["spent"] < 12 + max(costs)
    marks = sorted({c["evals"] for c in res["curves"]})
    assert marks == [0.0, 3.0, 6.0, 9.0, 12.0]


def test_report_and_files(tiny_run):
    res, out = tiny_run
    text = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["orders_compute.png", "orders_cost.png", "orders_gap.png", "orders_tuning.png"]
    for name in pngs:
        assert f"]({name})" in text
    for name in ("orders_curves.csv", "orders_runs.csv", "orders_costs.csv", "orders_wall.csv", "orders_gap.csv"):
        assert (out / name).is_file()
    assert not re.search(r"seed 0\d\d", text)
    assert "n = 3" in text and "## The probe's prediction of the Gauss–Seidel gap" in text
    for line in text.splitlines():
        if line.startswith("- ") and ("higher" in line or "lower" in line) and "simultaneous" in line:
            assert "difference" in line  # every comparison sentence carries its interval
    tables = [line for line in text.splitlines() if line.startswith("|")]
    assert tables and all(line.endswith("|") for line in tables)


def test_factory_without_activation_runs_as_given(monkeypatch, threads, tmp_path):
    threads(1)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    import user_workloads

    res = orders.run(user_workloads.make, seeds=2, out=tmp_path, **{**SMALL, "lr_factors": (1.0,)})
    acts = res["config"]["gap_activations"]
    assert acts["switched"] is False and acts["activations"] == ["as-given"]
    assert "gap_relative_error/as-given/lr=0.01" in res["summary"]
    assert not any(k.startswith("pattern_flips/") for k in res["summary"])  # tanh: no ReLU or GELU to count
    text = (tmp_path / "report.md").read_text()
    assert "takes no `activation` option" in text and "could not be counted" not in text


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="unknown option 'sweeps'"):
        orders.run(load_workload("digits-mlp", size="tiny"), sweeps=3)


def test_worst_point_names_the_largest_error_and_its_gradient_against_the_other_seeds():
    def row(seed, step, pred, fwd, bwd, first):
        return {"activation": "gelu", "lr": 0.01, "seed": seed, "step": step, "predicted_gap": pred,
                "measured_gap_forward": fwd, "measured_gap_backward": bwd, "first_order": first}

    gaps = [row(0, 0, 1.0, 1.05, 1.02, -1.0), row(1, 0, 1.0, 0.97, 1.01, -1.2),
            row(0, 50, 1.0, 1.01, 1.0, -0.5), row(1, 50, 1.0, 1.0, 3.5, -2.0), row(2, 50, 2.0, 2.1, 2.0, -0.25),
            {**row(3, 50, 0.0, 1.0, 1.0, -9.0)}]  # a zero prediction has no relative error: left out
    text = orders.worst_point(gaps, "gelu", 0.01)
    assert "250%" in text and "seed 1, step 50, the backward sweep; 0% on the other" in text
    assert "4–8× the other seeds' at step 50" in text  # 2.0 against 0.5 and 0.25 (seed 3's zero row left out)
    assert orders.worst_point(gaps, "relu", 0.01) == ""
