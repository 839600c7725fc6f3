"""Every study end to end in a tiny configuration, through the command line: files written, documented
keys present, numbers consistent."""

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


def test_list_shows_every_study(capsys):
    assert cli.main(["study", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == studies.names()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["study", "no-such-study"], "unknown study 'no-such-study'"),
        (["study", "dosage", "--steps", "0"], "--steps must be >= 1"),
        (["study", "dosage", "--lr", "-1"], "--lr values must be > 0"),
        (["study", "dosage", "--steps", "many"], "invalid int value"),
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
    shares = r["digits"]["block_share"]
    assert list(shares) == ["layer0", "layer1", "layer2"]  # depth 2: two hidden layers and the head
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    for unit in r["digits"]["units"].values():
        assert 0.0 <= unit["gini"] <= 1.0 and len(unit["sorted_dose"]) == 8
    for run in r["starvation"]:
        assert run["easy_share"] + run["hard_share"] == pytest.approx(1.0, abs=1e-12)
    assert [run["sd_lambda"] for run in r["starvation"]][0] == 0.0


def test_same_seed_same_numbers(tmp_path):
    a = run_study("dosage", tmp_path / "a")
    b = run_study("dosage", tmp_path / "b")
    assert a["digits"]["block_share"] == b["digits"]["block_share"]
    assert a["starvation"][1]["hard_share"] == b["starvation"][1]["hard_share"]


def test_feature_drift(tmp_path):
    r = run_study("feature-drift", tmp_path, ["--lr", "0.001", "0.1"])
    rows = r["rows"]
    assert {row["variant"] for row in rows} == {"plain", "batchnorm", "residual"}
    assert {row["layer"] for row in rows} == {"layer0", "layer1", "layer2"}
    for row in rows:
        assert -1.0 - 1e-6 <= row["grad_cosine"] <= 1.0 + 1e-6  # float32 rounding
        if row["layer"] == "layer0":  # the data: nothing below it moves
            assert row["feature_drift"] == 0.0 and row["grad_shift"] == 0.0
    # the second-order prediction matches the measured gradient shift at a small step
    small = [row for row in rows if row["lr"] == 0.001 and row["layer"] != "layer0"]
    assert min(row["prediction_cosine"] for row in small) > 0.99
    for row in small:
        assert row["predicted_shift"] == pytest.approx(row["grad_shift"], rel=0.05)
    # features move more under a larger step
    for variant in ("plain", "batchnorm", "residual"):
        drift = {row["lr"]: row["feature_drift"] for row in rows
                 if row["variant"] == variant and row["layer"] == "layer2" and row["phase"] == "trained"}
        assert drift[0.1] > drift[0.001]


def test_coadaptation(tmp_path):
    r = run_study("coadaptation", tmp_path, ["--lr", "0.01"])
    assert {(s["variant"], s["optimizer"]) for s in r["summary"]} == {
        (v, o) for v in ("plain", "batchnorm", "residual") for o in ("sgd", "adam")}
    for run in r["runs"]:
        assert run["blocks"] == ["layer0", "layer1", "layer2"]
        for p in run["probes"]:
            parts = p["first_order"] + p["within"] + p["cross"] + p["remainder"]
            assert parts == pytest.approx(p["actual"], rel=1e-9, abs=1e-12)
            assert sum(p["alone"]) + p["nonadditivity"] == pytest.approx(p["actual"], rel=1e-9, abs=1e-12)
            c = p["C"]
            assert all(c[i][j] == pytest.approx(c[j][i], rel=1e-8, abs=1e-15) for i in range(3) for j in range(3))
            if run["optimizer"] == "sgd":  # small plain steps: the second-order model explains the change
                assert abs(p["remainder"]) <= 0.05 * abs(p["actual"]) + 1e-9


def test_step_size(tmp_path):
    r = run_study("step-size", tmp_path)
    cases = {c["case"]: c for c in r["cases"]}
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
    r = run_study("orders", tmp_path)
    summary = {s["order"]: s for s in r["summary"]}
    assert set(summary) == {"simultaneous", "gauss-seidel forward", "gauss-seidel backward", "block-coordinate cyclic",
                            "block-coordinate reshuffle", "block-coordinate random-subset"}
    steps = 12
    assert summary["simultaneous"]["evaluations"] == steps  # one gradient evaluation per step
    assert summary["gauss-seidel forward"]["evaluations"] == 3 * steps  # k = 3 blocks: one per block
    assert summary["block-coordinate cyclic"]["evaluations"] == steps
    # at the smallest learning rate the probe's second-order prediction matches real sweeps
    smallest = min(g["lr"] for g in r["gaps"])
    for g in r["gaps"]:
        if g["lr"] == smallest and abs(g["predicted_gap"]) > 1e-12:
            for sweep in ("forward", "backward"):
                assert g[f"measured_gap_{sweep}"] == pytest.approx(g["predicted_gap"], rel=0.05)
