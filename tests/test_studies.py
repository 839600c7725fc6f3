"""Every study end to end in a tiny configuration of the default workload (digits-mlp), through the command
line: files written, documented keys present, numbers consistent."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from pyco import cli, studies  # noqa: E402

TINY = ["--steps", "12", "--depth", "2", "--width", "8", "--no-progress", "--seed", "3"]


def run_study(name: str, tmp_path, extra=()) -> dict:
    out = tmp_path / name
    assert cli.main(["study", name, "--out", str(out), *TINY, *extra]) == 0
    for f in ("results.json", "report.md"):
        assert (out / f).is_file(), f"{name}: {f} missing"
    assert list(out.glob("*.png")), f"{name}: no figure"
    assert list(out.glob("*.csv")), f"{name}: no CSV table"
    results = json.loads((out / "results.json").read_text())
    assert results["study"] == name and results["partial"] is False
    return results


def test_list_shows_every_study_and_workload(capsys):
    from pyco.studies import workloads

    assert cli.main(["study", "--list"]) == 0
    text = capsys.readouterr().out
    head, tail = text.split("\nworkloads")
    assert [line.split()[0] for line in head.splitlines()[1:]] == studies.names()
    lines = tail.strip().splitlines()[1:]
    assert [line.split()[0] for line in lines] == workloads.names()
    for line in lines:  # size in parameters, data, what it trains to
        assert " params; " in line and ("accuracy" in line or "bits per byte" in line)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["study", "no-such-study"], "unknown study 'no-such-study'"),
        (["study", "dosage", "--steps", "0"], "--steps must be >= 1"),
        (["study", "dosage", "--lr", "-1"], "--lr values must be > 0"),
        (["study", "dosage", "--steps", "many"], "invalid int value"),
        (["study", "dosage", "--threads", "0"], "--threads must be >= 1"),
        (["study", "dosage", "--workload-option", "variant"], "--workload-option expects KEY=VALUE"),
        (["study", "dosage", "--workload-option", "variant=wide"], "unknown MLP variant 'wide'"),
        (["study"], "name a study, or use --list"),
    ],
)
def test_bad_options_give_one_readable_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_dosage(tmp_path):
    r = run_study("dosage", tmp_path)
    shares = r["workload"]["block_share"]
    assert list(shares) == ["layer0", "layer1", "layer2"]  # depth 2: two hidden layers and the head
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    units = r["workload"]["units"]
    assert {name: len(u["sorted_dose"]) for name, u in units.items()} == {"0.0": 8, "1.0": 8, "2": 10}
    for unit in units.values():
        assert 0.0 <= unit["gini"] <= 1.0
    for run in r["starvation"]:
        assert run["easy_share"] + run["hard_share"] == pytest.approx(1.0, abs=1e-12)
    assert [run["sd_lambda"] for run in r["starvation"]][0] == 0.0
    assert r["config"]["workload"] == "digits-mlp" and r["config"]["workload_options"] == {"depth": 2, "width": 8}


def test_same_seed_same_numbers(tmp_path):
    a = run_study("dosage", tmp_path / "a")
    b = run_study("dosage", tmp_path / "b")
    assert a["workload"]["block_share"] == b["workload"]["block_share"]
    assert a["starvation"][1]["hard_share"] == b["starvation"][1]["hard_share"]


@pytest.mark.parametrize("variant", ["plain", "batchnorm"])
def test_feature_drift(variant, tmp_path):
    r = run_study("feature-drift", tmp_path, ["--lr", "0.001", "0.1", "--workload-option", f"variant={variant}"])
    rows = r["rows"]
    assert r["config"]["workload_summary"]["config"]["variant"] == variant
    assert {row["phase"] for row in rows} == {"init", "trained"}
    assert [row["block"] for row in rows[:3]] == ["layer0", "layer1", "layer2"]  # forward order
    for row in rows:
        assert -1.0 - 1e-6 <= row["grad_cosine"] <= 1.0 + 1e-6  # float32 rounding
        if row["block"] == "layer0":  # the data: nothing below it moves
            assert row["feature_drift"] == 0.0 and row["grad_shift"] == 0.0
    # the second-order prediction matches the measured gradient shift at a small step (after training: at
    # initialization, zero biases, a ReLU unit of this 8-wide net may cross its kink within the step)
    small = [row for row in rows if row["lr"] == 0.001 and row["block"] != "layer0" and row["phase"] == "trained"]
    assert min(row["prediction_cosine"] for row in small) > 0.99
    for row in small:
        assert row["predicted_shift"] == pytest.approx(row["grad_shift"], rel=0.05)
    # features move more under a larger step
    drift = {row["lr"]: row["feature_drift"] for row in rows if row["block"] == "layer2" and row["phase"] == "trained"}
    assert drift[0.1] > drift[0.001]


def test_coadaptation(tmp_path):
    r = run_study("coadaptation", tmp_path, ["--lr", "0.01", "0.05"])
    assert [(s["optimizer"], s["lr"]) for s in r["summary"]] == [("sgd", 0.01), ("sgd", 0.05)]  # the recipe's
    assert r["config"]["steps"] == 12 and r["config"]["probes"] == 10
    for run in r["runs"]:
        assert run["blocks"] == ["layer0", "layer1", "layer2"]
        assert set(run["eval"]) == {"loss", "accuracy"}
        assert [p["step"] for p in run["probes"]] == [1, 2, 3, 5, 6, 7, 8, 10, 11, 12]
        for p in run["probes"]:
            parts = p["first_order"] + p["within"] + p["cross"] + p["remainder"]
            assert parts == pytest.approx(p["actual"], rel=1e-9, abs=1e-12)
            assert sum(p["alone"]) + p["nonadditivity"] == pytest.approx(p["actual"], rel=1e-9, abs=1e-12)
            c = p["C"]
            assert all(c[i][j] == pytest.approx(c[j][i], rel=1e-8, abs=1e-15) for i in range(3) for j in range(3))
            if run["lr"] == 0.01:  # small steps: the second-order model explains the change
                assert abs(p["remainder"]) <= 0.05 * abs(p["actual"]) + 1e-9


def test_coadaptation_quick_is_one_run_at_the_recipe_lr(tmp_path):
    r = run_study("coadaptation", tmp_path, ["--quick"])
    (s,) = r["summary"]
    assert s["lr"] == r["config"]["workload_summary"]["recipe"]["lr"] and s["steps_recorded"] == 3


def test_step_size(tmp_path):
    r = run_study("step-size", tmp_path)
    cases = {c["case"]: c for c in r["cases"]}
    assert set(cases) == {"f=(x+y)z", "1/2((x+y)z)^2", "digits-mlp, one batch", "digits-mlp, worst-fit example"}
    toy = cases["f=(x+y)z"]
    # f is bilinear: ΔL(η) = -41η - 24η² exactly, all of the curvature is cross-block
    assert toy["grad_sq"] == pytest.approx(41.0) and toy["gHg"] == pytest.approx(-48.0)
    assert toy["cross_share_of_curvature"] == pytest.approx(1.0)
    for row in toy["rows"]:
        assert row["actual"] == pytest.approx(-41 * row["eta"] - 24 * row["eta"] ** 2, rel=1e-12)
        assert row["within"] == 0.0
    for c in r["cases"]:
        smallest = c["rows"][0]
        assert smallest["actual"] < 0  # a small enough step lowers the loss
        assert abs(smallest["remainder"]) <= 1e-3 * abs(smallest["actual"])
        assert c["blocks"] in (["x", "y", "z"], ["layer0", "layer1", "layer2"])


def test_orders(tmp_path):
    # tanh: the gap's second-order prediction is exact in the limit only for a smooth loss (a ReLU unit that
    # crosses its kink within a step adds a term of its own)
    r = run_study("orders", tmp_path, ["--workload-option", "activation=tanh"])
    assert r["config"]["workload_summary"]["config"]["activation"] == "tanh"
    summary = {s["order"]: s for s in r["summary"]}
    assert set(summary) == {"simultaneous", "gauss-seidel forward", "gauss-seidel backward", "block-coordinate cyclic",
                            "block-coordinate reshuffle", "block-coordinate random-subset"}
    steps = 12
    assert summary["simultaneous"]["evaluations"] == steps  # one gradient evaluation per step
    assert summary["gauss-seidel forward"]["evaluations"] == 3 * steps  # k = 3 blocks: one per block
    assert summary["block-coordinate cyclic"]["evaluations"] == steps
    assert 0.0 <= summary["simultaneous"]["final_eval_accuracy"] <= 1.0
    # at the smallest learning rate the probe's second-order prediction matches real sweeps
    smallest = min(g["lr"] for g in r["gaps"])
    for g in r["gaps"]:
        if g["lr"] == smallest and abs(g["predicted_gap"]) > 1e-12:
            for sweep in ("forward", "backward"):
                assert g[f"measured_gap_{sweep}"] == pytest.approx(g["predicted_gap"], rel=0.05)
