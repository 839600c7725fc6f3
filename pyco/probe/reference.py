"""Dense references for the probe's tests: the whole Hessian, then the probe's formulas read off it.

Slow (N² memory, N backward passes for N parameters) and independent of the fast path: no block-restricted
tangents, no batched backward, no kernel. Use it on models with at most a few thousand parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pyco.probe.report import CrossTerms


def cross_terms(loss_of: Callable[[list[torch.Tensor]], torch.Tensor], params: Sequence[torch.Tensor],
                sizes: Sequence[int], update: Sequence[torch.Tensor], *,
                names: Sequence[str] | None = None) -> CrossTerms:
    """The probe's report, computed from the dense Hessian ``torch.autograd.functional.hessian``.

    Args:
        loss_of: maps a list of parameter values (same shapes as ``params``) to the scalar loss.
        params: the point θ, block by block.
        sizes: how many consecutive entries of ``params`` form each block.
        update: Δ, aligned with ``params``.
        names: block names (default ``"0"``, ``"1"``, ...).

    Example::

        ref = reference.cross_terms(lambda ps: (ps[0] * ps[1]).sum(), [x, y], [1, 1], [dx, dy])
    """
    params = [p.detach() for p in params]
    update = [d.detach().to(p.dtype) for p, d in zip(params, update)]
    shapes = [p.shape for p in params]
    theta, delta = _flat(params), _flat(update)

    def f(flat: torch.Tensor) -> torch.Tensor:
        return loss_of(_unflat(flat, shapes))

    hess = torch.autograd.functional.hessian(f, theta).double()
    theta_req = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(theta_req), theta_req)
    spans = _spans(params, sizes)
    d = delta.double()
    first = torch.stack([grad[a:b].double() @ d[a:b] for a, b in spans])
    c = torch.stack([torch.stack([d[a:b] @ hess[a:b, c0:c1] @ d[c0:c1] for c0, c1 in spans]) for a, b in spans])
    with torch.no_grad():
        before = f(theta)
        after = f(theta + delta)
        alone = torch.stack([f(theta + _only(delta, a, b)).double() - before.double() for a, b in spans])
    return CrossTerms(
        names=tuple(names or (str(i) for i in range(len(sizes)))), numel=tuple(b - a for a, b in spans),
        mode="full", dtype=str(theta.dtype).replace("torch.", ""), loss_before=before.item(),
        loss_after=after.item(), first_order=first, C=c, row_sums=c.sum(dim=1), quadratic=float(d @ hess @ d),
        alone=alone,
    )


def loss_of_module(model: nn.Module, params: Sequence[nn.Parameter],
                   loss_fn: Callable[[nn.Module], torch.Tensor]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """``loss_of`` for :func:`cross_terms` from a module: ``loss_fn(model)`` evaluated with the listed
    parameters replaced by the given values (``torch.func.functional_call``; other parameters and buffers
    as they are)."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = ["model." + names[id(p)] for p in params]

    class _Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self):
            return loss_fn(self.model)

    wrapper = _Loss()

    def loss_of(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(wrapper, dict(zip(keys, values)), ())

    return loss_of


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    out, start = [], 0
    for s in shapes:
        n = s.numel()
        out.append(flat[start:start + n].reshape(s))
        start += n
    return out


def _spans(params, sizes) -> list[tuple[int, int]]:
    if sum(sizes) != len(params):
        raise ValueError(f"block sizes {list(sizes)} add up to {sum(sizes)}, expected {len(params)} parameters")
    spans, p, e = [], 0, 0
    for s in sizes:
        n = sum(params[i].numel() for i in range(p, p + s))
        spans.append((e, e + n))
        p, e = p + s, e + n
    return spans


def _only(delta: torch.Tensor, a: int, b: int) -> torch.Tensor:
    out = torch.zeros_like(delta)
    out[a:b] = delta[a:b]
    return out
