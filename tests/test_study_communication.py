"""The communication study: compute matching (every run spends the budget, Coupled's solving steps at their
measured cost), the per-block α log against an independent solve, the sentences against their intervals,
and the files a run writes."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from pyco.orders import _block_scales  # noqa: E402
from pyco.studies import communication, load_workload  # noqa: E402
from pyco.studies.intervals import from_dict  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("communication")
    res = communication.run("digits-mlp", steps=24, lrs=[0.05, 0.15], seeds=2, every=(1, 3), cost_repeats=3,
                            wall_repeats=1, wall_steps=2, checkpoints=4, out=out)
    return res, out


def test_the_methods_and_their_order():
    assert communication.methods((10, 1)) == [
        "simultaneous", "gauss-seidel backward", "block-coordinate cyclic", "coupled every 1", "coupled every 10",
        "coupled no-cross every 1"]


def test_every_run_spends_the_budget_at_the_measured_costs(tiny):
    res, _ = tiny
    budget, costs = res["config"]["budget"], res["solve_cost"]
    solve = {s: c["solve"] for s, c in costs.items()}
    reuse = {s: c["reuse"] for s, c in costs.items()}
    assert budget == 24 and all(solve[s] > 1 and solve[s] > reuse[s] > 0 for s in solve)
    k = res["config"]["blocks"]
    for r in res["runs"]:
        assert not r["diverged"]
        step_max = {"gauss-seidel backward": k}.get(r["order"], max(1.0, solve[str(r["seed"])]))
        assert budget - 1e-9 <= r["spent"] < budget + step_max + 1e-9
        if r["order"] == "coupled every 1":  # every step solves: cost = steps × measured solve cost
            assert r["spent"] == pytest.approx(r["steps"] * solve[str(r["seed"])])
            assert sum(v for o, v in r["outcomes"].items() if o != "reused") == r["steps"]
        if r["order"] == "coupled every 3":  # one step in 3 solves, the others cost 1
            solves = math.ceil(r["steps"] / 3)
            assert r["outcomes"]["reused"] == r["steps"] - solves
            seed = str(r["seed"])
            assert r["spent"] == pytest.approx(solves * solve[seed] + (r["steps"] - solves) * reuse[seed])
        if r["order"] == "simultaneous":
            assert r["steps"] == 24


def test_the_alpha_log_matches_an_independent_solve_of_the_logged_model(tiny):
    res, _ = tiny
    rows = [a for a in res["alphas"] if a["method"] == "coupled every 1"]
    names = load_workload("digits-mlp")(0).blocks.names
    assert rows and {a["block"] for a in rows} == set(names)
    for a in rows:
        assert a["alpha"] == a["alpha_coupled"]
        assert abs(a["alpha_coupled"] - 1) <= 2.0 + 1e-12 and abs(a["alpha_nocross"] - 1) <= 2.0 + 1e-12
        assert math.isfinite(a["eval_applied"]) and math.isfinite(a["applied"])
        if a["outcome"] == "indefinite":  # α = 1: the applied step is the proposal, on every batch
            assert a["alpha_coupled"] == 1.0
            assert a["eval_applied"] == pytest.approx(a["eval_proposal"], abs=1e-12)
            assert a["applied"] == pytest.approx(a["proposal_actual"], abs=1e-6)
    nocross = [a for a in res["alphas"] if a["method"] == "coupled no-cross every 1"]
    assert nocross and all(a["alpha"] == a["alpha_nocross"] for a in nocross)


def test_the_no_cross_alpha_is_each_blocks_own_line_search():
    f = torch.tensor([-1.0, -0.5], dtype=torch.float64)
    c = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    diag = _block_scales.solve(f, torch.diag(torch.diagonal(c)), trust=None).alpha
    assert diag.tolist() == pytest.approx([0.5, 0.5])
    coupled = _block_scales.solve(f, c, trust=None).alpha
    assert torch.allclose(coupled, torch.linalg.solve(c, -f))
    assert bool((coupled < diag).all())  # positive cross curvature: each block yields to the other


def test_sentences_follow_their_intervals(tiny):
    res, out = tiny
    summary = {k: from_dict(v) for k, v in json.loads(json.dumps(res["summary"])).items()}
    text = (out / "report.md").read_text()
    pays = re.search(r"\*\*Does it pay\?\*\*.*?: lower for (.*?); higher for (.*?); no measurable difference for "
                     r"(.*?)\.\n", text)
    assert pays
    for words, sign in zip(pays.groups(), (-1, 1, 0)):
        for name in re.findall(r"`([^`]+)`", words):
            assert summary[f"tuned_final_train_loss_vs_simultaneous/{name}"].sign == sign
    pays = re.search(r"\*\*When it pays\.\*\*.*?below simultaneous updates': (.*?); measurably above: (.*?); "
                     r"the rest", text)
    assert pays
    for words, sign in zip(pays.groups(), (-1, 1)):
        for name, lr in re.findall(r"`([^`]+)` at ([0-9.e+-]+)", words):
            assert summary[f"gain_at_lr/{name}/{lr}"].sign == sign
    buys = re.search(r"measurably lower at (.*?) and measurably higher at (.*?); each", text)
    assert buys
    twin = "coupled every 1"
    for words, sign in zip(buys.groups(), (-1, 1)):
        for lr in re.findall(r"[0-9][0-9.e+-]*", words):
            assert summary[f"equal_steps_same_lr/{twin}/{lr}"].sign == sign
    cross = summary["tuned_cross_gain"]
    line = next(line for line in text.splitlines() if "**The communication itself.**" in line)
    assert ("no measurable difference" in line) == (cross.sign == 0)


def test_files_and_figures(tiny):
    res, out = tiny
    for name in ("report.md", "communication_loss.png", "communication_alpha.png",
                 "communication_lr.png", "communication_curves.csv", "communication_alpha.csv"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "report.md").read_text()
    for section in ("## In short", "## Cost and loss at equal compute", "## At equal steps", "## α per block",
                    "## The gain by learning rate", "## How it was measured"):
        assert section in text
    assert res["config"]["methods"] == communication.methods((1, 3))
    assert set(res["chosen_lr"]) >= set(res["config"]["methods"])


@pytest.mark.parametrize("every, message", [((0,), "every must be ints >= 1"), ((1.5,), "every must be ints")])
def test_invalid_every(every, message):
    with pytest.raises(ValueError, match=message):
        communication.run("digits-mlp", steps=2, seeds=1, every=every)


def test_the_alpha_log_measures_each_solving_step_from_the_parameters_before_it():
    """The training-loss change the α log records for a solving step is the change between the parameters
    just before that step and just after it (reusing steps in between move the parameters too)."""
    from pyco.studies._common import closure_for
    from pyco.studies.orders import train_loss

    import pyco

    workload = load_workload("digits-mlp")(0)
    stream = workload.batches()
    eval_batches = [next(stream) for _ in range(2)]
    log = communication.AlphaLog("coupled every 2", 0.05, 0, workload, eval_batches)
    opt = pyco.Coupled(torch.optim.SGD(workload.model.parameters(), lr=0.05), workload.blocks, every=2,
                       model=workload.model)
    expected = []
    batches = workload.batches()
    for step in range(1, 6):
        before = train_loss(workload, eval_batches)
        batch = next(batches)
        opt.step(closure_for(workload, opt, batch))
        if opt.last_outcome != "reused":
            expected.append(train_loss(workload, eval_batches) - before)
        log(opt, step, batch)
    got = list({a["step"]: a["eval_applied"] for a in log.rows}.values())
    assert len(got) == len(expected) == 3  # steps 1, 3 and 5 solve
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
