"""pyco.ChainGaussSeidel: the incremental sweep on nn.Sequential gives the generic sweep's update (float64,
1e-12) while recomputing only the part of the chain that moved."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyco
from pyco.blocks import by_module, by_names
from _orders_common import OPTIMIZERS, batch, make_closure, max_difference, mlp

MODELS = {
    "tanh": lambda: mlp((3, 6, 5, 4, 2)),
    "dropout": lambda: mlp((3, 6, 5, 4, 2), dropout=0.3),
    "batchnorm+dropout": lambda: mlp((3, 6, 5, 2), batchnorm=True, dropout=0.2),
}
SWEEPS = ["backward", "forward", "random", ["4", "0", "6", "2"]]


def sweep_for(model, sweep):
    names = list(by_module(model))
    return sweep if isinstance(sweep, str) else names[:1] + names[:0:-1]  # a mixed order over any chain


def run_both(model, inner, sweep, blocks=None, steps=3, seed=0):
    """The same steps through GaussSeidel with a closure and through ChainGaussSeidel; returns the two models
    and the losses and random states each path produced."""
    generic_model, chain_model = model, copy.deepcopy(model)
    x, y = batch(d_in=3, d_out=2)
    generic = pyco.GaussSeidel(inner(generic_model.parameters()),
                               by_module(generic_model) if blocks is None else blocks(generic_model),
                               sweep_for(model, sweep), seed=seed)
    chain = pyco.ChainGaussSeidel(inner(chain_model.parameters()), chain_model, nn.functional.mse_loss,
                                  None if blocks is None else blocks(chain_model), sweep_for(model, sweep), seed=seed)
    record = {"generic": [], "chain": []}
    for step in range(steps):
        torch.manual_seed(step)
        loss = generic.step(make_closure(generic_model, x, y))
        record["generic"].append((loss.item(), torch.get_rng_state()))
        torch.manual_seed(step)
        loss = chain.step(x, y)
        record["chain"].append((loss.item(), torch.get_rng_state()))
    return generic_model, chain_model, record


@pytest.mark.parametrize("kind", ["torch.SGD", "pyco.Adam", "pyco.AdamW"])
@pytest.mark.parametrize("sweep", SWEEPS, ids=str)
@pytest.mark.parametrize("model", MODELS)
def test_incremental_sweep_equals_generic_sweep(model, sweep, kind):
    generic, chain, record = run_both(MODELS[model](), OPTIMIZERS[kind], sweep)
    assert max_difference(generic, chain) < 1e-12
    for (loss_g, rng_g), (loss_c, rng_c) in zip(record["generic"], record["chain"]):
        assert loss_g == pytest.approx(loss_c, rel=1e-12)
        assert torch.equal(rng_g, rng_c)  # both leave the generator as one evaluation would


def test_blocks_that_do_not_align_with_the_chain_are_still_exact():
    # Block "ends" holds the first and the last layer: its entry is child 0, so every recomputation after it
    # starts at the bottom; correct, only slower.
    def blocks(model):
        return by_names(model, {"ends": ["0.*", "9.*"], "middle": ["3.*"], "third": ["6.*"]})

    generic, chain, _ = run_both(mlp((3, 6, 5, 4, 2), dropout=0.3), OPTIMIZERS["pyco.SGD"], "backward", blocks)
    assert max_difference(generic, chain) < 1e-12


@pytest.mark.parametrize("sweep, expected_calls", [
    # k = 4 Linear blocks "0", "2", "4", "6"; calls of each Linear in one step (the generic path: 4 each).
    # Backward sweep: the first forward runs every layer; after the block above b moved, b's own layer is
    # unchanged and its graph unused, so the forward restarts just above it: layers b+1..3 only.
    ("backward", [1, 2, 3, 4]),
    # Forward sweep: block b's gradient needs the move of block b - 1, so the forward restarts at b - 1.
    ("forward", [2, 3, 4, 4]),
    # Mixed: "0" after "6" restarts above layer 0; "4" after "0" restarts at 0; "2" after "4" restarts above 2.
    (["6", "0", "4", "2"], [2, 3, 4, 4]),
], ids=str)
def test_only_the_changed_part_is_recomputed(sweep, expected_calls):
    model = mlp((3, 6, 5, 4, 2))
    calls = {name: 0 for name, m in model.named_children() if isinstance(m, nn.Linear)}
    for name in calls:
        model.get_submodule(name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    opt = pyco.ChainGaussSeidel(torch.optim.SGD(model.parameters(), lr=0.1), model, nn.functional.mse_loss,
                                sweep=sweep)
    opt.step(*batch())
    assert list(calls.values()) == expected_calls


def test_chain_errors():
    model = mlp()
    loss = nn.functional.mse_loss
    with pytest.raises(TypeError, match=r"needs an nn\.Sequential .* got ModuleList"):
        pyco.ChainGaussSeidel(torch.optim.SGD(model.parameters(), lr=0.1), nn.ModuleList(list(model)), loss)
    outsider = nn.Parameter(torch.zeros(2))
    inner = torch.optim.SGD([*model.parameters(), outsider], lr=0.1)
    with pytest.raises(ValueError, match=r"block 'outsider' holds a parameter of shape \[2\], which no child of the "
                                         r"Sequential holds"):
        pyco.ChainGaussSeidel(inner, model, loss, {**by_module(model), "outsider": [outsider]})
    opt = pyco.ChainGaussSeidel(torch.optim.SGD(model.parameters(), lr=0.1), model, loss)
    with pytest.raises(TypeError, match=r"takes the batch \(input, target\), not a closure"):
        opt.step(make_closure(model, *batch()))
