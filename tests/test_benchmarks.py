"""The benchmark scripts run end to end at tiny sizes and write consistent JSON (the figures themselves are
machine-dependent and not asserted; their bookkeeping is)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as `python benchmarks/bench_x.py` would, for bench_common

import bench_orders  # noqa: E402
import bench_probe  # noqa: E402
import bench_update  # noqa: E402

MACHINE_KEYS = {"device", "device_name", "threads", "torch", "pyco"}


def run(module, argv: list[str], tmp_path: Path, capsys) -> dict:
    out = tmp_path / "result.json"
    assert module.main([*argv, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert MACHINE_KEYS <= set(result) and result["device"].startswith("cpu")
    return result


def check_rows(rows: dict, repeats: int) -> None:
    for name, row in rows.items():
        times = row.get("times_ms")
        if times is not None:
            assert len(times) == repeats, name
            assert row["median_ms"] == pytest.approx(statistics.median(times)), name
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"], name


def test_update(tmp_path, capsys):
    result = run(bench_update, ["--quick", "--repeats", "3", "--rules", "sgd"], tmp_path, capsys)
    rows = result["rules"]["sgd"]
    assert {"torch for-loop", "torch foreach", "torch fused", "pyco", "pyco + stats"} <= set(rows)
    check_rows(rows, 3)
    fastest = min(rows[n]["median_ms"] for n in ("torch for-loop", "torch foreach", "torch fused"))
    for row in rows.values():
        assert row["speedup_vs_fastest_torch"] == pytest.approx(fastest / row["median_ms"])
        assert row["GBps"] == pytest.approx(20 * result["elements"] / (row["median_ms"] * 1e6))
    assert rows["pyco + stats"]["stats_overhead"] == pytest.approx(
        rows["pyco + stats"]["median_ms"] / rows["pyco"]["median_ms"] - 1)


def test_orders(tmp_path, capsys):
    result = run(bench_orders, ["--k", "2", "--width", "16", "--batch", "4", "--repeats", "3"], tmp_path, capsys)
    (chain,) = result["chains"]
    assert chain["k"] == 2
    assert {"simultaneous", "gauss-seidel naive", "gauss-seidel chain", "coupled solve", "coupled reuse"} <= set(
        chain["rows"])
    check_rows(chain["rows"], 3)
    rows, ratios = chain["rows"], chain["ratios"]
    solve, reuse, sim = (rows[n]["median_ms"] for n in ("coupled solve", "coupled reuse", "simultaneous"))
    for n in (1, 10, 100):
        assert ratios[f"coupled_every_{n}_vs_simultaneous"] == pytest.approx((solve + (n - 1) * reuse) / n / sim)


# torch's forward-mode AD (the torch.func peer) loads its decompositions through torch.jit, which warns.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_probe(tmp_path, capsys):
    result = run(bench_probe, ["--models", "mlp", "--ks", "2", "--rounds", "3", "--no-curvlinops"], tmp_path, capsys)
    (case,) = result["cases"]["mlp"]
    assert case["k"] == 2 and "pyco full C" in case["rows"]
    check_rows(case["rows"], 3)


@pytest.mark.parametrize("module, argv", [(bench_update, ["--repeats", "2"]), (bench_probe, ["--rounds", "1"])])
def test_too_few_repeats_is_refused(module, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2
    assert "at least 3 for a median" in capsys.readouterr().err
