"""The feature-drift study: Santurkar et al.'s gradient shift during real training, checked against a direct
recomputation; the real training left exactly as without measuring; batch norm against plain paired by
seed; on tiny workloads."""

from __future__ import annotations

import copy
import re

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from pyco import studies  # noqa: E402
from pyco.studies import load_workload  # noqa: E402
from pyco.studies._common import closure_for  # noqa: E402
from pyco.studies.workload import cast_batch  # noqa: E402

fd = studies.load("feature-drift")


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_measuring_leaves_the_real_training_exactly_as_without():
    make = load_workload("digits-mlp", size="tiny", variant="batchnorm")
    measured, plain = make(0), make(0)
    r = fd.train_and_measure(measured, 0.05, 6, {2: ["init"], 5: ["trained"]}, False, 0.05)
    opt = plain.recipe.make(plain.model.parameters(), lr=0.05)
    batches = plain.batches()
    losses = [opt.step(closure_for(plain, opt, next(batches))).item() for _ in range(6)]
    assert r["losses"] == losses
    a, b = state(measured.model), state(plain.model)  # parameters and batch-norm statistics, bitwise
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {row["step"] for row in r["rows"]} == {2, 5}


def direct(workload, before, after, batch):
    """G, G′ per block the slow way: float64 copies at θ_t, one with the blocks before i (in order) at θ_{t+1}."""
    owner = {id(p): name for name in workload.blocks.names for p in workload.blocks[name]}
    block_of = {n: owner[id(p)] for n, p in after.named_parameters()}
    names = list(workload.blocks.names)
    out = []
    for i, name in enumerate(names):
        base, shifted = copy.deepcopy(before).double(), copy.deepcopy(before).double()
        moved = dict(after.named_parameters())
        with torch.no_grad():
            for n, p in shifted.named_parameters():
                if block_of[n] in names[:i]:
                    p.copy_(moved[n].double())
        grads = []
        for model in (base, shifted):
            mine = [p for n, p in model.named_parameters() if block_of[n] == name]
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(workload.loss(batch, model), mine)]))
        out.append(tuple(grads))
    return out


def test_gradient_shift_matches_a_direct_recomputation_in_float64():
    w = load_workload("digits-mlp", size="tiny", depth=3)(1)
    opt = w.recipe.make(w.model.parameters(), lr=0.05)
    batches = w.batches()
    for _ in range(3):
        opt.step(closure_for(w, opt, next(batches)))
    batch = next(batches)
    before = copy.deepcopy(w.model)
    _, rows = fd.measured_step(w, opt, closure_for(w, opt, batch), batch)
    assert [r["block"] for r in rows] == ["layer0", "layer1", "layer2", "layer3"]  # forward order
    for row, (g, g_shift) in zip(rows, direct(w, before, w.model, cast_batch(batch, torch.float64))):
        assert row["ics_l2"] == pytest.approx((g_shift - g).norm().item(), rel=1e-9, abs=1e-15)
        assert row["ics_cosine"] == pytest.approx(torch.nn.functional.cosine_similarity(g, g_shift, 0).item(), rel=1e-9)
    assert rows[0]["ics_l2"] == 0.0 and rows[0]["feature_drift"] == 0.0  # the data: nothing below it moves
    assert all(r["ics_l2"] > 0 for r in rows[1:])


def test_second_order_prediction_is_exact_for_small_steps():
    for variant in ("plain", "batchnorm"):
        w = load_workload("digits-mlp", size="tiny", activation="tanh", variant=variant, depth=3)(0)
        r = fd.train_and_measure(w, 1e-5, 2, {2: ["init"]}, False, 0.05)
        for row in r["rows"][1:]:
            assert row["prediction_cosine"] > 0.9999 and row["prediction_error"] < 0.01


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("feature-drift")
    make = load_workload("digits-mlp", size="tiny", width=6)
    return fd.run(make, steps=10, depths=(2, 4), probes=2, out=out), out


def test_every_network_and_phase_is_summarised_and_bn_is_paired_with_plain(tiny):
    r, out = tiny
    nets = ["digits-mlp-depth2", "digits-mlp-batchnorm-depth2", "digits-mlp-depth4", "digits-mlp-batchnorm-depth4"]
    assert r["config"]["networks"] == nets and r["config"]["seeds"] == [0, 1, 2]
    s = r["summary"]
    for net in nets:
        for phase in ("init", "trained"):
            assert s[f"ics_cosine/{net}/{phase}"]["n"] == 3 and f"ics_l2/{net}/{phase}" in s
    runs = {(run["network"], run["seed"]): run for run in r["runs"]}
    assert all(run["lr"] == 0.05 for run in runs.values())  # the same learning rate for batch norm and plain
    for depth in (2, 4):
        per_seed = {}
        for net in (f"digits-mlp-depth{depth}", f"digits-mlp-batchnorm-depth{depth}"):
            rows = [x for x in r["rows"] if x["network"] == net and x["phase"] == "trained" and x["position"] > 0]
            per_seed[net] = [sum(x["ics_cosine"] for x in rows if x["seed"] == seed)
                             / sum(1 for x in rows if x["seed"] == seed) for seed in (0, 1, 2)]
        diff = [b - a for a, b in zip(*per_seed.values())]
        est = s[f"ics_cosine_bn_minus_plain/digits-mlp-depth{depth}/trained"]
        assert est["mean"] == pytest.approx(sum(diff) / 3) and est["n"] == 3
    report = (out / "report.md").read_text()
    assert "(question 001)" in report and "seed 00" not in report
    assert report.count("paired seeds)") >= 4 * 2 * 2  # a claims.difference per measure, depth and phase
    assert set(re.findall(r"\]\(([^)]+\.png)\)", report)) == {p.name for p in out.glob("*.png")}
    rows = [x for x in r["rows"] if x["network"] == "digits-mlp-batchnorm-depth2" and x["seed"] == 0]
    assert [x["block"] for x in rows[:3]] == ["layer0", "layer1", "layer2"]
    for x in r["rows"]:
        assert -1 - 1e-12 <= x["ics_cosine"] <= 1 + 1e-12


def test_the_networks_and_the_recorded_steps():
    fixed = load_workload("digits-mlp", size="tiny", depth=3, variant="batchnorm")
    assert [n[0] for n in fd.networks(fixed, ("plain", "batchnorm"), (4, 8))] == ["digits-mlp-batchnorm-depth3"]
    swept = fd.networks(load_workload("digits-mlp", size="tiny"), ("plain", "batchnorm"), (4, 8))
    assert [(n[2], n[3]) for n in swept] == [("plain", 4), ("batchnorm", 4), ("plain", 8), ("batchnorm", 8)]
    given = load_workload(lambda seed: load_workload("digits-mlp", size="tiny")(seed))  # takes neither
    assert [n[0] for n in fd.networks(given, ("plain",), (4,))] == ["digits-mlp"]
    steps = fd.phase_steps(300, 4, 0.05)
    assert [s for s, p in steps.items() if "init" in p] == [1, 6, 10, 15]
    assert [s for s, p in steps.items() if "trained" in p] == [286, 291, 295, 300]
    assert fd.phase_steps(1, 4, 0.05) == {1: ["init", "trained"]}
    with pytest.raises(ValueError, match="one learning rate"):
        fd.run(load_workload("digits-mlp", size="tiny"), steps=2, lrs=[0.1, 0.2])
