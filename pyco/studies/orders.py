"""Would updating one block at a time help, or waste compute?

The same workload, batches and optimizer (the recipe's) under six update orders: simultaneous (standard
backprop), Gauss–Seidel sweeps, forward and backward (every block's gradient recomputed on the same batch
after the blocks before it moved), and block-coordinate steps (one block at a time, cyclic or reshuffled
every epoch, or a random pair). Three measurements, each over seeds:

1. **Compute.** Every order trains until it has spent the same budget of gradient-evaluation equivalents: a
   full forward+backward counts 1; a Gauss–Seidel sweep counts k, one full evaluation per block; a
   block-coordinate step counts the fraction of a full forward+backward that its forward and partial
   backward (the inactive blocks frozen) is measured to take on the workload: both timed alone, one after
   the other, and the median ratio over repeats. Learning rates are tuned per order on a grid (the recipe's
   learning rate times a few factors) against the held-out loss at the end of the budget; the report
   compares the orders at the recipe's learning rate and each at its best one, at equal compute.
2. **Wall time**, measured apart from training: each order's steps timed alone, the median of repeats and
   their spread.
3. **The probe's prediction** ΔL(Gauss–Seidel) − ΔL(simultaneous) = ½ Σ_{i≠j} C_ij for a plain gradient
   step −η∇L, against real sweeps from the same points (float64), on a ReLU and a GELU version of the
   network. Two measurements say where a miss comes from: the fraction of ReLU pre-activations on the batch
   that change sign within the step (activation-pattern flips), and the same sweeps on the network whose
   ReLU pattern is frozen at the start point (each ReLU multiplies its input by the 0/1 mask it had there:
   the same loss, gradient and Hessian at the start point, but no kink to cross).

A small CPU model (fewer than 100,000 parameters) runs on one intra-op thread, the previous setting put back
afterwards (``_common.few_threads``): at that size more threads only add synchronisation, and the wall times
are those of one thread. ``quick`` (the default): 3 seeds, learning rates × (0.3, 1, 3), the gap at 4 points and 4 step sizes;
``full``: 5 seeds, × (0.1, 0.3, 1, 3), 6 points and 5 step sizes.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

import pyco
from pyco.orders._wrapper import frozen
from pyco.studies import claims, tables
from pyco.studies._common import (RunDir, closure_for, config, few_threads, progress, pyplot,
                                  results as study_results, run_dir, keep, begin)
from pyco.studies.intervals import Summary, t_interval
from pyco.studies.workload import WorkloadError, cast_batch, load as load_workload
from pyco.studies.workloads import DEFAULT

NAME = "orders"
QUESTION = ("question 000: would updating one block at a time (Gauss–Seidel, block-coordinate) help, or "
            "waste compute?")

OPTIONS = dict(lr_factors=(0.3, 1.0, 3.0), checkpoints=30, train_eval_batches=8, cost_repeats=40,
               wall_repeats=5, wall_steps=10, gap_lrs=(0.001, 0.003, 0.01, 0.03), gap_points=4,
               activations=("relu", "gelu"))
FULL = dict(lr_factors=(0.1, 0.3, 1.0, 3.0), cost_repeats=60, wall_repeats=7, gap_lrs=(0.001, 0.003, 0.01, 0.03, 0.1),
            gap_points=6)
ORDERS = ("simultaneous", "gauss-seidel forward", "gauss-seidel backward", "block-coordinate cyclic",
          "block-coordinate reshuffle", "block-coordinate random-subset")
KINKED = (nn.ReLU,)
SIGNED = (nn.ReLU, nn.GELU)
PAIRS_UPFRONT = 28  # random pairs measured before training when there are at most this many; others when first met


def run(workload_factory=DEFAULT, *, steps: int | None = None, lrs=None, seed: int = 0, seeds: int | None = None,
        quick: bool = False, full: bool = False, out=None, show_progress: bool = False, **options) -> dict:
    """Every order on ``workload_factory(s)`` for each seed s, each until it has spent ``steps`` gradient-
    evaluation equivalents (default: the recipe's budget), at every learning rate of the grid (``lrs``, or
    the recipe's lr times ``lr_factors``); their wall time per step; then the Gauss–Seidel gap at
    ``gap_points`` points of a simultaneous run, for plain gradient steps of ``gap_lrs``, on the ReLU and
    GELU versions of the workload (``activation=``; a factory that takes no ``activation`` runs as given)."""
    factory, lrs, configuration, opts, seed_ids, first = begin(NAME, workload_factory, steps, lrs, seed, seeds, quick,
                                                               full, options, OPTIONS, FULL)
    with few_threads(first):
        return _run(factory, first, steps, lrs, seed_ids, configuration, opts, out, show_progress)


def _run(factory, first, steps, lrs, seed_ids, configuration, opts, out, show_progress) -> dict:
    """The measurements, the summary and the files of :func:`run`, its arguments checked."""
    recipe = first.recipe
    budget = float(steps or recipe.steps)
    grid = sorted(set(lrs)) if lrs else [recipe.lr * f for f in opts["lr_factors"]]
    equal_lr = min(grid, key=lambda x: abs(math.log(x / recipe.lr)))
    k = len(first.blocks)
    orders = list(ORDERS)
    load = {"before": os.getloadavg()}

    meters = {s: CostMeter(factory(s), opts["cost_repeats"], opts["train_eval_batches"]) for s in seed_ids}
    for meter in meters.values():
        meter.measure_upfront(pairs="block-coordinate random-subset" in orders)

    marks = [budget * i / opts["checkpoints"] for i in range(opts["checkpoints"] + 1)]
    jobs = [(order, lr, s) for s in seed_ids for lr in grid for order in orders]
    curves, runs = [], []
    for order, lr, s in progress(jobs, desc="orders: training", enabled=show_progress):
        run_ = train(order, factory(s), s, lr, budget, marks, meters[s])
        curves += run_["curve"]
        runs.append(run_["final"])
        keep(out, "runs", run_["final"])
    load["after training"] = os.getloadavg()
    wall = wall_times(factory, seed_ids[0], orders, equal_lr, opts["wall_repeats"], opts["wall_steps"], meters)
    chain = chain_cost(factory, seed_ids, opts["wall_repeats"], opts["wall_steps"]) if first.is_chain else None
    gaps, activations = gap_study(factory, first, seed_ids, budget, opts, show_progress)
    load["after"] = os.getloadavg()

    summary = Summary()
    costs = cost_rows(meters, summary)
    if chain is not None:
        summary.add("sweep_cost/gauss-seidel chain", [k * r for r in chain])
    chosen = tune(runs, orders, grid, equal_lr)
    target = targets(curves, equal_lr, seed_ids, len(marks) - 1)
    compare(summary, curves, runs, orders, seed_ids, equal_lr, chosen, target)
    gap_summary(summary, gaps, activations, seed_ids, opts["gap_lrs"])

    cfg = config(factory, first, seed=seed_ids[0], seeds=seed_ids, configuration=configuration, budget=budget, lrs=grid,
                 equal_lr=equal_lr, optimizer=recipe.optimizer, orders=orders, blocks=k,
                 **{key: list(v) if isinstance(v, tuple) else v for key, v in opts.items()},
                 gap_activations=activations, load_average=load)
    res = study_results(NAME, QUESTION, cfg, summary, chosen_lr=chosen, target_loss=target, costs=costs,
                        chain_ratio=chain, wall=wall, runs=runs, curves=curves, gaps=gaps)
    out = run_dir(out)
    if out is not None:
        out.tables("orders", summary, curves=curves, runs=runs, costs=costs, wall=wall, gap=gaps)
        figures(res, summary, out)
        out.text("report.md", report(res, summary))
    return res




# ---- the orders --------------------------------------------------------------------------------------------

def wrap(order: str, inner, workload, seed: int):
    """The order ``order`` around the optimizer ``inner``."""
    if order == "simultaneous":
        return inner
    if order.startswith("gauss-seidel"):
        return pyco.GaussSeidel(inner, workload.blocks, sweep=order.split()[-1], model=workload.model, seed=seed)
    schedule = order.split()[-1]
    return pyco.BlockCoordinate(inner, workload.blocks, schedule=schedule,
                                active=min(2, len(workload.blocks)) if schedule == "random-subset" else 1, seed=seed)


# ---- compute: what a step costs in gradient evaluations -----------------------------------------------------

class CostMeter:
    """What a forward and partial backward with only some blocks requiring grad costs, as a fraction of a full
    forward+backward on the same batch: each timed alone, one right after the other, and the median of the
    ratios over ``repeats`` (adjacent timings see the same load). Built on a workload of its own (its
    gradients and buffers are not the training run's); it also holds the fixed training batches the training
    loss is measured on."""

    def __init__(self, workload, repeats: int, eval_batches: int):
        self.workload, self.repeats = workload, repeats
        stream = workload.batches()
        self.eval_batches = [next(stream) for _ in range(max(1, eval_batches))]
        self.batch = self.eval_batches[0]
        self.names = workload.blocks.names
        self.fractions: dict[tuple[str, ...], float] = {}
        self.ratios: dict[tuple[str, ...], list[float]] = {}

    def _time(self, frozen_params) -> float:
        self.workload.model.zero_grad(set_to_none=True)
        with frozen(frozen_params):
            start = time.perf_counter()
            self.workload.loss(self.batch).backward()
            return time.perf_counter() - start

    def fraction(self, active: Sequence[str]) -> float:
        """The cost of a step whose closure runs with only the blocks ``active`` requiring grad."""
        key = tuple(sorted(active, key=self.names.index))
        if key not in self.fractions:
            blocks = self.workload.blocks
            inactive = [p for n in self.names if n not in key for p in blocks[n]]
            for _ in range(3):  # warm-up
                self._time([]), self._time(inactive)
            ratios = []
            for _ in range(self.repeats):
                full = self._time([])
                ratios.append(self._time(inactive) / full)
            self.workload.model.zero_grad(set_to_none=True)
            self.ratios[key] = ratios
            self.fractions[key] = statistics.median(ratios)
        return self.fractions[key]

    def measure_upfront(self, pairs: bool) -> None:
        """Every single block, and every pair when the random pairs are few enough to time before training."""
        for name in self.names:
            self.fraction([name])
        if pairs and len(self.names) * (len(self.names) - 1) // 2 <= PAIRS_UPFRONT:
            for pair in itertools.combinations(self.names, 2):
                self.fraction(pair)


def step_cost(order: str, opt, calls: int, meter: CostMeter) -> float:
    """Gradient-evaluation equivalents of the step just taken (``calls`` closure evaluations)."""
    if order.startswith("block-coordinate"):
        return meter.fraction(opt.active_blocks)
    return float(calls)  # simultaneous: 1; Gauss–Seidel: one full evaluation per block


def cost_rows(meters: dict, summary: Summary) -> list[dict]:
    """The measured fractions, per active set: one value per seed (the median ratio of its repeats)."""
    keys = sorted(set.intersection(*(set(m.fractions) for m in meters.values())), key=lambda k: (len(k), k))
    rows = []
    for key in keys:
        name = "+".join(key)
        est = summary.add(f"cost_fraction/{name}", [m.fractions[key] for m in meters.values()])
        ratios = [r for m in meters.values() for r in m.ratios[key]]
        rows.append({"active": name, "blocks": len(key), "mean": est.mean, "lo": est.lo, "hi": est.hi, "n": est.n,
                     "q25": _quantile(ratios, 0.25), "q75": _quantile(ratios, 0.75), "repeats": len(ratios),
                     "values": list(est.values)})
    return rows


def _quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---- training at equal compute ------------------------------------------------------------------------------

def train_loss(workload, batches) -> float:
    """The mean loss over fixed training batches, without gradients; the model's buffers are put back."""
    saved = [b.detach().clone() for b in workload.model.buffers()]
    with torch.no_grad():
        value = statistics.fmean(workload.loss(b).item() for b in batches)
        for b, s in zip(workload.model.buffers(), saved):
            b.copy_(s)
    return value


def train(order: str, workload, seed: int, lr: float, budget: float, marks: Sequence[float],
          meter: CostMeter, *, wrap_fn=None, cost_fn=None, observe=None) -> dict:
    """``order`` at ``lr`` until ``budget`` gradient-evaluation equivalents are spent; the training loss (on
    the meter's fixed batches) and held-out metrics each time the spending crosses one of ``marks``.
    ``wrap_fn`` and ``cost_fn`` replace :func:`wrap` and :func:`step_cost` (another study's methods);
    ``observe(opt, step, batch)`` is called after every step, with the step's batch."""
    wrap_fn, cost_fn = wrap_fn or wrap, cost_fn or step_cost
    opt = wrap_fn(order, workload.recipe.make(workload.model.parameters(), lr=lr), workload, seed)
    batches = workload.batches()
    counter = [0]
    spent, step, mark, diverged = 0.0, 0, 0, False
    curve = []

    def record(upto: int):
        nonlocal mark
        metrics = ({"train_loss": math.inf} if diverged else
                   {"train_loss": train_loss(workload, meter.eval_batches),
                    **{f"heldout_{k}": v for k, v in workload.evaluate().items()}})
        if not math.isfinite(metrics["train_loss"]):
            metrics = {"train_loss": math.inf}
        while mark <= upto:
            curve.append({"order": order, "lr": lr, "seed": seed, "mark": mark, "evals": marks[mark],
                          "spent": spent, "step": step, **metrics})
            mark += 1

    record(0)
    while spent < budget - 1e-9 and not diverged:
        before = counter[0]
        batch = next(batches)
        loss = opt.step(closure_for(workload, opt, batch, counter))
        step += 1
        spent += cost_fn(order, opt, counter[0] - before, meter)
        if observe is not None:
            observe(opt, step, batch)
        diverged = not math.isfinite(loss.detach().item())
        crossed = max((i for i, m in enumerate(marks) if spent >= m - 1e-9), default=0)
        if diverged:
            crossed = len(marks) - 1
        if crossed >= mark:
            record(crossed)
    if mark < len(marks):
        record(len(marks) - 1)
    last = curve[-1]
    final = {"order": order, "lr": lr, "seed": seed, "steps": step, "spent": spent, "diverged": diverged,
             **{k: v for k, v in last.items() if k == "train_loss" or k.startswith("heldout_")}}
    return {"curve": curve, "final": final}


def tune(runs: list[dict], orders: Sequence[str], grid: Sequence[float], equal_lr: float) -> dict:
    """Per order, the learning rate of the grid with the lowest mean held-out loss at the end of the budget
    (the training loss where the workload has no held-out loss)."""
    key = "heldout_loss" if any("heldout_loss" in r for r in runs) else "train_loss"
    chosen = {}
    for order in orders:
        def score(lr):
            vals = [r.get(key, math.inf) for r in runs if r["order"] == order and r["lr"] == lr]
            vals = [v if math.isfinite(v) else math.inf for v in vals]
            return statistics.fmean(vals) if vals else math.inf
        best = min(grid, key=score)
        chosen[order] = best if math.isfinite(score(best)) else equal_lr
    chosen["by"] = key
    return chosen


def targets(curves: list[dict], equal_lr: float, seeds: Sequence[int], last_mark: int) -> dict:
    """Per seed, the training loss simultaneous updates reach at half the budget (at the equal learning rate)."""
    half = last_mark // 2
    return {str(s): next(c["train_loss"] for c in curves if c["order"] == "simultaneous" and c["lr"] == equal_lr
                         and c["seed"] == s and c["mark"] == half) for s in seeds}


def evals_to(curve: list[dict], target: float) -> float:
    """Gradient-evaluation equivalents until the training loss first reaches ``target`` (linear between
    checkpoints); inf when it never does."""
    prev = None
    for c in sorted(curve, key=lambda c: c["mark"]):
        if c["train_loss"] <= target:
            if prev is None or c["evals"] == prev["evals"]:
                return c["evals"]
            frac = (prev["train_loss"] - target) / (prev["train_loss"] - c["train_loss"])
            return prev["evals"] + frac * (c["evals"] - prev["evals"])
        prev = c
    return math.inf


def compare(summary: Summary, curves, runs, orders, seeds, equal_lr: float, chosen: dict, target: dict) -> None:
    """The summary's training numbers: final losses and held-out metrics at equal compute, the compute to
    reach the target, and each order's paired difference from simultaneous updates; at the equal learning
    rate and at each order's tuned one (prefix ``tuned_``)."""
    for prefix, lr_of in (("", lambda order: equal_lr), ("tuned_", lambda order: chosen[order])):
        finals = {o: sorted((r for r in runs if r["order"] == o and r["lr"] == lr_of(o)), key=lambda r: r["seed"])
                  for o in orders}
        metrics = ["train_loss", *sorted({k for r in runs for k in r if k.startswith("heldout_")})]
        to_target = {o: [evals_to([c for c in curves if c["order"] == o and c["lr"] == lr_of(o) and c["seed"] == s],
                                  target[str(s)]) for s in seeds] for o in orders}
        for o in orders:
            for m in metrics:
                name = "final_train_loss" if m == "train_loss" else f"final_{m}"
                vals = [r.get(m, math.nan) for r in finals[o]]
                summary.add(f"{prefix}{name}/{o}", vals)
                if o != "simultaneous":
                    summary.add(f"{prefix}{name}_vs_simultaneous/{o}", vals,
                                against=[r.get(m, math.nan) for r in finals["simultaneous"]])
            summary.add(f"{prefix}evals_to_target/{o}", to_target[o])
            if o != "simultaneous":
                summary.add(f"{prefix}evals_to_target_vs_simultaneous/{o}", to_target[o],
                            against=to_target["simultaneous"])


# ---- wall time, apart from training ---------------------------------------------------------------------------

def wall_times(factory, seed: int, orders, lr: float, repeats: int, steps: int, meters: dict,
               wrap_fn=None) -> list[dict]:
    """Each order's step timed alone on a fresh workload: ``repeats`` timings of ``steps`` steps after two
    warm-up steps; the median time per step and the spread (min, max) over the repeats."""
    rows = []
    full = statistics.median(meters[seed]._time([]) for _ in range(max(repeats, 5)))
    for order in orders:
        workload = factory(seed)
        opt = (wrap_fn or wrap)(order, workload.recipe.make(workload.model.parameters(), lr=lr), workload, seed)
        batches = workload.batches()
        for _ in range(2):
            opt.step(closure_for(workload, opt, next(batches)))
        per_step = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                opt.step(closure_for(workload, opt, next(batches)))
            per_step.append((time.perf_counter() - start) / steps)
        rows.append({"order": order, "ms_per_step": 1e3 * statistics.median(per_step), "ms_min": 1e3 * min(per_step),
                     "ms_max": 1e3 * max(per_step), "repeats": repeats, "steps_per_repeat": steps,
                     "ms_per_full_evaluation": 1e3 * full})
    return rows


def chain_cost(factory, seeds: Sequence[int], repeats: int, steps: int) -> list[float]:
    """Per seed, the median ratio of a chain Gauss–Seidel sweep's time (``pyco.ChainGaussSeidel``: the same
    update as the backward sweep, recomputing only the part of the chain that moved) to the generic
    backward sweep's, both with plain SGD, timed alone one after the other."""
    ratios = []
    for s in seeds:
        workload = factory(s)
        batch = next(workload.batches())
        x, y = batch
        model = workload.model
        generic = pyco.GaussSeidel(torch.optim.SGD(model.parameters(), lr=0.0), workload.blocks, sweep="backward",
                                   model=model)
        chain = pyco.ChainGaussSeidel(torch.optim.SGD(model.parameters(), lr=0.0), model, workload.chain_loss,
                                      workload.blocks, sweep="backward")

        def closure():
            loss = workload.loss(batch)
            loss.backward()
            return loss

        def timed(step) -> float:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            return time.perf_counter() - start

        timed(lambda: generic.step(closure)), timed(lambda: chain.step(x, y))  # warm-up
        ratios.append(statistics.median(timed(lambda: chain.step(x, y)) / timed(lambda: generic.step(closure))
                                        for _ in range(repeats)))
    return ratios


# ---- the Gauss–Seidel gap: prediction against real sweeps -----------------------------------------------------

class PreActivations:
    """While inside, records for ``modules`` (activations) which entries of their input are positive, one
    boolean tensor per call, in call order."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules, self.signs, self.called, self.handles = list(modules), [], [], []

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.modules]
        return self

    def _hook(self, module, inputs):
        self.signs.append(inputs[0].detach() > 0)
        self.called.append(module)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def take(self) -> list[torch.Tensor]:
        """The signs recorded so far (and forgets them)."""
        signs, self.signs, self.called = self.signs, [], []
        return signs


def flip_fraction(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """The fraction of pre-activation entries (example × unit, over every recorded call) whose sign differs
    between ``before`` and ``after`` (as :class:`PreActivations` records them)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"flip_fraction: {len(before)} recorded calls before, {len(after)} after")
    changed = sum(int((a != b).sum()) for a, b in zip(before, after))
    return changed / sum(a.numel() for a in before)


class FrozenPattern:
    """While inside, each ReLU of ``modules`` returns its input times the 0/1 mask recorded for that call
    (``masks`` in call order, as :class:`PreActivations` records them): a network with the same value,
    gradient and Hessian where the masks were taken, and no kink anywhere."""

    def __init__(self, modules: Sequence[nn.Module], masks: Sequence[torch.Tensor]):
        self.modules, self.masks, self.calls, self.handles, self.current = list(modules), list(masks), 0, [], None

    def __enter__(self):
        for m in self.modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        return self

    def _pre(self, module, inputs):
        self.current = inputs[0]
        if getattr(module, "inplace", False):
            return (inputs[0].clone(),)
        return None

    def _post(self, module, inputs, output):
        mask = self.masks[self.calls % len(self.masks)]
        self.calls += 1
        return self.current * mask.to(self.current.dtype)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def point_gaps(workload, batch, gap_lrs: Sequence[float], freeze: bool = True) -> list[dict]:
    """At the workload's current parameters, on ``batch``, in float64: for each step size η the probe's
    predicted ΔL(GS) − ΔL(sim) for Δ = −η∇L, the measured gap of forward and backward sweeps (plain SGD), the
    fraction of activation-pattern flips of the simultaneous step, and (ReLU nets, ``freeze``) the measured
    gaps with the activation pattern frozen at the start point."""
    model, blocks = copy.deepcopy((workload.model, workload.blocks))
    model.double()
    batch = cast_batch(batch, torch.float64)
    params = blocks.params()
    rng = torch.get_rng_state()

    def loss() -> torch.Tensor:
        torch.set_rng_state(rng)
        return workload.loss(batch, model)

    grads = [g.detach() for g in torch.autograd.grad(loss(), params)]
    lr0 = min(gap_lrs)
    probe = pyco.probe.cross_terms(loss, blocks, [-lr0 * g for g in grads], alone=False)
    gap_per_lr2 = probe.gauss_seidel_gap / lr0 ** 2  # C scales as η²: exact for every η
    saved = [p.detach().clone() for p in params]
    kinks = [m for m in model.modules() if isinstance(m, KINKED)]
    signed = [m for m in model.modules() if isinstance(m, SIGNED)]

    def restore():
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        for p in params:
            p.grad = None

    def change(order: str, lr: float) -> float:
        restore()
        with torch.no_grad():
            before = loss().item()
        if order == "simultaneous":
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(lr * g)
        else:
            opt = pyco.GaussSeidel(torch.optim.SGD(params, lr=lr), blocks, sweep=order, model=model)

            def closure():
                out = loss()
                out.backward()
                return out

            opt.step(closure)
        with torch.no_grad():
            after = loss().item()
        restore()
        return after - before

    with PreActivations(signed) as rec, torch.no_grad():
        loss()
        masks = [s for s, m in zip(rec.signs, rec.called) if isinstance(m, KINKED)]
        start_signs = rec.take()
    rows = []
    for lr in gap_lrs:
        predicted = gap_per_lr2 * lr ** 2
        row = {"lr": lr, "predicted_gap": predicted, "first_order": -lr * sum(float((g * g).sum()) for g in grads)}
        sim = change("simultaneous", lr)
        row["simultaneous_dl"] = sim
        for sweep in ("forward", "backward"):
            row[f"measured_gap_{sweep}"] = change(sweep, lr) - sim
        if signed:
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(lr * g)
                with PreActivations(signed) as rec:
                    loss()
                    after_signs = rec.take()
            restore()
            row["sign_changes"] = flip_fraction(start_signs, after_signs)
        if kinks and freeze:
            with FrozenPattern(kinks, masks):
                sim_frozen = change("simultaneous", lr)
                row["simultaneous_dl_frozen"] = sim_frozen
                for sweep in ("forward", "backward"):
                    row[f"measured_gap_frozen_{sweep}"] = change(sweep, lr) - sim_frozen
        rows.append(row)
    return rows


def relative_errors(row: dict, frozen_pattern: bool = False) -> list[float]:
    """|measured − predicted| / |predicted| of both sweeps of a gap row (empty when the prediction is 0)."""
    pred = row["predicted_gap"]
    key = "measured_gap_frozen_" if frozen_pattern else "measured_gap_"
    if pred == 0 or f"{key}forward" not in row:
        return []
    return [abs(row[f"{key}{s}"] - pred) / abs(pred) for s in ("forward", "backward")]


def activation_factories(factory, first, activations: Sequence[str]) -> tuple[dict, bool]:
    """{activation: factory} for each of ``activations`` (a ReLU and a GELU version of the workload), or the
    workload as given (under its own activation's name, "as-given" when it names none) when the factory
    takes no ``activation``."""
    try:
        made = {act: load_workload(factory, activation=act) for act in activations}
        for f in made.values():
            f(0)
        return made, True
    except (WorkloadError, TypeError):
        return {str(first.config.get("activation", "as-given")): factory}, False


def gap_study(factory, first, seeds: Sequence[int], budget: float, opts: dict, show: bool) -> tuple[list[dict], dict]:
    """The gap rows at ``gap_points`` points, evenly spread over the first ``budget`` steps of a simultaneous
    run at the recipe's learning rate, for each seed and activation."""
    made, switched = activation_factories(factory, first, opts["activations"])
    n = opts["gap_points"]
    points = sorted({int(round(i * budget / n)) for i in range(n)})
    rows = []
    jobs = [(act, s) for act in made for s in seeds]
    for act, s in progress(jobs, desc="orders: predicted vs measured gap", enabled=show):
        workload = made[act](s)
        opt = workload.recipe.make(workload.model.parameters())
        batches = workload.batches()
        for step in range(points[-1] + 1):
            batch = next(batches)
            if step in points:
                for row in point_gaps(workload, batch, opts["gap_lrs"]):
                    rows.append({"activation": act, "seed": s, "step": step, **row})
            if step < points[-1]:
                opt.step(closure_for(workload, opt, batch))
    return rows, {"activations": list(made), "switched": switched}


def key_lr(gap_lrs) -> float:
    """The step size the report dwells on: 0.01 when measured, else the middle one."""
    lrs = sorted(gap_lrs)
    return 0.01 if 0.01 in lrs else lrs[len(lrs) // 2]


def gap_summary(summary: Summary, gaps: list[dict], activations: dict, seeds: Sequence[int], gap_lrs) -> None:
    """Per activation and step size, over seeds: the relative error of the prediction (each seed: the median
    over its points and both sweeps; ``gap_relative_error_mean``: the mean, which one point where the gap
    nearly cancels can dominate), with the pattern frozen (ReLU); the flips and the measured gap relative to
    |ΔL(sim)| (each seed: the mean); the paired excess of ReLU's error over GELU's and over the frozen
    pattern's; the growth of the error from one step size to the next; and at the key step size the same
    point by point."""
    def per_seed(act, lr, fn, step=None, over=statistics.fmean):
        vals = []
        for s in seeds:
            got = [v for g in gaps if g["activation"] == act and g["seed"] == s and g["lr"] == lr
                   and (step is None or g["step"] == step) for v in fn(g)]
            if got:
                vals.append(over(got))
        return vals if len(vals) == len(seeds) else None

    def add(name, vals, against=None):
        if vals is not None and (against is not None or name not in summary):
            if against is None:
                summary.add(name, vals)
            elif len(against) == len(vals):
                summary.add(name, vals, against=against)

    flips_of = lambda g: [g["sign_changes"]] if "sign_changes" in g else []  # noqa: E731
    frozen_of = lambda g: relative_errors(g, frozen_pattern=True)  # noqa: E731
    lrs = sorted(gap_lrs)
    steps = sorted({g["step"] for g in gaps})
    errors: dict[tuple[str, float], list[float]] = {}
    for act in activations["activations"]:
        for lr in lrs:
            tag = f"lr={lr:g}"
            wheres = [(tag, None)] + ([(f"{tag}/step={st}", st) for st in steps] if lr == key_lr(lrs) else [])
            for where, st in wheres:
                err = per_seed(act, lr, relative_errors, st, statistics.median)
                frz = per_seed(act, lr, frozen_of, st, statistics.median)
                add(f"gap_relative_error/{act}/{where}", err)
                add(f"gap_relative_error/{act}-frozen/{where}", frz)
                if st is None:
                    add(f"gap_relative_error_mean/{act}/{where}", per_seed(act, lr, relative_errors))
                    add(f"gap_relative_error_mean/{act}-frozen/{where}", per_seed(act, lr, frozen_of))
                if err is not None and frz is not None:
                    add(f"gap_error_excess/{act}-vs-frozen/{where}", err, against=frz)
                add(f"pattern_flips/{act}/{where}", per_seed(act, lr, flips_of, st))
                if st is None and err is not None:
                    errors[act, lr] = err
                if st is None and frz is not None:
                    errors[f"{act}-frozen", lr] = frz
            add(f"gap_over_dl/{act}/{tag}", per_seed(
                act, lr, lambda g: [0.5 * (g["measured_gap_forward"] + g["measured_gap_backward"])
                                    / abs(g["simultaneous_dl"])] if g["simultaneous_dl"] else []))
    for name in {a for a, _ in errors}:
        for a, b in zip(lrs, lrs[1:]):
            if (name, a) in errors and (name, b) in errors:
                add(f"gap_error_growth/{name}/lr={a:g}->{b:g}",
                    [y / x if x > 0 else math.inf for x, y in zip(errors[name, a], errors[name, b])])
    for lr in lrs:
        if ("relu", lr) in errors and ("gelu", lr) in errors:
            add(f"gap_error_excess/relu-vs-gelu/lr={lr:g}", errors["relu", lr], against=errors["gelu", lr])


# ---- figures ---------------------------------------------------------------------------------------------------

def _legend(ax, **kw) -> None:
    """A legend, where the axes have labelled artists."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _log_band(ax, xs, values, label, **kw):
    """The geometric mean over seeds and its 95% band (a t-interval of the logarithms), for a log axis."""
    ests = [t_interval([math.log(v) for v in vals]) for vals in values]
    line, = ax.plot(xs, [math.exp(e.mean) for e in ests], label=label, **kw)
    lo = [math.exp(e.lo if e.has_interval else e.mean) for e in ests]
    hi = [math.exp(e.hi if e.has_interval else e.mean) for e in ests]
    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    return line


def figures(res: dict, summary: Summary, out: RunDir) -> None:
    plt = pyplot()
    cfg, curves, runs = res["config"], res["curves"], res["runs"]
    orders, seeds = cfg["orders"], cfg["seeds"]
    chosen = res["chosen_lr"]

    # training loss against compute, at the equal learning rate and at each order's tuned one
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4), constrained_layout=True, sharey=True)
    for ax, (title, lr_of) in zip(axes, ((f"equal lr {cfg['equal_lr']:g}", lambda o: cfg["equal_lr"]),
                                         ("each order at its tuned lr", lambda o: chosen[o]))):
        for order in orders:
            pts = {}
            for c in curves:
                if c["order"] == order and c["lr"] == lr_of(order):
                    pts.setdefault(c["evals"], []).append(c["train_loss"])
            xs = sorted(x for x in pts if len(pts[x]) == len(seeds) and all(0 < v < math.inf for v in pts[x]))
            if xs:
                _log_band(ax, xs, [pts[x] for x in xs], f"{order} (lr {lr_of(order):g})")
        target = statistics.fmean(res["target_loss"].values())
        ax.axhline(target, color="k", ls=":", lw=0.8)
        ax.set(xlabel="gradient-evaluation equivalents", title=title, yscale="log")
        _legend(ax, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    axes[0].set_ylabel(f"training loss (fixed batches): geometric mean, 95% band, n = {len(seeds)}")
    fig.suptitle(f"{cfg['workload']}: equal compute (dotted: the target, simultaneous at half its budget)")
    out.figure("orders_compute.png", fig)

    # tuning: held-out (or training) loss at the end of the budget against the learning rate
    key = chosen["by"]
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    for i, order in enumerate(orders):
        xs, ests = [], []
        jitter = 1 + 0.03 * (i - len(orders) / 2)  # side by side, so the error bars do not hide each other
        for lr in cfg["lrs"]:
            vals = [r.get(key, math.nan) for r in runs if r["order"] == order and r["lr"] == lr]
            if vals and all(math.isfinite(v) for v in vals):
                xs.append(lr * jitter)
                ests.append(t_interval(vals))
        if xs:
            err = [[e.mean - max(e.lo, 0.5 * e.mean) if e.has_interval else 0 for e in ests],
                   [(e.hi if e.has_interval else e.mean) - e.mean for e in ests]]
            line = ax.errorbar(xs, [e.mean for e in ests], yerr=err, marker="o", ms=4, capsize=3, label=order)
            best = [r.get(key, math.nan) for r in runs if r["order"] == order and r["lr"] == chosen[order]]
            ax.plot([chosen[order] * jitter], [statistics.fmean(best)],
                    marker="*", ms=12, color=line[0].get_color())
    ax.set(xscale="log", yscale="log", xlabel="learning rate", title="tuning (star: chosen)",
           ylabel=f"{key.replace('heldout_', 'held-out ').replace('_', ' ')} at the budget (mean, 95% CI)")
    ax.set_xticks(list(cfg["lrs"]), [f"{lr:g}" for lr in cfg["lrs"]])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    _legend(ax, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    out.figure("orders_tuning.png", fig)

    # cost: measured fractions and wall time per step
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    costs = res["costs"]
    xs = range(len(costs))
    axes[0].bar(xs, [c["mean"] for c in costs], color="tab:blue", alpha=0.7,
                yerr=[[c["mean"] - c["lo"] if math.isfinite(c["lo"]) else 0 for c in costs],
                      [c["hi"] - c["mean"] if math.isfinite(c["hi"]) else 0 for c in costs]], capsize=3)
    axes[0].axhline(1.0, color="k", ls=":", lw=0.8)
    axes[0].set_xticks(list(xs), [c["active"] for c in costs], rotation=45, ha="right", fontsize=7)
    axes[0].set(ylabel="fraction of a full forward+backward", title=f"block-coordinate step cost (n = {len(seeds)})")
    wall = res["wall"]
    axes[1].bar(range(len(wall)), [w["ms_per_step"] for w in wall], color="tab:orange", alpha=0.7,
                yerr=[[w["ms_per_step"] - w["ms_min"] for w in wall], [w["ms_max"] - w["ms_per_step"] for w in wall]],
                capsize=3)
    axes[1].set_xticks(range(len(wall)), [w["order"] for w in wall], rotation=30, ha="right", fontsize=7)
    axes[1].set(ylabel="ms per step (median, min–max)", title=f"wall time, apart from training "
                                                                f"({wall[0]['repeats'] if wall else 0} repeats)")
    out.figure("orders_cost.png", fig)

    # the gap: relative error against the step size, flips, predicted against measured
    acts = cfg["gap_activations"]["activations"]
    lrs = sorted(cfg["gap_lrs"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.0), constrained_layout=True)
    series = [a for act in acts for a in (act, f"{act}-frozen")]
    for name in series:
        ests = [(lr, summary.get(f"gap_relative_error/{name}/lr={lr:g}")) for lr in lrs]
        ests = [(lr, e) for lr, e in ests if e is not None and e.mean > 0]
        if ests:
            err = [[e.mean - max(e.lo, e.mean * 1e-3) if e.has_interval else 0 for _, e in ests],
                   [e.hi - e.mean if e.has_interval else 0 for _, e in ests]]
            axes[0].errorbar([lr for lr, _ in ests], [e.mean for _, e in ests], yerr=err, marker="o", ms=4,
                             capsize=3, label=name.replace("-frozen", " (pattern frozen)"),
                             ls="--" if name.endswith("frozen") else "-")
    ref = summary.get(f"gap_relative_error/{acts[-1]}/lr={lrs[0]:g}")
    if ref is not None and ref.mean > 0:
        axes[0].plot(lrs, [ref.mean * lr / lrs[0] for lr in lrs], "k:", lw=0.8, label="∝ η (smooth expansion)")
    axes[0].axhline(0.05, color="grey", lw=0.6)
    axes[0].set(xscale="log", yscale="log", xlabel="step size η", ylabel="|measured − predicted| / |predicted|",
                title=f"gap prediction error (each seed's median; mean, 95% CI, n = {len(seeds)})")
    _legend(axes[0], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    for act in acts:
        ests = [(lr, summary.get(f"pattern_flips/{act}/lr={lr:g}")) for lr in lrs]
        ests = [(lr, e) for lr, e in ests if e is not None]
        if ests:
            err = [[e.mean - e.lo if e.has_interval else 0 for _, e in ests],
                   [e.hi - e.mean if e.has_interval else 0 for _, e in ests]]
            axes[1].errorbar([lr for lr, _ in ests], [e.mean for _, e in ests], yerr=err, marker="o", ms=4,
                             capsize=3, label=f"{act}{' (a kink)' if act == 'relu' else ' (no kink)'}")
    axes[1].set(xscale="log", xlabel="step size η", ylabel="fraction of pre-activations changing sign",
                title="activation-pattern flips in the step")
    _legend(axes[1], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    show_lr = key_lr(lrs)
    lim = 0.0
    for act in acts:
        pts = [g for g in res["gaps"] if g["activation"] == act and g["lr"] == show_lr]
        pred = [g["predicted_gap"] for g in pts for _ in (0, 1)]
        meas = [g[f"measured_gap_{s}"] for g in pts for s in ("forward", "backward")]
        axes[2].plot(pred, meas, "o", ms=4, alpha=0.7, label=act)
        lim = max([lim, *map(abs, pred), *map(abs, meas)])
    lim = lim or 1.0
    axes[2].plot([-lim, lim], [-lim, lim], "k:", lw=0.8, label="measured = predicted")
    axes[2].set(xlabel="predicted ½Σ_{i≠j}C_ij", ylabel="measured ΔL(GS) − ΔL(sim)",
                title=f"η = {show_lr:g}, every point and sweep")
    axes[2].locator_params(nbins=5)
    _legend(axes[2], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    out.figure("orders_gap.png", fig)


# ---- the report ------------------------------------------------------------------------------------------------

def _num(x: float) -> str:
    return claims.number(x)


def _est_cell(summary: Summary, name: str, show=claims.number) -> str:
    est = summary.get(name)
    if est is None:
        return "—"
    if not math.isfinite(est.mean):
        bad = sum(1 for v in est.values if not math.isfinite(v))
        return f"not reached in {bad} of {est.n} seeds" if bad else "n/a"
    return claims.ci(est, show)


def report(res: dict, summary: Summary) -> str:
    cfg = res["config"]
    w = cfg["workload_summary"]
    orders, seeds, k = cfg["orders"], cfg["seeds"], cfg["blocks"]
    n = len(seeds)
    chosen = res["chosen_lr"]
    lines = ["# Update orders: one block at a time, or all at once?\n",
             f"The question: {QUESTION.split(': ', 1)[1]}\n",
             f"Workload `{cfg['workload']}` ({w['description'] or str(w['parameters']) + ' parameters'}), "
             f"k = {k} blocks ({', '.join(w['blocks'])}); {cfg['optimizer']}, {n} seeds ({cfg['configuration']} "
             f"configuration). Every number is a mean over the seeds with its 95% interval [lo, hi] (Student t; "
             f"differences between orders are paired by seed: same initialisation, same batches).\n"]

    lines += answer(res, summary)

    # compute accounting
    lines += ["## What a step costs\n",
              f"Each order trains until it has spent {cfg['budget']:g} gradient-evaluation equivalents. A full "
              f"forward+backward counts 1; a Gauss–Seidel sweep counts k = {k} (one full evaluation per block); a "
              f"block-coordinate step counts the measured fraction below: its forward and partial backward (the "
              f"inactive blocks frozen) timed against a full forward+backward on the same batch, each alone, one "
              f"after the other, the median ratio of {cfg['cost_repeats']} repeats per seed. The optimizer's own "
              f"update is not counted for any order.\n"]
    rows = [[c["active"], _est_cell(summary, f"cost_fraction/{c['active']}"),
             f"{c['q25']:.3g}–{c['q75']:.3g}"] for c in res["costs"]]
    lines.append(tables.markdown(["active blocks", f"fraction of a full evaluation (n = {n})",
                                  "interquartile range of all repeats"], rows))
    if "sweep_cost/gauss-seidel chain" in summary:
        est = summary["sweep_cost/gauss-seidel chain"]
        lines.append(f"\nThe chain variant (`pyco.ChainGaussSeidel`, the same updates as the backward sweep, "
                     f"recomputing only the part of the chain that moved) would count k × its measured time "
                     f"relative to the generic sweep: {claims.ci(est)} evaluations per sweep ({claims.seeds(est)}), "
                     f"against k = {k}; the curves below use the generic count.\n")
    lines.append("")

    # training comparisons
    lines += ["## Equal compute\n",
              f"Training loss: the mean over {cfg['train_eval_batches']} fixed training batches. The target: the "
              f"training loss simultaneous updates reach at half their budget at lr {cfg['equal_lr']:g}, per seed "
              f"(mean {_num(statistics.fmean(res['target_loss'].values()))}); \"evaluations to target\" counts the "
              f"gradient-evaluation equivalents until an order first reaches it (linear between "
              f"{cfg['checkpoints']} checkpoints).\n",
              "![training loss against gradient-evaluation equivalents](orders_compute.png)\n"]
    metric_keys = sorted({k for r in res["runs"] for k in r if k.startswith("heldout_")})
    for prefix, title, lr_of in (("", f"### All orders at the recipe's learning rate ({cfg['equal_lr']:g})\n",
                                  lambda o: cfg["equal_lr"]),
                                 ("tuned_", "### Each order at its own best learning rate\n", lambda o: chosen[o])):
        lines.append(title)
        if prefix:
            lines.append(f"Tuned on the grid {', '.join(f'{x:g}' for x in cfg['lrs'])} by the lowest mean "
                         f"{chosen['by'].replace('heldout_', 'held-out ').replace('_', ' ')} at the end of the "
                         f"budget over the same seeds (the "
                         f"choice and the comparison share the seeds, which favours every order alike).\n")
            lines.append("![tuning](orders_tuning.png)\n")
        headers = ["order", "lr", "final training loss", *[f"held-out {m[8:]}" for m in metric_keys],
                   "training loss − simultaneous", "evaluations to target"]
        rows = []
        for o in orders:
            acc = lambda m: claims.percent if m.endswith("accuracy") else claims.number  # noqa: E731
            rows.append([o, f"{lr_of(o):g}", _est_cell(summary, f"{prefix}final_train_loss/{o}"),
                         *[_est_cell(summary, f"{prefix}final_{m}/{o}", acc(m)) for m in metric_keys],
                         "—" if o == "simultaneous" else
                         _est_cell(summary, f"{prefix}final_train_loss_vs_simultaneous/{o}"),
                         _est_cell(summary, f"{prefix}evals_to_target/{o}")])
        lines.append(tables.markdown(headers, rows))
        for o in orders[1:]:
            d = summary[f"{prefix}final_train_loss_vs_simultaneous/{o}"]
            sentence = claims.difference(f"`{o}`", "simultaneous updates", d, quantity="training loss at equal compute")
            if "heldout_loss" in metric_keys:
                h = summary[f"{prefix}final_heldout_loss_vs_simultaneous/{o}"]
                sentence += "; " + claims.difference(f"`{o}`", "simultaneous updates", h, quantity="held-out loss")
            e = summary[f"{prefix}evals_to_target_vs_simultaneous/{o}"]
            if e.has_interval:
                sentence += "; " + claims.difference(f"`{o}`", "simultaneous updates", e,
                                                     quantity="number of evaluations to the target",
                                                     smaller="smaller", larger="larger")
            else:
                reached = summary[f"{prefix}evals_to_target/{o}"]
                missed = sum(1 for v in reached.values if not math.isfinite(v))
                sentence += (f"; it did not reach the target within the budget in {missed} of {reached.n} seeds"
                             if missed else "")
            lines.append(f"- {sentence[0].upper()}{sentence[1:]}.")
        lines.append("")

    # wall time
    wall = res["wall"]
    lines += ["## Wall time\n",
              f"Measured apart from training, each order alone on one fresh workload (seed {seeds[0]}), at lr "
              f"{cfg['equal_lr']:g}: {wall[0]['repeats']} repeats of {wall[0]['steps_per_repeat']} steps after two "
              f"warm-up steps; the median and the range over the repeats. Load average (1, 5, 15 min) "
              f"{_load(cfg['load_average']['before'])} before the run, {_load(cfg['load_average']['after'])} after "
              f"it, on {os.cpu_count()} cores, {cfg['threads']} torch "
              f"thread{'s' if cfg['threads'] != 1 else ''}: these "
              f"times move with what else runs on the machine.\n",
              tables.markdown(["order", "ms per step (median)", "range over repeats", "ms per full evaluation",
                               "steps in the budget (mean)", "s for the budget (median ms × steps)"],
                              [[w_["order"], f"{w_['ms_per_step']:.3g}", f"{w_['ms_min']:.3g}–{w_['ms_max']:.3g}",
                                f"{w_['ms_per_full_evaluation']:.3g}", f"{_steps(res, w_['order']):.4g}",
                                f"{w_['ms_per_step'] * _steps(res, w_['order']) / 1e3:.3g}"] for w_ in wall]),
              "![step costs and wall time](orders_cost.png)\n"]
    sim = next((w_ for w_ in wall if w_["order"] == "simultaneous"), None)
    if sim is not None:
        lines.append(f"A simultaneous step took {sim['ms_per_step']:.3g} ms (median) against "
                     f"{sim['ms_per_full_evaluation']:.3g} ms for its forward+backward alone: the rest is the step's "
                     f"fixed cost (optimizer, zeroing, the wrappers' bookkeeping), which the gradient-evaluation count "
                     f"leaves out.\n")

    lines += gap_report(res, summary)
    return "\n".join(lines) + "\n"


def answer(res: dict, summary: Summary) -> list[str]:
    """The short answer: which orders the paired intervals at equal compute put above, below or level with
    simultaneous updates (the same rule as every sentence: a side only when the interval excludes 0)."""
    cfg = res["config"]
    orders = cfg["orders"][1:]
    lines = ["## In short\n"]
    for prefix, what in (("", f"at the recipe's learning rate ({cfg['equal_lr']:g})"),
                         ("tuned_", "each at its tuned learning rate")):
        sides = {1: [], -1: [], 0: []}
        for o in orders:
            sides[summary[f"{prefix}final_train_loss_vs_simultaneous/{o}"].sign].append(f"`{o}`")
        lines.append(f"- At equal compute, {what}, against simultaneous updates (training loss at the end of the "
                     f"budget, paired 95% intervals, n = {len(cfg['seeds'])}): higher for "
                     f"{', '.join(sides[1]) or 'none'}; lower for {', '.join(sides[-1]) or 'none'}; no measurable "
                     f"difference for {', '.join(sides[0]) or 'none'}.")
    key = key_lr(cfg["gap_lrs"])
    for act in cfg["gap_activations"]["activations"]:
        est = summary.get(f"gap_relative_error/{act}/lr={key:g}")
        if est is not None:
            lines.append("- " + claims.below(est, 0.05, quantity=f"The probe's Gauss–Seidel gap prediction error "
                                                                 f"({act}, η = {key:g})", show=claims.percent) + ".")
    return lines + [""]


def _steps(res: dict, order: str) -> float:
    """The mean number of steps ``order`` took to spend the budget at the equal learning rate."""
    return statistics.fmean(r["steps"] for r in res["runs"] if r["order"] == order
                            and r["lr"] == res["config"]["equal_lr"])


def _load(avg) -> str:
    return ", ".join(f"{x:.2f}" for x in avg)


def gap_report(res: dict, summary: Summary) -> list[str]:
    cfg = res["config"]
    acts = cfg["gap_activations"]["activations"]
    lrs = sorted(cfg["gap_lrs"])
    lines = ["## The probe's prediction of the Gauss–Seidel gap\n",
             f"For a plain gradient step Δ = −η∇L the probe predicts ΔL(Gauss–Seidel) − ΔL(simultaneous) = "
             f"½ Σ_(i≠j) C_ij (second order). Measured against real forward and backward sweeps (plain SGD, "
             f"float64) from {cfg['gap_points']} points of a simultaneous run at the recipe's learning rate (steps "
             f"{', '.join(str(st) for st in sorted({g['step'] for g in res['gaps']}))}), on the same batch. Per seed "
             f"the relative error |measured − predicted| / |predicted| is summarised by its median over the points "
             f"and both sweeps: it is the relative error of a small difference of two loss changes, so a point where "
             f"the cross terms nearly cancel gives a large ratio from a small miss, and one such point can carry the "
             f"mean; the mean over the points and sweeps is in its own column. "
             f"\"Flips\": the fraction of pre-activations (example × unit) on the batch whose sign differs between "
             f"the start point and after the simultaneous step; a ReLU unit that flips crosses its kink, a GELU unit "
             f"does not have one. \"Pattern frozen\": the same sweeps on the ReLU network whose every ReLU "
             f"multiplies its input by the 0/1 mask it had at the start point (the same loss, gradient and Hessian "
             f"there, hence the same prediction, but no kink to cross).\n"]
    if not cfg["gap_activations"]["switched"]:
        lines.append(f"The workload's factory takes no `activation` option: only the workload as given "
                     f"({', '.join(acts)}) was measured, and no smooth network stands beside it.\n")
    else:
        trained = cfg["workload_summary"]["config"].get("activation")
        if trained not in acts:
            lines.append(f"The training comparison ran the workload as given (activation {trained}); the gap is "
                         f"measured on its ReLU and GELU versions.\n")
    lines.append("![gap prediction error, flips, predicted against measured](orders_gap.png)\n")
    series = [(f"{a} error", f"gap_relative_error/{a}") for a in acts]
    series += [(f"{a} error (mean of points)", f"gap_relative_error_mean/{a}") for a in acts
               if f"gap_relative_error_mean/{a}/lr={lrs[0]:g}" in summary]
    series += [(f"{a} error, pattern frozen", f"gap_relative_error/{a}-frozen") for a in acts
               if f"gap_relative_error/{a}-frozen/lr={lrs[0]:g}" in summary]
    series += [(f"{a} flips", f"pattern_flips/{a}") for a in acts if f"pattern_flips/{a}/lr={lrs[0]:g}" in summary]
    if f"gap_error_excess/relu-vs-frozen/lr={lrs[0]:g}" in summary:
        series.append(("relu − frozen (paired)", "gap_error_excess/relu-vs-frozen"))
    rows = [[f"{lr:g}", *[_est_cell(summary, f"{key}/lr={lr:g}", claims.percent) for _, key in series]] for lr in lrs]
    lines.append(tables.markdown(["η", *[h for h, _ in series]], rows))

    key = key_lr(lrs)
    tag = f"lr={key:g}"
    steps = sorted({g["step"] for g in res["gaps"]})
    point_series = [(h, k) for h, k in series if f"{k}/{tag}/step={steps[0]}" in summary]
    lines.append(f"\nAt η = {key:g}, point by point (each cell over the {len(cfg['seeds'])} seeds):\n")
    lines.append(tables.markdown(["step", *[h for h, _ in point_series]],
                                 [[str(st), *[_est_cell(summary, f"{k}/{tag}/step={st}", claims.percent)
                                              for _, k in point_series]] for st in steps]))
    lines.append("")
    for act in acts:
        est = summary.get(f"gap_relative_error/{act}/{tag}")
        if est is not None:
            lines.append("- " + claims.below(est, 0.05, quantity=f"The {act} network's relative error at η = {key:g}",
                                             show=claims.percent) + ".")
        mean = summary.get(f"gap_relative_error_mean/{act}/{tag}")
        if est is not None and mean is not None and est.has_interval and est.hi < 0.05 \
                and not (mean.has_interval and mean.hi < 0.05):
            lines.append(f"  The mean over each seed's points is not below 5% ({claims.ci(mean, claims.percent)}). "
                         + worst_point(res["gaps"], act, key))
    lines += growth(summary, acts, lrs)
    lines += explanation(summary, acts, lrs, steps, res["gaps"])
    if "gelu" in acts or acts:
        act = "gelu" if "gelu" in acts else acts[0]
        sgn = summary.get(f"gap_over_dl/{act}/{tag}")
        if sgn is not None:
            lines.append("- " + claims.sign(sgn, quantity=f"The measured gap relative to |ΔL(sim)| ({act}, "
                                                          f"η = {key:g})",
                                            positive="a sweep lowers the loss less than a simultaneous step",
                                            negative="a sweep lowers the loss more than a simultaneous step") + ".")
    return lines + [""]


def growth(summary: Summary, acts, lrs) -> list[str]:
    """How each error grows from one step size to the next, against the smooth expansion's η ratio."""
    out = []
    names = [a for act in acts for a in (act, f"{act}-frozen")]
    for a, b in zip(lrs, lrs[1:]):
        parts = []
        for name in names:
            g = summary.get(f"gap_error_growth/{name}/lr={a:g}->{b:g}")
            if g is not None and math.isfinite(g.mean):
                label = name.replace("-frozen", " (pattern frozen)")
                parts.append(claims.below(g, b / a, quantity=f"{label}'s factor"))
        if parts:
            out.append(f"- From η = {a:g} to {b:g} a smooth expansion (a third-order remainder against a "
                       f"second-order gap) grows the error ×{b / a:.3g}: " + "; ".join(parts) + ".")
    return out


def worst_point(gaps: list[dict], act: str, lr: float, frozen: bool = False) -> str:
    """The point with the largest relative error of ``act``'s prediction at ``lr`` (seed, step, sweep; the
    other sweep's error beside it), with its first-order decrease against the other seeds' at the same step."""
    rows = [g for g in gaps if g["activation"] == act and g["lr"] == lr]
    cands = [(err, sweep, g) for g in rows
             for err, sweep in zip(relative_errors(g, frozen_pattern=frozen), ("forward", "backward"))]
    if not cands:
        return ""
    err, sweep, g = max(cands, key=lambda c: c[0])
    fwd, bwd = relative_errors(g, frozen_pattern=frozen)
    other = bwd if sweep == "forward" else fwd
    others = [abs(o["first_order"]) for o in rows if o["step"] == g["step"] and o["seed"] != g["seed"]
              and relative_errors(o, frozen_pattern=frozen)]
    text = (f"The largest single error is {err:.0%} (seed {g['seed']}, step {g['step']}, the {sweep} sweep; "
            f"{other:.0%} on the other)")
    if others and min(others) > 0:
        lo, hi = abs(g["first_order"]) / max(others), abs(g["first_order"]) / min(others)
        text += (f"; its first-order decrease η‖g‖² there is {lo:.3g}–{hi:.3g}× the other seeds' at step "
                 f"{g['step']}")
    return text + "."


def explanation(summary: Summary, acts, lrs, steps, gaps: list[dict]) -> list[str]:
    """Why the prediction misses where it does, from the flips and the frozen-pattern sweeps of this run."""
    out = []
    key = key_lr(lrs)
    tag = f"lr={key:g}"
    smooth = [a for a in acts if a != "relu"] + (["relu-frozen"] if f"gap_relative_error/relu-frozen/{tag}" in summary
                                                 else [])
    for name in smooth:
        err = summary.get(f"gap_relative_error/{name}/{tag}")
        if err is None or (err.has_interval and err.hi < 0.05):
            continue
        fine = [lr for lr in lrs if (e := summary.get(f"gap_relative_error/{name}/lr={lr:g}")) is not None
                and e.has_interval and e.hi < 0.05]
        checks = []
        for a, b in zip(lrs, lrs[1:]):
            g = summary.get(f"gap_error_growth/{name}/lr={a:g}->{b:g}")
            if g is not None and math.isfinite(g.mean):
                checks.append(claims.within(g.scaled(a / b), 0.8, 1.25,
                                            quantity=f"from η = {a:g} to {b:g} its growth factor over the η ratio"))
        label = name.replace("-frozen", " network with its pattern frozen") if name.endswith("-frozen") \
            else f"{name} network"
        worst = worst_point(gaps, name.removesuffix("-frozen"), key, frozen=name.endswith("-frozen"))
        out.append(f"- Why the {label} is not within 5% at η = {key:g} ({claims.ci(err, claims.percent)}): a "
                   f"remainder of third order grows in proportion to η, so its growth factor over the η ratio is 1; "
                   + "; ".join(checks) + ". "
                   + (f"Its error is below 5% for η ≤ {max(fine):g}." if fine else
                      "Its error is not below 5% at any η measured.")
                   + (" " + worst if worst else ""))
    if "relu" not in acts:
        return out
    excess = summary.get(f"gap_error_excess/relu-vs-frozen/{tag}")
    flips = summary.get(f"pattern_flips/relu/{tag}")
    if excess is None or flips is None:
        out.append("- The ReLU network's pattern flips could not be counted (no `nn.ReLU` modules to hook), so this "
                   "run says nothing about them.")
        return out
    parts = [f"- The ReLU network at η = {key:g}: "
             + claims.below(flips, 0.0, quantity="the fraction of pre-activations that flip in the step",
                            show=claims.percent) + "; "
             + claims.difference("the ReLU network", "its frozen pattern", excess, quantity="relative error",
                                 show=claims.percent) + "."]
    flipped = [st for st in steps if (f := summary.get(f"pattern_flips/relu/{tag}/step={st}")) is not None
               and f.sign > 0]
    moved = [st for st in steps if (e := summary.get(f"gap_error_excess/relu-vs-frozen/{tag}/step={st}")) is not None
             and e.sign != 0]
    quiet = [st for st in steps if (f := summary.get(f"pattern_flips/relu/{tag}/step={st}")) is not None
             and f.mean == 0]
    at = lambda sts: (f"step{'s' if len(sts) != 1 else ''} {', '.join(map(str, sts))}" if sts  # noqa: E731
                      else "no point")
    if excess.sign != 0:
        parts.append(f"The flips account for that part of the miss: the frozen pattern has the same prediction "
                     f"and differs only in having no kink to cross. Units flipped measurably at {at(flipped)}.")
    else:
        parts.append(f"With {excess.n} seeds the flips' share of the error is not measurable on average. Point by "
                     f"point (the table above), units flipped measurably at {at(flipped)} and the ReLU and frozen "
                     f"errors differ measurably at {at(moved)}"
                     + (f"; at {at(quiet)} no unit flipped in any seed (their relu − frozen cells in the table)"
                        if quiet else "") + ".")
    gelu = summary.get(f"gap_error_excess/relu-vs-gelu/{tag}")
    if gelu is not None:
        parts.append("Against the GELU network (paired by seed: same initialisation and batches): "
                     + claims.difference("the ReLU network", "the GELU one", gelu, quantity="relative error",
                                         show=claims.percent) + ".")
    out.append(" ".join(parts))
    return out
