"""The co-adaptation study: the η-free cross share, its per-seed summary, the second-order-regime and
did-it-train flags, and the full configuration's grown network, on tiny workloads."""

from __future__ import annotations

import math
import re
import statistics

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import pyco  # noqa: E402
from pyco import studies  # noqa: E402
from pyco.studies import load_workload  # noqa: E402
from pyco.studies.workload import WorkloadError  # noqa: E402

co = studies.load("coadaptation")
TINY = load_workload("digits-mlp", size="tiny")


def test_cross_share_does_not_move_with_the_step_size_and_cross_over_first_does():
    w = TINY(0)
    batch = next(w.batches())
    loss = lambda: w.loss(batch)  # noqa: E731
    grads = torch.autograd.grad(loss(), w.blocks.params())
    parts = {}
    for eta in (1e-3, 2e-3):
        rep = pyco.probe.cross_terms(loss, w.blocks, [-eta * g for g in grads], dtype=torch.float64, alone=False)
        parts[eta] = co.shares(rep.totals())
        c = rep.C
        off = float(c.sum() - torch.diagonal(c).sum())
        assert parts[eta]["cross_share"] == pytest.approx(off / float(c.sum()), rel=1e-9)  # ½Σ_{i≠j}C / ½ΣC
    assert parts[2e-3]["cross_share"] == pytest.approx(parts[1e-3]["cross_share"], rel=1e-9)
    assert parts[2e-3]["cross_over_first"] == pytest.approx(2 * parts[1e-3]["cross_over_first"], rel=1e-9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("coadaptation")
    return co.run(TINY, steps=12, lrs=[1e-6, 0.05, 10.0], probes=3, out=out), out


def test_summary_names_and_per_seed_medians(tiny):
    r, _ = tiny
    assert r["config"]["seeds"] == [0, 1, 2] and r["config"]["optimizers"] == ["sgd"]  # --lr: the recipe's
    for lr in (1e-6, 0.05, 10.0):
        for measure in ("cross_share", "cross_over_first"):
            est = r["summary"][f"{measure}/digits-mlp/sgd/lr={lr:g}"]
            assert est["n"] == 3
    runs = [run for run in r["runs"] if run["lr"] == 0.05]
    assert sorted(run["seed"] for run in runs) == [0, 1, 2]
    medians = [statistics.median(p["cross_share"] for p in run["probes"])
               for run in sorted(runs, key=lambda x: x["seed"])]
    assert r["summary"]["cross_share/digits-mlp/sgd/lr=0.05"]["mean"] == pytest.approx(statistics.fmean(medians))
    for run in r["runs"]:
        assert [p["step"] for p in run["probes"]] == co.probe_steps(12, 3)
        for p in run["probes"]:
            assert p["first_order"] + p["within"] + p["cross"] + p["remainder"] == pytest.approx(p["actual"], abs=1e-12)
            if math.isfinite(p["cross_share"]):
                assert p["cross_share"] * p["second_order"] == pytest.approx(p["cross"], rel=1e-9, abs=1e-300)


def test_flags_and_no_conclusion_from_flagged_rows(tiny):
    r, out = tiny
    rows = {row["lr"]: row for row in r["rows"]}
    for row in rows.values():  # the rule: median |R|/|ΔL| over every recorded step of the row
        pooled = statistics.median(p["remainder_over_actual"] for run in r["runs"] if run["lr"] == row["lr"]
                                   for p in run["probes"])
        assert row["median_remainder_over_actual"] == pytest.approx(pooled)
        assert row["in_regime"] == (pooled <= 0.1)
    assert rows[1e-6]["in_regime"] and not rows[1e-6]["trained"]  # a step too small to train
    assert not rows[10.0]["in_regime"]
    assert rows[0.05]["in_regime"] and rows[0.05]["trained"]
    report = (out / "report.md").read_text()
    lines = {lr: next(line for line in report.splitlines() if line.startswith(f"- sgd (momentum 0.9) lr {lr}:"))
             for lr in ("1e-06", "0.05", "10")}
    assert "outside the second-order regime" in lines["10"] and "no conclusion drawn" in lines["10"]
    assert "did not train" in lines["1e-06"] and "no conclusion drawn" in lines["1e-06"]
    for lr in ("1e-06", "10"):
        assert "cross share" not in lines[lr]
    assert "the cross share" in lines["0.05"]
    assert "worse* than the simultaneous step at second order" in report  # the sign's meaning for a sweep
    for png in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (out / png).is_file()
    assert {p.name for p in out.glob("*.png")} == set(re.findall(r"\]\(([^)]+\.png)\)", report))
    assert "seed 00" not in report and "(question 000)" in report


def test_default_grid_both_optimizers_around_their_usual_rates():
    recipe = TINY(0).recipe  # sgd, lr 0.05
    assert co.default_optimizers(recipe) == ("sgd", "adam")
    assert co.lr_grid(recipe, "sgd", (0.3, 1.0, 3.0)) == [0.015, 0.05, 0.15]
    assert co.lr_grid(recipe, "adam", (0.3, 1.0, 3.0)) == [0.0003, 0.001, 0.003]
    with pytest.raises(WorkloadError, match="optimizer must be one of"):
        co.run(TINY, steps=2, optimizers=("lbfgs",))


def test_network_names_carry_the_variant():
    assert co.network(TINY(0)) == "digits-mlp"
    assert co.network(load_workload("digits-mlp", size="tiny", variant="batchnorm")(0)) == "digits-mlp-batchnorm"


def test_training_check():
    assert co.training_check({"loss": 2.0}, {"loss": 1.0}, [2.0, 1.0], 0.05)["trained"]
    assert not co.training_check({"loss": 2.0}, {"loss": 1.99}, [2.0, 1.9], 0.05)["trained"]
    diverged = co.training_check({"loss": 2.0}, {"loss": math.nan}, [2.0, math.nan], 0.05)
    assert diverged["diverged"] and not diverged["trained"]
    no_eval = co.training_check({}, {}, [2.0] + [1.0] * 19, 0.05)
    assert no_eval["check"] == "training loss" and no_eval["trained"]


def test_full_grows_the_network_where_the_factory_takes_width_and_depth():
    first = TINY(0)
    grown, w, shape = co.full_shape(TINY, first, 0, runs=1, steps=2, probes=1)
    assert shape["grown_to"] == {"width": 256, "depth": 4} and grown.options["width"] == 256
    assert (w.config["width"], w.config["depth"]) == (256, 4) and w.parameters > first.parameters
    kept, same, why = co.full_shape(TINY, first, 0, runs=1, steps=2, probes=1, budget_s=0.0)
    assert kept is TINY and same is first and why["grown_to"] == {} and "projected" in why["note"]
    fixed = load_workload("digits-mlp", size="tiny", width=8)  # the user's width stays
    _, w, shape = co.full_shape(fixed, fixed(0), 0, runs=1, steps=2, probes=1)
    assert shape["grown_to"] == {"depth": 4} and w.config["width"] == 8
    plain = load_workload(lambda seed: TINY(seed))  # takes neither: as given
    kept, _, shape = co.full_shape(plain, plain(0), 0, runs=1, steps=2, probes=1)
    assert kept is plain and shape["grown_to"] == {}


def test_the_quick_configuration_is_trimmed_to_its_time_budget(monkeypatch):
    from pyco.studies import coadaptation, load_workload

    workload = load_workload("digits-mlp", size="tiny")(0)
    recipe = workload.recipe
    grids = {"sgd": [0.01, 0.05], "adam": [0.001, 0.003]}
    k, steps0 = len(workload.blocks), recipe.steps
    between = 60 / (9 * (steps0 + 5 * 3.5 * k))  # 12 runs project over 60 s, the 6 of one optimizer under
    for per_step, expect in [(1e-6, []), (between, ["only the recipe's optimizer"]),
                             (1.0, ["only the recipe's optimizer", "only the recipe's learning rate",
                                    "no block-alone losses", "3 recorded steps per run", "training steps"])]:
        monkeypatch.setattr(coadaptation, "step_seconds", lambda w, n, clock=None, v=per_step: v)
        opts, g, probes, alone, steps, shape = coadaptation.fit_quick(workload, 3, ("sgd", "adam"), grids, 5, True,
                                                                      budget_s=60)
        note = shape["note"] or ""
        for what in expect:
            assert what in note
        if not expect:
            assert note == "" and opts == ("sgd", "adam") and steps is None
        if len(expect) == 5:  # everything trimmed; the steps never below half the recipe's budget
            assert opts == (recipe.optimizer,) and g == {recipe.optimizer: [recipe.lr]} and not alone and probes == 3
            assert steps == max(recipe.steps // 2, 1)
