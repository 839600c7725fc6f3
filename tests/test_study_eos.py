"""The edge-of-stability study: gradient descent's sharpness settles at 2/η on a small configuration, the
Lanczos sharpness against the dense Hessian, the results' names, the report, and the refusals."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from pyco import cli, studies  # noqa: E402
from pyco.studies import Workload, WorkloadError, edge_of_stability as eos, load_workload  # noqa: E402

# Small enough for a test, large enough to sharpen: 200 digits, PyTorch's initialisation, tanh. λ_max starts
# near 2.7, below 2/0.6 = 3.33, and reaches it in ~60 steps; at η = 0.2 (2/η = 10) 250 steps are too few.
SMALL = dict(steps=250, lrs=[0.2, 0.6], examples=200, seeds=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("eos")
    return eos.run(load_workload("digits-mlp"), out=out, **SMALL), out


def test_sharpness_settles_at_two_over_eta(small):
    """Cohen et al.'s Figure 1: λ_max rises from below 2/η to it and stays within 20% of it."""
    results, _ = small
    s = results["summary"]
    ratio = s["sharpness_ratio/lr=0.6"]
    assert 0.8 <= ratio["ci95"][0] and ratio["ci95"][1] <= 1.2, ratio
    assert s["initial_sharpness"]["ci95"][1] < 2 / 0.6  # it started below the edge: sharpening got it there
    assert s["steps_to_edge/lr=0.6"]["mean"] > 0 and s["sharpening/lr=0.6"]["ci95"][0] > 0
    assert s["loss_rise_fraction/lr=0.6"]["ci95"][0] > 0  # the loss rose on some steps at the edge ...
    for run in results["runs"]:  # ... and still fell over the run
        assert run["losses"][-1] < run["losses"][0] / 5


def test_summary_names_and_schema(small):
    results, _ = small
    assert results["study"] == "edge-of-stability" and "question 002" in results["question"]
    cfg = results["config"]
    assert cfg["seeds"] == [0, 1, 2] and cfg["examples"] == 200 and cfg["lrs"] == [0.2, 0.6]
    assert cfg["activation_applied"] is True and cfg["workload_summary"]["config"]["activation"] == "tanh"
    s = results["summary"]
    for lr in ("0.2", "0.6"):
        for name in ("sharpness_ratio", "final_train_loss", "peak_sharpness_ratio", "loss_rise_fraction"):
            est = s[f"{name}/lr={lr}"]
            assert est["n"] == 3 and len(est["ci95"]) == 2 and math.isfinite(est["mean"])
    assert "steps_to_edge/lr=0.6" in s
    assert "steps_to_edge/lr=0.2" not in s  # no seed got there: missing, not averaged
    for run in results["runs"]:
        assert len(run["losses"]) == SMALL["steps"] + 1 and run["sharpness_steps"][-1] == SMALL["steps"]
        assert run["sharpness_steps"][:3] == [0, 10, 20] and not run["diverged"]


def test_report_embeds_the_figure_and_explains_a_miss(small):
    results, out = small
    text = (out / "report.md").read_text()
    for png in out.glob("*.png"):
        assert f"]({png.name})" in text
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "edge_of_stability.png").exists()
    assert "Settled λ_max·η/2 at η = 0.6 lay within [0.8, 1.25]" in text
    line = next(li for li in text.splitlines() if li.startswith("- **η = 0.2**"))
    assert "reached 2/η in 0/3 seeds" in line and "Why: λ_max went from" in line
    assert "Cohen et al.'s prediction held at η ∈ {0.6}" in text
    assert "At η ∈ {0.2} λ_max did not reach 2/η in every seed within the budget" in text
    rows = [li for li in text.splitlines() if li.startswith("|")]
    cells = {len(re.split(r"(?<!\\)\|", li)) for li in rows}
    assert len(rows) == 2 + len(SMALL["lrs"]) and len(cells) == 1
    for name in ("sharpness.csv", "loss.csv", "summary.csv"):
        assert (out / name).exists()
    header = (out / "sharpness.csv").read_text().splitlines()[0]
    assert header == "lr,seed,step,time,sharpness,sharpness_ratio"


def test_table_cells_are_escaped(small):
    results, _ = small
    table = [dict(r) for r in results["table"]]
    table[0]["steps_to_edge"] = "a|b"
    text = eos.report({**results, "table": table}, studies.intervals.Summary(
        {k: studies.intervals.from_dict(v) for k, v in results["summary"].items()}))
    assert "a\\|b" in text and "a|b" not in text


def test_lanczos_sharpness_matches_the_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, t = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    params = list(model.parameters())
    lam, vec = eos.sharpness(eos.square_loss(model, x, t), params, v0=None, tol=1e-10)
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(theta):
        chunks, i = {}, 0
        for (name, p) in model.named_parameters():
            chunks[name] = theta[i:i + p.numel()].view_as(p)
            i += p.numel()
        out = torch.func.functional_call(model, chunks, (x,))
        return 0.5 * (out - t).pow(2).sum(1).mean()

    dense = torch.autograd.functional.hessian(loss_of, flat)
    assert lam == pytest.approx(torch.linalg.eigvalsh(dense)[-1].item(), rel=1e-8)
    assert vec.shape == (flat.numel(),)


def test_mnist1d_mlp_runs_and_the_seed_fixes_the_numbers():
    factory = load_workload("mnist1d-mlp", size="tiny")
    a = eos.run(factory, steps=12, lrs=[0.1], examples=60, seeds=2, every=4)
    b = eos.run(factory, steps=12, lrs=[0.1], examples=60, seeds=2, every=4)
    assert a["summary"] == b["summary"] and a["config"]["examples"] == 60
    assert a["runs"][0]["sharpness_steps"] == [0, 4, 8, 12]
    assert a["runs"][0]["sharpness"] != a["runs"][1]["sharpness"]  # the seed moves the initialisation


def test_divergence_is_reported_not_averaged(tmp_path):
    results = eos.run(load_workload("digits-mlp", size="tiny"), steps=30, lrs=[20.0], examples=100, seeds=2,
                      out=tmp_path)
    assert all(r["diverged"] and r["diverged_at"] <= 30 for r in results["runs"])
    assert results["summary"]["sharpness_ratio/lr=20"]["ci95"] == [None, None]
    assert "steps_to_edge/lr=20" not in results["summary"]
    text = (tmp_path / "report.md").read_text()
    assert "every seed diverged, the loss non-finite or a thousandfold its first value (at steps" in text
    assert "At η ∈ {20} gradient descent diverged in some seeds" in text


def test_refuses_what_is_not_inputs_and_class_targets():
    with pytest.raises(WorkloadError, match=r"needs a classification workload .* workload 'stdlib-gpt' gives a "
                                            r"tuple of 2: a tensor \[4, 16\] torch.int64"):
        eos.run(load_workload("stdlib-gpt", size="tiny"), steps=2, seeds=1)

    def regression(seed):
        x = torch.randn(8, 3)
        return Workload(name="regression", model=nn.Linear(3, 1), train_batches=[(x, x.sum(1, keepdim=True))],
                        loss_fn=lambda m, b: (m(b[0]) - b[1]).pow(2).mean())

    with pytest.raises(WorkloadError, match=r"workload 'regression' gives a tuple of 2: .*torch.float32"):
        eos.run(regression, steps=2, seeds=1)

    def too_few_scores(seed):  # integer targets up to 4, but the model gives 2 scores
        x, y = torch.randn(8, 3), torch.arange(8) % 5
        return Workload(name="narrow", model=nn.Linear(3, 2), train_batches=[(x, y)],
                        loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1].clamp(max=1)))

    with pytest.raises(WorkloadError, match=r"model whose output is \[2, 2\] for 2 inputs, not one score for each "
                                            r"of the 5 classes"):
        eos.run(too_few_scores, steps=2, seeds=1)


def test_bad_options():
    with pytest.raises(ValueError, match=r"init must be one of \('pytorch', 'workload'\)"):
        eos.run("digits-mlp", steps=2, seeds=1, init="he")
    with pytest.raises(ValueError, match=r"band must be \(lo, hi\) with 0 < lo < 1 < hi"):
        eos.run("digits-mlp", steps=2, seeds=1, band=(1.1, 1.2))
    with pytest.raises(TypeError, match=r"unknown option 'probes'"):
        eos.run("digits-mlp", steps=2, seeds=1, probes=3)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["study", "edge-of-stability", "--size", "tiny", "--steps", "15", "--lr", "0.5", "--out",
                     str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["partial"] is False and results["config"]["steps"] == 15 and results["config"]["lrs"] == [0.5]
    assert results["summary"]["sharpness_ratio/lr=0.5"]["n"] == 3
    assert "Edge of stability" in capsys.readouterr().out
