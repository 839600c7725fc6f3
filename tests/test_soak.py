"""Soak: 10,000 steps of every order on a tiny model; resident memory stays flat (nothing accumulates per step:
no graph kept alive, no state or statistics piling up)."""

from __future__ import annotations

import os

import pytest
import torch
from _orders_common import batch, mlp
from torch import nn

import pyco

STEPS = 10_000
WARMUP = 500
MAX_GROWTH_MB = 20.0


def resident_mb() -> float:
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return psutil.Process().memory_info().rss / 2**20


def blocks_of(model):
    return pyco.blocks.by_module(model)


ORDERS = {
    "simultaneous": lambda model: pyco.optim.Adam(model.parameters(), lr=1e-3),
    "gauss-seidel": lambda model: pyco.GaussSeidel(pyco.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9),
                                                   blocks_of(model), "random"),
    "chain-gauss-seidel": lambda model: pyco.ChainGaussSeidel(pyco.optim.AdamW(model.parameters(), lr=1e-3),
                                                              model, nn.functional.mse_loss),
    "block-coordinate": lambda model: pyco.BlockCoordinate(pyco.optim.Adam(model.parameters(), lr=1e-3),
                                                           blocks_of(model), "reshuffle", state="reset"),
}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux) or psutil")
@pytest.mark.parametrize("order", ORDERS)
def test_memory_stays_flat_over_ten_thousand_steps(order):
    model = mlp((3, 4, 4, 2), dropout=0.1)
    opt = ORDERS[order](model)
    x, y = batch(n=8)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    step = (lambda: opt.step(x, y)) if isinstance(opt, pyco.ChainGaussSeidel) else (lambda: opt.step(closure))
    for _ in range(WARMUP):
        step()
    start = resident_mb()
    for _ in range(STEPS - WARMUP):
        loss = step()
    growth = resident_mb() - start
    assert growth < MAX_GROWTH_MB, f"{order}: resident memory grew by {growth:.1f} MB over {STEPS - WARMUP} steps"
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
