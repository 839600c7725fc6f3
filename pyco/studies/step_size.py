"""Seed 002, "does a small enough step always lower the loss?": the actual loss change of one gradient step
Δ = −η·g over a log grid of step sizes η, against its second-order model, and the parts of that model.

Along Δ = −η·g the parts scale exactly: first order f(η) = −η‖g‖², every C_ij(η) = η²·C_ij(1). So one
probe at η = 1 (``pyco.probe.cross_terms``, float64 Hessian-vector products) gives the model for every η,
and only the actual loss L(θ − η·g) is evaluated per grid point. The model predicts the best step
η* = ‖g‖²/(gᵀHg) and, when gᵀHg > 0, the largest step that still lowers the loss, 2η*; the measured one is
the first η on the grid where the loss stops falling.

Cases: cs231n's f = (x+y)·z at x=−2, y=5, z=−4 (minimized as is, and as the squared error ½((x+y)·z)²);
the workload after ``steps`` training steps (default: its budget, a quarter of it when ``quick``) on one
training batch and on the example of that batch it fits least (when the batch splits into examples: a
tensor, or a tuple, list or dict of tensors sharing their first dimension).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

import pyco
from pyco.blocks import Blocks
from pyco.studies._common import (RunDir, check_common, config, factory_of, fmt, options as study_options, pyplot,
                                  run_dir, train)
from pyco.studies.workload import cast_batch, map_tensors
from pyco.studies.workloads import DEFAULT

NAME = "step-size"
QUESTION = "seed 002: does a small enough gradient step always lower the loss, and how large may it be?"

OPTIONS = dict(grid=(-4.0, 2.0, 49))


def run(workload_factory=DEFAULT, *, steps: int | None = None, lrs=None, seed: int = 0, quick: bool = False,
        out=None, show_progress: bool = False, **options) -> dict:
    """The toy cases and the workload's cases (``lrs[0]``, if given, replaces the recipe's lr for the
    training steps). ``grid``: (log10 of the smallest η, of the largest, points)."""
    factory = factory_of(workload_factory)
    lrs = check_common(steps, lrs, seed)
    opts = study_options(NAME, options, OPTIONS)
    lo, hi, n = opts["grid"]
    etas = [10 ** (lo + (hi - lo) * i / (n - 1)) for i in range(int(n))]
    workload = factory(seed)
    steps = steps or (max(1, workload.recipe.steps // 4) if quick else workload.recipe.steps)
    lr = lrs[0] if lrs else workload.recipe.lr
    cases = toy_cases(etas) + workload_cases(workload, steps, lr, etas, show_progress)
    cfg = config(factory, workload, steps=steps, seed=seed, lr=lr, grid=list(opts["grid"]), quick=quick)
    results = {"study": NAME, "question": QUESTION, "config": cfg, "cases": cases}
    out = run_dir(out)
    if out is not None:
        out.csv("step_size.csv", [r for c in cases for r in c["rows"]])
        out.csv("step_size_summary.csv", [{k: v for k, v in c.items() if k not in ("rows", "C", "blocks")}
                                          for c in cases])
        figures(cases, out)
        out.text("report.md", report(cases, cfg))
    return results


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


def figures(cases: list[dict], out: RunDir) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        etas = [r["eta"] for r in case["rows"]]
        actual = [r["actual"] for r in case["rows"]]
        model = [r["second_order_model"] for r in case["rows"]]
        ax.plot(etas, [abs(a) for a in actual], "k-", label="|actual ΔL|")
        ax.plot(etas, [abs(m) for m in model], "C0--", label="|2nd-order model|")
        ax.plot(etas, [abs(r["cross"]) for r in case["rows"]], "C3:", label="|cross term|")
        rose = [(e, abs(a)) for e, a in zip(etas, actual) if a >= 0]
        if rose:
            ax.plot(*zip(*rose), "rx", label="loss rose")
        if math.isfinite(case["largest_decreasing_eta_model"]):
            ax.axvline(case["largest_decreasing_eta_model"], color="C0", lw=0.8, label="model's 2η*")
        ax.set(xscale="log", yscale="log", xlabel="step size η", title=case["case"])
        ax.legend(fontsize=7)
    out.figure("step_size.png", fig)


def report(cases: list[dict], cfg: dict) -> str:
    lo, hi, _ = cfg["grid"]
    lines = ["# Does a small enough step always lower the loss? (seed 002)\n",
             f"One gradient step Δ = −η·g per case, η on a log grid from {fmt(10 ** lo)} to {fmt(10 ** hi)}; the "
             f"second-order model comes from one exact probe (float64). Workload `{cfg['workload']}` after "
             f"{cfg['steps']} training steps.\n",
             "| case | ‖g‖² | gᵀHg | cross share of gᵀHg | model's 2η* | measured largest decreasing η |",
             "|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(f"| {c['case']} | {fmt(c['grad_sq'])} | {fmt(c['gHg'])} | {c['cross_share_of_curvature']:+.2f} | "
                     f"{fmt(c['largest_decreasing_eta_model'])} | "
                     f"{'none' if c['largest_decreasing_eta_measured'] is None else fmt(c['largest_decreasing_eta_measured'])} |")
    lines.append("")
    for c in cases:
        smallest = c["rows"][0]
        fell = smallest["actual"] < 0
        if c["first_eta_loss_rose"] is None:
            tail = "the loss fell at every step size on the grid"
        else:
            tail = (f"the loss first rose at η = {fmt(c['first_eta_loss_rose'])} "
                    f"(the second-order model put the limit at {fmt(c['largest_decreasing_eta_model'])})")
        cross_note = ""
        if c["gHg"] != 0 and math.isfinite(c["cross_share_of_curvature"]):
            share = c["cross_share_of_curvature"]
            cross_note = (f"; the cross-block terms make up {share:+.0%} of the curvature gᵀHg"
                          + (", all of it, since no block has curvature of its own" if abs(share - 1) < 1e-9 else ""))
        lines.append(f"- {c['case']}: at η = {fmt(smallest['eta'])} the loss {'fell' if fell else 'rose'} "
                     f"(ΔL = {fmt(smallest['actual'])}, first order {fmt(smallest['first_order'])}); {tail}{cross_note}.")
    return "\n".join(lines) + "\n"
