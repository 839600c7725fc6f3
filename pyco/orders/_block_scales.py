"""Choosing how far each block goes along a proposed step: the minimiser of the step's exact quadratic model
over per-block scales α, optionally inside a box |α_i − 1| ≤ trust.

For blocks i = 1..k, a proposal Δ, f_i = g_i·Δ_i and C_ij = Δ_iᵀ H_ij Δ_j (from the probe), the loss of the
block-scaled step θ + Σ_i α_i Δ_i is, to second order,

    m(α) = Σ_i α_i f_i + ½ αᵀ C α.

``damping`` d adds ½ d ‖α − 1‖² (a pull towards the proposal itself, α = 1), so the matrix of the model is
A = C + d·I and its linear term f − d·1. Everything here is float64 on the CPU; k is the number of blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# What a solve ended as. "interior": the model's unconstrained minimiser, inside the box (or no box).
# "trust_bound": the exact minimiser of the model over the box, with at least one α_i on the box's edge.
# "indefinite": A is not positive definite; α = 1, or with ``indefinite="box"`` (and a box) a local minimiser
# of the model in the box found from α = 1 by projected gradient steps (never worse than α = 1 on the model).
# "nonfinite": f or C holds inf or NaN; α = 1.
OUTCOMES = ("interior", "trust_bound", "indefinite", "nonfinite")
INDEFINITE = ("inner", "box")  # what an indefinite model gives: α = 1 (the inner step), or the box's local minimum


@dataclass(frozen=True)
class Scales:
    """The result of :func:`solve`: α [k] (float64), what the solve ended as (one of ``OUTCOMES``) and the
    model's predicted loss change m(α) (without the damping term)."""

    alpha: torch.Tensor
    outcome: str
    predicted: float


def model(f: torch.Tensor, c: torch.Tensor, alpha: torch.Tensor) -> float:
    """m(α) = αᵀf + ½ αᵀCα."""
    return float(alpha @ f + 0.5 * alpha @ (c @ alpha))


def solve(f: torch.Tensor, c: torch.Tensor, *, trust: float | None, damping: float = 0.0,
          indefinite: str = "inner") -> Scales:
    """The per-block scales that minimise the quadratic model (see the module docstring).

    Args:
        f: [k] first-order terms g_i·Δ_i.
        c: [k, k] the symmetric matrix C_ij = Δ_iᵀ H_ij Δ_j.
        trust: the box |α_i − 1| ≤ trust, or None for no box.
        damping: d ≥ 0, the weight of ½ d ‖α − 1‖².
        indefinite: where A is not positive definite, "inner" gives α = 1; "box" a local minimiser of the
            model in the box (α = 1 without a box, where the model has no minimiser).
    """
    f, c = f.detach().double().cpu(), c.detach().double().cpu()
    k = f.numel()
    ones = torch.ones(k, dtype=torch.float64)
    if not (bool(torch.isfinite(f).all()) and bool(torch.isfinite(c).all())):
        return Scales(ones, "nonfinite", math.nan)
    c = 0.5 * (c + c.T)  # symmetric by construction; this removes the rounding
    a = c + damping * torch.eye(k, dtype=torch.float64)
    b = f - damping * ones
    definite = torch.linalg.cholesky_ex(a).info.item() == 0
    if not definite and (trust is None or indefinite == "inner"):
        return Scales(ones, "indefinite", model(f, c, ones))
    if trust is None:  # positive definite here
        alpha = torch.cholesky_solve(-b.reshape(k, 1), torch.linalg.cholesky(a)).reshape(k)
        return Scales(alpha, "interior", model(f, c, alpha))
    if trust == 0.0:  # the box is the point α = 1
        return Scales(ones, "trust_bound", model(f, c, ones))
    lower, upper = ones - trust, ones + trust
    if definite:
        alpha = box_minimiser(a, b, lower, upper)
        on_edge = bool(((alpha == lower) | (alpha == upper)).any())
        return Scales(alpha, "trust_bound" if on_edge else "interior", model(f, c, alpha))
    alpha = projected_descent(a, b, lower, upper, start=ones)
    return Scales(alpha, "indefinite", model(f, c, alpha))


def box_minimiser(a: torch.Tensor, b: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The exact minimiser of ½ xᵀAx + bᵀx over lower ≤ x ≤ upper for positive definite A: the primal
    active-set method (Nocedal & Wright, Numerical Optimization, §16.5), started from the box's centre.

    Each iteration fixes the coordinates of the working set at their bounds and solves for the others; a
    step that would leave the box stops at the first bound it meets, which joins the working set; when the
    free coordinates are optimal, the bound with the most negative Lagrange multiplier leaves it. The model
    decreases at every step and the method ends after finitely many (at most a few k on these problems); the
    cap is a guard, and the point it returns is feasible and no worse than the centre either way.
    """
    k = b.numel()
    x = 0.5 * (lower + upper)
    side = torch.zeros(k, dtype=torch.int8)  # 0 free, −1 at its lower bound, +1 at its upper bound
    scale = float(a.abs().max()) * float(x.abs().max() + 1) + float(b.abs().max()) + 1e-300
    for _ in range(20 * k + 20):
        free = side == 0
        target = x.clone()
        if bool(free.any()):
            fixed = ~free
            rhs = -(b[free] + a[free][:, fixed] @ x[fixed])
            target[free] = torch.linalg.solve(a[free][:, free], rhs)
        step = target - x
        if float(step.abs().max()) <= 1e-14 * (1 + float(x.abs().max())):
            gradient = a @ x + b
            multiplier = torch.where(side < 0, gradient, -gradient)  # ≥ 0 at a minimum, for bound coordinates
            multiplier[free] = math.inf
            i = int(multiplier.argmin())
            if float(multiplier[i]) >= -1e-13 * scale:
                return x
            side[i] = 0
            continue
        t, blocking = 1.0, None
        for i in torch.nonzero(free).reshape(-1).tolist():
            s = float(step[i])
            if s < 0 and x[i] + s < lower[i]:
                ti, bound = float((lower[i] - x[i]) / s), -1
            elif s > 0 and x[i] + s > upper[i]:
                ti, bound = float((upper[i] - x[i]) / s), 1
            else:
                continue
            if ti < t:
                t, blocking = ti, (i, bound)
        x = x + t * step
        if blocking is not None:
            i, bound = blocking
            side[i] = bound
        x = torch.where(side < 0, lower, torch.where(side > 0, upper, x.clamp(lower, upper)))
    return x


def projected_descent(a: torch.Tensor, b: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, *,
                      start: torch.Tensor, iterations: int = 2000) -> torch.Tensor:
    """A local minimiser of ½ xᵀAx + bᵀx (A symmetric, possibly indefinite) over the box, by projected
    gradient steps of length 1/‖A‖₂ from ``start``: each step does not increase the model, so the result is
    never worse than ``start``."""
    lipschitz = float(torch.linalg.eigvalsh(a).abs().max())
    if lipschitz <= 0.0:  # A = 0: the model is linear, its minimum is at the corner b points away from
        return torch.where(b > 0, lower, torch.where(b < 0, upper, start))
    x = start.clone()
    for _ in range(iterations):
        nxt = (x - (a @ x + b) / lipschitz).clamp(lower, upper)
        if torch.equal(nxt, x):
            break
        x = nxt
    return x
