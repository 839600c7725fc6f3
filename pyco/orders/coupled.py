"""Coupled steps: keep the simultaneous proposal of any optimizer, and choose how far each block goes along it
from the step's exact second-order interaction, cross-block terms included."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from pyco.orders import _block_scales
from pyco.orders._block_scales import INDEFINITE, OUTCOMES
from pyco.orders._replay import BufferReplay
from pyco.orders._wrapper import OrderWrapper, evaluate
from pyco.orders.gauss_seidel import Sweep


class Coupled(OrderWrapper):
    r"""Block-scaled steps around any ``torch.optim.Optimizer``, with the scales chosen by the exact
    quadratic model of the step, in which the blocks' moves see each other.

    One step evaluates the closure at θ, lets the inner optimizer propose its real update Δ = (Δ_1..Δ_k)
    (momentum, Adam moments, weight decay included), and measures on the same batch, at θ, exactly (by
    Hessian-vector products, see :func:`pyco.probe.cross_terms`)

    .. math::
        f_i = g_i \cdot \Delta_i, \qquad C_{ij} = \Delta_i^\top H_{ij} \Delta_j .

    The loss of the block-scaled step θ + Σ_i α_i Δ_i is, to second order, m(α) = Σ_i α_i f_i + ½ αᵀCα; the
    step applies the α that minimises it, inside the box |α_i − 1| ≤ ``trust``. The off-diagonal C_ij are
    what the blocks' moves do to each other: a block whose move overlaps the others' (C_ij > 0) is scaled
    back, one whose move they help is scaled up. ``cross=False`` drops them (each block's own line search
    from C_ii alone): the control that isolates what the communication buys. With one block the step is the
    exact quadratic line search along the optimizer's proposal.

    What each solve can end as (counted in ``outcomes``; ``last_outcome`` names the last one):

    - ``"interior"``: the model's minimiser, strictly inside the box (or with ``trust=None``);
    - ``"trust_bound"``: the exact minimiser of the model over the box, some α_i on its edge;
    - ``"indefinite"``: C + damping·I is not positive definite, so the model has no minimiser (it falls
      without bound along a direction of negative curvature) and α = 1. With ``indefinite="box"`` and a
      box, α is instead a local minimiser of the model in the box, reached from α = 1 by projected gradient
      steps (never worse than α = 1 on the model); it lies where the model is least trustworthy, often on a
      corner of the box;
    - ``"nonfinite"``: the proposal, f or C holds inf or NaN; α = 1.

    Where α = 1 the step is bitwise the inner optimizer's own. ``"reused"`` counts the steps between solves.

    Same-batch rules, as for :class:`pyco.GaussSeidel`: the probe's evaluations start from the random-number
    state and the buffers of ``model`` as they were before the step, and afterwards both are as the first
    evaluation left them (dropout masks replayed, batch-norm statistics advanced once). The inner optimizer
    steps once per step, so its state (momentum, moments, step count) advances once, as for its proposal.
    After the step each parameter's ``.grad`` is its gradient at θ. A step is all or nothing: if anything
    raises, parameters, optimizer state, gradients, buffers and random state are as before the step.

    Cost of a solving step: the closure once, plus the probe's gradient with its graph, k block-pruned
    Hessian-vector products, two forward passes (at θ and θ + Δ; the second gives ``last_report``'s
    remainder) and a k×k solve. ``every=N`` solves at one step in N and reuses α in between, where a step
    costs the closure and the inner step.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (pyco's or torch's).
        blocks: a :class:`pyco.blocks.Blocks` (``by_module(model)``...), a dict name -> tensors, or None for one
            block per param group. Must cover the optimizer's parameters exactly once.
        trust (default 2.0): the box |α_i − 1| ≤ trust, a float ≥ 0 (0: the inner optimizer's step), or None
            for the unconstrained minimiser (α = 1 where the model has none).
        damping (default 0.0): d ≥ 0 adds ½ d ‖α − 1‖² to the model: a pull towards the proposal.
        every (default 1): solve for α at one step in ``every``, reuse it in between.
        cross (default True): False keeps only the diagonal of C (no communication between blocks).
        indefinite (default "inner"): what an indefinite model gives, α = 1 ("inner") or the local minimiser
            of the model in the box ("box").
        model: the module whose buffers are replayed; default ``blocks.module``.
        dtype: the probe's dtype (``torch.float64`` for a float32 model); None: the parameters' own.

    Attributes:
        last_alpha: dict block name -> α of the last step (the reused α on a step that did not solve).
        last_report: the probe's :class:`pyco.probe.CrossTerms` of the last solve (f, C, the loss at θ + Δ).
        last_outcome: what the last step's α came from: one of the outcomes above or ``"reused"``.
        last_predicted: m(α) of the last solve, the model's predicted loss change of the applied step.
        outcomes: dict outcome -> how many steps ended so, ``"reused"`` included (saved in ``state_dict``).
        last_stats: with pyco's optimizers, their per-block statistics of the proposal (before the scaling).

    Example::

        opt = pyco.Coupled(torch.optim.Adam(model.parameters(), lr=1e-3), pyco.blocks.by_module(model))

        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        opt.last_alpha  # {'0': 1.31, '2': 0.84, ...}
    """

    def __init__(self, optimizer: Optimizer, blocks=None, *, trust: float | None = 2.0, damping: float = 0.0,
                 every: int = 1, cross: bool = True, indefinite: str = "inner", model: nn.Module | None = None,
                 dtype: torch.dtype | None = None):
        who = type(self).__name__
        if trust is not None and (isinstance(trust, bool) or not isinstance(trust, (int, float))
                                  or not math.isfinite(trust) or trust < 0):
            raise ValueError(f"{who}: Invalid trust: {trust!r} (expected a finite float >= 0, or None for no box)")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (0 <= damping < math.inf):
            raise ValueError(f"{who}: Invalid damping: {damping!r} (expected a finite float >= 0)")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{who}: Invalid every: {every!r} (expected an int >= 1)")
        if not isinstance(cross, bool):
            raise TypeError(f"{who}: Invalid cross: {cross!r} (expected True or False)")
        if indefinite not in INDEFINITE:
            raise ValueError(f"{who}: Invalid indefinite: {indefinite!r} (expected one of {INDEFINITE})")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"{who}: Invalid dtype: {dtype!r} (expected None or a floating-point torch.dtype)")
        super().__init__(optimizer, blocks)
        from pyco.probe.cross_terms import check_params

        check_params(self.blocks)
        self.trust = None if trust is None else float(trust)
        self.damping = float(damping)
        self.every = every
        self.cross = cross
        self.indefinite = indefinite
        self.dtype = dtype
        self.model = model if model is not None else self.blocks.module
        self._buffers = BufferReplay([] if self.model is None else [self.model])
        self._alpha = torch.ones(len(self.blocks), dtype=torch.float64)
        self.outcomes = {name: 0 for name in (*OUTCOMES, "reused")}
        self.last_report = None
        self.last_outcome: str | None = None
        self.last_predicted: float | None = None

    @property
    def last_alpha(self) -> dict[str, float]:
        return dict(zip(self.blocks.names, self._alpha.tolist()))

    @property
    def alpha_per_param(self) -> list[float]:
        """The last step's α for each parameter, aligned with ``blocks.params()`` (its block's α)."""
        return self._per_param(self._alpha)

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One block-scaled step. Returns the loss at θ (the closure's first evaluation).

        Args:
            closure: computes the loss on the batch, calls ``backward()`` and returns the loss (required).
        """
        who = type(self).__name__
        if closure is None:
            raise RuntimeError(
                f"{who}.step needs a closure: the block scales come from the loss's gradient and curvature on the "
                "batch, which the probe re-evaluates. Pass one, e.g. "
                "def closure(): loss = loss_fn(model(x), y); loss.backward(); return loss; opt.step(closure)"
            )
        solving = self.steps % self.every == 0
        params = self.blocks.params()
        with Sweep(self) as sweep:
            self.optimizer.zero_grad(set_to_none=True)
            loss = evaluate(closure, f"{who}.step")
            if solving:  # the probe re-evaluates and runs after the inner step: keep what the first evaluation
                sweep.first_evaluation_done()  # left (random state, buffers), and what the inner step changes
                sweep.undo.before_update(params)
                before = {i: value for i, (_, value, _) in enumerate(sweep.undo.moved)}
            else:  # only the parameters this step scales (α ≠ 1) need their values before the inner step
                before = {i: params[i].detach().clone() for i in self._scaled(self._alpha)}
            stats = self._step_blocks(range(len(self.blocks)))
            if solving:
                deltas = [params[i].detach() - before[i] for i in range(len(params))]
                report, scales = self._solve(closure, deltas, sweep)
            self._apply(before, scales.alpha if solving else self._alpha)
        self.last_stats = stats
        if solving:
            self._alpha, self.last_report = scales.alpha, report
            self.last_outcome, self.last_predicted = scales.outcome, scales.predicted
        else:
            self.last_outcome = "reused"
        self.outcomes[self.last_outcome] += 1
        self.steps += 1
        return loss

    def _per_param(self, alpha: torch.Tensor) -> list[float]:
        """Each block's α, repeated for each of its parameters (aligned with ``blocks.params()``)."""
        return [a for a, name in zip(alpha.tolist(), self.blocks.names) for _ in self.blocks[name]]

    def _scaled(self, alpha: torch.Tensor) -> list[int]:
        """Indices (into ``blocks.params()``) of the parameters of the blocks whose α is not 1."""
        return [i for i, a in enumerate(self._per_param(alpha)) if a != 1.0]

    def scales(self, report, *, cross: bool | None = None) -> _block_scales.Scales:
        """The block scales this wrapper's options give for the probe's ``report`` (f and C of a proposal);
        ``cross`` overrides the wrapper's choice (False: the diagonal of C only)."""
        cross = self.cross if cross is None else cross
        c = report.C if cross else torch.diag(torch.diagonal(report.C))
        return _block_scales.solve(report.first_order, c, trust=self.trust, damping=self.damping,
                                   indefinite=self.indefinite)

    def _solve(self, closure, deltas, sweep: Sweep):
        """(the probe's report or None, the scales) for the proposal ``deltas``, at θ on the same batch."""
        from pyco.probe.cross_terms import bypassing_ddp, cross_terms
        from pyco.probe.record import CapturedLoss

        if not all(bool(torch.isfinite(d).all()) for d in deltas):
            return None, _block_scales.Scales(torch.ones(len(self.blocks), dtype=torch.float64), "nonfinite", math.nan)
        params = self.blocks.params()
        grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params]
        moved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, (_, value, _) in zip(params, sweep.undo.moved):
                    p.copy_(value)
            sweep.before.restore()
            self._buffers.replay()
            with bypassing_ddp([self.model]):
                report = cross_terms(CapturedLoss(closure), self.blocks, deltas, mode="full", dtype=self.dtype,
                                     alone=False)
        finally:
            with torch.no_grad():
                for p, m in zip(params, moved):
                    p.copy_(m)
            for p, grad, saved in grads:
                p.grad = grad
                if grad is not None:
                    grad.copy_(saved)
        return report, self.scales(report)

    @torch.no_grad()
    def _apply(self, before: dict, alpha: torch.Tensor) -> None:
        """θ + α_b Δ_b = α_b θ' + (1 − α_b) θ for every block b whose α is not 1, with θ' what the inner step
        left (there, where α = 1, the inner step stays as it is, bitwise): three fused passes."""
        scaled = self._scaled(alpha)
        if not scaled:
            return
        params, of_param = self.blocks.params(), self._per_param(alpha)
        targets = [params[i] for i in scaled]
        scales = [of_param[i] for i in scaled]
        rest = torch._foreach_mul([before[i] for i in scaled], [1.0 - a for a in scales])  # new tensors: the
        torch._foreach_mul_(targets, scales)  # values before the step stay intact for a rollback
        torch._foreach_add_(targets, rest)

    # ---- checkpoints ----------------------------------------------------------------------------------

    def _order_state(self) -> dict:
        return {"alpha": self._alpha.tolist(), "outcomes": dict(self.outcomes)}

    def _check_order_state(self, own: dict) -> None:
        who = type(self).__name__
        alpha = own.get("alpha")
        if (not isinstance(alpha, list) or len(alpha) != len(self.blocks)
                or not all(isinstance(a, float) and math.isfinite(a) for a in alpha)):
            raise ValueError(f"{who}.load_state_dict: 'alpha' must be a list of {len(self.blocks)} finite floats "
                             f"(one per block), got {alpha!r}")
        outcomes = own.get("outcomes")
        if not isinstance(outcomes, dict) or set(outcomes) != set(self.outcomes) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in outcomes.values()):
            raise ValueError(f"{who}.load_state_dict: 'outcomes' must map {sorted(self.outcomes)} to counts, "
                             f"got {outcomes!r}")

    def _load_order_state(self, own: dict) -> None:
        self._alpha = torch.tensor(own["alpha"], dtype=torch.float64)
        self.outcomes = dict(own["outcomes"])
