"""Beyond one machine: every order and the probe under torch.distributed (gloo, CPU processes started here).

Each case spawns ``world`` processes; every rank compares its results with a single-process run on the
whole batch (the concatenation of the ranks' batches) in float64, to 1e-12 (tests/_distributed.py).
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

# (world size, checks): the two-process run covers everything; the three-process run the orders and the probe
CASES = [(2, "all"), (3, "orders"), (3, "probe")]


@pytest.mark.parametrize("world, check", CASES, ids=[f"{w}procs-{c}" for w, c in CASES])
def test_distributed_matches_single_process(world, check):
    from _distributed import spawn

    spawn(check, world)
