"""Question 003, "gradient dosage": which parts of a network receive the gradient, and which starve?

Part 1 (the workload): per block, the cumulative squared gradient over training (``steps`` steps of the
recipe; default a quarter of its budget, the whole budget with ``full``), as a **dose per parameter**: the
block's share of the total Σg² divided by its share of the parameters. 1 is a fair share; 2 means each of
the block's parameters received twice the network's average dose, 0.5 half of it. The per-block numbers are
the fused kernels' statistics (Σg² per block, computed in the update's memory pass). Per unit (an output
unit of a Linear layer or an output channel of a convolution, its dose the Σg² over its incoming weights
and bias): how unequal the doses are within a layer (Gini coefficient, the share of the top 10% of units,
units that received none).

Part 2 (gradient starvation): two independent features predict the label equally well (same Bayes
accuracy); one is easy (one strong coordinate), one is hard (the same signal spread thinly over 16
coordinates). Each feature feeds its own branch; the branches' logits add. Does the easy branch take the
gradient and starve the hard one? Then the same with spectral decoupling (Pezeshki et al. 2021: an L2
penalty λ/2·‖logits‖² instead of weight decay). The ``starvation`` study reproduces that paper's own
experiment.

Every number is over seeds (3, or 5 with ``full``): the seed moves the workload's initialisation and
batches, and part 2's data, initialisation and batches; plain and SD runs of part 2 pair by seed. Small models
run on one intra-op thread (``few_threads``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

import pyco
from pyco.blocks import Blocks
from pyco.studies import claims, tables
from pyco.studies._common import (RunDir, config, few_threads, metrics_text, progress, pyplot,
                                  results as study_results, run_dir, keep, one_lr, begin)
from pyco.studies.intervals import Summary, paired, t_interval
from pyco.studies.workloads import DEFAULT

NAME = "dosage"
QUESTION = "question 003: which blocks and units receive the gradient dose, and does one feature starve another?"

OPTIONS = dict(starvation_steps=200, starvation_width=32, sd_lambda=0.05)
FULL = dict(starvation_steps=600)
UNIT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def gini(values: list[float]) -> float:
    """Gini coefficient of non-negative values: 0 = equal dose for all, → 1 = one takes all."""
    v = sorted(values)
    n, total = len(v), sum(v)
    if n == 0 or total == 0:
        return 0.0
    return sum((2 * (i + 1) - n - 1) * x for i, x in enumerate(v)) / (n * total)


def unit_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear and convolution layers with a trainable weight, by module path."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, UNIT_LAYERS) and m.weight is not None and m.weight.requires_grad}


def unit_dose(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per output unit of each layer: Σ g² over the unit's incoming weights and bias (this step)."""
    doses = {}
    for name, layer in layers.items():
        if layer.weight.grad is None:
            continue
        dose = layer.weight.grad.double().square().reshape(layer.weight.shape[0], -1).sum(1)
        if layer.bias is not None and layer.bias.grad is not None:
            dose = dose + layer.bias.grad.double().square()
        doses[name] = dose.cpu()
    return doses


def per_parameter(shares, numel) -> list[float]:
    """Each block's share of the dose divided by its share of the parameters (1 = a fair share)."""
    total = sum(numel)
    return [s / (n / total) if n else float("nan") for s, n in zip(shares, numel)]


def workload_dosage(workload, steps: int, lr: float, show: bool) -> dict:
    blocks = workload.blocks
    numel = blocks.numel()
    opt = workload.recipe.make(workload.model.parameters(), lr=lr, blocks=blocks)
    batches = workload.batches()
    layers = unit_layers(workload.model)
    cumulative_block = torch.zeros(len(blocks), dtype=torch.float64)
    cumulative_unit = {name: torch.zeros(m.weight.shape[0], dtype=torch.float64) for name, m in layers.items()}
    history = []
    for step in progress(range(steps), desc=f"dosage: {workload.name}", enabled=show):
        batch = next(batches)
        opt.zero_grad()
        loss = workload.loss(batch)
        loss.backward()
        for name, dose in unit_dose(layers).items():
            cumulative_unit[name] += dose
        opt.step()
        cumulative_block += opt.last_stats.grad_sq.cpu()
        share = (cumulative_block / cumulative_block.sum()).tolist()
        history.append({"step": step + 1, "loss": loss.item(),
                        **{f"dose_per_parameter_{n}": d for n, d in zip(blocks.names, per_parameter(share, numel))}})
    units = {}
    for name, dose in cumulative_unit.items():
        ordered = sorted(dose.tolist(), reverse=True)
        top = max(1, len(ordered) // 10)
        total = sum(ordered)
        units[name] = {
            "gini": gini(ordered),
            "top10pct_share": sum(ordered[:top]) / total if total else float("nan"),
            "dead_units": int(sum(1 for d in ordered if d == 0.0)),
            "sorted_dose": ordered,
        }
    shares = (cumulative_block / cumulative_block.sum()).tolist()
    return {
        "block_share": dict(zip(blocks.names, shares)),
        "block_numel": dict(zip(blocks.names, numel)),
        "dose_per_parameter": dict(zip(blocks.names, per_parameter(shares, numel))),
        "units": units,
        "eval": workload.evaluate(),
        "history": history,
    }


# ---- part 2: gradient starvation -----------------------------------------------------------------------

EASY_DIMS, HARD_DIMS = 1, 16
EASY_MEAN, HARD_MEAN = 2.0, 0.5  # same total signal-to-noise: 2.0 = 0.5·√16


def starvation_data(n: int, generator: torch.Generator, device):
    """Binary labels; easy feature: one coordinate ±2 + N(0,1); hard feature: 16 coordinates ±0.5 + N(0,1).
    Each alone gives the same Bayes accuracy Φ(2) ≈ 97.7%."""
    y = torch.randint(0, 2, (n,), generator=generator)
    sign = (2 * y - 1).double().unsqueeze(1)
    easy = sign * EASY_MEAN + torch.randn(n, EASY_DIMS, generator=generator, dtype=torch.float64)
    hard = sign * HARD_MEAN + torch.randn(n, HARD_DIMS, generator=generator, dtype=torch.float64)
    return easy.float().to(device), hard.float().to(device), y.to(device)


class TwoBranch(nn.Module):
    """logits = easy_branch(x_easy) + hard_branch(x_hard): each feature has its own recognizer."""

    def __init__(self, width: int):
        super().__init__()
        self.easy = nn.Sequential(nn.Linear(EASY_DIMS, width), nn.ReLU(), nn.Linear(width, 2))
        self.hard = nn.Sequential(nn.Linear(HARD_DIMS, width), nn.ReLU(), nn.Linear(width, 2))

    def forward(self, easy, hard):
        return self.easy(easy) + self.hard(hard)

    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters())


def branch_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def starvation_run(seed: int, width: int, steps: int, device, sd_lambda: float, show: bool) -> dict:
    gen = torch.Generator().manual_seed(seed)
    train = starvation_data(2000, gen, device)
    test = starvation_data(2000, gen, device)
    torch.manual_seed(seed)
    model = TwoBranch(width).to(device)
    blocks = Blocks([("easy branch", model.easy.parameters()), ("hard branch", model.hard.parameters())])
    numel = blocks.numel()
    opt = pyco.optim.SGD(model.parameters(), lr=0.05, blocks=blocks)
    cumulative = torch.zeros(2, dtype=torch.float64)
    history = []
    batch_gen = torch.Generator().manual_seed(seed + 1)
    for step in progress(range(steps), desc=f"dosage: starvation λ={sd_lambda}", enabled=show):
        idx = torch.randint(0, train[2].shape[0], (64,), generator=batch_gen)
        logits = model(train[0][idx], train[1][idx])
        loss = nn.functional.cross_entropy(logits, train[2][idx])
        if sd_lambda:
            loss = loss + 0.5 * sd_lambda * logits.square().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        cumulative += opt.last_stats.grad_sq.cpu()
        history.append({"step": step + 1, "hard_share": (cumulative[1] / cumulative.sum()).item()})
    shares = (cumulative / cumulative.sum()).tolist()
    with torch.no_grad():
        easy_x, hard_x, y = test
        shuffled = torch.randperm(y.shape[0], generator=gen)
        return {
            "seed": seed,
            "sd_lambda": sd_lambda,
            "easy_share": shares[0],
            "hard_share": shares[1],
            "easy_dose_per_parameter": per_parameter(shares, numel)[0],
            "hard_dose_per_parameter": per_parameter(shares, numel)[1],
            "accuracy": branch_accuracy(model(easy_x, hard_x), y),
            "accuracy_easy_branch_alone": branch_accuracy(model.easy(easy_x), y),
            "accuracy_hard_branch_alone": branch_accuracy(model.hard(hard_x), y),
            "accuracy_easy_feature_scrambled": branch_accuracy(model(easy_x[shuffled], hard_x), y),
            "history": history,
        }


STARVATION_KEYS = ("hard_share", "hard_dose_per_parameter", "accuracy", "accuracy_easy_branch_alone",
                   "accuracy_hard_branch_alone", "accuracy_easy_feature_scrambled")


# ---- the study ------------------------------------------------------------------------------------------

def run(workload_factory=DEFAULT, *, steps: int | None = None, lrs=None, seed: int = 0, seeds: int | None = None,
        quick: bool = False, full: bool = False, out=None, show_progress: bool = False, **options) -> dict:
    """Part 1 on ``workload_factory(s)`` for each seed s (``steps``: default a quarter of the recipe's budget,
    the whole budget with ``full``; ``lrs[0]``, if given, replaces the recipe's lr), part 2 on its synthetic
    two-feature task (``starvation_steps``: 200, 600 with ``full``; ``starvation_width``; ``sd_lambda``)."""
    factory, lrs, configuration, opts, seed_ids, first = begin(NAME, workload_factory, steps, lrs, seed, seeds, quick,
                                                               full, options, OPTIONS, FULL)
    budget = first.recipe.steps
    steps = steps or (budget if configuration == "full" else max(1, budget // 4))
    lr = one_lr(NAME, lrs)[0] if lrs else first.recipe.lr
    runs, starvation = [], []
    for s in progress(seed_ids, desc=f"{NAME}: seeds", enabled=show_progress):
        workload = first if s == seed_ids[0] else factory(s)
        with few_threads(workload):
            runs.append({"seed": s, **workload_dosage(workload, steps, lr, show_progress)})
        keep(out, "runs", runs[-1])
        two_branch = SimpleNamespace(device=workload.device, parameters=TwoBranch(opts["starvation_width"]).numel())
        with few_threads(two_branch):
            for lam in (0.0, opts["sd_lambda"]):
                starvation.append(starvation_run(s, opts["starvation_width"], opts["starvation_steps"],
                                                 workload.device, lam, show_progress))
    summary = summarise(runs, starvation)
    cfg = config(factory, first, seeds=seed_ids, seed=seed, steps=steps, lr=lr, configuration=configuration,
                 quick=configuration == "quick", full=configuration == "full",
                 optimizer=f"pyco {first.recipe.optimizer}", **opts)
    res = study_results(NAME, QUESTION, cfg, summary, blocks=list(first.blocks.names), runs=runs,
                        starvation=starvation)
    out = run_dir(out)
    if out is not None:
        out.csv("dosage_blocks.csv", [{"seed": r["seed"], **h} for r in runs for h in r["history"]])
        out.csv("dosage_units.csv", [{"seed": r["seed"], "layer": n, "rank": k, "dose": d} for r in runs
                                     for n, u in r["units"].items() for k, d in enumerate(u["sorted_dose"])])
        out.csv("starvation.csv", [{k: v for k, v in r.items() if k != "history"} for r in starvation])
        figures(res, summary, out)
        out.text("report.md", report(res, summary))
    return res


def summarise(runs: list[dict], starvation: list[dict]) -> Summary:
    summary = Summary()
    for name in runs[0]["dose_per_parameter"]:
        summary.add(f"dose_per_parameter/{name}", [r["dose_per_parameter"][name] for r in runs])
        summary.add(f"dose_share/{name}", [r["block_share"][name] for r in runs])
    for name in runs[0]["units"]:
        for key in ("gini", "top10pct_share", "dead_units"):
            summary.add(f"units/{name}/{key}", [r["units"][name][key] for r in runs])
    for key in sorted({k for r in runs for k in r["eval"]}):
        summary.add(f"eval/{key}", [r["eval"][key] for r in runs if key in r["eval"]])
    plain = [r for r in starvation if not r["sd_lambda"]]
    sd = [r for r in starvation if r["sd_lambda"]]
    for key in STARVATION_KEYS:
        a, b = [r[key] for r in plain], [r[key] for r in sd]
        summary.add(f"starvation/{key}/plain", a)
        summary.add(f"starvation/{key}/sd", b)
        summary.add(f"starvation/{key}_change", b, against=a)
    return summary


def _band(ax, xs, rows, label, **style):
    """The mean over seeds of per-step curves with its 95% interval as a shaded band."""
    ests = [t_interval(col) for col in zip(*rows)]
    means = [e.mean for e in ests]
    line, = ax.plot(xs, means, label=label, **style)
    if all(e.has_interval for e in ests):
        ax.fill_between(xs, [e.lo for e in ests], [e.hi for e in ests], color=line.get_color(), alpha=0.2)


def figures(res: dict, summary: Summary, out: RunDir) -> None:
    plt = pyplot()
    runs, names = res["runs"], res["blocks"]
    n = len(runs)
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4), constrained_layout=True)
    ax = axes[0]
    ests = [summary[f"dose_per_parameter/{b}"] for b in names]
    err = [[e.mean - e.lo if e.has_interval else 0 for e in ests], [e.hi - e.mean if e.has_interval else 0 for e in ests]]
    ax.bar(range(len(names)), [e.mean for e in ests], yerr=err, capsize=3, color="tab:blue", alpha=0.7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="a fair share (1)")
    ax.set(xticks=range(len(names)), ylabel="dose per parameter", yscale="log",
           title=f"dose per parameter per block (n = {n}, 95%)")
    ax.set_xticklabels(names, rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center",
                       fontsize=7 if len(names) > 8 else 9)
    ax.legend(fontsize=7)
    ax = axes[1]
    steps = [h["step"] for h in runs[0]["history"]]
    shown = sorted(names, key=lambda b: summary[f"dose_per_parameter/{b}"].mean, reverse=True)[:8]
    for b in shown:
        _band(ax, steps, [[h[f"dose_per_parameter_{b}"] for h in r["history"]] for r in runs], b)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set(xlabel="step", ylabel="cumulative dose per parameter", yscale="log",
           title=f"over training ({res['config']['workload']})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax = axes[2]
    for name, u in list(runs[0]["units"].items())[:8]:
        dose = u["sorted_dose"]
        total = sum(dose) or 1.0
        ax.plot(range(1, len(dose) + 1), [max(d / total, 1e-300) for d in dose], label=f"{name} (Gini {u['gini']:.2f})")
    ax.set(xlabel="unit rank", ylabel="share of the layer's dose", yscale="log",
           title=f"dose per unit (seed {runs[0]['seed']})")
    ax.legend(fontsize=7)
    ax = axes[3]
    starv = res["starvation"]
    for sd, style in ((False, "-"), (True, "--")):
        rows = [[h["hard_share"] for h in r["history"]] for r in starv if bool(r["sd_lambda"]) == sd]
        lam = next(r["sd_lambda"] for r in starv if bool(r["sd_lambda"]) == sd)
        _band(ax, [h["step"] for h in starv[0]["history"]], rows,
              "plain" if not sd else f"spectral decoupling λ={lam:g}", ls=style)
    ax.axhline(0.5, color="k", lw=0.8, ls=":", label="half")
    ax.set(xlabel="step", ylabel="hard branch's cumulative share of Σg²", ylim=(0, 1),
           title="starvation: the hard feature's dose")
    ax.legend(fontsize=7)
    out.figure("dosage.png", fig)


def report(res: dict, summary: Summary) -> str:
    cfg = res["config"]
    names = res["blocks"]
    n = len(cfg["seeds"])
    first = res["runs"][0]
    total = sum(first["block_numel"].values())
    pct = claims.percent
    heldout = ", ".join(f"{k} " + claims.ci(summary[f"eval/{k}"], pct if k == "accuracy" else claims.number)
                        for k in sorted(first["eval"]))
    lines = ["# Gradient dosage\n",
             f"The question: {QUESTION.split(': ', 1)[1]}\n",
             f"Workload `{cfg['workload']}`: {cfg['steps']} steps of {cfg['optimizer']} (lr {cfg['lr']:g}) per seed, "
             f"{n} seeds ({cfg['configuration']} configuration). Every number is a mean over the seeds with its 95% "
             f"interval [lo, hi] (Student t); comparisons are paired by seed.\n",
             f"Held-out after training: {heldout or metrics_text({})}.\n",
             "## Dose per parameter\n",
             "A block's share of the cumulative squared gradient divided by its share of the parameters: 1 is a "
             "fair share, above 1 each parameter of the block received more than the network's average dose.\n"]
    rows = [[b, f"{first['block_numel'][b]:,} ({first['block_numel'][b] / total:.1%})",
             claims.ci(summary[f"dose_share/{b}"], pct), claims.ci(summary[f"dose_per_parameter/{b}"])] for b in names]
    lines.append(tables.markdown(["block", "parameters", "share of Σg²", "dose per parameter"], rows))
    lines.append("")
    for b in names:
        lines.append(f"- {claims.below(summary[f'dose_per_parameter/{b}'], 1.0, quantity=f'{b} dose per parameter')}")
    if len(names) > 1:
        ranked = sorted(names, key=lambda b: summary[f"dose_per_parameter/{b}"].mean, reverse=True)
        top, second = ranked[0], ranked[1]
        diff = paired([r["dose_per_parameter"][top] for r in res["runs"]],
                      [r["dose_per_parameter"][second] for r in res["runs"]])
        lines.append(f"\nThe highest mean dose per parameter: {top}, against the next, {second}: "
                     f"{claims.difference(top, second, diff, quantity='dose per parameter')}.")
    lines.append("\n## Per unit\n")
    rows = [[name, claims.ci(summary[f"units/{name}/gini"]), claims.ci(summary[f"units/{name}/top10pct_share"], pct),
             claims.ci(summary[f"units/{name}/dead_units"]), len(u["sorted_dose"])]
            for name, u in first["units"].items()]
    lines.append(tables.markdown(["module", "Gini of the unit doses", "share of the top 10% of units",
                                  "units that received none", "units"], rows))
    lines += ["", "![dose per block and per unit](dosage.png)\n",
              "## Gradient starvation: two features, each alone worth the same Bayes accuracy (97.7%)\n",
              f"An easy feature (one coordinate) and a hard one (16), each feeding its own branch of width "
              f"{cfg['starvation_width']}; {cfg['starvation_steps']} SGD steps, plain and with spectral decoupling "
              f"(λ = {cfg['sd_lambda']:g}), paired by seed.\n"]
    key_names = {"hard_share": ("the hard branch's share of Σg²", pct),
                 "hard_dose_per_parameter": ("the hard branch's dose per parameter", claims.number),
                 "accuracy": ("test accuracy", pct),
                 "accuracy_easy_branch_alone": ("accuracy of the easy branch alone", pct),
                 "accuracy_hard_branch_alone": ("accuracy of the hard branch alone", pct),
                 "accuracy_easy_feature_scrambled": ("accuracy with the easy feature scrambled", pct)}
    rows = [[label, claims.ci(summary[f"starvation/{k}/plain"], show), claims.ci(summary[f"starvation/{k}/sd"], show),
             claims.ci(summary[f"starvation/{k}_change"], show, signed=True)] for k, (label, show) in key_names.items()]
    lines.append(tables.markdown(["quantity", "plain", "spectral decoupling", f"SD − plain (n = {n})"], rows))
    starved = summary["starvation/hard_share/plain"]
    verdict = (" (below half: the hard feature was starved)" if starved.excludes(0.5) and starved.hi < 0.5 else
               " (not starved)" if starved.excludes(0.5) else "")
    lines += ["", f"- Without the penalty, "
                  f"{claims.below(starved, 0.5, quantity='the hard branch share of the dose', show=pct)}{verdict}."]
    for key, quantity in (("hard_share", "hard-branch share of the dose"),
                          ("accuracy_hard_branch_alone", "accuracy of the hard branch alone"),
                          ("accuracy_easy_feature_scrambled", "accuracy with the easy feature scrambled"),
                          ("accuracy", "test accuracy")):
        diff = summary[f"starvation/{key}_change"]
        lines.append(f"- {claims.difference('spectral decoupling', 'plain training', diff, quantity=quantity, show=pct)}.")
    return "\n".join(lines) + "\n"
