"""The standard figures of a Monitor log (``pyco plot DIR``): the parts of the loss change over training, the
cross term's size relative to the first-order change and to the step's curvature, the last recorded C, and
the per-block statistics."""

from __future__ import annotations

import os
from pathlib import Path

from pyco.probe.monitor import LOG, read_log

PARTS = (("first_order", "first order Σf", "#4c72b0"), ("within", "within ½ΣC_ii", "#55a868"),
         ("cross", "cross ½Σ_(i≠j)C_ij", "#c44e52"), ("remainder", "remainder R", "#8172b2"),
         ("actual", "actual ΔL", "#333333"))


def _total(v):
    if isinstance(v, list):
        vals = [x for x in v if x is not None]
        return sum(vals) if vals else None
    return v


def plot_log(source: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draws the figures of the log at ``source`` (a Monitor's directory or its ``probe.jsonl``) to ``out``
    (default: ``probe.png`` beside the log); returns the path written."""
    entries = read_log(source)
    if not entries:
        raise ValueError(f"{source}: the Monitor log has no recorded step yet")
    source = Path(source)
    out = Path(out) if out is not None else (source if source.is_dir() else source.parent) / "probe.png"
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("pyco plot draws with matplotlib: pip install matplotlib (or 'pyco[studies]')") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = [e["step"] for e in entries]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    ax = axes[0, 0]
    for key, label, color in PARTS:
        pts = [(s, _total(e.get(key))) for s, e in zip(steps, entries)]
        pts = [(s, v) for s, v in pts if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1, label=label, color=color)
    ax.set(xlabel="step", ylabel="loss change", title="parts of each recorded step's ΔL", yscale="symlog")
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    ratio = [(s, e["cross"] / abs(_total(e["first_order"]))) for s, e in zip(steps, entries)
             if e.get("cross") is not None and _total(e["first_order"])]
    share = [(s, e["cross"] / e["second_order"]) for s, e in zip(steps, entries)
             if e.get("cross") is not None and e.get("second_order")]
    if ratio:
        ax.plot(*zip(*ratio), marker="o", ms=3, label="cross / |first order|")
    if share:
        ax.plot(*zip(*share), marker="s", ms=3, label="cross / ½ΔᵀHΔ (share of the step's curvature)")
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xlabel="step", title="how large the cross term is")
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    last = entries[-1]
    names = last["blocks"]
    if last.get("C") is not None:
        c = np.array(last["C"], dtype=float)
        masked = np.ma.masked_array(c, mask=np.eye(len(names), dtype=bool))  # the diagonal on a scale of its own
        lim = float(np.abs(masked).max()) if masked.count() else 1.0
        im = ax.imshow(masked, cmap="RdBu_r", vmin=-(lim or 1.0), vmax=lim or 1.0)
        fig.colorbar(im, ax=ax, shrink=0.8, label="C_ij, i ≠ j (diagonal masked)")
        ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 4 else 0, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        if len(names) <= 8:
            for i in range(len(names)):
                for j in range(len(names)):
                    ax.text(j, i, f"{c[i, j]:.2g}", ha="center", va="center", fontsize=7,
                            color="gray" if i == j else "black")
        ax.set_title(f"C at step {last['step']}")
    else:
        ax.text(0.5, 0.5, "no C (mode rows)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()

    ax = axes[1, 1]
    for name in names:
        pts = [(s, e["stats"][name]["grad_sq"]) for s, e in zip(steps, entries)
               if e.get("stats", {}).get(name, {}).get("grad_sq")]
        if pts:
            ax.plot(*zip(*pts), lw=1, label=name)
    ax.set(xlabel="step", ylabel="Σ g² per block", yscale="log", title="gradient per block")
    if len(names) <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{len(entries)} recorded steps ({LOG})")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
