"""Seed 003, "gradient dosage": which parts of a network receive the gradient, and which starve?

Part 1 (the workload): per block and per unit, the cumulative share of squared gradient over training
(``steps`` steps of the recipe; default its budget, a quarter of it when ``quick``). The per-block numbers
are the fused kernels' statistics (Σg² per block, computed in the update's memory pass); a unit is an
output unit of a Linear layer or an output channel of a convolution, its dose the Σg² over its incoming
weights and bias.

Part 2 (gradient starvation): two independent features predict the label equally well (same Bayes
accuracy); one is easy (one strong coordinate), one is hard (the same signal spread thinly over 16
coordinates). Each feature feeds its own branch; the branches' logits add. Which branch receives the
gradient, and does it starve the other? Then the same with spectral decoupling (Pezeshki et al. 2021:
an L2 penalty λ/2·‖logits‖² instead of weight decay).
"""

from __future__ import annotations

import torch
from torch import nn

import pyco
from pyco.blocks import Blocks
from pyco.studies._common import (RunDir, check_common, config, factory_of, options as study_options,
                                  progress, pyplot, run_dir)
from pyco.studies.workloads import DEFAULT

NAME = "dosage"
QUESTION = "seed 003: which blocks and units receive the gradient dose, and does one feature starve another?"

OPTIONS = dict(starvation_steps=600, starvation_width=32, sd_lambda=0.05)
QUICK = dict(starvation_steps=200)
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


def workload_dosage(workload, steps: int, lr: float, show: bool) -> dict:
    blocks = workload.blocks
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
        share = cumulative_block / cumulative_block.sum()
        history.append({"step": step + 1, "loss": loss.item(),
                        **{f"share_{n}": s for n, s in zip(blocks.names, share.tolist())}})
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
    return {
        "config": {"steps": steps, "lr": lr, "optimizer": f"pyco {workload.recipe.optimizer}"},
        "block_share": dict(zip(blocks.names, (cumulative_block / cumulative_block.sum()).tolist())),
        "block_numel": dict(zip(blocks.names, blocks.numel())),
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


def branch_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def starvation_run(seed: int, width: int, steps: int, device, sd_lambda: float, show: bool) -> dict:
    gen = torch.Generator().manual_seed(seed)
    train = starvation_data(2000, gen, device)
    test = starvation_data(2000, gen, device)
    torch.manual_seed(seed)
    model = TwoBranch(width).to(device)
    blocks = Blocks([("easy branch", model.easy.parameters()), ("hard branch", model.hard.parameters())])
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
        history.append({"step": step + 1, "easy_dose": cumulative[0].item(), "hard_dose": cumulative[1].item()})
    with torch.no_grad():
        easy_x, hard_x, y = test
        shuffled = torch.randperm(y.shape[0], generator=gen)
        result = {
            "sd_lambda": sd_lambda,
            "easy_share": (cumulative[0] / cumulative.sum()).item(),
            "hard_share": (cumulative[1] / cumulative.sum()).item(),
            "accuracy": branch_accuracy(model(easy_x, hard_x), y),
            "accuracy_easy_branch_alone": branch_accuracy(model.easy(easy_x), y),
            "accuracy_hard_branch_alone": branch_accuracy(model.hard(hard_x), y),
            "accuracy_easy_feature_scrambled": branch_accuracy(model(easy_x[shuffled], hard_x), y),
            "history": history,
        }
    return result


# ---- the study ------------------------------------------------------------------------------------------

def run(workload_factory=DEFAULT, *, steps: int | None = None, lrs=None, seed: int = 0, quick: bool = False,
        out=None, show_progress: bool = False, **options) -> dict:
    """Part 1 on ``workload_factory(seed)`` (``lrs[0]``, if given, replaces the recipe's lr), part 2 on its
    synthetic two-feature task (``starvation_steps``, ``starvation_width``, ``sd_lambda``; 200 steps when
    ``quick``)."""
    factory = factory_of(workload_factory)
    lrs = check_common(steps, lrs, seed)
    opts = study_options(NAME, options, OPTIONS)
    if quick:
        opts.update({k: v for k, v in QUICK.items() if options.get(k) is None})
    workload = factory(seed)
    steps = steps or (max(1, workload.recipe.steps // 4) if quick else workload.recipe.steps)
    lr = lrs[0] if lrs else workload.recipe.lr
    part1 = workload_dosage(workload, steps, lr, show_progress)
    part2 = [starvation_run(seed, opts["starvation_width"], opts["starvation_steps"], workload.device, lam,
                            show_progress) for lam in (0.0, opts["sd_lambda"])]
    cfg = config(factory, workload, steps=steps, seed=seed, lr=lr, quick=quick, **opts)
    results = {"study": NAME, "question": QUESTION, "config": cfg, "workload": part1, "starvation": part2}
    out = run_dir(out)
    if out is not None:
        out.csv("dosage_blocks.csv", part1["history"])
        out.csv("dosage_units.csv", [{"layer": n, "rank": r, "dose": d} for n, u in part1["units"].items()
                                     for r, d in enumerate(u["sorted_dose"])])
        out.csv("starvation.csv", [{k: v for k, v in r.items() if k != "history"} for r in part2])
        figures(part1, part2, cfg, out)
        out.text("report.md", report(part1, part2, cfg))
    return results


def figures(part1: dict, part2: list[dict], cfg: dict, out: RunDir) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [h["step"] for h in part1["history"]]
    shares = part1["block_share"]
    shown = sorted(shares, key=shares.get, reverse=True)[:10]
    for name in shown:
        axes[0].plot(steps, [h[f"share_{name}"] for h in part1["history"]], label=name)
    axes[0].set(xlabel="step", ylabel="cumulative share of Σg²", title=f"dose per block ({cfg['workload']})")
    axes[0].legend(fontsize=7)
    for name, u in list(part1["units"].items())[:10]:
        dose = u["sorted_dose"]
        total = sum(dose) or 1.0
        axes[1].plot(range(1, len(dose) + 1), [max(d / total, 1e-300) for d in dose],
                     label=f"{name} (Gini {u['gini']:.2f})")
    axes[1].set(xlabel="unit rank", ylabel="share of the layer's dose", yscale="log", title="dose per unit")
    axes[1].legend(fontsize=7)
    for run_, style in zip(part2, ("-", "--")):
        hs = run_["history"]
        total = [h["easy_dose"] + h["hard_dose"] for h in hs]
        label = "plain" if not run_["sd_lambda"] else f"spectral decoupling λ={run_['sd_lambda']}"
        axes[2].plot([h["step"] for h in hs], [h["hard_dose"] / t for h, t in zip(hs, total)], style,
                     label=f"hard branch, {label}")
    axes[2].set(xlabel="step", ylabel="cumulative share of Σg²", title="starvation: the hard feature's dose")
    axes[2].legend()
    out.figure("dosage.png", fig)


def report(part1: dict, part2: list[dict], cfg: dict) -> str:
    from pyco.studies._common import metrics_text

    shares = part1["block_share"]
    numel = part1["block_numel"]
    total = sum(numel.values())
    top = max(shares, key=shares.get)
    lines = ["# Gradient dosage (seed 003)\n",
             f"Workload `{cfg['workload']}` ({part1['config']['steps']} steps of {part1['config']['optimizer']}, "
             f"held-out {metrics_text(part1['eval'])}):\n"]
    for name, share in shares.items():
        lines.append(f"- {name}: {share:.1%} of the cumulative squared gradient for "
                     f"{numel[name] / total:.1%} of the parameters")
    lines.append(f"\nThe largest dose went to {top} ({shares[top]:.1%}).")
    for name, u in part1["units"].items():
        lines.append(f"In module {name}, the top 10% of units received {u['top10pct_share']:.1%} of the layer's dose "
                     f"(Gini {u['gini']:.2f}; {u['dead_units']} units received none).")
    plain, sd = part2
    lines.append("\nGradient starvation (two features, each alone worth the same Bayes accuracy of 97.7%):\n")
    for r in part2:
        label = "without spectral decoupling" if not r["sd_lambda"] else f"with spectral decoupling (λ={r['sd_lambda']})"
        lines.append(f"- {label}: the easy branch received {r['easy_share']:.1%} of the dose, the hard branch "
                     f"{r['hard_share']:.1%}; accuracy {r['accuracy']:.1%}, hard branch alone "
                     f"{r['accuracy_hard_branch_alone']:.1%}, easy feature scrambled {r['accuracy_easy_feature_scrambled']:.1%}")
    change = sd["hard_share"] - plain["hard_share"]
    verdict = "starved" if plain["hard_share"] < 0.5 else "not starved"
    lines.append(f"\nWithout the penalty the hard feature's branch was {verdict} (share {plain['hard_share']:.1%}); "
                 f"spectral decoupling {'raised' if change > 0 else 'lowered'} its share by {abs(change):.1%} points and "
                 f"changed the accuracy that relies on it alone from {plain['accuracy_hard_branch_alone']:.1%} to "
                 f"{sd['accuracy_hard_branch_alone']:.1%}.")
    return "\n".join(lines) + "\n"
