"""The starvation study: its margin against boundaries whose distance is known, spectral decoupling's penalty
against a hand-written step, and the study end to end on the tiny two-moons workload (the paper's result:
spectral decoupling widens the margin, seed by seed)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("contourpy")

from pyco import cli, studies  # noqa: E402
from pyco.studies import starvation  # noqa: E402

OPTS = dict(margin_method="grid", margin_points=2000, grid=200, pad=0.5)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: intra-op threads only cost time (the study itself trains them on one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Linear2(nn.Module):
    """One logit w·x + b: the boundary is a line, the distance of p to it |w·p + b| / ‖w‖."""

    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x):
        return (x @ self.w + self.b)[:, None]


class Disc(nn.Module):
    """Two logits (0, r² − ‖x − c‖²): class 1 inside the circle; the distance of p to it |‖p − c‖ − r|."""

    def __init__(self, r=0.7, c=(0.2, -0.1)):
        super().__init__()
        self.r = nn.Parameter(torch.tensor(r, dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(c, dtype=torch.float64))

    def forward(self, x):
        inside = self.r ** 2 - (x - self.c).square().sum(1)
        return torch.stack([torch.zeros_like(inside), inside], 1)


def points(n=40, seed=0):
    return torch.rand(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def test_margin_of_a_line_is_exact_and_signed():
    model = Linear2([0.6, -0.8], 0.1)  # ‖w‖ = 1
    x = points()
    exact = (x @ torch.tensor([0.6, -0.8], dtype=torch.float64) + 0.1).abs()
    y = (x @ torch.tensor([0.6, -0.8], dtype=torch.float64) + 0.1 > 0).long()
    y[0] = 1 - y[0]  # one misclassified point: its distance counts negative
    pred = starvation.predict(model, x)
    grid = starvation.grid_distances(model, x, pred, OPTS)["distance"]
    torch.testing.assert_close(grid, exact, rtol=0, atol=1e-9)
    torch.testing.assert_close(starvation.deepfool(model, x, pred), exact, rtol=0, atol=1e-9)
    row = starvation.measure(model, x, y, "grid", True, OPTS)
    assert row["margin"] == pytest.approx(-exact[0].item(), abs=1e-9)
    assert row["train_accuracy"] == pytest.approx(1 - 1 / x.shape[0])
    assert row["second_feature_share"] == pytest.approx(0.64)  # g = ±w: 0.8² of ‖w‖² = 1


def test_margin_of_a_curved_boundary_grid_and_deepfool_agree_with_the_exact_distance():
    model = Disc()
    x = points(seed=1)
    exact = ((x - model.c.detach()).norm(dim=1) - model.r.detach()).abs()
    pred = starvation.predict(model, x)
    assert set(pred.tolist()) == {0, 1}
    got = starvation.grid_distances(model, x, pred, OPTS)
    torch.testing.assert_close(got["distance"], exact, rtol=0, atol=1e-9)  # the polish puts it on the circle
    torch.testing.assert_close(starvation.deepfool(model, x, pred), exact, rtol=0, atol=1e-5)


def test_sd_step_is_the_plain_step_of_the_loss_plus_half_lambda_squared_logits():
    factory = studies.load_workload("two-moons", size="tiny")
    w, ref = factory(0), factory(0)
    lam = 0.5
    starvation.train(w, 1, 0.01, lam, False, "")
    x, y = next(ref.batches())
    out = ref.model(x)
    loss = ref.loss_fn(ref.model, (x, y)) + 0.5 * lam * out.square().sum(1).mean()
    loss.backward()
    with torch.no_grad():
        for p in ref.model.parameters():
            p -= 0.01 * p.grad  # the first momentum step is a plain one
    for a, b in zip(w.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_spectral_decoupling_widens_the_margin_on_each_seed_at_a_small_size(tmp_path):
    out = tmp_path / "run"
    argv = ["study", "starvation", "--size", "tiny", "--out", str(out), "--no-progress", "--seeds", "3"]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    cfg, summary = res["config"], res["summary"]
    assert res["study"] == "starvation" and res["partial"] is False
    assert cfg["workload"] == "two-moons" and cfg["seeds"] == [0, 1, 2] and cfg["margin_method_used"] == "grid"
    assert cfg["steps"] == 300 and cfg["points"] == 300  # the tiny recipe's budget, every training point
    for name in ("margin/plain", "margin/sd", "margin_gain", "accuracy/plain", "accuracy/sd"):
        assert set(summary[name]) == {"mean", "ci95", "n"} and summary[name]["n"] == 3, name
    runs = {(r["seed"], r["method"]): r for r in res["runs"]}
    for s in cfg["seeds"]:
        plain, sd = runs[s, "plain"], runs[s, "sd"]
        assert 0 < plain["margin"] < 0.5 and plain["train_accuracy"] == 1.0
        assert sd["margin"] > plain["margin"], f"seed {s}: SD {sd['margin']} <= plain {plain['margin']}"
        for r in (plain, sd):  # two ways to the same margin
            assert r["margin_deepfool"] == pytest.approx(r["margin_grid"], abs=2e-3)
            assert r["certified"] and r["grid_error"] < 1e-2
    gain = summary["margin_gain"]
    assert gain["mean"] == pytest.approx(
        sum(runs[s, "sd"]["margin"] - runs[s, "plain"]["margin"] for s in cfg["seeds"]) / 3)
    report = (out / "report.md").read_text()
    assert "![decision boundaries and margins](starvation.png)" in report and (out / "starvation.png").is_file()
    assert (out / "starvation_runs.csv").is_file() and "n = 3 paired seeds" in report
    verdict = "reproduces: the interval" if gain["ci95"][0] > 0 else "does not reproduce"
    assert verdict in report


def test_other_workloads_get_the_deepfool_estimate(tmp_path):
    res = studies.load("starvation").run(studies.load_workload("digits-mlp", size="tiny"), steps=5, seeds=2,
                                         margin_points=200)
    assert res["config"]["margin_method_used"] == "deepfool" and res["config"]["points"] == 200
    for r in res["runs"]:
        assert r["margin"] == r["margin_deepfool"] and "margin_grid" not in r
        assert (r["margin"] < 0) == (r["train_accuracy"] < 1.0)  # a misclassified point makes it negative
        assert math.isfinite(r["margin"])
    assert set(res["summary"]["margin_gain"]) == {"mean", "ci95", "n"}


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="margin_method must be"):
        studies.load("starvation").run("two-moons", margin_method="exact")
    with pytest.raises(ValueError, match="needs 2-D inputs"):
        studies.load("starvation").run(studies.load_workload("digits-mlp", size="tiny"), margin_method="grid",
                                       steps=1, seeds=1)
