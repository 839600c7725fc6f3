"""pyco's optimizers on FSDP2 (``torch.distributed.fsdp.fully_shard``, DTensor parameters): two CPU processes
joined by gloo (tests/_fsdp.py). pyco AdamW and SGD equal torch.optim's on the same sharded model and the
single-process step on the whole batch (float64, to 1e-12), with statistics that are the same on every rank
and equal to the unsharded model's; skips are decided alike on every rank; the orders work; what is not
supported (the probe, ChainGaussSeidel, Partial placements, mixed DTensor and plain parameters, state not
sharded like its parameter) is refused with nothing changed."""

from __future__ import annotations

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def test_fsdp2_two_processes():
    pytest.importorskip("torch.distributed.fsdp", reason="this torch has no torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    from _fsdp import spawn

    spawn("all", 2)
