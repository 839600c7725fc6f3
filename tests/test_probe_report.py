"""The probe's report: its parts add up, and it shows itself as a dict, a table and a picture."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyco


def report_of(mode="full"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    loss_fn = lambda: F.mse_loss(model(x), y)  # noqa: E731
    blocks = pyco.blocks.by_names(model, {"hidden": ["0.*"], "head": ["2.*"]})
    grads = torch.autograd.grad(loss_fn(), blocks.params())
    return pyco.probe.cross_terms(loss_fn, blocks, [-0.2 * g for g in grads], mode=mode)


def test_parts_add_up():
    r = report_of()
    assert r.actual == pytest.approx(r.first_order.sum().item() + r.within.sum().item() + r.cross + r.remainder,
                                     rel=1e-13)
    assert r.second_order == pytest.approx(r.within.sum().item() + r.cross, rel=1e-13)
    assert r.gauss_seidel_gap == r.cross
    torch.testing.assert_close(r.row_sums, r.C.sum(dim=1))


@pytest.mark.parametrize("mode", ["full", "rows"])
def test_to_dict_is_json(mode):
    d = json.loads(json.dumps(report_of(mode).to_dict()))
    assert d["names"] == ["hidden", "head"] and d["mode"] == mode
    for key in ("loss_before", "loss_after", "actual", "first_order", "row_sums", "quadratic", "remainder",
                "predicted", "alone", "nonadditivity", "second_order"):
        assert d[key] is not None, key
    assert (d["C"] is None) == (mode == "rows") and (d["cross"] is None) == (mode == "rows")


@pytest.mark.parametrize("mode", ["full", "rows"])
def test_table_names_blocks_and_parts(mode):
    text = report_of(mode).table()
    for word in ("hidden", "head", "first order", "cross", "remainder", "non-additivity", "Gauss–Seidel"):
        assert word in text, word


def test_gauss_seidel_shares_by_order():
    r = report_of()
    assert r.gauss_seidel_gap_by_block().tolist() == [0.0, r.C[1, 0].item()]
    assert r.gauss_seidel_gap_by_block(["head", "hidden"]).tolist() == [r.C[0, 1].item(), 0.0]
    with pytest.raises(ValueError, match="every block exactly once"):
        r.gauss_seidel_gap_by_block([0, 0])


@pytest.mark.parametrize("mode", ["full", "rows"])
def test_plot_writes_a_png(tmp_path, mode):
    pytest.importorskip("matplotlib")
    path = report_of(mode).plot(str(tmp_path / "step.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
