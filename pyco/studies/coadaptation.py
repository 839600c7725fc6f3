"""Seed 000, "co-adaptation": when every block moves at once, do the blocks' updates cancel or compound?

The workload trains with its recipe's optimizer at several learning rates (its own and smaller ones).
At ``probes`` evenly spaced steps the real step is recorded with ``pyco.probe.record`` and its loss
change split exactly, at the point where it started, into

    ΔL = Σ_i f_i (first order) + ½ Σ_i C_ii (within blocks) + ½ Σ_{i≠j} C_ij (cross-block: co-adaptation) + R

with C from Hessian-vector products in float64. A positive cross term means the blocks' simultaneous
moves interfered (the loss fell less than the blocks' own terms promised); a negative one that they
compounded. ``alone``: also measure each block's step alone (k more forward passes per recorded step).
``quick``: the recipe's learning rate only, 3 recorded steps, no ``alone``.
"""

from __future__ import annotations

import statistics

import torch

import pyco
from pyco.studies._common import (RunDir, check_common, closure_for, config, factory_of, fmt, metrics_text,
                                  options as study_options, progress, pyplot, run_dir)
from pyco.studies.workloads import DEFAULT

NAME = "coadaptation"
QUESTION = "seed 000: do simultaneous per-block updates cancel or compound each other (the cross-block term)?"

OPTIONS = dict(probes=10, lr_factors=(0.1, 0.3, 1.0), optimizers=None, alone=True)
QUICK = dict(probes=3, lr_factors=(1.0,), alone=False)


def run(workload_factory=DEFAULT, *, steps: int | None = None, lrs=None, seed: int = 0, quick: bool = False,
        out=None, show_progress: bool = False, **options) -> dict:
    """Trains ``workload_factory(seed)`` for ``steps`` (default: the recipe's budget) with each optimizer
    (default: the recipe's) at each learning rate (default: the recipe's lr times ``lr_factors``),
    recording ``probes`` steps. Returns the results; writes tables, figures and report.md to ``out``."""
    factory = factory_of(workload_factory)
    lrs = check_common(steps, lrs, seed)
    opts = study_options(NAME, options, OPTIONS)
    if quick:
        opts.update({k: v for k, v in QUICK.items() if options.get(k) is None})
    first = factory(seed)
    recipe = first.recipe
    steps = steps or recipe.steps
    optimizers = tuple(opts["optimizers"] or (recipe.optimizer,))
    grid = lrs or sorted(recipe.lr * f for f in opts["lr_factors"])
    runs = []
    for opt_name in optimizers:
        for lr in grid:
            workload = first if not runs else factory(seed)
            runs.append(train_and_probe(workload, opt_name, lr, steps, opts["probes"], opts["alone"], show_progress))
    summary = [summarize(r) for r in runs]
    cfg = config(factory, first, steps=steps, seed=seed, optimizers=list(optimizers), lrs=grid,
                 probes=opts["probes"], alone=opts["alone"], quick=quick)
    results = {"study": NAME, "question": QUESTION, "config": cfg, "summary": summary, "runs": runs}
    out = run_dir(out)
    if out is not None:
        write(results, out)
    return results


def probe_steps(steps: int, probes: int) -> list[int]:
    """``probes`` steps spread evenly from the first to the last."""
    if probes <= 1 or steps == 1:
        return [1]
    return sorted({1 + round(i * (steps - 1) / (probes - 1)) for i in range(probes)})


def train_and_probe(workload, opt_name: str, lr: float, steps: int, probes: int, alone: bool, show: bool) -> dict:
    blocks = workload.blocks
    opt = workload.recipe.make(workload.model.parameters(), lr=lr, optimizer=opt_name)
    batches = workload.batches()
    recorded = set(probe_steps(steps, probes))
    rows, losses = [], []
    for step in progress(range(1, steps + 1), desc=f"coadaptation: {workload.name} {opt_name} lr={fmt(lr)}",
                         enabled=show):
        closure = closure_for(workload, opt, next(batches))
        if step in recorded:
            report = pyco.probe.record(opt, closure, blocks, dtype=torch.float64, alone=alone)
            rows.append({"step": step, **report.totals(), "first_order_by_block": report.first_order.tolist(),
                         "C": report.C.tolist(), "alone": None if report.alone is None else report.alone.tolist()})
            losses.append(report.loss_before)
        else:
            losses.append(opt.step(closure).detach().item())
    return {"optimizer": opt_name, "lr": lr, "blocks": list(blocks.names), "probes": rows, "losses": losses,
            "eval": workload.evaluate()}


def summarize(run: dict) -> dict:
    """Per run: the cross term relative to the first-order term, over the recorded steps."""
    probes = run["probes"]
    ratios = [p["cross"] / abs(p["first_order"]) for p in probes if p["first_order"] != 0] or [float("nan")]
    remainders = [abs(p["remainder"]) / abs(p["actual"]) for p in probes if p["actual"] != 0] or [float("nan")]
    return {
        "optimizer": run["optimizer"], "lr": run["lr"],
        "median_cross_over_first": statistics.median(ratios),
        "max_abs_cross_over_first": max(abs(r) for r in ratios),
        "steps_cross_positive": sum(1 for p in probes if p["cross"] > 0),
        "steps_recorded": len(probes),
        "steps_loss_rose": sum(1 for p in probes if p["actual"] > 0),
        "median_remainder_over_actual": statistics.median(remainders),
        "final_loss": run["losses"][-1],
        **{f"eval_{k}": v for k, v in run["eval"].items()},
    }


def write(results: dict, out: RunDir) -> None:
    runs, summary = results["runs"], results["summary"]
    out.csv("coadaptation_summary.csv", summary)
    out.csv("coadaptation_probes.csv", [
        {"optimizer": r["optimizer"], "lr": r["lr"], "step": p["step"],
         **{k: p[k] for k in ("actual", "first_order", "within", "cross", "remainder", "nonadditivity")}}
        for r in runs for p in r["probes"]])
    figures(runs, summary, results["config"], out)
    out.text("report.md", report(summary, results["config"]))


def _main_run(runs: list[dict], optimizer: str, recipe_lr: float) -> dict:
    """The run at the recipe's learning rate (else the largest) for this optimizer."""
    sel = [r for r in runs if r["optimizer"] == optimizer]
    return min(sel, key=lambda r: (abs(r["lr"] - recipe_lr), -r["lr"]))


def figures(runs: list[dict], summary: list[dict], cfg: dict, out: RunDir) -> None:
    plt = pyplot()
    name, recipe_lr = cfg["workload"], cfg["workload_summary"]["recipe"]["lr"]
    optimizers = cfg["optimizers"]
    fig, axes = plt.subplots(1, len(optimizers), figsize=(6 * len(optimizers), 4), squeeze=False)
    for ax, opt_name in zip(axes[0], optimizers):
        r = _main_run(runs, opt_name, recipe_lr)
        steps = [p["step"] for p in r["probes"]]
        for part in ("actual", "first_order", "within", "cross", "remainder"):
            ax.plot(steps, [p[part] for p in r["probes"]], "o-", label=part, ms=3)
        ax.axhline(0, color="k", lw=0.5)
        ax.set(title=f"{name}, {opt_name} lr={fmt(r['lr'])}: parts of ΔL", xlabel="step", ylabel="loss change")
        ax.legend(fontsize=8)
    out.figure("parts_over_training.png", fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for opt_name in optimizers:
        pts = sorted((s["lr"], s["median_cross_over_first"]) for s in summary if s["optimizer"] == opt_name)
        ax.semilogx(*zip(*pts), "o-", label=opt_name)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(title=f"{name}: median cross / |first order|", xlabel="learning rate", ylabel="ratio")
    ax.legend(fontsize=8)
    out.figure("cross_vs_lr.png", fig)
    r = _main_run(runs, optimizers[0], recipe_lr)
    shown = [r["probes"][0], r["probes"][-1]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    k = len(r["blocks"])
    for ax, probe in zip(axes, shown):
        c = torch.tensor(probe["C"])
        scale = c.abs().max().item() or 1.0
        im = ax.imshow(c.numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale)
        if k <= 16:
            ax.set_xticks(range(k), r["blocks"], rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(k), r["blocks"], fontsize=7)
        ax.set_title(f"C = Δ_iᵀH_ijΔ_j, step {probe['step']} ({r['optimizer']} lr={fmt(r['lr'])})", fontsize=9)
        fig.colorbar(im, ax=ax)
    out.figure("C_heatmaps.png", fig)


def report(summary: list[dict], cfg: dict) -> str:
    w = cfg["workload_summary"]
    lines = ["# Co-adaptation: do simultaneous block updates cancel or compound? (seed 000)\n",
             f"Workload `{cfg['workload']}` ({w['description'] or str(w['parameters']) + ' parameters'}), "
             f"{cfg['steps']} steps, seed {cfg['seed']}; {len(w['blocks'])} blocks. Every recorded step's loss "
             "change is split exactly (float64 Hessian-vector products) at the point it started.\n",
             "| optimizer | lr | median cross/|first| | steps with cross > 0 | steps loss rose | median |R|/|ΔL| | "
             "final batch loss | held-out |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        held = metrics_text({k[5:]: v for k, v in s.items() if k.startswith("eval_")})
        lines.append(f"| {s['optimizer']} | {fmt(s['lr'])} | {s['median_cross_over_first']:+.3f} | "
                     f"{s['steps_cross_positive']}/{s['steps_recorded']} | {s['steps_loss_rose']}/{s['steps_recorded']} | "
                     f"{s['median_remainder_over_actual']:.3g} | {s['final_loss']:.3f} | {held} |")
    lines.append("")
    for opt_name in cfg["optimizers"]:
        sel = sorted((s for s in summary if s["optimizer"] == opt_name), key=lambda s: s["lr"])
        hi = sel[-1]
        cancel = hi["median_cross_over_first"] > 0
        line = (f"- {opt_name}: at lr {fmt(hi['lr'])} the cross-block term was typically "
                f"{abs(hi['median_cross_over_first']):.1%} of the first-order change and "
                f"{'opposed it (the blocks partly cancelled each other)' if cancel else 'added to it (the blocks compounded)'}")
        if len(sel) >= 2:
            lo = sel[0]
            line += (f"; at lr {fmt(lo['lr'])} it was {abs(lo['median_cross_over_first']):.1%} "
                     f"({'larger' if abs(lo['median_cross_over_first']) > abs(hi['median_cross_over_first']) else 'smaller'})")
        lines.append(line + ".")
    positive = sum(s["steps_cross_positive"] for s in summary)
    total = sum(s["steps_recorded"] for s in summary)
    lines.append(f"\nOver all {total} recorded steps the cross-block term raised the loss (cancellation) in {positive} "
                 f"and lowered it (compounding) in {total - positive}.")
    return "\n".join(lines) + "\n"
