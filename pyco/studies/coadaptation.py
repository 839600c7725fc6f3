"""Question 000, "co-adaptation": when every block moves at once, do the blocks' updates cancel or compound?

The workload trains, for every seed, with each optimizer (default: its recipe's, and SGD or Adam, whichever
that is not) at a few learning rates around a usual one (the recipe's lr for the recipe's optimizer, else
0.1 for SGD and 1e-3 for Adam; times ``lr_factors``). At ``probes`` evenly spaced steps the real step is
recorded with ``pyco.probe.record`` and its loss change split exactly, at the point where it started, into

    ΔL = Σ_i f_i (first order) + ½ Σ_i C_ii (within blocks) + ½ Σ_{i≠j} C_ij (cross-block: co-adaptation) + R

with C_ij = Δ_iᵀH_ijΔ_j from Hessian-vector products in float64. The cross term is measured two ways:

- the cross share ½Σ_{i≠j}C_ij / ½ΔᵀHΔ (ΔᵀHΔ = Σ_ij C_ij): the part of the step's curvature term that
  exists only because the blocks moved together. A ratio of two quadratic forms in Δ, it does not change
  when the step is scaled, so it compares learning rates and optimizers;
- cross / |first order|: how much the cross term opposes (> 0) or adds to (< 0) the first-order decrease.
  For a step proportional to η (SGD) the cross term is ∝ η² and the first order ∝ η, so this ratio grows
  ∝ η by construction.

Per seed each is the median over the recorded steps; each (optimizer, learning rate) reports the mean over
seeds with its 95% interval. A row whose median |R|/|ΔL| over its recorded steps exceeds ``regime`` (0.1)
is outside the second-order regime: the split does not describe its steps and no conclusion is drawn from
it. A run trained when its held-out loss (without held-out metrics: its training loss) fell by at least
``trained_drop`` (5%) of its value at initialisation; a row where a seed did not train is flagged and draws
no conclusion either.

For a plain gradient step Δ = −ηg, ΔL(Gauss–Seidel sweep) − ΔL(simultaneous) = ½Σ_{i≠j}C_ij to second
order, whatever the sweep order (``CrossTerms.gauss_seidel_gap``): a positive cross term predicts a sweep
worse at second order, a negative one better.

The quick configuration (the default) runs the workload as given, 3 seeds and 5 probes per run. ``full``:
5 seeds, 10 probes, and the network grown to width 256 and depth 4 where the factory takes ``width`` and
``depth``, neither was set, that makes it larger, and the run's projected time (from timed training steps)
fits the full configuration's budget; otherwise it keeps its own size and the report says why.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time

import torch

import pyco
from pyco.studies import claims, tables
from pyco.studies._common import (RunDir, check_common, closure_for, config, factory_of, fmt, options as study_options,
                                  progress, pyplot, results as study_results, run_dir, seed_list, size, keep)
from pyco.studies.intervals import Summary, bootstrap, from_dict, t_interval
from pyco.studies.workload import OPTIMIZERS, WorkloadError, load as load_workload
from pyco.studies.workloads import DEFAULT

NAME = "coadaptation"
QUESTION = "question 000: do simultaneous per-block updates cancel or compound each other (the cross-block term)?"

OPTIONS = dict(probes=None, lr_factors=(0.3, 1.0, 3.0), optimizers=None, alone=True, regime=0.1, trained_drop=0.05)
PROBES = {"quick": 5, "full": 10}
USUAL_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}
FULL_SHAPE = {"width": 256, "depth": 4}
QUICK_BUDGET_S = 4 * 60  # what the quick configuration's runs may take, projected: the study stays under 5 minutes
FULL_BUDGET_S = 25 * 60  # what the grown network may take, projected, of the full configuration's 30 minutes


def run(workload_factory=DEFAULT, *, steps: int | None = None, lrs=None, seed: int = 0, seeds: int | None = None,
        quick: bool = False, full: bool = False, out=None, show_progress: bool = False, **options) -> dict:
    """Trains ``workload_factory(s)`` for each seed s for ``steps`` (default: the recipe's budget) with each
    optimizer at each learning rate (``lrs``, if given, are the recipe optimizer's learning rates), recording
    ``probes`` steps per run. Returns the results; writes tables, figures and report.md to ``out``."""
    factory = factory_of(workload_factory)
    lrs = check_common(steps, lrs, seed)
    mode = size(quick, full)
    opts = study_options(NAME, options, OPTIONS)
    seed_values = seed_list(seed, seeds, full)
    probes = opts["probes"] or PROBES[mode]
    first = factory(seed)
    optimizers = tuple(opts["optimizers"] or ((first.recipe.optimizer,) if lrs else default_optimizers(first.recipe)))
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise WorkloadError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    grids = {o: lrs or lr_grid(first.recipe, o, opts["lr_factors"]) for o in optimizers}
    n_runs = len(seed_values) * sum(len(g) for g in grids.values())
    shape = {"grown_to": {}, "note": None}
    alone = opts["alone"]
    if full:
        factory, first, shape = full_shape(factory, first, seed, runs=n_runs, steps=steps, probes=probes)
    elif not any(options.get(k) is not None for k in ("optimizers", "lr_factors", "probes", "alone")) \
            and lrs is None and steps is None:
        optimizers, grids, probes, alone, steps, shape = fit_quick(factory(seed), len(seed_values), optimizers,
                                                                   grids, probes, alone)  # timed on a copy
    steps = steps or first.recipe.steps
    net = network(first)
    runs = []
    jobs = [(o, lr, s) for o in optimizers for lr in grids[o] for s in seed_values]
    for opt_name, lr, s in progress(jobs, desc=f"{NAME}: runs", enabled=show_progress):
        workload = first if not runs else factory(s)
        runs.append(train_and_probe(workload, opt_name, lr, steps, probes, alone, show_progress,
                                    seed=s, trained_drop=opts["trained_drop"]))
        keep(out, "runs", runs[-1])
    summary, rows = summarize(runs, net, opts["regime"])
    cfg = config(factory, first, network=net, steps=steps, seeds=seed_values, optimizers=list(optimizers),
                 lrs={o: g for o, g in grids.items()}, probes=probes, alone=alone, regime=opts["regime"],
                 trained_drop=opts["trained_drop"], lr_factors=list(opts["lr_factors"]), size=mode, shape=shape)
    results = study_results(NAME, QUESTION, cfg, summary, rows=rows, runs=runs)
    out = run_dir(out)
    if out is not None:
        write(results, summary, out)
    return results


# ---- the configuration ----------------------------------------------------------------------------------

def network(workload) -> str:
    """What the summary names a workload by: its name, and its variant when it has one other than plain
    (``mnist1d-mlp``, ``mnist1d-mlp-batchnorm``)."""
    variant = workload.config.get("variant")
    return workload.name if variant in (None, "plain") else f"{workload.name}-{variant}"


def default_optimizers(recipe) -> tuple[str, ...]:
    """The recipe's optimizer, then SGD or Adam, whichever it is not."""
    other = "adam" if recipe.optimizer == "sgd" else "sgd"
    return (recipe.optimizer, other)


def lr_grid(recipe, optimizer: str, factors) -> list[float]:
    """The usual learning rate of ``optimizer`` on this recipe (the recipe's own for its optimizer) times
    each factor."""
    base = recipe.lr if optimizer == recipe.optimizer else USUAL_LR[optimizer]
    return sorted({float(f"{base * f:.12g}") for f in factors})


def takes(make) -> set[str]:
    """The keyword options a factory function takes (empty when its signature cannot be read)."""
    try:
        params = inspect.signature(make).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def full_shape(factory, first, seed: int, *, runs: int, steps: int | None, probes: int,
               budget_s: float = FULL_BUDGET_S, timed_steps: int = 3):
    """The factory of the full configuration: ``factory`` grown to ``FULL_SHAPE`` (width 256, depth 4) where
    it takes those options, none was set, the workload does not already report them as large, the grown
    network has more parameters than ``first``, and ``runs`` runs of it are projected to fit ``budget_s``
    (processor time of ``timed_steps`` training steps, each probe counted as 4k steps for k blocks).
    Returns (factory, its workload for ``seed``, what was decided)."""
    wanted = {}
    for key, target in FULL_SHAPE.items():
        current = first.config.get(key)
        if key in takes(factory.make) and key not in factory.options and not (
                isinstance(current, int) and current >= target):
            wanted[key] = target
    if not wanted:
        return factory, first, {"grown_to": {}, "note": None}
    grown = load_workload(factory, **wanted)
    trial = grown(seed)
    if trial.parameters <= first.parameters:
        return factory, first, {"grown_to": {}, "note": f"not grown to {_shape(wanted)}: that would not enlarge it"}
    per_step = step_seconds(trial, timed_steps)
    projected = runs * per_step * ((steps or trial.recipe.steps) + probes * 4 * len(trial.blocks))
    if projected > budget_s:
        return factory, first, {"grown_to": {}, "projected_s": projected, "note": (
            f"kept at its own size: grown to {_shape(wanted)} ({trial.parameters:,} parameters), its {runs} runs were "
            f"projected to take {projected / 60:.0f} minutes ({per_step * 1e3:.0f} ms of processor time per training "
            f"step), over the full configuration's budget of {budget_s / 60:.0f} minutes")}
    return grown, grown(seed), {"grown_to": wanted, "projected_s": projected, "note": None}


def fit_quick(first, seeds: int, optimizers, grids, probes: int, alone: bool, budget_s: float = QUICK_BUDGET_S,
              timed_steps: int = 10):
    """The quick configuration, trimmed until its projected wall time fits ``budget_s``: first only the
    recipe's optimizer, then only its learning rate, then no block-alone losses, then 3 recorded steps, and
    last fewer training steps (never below half the recipe's budget, so the projection may stay over). The
    projection: ``timed_steps`` training steps timed on the wall clock, a
    recorded step counted as 3k training steps (3.5k with the block-alone losses) for k blocks.
    Returns (optimizers, grids, probes, alone, steps or None, what was decided)."""
    per_step = step_seconds(first, timed_steps, clock=time.perf_counter)
    k, budget = len(first.blocks), first.recipe.steps

    def projected(optimizers, grids, probes, alone, steps):
        runs = seeds * sum(len(grids[o]) for o in optimizers)
        return runs * per_step * (steps + probes * (3.5 if alone else 3.0) * k)

    recipe = first.recipe
    trims = [("only the recipe's optimizer", lambda c: {**c, "optimizers": (recipe.optimizer,)}),
             ("only the recipe's learning rate", lambda c: {**c, "grids": {recipe.optimizer: [recipe.lr]}}),
             ("no block-alone losses", lambda c: {**c, "alone": False}),
             ("3 recorded steps per run", lambda c: {**c, "probes": min(3, c["probes"])})]
    c = dict(optimizers=tuple(optimizers), grids=grids, probes=probes, alone=alone, steps=budget)
    done = []
    for what, trim in trims:
        if projected(**c) <= budget_s:
            break
        c = trim(c)
        done.append(what)
    steps = None
    if projected(**c) > budget_s:
        runs = seeds * sum(len(c["grids"][o]) for o in c["optimizers"])
        steps = int(budget_s / (runs * per_step) - c["probes"] * (3.5 if c["alone"] else 3.0) * k)
        steps = min(max(steps, budget // 2, 1), budget)  # never below half the recipe's budget: it must still train
        done.append(f"{steps} of the recipe's {budget} training steps")
    note = (f"trimmed to fit the quick configuration's {budget_s / 60:.0f} minutes ({per_step * 1e3:.0f} ms per "
            f"training step, projected): {'; '.join(done)}") if done else None
    c["grids"] = {o: c["grids"][o] for o in c["optimizers"]}
    return c["optimizers"], c["grids"], c["probes"], c["alone"], steps, {
        "grown_to": {}, "note": note, "quick_projected_s": projected(**{**c, "steps": steps or budget})}


def _shape(options: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items())


def step_seconds(workload, n: int, clock=time.process_time) -> float:
    """Seconds per training step of ``workload`` (its recipe) on ``clock`` (default processor time), over ``n``
    steps after three."""
    opt = workload.recipe.make(workload.model.parameters())
    batches = workload.batches()
    for _ in range(3):  # warm-up: optimizer state, allocator, thread pools
        opt.step(closure_for(workload, opt, next(batches)))
    start = clock()
    for _ in range(n):
        opt.step(closure_for(workload, opt, next(batches)))
    return (clock() - start) / n


# ---- one run --------------------------------------------------------------------------------------------

def probe_steps(steps: int, probes: int) -> list[int]:
    """``probes`` steps spread evenly from the first to the last."""
    if probes <= 1 or steps == 1:
        return [1]
    return sorted({1 + round(i * (steps - 1) / (probes - 1)) for i in range(probes)})


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or b == 0 or not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    return a / b


def shares(totals: dict) -> dict:
    """The η-free cross share ½Σ_{i≠j}C_ij / ½ΔᵀHΔ, cross / |first order| and |R| / |ΔL| of one step."""
    return {"cross_share": ratio(totals["cross"], totals["second_order"]),
            "cross_over_first": ratio(totals["cross"], abs(totals["first_order"])),
            "remainder_over_actual": ratio(abs(totals["remainder"]), abs(totals["actual"]))}


def training_check(eval_init: dict, eval_final: dict, losses: list[float], drop: float) -> dict:
    """Whether a run trained: its held-out loss (else the mean training loss of its last tenth of steps
    against its first batch's) fell by at least ``drop`` of its initial value."""
    if "loss" in eval_init and "loss" in eval_final:
        before, after, what = eval_init["loss"], eval_final["loss"], "held-out loss"
    else:
        tail = losses[-max(1, len(losses) // 10):]
        before, after, what = losses[0], statistics.fmean(tail), "training loss"
    finite = math.isfinite(before) and math.isfinite(after)
    return {"check": what, "loss_init": before, "loss_final": after,
            "trained": bool(finite and after <= (1 - drop) * before), "diverged": not finite}


def train_and_probe(workload, opt_name: str, lr: float, steps: int, probes: int, alone: bool, show: bool, *,
                    seed: int, trained_drop: float = OPTIONS["trained_drop"]) -> dict:
    blocks = workload.blocks
    opt = workload.recipe.make(workload.model.parameters(), lr=lr, optimizer=opt_name)
    batches = workload.batches()
    recorded = set(probe_steps(steps, probes))
    eval_init = workload.evaluate()
    rows, losses = [], []
    for step in progress(range(1, steps + 1), desc=f"coadaptation: {workload.name} {opt_name} lr={fmt(lr)} "
                         f"seed {seed}", enabled=show):
        closure = closure_for(workload, opt, next(batches))
        if step in recorded and (not losses or math.isfinite(losses[-1])):
            report = pyco.probe.record(opt, closure, blocks, dtype=torch.float64, alone=alone)
            totals = report.totals()
            rows.append({"step": step, **totals, **shares(totals), "first_order_by_block": report.first_order.tolist(),
                         "C": report.C.tolist(), "alone": None if report.alone is None else report.alone.tolist()})
            losses.append(report.loss_before)
        else:
            losses.append(opt.step(closure).detach().item())
    eval_final = workload.evaluate()
    return {"optimizer": opt_name, "lr": lr, "seed": seed, "blocks": list(blocks.names), "probes": rows,
            "losses": losses, "eval_init": eval_init, "eval": eval_final,
            **training_check(eval_init, eval_final, losses, trained_drop)}


# ---- over seeds -----------------------------------------------------------------------------------------

def median(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def key(net: str, optimizer: str, lr: float) -> str:
    return f"{net}/{optimizer}/lr={lr:g}"


def summarize(runs: list[dict], net: str, regime: float) -> tuple[Summary, list[dict]]:
    """Per (optimizer, learning rate), over seeds: the per-seed medians over the recorded steps of the cross
    share, cross / |first| and |R|/|ΔL|, the held-out change and accuracy; and one table row each, with the
    median |R|/|ΔL| over every recorded step of every seed, which decides the regime."""
    summary, rows = Summary(), []
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["optimizer"], r["lr"]), []).append(r)
    for (opt_name, lr), group in groups.items():
        group = sorted(group, key=lambda r: r["seed"])
        k = key(net, opt_name, lr)
        per_seed = lambda field: [median(p[field] for p in r["probes"]) for r in group]  # noqa: E731
        summary.add(f"cross_share/{k}", per_seed("cross_share"))
        summary.add(f"cross_over_first/{k}", per_seed("cross_over_first"))
        summary.add(f"remainder_over_actual/{k}", per_seed("remainder_over_actual"))
        summary.add(f"loss_change/{k}", [r["loss_final"] - r["loss_init"] for r in group])
        if all("accuracy" in r["eval"] for r in group):
            summary.add(f"heldout_accuracy/{k}", [r["eval"]["accuracy"] for r in group])
        probes = [p for r in group for p in r["probes"]]
        pooled = median(p["remainder_over_actual"] for p in probes)
        finite = [p["remainder_over_actual"] for p in probes if math.isfinite(p["remainder_over_actual"])]
        spread = bootstrap(finite, statistics.median) if finite else t_interval([math.nan])
        rows.append({
            "network": net, "optimizer": opt_name, "lr": lr, "seeds": len(group), "key": k,
            "steps_recorded": len(probes), "steps_cross_positive": sum(1 for p in probes if p["cross"] > 0),
            "steps_curvature_positive": sum(1 for p in probes if p["second_order"] > 0),
            "steps_loss_rose": sum(1 for p in probes if p["actual"] > 0),
            "median_remainder_over_actual": pooled,
            "median_remainder_over_actual_ci95": spread.to_dict()["ci95"],
            "in_regime": bool(math.isfinite(pooled) and pooled <= regime),
            "check": group[0]["check"], "seeds_trained": sum(r["trained"] for r in group),
            "seeds_diverged": sum(r["diverged"] for r in group),
            "trained": all(r["trained"] for r in group),
        })
    return summary, rows


# ---- outputs --------------------------------------------------------------------------------------------

def write(results: dict, summary: Summary, out: RunDir) -> None:
    runs, rows, cfg = results["runs"], results["rows"], results["config"]
    out.csv("coadaptation_summary.csv", [{**{k: v for k, v in row.items() if k != "key"},
                                          **interval_columns(summary, row["key"])} for row in rows])
    out.csv("coadaptation_probes.csv", [
        {"optimizer": r["optimizer"], "lr": r["lr"], "seed": r["seed"], "step": p["step"],
         **{k: p[k] for k in ("actual", "first_order", "within", "cross", "second_order", "remainder", "nonadditivity",
                              "cross_share", "cross_over_first", "remainder_over_actual")}}
        for r in runs for p in r["probes"]])
    out.csv("coadaptation_runs.csv", [
        {"optimizer": r["optimizer"], "lr": r["lr"], "seed": r["seed"], "check": r["check"],
         "loss_init": r["loss_init"], "loss_final": r["loss_final"], "trained": r["trained"], "diverged": r["diverged"],
         **{f"heldout_{k}": v for k, v in r["eval"].items()}} for r in runs])
    figures(runs, rows, summary, cfg, out)
    out.text("report.md", report(rows, summary, cfg))


def interval_columns(summary: Summary, k: str) -> dict:
    """A row's estimates as CSV columns: ``<measure>_mean``, ``_lo``, ``_hi``, ``_n``."""
    out = {}
    for measure in ("cross_share", "cross_over_first", "remainder_over_actual", "loss_change", "heldout_accuracy"):
        est = summary.get(f"{measure}/{k}")
        if est is not None:
            out.update({f"{measure}_mean": est.mean, f"{measure}_lo": est.lo, f"{measure}_hi": est.hi,
                        f"{measure}_n": est.n})
    return out


def main_lr(cfg: dict, optimizer: str) -> float:
    """The learning rate of ``optimizer`` nearest (in log) its usual one."""
    recipe = cfg["workload_summary"]["recipe"]
    base = recipe["lr"] if optimizer == recipe["optimizer"] else USUAL_LR[optimizer]
    return min(cfg["lrs"][optimizer], key=lambda lr: (abs(math.log(lr / base)), -lr))


def concluded(row: dict) -> bool:
    return row["in_regime"] and row["trained"]


def figures(runs: list[dict], rows: list[dict], summary: Summary, cfg: dict, out: RunDir) -> None:
    plt = pyplot()
    net, optimizers = cfg["network"], cfg["optimizers"]
    # 1. the two measures and the remainder against the learning rate, per optimizer
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    panels = (("cross_share", "cross share ½Σ_{i≠j}C_ij / ½ΔᵀHΔ\n(mean of per-seed medians)"),
              ("cross_over_first", "cross / |first order|\n(mean of per-seed medians)"),
              ("remainder_over_actual", "|R| / |ΔL|: median over all recorded steps\n(bootstrap 95% interval)"))
    for ax, (measure, title) in zip(axes, panels):
        for n, opt_name in enumerate(optimizers):
            sel = sorted((r for r in rows if r["optimizer"] == opt_name), key=lambda r: r["lr"])
            if measure == "remainder_over_actual":
                ests = [from_dict({"mean": r["median_remainder_over_actual"], "n": r["steps_recorded"],
                                   "ci95": r["median_remainder_over_actual_ci95"]}) for r in sel]
            else:
                ests = [summary[f"{measure}/{r['key']}"] for r in sel]
            lrs, mean = [r["lr"] for r in sel], [e.mean for e in ests]
            err = [[max(e.mean - e.lo, 0) if e.has_interval else 0 for e in ests],
                   [max(e.hi - e.mean, 0) if e.has_interval else 0 for e in ests]]
            ax.errorbar(lrs, mean, yerr=err, color=f"C{n}", lw=1, capsize=3, label=opt_name)
            ok = [concluded(r) for r in sel]
            ax.scatter([x for x, o in zip(lrs, ok) if o], [m for m, o in zip(mean, ok) if o], color=f"C{n}", zorder=3)
            ax.scatter([x for x, o in zip(lrs, ok) if not o], [m for m, o in zip(mean, ok) if not o],
                       facecolors="white", edgecolors=f"C{n}", zorder=3)
        if measure == "remainder_over_actual":
            ax.axhline(cfg["regime"], color="r", lw=0.8, ls=":")
            ax.set_yscale("log")
        else:
            ax.axhline(0, color="k", lw=0.5)
        if measure == "cross_over_first":
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("learning rate")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8,
               title=f"hollow: no conclusion\nred dotted: regime\nlimit {cfg['regime']:g}", title_fontsize=7)
    fig.suptitle(f"{net}: {len(cfg['seeds'])} seeds, 95% intervals")
    out.figure("cross_vs_lr.png", fig)
    # 2. the parts of ΔL relative to the first order over training, at each optimizer's usual learning rate
    fig, axes = plt.subplots(1, len(optimizers), figsize=(5.5 * len(optimizers), 4), squeeze=False,
                             constrained_layout=True)
    for ax, opt_name in zip(axes[0], optimizers):
        lr = main_lr(cfg, opt_name)
        sel = _same_steps([r for r in runs if r["optimizer"] == opt_name and r["lr"] == lr])
        if not sel:
            continue
        steps = [p["step"] for p in sel[0]["probes"]]
        for n, part in enumerate(("within", "cross", "remainder")):
            bands = [t_interval([ratio(r["probes"][i][part], abs(r["probes"][i]["first_order"])) for r in sel])
                     for i in range(len(steps))]
            ax.plot(steps, [b.mean for b in bands], "o-", ms=3, color=f"C{n + 2}", label=f"{part} / |first order|")
            if all(b.has_interval for b in bands):
                ax.fill_between(steps, [b.lo for b in bands], [b.hi for b in bands], color=f"C{n + 2}", alpha=0.15,
                                lw=0)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set(title=f"{opt_name} lr={fmt(lr)} ({len(sel)} seeds, 95% bands)", xlabel="step",
               ylabel="part of ΔL / |first order|")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    out.figure("parts_over_training.png", fig)
    # 3. C relative to ΔᵀHΔ at the first and last recorded step (mean over seeds), the diagonal masked: the
    # first optimizer whose usual learning rate draws a conclusion
    usable = [o for o in optimizers
              if any(concluded(r) for r in rows if r["optimizer"] == o and r["lr"] == main_lr(cfg, o))]
    opt_name = (usable or optimizers)[0]
    lr = main_lr(cfg, opt_name)
    sel = _same_steps([r for r in runs if r["optimizer"] == opt_name and r["lr"] == lr])
    if not sel:
        return
    names, k = sel[0]["blocks"], len(sel[0]["blocks"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), constrained_layout=True)
    for ax, index in zip(axes, (0, -1)):
        mats = []
        for r in sel:
            c = torch.tensor(r["probes"][index]["C"], dtype=torch.float64)
            total = c.sum().abs().item()
            if total > 0 and math.isfinite(total):
                mats.append(c / total)
        if not mats:
            continue
        m = torch.stack(mats).mean(0)
        m.fill_diagonal_(float("nan"))
        off = m[~torch.isnan(m)]
        scale = (off.abs().max().item() if off.numel() else 0.0) or 1.0
        im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale)
        if k <= 8:
            for i in range(k):
                for j in range(k):
                    if i != j:
                        v = m[i, j].item()
                        ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=7,
                                color="white" if abs(v) > 0.6 * scale else "black")
        if k <= 16:
            ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(k), names, fontsize=7)
        step = sel[0]["probes"][index]["step"]
        ax.set_title(f"C_ij / |ΔᵀHΔ|, step {step} ({opt_name} lr={fmt(lr)}, mean of {len(mats)} seeds; "
                     f"diagonal masked)", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    out.figure("C_heatmaps.png", fig)


def _same_steps(runs: list[dict]) -> list[dict]:
    """The runs whose recorded steps are those of the first (a diverged run stops recording)."""
    runs = [r for r in runs if r["probes"]]
    if not runs:
        return []
    steps = [p["step"] for p in runs[0]["probes"]]
    return [r for r in runs if [p["step"] for p in r["probes"]] == steps]


def _momentum(cfg: dict, optimizer: str) -> str:
    recipe = cfg["workload_summary"]["recipe"]
    if optimizer != "sgd":
        return optimizer
    return f"sgd (momentum {recipe['momentum']:g})" if recipe["momentum"] else "sgd (no momentum)"


def remainder_estimate(row: dict):
    """A row's median |R|/|ΔL| over its recorded steps with its bootstrap interval, as an estimate."""
    return from_dict({"mean": row["median_remainder_over_actual"], "n": row["steps_recorded"],
                      "ci95": row["median_remainder_over_actual_ci95"]})


def flags(row: dict) -> list[str]:
    out = [] if row["in_regime"] else ["outside the second-order regime"]
    if not row["trained"]:
        diverged = f", {row['seeds_diverged']} diverged" if row["seeds_diverged"] else ""
        out.append(f"did not train ({row['seeds_trained']}/{row['seeds']} seeds trained{diverged})")
    return out


def row_sentence(row: dict, summary: Summary, cfg: dict) -> str:
    """What one row says; a flagged row says why it draws no conclusion."""
    k = row["key"]
    head = f"- {_momentum(cfg, row['optimizer'])} lr {fmt(row['lr'])}: "
    if not row["in_regime"]:
        return (head + f"outside the second-order regime (median |R|/|ΔL| = {fmt(row['median_remainder_over_actual'])} "
                f"> {cfg['regime']:g} over its {row['steps_recorded']} recorded steps): the split does not describe "
                "these steps, no conclusion drawn.")
    if not row["trained"]:
        change = claims.ci(summary[f"loss_change/{k}"], signed=True)
        return (head + f"did not train: the {row['check']} fell by {cfg['trained_drop']:.0%} in only "
                f"{row['seeds_trained']} of {row['seeds']} seeds ({change} change): no conclusion drawn.")
    share = claims.sign(summary[f"cross_share/{k}"], quantity="the cross share",
                        positive="the cross-block curvature adds to the blocks' own",
                        negative="the cross-block curvature offsets the blocks' own")
    over = claims.sign(summary[f"cross_over_first/{k}"], quantity="cross / |first order|",
                       positive="the cross term opposed the first-order decrease (the blocks interfered)",
                       negative="the cross term added to the first-order decrease (the blocks compounded)")
    return f"{head}{share}; {over}."


def sweep_sentence(used: list[dict], summary: Summary, cfg: dict) -> str:
    """The sign of the cross term as the second-order prediction for a Gauss–Seidel sweep."""
    text = ("What the sign means for a Gauss–Seidel sweep: for a plain gradient step Δ = −ηg, ΔL(sweep) − "
            "ΔL(simultaneous) ≈ ½Σ_{i≠j}C_ij at second order, whatever the sweep order, so a positive cross term "
            "predicts a sweep *worse* than the simultaneous step at second order and a negative one better")
    plain = [r for r in used if r["optimizer"] == "sgd" and not cfg["workload_summary"]["recipe"]["momentum"]]
    if not plain:
        return (text + "; no row above that draws a conclusion takes such steps (momentum and Adam steps are not "
                "−ηg), so there the sign describes the recorded step, not a prediction for a sweep.\n")
    said = [f"at lr {fmt(r['lr'])} " + claims.sign(summary[f"cross_over_first/{r['key']}"],
                                                 quantity="the cross term (over |first order|)",
                                                 positive="a sweep is predicted worse at second order",
                                                 negative="a sweep is predicted better at second order")
            for r in plain]
    return text + "; of the rows above only the SGD rows without momentum take such steps: " + "; ".join(said) + ".\n"


def report(rows: list[dict], summary: Summary, cfg: dict) -> str:
    w = cfg["workload_summary"]
    n = len(cfg["seeds"])
    shape = cfg.get("shape") or {}
    check = rows[0]["check"] if rows else "loss"
    grown = f" (grown to {_shape(shape['grown_to'])} for the full configuration)" if shape.get("grown_to") else ""
    lines = ["# Co-adaptation: do simultaneous block updates cancel or compound? (question 000)\n",
             f"Network `{cfg['network']}`{grown}: {w['description'] or str(w['parameters']) + ' parameters'}; "
             f"{len(w['blocks'])} blocks. {cfg['steps']} training steps per run, {n} seeds "
             f"({', '.join(map(str, cfg['seeds']))}), optimizers "
             f"{', '.join(_momentum(cfg, o) for o in cfg['optimizers'])}; {cfg['probes']} recorded steps per run, each "
             "split exactly (float64 Hessian-vector products) at the point it started: ΔL = first order + "
             "½Σ_i C_ii + ½Σ_{i≠j} C_ij + R.\n"]
    if shape.get("note"):
        lines.append(f"{cfg['size'].capitalize()} configuration: {shape['note']}.\n")
    lines.append("Two measures of the cross term ½Σ_{i≠j}C_ij. The **cross share** divides it by the whole "
                 "curvature term ½ΔᵀHΔ: both are quadratic in the step, so the share does not change when the step is "
                 "scaled and compares learning rates and optimizers. **cross / |first order|** grows ∝ η for SGD by "
                 "construction at a fixed point (the cross term is ∝ η², the first order ∝ η): across learning rates "
                 "it mixes the step size with where each run's training went. Each is the median over a run's recorded "
                 f"steps, then the mean over seeds [95% interval, Student's t, n = {n}]. A row whose median |R|/|ΔL| "
                 f"over its recorded steps exceeds {cfg['regime']:g} is *outside the second-order regime*: the split "
                 "does not describe its steps and no conclusion is drawn from it; a row where a seed's "
                 f"{check} did not fall by {cfg['trained_drop']:.0%} of its initial value *did not train* and draws "
                 "none either.\n")
    table = []
    for r in rows:
        k = r["key"]
        acc = summary.get(f"heldout_accuracy/{k}")
        table.append([r["optimizer"], fmt(r["lr"]), claims.ci(summary[f"cross_share/{k}"], signed=True),
                      claims.ci(summary[f"cross_over_first/{k}"], signed=True),
                      f"{r['steps_cross_positive']}/{r['steps_recorded']}",
                      f"{r['steps_curvature_positive']}/{r['steps_recorded']}", claims.ci(remainder_estimate(r)),
                      claims.ci(summary[f"loss_change/{k}"], signed=True),
                      "n/a" if acc is None else claims.ci(acc, claims.percent), "; ".join(flags(r)) or "—"])
    lines.append(tables.markdown(
        ["optimizer", "lr", "cross share", "cross / |first|", "steps with cross > 0", "steps with ΔᵀHΔ > 0",
         "median |R|/|ΔL| over recorded steps [bootstrap 95%]", f"{check} change (final − init)", "held-out accuracy",
         "flag"], table))
    lines.append("What each row says (no conclusion from a flagged row):\n")
    lines += [row_sentence(r, summary, cfg) for r in rows]
    used = [r for r in rows if concluded(r)]
    signs = [summary[f"cross_share/{r['key']}"].sign for r in used]
    lines.append(f"\nOf the {len(rows)} rows, {len(used)} are inside the second-order regime and trained; among them "
                 f"the cross share was measurably positive in {signs.count(1)}, measurably negative in "
                 f"{signs.count(-1)} and of no measurable sign in {signs.count(0)}.\n")
    lines.append(sweep_sentence(used, summary, cfg))
    lines.append("![the cross term against the learning rate](cross_vs_lr.png)\n")
    lines.append("![the parts of ΔL over training](parts_over_training.png)\n")
    lines.append("![C relative to the curvature term](C_heatmaps.png)")
    return "\n".join(lines) + "\n"
