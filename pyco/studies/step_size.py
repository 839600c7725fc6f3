"""Question 002, "does a small enough step always lower the loss?": the actual loss change of one gradient step
Δ = −η·g over a log grid of step sizes η, against its second-order model, and the parts of that model.

Along Δ = −η·g the parts scale exactly: first order f(η) = −η‖g‖², every C_ij(η) = η²·C_ij(1). So one
probe at η = 1 (``pyco.probe.cross_terms``, float64 Hessian-vector products) gives the model for every η,
and only the actual loss L(θ − η·g) is evaluated per grid point. The model predicts the best step
η* = ‖g‖²/(gᵀHg) and, when gᵀHg > 0, the largest step that still lowers the loss, 2η*; the measured one is
the first η on the grid where the loss stops falling.

Cases: cs231n's f = (x+y)·z at x=−2, y=5, z=−4 (minimized as is, and as the squared error ½((x+y)·z)²;
deterministic, so measured once and exactly); the workload after ``steps`` training steps (default: its
budget, a quarter of it in the quick configuration) on one training batch and on the example of that batch it
fits least (when the batch splits into examples: a tensor, or a tuple, list or dict of tensors sharing their
first dimension), for every seed: each number the report gives of them is a mean over seeds with its 95%
interval. Step-size limits span orders of magnitude, so their summaries are of log10 η.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

import pyco
from pyco.blocks import Blocks
from pyco.studies import claims, tables
from pyco.studies._common import (RunDir, check_common, config, factory_of, fmt, options as study_options, progress,
                                  pyplot, results as study_results, run_dir, seed_list, size, train, keep, one_lr)
from pyco.studies.intervals import Summary, t_interval
from pyco.studies.workload import cast_batch, map_tensors
from pyco.studies.workloads import DEFAULT

NAME = "step-size"
QUESTION = "question 002: does a small enough gradient step always lower the loss, and how large may it be?"

OPTIONS = dict(grid=(-4.0, 2.0, 49))


def run(workload_factory=DEFAULT, *, steps: int | None = None, lrs=None, seed: int = 0, seeds: int | None = None,
        quick: bool = False, full: bool = False, out=None, show_progress: bool = False, **options) -> dict:
    """The toy cases and the workload's cases for each seed (``lrs[0]``, if given, replaces the recipe's lr for
    the training steps). ``grid``: (log10 of the smallest η, of the largest, points)."""
    factory = factory_of(workload_factory)
    lrs = check_common(steps, lrs, seed)
    mode = size(quick, full)
    opts = study_options(NAME, options, OPTIONS)
    lo, hi, n = opts["grid"]
    etas = [10 ** (lo + (hi - lo) * i / (n - 1)) for i in range(int(n))]
    seed_values = seed_list(seed, seeds, full)
    first = factory(seed)
    steps = steps or (first.recipe.steps if full else max(1, first.recipe.steps // 4))
    lr = one_lr(NAME, lrs)[0] if lrs else first.recipe.lr
    toys = toy_cases(etas)
    per_seed = []
    for s in progress(seed_values, desc=f"{NAME}: seeds", enabled=show_progress):
        workload = first if s == seed else factory(s)
        for case in workload_cases(workload, steps, lr, etas, show_progress):
            case["seed"] = s
            per_seed.append(case)
            keep(out, "cases", case)
    summary = summarize(per_seed)
    cfg = config(factory, first, steps=steps, seeds=seed_values, lr=lr, grid=list(opts["grid"]), size=mode)
    results = study_results(NAME, QUESTION, cfg, summary, toy_cases=toys, cases=per_seed)
    out = run_dir(out)
    if out is not None:
        out.csv("step_size.csv", [{**r, "seed": c.get("seed")} for c in toys + per_seed for r in c["rows"]])
        out.csv("step_size_summary.csv", [{k: v for k, v in c.items() if k not in ("rows", "C", "blocks")}
                                          for c in toys + per_seed])
        figures(toys, per_seed, out)
        out.text("report.md", report(toys, per_seed, summary, cfg))
    return results


KINDS = ("one batch", "worst-fit example")


def kind_of(case: dict) -> str:
    return case["case"].rsplit(", ", 1)[-1]


def log10(x) -> float:
    return math.log10(x) if x is not None and 0 < x < math.inf else math.nan


def summarize(cases: list[dict]) -> Summary:
    """Per kind of case, over seeds: ‖g‖², gᵀHg, the cross share of gᵀHg, log10 of the model's and the
    measured largest decreasing η and their difference (paired by seed), and whether the smallest η lowered
    the loss (1) or not (0)."""
    summary = Summary()
    for kind in KINDS:
        group = [c for c in cases if kind_of(c) == kind]
        if not group:
            continue
        summary.add(f"grad_sq/{kind}", [c["grad_sq"] for c in group])
        summary.add(f"gHg/{kind}", [c["gHg"] for c in group])
        summary.add(f"cross_share/{kind}", [c["cross_share_of_curvature"] for c in group])
        summary.add(f"fell_at_smallest_eta/{kind}", [1.0 if c["rows"][0]["actual"] < 0 else 0.0 for c in group])
        # A loss that fell at every η of the grid has its limit beyond the grid (censored): left out of the limits.
        summary.add(f"fell_at_every_eta/{kind}", [1.0 if c["first_eta_loss_rose"] is None else 0.0 for c in group])
        both = [(log10(c["largest_decreasing_eta_model"]), log10(c["largest_decreasing_eta_measured"]))
                for c in group if c["first_eta_loss_rose"] is not None]
        both = [(m, x) for m, x in both if math.isfinite(m) and math.isfinite(x)]
        if both:
            summary.add(f"log10_limit_model/{kind}", [m for m, _ in both])
            summary.add(f"log10_limit_measured/{kind}", [x for _, x in both])
            summary.add(f"log10_limit_measured_over_model/{kind}", [x for _, x in both], against=[m for m, _ in both])
    return summary


def scan(name: str, loss_fn, blocks: Blocks, etas: list[float]) -> dict:
    """Probe once at η = 1 along −g, then evaluate the actual loss change at every η."""
    params = blocks.params()
    rng = torch.get_rng_state()  # every evaluation starts from the same random state (dropout masks)

    def loss():
        torch.set_rng_state(rng)
        return loss_fn()

    grads = torch.autograd.grad(loss(), params)
    report = pyco.probe.cross_terms(loss, blocks, [-g for g in grads], dtype=torch.float64, alone=False)
    first, c = float(report.first_order.sum()), report.C
    within = 0.5 * float(torch.diagonal(c).sum())
    cross = 0.5 * float(c.sum()) - within
    originals = [p.detach().clone() for p in params]
    rows = []
    with torch.no_grad():
        before = loss().double().item()
        for eta in etas:
            for p, p0, g in zip(params, originals, grads):
                p.copy_(p0 - eta * g)
            actual = loss().double().item() - before
            model = eta * first + eta * eta * (within + cross)
            rows.append({"case": name, "eta": eta, "actual": actual, "first_order": eta * first,
                         "within": eta * eta * within, "cross": eta * eta * cross, "second_order_model": model,
                         "remainder": actual - model})
        for p, p0 in zip(params, originals):
            p.copy_(p0)
    curvature = 2 * (within + cross)  # gᵀHg
    eta_star = -first / curvature if curvature > 0 else math.inf
    first_rise = next((r["eta"] for r in rows if r["actual"] >= 0), None)
    largest = max((r["eta"] for r in rows if first_rise is None or r["eta"] < first_rise), default=None)
    return {
        "case": name, "blocks": list(blocks.names), "loss": before, "grad_sq": -first,
        "gHg": curvature, "cross_share_of_curvature": (2 * cross / curvature) if curvature else float("nan"),
        "eta_star_model": eta_star, "largest_decreasing_eta_model": 2 * eta_star,
        "largest_decreasing_eta_measured": largest, "first_eta_loss_rose": first_rise,
        "C": c.tolist(), "rows": rows,
    }


def toy_cases(etas) -> list[dict]:
    x = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
    y = nn.Parameter(torch.tensor(5.0, dtype=torch.float64))
    z = nn.Parameter(torch.tensor(-4.0, dtype=torch.float64))
    blocks = Blocks([("x", [x]), ("y", [y]), ("z", [z])])
    return [scan("f=(x+y)z", lambda: (x + y) * z, blocks, etas),
            scan("1/2((x+y)z)^2", lambda: 0.5 * ((x + y) * z) ** 2, blocks, etas)]


def batch_size(batch) -> int | None:
    """The number of examples of a batch whose tensors share their first dimension (None otherwise)."""
    sizes = set()
    map_tensors(batch, lambda t: sizes.add(t.shape[0] if t.dim() else None) or t)
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def workload_cases(workload, steps: int, lr: float, etas, show: bool) -> list[dict]:
    opt = workload.recipe.make(workload.model.parameters(), lr=lr)
    batches = workload.batches()
    train(workload, opt, batches, steps, show=show, desc=f"step-size: train {workload.name}")
    # The scans run in float64 (on a copy) so that tiny loss changes are resolved, not rounded away.
    model, blocks = copy.deepcopy((workload.model, workload.blocks))
    model.double()
    batch = cast_batch(next(batches), torch.float64)
    cases = [scan(f"{workload.name}, one batch", lambda: workload.loss(batch, model), blocks, etas)]
    n = batch_size(batch)
    if n is not None and n > 1:
        example = lambda i: map_tensors(batch, lambda t: t[i:i + 1])  # noqa: E731
        try:
            with torch.no_grad():
                per_example = [workload.loss(example(i), model).item() for i in range(n)]
        except (RuntimeError, ValueError):  # a model that needs more than one example (batch norm on [1, C])
            per_example = None
        if per_example is not None:
            worst = max(range(n), key=per_example.__getitem__)  # the example the network fits least
            one = example(worst)
            cases.append(scan(f"{workload.name}, worst-fit example", lambda: workload.loss(one, model), blocks, etas))
    return cases


def figures(toys: list[dict], cases: list[dict], out: RunDir) -> None:
    """One panel per toy case and per kind of workload case: |actual ΔL| and |second-order model| against η
    (workload cases: mean of log10 over seeds with its 95% band)."""
    plt = pyplot()
    kinds = [k for k in KINDS if any(kind_of(c) == k for c in cases)]
    panels = len(toys) + len(kinds)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4), squeeze=False, constrained_layout=True)
    for ax, case in zip(axes[0], toys):
        etas = [r["eta"] for r in case["rows"]]
        ax.plot(etas, [abs(r["actual"]) for r in case["rows"]], "k-", label="|actual ΔL|")
        ax.plot(etas, [abs(r["second_order_model"]) for r in case["rows"]], "C0--", label="|2nd-order model|")
        rose = [(r["eta"], abs(r["actual"])) for r in case["rows"] if r["actual"] >= 0]
        if rose:
            ax.plot(*zip(*rose), "rx", ms=4, label="loss rose")
        ax.set(xscale="log", yscale="log", xlabel="step size η", title=case["case"])
        ax.legend(fontsize=7)
    for ax, kind in zip(axes[0][len(toys):], kinds):
        group = [c for c in cases if kind_of(c) == kind]
        etas = [r["eta"] for r in group[0]["rows"]]
        for key, style, label in (("actual", "k", "|actual ΔL|"), ("second_order_model", "C0", "|2nd-order model|")):
            bands = [t_interval([log10(abs(c["rows"][i][key])) if c["rows"][i][key] else -300.0 for c in group])
                     for i in range(len(etas))]
            ax.plot(etas, [10 ** b.mean for b in bands], color=style, label=f"{label}, mean of log over seeds")
            if all(b.has_interval for b in bands):
                ax.fill_between(etas, [10 ** b.lo for b in bands], [10 ** b.hi for b in bands], color=style,
                                alpha=0.2, lw=0)
        rose = [r["eta"] for c in group for r in c["rows"] if r["actual"] >= 0]
        if rose:
            ax.axvline(min(rose), color="r", lw=0.8, ls=":", label="first η where a seed's loss rose")
        ax.set(xscale="log", yscale="log", xlabel="step size η", title=f"{group[0]['case']} ({len(group)} seeds)")
        ax.legend(fontsize=7)
    out.figure("step_size.png", fig)


def report(toys: list[dict], cases: list[dict], summary: Summary, cfg: dict) -> str:
    lo, hi, _ = cfg["grid"]
    n = len(cfg["seeds"])
    lines = ["# Does a small enough step always lower the loss? (question 002)\n",
             f"One gradient step Δ = −η·g per case, η on a log grid from {fmt(10 ** lo)} to {fmt(10 ** hi)}; the "
             f"second-order model comes from one exact probe (float64). Workload `{cfg['workload']}` after "
             f"{cfg['steps']} training steps, {n} seeds; intervals are 95% (Student's t over seeds).\n",
             "The toy cases are deterministic (measured once, exactly):\n"]
    rows = []
    for c in toys:
        measured = c["largest_decreasing_eta_measured"]
        rows.append([c["case"], fmt(c["grad_sq"]), fmt(c["gHg"]), f"{c['cross_share_of_curvature']:+.2f}",
                     fmt(c["largest_decreasing_eta_model"]), "none" if measured is None else fmt(measured)])
    lines.append(tables.markdown(["case", "‖g‖²", "gᵀHg", "cross share of gᵀHg", "model's 2η*",
                                  "measured largest decreasing η"], rows))
    lines.append(f"The workload's cases, mean [95% interval] over {n} seeds:\n")
    rows = []
    for kind in KINDS:
        if f"grad_sq/{kind}" not in summary:
            continue
        cell = lambda name, show=claims.number: (claims.ci(summary[name], show)  # noqa: E731
                                                 if name in summary else "n/a")
        rows.append([kind, cell(f"grad_sq/{kind}"), cell(f"gHg/{kind}"), cell(f"cross_share/{kind}"),
                     cell(f"log10_limit_model/{kind}"), cell(f"log10_limit_measured/{kind}"),
                     cell(f"fell_at_smallest_eta/{kind}", claims.percent)])
    lines.append(tables.markdown(["case", "‖g‖²", "gᵀHg", "cross share of gᵀHg", "log10 model's 2η*",
                                  "log10 measured largest decreasing η", "seeds whose loss fell at the smallest η"],
                                 rows))
    for c in toys:
        smallest = c["rows"][0]
        tail = ("the loss fell at every step size on the grid" if c["first_eta_loss_rose"] is None else
                f"the loss first rose at η = {fmt(c['first_eta_loss_rose'])} (the second-order model put the limit "
                f"at {fmt(c['largest_decreasing_eta_model'])})")
        lines.append(f"- {c['case']}: at η = {fmt(smallest['eta'])} the loss "
                     f"{'fell' if smallest['actual'] < 0 else 'rose'} (ΔL = {fmt(smallest['actual'])}); {tail}.")
    for kind in KINDS:
        if f"grad_sq/{kind}" not in summary:
            continue
        group = [c for c in cases if kind_of(c) == kind]
        fell = sum(c["rows"][0]["actual"] < 0 for c in group)
        never = sum(c["first_eta_loss_rose"] is None for c in group)
        line = (f"- {kind}: at η = {fmt(group[0]['rows'][0]['eta'])} the loss fell for {fell} of {len(group)} seeds"
                + (f", and for {never} of them at every η up to {fmt(10 ** hi)} (their limit lies beyond the grid and "
                   f"is left out of the limits)" if never else "") + "; "
                + claims.sign(summary[f"cross_share/{kind}"], quantity="the cross-block share of the curvature gᵀHg",
                              positive="cross-block curvature adds to the blocks' own",
                              negative="cross-block curvature offsets the blocks' own"))
        if f"log10_limit_measured_over_model/{kind}" in summary:
            line += "; " + claims.sign(summary[f"log10_limit_measured_over_model/{kind}"],
                                       quantity="log10(measured limit / model's 2η*)",
                                       positive="the loss kept falling past the second-order model's limit",
                                       negative="the loss rose before the second-order model's limit")
        lines.append(line + ".")
    lines.append("\n![step size](step_size.png)")
    return "\n".join(lines) + "\n"
