"""Question 001, "the features block n sees are not the ones it was optimized for": during real training, how
far do a block's input features move in one step, and how much does its gradient change once the blocks
below it have taken their step?

The gradient change is Santurkar et al.'s measure of internal covariate shift ("How Does Batch Normalization
Help Optimization?", 2018): for block i, G = ∇_{W_i}L at the current point θ_t on the step's batch, and G′
the same gradient after the blocks below i took their step (θ_{t+1} on the blocks below, θ_t on i and
above, the same batch); the study reports ‖G − G′‖ (their ℓ2 difference), ‖G − G′‖/‖G‖ and cos(G, G′).
They found that a network with batch norm has the same or a larger shift by this measure than one
without. "Below" is forward order: the order in which the modules owning the blocks' parameters first run.
Per recorded step and block, also:

- feature drift: ‖x_i(θ_{t+1}) − x_i(θ_t)‖ / ‖x_i(θ_t)‖, where x_i is the input of the first module of block
  i to run (token ids and other integer inputs do not drift);
- the second-order prediction of the gradient change, H_{i,<i}Δ_{<i} (a Hessian-vector product at θ_t):
  its cosine with the measured change G′ − G and its relative error.

Everything is computed in float64, on a copy of the model: the real training (float32) runs exactly as
without the study (its random state and batch-norm statistics are untouched). Each network trains with
its recipe's optimizer at one learning rate, the same for every network (the recipe's, or ``lrs[0]``);
``probes`` steps are recorded evenly in the first ``window`` (5%) of training (phase "init") and in its last
``window`` (phase "trained"). Per seed a measure is the mean over the recorded steps of a phase and the
blocks that have blocks below them; each network reports the mean over seeds with its 95% interval, and
batch norm is compared with plain by the interval of the per-seed differences (same seeds).

The networks: when the factory takes ``variant`` and ``depth`` (the built-in MLPs), every ``variants``
(plain, batchnorm) × ``depths`` (4, 8), a factory option given by the user fixing its own; otherwise the
workload as given. Its held-out loss and accuracy before and after training say whether each trained.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyco.probe._evaluation import rng_state, set_rng_state
from pyco.studies import claims, tables
from pyco.studies._common import (RunDir, check_common, closure_for, config, factory_of, fmt, options as study_options,
                                  progress, pyplot, results as study_results, run_dir, seed_list, size, keep, one_lr)
from pyco.studies.coadaptation import network, takes, training_check
from pyco.studies.intervals import Summary, t_interval
from pyco.studies.workload import cast_batch, load as load_workload
from pyco.studies.workloads import DEFAULT

NAME = "feature-drift"
QUESTION = ("question 001: how far do a block's input features and gradient move when the blocks below it move "
            "too (batch norm against plain)?")

OPTIONS = dict(depths=(4, 8), variants=("plain", "batchnorm"), probes=None, window=0.05, trained_drop=0.05)
PROBES = {"quick": 4, "full": 8}
PHASES = ("init", "trained")
# per-block measures averaged into the summary (blocks with blocks below them)
MEASURES = ("ics_cosine", "ics_l2", "ics_l2_relative", "feature_drift", "prediction_cosine", "prediction_error")


def run(workload_factory=DEFAULT, *, steps: int | None = None, lrs=None, seed: int = 0, seeds: int | None = None,
        quick: bool = False, full: bool = False, out=None, show_progress: bool = False, **options) -> dict:
    """Trains every network (see the module docstring) for each seed for ``steps`` (default: the recipe's
    budget) at one learning rate (``lrs[0]`` or the recipe's), measuring ``probes`` steps per phase."""
    factory = factory_of(workload_factory)
    lrs = check_common(steps, lrs, seed)
    lrs = one_lr(NAME, lrs, "trains every network at one learning rate, the same for batch norm and plain")
    mode = size(quick, full)
    opts = study_options(NAME, options, OPTIONS)
    seed_values = seed_list(seed, seeds, full)
    probes = opts["probes"] or PROBES[mode]
    nets = networks(factory, opts["variants"], opts["depths"])
    first = nets[0][1](seed)
    lr = lrs[0] if lrs else first.recipe.lr
    steps = steps or first.recipe.steps
    recorded = phase_steps(steps, probes, opts["window"])
    runs = []
    jobs = [(net, s) for net in nets for s in seed_values]
    for (label, net_factory, variant, depth), s in progress(jobs, desc=f"{NAME}: runs", enabled=show_progress):
        workload = first if not runs else net_factory(s)
        runs.append({"network": label, "variant": variant, "depth": depth, "seed": s,
                     **train_and_measure(workload, lr, steps, recorded, show_progress, opts["trained_drop"],
                                         desc=f"feature-drift: {label} seed {s}")})
        keep(out, "runs", runs[-1])
    summary = summarize(runs, nets)
    cfg = config(factory, first, networks=[n[0] for n in nets], steps=steps, lr=lr, seeds=seed_values, probes=probes,
                 window=opts["window"],
                 recorded_steps={p: [s for s, ps in recorded.items() if p in ps] for p in PHASES},
                 depths=sorted({n[3] for n in nets if n[3] is not None}), variants=sorted({n[2] for n in nets if n[2]}),
                 trained_drop=opts["trained_drop"], size=mode)
    rows = [{"network": r["network"], "seed": r["seed"], **row} for r in runs for row in r["rows"]]
    results = study_results(NAME, QUESTION, cfg, summary, rows=rows,
                            runs=[{k: v for k, v in r.items() if k != "rows"} for r in runs])
    out = run_dir(out)
    if out is not None:
        out.csv("feature_drift.csv", rows)
        out.csv("feature_drift_runs.csv", [{k: v for k, v in r.items() if k not in ("rows", "eval_init", "eval")}
                                           | {f"heldout_{k}": v for k, v in r["eval"].items()} for r in runs])
        figures(runs, cfg, out)
        out.text("report.md", report(runs, summary, nets, cfg))
    return results


# ---- the networks and the recorded steps ----------------------------------------------------------------

def networks(factory, variants, depths) -> list[tuple[str, object, str | None, int | None]]:
    """(name, factory, variant, depth) of every network: each variant × depth where the factory takes both
    options (one the user set fixes its own value), else the factory as given. Named like the summary's
    networks: workload name, variant unless plain, ``-depth<d>``."""
    names = takes(factory.make)
    if not {"variant", "depth"} <= names:
        return [(network(factory(0)), factory, None, None)]
    variants = [factory.options["variant"]] if "variant" in factory.options else list(variants)
    depths = [factory.options["depth"]] if "depth" in factory.options else list(depths)
    out = []
    for depth in depths:
        for variant in variants:
            f = load_workload(factory, variant=variant, depth=depth)
            out.append((f"{network(f(0))}-depth{depth}", f, variant, depth))
    return out


def spread(first: int, last: int, n: int) -> list[int]:
    if n <= 1 or first == last:
        return [first]
    return sorted({first + round(i * (last - first) / (n - 1)) for i in range(n)})


def phase_steps(steps: int, probes: int, window: float) -> dict[int, list[str]]:
    """step -> the phases it is recorded for: ``probes`` steps evenly over the first ``window`` of training
    (init) and over its last (trained); at least ``probes`` steps wide, so they may meet on a short run."""
    span = min(steps, max(probes, math.ceil(window * steps)))
    out: dict[int, list[str]] = {}
    for phase, chosen in (("init", spread(1, span, probes)), ("trained", spread(steps - span + 1, steps, probes))):
        for s in chosen:
            out.setdefault(s, []).append(phase)
    return out


def train_and_measure(workload, lr: float, steps: int, recorded: dict[int, list[str]], show: bool,
                      trained_drop: float, desc: str = "feature-drift") -> dict:
    """Trains with the recipe's optimizer at ``lr``; at each recorded step measures (in float64) and then
    takes the real step exactly as without measuring."""
    opt = workload.recipe.make(workload.model.parameters(), lr=lr)
    batches = workload.batches()
    eval_init = workload.evaluate()
    rows, losses = [], []
    for step in progress(range(1, steps + 1), desc=desc, enabled=show):
        batch = next(batches)
        closure = closure_for(workload, opt, batch)
        if step in recorded and (not losses or math.isfinite(losses[-1])):
            loss, measured = measured_step(workload, opt, closure, batch)
            rows += [{"phase": phase, "step": step, **r} for phase in recorded[step] for r in measured]
        else:
            loss = opt.step(closure).detach().item()
        losses.append(loss)
    eval_final = workload.evaluate()
    return {"lr": lr, "rows": rows, "losses": losses, "eval_init": eval_init, "eval": eval_final,
            **training_check(eval_init, eval_final, losses, trained_drop)}


# ---- one recorded step ----------------------------------------------------------------------------------

class Inputs:
    """Records, while inside, the input of each block: the first floating or integer tensor passed to the
    first module owning one of the block's parameters that runs; and the order in which blocks first run."""

    def __init__(self, model: nn.Module, blocks):
        self.owner = {}  # module -> block index
        for module in model.modules():
            for p in module.parameters(recurse=False):
                try:
                    self.owner.setdefault(module, blocks.index(p))
                except KeyError:
                    pass
        self.inputs: dict[int, torch.Tensor | None] = {}
        self.order: list[int] = []

    def hook(self, module, args):
        b = self.owner.get(module)
        if b is None or b in self.inputs:
            return
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.inputs[b] = None if x is None else x.detach().clone()
        self.order.append(b)

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self.hook) for m in self.owner]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    return (a @ b / (na * nb)).item() if na > 0 and nb > 0 else float("nan")


def drift(before, after) -> float:
    if before is None or after is None:
        return float("nan")
    if not before.is_floating_point():
        return 0.0 if torch.equal(before, after) else float("nan")
    norm = before.norm()
    return ((after - before).norm() / norm).item() if norm > 0 else float("nan")


def measured_step(workload, opt, closure, batch) -> tuple[float, list[dict]]:
    """Takes the real step ``opt.step(closure)`` and returns its loss and, per block in forward order, the
    measures of the module docstring at the point it started from. Attention runs on its math backend in the
    measurements: the prediction differentiates twice, which the fused kernels cannot."""
    model64, blocks64 = copy.deepcopy((workload.model, workload.blocks))  # θ_t, before the real step
    before_rng = rng_state()
    loss = opt.step(closure).detach().item()
    after_rng = rng_state()
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            rows = _measure(workload, model64.double(), blocks64, cast_batch(batch, torch.float64), before_rng)
    finally:
        set_rng_state(after_rng)
    return loss, rows


def _measure(workload, model, blocks, batch, rng) -> list[dict]:
    params = blocks.params()
    start = [p.detach().clone() for p in params]  # θ_t in float64
    end = [q.detach().to(torch.float64) for q in workload.blocks.params()]  # θ_{t+1}, exactly, in float64
    step = [b - a for a, b in zip(start, end)]
    members = [{id(p) for p in blocks[name]} for name in blocks.names]

    def loss():
        set_rng_state(rng)  # the real step's random draws (dropout masks)
        return workload.loss(batch, model)

    def inputs():
        with Inputs(model, blocks) as rec, torch.no_grad():
            loss()
        return rec.inputs, rec.order

    def flat(tensors, b):
        return torch.cat([t.reshape(-1) for t, p in zip(tensors, params) if id(p) in members[b]])

    def grads(of, **kw):
        out = torch.autograd.grad(loss(), of, allow_unused=True, **kw)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(of, out)]

    def load(values, which=None):
        with torch.no_grad():
            for i, (p, v) in enumerate(zip(params, values)):
                if which is None or i in which:
                    p.copy_(v)

    x_before, order = inputs()
    order += [b for b in range(len(blocks)) if b not in order]  # blocks whose modules never ran: last
    g = grads(params, create_graph=True)
    index = {b: [i for i, p in enumerate(params) if id(p) in members[b]] for b in range(len(blocks))}
    # the second-order prediction H_{i,<i}·Δ_{<i}: one Hessian-vector product per block, at θ_t
    predicted = {}
    live = [i for i, t in enumerate(g) if t.requires_grad]
    for pos, b in enumerate(order[1:], start=1):
        below = {i for c in order[:pos] for i in index[c]}
        tangent = [step[i] if i in below else torch.zeros_like(step[i]) for i in live]
        hv = torch.autograd.grad([g[i] for i in live], params, grad_outputs=tangent, retain_graph=True,
                                 allow_unused=True)
        predicted[b] = flat([torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)], b).detach()
    g = [t.detach() for t in g]
    del live
    # feature drift: the blocks' inputs after the whole step
    load(end)
    x_after, _ = inputs()
    # G′: block b's gradient with the blocks below it moved, in forward order
    load(start)
    rows = []
    for pos, b in enumerate(order):
        mine = [params[i] for i in index[b]]
        shifted = torch.cat([t.reshape(-1) for t in grads(mine)]) if pos else flat(g, b)
        load(end, set(index[b]))  # then block b takes its step, for the blocks above it
        g_b = flat(g, b)
        change = shifted - g_b
        norm = g_b.norm().item()
        row = {"block": blocks.names[b], "position": pos, "grad_norm": norm,
               "feature_drift": drift(x_before.get(b), x_after.get(b)),
               "ics_l2": change.norm().item(), "ics_l2_relative": change.norm().item() / norm if norm > 0 else math.nan,
               "ics_cosine": cosine(g_b, shifted)}
        if pos:
            pred = predicted[b]
            row.update(prediction_cosine=cosine(pred, change),
                       prediction_error=((pred - change).norm() / change.norm()).item() if change.norm() > 0
                       else math.nan)
        else:
            row.update(prediction_cosine=math.nan, prediction_error=math.nan)
        rows.append(row)
    return rows


# ---- over seeds -----------------------------------------------------------------------------------------

def per_seed(run: dict, phase: str, measure: str, reduce=None) -> float:
    """A run's measure in a phase: the mean (or ``reduce``) over its recorded steps and the blocks with
    blocks below them."""
    values = [r[measure] for r in run["rows"] if r["phase"] == phase and r["position"] > 0]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan
    return (reduce or (lambda v: sum(v) / len(v)))(values)


def summarize(runs: list[dict], nets) -> Summary:
    """Per network and phase, over seeds: every measure (mean over steps and blocks) and the smallest
    prediction cosine; per network the held-out accuracy and the change of the checked loss; per depth
    and phase, batch norm minus plain, paired by seed."""
    summary = Summary()
    by_net = {label: sorted((r for r in runs if r["network"] == label), key=lambda r: r["seed"]) for label, *_ in nets}
    for label, group in by_net.items():
        for phase in PHASES:
            for measure in MEASURES:
                summary.add(f"{measure}/{label}/{phase}", [per_seed(r, phase, measure) for r in group])
            summary.add(f"prediction_cosine_min/{label}/{phase}",
                        [per_seed(r, phase, "prediction_cosine", min) for r in group])
        summary.add(f"loss_change/{label}", [r["loss_final"] - r["loss_init"] for r in group])
        if all("accuracy" in r["eval"] for r in group):
            summary.add(f"heldout_accuracy/{label}", [r["eval"]["accuracy"] for r in group])
    for plain, bn in pairs(nets):
        for phase in PHASES:
            for measure in MEASURES:
                summary.add(f"{measure}_bn_minus_plain/{plain}/{phase}",
                            [per_seed(r, phase, measure) for r in by_net[bn]],
                            against=[per_seed(r, phase, measure) for r in by_net[plain]])
    return summary


def pairs(nets) -> list[tuple[str, str]]:
    """(plain network, batch-norm network) of each depth where both ran."""
    by = {(variant, depth): label for label, _, variant, depth in nets}
    return [(by[("plain", d)], by[("batchnorm", d)]) for (v, d) in by if v == "plain" and ("batchnorm", d) in by]


# ---- outputs --------------------------------------------------------------------------------------------

def figures(runs: list[dict], cfg: dict, out: RunDir) -> None:
    """Per depth (columns): ICS cosine, ICS ℓ2, feature drift and the prediction's cosine against the block's
    position, one line per network and phase: mean over seeds with its 95% band."""
    plt = pyplot()
    depths = sorted({r["depth"] for r in runs}, key=lambda d: (d is None, d))
    panels = (("ics_cosine", "cos(G, G′)", "linear"), ("ics_l2", "‖G − G′‖", "log"),
              ("feature_drift", "‖x′ − x‖ / ‖x‖", "log"), ("prediction_cosine", "cos(H·Δ_below, G′ − G)", "linear"))
    fig, axes = plt.subplots(len(panels), len(depths), figsize=(5.2 * len(depths), 2.8 * len(panels)), squeeze=False,
                             constrained_layout=True)
    labels = list(dict.fromkeys(r["network"] for r in runs))
    for col, depth in enumerate(depths):
        for row, (measure, title, scale) in enumerate(panels):
            ax = axes[row][col]
            for label in (x for x in labels if next(r for r in runs if r["network"] == x)["depth"] == depth):
                group = [r for r in runs if r["network"] == label]
                color = f"C{labels.index(label)}"
                positions = sorted({x["position"] for r in group for x in r["rows"] if x["position"] > 0})
                for phase, style in zip(PHASES, ("--", "-")):
                    centre, lo, hi = [], [], []
                    for pos in positions:
                        seeds = [[x[measure] for x in r["rows"] if x["phase"] == phase and x["position"] == pos]
                                 for r in group]
                        values = [sum(v) / len(v) if v else math.nan for v in seeds]
                        if scale == "log":  # spans decades: the interval of log10 over seeds
                            b = t_interval([math.log10(v) if v > 0 else math.nan for v in values])
                            centre.append(10 ** b.mean if math.isfinite(b.mean) else math.nan)
                            lo.append(10 ** b.lo if b.has_interval else math.nan)
                            hi.append(10 ** b.hi if b.has_interval else math.nan)
                        else:  # cosines: the band clipped to [-1, 1]
                            b = t_interval(values)
                            centre.append(b.mean)
                            lo.append(max(b.lo, -1.0) if b.has_interval else math.nan)
                            hi.append(min(b.hi, 1.0) if b.has_interval else math.nan)
                    if not positions:
                        continue
                    ax.plot(positions, centre, style, marker="o", ms=3, color=color, label=f"{label}, {phase}")
                    ax.fill_between(positions, lo, hi, color=color, alpha=0.15, lw=0)
            if scale == "log":
                ax.set_yscale("log")
            ax.set_title(f"{title}" + ("" if depth is None else f", depth {depth}")
                         + (" (geometric mean)" if scale == "log" else ""), fontsize=9)
            ax.set_xlabel("block position (forward order)")
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True, nbins=6))
    handles, names = [], []
    for ax in axes.flat:
        for h, name in zip(*ax.get_legend_handles_labels()):
            if name not in names:
                handles.append(h)
                names.append(name)
    fig.legend(handles, names, loc="outside right upper", fontsize=7,
               title=f"mean of {len(cfg['seeds'])} seeds,\n95% bands;\n-- init, — trained", title_fontsize=7)
    out.figure("feature_drift.png", fig)


def report(runs: list[dict], summary: Summary, nets, cfg: dict) -> str:
    w = cfg["workload_summary"]
    n = len(cfg["seeds"])
    steps = cfg["recorded_steps"]
    lines = ["# Feature drift and gradient shift during training (question 001)\n",
             f"Workload `{cfg['workload']}` ({w['description'] or str(w['parameters']) + ' parameters'}); "
             + (f"networks {', '.join(f'`{label}`' for label, *_ in nets)}, each" if len(nets) > 1 else
                f"network `{nets[0][0]}`") + f" trained {cfg['steps']} steps with "
             f"{w['recipe']['optimizer']} at lr {fmt(cfg['lr'])} (the same for every network), {n} seeds "
             f"({', '.join(map(str, cfg['seeds']))}). Recorded steps: init {steps['init']}, trained "
             f"{steps['trained']}. "
             "At each, in float64 on the step's batch, per block i with blocks below it (forward order): "
             "Santurkar et al.'s internal covariate shift, G = ∇_{W_i}L at θ_t against G′, the same gradient after "
             "the blocks below i took their real step (‖G − G′‖ and cos(G, G′)); the relative drift of the block's "
             "input features over the step; and the cosine of the second-order prediction H_(i,<i)·Δ_(<i) with "
             "the measured G′ − G. Per seed: the mean over a phase's recorded steps and blocks; then the mean over "
             f"seeds [95% interval, Student's t, n = {n}].\n",
             "Santurkar et al. (2018) found, by this measure during training, that networks with batch norm have "
             "the same or a larger gradient shift than networks without. What this run measured:\n"]
    table = []
    for label, *_ in nets:
        for phase in PHASES:
            cell = lambda m, show=claims.number: claims.ci(summary[f"{m}/{label}/{phase}"], show)  # noqa: E731
            table.append([label, phase, cell("ics_cosine"), cell("ics_l2"), cell("ics_l2_relative"),
                          cell("feature_drift"), cell("prediction_cosine"), cell("prediction_cosine_min"),
                          cell("prediction_error")])
    lines.append(tables.markdown(["network", "phase", "cos(G, G′)", "‖G − G′‖", "‖G − G′‖/‖G‖", "feature drift",
                                  "prediction cosine (mean)", "prediction cosine (smallest)", "prediction error"],
                                 table))
    trained = []
    for label, *_ in nets:
        group = [r for r in runs if r["network"] == label]
        acc = summary.get(f"heldout_accuracy/{label}")
        trained.append([label, group[0]["check"], claims.ci(summary[f"loss_change/{label}"], signed=True),
                        "n/a" if acc is None else claims.ci(acc, claims.percent),
                        f"{sum(r['trained'] for r in group)}/{len(group)}"])
    lines.append("Did each network train? (the checked loss must fall by "
                 f"{cfg['trained_drop']:.0%} of its initial value)\n")
    lines.append(tables.markdown(["network", "checked loss", "change (final − init)", "held-out accuracy",
                                  "seeds that trained"], trained))
    untrained = [row[0] for row in trained if not row[-1].startswith(f"{n}/")]
    if untrained:
        lines.append(f"**Flag:** {', '.join(f'`{u}`' for u in untrained)} did not train in every seed; their "
                     "trained-phase numbers describe a network that did not learn.\n")
    comparisons = pairs(nets)
    if comparisons:
        lines.append("Batch norm against plain, paired by seed (same seeds, same learning rate):\n")
        for plain, bn in comparisons:
            for phase in PHASES:
                say = lambda m, q: claims.difference(bn, plain, summary[f"{m}_bn_minus_plain/{plain}/{phase}"],  # noqa
                                                      quantity=q)
                lines.append(f"- {phase}: " + "; ".join([
                    say("ics_cosine", "gradient cosine cos(G, G′)"), say("ics_l2", "gradient shift ‖G − G′‖"),
                    say("ics_l2_relative", "relative gradient shift ‖G − G′‖/‖G‖"),
                    say("feature_drift", "input-feature drift")]) + ".")
        cells = [(plain, phase) for plain, _ in comparisons for phase in PHASES]
        for m, what in (("ics_cosine", "cos(G, G′)"), ("ics_l2", "‖G − G′‖"), ("ics_l2_relative", "‖G − G′‖/‖G‖")):
            signs = [summary[f"{m}_bn_minus_plain/{plain}/{phase}"].sign for plain, phase in cells]
            more, less = (signs.count(-1), signs.count(1)) if m == "ics_cosine" else (signs.count(1), signs.count(-1))
            lines.append(f"- By {what}, batch norm had measurably more gradient shift than plain in {more} of the "
                         f"{len(cells)} depth × phase comparisons, measurably less in {less}, and no measurable "
                         f"difference in {signs.count(0)}.")
        lines.append("")
        lines.append("A lower cos(G, G′) or a higher ‖G − G′‖ is more internal covariate shift in Santurkar et al.'s "
                     "sense; ‖G − G′‖ is in the units of each network's own gradient, ‖G − G′‖/‖G‖ is not.\n")
    else:
        lines.append("No batch-norm/plain pair ran (the factory does not take both `variant` and `depth`, or one of "
                     "them was fixed): no comparison is made.\n")
    low = [(label, phase, summary[f"prediction_cosine_min/{label}/{phase}"]) for label, *_ in nets for phase in PHASES]
    lines.append("The second-order prediction H_(i,<i)·Δ_(<i) of the gradient change, every network and phase: "
                 + "; ".join(f"`{label}` {phase}: " + claims.below(est, 0.9, quantity="its smallest cosine per seed")
                             for label, phase, est in low) + ".\n")
    lines.append("![feature drift and gradient shift](feature_drift.png)")
    return "\n".join(lines) + "\n"
