"""What the FSDP2 tests run on every rank (gloo, CPU): a model whose every Linear is ``fully_shard``-ed (the
root too), so every parameter is a DTensor sharded on dim 0; each rank checks pyco against torch.optim on the
same sharded model and against a single-process run on the whole batch, which it computes itself.

The global batch is the concatenation of the ranks' batches (tests/_distributed.py); the losses are means,
and FSDP2 averages the gradients, so the sharded step is the single-process step on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import _distributed
from _distributed import batches, close
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import pyco

STEPS = 4


def spawn(check: str, world: int) -> None:
    """Runs ``CHECKS[check]`` of this module on ``world`` gloo processes (the launcher of tests/_distributed.py)."""
    _distributed.spawn(check, world, module=__name__, hang_seconds=150)


def refused(call, exc_type, *phrases: str, what: str) -> None:
    """``call()`` raises ``exc_type`` whose message holds every phrase; anything else fails, naming ``what``."""
    try:
        call()
    except exc_type as exc:
        for phrase in phrases:
            assert phrase in str(exc), (what, phrase, exc)
    else:
        raise AssertionError(f"{what} went ahead; expected {exc_type.__name__}")


def mlp() -> nn.Sequential:
    """Three Linear layers; the last has 1 output row, so with 2 ranks one rank's shard of it is empty."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def sharded() -> nn.Sequential:
    model = mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    return model


def closure(model, x, y):
    def run():
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    return run


def backward(model, x, y) -> None:
    model.zero_grad(set_to_none=True)
    closure(model, x, y)()


def full(model) -> list[torch.Tensor]:
    return [p.full_tensor().detach() if isinstance(p, DTensor) else p.detach() for p in model.parameters()]


def same_everywhere(values: torch.Tensor, what: str) -> None:
    """Bitwise the same tensor on every rank."""
    gathered = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, values.contiguous())
    for r, other in enumerate(gathered):
        assert torch.equal(other, values), f"{what}: rank {r} has {other.tolist()}, this rank {values.tolist()}"


# ---- the optimizers --------------------------------------------------------------------------------------

RULES = {
    "adamw": (lambda ps, **kw: pyco.optim.AdamW(ps, lr=0.01, weight_decay=0.1, **kw),
              lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=False)),
    "sgd": (lambda ps, **kw: pyco.optim.SGD(ps, lr=0.1, momentum=0.9, **kw),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False)),
}


def check_optimizers(rank: int, world: int) -> None:
    for rule, (ours, theirs) in RULES.items():
        ref, model, peer = mlp(), sharded(), sharded()
        ref_opt = ours(ref.parameters(), blocks=pyco.blocks.by_module(ref))
        opt = ours(model.parameters(), blocks=pyco.blocks.by_module(model))
        peer_opt = theirs(peer.parameters())
        for step in range(STEPS):
            x, y, gx, gy = batches(world, rank, step)
            for m, o, xs, ys in ((model, opt, x, y), (peer, peer_opt, x, y), (ref, ref_opt, gx, gy)):
                backward(m, xs, ys)
                o.step()
            for i, (p, q, r) in enumerate(zip(full(model), full(peer), full(ref))):
                close(p, q, f"{rule}: step {step}: param {i} against torch.optim on the sharded model")
                close(p, r, f"{rule}: step {step}: param {i} against the unsharded model")
            stats = opt.last_stats
            assert stats.names == ref_opt.last_stats.names
            same_everywhere(stats.values, f"{rule}: step {step}: statistics")
            close(stats.values, ref_opt.last_stats.values, f"{rule}: step {step}: statistics against unsharded")
        for p, q in zip(model.parameters(), peer.parameters()):  # state in torch's layout: DTensors, sharded alike
            for key, value in peer_opt.state[q].items():
                mine = opt.state[p][key]
                assert type(mine) is type(value), (rule, key, type(mine), type(value))
                if isinstance(value, DTensor):
                    assert mine.placements == value.placements
                    close(mine.to_local(), value.to_local(), f"{rule}: state {key!r}")
                else:
                    close(mine, value, f"{rule}: state {key!r}")
        assert opt._plans == {}  # DTensor launches are prepared every step, never planned


def check_skips_agree(rank: int, world: int) -> None:
    """An inf in one rank's shard only: every rank decides alike."""
    model = sharded()
    opt = pyco.optim.AdamW(model.parameters(), lr=0.01, nonfinite="skip", blocks=pyco.blocks.by_module(model))
    x, y, _, _ = batches(world, rank, 0)
    backward(model, x, y)
    if rank == 0:
        model[0].weight.grad.to_local()[0, 0] = float("inf")
    before = full(model)
    assert opt.step() is None
    assert opt.skipped_steps == 1 and opt.last_stats.skipped, (rank, opt.skipped_steps)
    assert all(torch.equal(p, b) for p, b in zip(full(model), before)), "a skipped step moved parameters"
    assert not opt.state

    opt = pyco.optim.AdamW(model.parameters(), lr=0.01, nonfinite="skip-block", blocks=pyco.blocks.by_module(model))
    backward(model, x, y)
    if rank == world - 1:
        model[2].weight.grad.to_local()[-1, -1] = float("nan")
    before = full(model)
    opt.step()
    assert opt.last_stats.skipped_blocks == ("2",), (rank, opt.last_stats.skipped_blocks)
    after = full(model)
    names = [name for name, _ in model.named_parameters()]
    for name, p, b in zip(names, after, before):
        assert torch.equal(p, b) == name.startswith("2."), (rank, name)
    same_everywhere(opt.last_stats.values, "skip-block statistics")


def check_refusals(rank: int, world: int) -> None:
    from torch.distributed.tensor import Partial, Replicate, distribute_tensor

    model = sharded()
    x, y, _, _ = batches(world, rank, 0)
    mesh = model[0].weight.device_mesh

    # DTensor and plain parameters in one optimizer
    plain = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = pyco.optim.AdamW([*model.parameters(), plain], lr=0.01)
    backward(model, x, y)
    plain.grad = torch.ones(3, dtype=torch.float64)
    before = full(model)
    refused(opt.step, NotImplementedError, "plain tensor", "fully_shard the root too",
            what="a step over DTensor and plain parameters")
    assert not opt.state and all(torch.equal(p, b) for p, b in zip(full(model), before))

    # a Partial parameter
    partial = nn.Parameter(DTensor.from_local(torch.ones(2, dtype=torch.float64), mesh, [Partial()]))
    partial.grad = DTensor.from_local(torch.ones(2, dtype=torch.float64), mesh, [Partial()])
    refused(pyco.optim.SGD([partial], lr=0.1).step, NotImplementedError, "Partial", "Shard or Replicate",
            what="a step of a Partial DTensor parameter")

    # a Replicate parameter: updated whole on every rank, its statistics not summed over the ranks
    whole = torch.arange(4, dtype=torch.float64)
    rep = nn.Parameter(distribute_tensor(whole.clone(), mesh, [Replicate()]))
    rep.grad = distribute_tensor(torch.ones(4, dtype=torch.float64), mesh, [Replicate()])
    opt = pyco.optim.SGD([rep], lr=0.5)
    opt.step()
    close(rep.to_local(), whole - 0.5, "a Replicate parameter")
    close(opt.last_stats.grad_sq, torch.tensor([4.0], dtype=torch.float64), "a Replicate parameter's grad_sq")

    # a state tensor that is not sharded like its parameter (a plain tensor loaded for a DTensor)
    opt = pyco.optim.AdamW(model.parameters(), lr=0.01)
    backward(model, x, y)
    opt.step()
    w = model[2].weight
    opt.state[w]["exp_avg"] = torch.zeros(w.shape, dtype=torch.float64)
    saved = {id(p): {k: (v.to_local() if isinstance(v, DTensor) else v).clone() for k, v in opt.state[p].items()}
             for p in model.parameters()}
    before = full(model)
    backward(model, x, y)
    refused(opt.step, RuntimeError, "state 'exp_avg' is a plain tensor", "set_optimizer_state_dict",
            what="a step with a plain state tensor for a DTensor parameter")
    assert all(torch.equal(p, b) for p, b in zip(full(model), before)), "a refused step moved parameters"
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(v.to_local() if isinstance(v, DTensor) else v, saved[id(p)][k]), (k, "changed")

    # the probe and ChainGaussSeidel refuse DTensor parameters, before anything happens
    blocks = pyco.blocks.by_module(model)
    update = [torch.zeros_like(p) for p in model.parameters()]
    opt = pyco.optim.SGD(model.parameters(), lr=0.1)
    before = full(model)
    for what, call in [
        ("cross_terms", lambda: pyco.probe.cross_terms(lambda: nn.functional.mse_loss(model(x), y), blocks, update)),
        ("record", lambda: pyco.probe.record(opt, closure(model, x, y), blocks)),
        ("ChainGaussSeidel", lambda: pyco.ChainGaussSeidel(opt, model, nn.functional.mse_loss)),
    ]:
        refused(call, NotImplementedError, "does not support DTensor parameters",
                "unsharded copy" if what != "ChainGaussSeidel" else "pyco.GaussSeidel", what=what)
    assert not opt.state and all(torch.equal(p, b) for p, b in zip(full(model), before))


# ---- the orders ------------------------------------------------------------------------------------------

ORDERS = {
    "gauss-seidel-backward": (lambda opt, blocks: pyco.GaussSeidel(opt, blocks, "backward"),
                              lambda ps: pyco.optim.AdamW(ps, lr=0.01)),
    "gauss-seidel-random": (lambda opt, blocks: pyco.GaussSeidel(opt, blocks, "random", seed=3),
                            lambda ps: torch.optim.Adam(ps, lr=0.01)),
    "block-coordinate-greedy": (lambda opt, blocks: pyco.BlockCoordinate(opt, blocks, "greedy", active=2),
                                lambda ps: pyco.optim.SGD(ps, lr=0.1, momentum=0.9)),
}


def check_orders(rank: int, world: int) -> None:
    for name, (wrap, make_opt) in ORDERS.items():
        ref, model = mlp(), sharded()
        ref_opt = wrap(make_opt(ref.parameters()), pyco.blocks.by_module(ref))
        opt = wrap(make_opt(model.parameters()), pyco.blocks.by_module(model))
        for step in range(3):
            x, y, gx, gy = batches(world, rank, step)
            opt.step(closure(model, x, y))
            ref_opt.step(closure(ref, gx, gy))
            for i, (p, r) in enumerate(zip(full(model), full(ref))):
                close(p, r, f"{name}: step {step}: param {i}")
            if name.startswith("block"):
                assert opt.active_blocks == ref_opt.active_blocks, (name, opt.active_blocks, ref_opt.active_blocks)
            if isinstance(opt.optimizer, pyco.optim.AdamW):
                same_everywhere(opt.last_stats.values, f"{name}: statistics")
                close(opt.last_stats.values, ref_opt.last_stats.values, f"{name}: statistics")


CHECKS = {
    "optimizers": check_optimizers,
    "skips": check_skips_agree,
    "refusals": check_refusals,
    "orders": check_orders,
}


def check_all(rank: int, world: int) -> None:
    for check in (check_optimizers, check_skips_agree, check_refusals, check_orders):
        check(rank, world)


CHECKS["all"] = check_all
