"""Workloads: the interface every study consumes, the SPECs that name them, the built-in ones at their tiny
size, a user's own factory through every study, the tied-embedding GPT under the exact probe, and the
errors a researcher meets first (each one readable, none leaving a run directory behind)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import pyco  # noqa: E402
from pyco import cli, studies  # noqa: E402
from pyco.probe import reference  # noqa: E402
from pyco.studies import Recipe, Workload, WorkloadError, load_workload, workloads  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.fixture
def user_module(monkeypatch):
    """tests/ on sys.path, as ``PYTHONPATH=tests`` would put it, for ``--workload user_workloads:...``."""
    monkeypatch.syspath_prepend(str(HERE))
    import user_workloads

    return user_workloads


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ---- a user's factory through every study -----------------------------------------------------------

@pytest.mark.parametrize("study", studies.names())
def test_user_factory_runs_through_every_study(study, user_module, tmp_path):
    out = tmp_path / study
    argv = ["study", study, "--workload", "user_workloads:make", "--out", str(out), "--no-progress", "--quick",
            "--seed", "2"]
    if study == "dosage":  # its synthetic part 2 keeps its own length
        argv += ["--steps", "8"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["partial"] is False and results["study"] == study
    cfg = results["config"]
    assert cfg["workload"] == "two-tower" and cfg["spec"] == "user_workloads:make" and cfg["seeds"][0] == 2
    assert cfg["workload_summary"]["blocks"] == ["left.0", "right.0", "head"]  # by_module, the default
    assert cfg["workload_summary"]["parameters"] == sum(p.numel() for p in user_module.TwoTower().parameters())
    assert (out / "report.md").read_text().count("two-tower") >= 1


def test_python_api_returns_results_and_writes_nothing(user_module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = studies.load("coadaptation").run(user_module.make, steps=4, lrs=[0.05], probes=2, seeds=1)
    assert list(tmp_path.iterdir()) == []
    (run,) = results["runs"]
    assert run["lr"] == 0.05 and [p["step"] for p in run["probes"]] == [1, 4]
    assert set(run["eval"]) == {"loss", "accuracy"}
    for p in run["probes"]:
        parts = p["first_order"] + p["within"] + p["cross"] + p["remainder"]
        assert parts == pytest.approx(p["actual"], rel=1e-9, abs=1e-12)


def test_spec_from_pythonpath_in_a_fresh_process(tmp_path):
    """The command as a user types it: ``PYTHONPATH=<dir> pyco study ... --workload module:function``."""
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pyco.cli", "study", "step-size", "--workload",
                           "user_workloads:make_sized", "--width", "5", "--steps", "3", "--no-progress", "--out",
                           str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert cfg["workload"] == "two-tower-5" and cfg["workload_options"] == {"width": 5}


# ---- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, extra, message", [
    ("no_such_module_xyz:make", [], "cannot import module 'no_such_module_xyz'"),
    ("user_workloads:nothing", [], "module 'user_workloads' has no 'nothing'; expected a function make(seed)"),
    ("user_workloads:NOT_A_FUNCTION", [], "'NOT_A_FUNCTION' is a int, not a function"),
    ("user_workloads:make_dict", [], "returned a dict; expected a pyco.studies.Workload"),
    ("user_workloads:make_vector_loss", [], "must return a scalar tensor, got one of shape [16]"),
    ("user_workloads:make_missing_blocks", [], "param right.0.weight, param right.0.bias of workload "
                                               "'two-tower-missing''s model in no block"),
    ("user_workloads:make", ["--depth", "3"], "the factory takes no option 'depth'; it takes only the seed"),
    ("no-such-workload", [], "unknown workload 'no-such-workload'; built-in workloads: digits-mlp"),
    ("stdlib-gpt", ["--size", "gpu"], "size 'gpu' (~99M parameters) is sized for a GPU and is refused on cpu"),
    ("mnist1d-cnn", ["--workload-option", "colour=3"], "takes no option 'colour'; it takes size, depth, width, device"),
])
def test_bad_workloads_are_one_line_and_leave_nothing_on_disk(spec, extra, message, user_module, tmp_path, capsys):
    out = tmp_path / "never"
    err = cli_error(["study", "coadaptation", "--workload", spec, *extra, "--out", str(out), "--no-progress"], capsys)
    assert message in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_workload_checks_at_construction():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(WorkloadError, match=r"train_batches must be an iterable"):
        Workload(name="w", model=model, loss_fn=lambda m, b: m(b).sum(), train_batches=3)
    with pytest.raises(WorkloadError, match=r"model must be an nn.Module, got function"):
        Workload(name="w", model=lambda x: x, loss_fn=lambda m, b: 0, train_batches=[1])
    with pytest.raises(WorkloadError, match=r"recipe optimizer must be one of"):
        Recipe(optimizer="lbfgs")
    tied = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(WorkloadError, match=r"default blocks by_module\(model\) failed: .*shared='first'"):
        Workload(name="lm", model=tied, loss_fn=lambda m, b: m(b).sum(), train_batches=[torch.tensor([1])])


def test_batches_cycle_a_list_and_refuse_an_exhausted_iterator():
    model = torch.nn.Linear(1, 1)
    loss = lambda m, b: m(b).sum()  # noqa: E731
    items = [torch.ones(1, 1) * i for i in range(3)]
    w = Workload(name="cycle", model=model, loss_fn=loss, train_batches=items)
    it = w.batches()
    assert [next(it).item() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    w = Workload(name="once", model=model, loss_fn=loss, train_batches=iter(items))
    it = w.batches()
    [next(it) for _ in range(3)]
    with pytest.raises(WorkloadError, match=r"train_batches, an iterator, ran out after 3 batches"):
        next(it)


# ---- the built-in workloads ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", workloads.names())
def test_builtin_builds_steps_and_evaluates_at_tiny_size(name):
    factory = load_workload(name, size="tiny")
    w = factory(0)
    assert w.name == name and w.recipe.steps >= 1 and w.config["size"] == "tiny"
    w.blocks.check_covers([p for p in w.model.parameters() if p.requires_grad])
    opt = w.recipe.make(w.model.parameters(), blocks=w.blocks)
    batches = w.batches()
    before = [p.detach().clone() for p in w.model.parameters()]
    for _ in range(3):
        batch = next(batches)
        opt.zero_grad()
        loss = w.loss(batch)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, w.model.parameters()))
    metrics = w.evaluate()
    assert {"loss"} <= set(metrics) and all(v == v for v in metrics.values())
    assert ("accuracy" in metrics) != (name == "stdlib-gpt") and ("bits_per_byte" in metrics) == (name == "stdlib-gpt")
    if name == "stdlib-gpt":
        assert metrics["bits_per_byte"] == pytest.approx(metrics["loss"] / torch.log(torch.tensor(2.0)).item())
    # the seed moves the initialisation and the batches, the same seed gives the same ones
    again, other = factory(0), factory(1)
    assert all(torch.equal(a, b) for a, b in zip(again.model.parameters(), factory(0).model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(again.model.parameters(), other.model.parameters()))
    first = lambda w_: next(w_.batches())[0]  # noqa: E731
    assert torch.equal(first(again), first(factory(0))) and not torch.equal(first(again), first(other))


def test_chain_workloads_run_chain_gauss_seidel_like_the_generic_sweep():
    from pyco.studies.workloads import mnist1d

    w = load_workload("mnist1d-cnn", size="tiny")(0)
    assert w.is_chain
    x, y = next(w.batches())
    models = [mnist1d.cnn(4, 1).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    chain = pyco.ChainGaussSeidel(torch.optim.SGD(models[0].parameters(), lr=0.1), models[0], w.chain_loss)
    chain.step(x.double(), y)
    generic = pyco.GaussSeidel(torch.optim.SGD(models[1].parameters(), lr=0.1), pyco.blocks.by_module(models[1]),
                               model=models[1])

    def closure():
        loss = w.loss((x.double(), y), models[1])
        loss.backward()
        return loss

    generic.step(closure)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_gpu_sizes_are_documented_and_refused_on_cpu():
    for name in workloads.names():
        with pytest.raises(WorkloadError, match=r"size 'gpu' .* refused on cpu; run it with --device cuda"):
            load_workload(name, size="gpu")(0)


def test_mnist1d_is_generated_offline_and_deterministically(monkeypatch):
    import numpy as np

    from pyco.studies.workloads import mnist1d

    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-1D generation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    np.random.seed(7)
    state = np.random.get_state()[1].copy()
    a = mnist1d.generate.__wrapped__()
    b = mnist1d.generate.__wrapped__()
    assert np.array_equal(np.random.get_state()[1], state)  # numpy's global random state left as it was
    assert [t.shape for t in a] == [(4000, 40), (4000,), (1000, 40), (1000,)]
    assert all(np.array_equal(s, t) for s, t in zip(a, b))
    assert sorted(set(a[1].tolist())) == list(range(10))


def test_stdlib_corpus_is_split_by_file():
    from pyco.studies.workloads import stdlib_gpt

    train, val, info = stdlib_gpt.corpus("fixed")
    assert not set(stdlib_gpt.TRAIN_FILES) & set(stdlib_gpt.VALIDATION_FILES)
    assert info["train_files"] == len(stdlib_gpt.TRAIN_FILES) and info["train_bytes"] == train.numel() > 10 ** 6
    assert val.numel() == info["validation_bytes"] > 10 ** 4
    assert bytes(val[:20000].tolist()).decode("utf-8", "replace").count("def ") > 0  # Python source


def test_stdlib_gpt_cpu_size_and_tied_blocks():
    from pyco.studies.workloads import stdlib_gpt

    with torch.device("meta"):
        model = stdlib_gpt.GPT(**{k: stdlib_gpt.SIZES["cpu"][k] for k in ("depth", "width", "heads", "context")})
    assert model.head.weight is model.wte.weight
    assert sum(p.numel() for p in model.parameters()) >= 10 ** 6
    assert stdlib_gpt.SIZES["cpu"]["depth"] == 4 and 128 <= stdlib_gpt.SIZES["cpu"]["width"] <= 256
    blocks = pyco.blocks.by_module(model, shared="first")
    assert "head" not in blocks.names and model.wte.weight in blocks["wte"]
    with torch.device("meta"):
        gpu = stdlib_gpt.GPT(**{k: stdlib_gpt.SIZES["gpu"][k] for k in ("depth", "width", "heads", "context")})
    assert 90e6 <= sum(p.numel() for p in gpu.parameters()) <= 110e6


# ---- the probe on the transformer ------------------------------------------------------------------------

def tiny_gpt():
    from pyco.studies.workloads import stdlib_gpt

    torch.manual_seed(0)  # a vocabulary of 8: the dense Hessian over ~300 parameters stays quick
    model = stdlib_gpt.GPT(depth=1, width=4, heads=2, context=4, vocab=8).double()
    x = torch.randint(0, 8, (2, 4), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 8, (2, 4), generator=torch.Generator().manual_seed(2))
    return model, (x, y), stdlib_gpt.lm_loss


def test_probe_on_the_gpt_matches_the_dense_hessian():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, batch, lm_loss = tiny_gpt()
    blocks = pyco.blocks.by_module(model, shared="first")
    params = blocks.params()
    gen = torch.Generator().manual_seed(3)
    update = [1e-2 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    report = pyco.probe.cross_terms(lambda: lm_loss(model, batch), blocks, update)
    # the dense reference differentiates twice too: outside the probe, the math backend has to be asked for
    # (the fused CPU attention kernel has no double backward)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = reference.cross_terms(reference.loss_of_module(model, params, lambda m: lm_loss(m, batch)), params,
                                    [len(blocks[n]) for n in blocks.names], update)
    scale = ref.C.abs().max()
    assert (report.C - ref.C).abs().max() <= 1e-10 * scale
    assert (report.first_order - ref.first_order).abs().max() <= 1e-10 * ref.first_order.abs().max()
    assert report.actual == pytest.approx(ref.actual, rel=1e-10)
    assert report.alone.tolist() == pytest.approx(ref.alone.tolist(), rel=1e-10, abs=1e-15)


def test_record_on_the_gpt_uses_the_math_attention_backend():
    """Double backward through scaled_dot_product_attention needs the math backend; the probe selects it
    while it evaluates the loss, whatever the caller selected."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, batch, lm_loss = tiny_gpt()
    blocks = pyco.blocks.by_module(model, shared="first")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []

    def closure():
        seen.append((torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        opt.zero_grad()
        loss = lm_loss(model, batch)
        loss.backward()
        return loss

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        report = pyco.probe.record(opt, closure, blocks)
    assert seen[0] == (True, True)  # the real step: the caller's choice
    assert seen[1:] and all(s == (True, False) for s in seen[1:])  # the probe's evaluations: math only
    parts = report.first_order.sum() + 0.5 * report.C.sum() + report.remainder
    assert float(parts) == pytest.approx(report.actual, rel=1e-9)


# ---- the benchmark ---------------------------------------------------------------------------------------

def test_bench_workloads_writes_ratios_spreads_threads_and_load(user_module, tmp_path, capsys):
    sys.path.insert(0, str(HERE.parent / "benchmarks"))
    try:
        import bench_workloads
    finally:
        sys.path.remove(str(HERE.parent / "benchmarks"))
    out = tmp_path / "workloads.json"
    assert bench_workloads.main(["--size", "tiny", "--workloads", "mnist1d-cnn", "user_workloads:make", "--rounds",
                                 "3", "--budget-seeds", "2", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert {"threads", "load_average_before", "load_average_after", "device_name", "rounds"} <= set(result)
    cnn, user = result["workloads"]
    assert cnn["chain"] and "gauss-seidel chain" in cnn["rows"] and "gauss-seidel chain" not in user["rows"]
    assert user["spec"] == "user_workloads:make" and user["blocks"] == 3
    for w in (cnn, user):
        sim = w["rows"]["simultaneous"]
        assert sim["ratio"] == 1.0 and {"probe full C", "probe rows", "record"} <= set(w["rows"])
        for row in w["rows"].values():
            assert len(row["times_ms"]) == 3 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]
            assert row["ratio"] == pytest.approx(row["median_ms"] / sim["median_ms"])
            assert row["ratio_min"] <= row["ratio_max"]
        # Coupled at every = N: one solving and N − 1 reusing steps, from the medians of the same rounds
        solve, reuse = w["rows"]["coupled solve"]["median_ms"], w["rows"]["coupled reuse"]["median_ms"]
        for n in (1, 10, 100):
            c = w["coupled"][str(n)]
            assert c["ratio"] == pytest.approx((solve + (n - 1) * reuse) / n / sim["median_ms"])
            assert c["ratio_min"] <= c["ratio_max"]
        assert w["coupled"]["1"]["ratio"] == pytest.approx(w["rows"]["coupled solve"]["ratio"])
    budget = {b["workload"]: b for b in result["budget"]}
    assert [r["seed"] for r in budget["mnist1d-cnn"]["runs"]] == [0, 1]
    acc = budget["mnist1d-cnn"]["metrics"]["accuracy"]
    assert acc["low"] <= acc["mean"] <= acc["high"] and acc["mean"] == pytest.approx(sum(acc["values"]) / 2)
    assert budget["two-tower"]["recipe"]["steps"] == 8


def test_feature_drift_differentiates_twice_through_attention():
    """The study's own Hessian-vector products on the GPT need the math attention backend, as the probe's do."""
    results = studies.load("feature-drift").run(load_workload("stdlib-gpt", size="tiny"), steps=1, lrs=[1e-5],
                                            seeds=1)
    rows = [r for r in results["rows"] if r["phase"] == "trained"]
    assert rows[0]["block"] == "wte" and rows[0]["feature_drift"] == 0.0  # token ids do not drift
    assert min(r["prediction_cosine"] for r in rows[1:]) > 0.9


def test_digits_init_and_recipe_options():
    he, own = (load_workload("digits-mlp", **o)(0) for o in ({}, dict(init="torch", lr=0.1, momentum=0)))
    lin_he = [m for m in he.model.modules() if isinstance(m, torch.nn.Linear)]
    lin_own = [m for m in own.model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(float(m.bias.detach().abs().max()) == 0 for m in lin_he)  # He: zero biases
    for m in lin_own:  # nn.Linear's own: uniform in ±1/sqrt(fan-in), biases too
        bound = 1 / m.in_features ** 0.5
        assert 0 < float(m.bias.detach().abs().max()) <= bound and float(m.weight.detach().abs().max()) <= bound
    assert (own.recipe.lr, own.recipe.momentum) == (0.1, 0.0) and (he.recipe.lr, he.recipe.momentum) == (0.05, 0.9)
    assert own.config["init"] == "torch" and "initialisation" in own.description
    assert "test accuracy" not in own.description  # the documented accuracy is the default set-up's
    with pytest.raises(WorkloadError, match="init must be one of"):
        load_workload("digits-mlp", init="xavier")(0)
    with pytest.raises(WorkloadError, match="momentum must be a number in"):
        load_workload("digits-mlp", momentum=1.5)(0)
