"""Seed 000, "co-adaptation": when every layer moves at once, do the layers' updates cancel or compound?

MLPs on digits (plain, batch norm, residual), trained with SGD and Adam at several learning rates. Every
``--probe-every`` steps the real step is recorded with ``pyco.probe.record`` and its loss change split
exactly, at the point where it started, into

    ΔL = Σ_i f_i (first order) + ½ Σ_i C_ii (within layers) + ½ Σ_{i≠j} C_ij (cross-layer: co-adaptation) + R

with C from Hessian-vector products in float64. A positive cross term means the layers' simultaneous
moves interfered (the loss fell less than the layers' own terms promised); a negative one that they
compounded.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

import pyco
from pyco.studies._common import RunDir, digits, fmt, layer_blocks, mlp, progress, pyplot

NAME = "coadaptation"
QUESTION = "seed 000: do simultaneous per-layer updates cancel or compound each other (the cross-layer term)?"

DEFAULTS = dict(steps=150, depth=3, width=32, batch=128, probe_every=15,
                lrs={"sgd": [0.01, 0.1, 0.5], "adam": [0.001, 0.01]}, variants=("plain", "batchnorm", "residual"))


def add_arguments(parser) -> None:
    """No options beyond the common ones (--lr replaces both optimizers' grids)."""


def make_optimizer(name: str, model: nn.Module, lr: float):
    if name == "sgd":
        return pyco.optim.SGD(model.parameters(), lr=lr)
    return pyco.optim.Adam(model.parameters(), lr=lr)


def train_and_probe(data, variant: str, opt_name: str, lr: float, args, show: bool) -> dict:
    depth, width = args.depth or DEFAULTS["depth"], args.width or DEFAULTS["width"]
    steps = args.steps or DEFAULTS["steps"]
    every = max(1, min(DEFAULTS["probe_every"], steps // 4))
    torch.manual_seed(args.seed)
    model = mlp(data.features, width, depth, data.classes, variant=variant).to(data.x_train.device)
    blocks = layer_blocks(model)
    opt = make_optimizer(opt_name, model, lr)
    batches = data.batches(DEFAULTS["batch"], torch.Generator().manual_seed(args.seed))
    probes, losses = [], []
    for step in progress(range(1, steps + 1), desc=f"coadaptation: {variant} {opt_name} lr={lr}", enabled=show):
        x, y = next(batches)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if step == 1 or step % every == 0:
            report = pyco.probe.record(opt, closure, blocks, dtype=torch.float64)
            probes.append({"step": step, **report.totals(), "first_order_by_block": report.first_order.tolist(),
                           "C": report.C.tolist(), "alone": report.alone.tolist()})
            losses.append(report.loss_before)
        else:
            losses.append(opt.step(closure).item())
    return {"variant": variant, "optimizer": opt_name, "lr": lr, "blocks": list(blocks.names), "probes": probes,
            "losses": losses}


def summarize(run: dict) -> dict:
    """Per run: the cross term relative to the first-order term, over the recorded steps."""
    ratios = [p["cross"] / abs(p["first_order"]) for p in run["probes"] if p["first_order"] != 0]
    return {
        "variant": run["variant"], "optimizer": run["optimizer"], "lr": run["lr"],
        "median_cross_over_first": statistics.median(ratios),
        "max_abs_cross_over_first": max(abs(r) for r in ratios),
        "steps_cross_positive": sum(1 for p in run["probes"] if p["cross"] > 0),
        "steps_recorded": len(run["probes"]),
        "steps_loss_rose": sum(1 for p in run["probes"] if p["actual"] > 0),
        "median_remainder_over_actual": statistics.median(abs(p["remainder"]) / abs(p["actual"])
                                                          for p in run["probes"] if p["actual"] != 0),
        "final_loss": run["losses"][-1],
    }


def run(args, out: RunDir) -> dict:
    device = torch.device(args.device)
    show = not args.no_progress
    data = digits(device, seed=args.seed)
    runs = []
    for variant in DEFAULTS["variants"]:
        for opt_name, lrs in DEFAULTS["lrs"].items():
            for lr in (args.lr or lrs):
                runs.append(train_and_probe(data, variant, opt_name, lr, args, show))
    summary = [summarize(r) for r in runs]
    out.csv("coadaptation_summary.csv", summary)
    out.csv("coadaptation_probes.csv", [
        {"variant": r["variant"], "optimizer": r["optimizer"], "lr": r["lr"], "step": p["step"],
         **{k: p[k] for k in ("actual", "first_order", "within", "cross", "remainder", "nonadditivity")}}
        for r in runs for p in r["probes"]])
    figures(runs, summary, out)
    out.text("report.md", report(summary, runs, args))
    return {"study": NAME, "question": QUESTION, "summary": summary, "runs": runs}


def figures(runs: list[dict], summary: list[dict], out: RunDir) -> None:
    plt = pyplot()
    # the four parts over training, for the largest learning rate of each optimizer (plain MLP)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, opt_name in zip(axes, ("sgd", "adam")):
        sel = [r for r in runs if r["variant"] == "plain" and r["optimizer"] == opt_name]
        if not sel:
            continue
        r = max(sel, key=lambda r: r["lr"])
        steps = [p["step"] for p in r["probes"]]
        for part in ("actual", "first_order", "within", "cross", "remainder"):
            ax.plot(steps, [p[part] for p in r["probes"]], "o-", label=part, ms=3)
        ax.axhline(0, color="k", lw=0.5)
        ax.set(title=f"plain MLP, {opt_name} lr={r['lr']}: parts of ΔL", xlabel="step", ylabel="loss change")
        ax.legend(fontsize=8)
    out.figure("parts_over_training.png", fig)
    # cross / |first order| against learning rate
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, opt_name in zip(axes, ("sgd", "adam")):
        for variant in DEFAULTS["variants"]:
            pts = sorted((s["lr"], s["median_cross_over_first"]) for s in summary
                         if s["optimizer"] == opt_name and s["variant"] == variant)
            if pts:
                ax.semilogx(*zip(*pts), "o-", label=variant)
        ax.axhline(0, color="k", lw=0.5)
        ax.set(title=f"{opt_name}: median cross / |first order|", xlabel="learning rate", ylabel="ratio")
        ax.legend(fontsize=8)
    out.figure("cross_vs_lr.png", fig)
    # C at the first and last recorded step of the plain MLP with SGD at its largest learning rate
    sel = [r for r in runs if r["variant"] == "plain" and r["optimizer"] == "sgd"] or runs
    r = max(sel, key=lambda r: r["lr"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, probe in zip(axes, (r["probes"][0], r["probes"][-1])):
        c = torch.tensor(probe["C"])
        scale = c.abs().max().item() or 1.0
        im = ax.imshow(c.numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale)
        ax.set_xticks(range(len(r["blocks"])), r["blocks"], rotation=45)
        ax.set_yticks(range(len(r["blocks"])), r["blocks"])
        ax.set_title(f"C = Δ_iᵀH_ijΔ_j, step {probe['step']} ({r['optimizer']} lr={r['lr']})")
        fig.colorbar(im, ax=ax)
    out.figure("C_heatmaps.png", fig)


def report(summary: list[dict], runs: list[dict], args) -> str:
    depth, width = args.depth or DEFAULTS["depth"], args.width or DEFAULTS["width"]
    lines = ["# Co-adaptation: do simultaneous layer updates cancel or compound? (seed 000)\n",
             f"MLPs with {depth} hidden layers of {width} units on digits; each layer is a block. Every recorded "
             "step's loss change is split exactly (float64 Hessian-vector products) at the point it started.\n",
             "| network | optimizer | lr | median cross/|first| | steps with cross > 0 | steps loss rose | "
             "median |R|/|ΔL| | final loss |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['variant']} | {s['optimizer']} | {fmt(s['lr'])} | {s['median_cross_over_first']:+.3f} | "
                     f"{s['steps_cross_positive']}/{s['steps_recorded']} | {s['steps_loss_rose']}/{s['steps_recorded']} | "
                     f"{s['median_remainder_over_actual']:.3g} | {s['final_loss']:.3f} |")
    lines.append("")
    for opt_name in ("sgd", "adam"):
        for variant in DEFAULTS["variants"]:
            sel = sorted((s for s in summary if s["optimizer"] == opt_name and s["variant"] == variant),
                         key=lambda s: s["lr"])
            if len(sel) < 2:
                continue
            lo, hi = sel[0], sel[-1]
            cancel = hi["median_cross_over_first"] > 0
            lines.append(
                f"- {variant}, {opt_name}: at lr {fmt(hi['lr'])} the cross-layer term was typically "
                f"{abs(hi['median_cross_over_first']):.1%} of the first-order change and "
                f"{'opposed it (the layers partly cancelled each other)' if cancel else 'added to it (the layers compounded)'}; "
                f"at lr {fmt(lo['lr'])} it was {abs(lo['median_cross_over_first']):.1%} "
                f"({'larger' if abs(lo['median_cross_over_first']) > abs(hi['median_cross_over_first']) else 'smaller'}).")
    positive = sum(s["steps_cross_positive"] for s in summary)
    total = sum(s["steps_recorded"] for s in summary)
    lines.append(f"\nOver all {total} recorded steps the cross-layer term raised the loss (cancellation) in {positive} "
                 f"and lowered it (compounding) in {total - positive}.")
    return "\n".join(lines) + "\n"
