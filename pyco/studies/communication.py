"""What does letting the blocks' moves communicate cost, what does it buy, and when does it pay?

Two ways to let the blocks of a network know about each other's moves, against the standard step in which
every block moves at once from gradients taken at the same point (simultaneous):

- **sequentially**: Gauss–Seidel sweeps (each block's gradient recomputed after the blocks before it moved;
  k gradient evaluations a step) and block-coordinate steps (one block a step);
- **through the exact cross terms**: ``pyco.Coupled`` keeps the optimizer's simultaneous proposal Δ and
  scales each block's part of it by the α that minimises the step's exact quadratic model
  m(α) = Σ α_i f_i + ½ αᵀCα, f_i = g_i·Δ_i, C_ij = Δ_iᵀH_ijΔ_j (Hessian-vector products on the same batch),
  inside the box |α_i − 1| ≤ trust. ``coupled no-cross`` solves the same model with the off-diagonal C_ij
  dropped: each block's own line search, the control that isolates what the communication itself buys.
  ``every N`` solves at one step in N and reuses α in between.

Every method trains until it has spent the same budget of gradient-evaluation equivalents: a full
forward+backward counts 1; a Gauss–Seidel sweep k; a block-coordinate step the measured fraction of a full
forward+backward its partial backward takes; a solving and a reusing Coupled step each its measured time as
a multiple of a full forward+backward on the same batch (the median ratio over repeats, timed one right
after the other). Learning rates are tuned per method on a grid (the recipe's lr times a few factors) against
the held-out loss at the end of the budget. Reported: the losses at equal compute against measured time and
gradient-evaluation equivalents, the losses at equal steps (what communication buys, ignoring its cost), the
per-block α over training and its difference from the no-cross α at the same point, how the gain depends on
the learning rate and on ``every``, and what each solve ended as (interior, on the box, indefinite model).

A small CPU model runs on one intra-op thread (``_common.few_threads``). ``quick`` (the default): 3 seeds,
learning rates × (0.3, 1, 3), ``every`` 1 and 10, the budget trimmed so that the projected wall time stays
under 4 minutes; ``full``: 5 seeds, × (0.1, 0.3, 1, 3, 10), ``every`` 1, 10 and 100, the recipe's budget.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence

import torch

import pyco
from pyco.studies import claims, orders as _orders, tables
from pyco.studies._common import (RunDir, begin, closure_for, config, few_threads, keep, progress, pyplot,
                                  results as study_results, run_dir)
from pyco.studies.intervals import Summary, t_interval
from pyco.studies.workloads import DEFAULT

NAME = "communication"
QUESTION = ("question 000: what does letting the blocks' moves communicate (sequential updates, or the exact "
            "cross terms) cost, what does it buy, and when does it pay?")

OPTIONS = dict(lr_factors=(0.3, 1.0, 3.0), every=(1, 10), trust=2.0, checkpoints=20, train_eval_batches=8,
               cost_repeats=10, wall_repeats=3, wall_steps=4)
FULL = dict(lr_factors=(0.1, 0.3, 1.0, 3.0, 10.0), every=(1, 10, 100), cost_repeats=20, wall_repeats=5)
QUICK_BUDGET_S = 240.0
SEQUENTIAL = ("simultaneous", "gauss-seidel backward", "block-coordinate cyclic")


def methods(every: Sequence[int]) -> list[str]:
    """The methods compared: the sequential orders, Coupled at each ``every``, and the no-cross control at the
    smallest ``every``."""
    first = min(every)
    return [*SEQUENTIAL, *(f"coupled every {n}" for n in sorted(every)), f"coupled no-cross every {first}"]


def run(workload_factory=DEFAULT, *, steps: int | None = None, lrs=None, seed: int = 0, seeds: int | None = None,
        quick: bool = False, full: bool = False, out=None, show_progress: bool = False, **options) -> dict:
    """Every method on ``workload_factory(s)`` for each seed s, each until it has spent ``steps`` gradient-
    evaluation equivalents (default: the recipe's budget; ``quick`` trims it to fit 4 minutes), at every
    learning rate of the grid (``lrs``, or the recipe's lr times ``lr_factors``)."""
    factory, lrs, configuration, opts, seed_ids, first = begin(NAME, workload_factory, steps, lrs, seed, seeds, quick,
                                                               full, options, OPTIONS, FULL)
    check_options(opts)
    with few_threads(first):
        return _run(factory, first, steps, lrs, seed_ids, configuration, opts, out, show_progress)


def check_options(opts: dict) -> None:
    every = opts["every"]
    every = (every,) if isinstance(every, int) else tuple(every)
    if not every or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in every):
        raise ValueError(f"study {NAME!r}: every must be ints >= 1, got {opts['every']!r}")
    opts["every"] = tuple(sorted(set(every)))
    trust = opts["trust"]
    if trust is not None and (isinstance(trust, bool) or not isinstance(trust, (int, float)) or not trust >= 0):
        raise ValueError(f"study {NAME!r}: trust must be a float >= 0 or None, got {trust!r}")


def _run(factory, first, steps, lrs, seed_ids, configuration, opts, out, show_progress) -> dict:
    recipe = first.recipe
    grid = sorted(set(lrs)) if lrs else [recipe.lr * f for f in opts["lr_factors"]]
    equal_lr = min(grid, key=lambda x: abs(math.log(x / recipe.lr)))
    names = methods(opts["every"])
    k = len(first.blocks)
    wrap = Wrapper(opts["trust"])

    load = {"before": os.getloadavg()}
    meters = {s: _orders.CostMeter(factory(s), opts["cost_repeats"], opts["train_eval_batches"]) for s in seed_ids}
    for meter in meters.values():
        meter.measure_upfront(pairs=False)
    solve_cost = {s: coupled_cost(factory, s, opts["cost_repeats"], wrap) for s in seed_ids}
    budget = float(steps or recipe.steps)
    trimmed = None
    if configuration == "quick" and steps is None:
        budget, trimmed = fit_budget(budget, meters[seed_ids[0]], len(seed_ids) * len(grid) * len(names))

    marks = [budget * i / opts["checkpoints"] for i in range(opts["checkpoints"] + 1)]
    jobs = [(m, lr, s) for s in seed_ids for lr in grid for m in names]
    curves, runs, alphas = [], [], []
    for method, lr, s in progress(jobs, desc="communication: training", enabled=show_progress):
        workload = factory(s)
        observer = (AlphaLog(method, lr, s, workload, meters[s].eval_batches) if method.startswith("coupled")
                    else None)
        cost = step_cost(solve_cost[s])
        result = _orders.train(method, workload, s, lr, budget, marks, meters[s], wrap_fn=wrap, cost_fn=cost,
                               observe=observer)
        final = result["final"]
        if observer is not None:
            final["outcomes"] = observer.outcomes
            alphas += observer.rows
        curves += result["curve"]
        runs.append(final)
        keep(out, "runs", final)
    load["after training"] = os.getloadavg()
    # a timed repeat spans at least one period of the largest every, so that it holds its share of solves
    wall = _orders.wall_times(factory, seed_ids[0], names, equal_lr, opts["wall_repeats"],
                              max(opts["wall_steps"], *opts["every"]),
                              meters, wrap_fn=wrap)
    load["after"] = os.getloadavg()

    summary = Summary()
    chosen = _orders.tune(runs, names, grid, equal_lr)
    summarise(summary, curves, runs, alphas, names, seed_ids, grid, chosen, solve_cost, first.blocks.names)
    cfg = config(factory, first, seed=seed_ids[0], seeds=seed_ids, configuration=configuration, budget=budget,
                 budget_trimmed=trimmed, lrs=grid, equal_lr=equal_lr, optimizer=recipe.optimizer, methods=names,
                 blocks=k, load_average=load,
                 **{key: list(v) if isinstance(v, tuple) else v for key, v in opts.items()})
    res = study_results(NAME, QUESTION, cfg, summary, chosen_lr=chosen, wall=wall, runs=runs, curves=curves,
                        alphas=alphas, solve_cost={str(s): c for s, c in solve_cost.items()})
    out = run_dir(out)
    if out is not None:
        out.tables(NAME, summary, curves=curves, runs=[{k: v for k, v in r.items() if k != "outcomes"} for r in runs],
                   alpha=alphas, wall=wall)
        figures(res, summary, out)
        out.text("report.md", report(res, summary))
    return res


# ---- the methods ------------------------------------------------------------------------------------------------

class Wrapper:
    """``method`` around the optimizer ``inner`` (the sequential orders as the orders study builds them)."""

    def __init__(self, trust):
        self.trust = trust

    def __call__(self, method: str, inner, workload, seed: int):
        if not method.startswith("coupled"):
            return _orders.wrap(method, inner, workload, seed)
        every = int(method.split()[-1])
        return pyco.Coupled(inner, workload.blocks, trust=self.trust, every=every, cross="no-cross" not in method,
                            model=workload.model)


def step_cost(cost: dict):
    """The cost function of :func:`pyco.studies.orders.train` with Coupled's steps: ``cost["solve"]`` gradient-
    evaluation equivalents for a solving step, ``cost["reuse"]`` for one that reused α (both measured)."""
    def fn(method, opt, calls, meter):
        if method.startswith("coupled"):
            return cost["reuse"] if opt.last_outcome == "reused" else cost["solve"]
        return _orders.step_cost(method, opt, calls, meter)

    return fn


def coupled_cost(factory, seed: int, repeats: int, wrap: Wrapper) -> dict:
    """A solving and a reusing Coupled step's time as multiples of a full forward+backward on the same batch,
    each timed alone right after a full one, the median ratio over ``repeats`` (after a warm-up), on workloads
    of their own: ``{"solve": ..., "reuse": ...}``."""
    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    out = {}
    for kind, method in (("solve", "coupled every 1"), ("reuse", f"coupled every {10 ** 9}")):
        workload = factory(seed)
        opt = wrap(method, workload.recipe.make(workload.model.parameters(), lr=workload.recipe.lr), workload, 0)
        closure = closure_for(workload, opt, next(workload.batches()))
        timed(closure), timed(lambda: opt.step(closure)), timed(lambda: opt.step(closure))  # the first one solves
        ratios = []
        for _ in range(max(1, repeats)):
            full = timed(closure)
            ratios.append(timed(lambda: opt.step(closure)) / full)
        out[kind] = statistics.median(ratios)
    return out


def fit_budget(budget: float, meter, runs: int, budget_s: float = QUICK_BUDGET_S) -> tuple[float, dict | None]:
    """The quick budget: the recipe's, or less so that ``runs`` runs of it project under ``budget_s`` (a run
    spends about its budget in full forward+backward times, plus its checkpoints: counted as half again).
    Never below a tenth of the recipe's. Returns (budget, what was decided or None)."""
    full = statistics.median(meter._time([]) for _ in range(5))
    projected = runs * budget * full * 1.5
    if projected <= budget_s:
        return budget, None
    fitted = max(budget / 10, math.floor(budget_s / (runs * full * 1.5)))
    return float(fitted), {"recipe_budget": budget, "budget": fitted, "projected_s": projected,
                           "limit_s": budget_s, "seconds_per_evaluation": full}


class AlphaLog:
    """Records, at every solving step of a Coupled run, each block's α and, from the same f and C, the α the
    model gives without the cross terms (or with them, for the no-cross control): the communication's effect
    on each block at the same point. And whether the model held, as diagnostics outside the budget (forward
    passes only, the model's buffers put back): on the step's own batch, the model's predicted change m(α), the
    change the applied step really made and the change the proposal itself (α = 1) would have made; and the
    same two changes of the training loss the study reports (the mean over its fixed training batches), so
    that a step tuned to its own batch shows as one."""

    def __init__(self, method: str, lr: float, seed: int, workload, eval_batches):
        self.method, self.lr, self.seed, self.workload = method, lr, seed, workload
        self.eval_batches = eval_batches
        self.rows: list[dict] = []
        self.outcomes: dict[str, int] = {}
        self.before = self._snapshot(workload.blocks.params())  # the parameters before the step observed next

    @staticmethod
    @torch.no_grad()
    def _snapshot(params) -> list[torch.Tensor]:
        return [p.detach().clone() for p in params]

    def __call__(self, opt, step: int, batch) -> None:
        now = self._snapshot(opt.blocks.params())
        try:
            self._record(opt, step, batch, now)
        finally:
            self.before = now

    def _record(self, opt, step: int, batch, now: list[torch.Tensor]) -> None:
        self.outcomes = dict(opt.outcomes)
        if opt.last_outcome == "reused" or opt.last_report is None:
            return
        from pyco.probe._evaluation import FixedBatch

        report = opt.last_report
        other = opt.scales(report, cross=not opt.cross).alpha.tolist()  # the same f and C, the other way
        params = opt.blocks.params()
        with FixedBatch(lambda: self.workload.loss(batch), params, opt.dtype) as fixed:
            applied = float(fixed.loss()) - report.loss_before  # buffers and random state left as they were
        evals = self._eval_changes(opt, params, now)
        for b, (name, alpha) in enumerate(opt.last_alpha.items()):
            coupled, nocross = (alpha, other[b]) if opt.cross else (other[b], alpha)
            self.rows.append({"method": self.method, "lr": self.lr, "seed": self.seed, "step": step, "block": name,
                              "alpha": alpha, "alpha_coupled": coupled, "alpha_nocross": nocross,
                              "outcome": opt.last_outcome, "predicted": opt.last_predicted, "applied": applied,
                              "proposal_actual": report.actual, **evals})

    @torch.no_grad()
    def _eval_changes(self, opt, params, now: list[torch.Tensor]) -> dict:
        """The training loss's change by the applied step and by the proposal (θ + Δ, Δ_b recovered as
        (θ' − θ)/α_b; None where some α_b is 0), at the parameters before and after this step."""
        alpha = opt.alpha_per_param
        loss = lambda: _orders.train_loss(self.workload, self.eval_batches)  # noqa: E731
        after = loss()
        try:
            for p, b in zip(params, self.before):
                p.copy_(b)
            start = loss()
            if any(a == 0.0 for a in alpha):
                proposal = math.nan
            else:
                for p, b, n, a in zip(params, self.before, now, alpha):
                    p.copy_(b + (n - b) / a)
                proposal = loss()
        finally:
            for p, n in zip(params, now):
                p.copy_(n)
        return {"eval_applied": after - start, "eval_proposal": proposal - start}


# ---- the numbers ------------------------------------------------------------------------------------------------

def _final(runs, method, lr, key):
    """``key`` of the runs of ``method`` at ``lr``, seed by seed."""
    return [r.get(key, math.nan) for r in sorted((r for r in runs if r["order"] == method and r["lr"] == lr),
                                                  key=lambda r: r["seed"])]


def _solves(alphas, method, lr, seed) -> list[dict]:
    """One row per solving step (not indefinite) of the run of ``method`` at ``lr`` from ``seed``."""
    return list({a["step"]: a for a in alphas if a["method"] == method and a["lr"] == lr and a["seed"] == seed
                 and a["outcome"] != "indefinite"}.values())


def loss_at_evals(curves, method, lr, seed, evals: float) -> float:
    """The training loss of a run at ``evals`` gradient-evaluation equivalents (linear between checkpoints)."""
    pts = sorted(((c["evals"], c["train_loss"]) for c in curves
                  if c["order"] == method and c["lr"] == lr and c["seed"] == seed))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= evals <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (evals - x0) / (x1 - x0)
    return pts[-1][1] if pts else math.nan


def summarise(summary: Summary, curves, runs, alphas, names, seeds, grid, chosen, solve_cost, blocks) -> None:
    metrics = ["train_loss", *sorted({k for r in runs for k in r if k.startswith("heldout_")})]
    summary.add("solve_cost", [solve_cost[s]["solve"] for s in seeds])
    summary.add("reuse_cost", [solve_cost[s]["reuse"] for s in seeds])
    for m in names:
        lr = chosen[m]
        summary.add(f"cost_per_step/{m}", [r["spent"] / max(1, r["steps"]) for r in runs
                                           if r["order"] == m and r["lr"] == lr])
        summary.add(f"steps/{m}", _final(runs, m, lr, "steps"))
        for key in metrics:
            name = "final_train_loss" if key == "train_loss" else f"final_{key}"
            summary.add(f"tuned_{name}/{m}", _final(runs, m, lr, key))
            for base in ("simultaneous", "gauss-seidel backward"):
                if m != base:
                    summary.add(f"tuned_{name}_vs_{base}/{m}", _final(runs, m, lr, key),
                                against=_final(runs, base, chosen[base], key))
        for g in grid:  # the gain at each learning rate, same lr, equal compute
            if m != "simultaneous":
                summary.add(f"gain_at_lr/{m}/{g:g}", _final(runs, m, g, "train_loss"),
                            against=_final(runs, "simultaneous", g, "train_loss"))
    # equal steps: what the communication buys per step, its cost set aside
    sim_lr = chosen["simultaneous"]
    for m in names:
        if m == "simultaneous":
            continue
        lr = chosen[m]
        mine = sorted((r for r in runs if r["order"] == m and r["lr"] == lr), key=lambda r: r["seed"])
        sim = [loss_at_evals(curves, "simultaneous", sim_lr, r["seed"], float(r["steps"])) for r in mine]
        summary.add(f"equal_steps_train_loss_vs_simultaneous/{m}", [r["train_loss"] for r in mine], against=sim)
        for g in grid:  # and at the same learning rate
            mine = sorted((r for r in runs if r["order"] == m and r["lr"] == g), key=lambda r: r["seed"])
            sim = [loss_at_evals(curves, "simultaneous", g, r["seed"], float(r["steps"])) for r in mine]
            summary.add(f"equal_steps_same_lr/{m}/{g:g}", [r["train_loss"] for r in mine], against=sim)
    nocross = next(m for m in names if "no-cross" in m)
    twin = nocross.replace(" no-cross", "")
    summary.add("tuned_cross_gain", _final(runs, twin, chosen[twin], "train_loss"),
                against=_final(runs, nocross, chosen[nocross], "train_loss"))
    for g in grid:
        summary.add(f"cross_gain_at_lr/{g:g}", _final(runs, twin, g, "train_loss"),
                    against=_final(runs, nocross, g, "train_loss"))
    # α per block, in the coupled run at its tuned lr: its mean over solves per seed, and against no-cross
    for b in blocks:
        per_seed, diff = [], []
        for s in seeds:
            rows = [a for a in alphas if a["method"] == twin and a["lr"] == chosen[twin] and a["seed"] == s
                    and a["block"] == b]
            if rows:
                per_seed.append(statistics.fmean(a["alpha_coupled"] for a in rows))
                diff.append(statistics.fmean(a["alpha_coupled"] - a["alpha_nocross"] for a in rows))
        if per_seed:
            summary.add(f"alpha/{b}", per_seed)
            summary.add(f"alpha_minus_nocross/{b}", diff)
    for m in names:  # did the model hold? per seed, over the solves of the run at the tuned lr
        if not m.startswith("coupled"):
            continue
        per_seed = [_solves(alphas, m, chosen[m], s) for s in seeds]
        per_seed = [rows for rows in per_seed if rows]  # indefinite solves excluded: α = 1 there, nothing modelled
        if not per_seed:
            continue
        summary.add(f"model_error/{m}", [statistics.fmean(a["applied"] - a["predicted"] for a in rows)
                                         for rows in per_seed])
        summary.add(f"applied_worse_than_proposal/{m}", [statistics.fmean(float(a["applied"] > a["proposal_actual"])
                                                                          for a in rows) for rows in per_seed])
        summary.add(f"applied_minus_proposal/{m}", [statistics.fmean(a["applied"] - a["proposal_actual"]
                                                                     for a in rows) for rows in per_seed])
        on_eval = [[a["eval_applied"] - a["eval_proposal"] for a in rows
                    if math.isfinite(a.get("eval_proposal", math.nan))] for rows in per_seed]
        if all(on_eval):
            summary.add(f"eval_applied_minus_proposal/{m}", [statistics.fmean(v) for v in on_eval])
    for m in names:
        if not m.startswith("coupled"):
            continue
        outcome_runs = [r for r in runs if r["order"] == m and r["lr"] == chosen[m] and r.get("outcomes")]
        for outcome in ("interior", "trust_bound", "indefinite", "nonfinite"):
            shares = []
            for r in outcome_runs:
                solved = sum(v for k, v in r["outcomes"].items() if k != "reused")
                shares.append(r["outcomes"].get(outcome, 0) / solved if solved else math.nan)
            if shares:
                summary.add(f"outcome_share/{m}/{outcome}", shares)


# ---- figures -------------------------------------------------------------------------------------------------------

def figures(res: dict, summary: Summary, out: RunDir) -> None:
    plt = pyplot()
    cfg, curves = res["config"], res["curves"]
    names, seeds, chosen = cfg["methods"], cfg["seeds"], res["chosen_lr"]
    wall = {w["order"]: w["ms_per_step"] for w in res["wall"]}

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True, sharey=True)
    for ax, axis in zip(axes, ("evals", "seconds")):
        for m in names:
            lr = chosen[m]
            pts: dict[float, list[float]] = {}
            steps: dict[float, list[float]] = {}
            for c in curves:
                if c["order"] == m and c["lr"] == lr:
                    pts.setdefault(c["evals"], []).append(c["train_loss"])
                    steps.setdefault(c["evals"], []).append(c["step"])
            xs = sorted(x for x in pts if len(pts[x]) == len(seeds) and all(0 < v < math.inf for v in pts[x]))
            if not xs:
                continue
            shown = xs if axis == "evals" else [statistics.fmean(steps[x]) * wall[m] / 1e3 for x in xs]
            _orders._log_band(ax, shown, [pts[x] for x in xs], f"{m} (lr {lr:g})")
        ax.set(xlabel="gradient-evaluation equivalents" if axis == "evals" else
               "seconds (steps × the method's measured time per step)", yscale="log",
               title="training loss at each method's tuned lr")
        _orders._legend(ax, fontsize=7)
    axes[0].set_ylabel(f"training loss (geometric mean over {len(seeds)} seeds, 95% band)")
    out.figure("communication_loss.png", fig)

    alphas = res["alphas"]
    twin = next(m for m in names if m.startswith("coupled every"))
    rows = [a for a in alphas if a["method"] == twin and a["lr"] == chosen[twin]]
    if rows:
        blocks = list(dict.fromkeys(a["block"] for a in rows))
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
        for b in blocks:
            by_step: dict[int, list[float]] = {}
            for a in rows:
                if a["block"] == b:
                    by_step.setdefault(a["step"], []).append(a["alpha_coupled"])
            xs = sorted(by_step)
            axes[0].plot(xs, [statistics.median(by_step[x]) for x in xs], lw=1, label=b)
        axes[0].axhline(1, color="k", lw=0.7, ls=":")
        axes[0].set(xlabel="step", ylabel="α (median over seeds)", title=f"{twin}: α per block over training")
        if len(blocks) <= 16:
            _orders._legend(axes[0], fontsize=6, ncol=2)
        ests = [summary.get(f"alpha_minus_nocross/{b}") for b in blocks]
        ys = range(len(blocks))
        axes[1].errorbar([e.mean for e in ests], ys, fmt="o", ms=3,
                         xerr=[[e.mean - e.lo if e.has_interval else 0 for e in ests],
                               [e.hi - e.mean if e.has_interval else 0 for e in ests]])
        axes[1].axvline(0, color="k", lw=0.7)
        axes[1].set_yticks(list(ys), blocks, fontsize=6)
        axes[1].set(xlabel="α(coupled) − α(no cross terms), same point (mean over solves; 95% over seeds)",
                    title="what the other blocks' moves do to each block's α")
        out.figure("communication_alpha.png", fig)

    fig, ax = plt.subplots(figsize=(7, 4.8), constrained_layout=True)
    runs = res["runs"]
    for m in names:
        xs, ys = [], []
        for lr in cfg["lrs"]:
            vals = [r["train_loss"] for r in runs if r["order"] == m and r["lr"] == lr]
            if vals and all(0 < v < math.inf for v in vals):
                xs.append(lr)
                ys.append(math.exp(statistics.fmean(math.log(v) for v in vals)))
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, label=m)
    ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="final training loss (geometric mean)",
           title="at equal compute, by learning rate")
    _orders._legend(ax, fontsize=7)
    out.figure("communication_lr.png", fig)


# ---- the report -------------------------------------------------------------------------------------------------

def _cell(summary: Summary, name: str, show=claims.number, signed=False) -> str:
    est = summary.get(name)
    if est is None:
        return "—"
    if not math.isfinite(est.mean):  # only a non-finite value makes the mean so: a run that diverged
        return "diverged"
    return claims.ci(est, show, signed=signed)


def report(res: dict, summary: Summary) -> str:
    cfg = res["config"]
    w = cfg["workload_summary"]
    names, seeds, chosen = cfg["methods"], cfg["seeds"], res["chosen_lr"]
    n = len(seeds)
    heldout = "final_heldout_accuracy" if any("heldout_accuracy" in r for r in res["runs"]) else None
    lines = ["# Communicating updates: what they cost, what they buy\n",
             f"The question: {QUESTION.split(': ', 1)[1]}\n",
             f"Workload `{cfg['workload']}` ({w['description'] or str(w['parameters']) + ' parameters'}), "
             f"k = {cfg['blocks']} blocks; {cfg['optimizer']}; {n} seeds ({cfg['configuration']} configuration); "
             f"a budget of {cfg['budget']:g} gradient-evaluation equivalents per run; trust box |α − 1| ≤ "
             f"{cfg['trust']}. Every number is a mean over the seeds with its 95% interval (Student t; "
             f"differences paired by seed: same initialisation, same batches).\n"]
    if cfg.get("budget_trimmed"):
        t = cfg["budget_trimmed"]
        lines.append(f"The quick configuration trimmed the budget from the recipe's {t['recipe_budget']:g} to "
                     f"{t['budget']:g} gradient-evaluation equivalents, so that the projected wall time "
                     f"({t['projected_s']:.0f} s) fits {t['limit_s']:.0f} s: the losses are those of short runs.\n")
    lines += answer(res, summary)

    lines += ["## Cost and loss at equal compute, each method at its tuned learning rate\n",
              "Cost: gradient-evaluation equivalents per step (Gauss–Seidel counts k, block-coordinate and "
              "Coupled steps their measured time as a multiple of a full forward+backward). Wall: the "
              "measured time per step as a multiple of a simultaneous step (median of repeats, min–max; each "
              "repeat as many steps as the largest `every`, so that it holds its share of solves).\n"]
    wall = {r["order"]: r for r in res["wall"]}
    base = wall["simultaneous"]["ms_per_step"]
    head = ["method", "tuned lr", "cost per step", "wall × simultaneous", "steps", "final training loss",
            "vs simultaneous (tuned)", "vs Gauss–Seidel (tuned)"]
    if heldout:
        head.append("held-out accuracy")
    if any("heldout_loss" in r for r in res["runs"]):
        head.append("held-out loss vs simultaneous (tuned)")
    rows = []
    for m in names:
        row = [m, f"{chosen[m]:g}", _cell(summary, f"cost_per_step/{m}"),
               f"{wall[m]['ms_per_step'] / base:.3g} ({wall[m]['ms_min'] / base:.3g}–{wall[m]['ms_max'] / base:.3g})",
               _cell(summary, f"steps/{m}", lambda x: f"{x:.0f}"), _cell(summary, f"tuned_final_train_loss/{m}"),
               _cell(summary, f"tuned_final_train_loss_vs_simultaneous/{m}", signed=True),
               _cell(summary, f"tuned_final_train_loss_vs_gauss-seidel backward/{m}", signed=True)]
        if heldout:
            row.append(_cell(summary, f"tuned_{heldout}/{m}", claims.percent))
        if any("heldout_loss" in r for r in res["runs"]):
            row.append(_cell(summary, f"tuned_final_heldout_loss_vs_simultaneous/{m}", signed=True))
        rows.append(row)
    lines += [tables.markdown(head, rows), "![loss](communication_loss.png)\n"]

    lines += ["## At equal steps: what communicating buys, its cost set aside\n",
              "Each method's final training loss against simultaneous updates (tuned lr) after the same number "
              "of steps (the simultaneous curve read at the method's step count).\n",
              tables.markdown(["method", "steps", "training loss − simultaneous at equal steps"],
                              [[m, _cell(summary, f"steps/{m}", lambda x: f"{x:.0f}"),
                                _cell(summary, f"equal_steps_train_loss_vs_simultaneous/{m}", signed=True)]
                               for m in names if m != "simultaneous"])]
    lines += ["The same at each learning rate of the grid (the simultaneous run at the same learning rate, read at "
              "the method's step count):\n",
              tables.markdown(["lr", *(m for m in names if m != "simultaneous")],
                              [[f"{g:g}", *(_cell(summary, f"equal_steps_same_lr/{m}/{g:g}", signed=True)
                                            for m in names if m != "simultaneous")] for g in cfg["lrs"]])]

    nocross = next(m for m in names if "no-cross" in m)
    twin = nocross.replace(" no-cross", "")
    blocks = [k.split("/", 1)[1] for k in summary if k.startswith("alpha/")]
    lines += [f"## α per block (`{twin}` at its tuned lr {chosen[twin]:g})\n",
              "The mean over the run's solves of each block's α, and its difference from the α the same f and "
              "C give without the cross terms (same points): a negative difference means the block moves less "
              "because the others move.\n",
              tables.markdown(["block", "α", "α − α(no cross terms)"],
                              [[b, _cell(summary, f"alpha/{b}"), _cell(summary, f"alpha_minus_nocross/{b}", signed=True)]
                               for b in blocks]),
              "![alpha](communication_alpha.png)\n"]
    outcome_rows = []
    for m in names:
        if m.startswith("coupled"):
            outcome_rows.append([m, *(_share(summary.get(f"outcome_share/{m}/{o}"))
                                      for o in ("interior", "trust_bound", "indefinite", "nonfinite"))])
    lines += ["What the solves ended as (share of the solving steps, mean over seeds with its t interval clipped "
              "to [0, 100%]; an indefinite model gives α = 1, the optimizer's own step):\n",
              tables.markdown(["method", "interior", "on the box", "indefinite", "non-finite"], outcome_rows)]

    fidelity = [m for m in names if f"model_error/{m}" in summary]
    if fidelity:
        lines += ["## Did the model hold?\n",
                  "At each solving step (indefinite ones excluded: α = 1 there), on the step's own batch: the loss "
                  "change the applied step θ + Σ α_i Δ_i really made, minus the model's prediction m(α) (the "
                  "third- and higher-order part the quadratic model leaves out); and against the change the "
                  "proposal alone (α = 1) would have made. A diagnostic: one forward pass per solve, outside the "
                  "budget. Means over the run's solves, 95% intervals over seeds.\n",
                  tables.markdown(["method", "realised − predicted", "realised − proposal's own change",
                                   "share of solves where the applied step did worse than the proposal",
                                   "training loss (fixed batches): applied − proposal"],
                                  [[m, _cell(summary, f"model_error/{m}", signed=True),
                                    _cell(summary, f"applied_minus_proposal/{m}", signed=True),
                                    _share(summary.get(f"applied_worse_than_proposal/{m}")),
                                    _cell(summary, f"eval_applied_minus_proposal/{m}", signed=True)]
                                   for m in fidelity]),
                  "The last column is the same comparison on the training loss the study reports (the mean over "
                  "its fixed training batches) instead of the step's own batch: a step chosen to be best for its "
                  "own batch need not be best for the others.\n"]
    lines += ["## The gain by learning rate\n",
              "Final training loss minus simultaneous at the same learning rate, equal compute; and Coupled "
              "minus its no-cross control at the same learning rate (the cross terms' own effect).\n"]
    head = ["lr", *(m for m in names if m != "simultaneous"), "cross terms (coupled − no-cross)"]
    rows = [[f"{g:g}", *(_cell(summary, f"gain_at_lr/{m}/{g:g}", signed=True) for m in names if m != "simultaneous"),
             _cell(summary, f"cross_gain_at_lr/{g:g}", signed=True)] for g in cfg["lrs"]]
    lines += [tables.markdown(head, rows), "![lr](communication_lr.png)\n"]
    lines += ["## How it was measured\n",
              f"A solving Coupled step cost {_cell(summary, 'solve_cost')} full forward+backward passes on this "
              f"workload, a reusing one {_cell(summary, 'reuse_cost')} (measured per seed: the median ratio over "
              f"{cfg['cost_repeats']} adjacent timings). "
              f"Learning rates {', '.join(f'{g:g}' for g in cfg['lrs'])}; tuned by the "
              f"{chosen['by'].replace('_', ' ')} at the end of the budget. Command: `{' '.join(cfg['command'])}`; "
              f"{cfg['date']}; torch {cfg['torch']}, {cfg['threads']} thread(s); load average (1, 5, 15 min) before "
              f"{_load(cfg['load_average']['before'])}, after training {_load(cfg['load_average']['after training'])}."
              "\n"]
    return "\n".join(lines)


def _share(est) -> str:
    if est is None:
        return "—"
    if not est.has_interval:
        return claims.percent(est.mean)
    lo, hi = max(0.0, est.lo), min(1.0, est.hi)
    return f"{claims.percent(est.mean)} [{claims.percent(lo)}, {claims.percent(hi)}]"


def _load(avg) -> str:
    return ", ".join(f"{x:.2f}" for x in avg)


def answer(res: dict, summary: Summary) -> list[str]:
    cfg = res["config"]
    names = cfg["methods"]
    nocross = next(m for m in names if "no-cross" in m)
    twin = nocross.replace(" no-cross", "")
    lines = ["## In short\n"]
    cost = summary["solve_cost"]
    lines.append(f"- **Cost.** A solving Coupled step cost {claims.ci(cost)} plain gradient evaluations "
                 f"(k = {cfg['blocks']}), a reusing one {claims.ci(summary['reuse_cost'])}; a Gauss–Seidel sweep "
                 f"costs {cfg['blocks']}.")
    sides = {1: [], -1: [], 0: []}
    for m in names[1:]:
        sides[summary[f"tuned_final_train_loss_vs_simultaneous/{m}"].sign].append(f"`{m}`")
    lines.append(f"- **Does it pay?** At equal compute, each method at its tuned learning rate, the final "
                 f"training loss against simultaneous updates (paired 95% intervals, n = {len(cfg['seeds'])}): "
                 f"lower for {', '.join(sides[-1]) or 'none'}; higher for {', '.join(sides[1]) or 'none'}; no "
                 f"measurable difference for {', '.join(sides[0]) or 'none'}.")
    sim_lr = res["chosen_lr"]["simultaneous"]
    est = summary[f"equal_steps_same_lr/{twin}/{sim_lr:g}"]
    lower = [f"{g:g}" for g in cfg["lrs"] if summary[f"equal_steps_same_lr/{twin}/{g:g}"].sign < 0]
    higher = [f"{g:g}" for g in cfg["lrs"] if summary[f"equal_steps_same_lr/{twin}/{g:g}"].sign > 0]
    lines.append("- **What it buys per step.** At simultaneous updates' tuned learning rate " + f"({sim_lr:g}), "
                 + claims.difference(f"`{twin}`", "simultaneous updates after as many steps", est,
                                     quantity="training loss")
                 + f". At the same learning rate and as many steps, `{twin}` was measurably lower at "
                 f"{', '.join(lower) or 'no learning rate'} and measurably higher at {', '.join(higher) or 'none'}; "
                 "each at its own tuned learning rate: "
                 + claims.ci(summary[f"equal_steps_train_loss_vs_simultaneous/{twin}"], signed=True) + ".")
    cross = summary["tuned_cross_gain"]
    lines.append("- **The communication itself.** " + claims.difference(
        f"`{twin}`", f"its no-cross control (`{nocross}`, the same cost)", cross, quantity="final training loss")
        + ".")
    lower = [b for b in (k.split("/", 1)[1] for k in summary if k.startswith("alpha_minus_nocross/"))
             if summary[f"alpha_minus_nocross/{b}"].sign < 0]
    higher = [b for b in (k.split("/", 1)[1] for k in summary if k.startswith("alpha_minus_nocross/"))
              if summary[f"alpha_minus_nocross/{b}"].sign > 0]
    est = summary.get(f"model_error/{twin}")
    if est is not None:
        lines.append("- **Did the model hold?** " + claims.sign(
            est, quantity=f"On the step's own batch, the realised loss change of `{twin}`'s step minus its quadratic "
                          "model's prediction", positive="the applied steps did worse than the model promised "
                          "(third and higher orders, which the model leaves out, work against the scaled step)",
            negative="the applied steps did better than the model promised") + "; realised minus the proposal's "
                     f"own change: {claims.ci(summary[f'applied_minus_proposal/{twin}'], signed=True)}.")
        est = summary.get(f"eval_applied_minus_proposal/{twin}")
        if est is not None:
            lines.append("- **On the other batches.** " + claims.sign(
                est, quantity=f"The change of the training loss on the study's fixed batches by `{twin}`'s applied "
                              "step minus the proposal's own", positive="the scaled step, chosen for its own batch, "
                              "did worse than the unscaled proposal on the others", negative="the scaled step also "
                              "did better than the proposal on the other batches") + ".")
    better, worse = [], []
    for m in names[1:]:
        for g in cfg["lrs"]:
            est = summary.get(f"gain_at_lr/{m}/{g:g}")
            if est is not None and est.sign:
                (better if est.sign < 0 else worse).append(f"`{m}` at {g:g}")
    lines.append(f"- **When it pays.** At the same learning rate and equal compute, a final training loss measurably "
                 f"below simultaneous updates': {', '.join(better) or 'none'}; measurably above: "
                 f"{', '.join(worse) or 'none'}; the rest not distinguishable (paired intervals by learning rate "
                 f"below).")
    lines.append(f"- **Who yields.** Blocks whose α the cross terms lowered (interval below 0): "
                 f"{', '.join(f'`{b}`' for b in lower) or 'none'}; raised: {', '.join(f'`{b}`' for b in higher) or 'none'}.")
    return lines + [""]
