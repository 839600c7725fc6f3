"""Gradient starvation: does gradient descent settle for a decision boundary with a small margin, and does
spectral decoupling widen it?

A reproduction of Pezeshki et al. 2021, "Gradient Starvation: A Learning Proclivity in Neural Networks"
(NeurIPS), on their two-moons experiment (the default workload, ``two-moons``: see
:mod:`pyco.studies.workloads.two_moons` for the data and network, the paper's values). Gradient descent with
cross-entropy learns the feature that first reduces the loss (here the linear gap along the first
coordinate) and, once the training points are classified with confidence, the gradient that would teach the
network the second direction vanishes: that direction is *starved*, and the boundary passes close to the
data. Spectral decoupling (SD) replaces weight decay by an L2 penalty on the network's outputs,
λ/2·‖logits‖² (averaged over the batch), which keeps the logits from growing and the gradient flowing; the
paper reports a boundary with a larger margin, on 10 of 10 seeds.

Per seed, two runs from the same initialisation on the same batches: *plain* (the workload's recipe as it is)
and *SD* (the recipe without its weight decay, plus the penalty). The paper's reference code puts 0.003 on
the mean squared logit for its two-moons SD run, that is λ = 0.006 here (``sd_lambda``). Each run trains the
recipe's budget (1,000 full-batch epochs for two-moons, the paper's Figure 1 value); ``full`` trains ten times
longer (10,000 epochs, the value of the paper's longer runs) on 10 paired seeds, as the paper's 10.

**The margin** is the smallest distance, in input space, from a training point to the decision boundary,
signed: negative when a training point is misclassified (the distance of each point is to the boundary of
the region its prediction lies in). With 2-D inputs it is computed accurately: the logit difference of the
predicted class against the best other on a dense grid (``grid`` points a side, spanning the points plus
``pad``), its zero contour (marching squares), the exact distance from each point to that polyline, then a
bisection along the ray to the nearest contour point (40 halvings) that puts the boundary point on the
network's own boundary, minimised over the ray's direction (golden-section search within a few grid
cells' angle of the contour's direction). The grid spans ``pad`` beyond the points, so any boundary point
closer than ``pad`` to a point is on it: a margin below ``pad`` is certified. With other inputs it is a
DeepFool-style estimate (iterated linearisation of the logit differences with a 2% overshoot, at most 50
iterations, then a bisection polish along the segment to the crossing): the distance to a point on the
boundary, an upper bound of the true one, reported as an estimate. In 2-D both run, and the report gives their difference.
The points: the workload's training set (at most ``margin_points`` of them, the same for every run).

Also measured, to say why when the prediction fails: the test accuracy, the training accuracy, the final
training loss, the mean logit gap on the training points (the logit of the predicted class minus the best
other; SD's penalty acts on it), and, in 2-D, the share of the logit gap's squared input gradient along the
second coordinate (how much the network uses the starved direction at the training points).

Small models (fewer than 100,000 parameters, on a CPU) train and are measured on one intra-op thread
(``few_threads``), the previous setting put back after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from pyco.studies import claims, tables
from pyco.studies._common import (RunDir, check_common, config, factory_of, few_threads, options as study_options,
                                  progress, pyplot, results as study_results, run_dir, seed_list, size, keep, one_lr)
from pyco.studies.intervals import Summary
from pyco.studies.workload import WorkloadError

NAME = "starvation"
QUESTION = ("question 003: does gradient descent starve a feature, leaving a decision boundary with a small "
            "margin, and does spectral decoupling widen it (Pezeshki et al. 2021)?")
DEFAULT_WORKLOAD = "two-moons"  # the command line runs it when no --workload is given

OPTIONS = dict(sd_lambda=0.006, margin_method="auto", margin_points=2000, grid=400, pad=0.5)
FULL_SEEDS, FULL_STEPS = 10, 10  # full: 10 paired seeds, 10× the recipe's budget
METHODS = ("plain", "sd")
LABELS = {"plain": "plain", "sd": "spectral decoupling"}
DEEPFOOL_ITERATIONS, OVERSHOOT, HALVINGS, GOLDEN, CHUNK = 50, 0.02, 40, 30, 65536


def run(workload_factory=DEFAULT_WORKLOAD, *, steps: int | None = None, lrs=None, seed: int = 0, seeds: int | None = None,
        quick: bool = False, full: bool = False, out=None, show_progress: bool = False, **options) -> dict:
    """Plain and spectral-decoupling training on ``workload_factory(s)`` for each seed s (``steps``: default
    the recipe's budget, ×10 with ``full``; ``lrs[0]``, if given, replaces the recipe's lr), then the margin
    of each on the training points, the test accuracy and the measurements that explain them."""
    factory = factory_of(workload_factory)
    lrs = check_common(steps, lrs, seed)
    configuration = size(quick, full)
    opts = study_options(NAME, options, OPTIONS)
    if opts["margin_method"] not in ("auto", "grid", "deepfool"):
        raise ValueError(f"margin_method must be 'auto', 'grid' or 'deepfool', got {opts['margin_method']!r}")
    if not opts["sd_lambda"] > 0:
        raise ValueError(f"sd_lambda must be > 0, got {opts['sd_lambda']!r}")
    seed_ids = seed_list(seed, FULL_SEEDS if full and seeds is None else seeds, full)
    first = factory(seed_ids[0])
    steps = steps or first.recipe.steps * (FULL_STEPS if configuration == "full" else 1)
    lr = one_lr(NAME, lrs)[0] if lrs else first.recipe.lr
    x, y = margin_points(first, opts["margin_points"])
    planar = x.dim() == 2 and x.shape[1] == 2
    method = opts["margin_method"] if opts["margin_method"] != "auto" else ("grid" if planar else "deepfool")
    if method == "grid" and not planar:
        raise ValueError(f"margin_method 'grid' needs 2-D inputs; this workload's are {list(x.shape[1:])}")

    runs, maps = [], {}
    for s, m in progress([(s, m) for s in seed_ids for m in METHODS], desc=f"{NAME}: runs", enabled=show_progress):
        workload = factory(s)
        lam = opts["sd_lambda"] if m == "sd" else 0.0
        with few_threads(workload):
            trained = train(workload, steps, lr, lam, show_progress, f"starvation: seed {s}, {m}")
            row = {"seed": s, "method": m, **trained, **workload_metrics(workload)}
            pts = (x.to(workload.device), y.to(workload.device))
            row.update(measure(workload.model, *pts, method, planar, opts))
            if planar and s == seed_ids[0]:
                maps[m] = boundary_map(workload.model, *pts, opts)
        runs.append(row)
        keep(out, "runs", row)

    summary = summarise(runs, seed_ids, planar)
    cfg = config(factory, first, seeds=seed_ids, seed=seed, steps=steps, lr=lr, configuration=configuration,
                 quick=configuration == "quick", full=configuration == "full", margin_method_used=method,
                 points=int(x.shape[0]), sd_penalty="sd_lambda/2 * mean over the batch of ||logits||^2", **opts)
    res = study_results(NAME, QUESTION, cfg, summary, runs=runs,
                        reproduces=summary["margin_gain"].sign > 0)
    out = run_dir(out)
    if out is not None:
        out.csv("starvation_runs.csv", runs)
        figures(res, summary, maps, x, y, out)
        out.text("report.md", report(res, summary, planar))
    return res


# ---- training ------------------------------------------------------------------------------------------

def train(workload, steps: int, lr: float, sd_lambda: float, show: bool, desc: str) -> dict:
    """``steps`` steps of the recipe; with ``sd_lambda`` > 0 its weight decay is dropped and λ/2·‖logits‖²
    (the model's output, batch mean) is added to the loss. Returns the last step's loss and penalty."""
    recipe = dataclasses.replace(workload.recipe, weight_decay=0.0) if sd_lambda else workload.recipe
    opt = recipe.make(workload.model.parameters(), lr=lr, blocks=workload.blocks)
    outputs: list = []
    hook = workload.model.register_forward_hook(lambda module, args, output: outputs.append(output))
    batches = workload.batches()
    base = penalty = torch.zeros(())
    try:
        for _ in progress(range(steps), desc=desc, enabled=show):
            batch = next(batches)
            outputs.clear()
            opt.zero_grad()
            base = workload.loss(batch)
            loss = base
            if sd_lambda:
                if not outputs:
                    raise WorkloadError(f"workload {workload.name!r}: its loss_fn never called the model, so "
                                        f"spectral decoupling has no logits to penalise")
                penalty = sum(0.5 * sd_lambda * _logits(o).square().sum(1).mean() for o in outputs)
                loss = base + penalty
            loss.backward()
            opt.step()
    finally:
        hook.remove()
    return {"final_loss": base.item(), "final_penalty": float(penalty.detach()) if torch.is_tensor(penalty) else 0.0}


def _logits(output) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise WorkloadError(f"the model returned a {type(output).__name__}; the starvation study needs a model "
                            f"whose output is a tensor of logits")
    return output.reshape(output.shape[0], -1) if output.dim() > 0 else output.reshape(1, 1)


def workload_metrics(workload) -> dict:
    metrics = workload.evaluate()
    return {f"test_{k}": v for k, v in metrics.items()}


# ---- the points, the scores and the margin -------------------------------------------------------------

def margin_points(workload, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``limit`` training examples (x, y) of ``workload``: its training tensors when its batches carry
    them (``x``, ``y`` attributes), else one pass over its batches (an iterator: drawn until ``limit``)."""
    source = workload.train_batches
    if isinstance(getattr(source, "x", None), torch.Tensor) and isinstance(getattr(source, "y", None), torch.Tensor):
        return source.x[:limit].detach().cpu(), source.y[:limit].detach().cpu()
    xs, ys, count = [], [], 0
    for batch in source:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
            raise WorkloadError(f"workload {workload.name!r}: the starvation study needs (x, y) batches of tensors, "
                                f"got {type(batch).__name__}")
        xs.append(batch[0].detach().cpu())
        ys.append(batch[1].detach().cpu())
        count += batch[0].shape[0]
        if count >= limit:
            break
    if not xs:
        raise WorkloadError(f"workload {workload.name!r}: train_batches yields no batch")
    return torch.cat(xs)[:limit], torch.cat(ys)[:limit]


def class_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, classes ≥ 2) logits: a single logit ℓ counts as the two classes (0, ℓ)."""
    out = _logits(model(x))
    if out.shape[1] == 1:
        out = torch.cat([torch.zeros_like(out), out], 1)
    return out


def gap(logits: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The logit of class ``c`` minus the best other class: > 0 exactly where ``c`` is predicted."""
    own = logits.gather(1, c[:, None])[:, 0]
    others = logits.scatter(1, c[:, None], float("-inf"))
    return own - others.max(1).values


@contextlib.contextmanager
def evaluating(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([class_logits(model, x[i:i + CHUNK]).argmax(1) for i in range(0, x.shape[0], CHUNK)])


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str, planar: bool, opts: dict) -> dict:
    """The margin and what goes with it, on the points (x, y), in eval mode."""
    with evaluating(model):
        with torch.no_grad():
            logits = class_logits(model, x)
        pred = logits.argmax(1)
        correct = pred == y.to(pred.device)
        row = {"train_accuracy": correct.double().mean().item(),
               "logit_gap": gap(logits, pred).double().mean().item()}
        correct = correct.cpu()
        df = deepfool(model, x, pred).cpu()
        signed = torch.where(correct, df, -df)
        row["margin_deepfool"] = signed[torch.isfinite(signed)].min().item() if torch.isfinite(signed).any() else math.nan
        row["deepfool_unresolved"] = int((~torch.isfinite(df)).sum())
        if planar:
            grid = grid_distances(model, x, pred, opts)
            signed_grid = torch.where(correct, grid["distance"], -grid["distance"])
            row["margin_grid"] = signed_grid.min().item()
            row["grid_error"] = grid["error"]
            row["certified"] = bool(signed_grid.abs().min().item() <= opts["pad"])
            row["second_feature_share"] = input_gradient_share(model, x, pred)
            if method == "grid":
                signed = signed_grid
        finite = torch.isfinite(signed)
        row["margin"] = signed[finite].min().item() if finite.any() else math.nan
        row["distance_median"] = signed[finite].abs().median().item() if finite.any() else math.nan
        row["nearest_point"] = int(torch.where(finite, signed, math.inf).argmin())
    return row


def input_gradient_share(model: nn.Module, x: torch.Tensor, pred: torch.Tensor) -> float:
    """Mean over the points of g₁² / (g₀² + g₁²), g the input gradient of the predicted class's logit gap."""
    xi = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gap(class_logits(model, xi), pred).sum(), xi)
    sq = g.double().square()
    return (sq[:, 1] / sq.sum(1).clamp_min(1e-300)).mean().item()


def deepfool(model: nn.Module, x0: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Per point, an estimate of the distance to the boundary of its predicted class's region: DeepFool's
    iterated linearisation (the nearest linearised boundary of the other classes, a 2% overshoot, at most
    50 iterations), then a bisection along the segment from the point to where it crossed. ``inf`` where it
    did not cross."""
    n = x0.shape[0]
    flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
    r = torch.zeros_like(x0)
    crossed = torch.zeros(n, dtype=torch.bool, device=x0.device)
    for _ in range(DEEPFOOL_ITERATIONS):
        xi = (x0 + (1 + OVERSHOOT) * r).detach().requires_grad_(True)
        logits = class_logits(model, xi)
        crossed = logits.argmax(1) != pred
        if bool(crossed.all()):
            break
        f = logits - logits.gather(1, pred[:, None])  # f_k < 0 for every k != pred while not crossed
        best_ratio = torch.full((n,), math.inf, dtype=torch.float64, device=x0.device)
        step = torch.zeros_like(x0)
        for k in range(logits.shape[1]):
            (g,) = torch.autograd.grad(f[:, k].sum(), xi, retain_graph=k < logits.shape[1] - 1)
            norm = flat(g).double().norm(dim=1)
            ratio = f[:, k].detach().double().abs() / norm.clamp_min(1e-300)
            better = (pred != k) & (ratio < best_ratio) & (norm > 0)
            best_ratio = torch.where(better, ratio, best_ratio)
            scale = ((f[:, k].detach().abs() + 1e-6) / flat(g).square().sum(1).clamp_min(1e-30))
            candidate = g * scale.reshape(-1, *([1] * (g.dim() - 1)))
            step = torch.where(better.reshape(-1, *([1] * (g.dim() - 1))), candidate, step)
        r = r + torch.where(crossed.reshape(-1, *([1] * (x0.dim() - 1))), torch.zeros_like(step), step).detach()
    with torch.no_grad():
        end = x0 + (1 + OVERSHOOT) * r
        crossed = predict(model, end) != pred
        lo = torch.zeros(n, dtype=x0.dtype, device=x0.device)
        hi = torch.ones_like(lo)
        shape = (-1, *([1] * (x0.dim() - 1)))
        for _ in range(HALVINGS):
            mid = (lo + hi) / 2
            inside = predict(model, x0 + mid.reshape(shape) * (end - x0)) == pred
            lo, hi = torch.where(inside, mid, lo), torch.where(inside, hi, mid)
        length = flat(end - x0).double().norm(dim=1)
        return torch.where(crossed, hi.double() * length, torch.full_like(length, math.inf))


def _grid(model: nn.Module, x: torch.Tensor, opts: dict):
    lo, hi = x.min(0).values - opts["pad"], x.max(0).values + opts["pad"]
    res = int(opts["grid"])
    gx = torch.linspace(float(lo[0]), float(hi[0]), res, dtype=x.dtype, device=x.device)
    gy = torch.linspace(float(lo[1]), float(hi[1]), res, dtype=x.dtype, device=x.device)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")  # rows: the second coordinate, columns: the first
    plane = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        logits = torch.cat([class_logits(model, plane[i:i + CHUNK]) for i in range(0, plane.shape[0], CHUNK)])
    return gx, gy, logits.reshape(res, res, -1)


def grid_distances(model: nn.Module, x: torch.Tensor, pred: torch.Tensor, opts: dict) -> dict:
    """Per point, the distance to the zero contour of its predicted class's logit gap (2-D), polished by
    bisection along the ray to the nearest contour point; ``error``: the largest change the polish made."""
    import contourpy
    import numpy as np

    gx, gy, logits = _grid(model, x, opts)
    distance = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    error = 0.0
    for c in pred.unique().tolist():
        others = logits.clone()
        others[..., c] = float("-inf")
        score = (logits[..., c] - others.max(-1).values).double().cpu().numpy()
        lines = contourpy.contour_generator(gx.double().cpu().numpy(), gy.double().cpu().numpy(), score).lines(0.0)
        lines = [ln for ln in lines if len(ln) >= 2]
        idx = (pred == c).nonzero()[:, 0].cpu()
        if not lines or idx.numel() == 0:
            continue
        a = torch.tensor(np.concatenate([ln[:-1] for ln in lines]), dtype=torch.float64)
        b = torch.tensor(np.concatenate([ln[1:] for ln in lines]), dtype=torch.float64)
        p = x.detach().cpu().double()[idx]
        best_d = torch.full((idx.numel(),), math.inf, dtype=torch.float64)
        best_q = torch.zeros(idx.numel(), 2, dtype=torch.float64)
        ab = b - a
        length2 = ab.square().sum(1).clamp_min(1e-300)
        for i in range(0, idx.numel(), 256):
            pp = p[i:i + 256, None, :]
            t = (((pp - a) * ab).sum(-1) / length2).clamp(0, 1)
            q = a + t[..., None] * ab
            d = (pp - q).norm(dim=-1)
            dmin, arg = d.min(1)
            best_d[i:i + 256], best_q[i:i + 256] = dmin, q[torch.arange(q.shape[0]), arg]
        spacing = max(float(gx[1] - gx[0]), float(gy[1] - gy[0]))
        polished = polish(model, p, best_q, c, spacing)
        error = max(error, (polished - best_d).abs().max().item())
        distance[idx] = polished
    return {"distance": distance, "error": error}


def polish(model: nn.Module, p: torch.Tensor, q: torch.Tensor, c: int, spacing: float) -> torch.Tensor:
    """The distance from each point p (2-D) to class ``c``'s boundary, starting from q, its nearest contour
    point: D(φ), the first zero of class ``c``'s logit gap along the ray from p at angle φ (a scan to 1.5·|q −
    p|, then bisection), minimised over φ by golden-section search in a bracket of ± 2·spacing/|q − p|
    (at most ±π/4) around the direction of q; the ray through q itself where that is nearer, |q − p| where
    no zero is found."""
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    cls = torch.full((p.shape[0],), c, dtype=torch.long, device=device)

    def score(pts):
        with torch.no_grad():
            return gap(class_logits(model, pts.to(device=device, dtype=dtype)), cls).double().cpu()

    d = (q - p).norm(dim=1)
    reach = 1.5 * d

    def distance(phi):
        u = torch.stack([phi.cos(), phi.sin()], 1)
        lo, hi, previous = torch.zeros_like(d), torch.full_like(d, math.nan), torch.zeros_like(d)
        for frac in torch.linspace(0, 1, 31, dtype=torch.float64)[1:]:
            t = frac * reach
            negative = (score(p + t[:, None] * u) <= 0) & torch.isnan(hi)
            lo, hi = torch.where(negative, previous, lo), torch.where(negative, t, hi)
            previous = t
        found = ~torch.isnan(hi)
        hi = torch.where(found, hi, reach)
        for _ in range(HALVINGS):
            mid = (lo + hi) / 2
            inside = score(p + mid[:, None] * u) > 0
            lo, hi = torch.where(inside & found, mid, lo), torch.where(~inside & found, mid, hi)
        return torch.where(found, hi, torch.full_like(hi, math.inf))

    phi0 = torch.atan2(q[:, 1] - p[:, 1], q[:, 0] - p[:, 0])
    best = distance(phi0)
    half = (2 * spacing / d.clamp_min(1e-300)).clamp(max=math.pi / 4)
    a, b = phi0 - half, phi0 + half
    ratio = (math.sqrt(5) - 1) / 2
    c1, c2 = b - ratio * (b - a), a + ratio * (b - a)
    f1, f2 = distance(c1), distance(c2)
    for _ in range(GOLDEN):
        left = f1 < f2  # the minimum lies in [a, c2]
        b, a = torch.where(left, c2, b), torch.where(left, a, c1)
        new_c = torch.where(left, b - ratio * (b - a), a + ratio * (b - a))
        f_new = distance(new_c)
        c1, c2, f1, f2 = (torch.where(left, new_c, c2), torch.where(left, c1, new_c),
                          torch.where(left, f_new, f2), torch.where(left, f1, f_new))
    best = torch.minimum(best, torch.minimum(f1, f2))
    return torch.where(torch.isfinite(best), best, d)


def boundary_map(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opts: dict) -> dict:
    """What the figure draws for one run: the grid and the logit gap of class 1 against the rest."""
    with evaluating(model):
        gx, gy, logits = _grid(model, x, {**opts, "grid": min(int(opts["grid"]), 300)})
    one = torch.ones(logits.shape[0] * logits.shape[1], dtype=torch.long, device=logits.device)
    score = gap(logits.reshape(-1, logits.shape[-1]), one).reshape(logits.shape[:2])
    return {"gx": gx.cpu(), "gy": gy.cpu(), "score": score.cpu()}


# ---- summary, figures, report -----------------------------------------------------------------------------

def per_seed(runs: list[dict], method: str, key: str) -> list[float]:
    return [r[key] for r in runs if r["method"] == method]


def summarise(runs: list[dict], seed_ids: list[int], planar: bool) -> Summary:
    summary = Summary()
    plain, sd = per_seed(runs, "plain", "margin"), per_seed(runs, "sd", "margin")
    summary.add("margin/plain", plain)
    summary.add("margin/sd", sd)
    summary.add("margin_gain", sd, against=plain)
    keys = ["train_accuracy", "logit_gap", "final_loss", "distance_median"]
    if any("test_accuracy" in r for r in runs):
        keys.insert(0, "accuracy")
    if planar:
        keys += ["second_feature_share", "margin_deepfool"]
    for key in keys:
        field = "test_accuracy" if key == "accuracy" else key
        a, b = per_seed(runs, "plain", field), per_seed(runs, "sd", field)
        summary.add(f"{key}/plain", a)
        summary.add(f"{key}/sd", b)
        summary.add(f"{key}_change", b, against=a)
    if planar:
        for m in METHODS:
            summary.add(f"deepfool_minus_grid/{m}", per_seed(runs, m, "margin_deepfool"),
                        against=per_seed(runs, m, "margin_grid"))
    return summary


def figures(res: dict, summary: Summary, maps: dict, x: torch.Tensor, y: torch.Tensor, out: RunDir) -> None:
    plt = pyplot()
    runs = res["runs"]
    cfg = res["config"]
    first = cfg["seeds"][0]
    panels = 4 if maps else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.3 * panels, 4.2), constrained_layout=True)
    if maps:
        for ax, m in zip(axes[:2], METHODS):
            run_ = next(r for r in runs if r["seed"] == first and r["method"] == m)
            draw_boundary(ax, plt, maps[m], x, y, run_, f"{LABELS[m]}, seed {first}")
        rest = axes[2:]
    else:
        ax = axes[0]
        for m, color in zip(METHODS, ("tab:red", "tab:blue")):
            ax.bar([0 if m == "plain" else 1], [summary[f"distance_median/{m}"].mean], color=color, alpha=0.6,
                   yerr=[[summary[f"distance_median/{m}"].mean - summary[f"distance_median/{m}"].lo],
                         [summary[f"distance_median/{m}"].hi - summary[f"distance_median/{m}"].mean]])
        ax.set(xticks=[0, 1], xticklabels=[LABELS[m] for m in METHODS], ylabel="median distance to the boundary",
               title="median over the points (95% interval)")
        rest = axes[1:]
    ax = rest[0]
    for s in cfg["seeds"]:
        pair = [next(r["margin"] for r in runs if r["seed"] == s and r["method"] == m) for m in METHODS]
        ax.plot([0, 1], pair, color="0.6", lw=0.8, marker="o", ms=3)
    for i, (m, color) in enumerate(zip(METHODS, ("tab:red", "tab:blue"))):
        est = summary[f"margin/{m}"]
        err = [[est.mean - est.lo], [est.hi - est.mean]] if est.has_interval else None
        ax.errorbar([i + (0.08 if i else -0.08)], [est.mean], yerr=err, color=color, marker="s", capsize=5, lw=2)
    ax.set(xticks=[0, 1], xticklabels=[LABELS[m] for m in METHODS], xlim=(-0.4, 1.4), ylabel="margin",
           title=f"margin per seed (n = {len(cfg['seeds'])}), mean ± 95%")
    ax = rest[1]
    gains = summary["margin_gain"]
    ax.axhline(0, color="k", lw=0.8)
    ax.scatter(range(len(gains.values)), gains.values, color="0.4", s=14, label="one seed")
    if gains.has_interval:
        ax.axhspan(gains.lo, gains.hi, color="tab:green", alpha=0.2, label="95% interval of the mean")
    ax.axhline(gains.mean, color="tab:green", lw=1.5, label="mean")
    ax.set(xlabel="seed index", ylabel="margin(SD) − margin(plain)", title="the paired gain")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True, nbins=6))
    ax.legend(fontsize=7, loc="best")
    out.figure("starvation.png", fig)


def draw_boundary(ax, plt, grid: dict, x: torch.Tensor, y: torch.Tensor, run_: dict, title: str) -> None:
    gx, gy, score = grid["gx"].numpy(), grid["gy"].numpy(), grid["score"].double().numpy()
    limit = max(1e-9, float(abs(score).max()))
    ax.contourf(gx, gy, score, levels=20, cmap="RdBu", vmin=-limit, vmax=limit, alpha=0.7)
    ax.contour(gx, gy, score, levels=[0.0], colors="k", linewidths=1.2)
    xs, ys = x.double().cpu().numpy(), y.cpu().numpy()
    ax.scatter(xs[:, 0], xs[:, 1], c=ys, cmap="bwr_r", edgecolors="k", linewidths=0.3, s=10)
    near = xs[run_["nearest_point"]]
    ax.add_patch(plt.Circle((near[0], near[1]), abs(run_["margin"]), fill=False, color="gold", lw=1.5))
    ax.set(aspect="equal", xlabel="first coordinate", ylabel="second coordinate",
           title=f"{title}\nmargin {claims.number(run_['margin'])}")
    ax.xaxis.set_major_locator(plt.MaxNLocator(4))
    ax.yaxis.set_major_locator(plt.MaxNLocator(4))


def report(res: dict, summary: Summary, planar: bool) -> str:
    cfg = res["config"]
    w = cfg["workload_summary"]
    n = len(cfg["seeds"])
    gain = summary["margin_gain"]
    wins = sum(1 for v in gain.values if v > 0)
    method = cfg["margin_method_used"]
    how = ("computed on a grid of the logit difference, its zero contour, then the distance to the boundary "
           "along a ray (bisection) minimised over the ray's direction near the nearest contour point "
           f"({cfg['grid']}×{cfg['grid']} grid, {cfg['pad']:g} beyond the points)"
           if method == "grid" else
           "a DeepFool-style estimate (iterated linearisation, then a bisection along the segment to the crossing): "
           "the distance to a point on the boundary, an upper bound of the true distance")
    lines = ["# Gradient starvation: the margin with and without spectral decoupling\n",
             f"The question: {QUESTION.split(': ', 1)[1]}\n",
             f"Workload `{cfg['workload']}` ({w['description'] or str(w['parameters']) + ' parameters'}); "
             f"{cfg['steps']} steps of {w['recipe']['optimizer']} (lr {cfg['lr']:g}, momentum "
             f"{w['recipe']['momentum']:g}) per run; {n} seeds ({cfg['configuration']} configuration), each trained "
             f"twice from the same initialisation on the same batches: plain (the recipe as it is) and with "
             f"spectral decoupling (SD: the recipe's weight decay dropped, λ/2·‖logits‖² added to the loss, "
             f"λ = {cfg['sd_lambda']:g}). Every number is a mean over the seeds with its 95% interval [lo, hi] "
             f"(Student t); SD against plain is paired by seed.\n",
             f"The margin: the smallest distance from the {cfg['points']} training points to the decision "
             f"boundary (negative if a training point is misclassified), {how}.\n",
             "## The answer\n",
             "The paper's prediction: SD's boundary has a larger margin than plain training's (10 of 10 seeds in "
             "the paper).\n",
             f"- {sd_vs_plain(gain, 'margin', larger='larger', smaller='smaller')}; "
             f"SD's margin was larger on {wins} of {n} paired seeds.",
             f"- Margin: plain {claims.ci(summary['margin/plain'])}, SD {claims.ci(summary['margin/sd'])}.",
             ]
    if "accuracy/plain" in summary:
        lines.append(f"- Test accuracy: plain {claims.ci(summary['accuracy/plain'], claims.percent)}, SD "
                     f"{claims.ci(summary['accuracy/sd'], claims.percent)}; "
                     f"{sd_vs_plain(summary['accuracy_change'], 'test accuracy', show=claims.percent)}.")
    if gain.sign > 0:
        lines.append(f"\nThe paper's result reproduces: the interval of the margin gain lies above 0 ({wins} of {n} "
                     f"seeds).")
    else:
        lines.append("\nThe paper's result does not reproduce here: the interval of the margin gain does not lie "
                     "above 0. What the run measured about why:")
    lines.append("")
    lines += why(summary, planar)
    lines += ["", "![decision boundaries and margins](starvation.png)\n"]
    if planar:
        lines.append("The first two panels: the decision boundary (black; the colour is the logit of class 1 "
                     "against class 0) over the training points for the first seed, with a circle of the margin's "
                     "radius around the point that sets it. Then the margin per seed, a grey line pairing the two "
                     "runs of a seed, with the means and their intervals, and the per-seed gain.\n")
    lines.append("## Per method\n")
    rows = []
    keys = [("margin", claims.number), ("accuracy", claims.percent), ("train_accuracy", claims.percent),
            ("final_loss", claims.number), ("logit_gap", claims.number), ("distance_median", claims.number)]
    if planar:
        keys += [("second_feature_share", claims.percent), ("margin_deepfool", claims.number)]
    names = {"margin": "margin", "accuracy": "test accuracy", "train_accuracy": "training accuracy",
             "final_loss": "final training loss", "logit_gap": "mean logit gap", "distance_median":
             "median distance to the boundary", "second_feature_share": "second coordinate's share of the input gradient",
             "margin_deepfool": "margin, DeepFool estimate"}
    for key, show in keys:
        if f"{key}/plain" not in summary:
            continue
        change = summary["margin_gain"] if key == "margin" else summary[f"{key}_change"]
        rows.append([names[key], claims.ci(summary[f"{key}/plain"], show), claims.ci(summary[f"{key}/sd"], show),
                     claims.ci(change, show, signed=True)])
    lines.append(tables.markdown(["quantity", "plain", "SD", f"SD − plain (paired, n = {n})"], rows))
    lines.append("\n## Per seed\n")
    seed_rows = []
    for s in cfg["seeds"]:
        r = {m: next(r for r in res["runs"] if r["seed"] == s and r["method"] == m) for m in METHODS}
        seed_rows.append([s, claims.number(r["plain"]["margin"]), claims.number(r["sd"]["margin"]),
                          claims.number(r["sd"]["margin"] - r["plain"]["margin"]),
                          claims.percent(r["plain"].get("test_accuracy", math.nan)),
                          claims.percent(r["sd"].get("test_accuracy", math.nan))])
    lines.append(tables.markdown(["seed", "margin, plain", "margin, SD", "gain", "test accuracy, plain",
                                  "test accuracy, SD"], seed_rows))
    lines += ["", "## How accurate the margin is\n"]
    if planar:
        errors = [r["grid_error"] for r in res["runs"]]
        certified = all(r["certified"] for r in res["runs"])
        lines.append(f"The polish (bisection along rays, minimised over their direction) moved a grid distance "
                     f"by at most {claims.number(max(errors))} "
                     f"(the largest over all runs and points). Every margin was "
                     f"{'below' if certified else 'NOT always below'} the grid's reach ({cfg['pad']:g}), so the "
                     f"nearest boundary point lay on the grid{'' if certified else ' only for some runs'}. "
                     f"DeepFool's estimate minus the grid's margin: plain "
                     f"{claims.ci(summary['deepfool_minus_grid/plain'], signed=True)}, SD "
                     f"{claims.ci(summary['deepfool_minus_grid/sd'], signed=True)} ({claims.seeds(gain, True)}; "
                     f"DeepFool finds a boundary point, never a nearer one than the true nearest).\n")
    else:
        unresolved = sum(r["deepfool_unresolved"] for r in res["runs"])
        lines.append(f"The margin is DeepFool's estimate: a distance to a point on the boundary, so an upper bound "
                     f"of the true one; {unresolved} point-runs did not cross the boundary within "
                     f"{DEEPFOOL_ITERATIONS} iterations and were left out.\n")
    return "\n".join(lines) + "\n"


def sd_vs_plain(diff, quantity: str, **kw) -> str:
    """The claim on a paired difference SD − plain."""
    return claims.difference("spectral decoupling", "plain training", diff, quantity=quantity, **kw)


def why(summary: Summary, planar: bool) -> list[str]:
    """The measurements that explain the margins: the logit scale SD acts on, how well each run fits, and in
    2-D how much each uses the second coordinate. An explanation is given only where its measurement is."""
    gap_change = summary["logit_gap_change"]
    acted = {-1: ": the penalty kept the logits small, so a point classified with confidence keeps a loss and a "
                 "gradient, which go on shaping the boundary after plain training's have vanished",
             0: ": the penalty did not measurably change the logits, so it cannot have changed the boundary "
                "through them",
             1: ": the penalty did not keep the logits small"}[gap_change.sign]
    median = "median distance from a training point to the boundary"
    out = [f"- {sd_vs_plain(gap_change, 'mean logit gap on the training points')} "
           f"(plain {claims.ci(summary['logit_gap/plain'])}, SD {claims.ci(summary['logit_gap/sd'])}){acted}.",
           f"- Training accuracy: plain {claims.ci(summary['train_accuracy/plain'], claims.percent)}, SD "
           f"{claims.ci(summary['train_accuracy/sd'], claims.percent)} "
           f"({sd_vs_plain(summary['train_accuracy_change'], 'training accuracy', show=claims.percent)}); final "
           f"training loss plain {claims.ci(summary['final_loss/plain'])}, SD {claims.ci(summary['final_loss/sd'])}.",
           f"- {sd_vs_plain(summary['distance_median_change'], median, larger='larger', smaller='smaller')}."]
    if planar:
        change = summary["second_feature_share_change"]
        meaning = {1: ": SD's boundary bends with the moons (the direction plain training starves) instead of "
                      "following the linear gap alone",
                   0: ": no evidence that SD used the second direction more",
                   -1: ": SD used the second direction less"}[change.sign]
        share = "share of the input gradient along the second coordinate"
        out.append(f"- {sd_vs_plain(change, share, show=claims.percent)} "
                   f"(plain {claims.ci(summary['second_feature_share/plain'], claims.percent)}, SD "
                   f"{claims.ci(summary['second_feature_share/sd'], claims.percent)}){meaning}.")
    return out
