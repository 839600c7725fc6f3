"""FusedOptimizer.step_blocks: any subset of an order's blocks in one launch, equal to a plain step in which
only those blocks' parameters hold a gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyco
from pyco.blocks import Blocks

KINDS = {
    "SGD": lambda groups: pyco.optim.SGD(groups, lr=0.1, momentum=0.9),
    "Adam": lambda groups: pyco.optim.Adam(groups, lr=0.01),
}


def params_and_blocks(seed=0):
    """Five tensors in two param groups (different learning rates); blocks cut across the groups."""
    gen = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in [(3, 2), (2,), (4,), (2, 2), (5,)]]
    groups = [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.003}]
    blocks = Blocks([("a", [ps[0], ps[3]]), ("b", [ps[1]]), ("c", [ps[2], ps[4]])])
    return ps, groups, blocks


def set_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("schedule", [[["a"], ["b", "c"], ["a", "c"]], [["c"], ["c"], ["a", "b", "c"]]], ids=str)
def test_step_blocks_equals_a_step_with_only_those_gradients(kind, schedule):
    ps, groups, blocks = params_and_blocks()
    twin = [nn.Parameter(p.detach().clone()) for p in ps]
    twin_groups = [{**groups[0], "params": twin[:3]}, {**groups[1], "params": twin[3:]}]
    ours, plain = KINDS[kind](groups), KINDS[kind](twin_groups)
    position = {id(p): i for i, p in enumerate(ps)}
    twin_blocks = Blocks([(n, [twin[position[id(p)]] for p in blocks[n]]) for n in blocks])
    for step, active in enumerate(schedule):
        set_grads(ps, step)
        set_grads(twin, step)
        for n in blocks:
            if n not in active:
                for p in twin_blocks[n]:
                    p.grad = None
        stats = ours.step_blocks(blocks, active)
        plain.step()
        for i, (p, q) in enumerate(zip(ps, twin)):
            assert torch.equal(p, q), f"step {step}: param {i}"
            assert set(ours.state.get(p, {})) == set(plain.state.get(q, {})), f"step {step}: state of param {i}"
        assert stats is ours.last_stats and stats.names == ("a", "b", "c")
        assert [n for n in blocks if stats[n]["grad_sq"] > 0] == sorted(active)
    ours.step()  # a plain step afterwards reports on the optimizer's own blocks again
    assert ours.last_stats.names == ("group0", "group1")


def test_step_blocks_errors_change_nothing():
    ps, groups, blocks = params_and_blocks()
    opt = KINDS["Adam"](groups)
    set_grads(ps, 0)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(KeyError, match=r"no block named 'z'; blocks are \['a', 'b', 'c'\]"):
        opt.step_blocks(blocks, ["a", "z"])
    with pytest.raises(TypeError, match=r"blocks must be a pyco\.blocks\.Blocks, got dict"):
        opt.step_blocks({"a": ps}, ["a"])
    partial = Blocks([("a", ps[:2])])
    with pytest.raises(ValueError, match=r"in no block: every parameter needs exactly one block"):
        opt.step_blocks(partial, ["a"])
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and len(opt.state) == 0


def test_step_blocks_follows_added_param_groups():
    ps, groups, blocks = params_and_blocks()
    opt = KINDS["SGD"](groups)
    set_grads(ps, 0)
    opt.step_blocks(blocks, ["a"])
    extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"in no block"):  # the cached partition is re-checked
        opt.step_blocks(blocks, ["a"])
    grown = Blocks([*blocks.items(), ("extra", [extra])])
    opt.step_blocks(grown, ["extra"])
    assert torch.equal(extra.detach(), torch.full((2,), -0.1, dtype=torch.float64))
    assert opt.last_stats.names == ("a", "b", "c", "extra")
