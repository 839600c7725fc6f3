"""Models, batches and optimizer tables shared by the tests of pyco.orders."""

from __future__ import annotations

import torch
from torch import nn

import pyco

# Inner optimizers the orders must work with: torch's and pyco's. Every one skips a parameter whose .grad is None.
OPTIMIZERS = {
    "torch.SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "torch.Adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "torch.AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "pyco.SGD": lambda ps: pyco.optim.SGD(ps, lr=0.1, momentum=0.9),
    "pyco.Adam": lambda ps: pyco.optim.Adam(ps, lr=0.01),
    "pyco.AdamW": lambda ps: pyco.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
}

# Pairs with the same rule in torch and pyco: their trajectories agree to rounding.
TWINS = [("torch.SGD", "pyco.SGD"), ("torch.Adam", "pyco.Adam"), ("torch.AdamW", "pyco.AdamW")]


def mlp(widths=(3, 5, 4, 2), *, dropout: float = 0.0, batchnorm: bool = False, seed: int = 0,
        dtype=torch.float64) -> nn.Sequential:
    """Linear layers with tanh between them (optionally dropout / batch norm after each hidden Linear):
    by_module gives one block per Linear (and per BatchNorm)."""
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            if batchnorm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.Tanh())
            if dropout:
                layers.append(nn.Dropout(dropout))
    torch.set_rng_state(gen_state)
    return nn.Sequential(*layers).to(dtype)


def batch(n: int = 8, d_in: int = 3, d_out: int = 2, seed: int = 1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen, dtype=dtype), torch.randn(n, d_out, generator=gen, dtype=dtype)


def make_closure(model: nn.Module, x, y, loss_fn=nn.functional.mse_loss, log: list | None = None):
    """The usual closure: clear the gradients, loss on the batch, backward, return the loss. ``log`` collects
    the names of the parameters that required grad at each call."""

    def closure():
        if log is not None:
            log.append({n for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def clone_values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved_blocks(blocks, model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    """Names of the blocks with at least one parameter that differs from ``before``."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {b for b in blocks if any(not torch.equal(p.detach(), before[name_of[id(p)]]) for p in blocks[b])}


def max_difference(a: nn.Module, b: nn.Module) -> float:
    """Largest absolute difference over parameters and floating-point buffers of two copies of a model."""
    pairs = list(zip(a.parameters(), b.parameters()))
    pairs += [(x, y) for x, y in zip(a.buffers(), b.buffers()) if x.is_floating_point()]
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in pairs)
