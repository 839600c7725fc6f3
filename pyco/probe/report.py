"""What the probe measured about one step: the parts of its loss change, as numbers, a table and a picture.

    ΔL = Σ_i f_i + ½ Σ_i C_ii + ½ Σ_{i≠j} C_ij + R
         first     within        cross        remainder (third order and higher)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class CrossTerms:
    """The decomposition of one step Δ at the point θ (all values float64 on the CPU).

    Measured: ``loss_before`` = L(θ), ``loss_after`` = L(θ+Δ), ``first_order`` [k] = f_i = g_i·Δ_i,
    ``C`` [k, k] with C[i, j] = Δ_iᵀ H_ij Δ_j (None in mode "rows"), ``row_sums`` [k] = Σ_j C_ij,
    ``quadratic`` = ΔᵀHΔ, ``alone`` [k] = L(θ + Δ_i only) − L(θ) (None if not measured).
    Derived (properties): ``actual``, ``within``, ``cross``, ``second_order``, ``predicted``, ``remainder``,
    ``nonadditivity``, ``gauss_seidel_gap``.
    """

    names: tuple[str, ...]
    numel: tuple[int, ...]
    mode: str
    dtype: str
    loss_before: float
    loss_after: float
    first_order: torch.Tensor
    C: torch.Tensor | None
    row_sums: torch.Tensor
    quadratic: float
    alone: torch.Tensor | None = None

    # -- the parts -----------------------------------------------------------------------------------
    @property
    def actual(self) -> float:
        """ΔL = L(θ+Δ) − L(θ), all orders."""
        return self.loss_after - self.loss_before

    @property
    def within(self) -> torch.Tensor | None:
        """½ C_ii per block: each block's own curvature along its step."""
        return None if self.C is None else 0.5 * torch.diagonal(self.C)

    @property
    def cross(self) -> float | None:
        """½ Σ_{i≠j} C_ij: the co-adaptation term, the part of ΔL that exists only because blocks moved
        together."""
        return None if self.C is None else 0.5 * float(self.C.sum() - torch.diagonal(self.C).sum())

    @property
    def second_order(self) -> float:
        """½ ΔᵀHΔ = ½ Σ_ij C_ij."""
        return 0.5 * self.quadratic

    @property
    def predicted(self) -> float:
        """The second-order prediction Σ_i f_i + ½ ΔᵀHΔ of ΔL."""
        return float(self.first_order.sum()) + self.second_order

    @property
    def remainder(self) -> float:
        """R = ΔL − prediction: third order and higher, measured."""
        return self.actual - self.predicted

    @property
    def nonadditivity(self) -> float | None:
        """ΔL − Σ_i alone_i: how far moving the blocks together differs from the sum of moving each alone
        (exact, all orders; its second-order part is the cross term)."""
        return None if self.alone is None else self.actual - float(self.alone.sum())

    @property
    def gauss_seidel_gap(self) -> float | None:
        """Predicted ΔL(Gauss–Seidel sweep) − ΔL(simultaneous) for a plain gradient step Δ = −ηg, to second
        order: ½ Σ_{i≠j} C_ij, whatever the sweep order (see :meth:`gauss_seidel_gap_by_block`)."""
        return self.cross

    def gauss_seidel_gap_by_block(self, order: Sequence[int | str] | None = None) -> torch.Tensor | None:
        """Each block's share of the predicted Gauss–Seidel-minus-simultaneous gap for a sweep ``order``
        (block indices or names, first swept first; default: the blocks' order), indexed by block.

        Derivation, for Δ = −ηg. A sweep updates block b with its gradient recomputed after the blocks
        swept before it (a < b in sweep order) moved: g'_b = g_b + Σ_{a<b} H_ba Δ'_a + O(η²), so
        Δ'_b = Δ_b − η Σ_{a<b} H_ba Δ_a + O(η³). Then
            ΔL(GS) = g·Δ' + ½ Δ'ᵀHΔ' + O(η³) = Σ_b f_b + Σ_b Σ_{a<b} (−η g_b)·H_ba Δ_a + ½ ΔᵀHΔ + O(η³),
        and −η g_b = Δ_b turns the middle sum into Σ_b Σ_{a<b} Δ_bᵀ H_ba Δ_a = Σ_b Σ_{a<b} C_ba:
            ΔL(GS) − ΔL(sim) = Σ_b gap_b,   gap_b = Σ_{a swept before b} C_ba   (row b of C, the columns
        of the blocks swept before b: the strictly lower triangle of C in sweep order). The gradient change
        of block b, H_{b,<b} Δ_{<b} (Santurkar et al.'s "internal covariate shift"), is what enters. As C is
        symmetric the total is ½ Σ_{i≠j} C_ij for every order; the shares per block depend on the order.
        """
        if self.C is None:
            return None
        k = len(self.names)
        idx = list(range(k)) if order is None else [self.names.index(o) if isinstance(o, str) else int(o)
                                                      for o in order]
        if sorted(idx) != list(range(k)):
            raise ValueError(f"order must name every block exactly once, got {list(order)} for blocks "
                             f"{list(self.names)}")
        gap = torch.zeros(k, dtype=torch.float64)
        for pos, b in enumerate(idx):
            gap[b] = self.C[b, idx[:pos]].sum()
        return gap

    # -- output --------------------------------------------------------------------------------------
    def totals(self) -> dict[str, float | None]:
        """The scalar parts, by name."""
        within = self.within
        return {
            "loss_before": self.loss_before, "loss_after": self.loss_after, "actual": self.actual,
            "first_order": float(self.first_order.sum()),
            "within": None if within is None else float(within.sum()),
            "cross": self.cross, "second_order": self.second_order, "predicted": self.predicted,
            "remainder": self.remainder, "nonadditivity": self.nonadditivity,
            "gauss_seidel_gap": self.gauss_seidel_gap,
        }

    def to_dict(self) -> dict:
        """Everything as plain Python values (JSON-ready)."""
        def plain(t):
            return None if t is None else t.tolist()

        return {
            "names": list(self.names), "numel": list(self.numel), "mode": self.mode, "dtype": self.dtype,
            "first_order": plain(self.first_order), "C": plain(self.C), "row_sums": plain(self.row_sums),
            "quadratic": self.quadratic, "alone": plain(self.alone), "within_by_block": plain(self.within),
            **self.totals(),
        }

    def table(self) -> str:
        """A readable table: one row per block, then the totals."""
        width = max(10, *(len(n) for n in self.names))
        full = self.C is not None
        heads = ["numel", "first g·Δ", "within ½Cii" if full else "½ row sum", "cross ½Σj≠i", "alone"]
        lines = [f"{'block':{width}s} " + " ".join(f"{h:>13s}" for h in heads)]
        within = self.within
        for i, name in enumerate(self.names):
            second = within[i] if full else 0.5 * self.row_sums[i]
            share = 0.5 * (self.row_sums[i] - self.C[i, i]) if full else None
            cells = [f"{self.numel[i]:13d}", _num(self.first_order[i]), _num(second), _num(share),
                     _num(None if self.alone is None else self.alone[i])]
            lines.append(f"{name:{width}s} " + " ".join(cells))
        t = self.totals()
        rel = f"  {t['remainder'] / t['actual']:+.2%} of ΔL" if t["actual"] else ""
        parts = [
            ("ΔL actual", t["actual"], ""),
            ("  first order    Σ f_i", t["first_order"], ""),
            *([("  within         ½ Σ C_ii", t["within"], ""),
               ("  cross          ½ Σ_{i≠j} C_ij", t["cross"], "  co-adaptation")] if full else
              [("  second order   ½ ΔᵀHΔ", t["second_order"], "  (mode rows: no within/cross split)")]),
            ("  remainder      R", t["remainder"], rel),
            ("non-additivity   ΔL − Σ alone", t["nonadditivity"], "  exact, all orders"),
            ("Gauss–Seidel − simultaneous", t["gauss_seidel_gap"], "  predicted, plain gradient step"),
        ]
        lines += ["", f"loss {t['loss_before']:.10g} -> {t['loss_after']:.10g} ({self.dtype}, mode {self.mode})"]
        lines += [f"{label:32s}{_num(value)}{note}" for label, value, note in parts]
        return "\n".join(lines)

    def plot(self, path: str, *, title: str | None = None) -> str:
        """Writes a picture to ``path`` (PNG, PDF or SVG by extension): a heatmap of C labelled with the
        block names (the row sums in mode "rows") and a bar chart of the parts of ΔL. Needs matplotlib
        (``pip install matplotlib``). Returns ``path``."""
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError("CrossTerms.plot needs matplotlib: pip install matplotlib") from exc
        k = len(self.names)
        fig = Figure(figsize=(6 + 0.25 * k, 4.5 + 0.12 * k), layout="constrained")
        left, right = fig.subplots(1, 2, width_ratios=[1.3, 1])
        _heatmap(fig, left, self)
        t = self.totals()
        parts = [(n, t[key]) for n, key in [("first", "first_order"), ("within", "within"), ("cross", "cross"),
                                            ("remainder", "remainder"), ("ΔL", "actual"),
                                            ("non-additivity", "nonadditivity")] if t[key] is not None]
        right.bar([n for n, _ in parts], [v for _, v in parts],
                  color=["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#333333", "#dd8452"][:len(parts)])
        right.axhline(0.0, color="black", linewidth=0.8)
        right.set_title("parts of the loss change")
        right.tick_params(axis="x", labelrotation=35)
        for label in right.get_xticklabels():
            label.set_horizontalalignment("right")
        fig.suptitle(title or f"ΔL = {self.actual:.4g} ({self.dtype})")
        fig.savefig(path, dpi=120)
        return path


def _heatmap(fig, ax, report: CrossTerms) -> None:
    names = list(report.names)
    if report.C is None:
        ax.barh(names, report.row_sums.tolist(), color="#4c72b0")
        ax.invert_yaxis()
        ax.set_title("row sums Σ_j C_ij (mode rows)")
        return
    c = report.C.numpy()
    lim = float(abs(c).max()) or 1.0
    im = ax.imshow(c, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 6 else 0)
    ax.set_yticks(range(len(names)), names)
    ax.set_title("C_ij = Δ_iᵀ H_ij Δ_j")
    ax.set_xlabel("block j")
    ax.set_ylabel("block i")
    if len(names) <= 10:
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{c[i, j]:.2g}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)


def _num(x) -> str:
    return f"{'—':>13s}" if x is None else f"{float(x):+13.5e}"
