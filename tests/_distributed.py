"""What the multi-process tests run on every rank (gloo, CPU): each rank checks its own results against a
single-process reference on the whole batch, which it computes itself (no file, no queue: a failed check is
an exception, which torch.multiprocessing.spawn reports with the rank's traceback).

The global batch is the concatenation of the ranks' batches, all of the same size, and the losses are means:
then DDP's average of the ranks' gradients is the gradient of the global loss.
"""

from __future__ import annotations

import datetime
import faulthandler
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from _orders_common import make_closure
from torch.nn.parallel import DistributedDataParallel as DDP

import pyco

PER_RANK = 4  # examples per rank
STEPS = 3
RTOL = ATOL = 1e-12


def spawn(check: str, world: int, module: str = __name__, hang_seconds: int = 120) -> None:
    """Runs ``CHECKS[check]`` of ``module`` (this one, or another module of checks) on ``world`` processes
    joined by the gloo backend over a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_main, args=(world, port, check, module, hang_seconds), nprocs=world, join=True)


def _main(rank: int, world: int, port: int, check: str, module: str, hang_seconds: int) -> None:
    import importlib

    faulthandler.dump_traceback_later(hang_seconds, exit=True)  # a rank that hangs prints where, and ends the test
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        importlib.import_module(module).CHECKS[check](rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---- shared pieces ---------------------------------------------------------------------------------------

def mlp() -> nn.Sequential:
    torch.manual_seed(0)  # every rank and the reference start from the same weights
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def batches(world: int, rank: int, step: int):
    """(local x, local y, global x, global y) of a step: this rank's slice of the global batch."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(PER_RANK * world, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(PER_RANK * world, 2, generator=gen, dtype=torch.float64)
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return x[part], y[part], x, y


def close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def same_params(a: nn.Module, b: nn.Module, what: str) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        close(p.detach(), q.detach(), f"{what}: {name}")


# ---- orders ----------------------------------------------------------------------------------------------

# name -> (make the wrapper around an optimizer, given blocks; DDP options; inner optimizer)
ORDERS = {
    "simultaneous": (None, {}, lambda ps: pyco.optim.Adam(ps, lr=0.01)),
    "gauss-seidel-backward": (lambda opt, blocks: pyco.GaussSeidel(opt, blocks, "backward"), {},
                              lambda ps: pyco.optim.SGD(ps, lr=0.1, momentum=0.9)),
    "gauss-seidel-random": (lambda opt, blocks: pyco.GaussSeidel(opt, blocks, "random", seed=3), {},
                            lambda ps: torch.optim.Adam(ps, lr=0.01)),
    "block-coordinate-cyclic": (lambda opt, blocks: pyco.BlockCoordinate(opt, blocks, "cyclic"),
                                dict(find_unused_parameters=True), lambda ps: pyco.optim.AdamW(ps, lr=0.01)),
    "block-coordinate-greedy": (lambda opt, blocks: pyco.BlockCoordinate(opt, blocks, "greedy", active=2,
                                                                         state="reset"),
                                dict(find_unused_parameters=True), lambda ps: pyco.optim.SGD(ps, lr=0.1,
                                                                                               momentum=0.9)),
}


def check_orders(rank: int, world: int) -> None:
    for name, (wrap, ddp_options, make_opt) in ORDERS.items():
        ref, model = mlp(), mlp()
        ddp = DDP(model, **ddp_options)
        ref_opt, opt = make_opt(ref.parameters()), make_opt(ddp.parameters())
        if wrap is not None:
            ref_opt, opt = wrap(ref_opt, pyco.blocks.by_module(ref)), wrap(opt, pyco.blocks.by_module(ddp))
        for step in range(STEPS):
            x, y, gx, gy = batches(world, rank, step)
            loss = opt.step(make_closure(ddp, x, y))
            ref_loss = ref_opt.step(make_closure(ref, gx, gy))
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            close(mean_loss / world, ref_loss.detach(), f"{name}: loss at step {step}")
            same_params(model, ref, f"{name}: step {step}")
        if wrap is not None and name.startswith("block"):
            active = tuple(n.removeprefix("module.") for n in opt.active_blocks)  # by_module(ddp): "module.0"
            assert active == ref_opt.active_blocks, (name, active, ref_opt.active_blocks)


def check_chain(rank: int, world: int) -> None:
    """ChainGaussSeidel on the chain itself, gradients averaged through process_group."""
    ref, model = mlp(), mlp()
    ref_opt = pyco.ChainGaussSeidel(pyco.optim.Adam(ref.parameters(), lr=0.01), ref, nn.functional.mse_loss)
    opt = pyco.ChainGaussSeidel(pyco.optim.Adam(model.parameters(), lr=0.01), model, nn.functional.mse_loss,
                                process_group=dist.group.WORLD)
    for step in range(STEPS):
        x, y, gx, gy = batches(world, rank, step)
        opt.step(x, y)
        ref_opt.step(gx, gy)
        same_params(model, ref, f"chain: step {step}")
    try:
        pyco.ChainGaussSeidel(pyco.optim.Adam(model.parameters()), DDP(mlp()), nn.functional.mse_loss)
    except TypeError as exc:
        assert "pass the chain itself (ddp.module)" in str(exc), exc
    else:
        raise AssertionError("ChainGaussSeidel accepted a DDP model")


def check_block_coordinate_refuses_ddp_without_unused(rank: int, world: int) -> None:
    model = mlp()
    ddp = DDP(model)  # find_unused_parameters=False
    try:
        pyco.BlockCoordinate(pyco.optim.SGD(ddp.parameters(), lr=0.1), pyco.blocks.by_module(ddp))
    except ValueError as exc:
        assert "find_unused_parameters=True" in str(exc), exc
    else:
        raise AssertionError("BlockCoordinate accepted a DDP without find_unused_parameters")
    # Blocks from the inner model: the wrapper cannot see the DDP until the closure's forward reaches it.
    opt = pyco.BlockCoordinate(pyco.optim.SGD(ddp.parameters(), lr=0.1), pyco.blocks.by_module(model))
    before = [p.detach().clone() for p in model.parameters()]
    x, y, _, _ = batches(world, rank, 0)
    try:
        opt.step(make_closure(ddp, x, y))
    except ValueError as exc:
        assert "find_unused_parameters=True" in str(exc), exc
    else:
        raise AssertionError("BlockCoordinate stepped through a DDP without find_unused_parameters")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "a refused step moved parameters"
    assert opt.steps == 0 and opt.active_blocks == () and all(p.requires_grad for p in model.parameters())


# ---- the probe -------------------------------------------------------------------------------------------

def check_probe(rank: int, world: int) -> None:
    group = dist.group.WORLD
    ref, model = mlp(), mlp()
    ddp = DDP(model)
    x, y, gx, gy = batches(world, rank, 0)
    update = [0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype)
              for i, p in enumerate(model.parameters())]
    expected = pyco.probe.cross_terms(lambda: nn.functional.mse_loss(ref(gx), gy), pyco.blocks.by_module(ref),
                                      update)
    for what, blocks, loss_fn in [
        ("ddp.module in loss_fn", pyco.blocks.by_module(model), lambda: nn.functional.mse_loss(model(x), y)),
        ("DDP bypassed", pyco.blocks.by_module(ddp), lambda: nn.functional.mse_loss(ddp(x), y)),
    ]:
        got = pyco.probe.cross_terms(loss_fn, blocks, update, process_group=group)
        compare_reports(got, expected, f"cross_terms ({what})")
    rows = pyco.probe.cross_terms(lambda: nn.functional.mse_loss(model(x), y), pyco.blocks.by_module(model),
                                  update, mode="rows", alone=False, process_group=group)
    close(rows.row_sums, expected.row_sums, "rows: row sums")
    try:  # double backward through DDP's reducer: refused with the fix
        pyco.probe.cross_terms(lambda: nn.functional.mse_loss(ddp(x), y), pyco.blocks.by_module(model), update,
                               process_group=group)
    except TypeError as exc:
        assert "ddp.module" in str(exc), exc
    else:
        raise AssertionError("the probe ran through DDP")

    # record: the real step goes through DDP, the probe through its module; every rank gets the global report
    ref_opt = pyco.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = pyco.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    expected = pyco.probe.record(ref_opt, make_closure(ref, gx, gy), pyco.blocks.by_module(ref))
    got = pyco.probe.record(opt, make_closure(ddp, x, y), pyco.blocks.by_module(ddp), process_group=group)
    compare_reports(got, expected, "record")
    same_params(model, ref, "record: the step")
    # DDP still works afterwards (the bypass is gone)
    assert "forward" not in ddp.__dict__
    opt.step(make_closure(ddp, x, y))
    ref_opt.step(make_closure(ref, gx, gy))
    same_params(model, ref, "a step after record")


def compare_reports(got, expected, what: str) -> None:
    assert got.names[-1].endswith(expected.names[-1]), (got.names, expected.names)
    for field in ("first_order", "C", "row_sums", "alone"):
        close(getattr(got, field), getattr(expected, field), f"{what}: {field}")
    for field in ("loss_before", "loss_after", "quadratic"):
        close(torch.tensor(getattr(got, field)), torch.tensor(getattr(expected, field)), f"{what}: {field}")


CHECKS = {
    "orders": check_orders,
    "chain": check_chain,
    "block-coordinate-refuses": check_block_coordinate_refuses_ddp_without_unused,
    "probe": check_probe,
}


def check_all(rank: int, world: int) -> None:
    for check in (check_orders, check_chain, check_block_coordinate_refuses_ddp_without_unused, check_probe):
        check(rank, world)


CHECKS["all"] = check_all
