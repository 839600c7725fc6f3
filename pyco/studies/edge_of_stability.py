"""Does full-batch gradient descent train at the edge of stability? Cohen et al. 2021, "Gradient Descent on
Neural Networks Typically Occurs at the Edge of Stability" (their Figure 1), reproduced on a workload.

Gradient descent with step η is stable on a quadratic only while its curvature stays below 2/η. Cohen et
al. found that on neural networks the sharpness λ_max (the top eigenvalue of the training loss's Hessian)
first rises ("progressive sharpening") until it reaches 2/η, then hovers at or just above 2/η while the
loss keeps falling, though not monotonically. The study measures that:

- **Data**: the first ``examples`` examples drawn from the training batches of the first seed's workload,
  the same examples for every seed (the seed moves the initialisation only, as in Cohen's runs). The
  batches must be ``(inputs, class targets)``: a floating-point input tensor and a 1-D integer tensor of
  class indices; the model maps the inputs to one score per class.
- **Loss**: Cohen's square loss against one-hot targets e_y, L(θ) = 1/(2n) Σ_i ‖f(x_i; θ) − e_{y_i}‖²
  (half the mean over examples of the squared error summed over classes: their ``SquaredLoss`` divided by
  n), in float64.
- **Network**: the workload's model with a smooth activation (``activation``, default tanh, passed to the
  factory when it takes that option; otherwise the workload runs as given). ``init="pytorch"`` (the
  default) re-initialises every layer with its own ``reset_parameters()`` (PyTorch's default
  initialisation, which Cohen's networks use), drawn from the seed; ``init="workload"`` keeps the
  factory's initialisation.
- **Optimiser**: plain full-batch gradient descent, θ ← θ − η∇L(θ) (``torch.optim.SGD``, no momentum, no
  weight decay), ``steps`` steps at each learning rate η of ``lrs``.
- **Sharpness**: λ_max of ∇²L every ``every`` steps, by Lanczos (scipy's ``eigsh``, the largest algebraic
  eigenvalue) on exact Hessian-vector products (double backward through the full batch), warm-started
  from the previous top eigenvector.

Per learning rate, over seeds (``results["summary"]``): ``sharpness_ratio/lr=η``, the mean of λ_max·η/2
over the measurements in the final 20% of steps (1 is the edge); ``final_train_loss/lr=η``;
``steps_to_edge/lr=η``, the first measured step with λ_max ≥ 2/η (to within ``every`` steps; present
only when every seed got there); ``peak_sharpness_ratio/lr=η``; ``final_sharpness/lr=η`` and
``sharpening/lr=η`` (last λ_max minus the first, per seed); ``final_stretch_loss_change/lr=η`` (loss
at the end minus at 80% of the steps); ``loss_rise_fraction/lr=η`` (the share of steps in the final 20%
on which the loss rose); and ``initial_sharpness``.

``quick`` (the default): 1,000 examples, 600 steps, η ∈ {0.4, 0.5, 0.6}, 3 seeds. ``full``: 1,300
examples, 1,500 steps, η ∈ {0.3, 0.4, 0.5, 0.6}, 5 seeds.
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch
from torch import nn

from pyco.studies import claims, tables
from pyco.studies._common import (RunDir, check_common, config, factory_of, options as study_options, progress,
                                  pyplot, results as study_results, run_dir, seed_list, size, keep)
from pyco.studies.intervals import Summary, t_interval
from pyco.studies.workload import WorkloadError, WorkloadFactory, load as load_workload
from pyco.studies.workloads import DEFAULT
from pyco.studies.workloads._common import seeded

NAME = "edge-of-stability"
QUESTION = ("question 002: how large may gradient descent's step be? Does full-batch gradient descent's "
            "sharpness rise to 2/η and hover there, the loss still falling (Cohen et al. 2021)?")

OPTIONS = dict(examples=1000, every=10, activation="tanh", init="pytorch", threads=1, band=(0.8, 1.25))
QUICK = dict(steps=600, lrs=(0.4, 0.5, 0.6))
FULL = dict(steps=1500, lrs=(0.3, 0.4, 0.5, 0.6), examples=1300)
INITS = ("pytorch", "workload")
TAIL = 0.2  # the final share of the steps over which "settled" quantities are measured
DIVERGED = 1e3  # a loss this many times the initial one has diverged (at the edge it spikes by a few times)


def run(workload_factory=DEFAULT, *, steps: int | None = None, lrs=None, seed: int = 0, seeds: int | None = None,
        quick: bool = False, full: bool = False, out=None, show_progress: bool = False, **options) -> dict:
    """Full-batch gradient descent on ``examples`` training examples of ``workload_factory(s)`` for each seed
    s, at every learning rate of ``lrs``, for ``steps`` steps, measuring λ_max every ``every`` steps.

    Options: ``examples`` (default 1,000; 1,300 with ``full``), ``every`` (10), ``activation`` ("tanh"; "as-given"
    keeps the workload's own), ``init`` ("pytorch" or "workload"), ``threads`` (torch's CPU threads during the run,
    default 1: the matrices are small, and one thread was measured faster than two on a loaded 2-core
    machine; 0 keeps the current setting), ``band`` (the interval of λ_max·η/2 the report tests, default
    (0.8, 1.25))."""
    factory = factory_of(workload_factory)
    lrs = check_common(steps, lrs, seed)
    configuration = size(quick, full)
    opts = study_options(NAME, options, OPTIONS)
    preset = FULL if configuration == "full" else QUICK
    if configuration == "full" and options.get("examples") is None:
        opts["examples"] = FULL["examples"]
    steps = steps or preset["steps"]
    lrs = sorted(lrs or preset["lrs"])
    if opts["init"] not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {opts['init']!r}")
    for name in ("examples", "every"):
        if isinstance(opts[name], bool) or not isinstance(opts[name], int) or opts[name] < 1:
            raise ValueError(f"{name} must be an int >= 1, got {opts[name]!r}")
    lo, hi = opts["band"]
    if not 0 < lo < 1 < hi:
        raise ValueError(f"band must be (lo, hi) with 0 < lo < 1 < hi, got {opts['band']!r}")
    factory, applied = with_activation(factory, opts["activation"])
    seed_ids = seed_list(seed, seeds, full)
    with cpu_threads(opts["threads"]):
        first = factory(seed_ids[0])
        x, y = classification_data(first, opts["examples"])
        runs = []
        jobs = [(s, lr) for s in seed_ids for lr in lrs]
        models = {}
        for s, lr in progress(jobs, desc=f"{NAME}: seeds x learning rates", enabled=show_progress):
            if s not in models:
                models[s] = initial_model(first if s == seed_ids[0] else factory(s), opts["init"], s)
            runs.append({"seed": s, "lr": lr, **descend(copy.deepcopy(models[s]), x, y, lr, steps, opts["every"], s)})
            keep(out, "runs", runs[-1])
    summary = summarize(runs, lrs, seed_ids, steps)
    cfg = config(factory, first, seed=seed, seeds=seed_ids, steps=steps, lrs=lrs, examples=int(x.shape[0]),
                 classes=int(runs[0]["classes"]), every=opts["every"], activation=opts["activation"],
                 activation_applied=applied, init=opts["init"], threads=opts["threads"], band=[lo, hi],
                 configuration=configuration, loss="1/(2n) sum_i ||f(x_i) - onehot(y_i)||^2 (float64)",
                 optimizer="full-batch gradient descent (torch.optim.SGD, no momentum)")
    table = summary_rows(summary, lrs, seed_ids, runs)
    results = study_results(NAME, QUESTION, cfg, summary, table=table,
                            runs=[{k: v for k, v in r.items() if k != "classes"} for r in runs])
    out = run_dir(out)
    if out is not None:
        write(results, summary, out)
    return results


# ---- setting up -----------------------------------------------------------------------------------------

def with_activation(factory, activation):
    """The factory with ``activation=`` bound when it takes it and was not given one (True), else as given
    (False, or None when no activation was asked for)."""
    if activation in (None, "as-given"):
        return factory, None
    if "activation" in factory.options:
        return factory, factory.options["activation"] == activation
    try:  # loading the bare function checks its signature; the factory keeps its SPEC
        checked = load_workload(factory.make, **factory.options, activation=activation)
    except WorkloadError:
        return factory, False
    return WorkloadFactory(checked.make, factory.spec, checked.options), True


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's intra-op CPU threads set to ``n`` inside (0: unchanged), put back on exit."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _refuse(workload, why: str) -> WorkloadError:
    return WorkloadError(f"study {NAME!r} needs a classification workload whose training batches are (inputs, "
                         f"class targets): a floating-point input tensor and a 1-D integer tensor of class "
                         f"indices of the same length, the model giving one score per class; workload "
                         f"{workload.name!r} {why}")


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor {list(batch.shape)} {batch.dtype}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}: " + ", ".join(_describe(b) for b in batch)
    return f"a {type(batch).__name__}"


def classification_data(workload, examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``examples`` examples of one pass over the workload's training batches, (x float64, y),
    checked to be inputs and class targets (:class:`WorkloadError` naming what is needed otherwise)."""
    xs, ys, got = [], [], 0
    for batch in iter(workload.train_batches):
        ok = (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)
              and batch[0].is_floating_point() and batch[0].dim() >= 1 and not batch[1].is_floating_point()
              and not batch[1].is_complex() and batch[1].dtype != torch.bool and batch[1].dim() == 1
              and batch[1].shape[0] == batch[0].shape[0])
        if not ok:
            raise _refuse(workload, f"gives {_describe(batch)}")
        xs.append(batch[0])
        ys.append(batch[1])
        got += batch[1].shape[0]
        if got >= examples:
            break
    if got < 2:
        raise _refuse(workload, f"gives {got} training example(s); at least 2 are needed")
    x, y = torch.cat(xs)[:examples].double(), torch.cat(ys)[:examples].long()
    with torch.no_grad():
        scores = copy.deepcopy(workload.model).double()(x[:2])
    if scores.dim() != 2 or scores.shape[1] <= int(y.max()):
        raise _refuse(workload, f"has a model whose output is {list(scores.shape)} for 2 inputs, not one score "
                                f"for each of the {int(y.max()) + 1} classes")
    return x, y


def initial_model(workload, init: str, seed: int) -> nn.Module:
    """The workload's model in float64, re-initialised with PyTorch's defaults (drawn from ``seed``) when
    ``init`` is "pytorch"."""
    model = workload.model
    if init == "pytorch":
        with seeded(seed), torch.no_grad():
            for module in model.modules():
                if module is not model and callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()
    return model.double()


# ---- measuring ------------------------------------------------------------------------------------------

def square_loss(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cohen's square loss, 1/(2n) Σ_i ‖f(x_i) − t_i‖²."""
    return 0.5 * (model(x) - targets).pow(2).sum(1).mean()


def sharpness(loss: torch.Tensor, params: list[torch.Tensor], v0: np.ndarray, tol: float = 1e-3):
    """λ_max of the Hessian of ``loss`` w.r.t. ``params`` and its eigenvector: Lanczos (``eigsh``, largest
    algebraic) on Hessian-vector products, started from ``v0``."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    n = flat.numel()

    def hvp(v):
        v = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(-1), device=flat.device, dtype=flat.dtype)
        hv = torch.autograd.grad(flat, params, grad_outputs=v, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).cpu().numpy()

    operator = LinearOperator((n, n), matvec=hvp, dtype=np.float64)
    try:  # a small Krylov space suffices when started near the answer (the last eigenvector)
        values, vectors = eigsh(operator, k=1, which="LA", v0=v0, tol=tol, ncv=min(n, 4), maxiter=200)
    except ArpackNoConvergence:
        values, vectors = eigsh(operator, k=1, which="LA", v0=v0, tol=tol, ncv=min(n, 20))
    return float(values[0]), vectors[:, 0]


def descend(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, every: int, seed: int) -> dict:
    """``steps`` full-batch gradient-descent steps; the loss before every step and after the last, λ_max at
    steps 0, every, 2·every, ... and the last. A loss that turns non-finite or exceeds ``DIVERGED`` times the
    first stops the run (``diverged``, at step ``diverged_at``)."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        classes = model(x[:2]).shape[1]
    targets = nn.functional.one_hot(y, classes).double()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.0)
    n = sum(p.numel() for p in params)
    v0 = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    losses, measured, diverged = [], [], None
    for step in range(steps + 1):
        opt.zero_grad()
        loss = square_loss(model, x, targets)
        if not math.isfinite(loss.item()) or (losses and loss.item() > DIVERGED * losses[0]):
            diverged = step
            losses.append(math.nan)
            break
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            lam, v0 = sharpness(loss, params, v0)
            measured.append((step, lam))
        if step < steps:
            loss.backward()
            opt.step()
    return {"losses": losses, "sharpness_steps": [s for s, _ in measured], "sharpness": [v for _, v in measured],
            "diverged": diverged is not None, "diverged_at": diverged, "classes": classes}


def per_run(r: dict, steps: int) -> dict:
    """One run's numbers: the settled ratio over the final 20%, the first step at the edge and the rest."""
    lr, edge = r["lr"], 2 / r["lr"]
    nan = math.nan
    if r["diverged"]:
        return {"ratio": nan, "peak": nan, "final_loss": nan, "to_edge": None, "final_sharpness": nan,
                "initial": r["sharpness"][0] if r["sharpness"] else nan, "stretch_change": nan, "rises": nan}
    start = int(math.floor((1 - TAIL) * steps))
    tail = [v * lr / 2 for s, v in zip(r["sharpness_steps"], r["sharpness"]) if s >= start]
    losses = r["losses"]
    stretch = losses[start:]
    rises = sum(b > a for a, b in zip(stretch, stretch[1:])) / max(1, len(stretch) - 1)
    return {"ratio": sum(tail) / len(tail), "peak": max(r["sharpness"]) * lr / 2, "final_loss": losses[-1],
            "to_edge": next((s for s, v in zip(r["sharpness_steps"], r["sharpness"]) if v >= edge), None),
            "final_sharpness": r["sharpness"][-1], "initial": r["sharpness"][0],
            "stretch_change": losses[-1] - losses[start], "rises": rises}


def key(lr: float) -> str:
    return f"lr={lr:g}"


def summarize(runs: list[dict], lrs, seeds, steps: int) -> Summary:
    summary = Summary()
    numbers = {(r["seed"], r["lr"]): per_run(r, steps) for r in runs}
    summary.add("initial_sharpness", [numbers[(s, lrs[0])]["initial"] for s in seeds])
    for lr in lrs:
        got = [numbers[(s, lr)] for s in seeds]
        summary.add(f"sharpness_ratio/{key(lr)}", [g["ratio"] for g in got])
        summary.add(f"final_train_loss/{key(lr)}", [g["final_loss"] for g in got])
        if all(g["to_edge"] is not None for g in got):
            summary.add(f"steps_to_edge/{key(lr)}", [g["to_edge"] for g in got])
        summary.add(f"peak_sharpness_ratio/{key(lr)}", [g["peak"] for g in got])
        summary.add(f"final_sharpness/{key(lr)}", [g["final_sharpness"] for g in got])
        summary.add(f"sharpening/{key(lr)}", [g["final_sharpness"] for g in got], against=[g["initial"] for g in got])
        summary.add(f"final_stretch_loss_change/{key(lr)}", [g["stretch_change"] for g in got])
        summary.add(f"loss_rise_fraction/{key(lr)}", [g["rises"] for g in got])
    return summary


def summary_rows(summary: Summary, lrs, seeds, runs) -> list[dict]:
    """One row per learning rate: the estimates as "mean [lo, hi]" and how many seeds reached the edge."""
    rows = []
    for lr in lrs:
        mine = [r for r in runs if r["lr"] == lr]
        reached = sum(1 for r in mine if not r["diverged"] and any(v >= 2 / lr for v in r["sharpness"]))
        cell = lambda name, show=claims.number: (claims.ci(summary[name], show)  # noqa: E731
                                                 if name in summary else "—")
        rows.append({"lr": lr, "two_over_lr": 2 / lr, "seeds_at_edge": f"{reached}/{len(seeds)}",
                     "diverged": sum(r["diverged"] for r in mine),
                     "diverged_at": [r["diverged_at"] for r in mine if r["diverged"]],
                     "steps_to_edge": cell(f"steps_to_edge/{key(lr)}", lambda v: f"{v:.0f}"),
                     "sharpness_ratio": cell(f"sharpness_ratio/{key(lr)}"),
                     "peak_sharpness_ratio": cell(f"peak_sharpness_ratio/{key(lr)}"),
                     "final_train_loss": cell(f"final_train_loss/{key(lr)}"),
                     "loss_rise_fraction": cell(f"loss_rise_fraction/{key(lr)}", claims.percent)})
    return rows


# ---- outputs --------------------------------------------------------------------------------------------

def write(results: dict, summary: Summary, out: RunDir) -> None:
    runs = results["runs"]
    out.csv("sharpness.csv", [{"lr": r["lr"], "seed": r["seed"], "step": s, "time": s * r["lr"], "sharpness": v,
                               "sharpness_ratio": v * r["lr"] / 2}
                              for r in runs for s, v in zip(r["sharpness_steps"], r["sharpness"])])
    out.csv("loss.csv", [{"lr": r["lr"], "seed": r["seed"], "step": s, "time": s * r["lr"], "train_loss": v}
                         for r in runs for s, v in enumerate(r["losses"])])
    out.csv("summary.csv", results["table"])
    figures(runs, results["config"], out)
    out.text("report.md", report(results, summary))


def _band(ax, xs, columns, **kw):
    """The mean over seeds with its 95% band (Student's t at every x)."""
    ests = [t_interval(col) for col in columns]
    line, = ax.plot(xs, [e.mean for e in ests], **kw)
    ax.fill_between(xs, [e.lo if e.has_interval else e.mean for e in ests],
                    [e.hi if e.has_interval else e.mean for e in ests], color=line.get_color(), alpha=0.2, lw=0)
    return line


def _columns(runs: list[dict], field: str, steps_field: str | None = None):
    """(xs, per-x values over the runs that got there): a run that diverged drops out from where it stopped."""
    longest = max(runs, key=lambda r: len(r[field]))
    xs = longest[steps_field] if steps_field else list(range(len(longest[field])))
    columns = [[r[field][i] for r in runs if i < len(r[field]) and math.isfinite(r[field][i])]
               for i in range(len(xs))]
    kept = [(x, col) for x, col in zip(xs, columns) if col]
    return [x for x, _ in kept], [col for _, col in kept]


def figures(runs: list[dict], cfg: dict, out: RunDir) -> None:
    plt = pyplot()
    fig, (ax_loss, ax_sharp, ax_ratio) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for i, lr in enumerate(cfg["lrs"]):
        mine = [r for r in runs if r["lr"] == lr]
        color = f"C{i % 10}"
        xs, cols = _columns(mine, "losses")
        if xs:
            _band(ax_loss, xs, cols, color=color, lw=1, label=f"η = {lr:g}")
        xs, cols = _columns(mine, "sharpness", "sharpness_steps")
        if xs:
            _band(ax_sharp, xs, cols, color=color, lw=1, label=f"η = {lr:g}")
            _band(ax_ratio, xs, [[v * lr / 2 for v in col] for col in cols], color=color, lw=1, label=f"η = {lr:g}")
        ax_sharp.axhline(2 / lr, color=color, ls="--", lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss (square loss)", title="training loss")
    ax_loss.set_ylim(0, 1.5 * max(r["losses"][0] for r in runs))  # a diverging run does not flatten the rest
    ax_sharp.set(xlabel="step", ylabel="λ_max of the training-loss Hessian", title="sharpness; dashed: 2/η")
    ax_ratio.axhline(1.0, color="k", ls="--", lw=1)
    lo, hi = cfg["band"]
    ax_ratio.axhspan(lo, hi, color="0.9", zorder=0)
    ax_ratio.axvline((1 - TAIL) * cfg["steps"], color="0.5", ls=":", lw=1)
    ax_ratio.set(xlabel="step", ylabel="λ_max · η / 2",
                 title=f"relative to the edge; grey: [{lo:g}, {hi:g}]; dotted: start of the final {TAIL:.0%}")
    for ax in (ax_loss, ax_sharp, ax_ratio):
        ax.locator_params(axis="x", nbins=5)
        ax.title.set_fontsize(10)
    handles, labels = ax_sharp.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(cfg["lrs"]), fontsize=9)
    fig.suptitle(f"{cfg['workload']}: full-batch gradient descent, {cfg['examples']} examples, bands: 95% over "
                 f"{len(cfg['seeds'])} seeds", fontsize=10)
    out.figure("edge_of_stability.png", fig)


def report(results: dict, summary: Summary) -> str:
    cfg, rows = results["config"], results["table"]
    lo, hi = cfg["band"]
    n = len(cfg["seeds"])
    w = cfg["workload_summary"]
    if cfg["activation_applied"] is None:
        act = "its own activation"
    elif cfg["activation_applied"]:
        act = f"{cfg['activation']} activations"
    else:
        act = (f"its own activation (the factory takes no activation option, or was given another: the study's "
               f"{cfg['activation']} was not applied)")
    options = "".join(f", {k}={v}" for k, v in cfg["workload_options"].items())
    initial = summary["initial_sharpness"]
    init = ("re-initialised with PyTorch's default initialisation (each layer's reset_parameters(), as in Cohen's "
            "networks)" if cfg["init"] == "pytorch" else "with the workload's own initialisation")
    lines = [
        "# Edge of stability: does gradient descent's sharpness rise to 2/η and hover there?\n",
        f"The question: {QUESTION.split(': ', 1)[1]} A reproduction of Cohen et al. 2021, Figure 1.\n",
        f"Workload `{cfg['workload']}` ({w['parameters']} parameters{options}) with {act}, {init}. Full-batch "
        f"gradient descent (no momentum) on the first {cfg['examples']} training examples, {cfg['steps']} steps, "
        f"square loss 1/(2n) Σ‖f(x) − onehot(y)‖² over {cfg['classes']} classes, in float64; λ_max (Lanczos on "
        f"exact Hessian-vector products) every {cfg['every']} steps. Every number is a mean over n = {n} seeds "
        f"(seeds {', '.join(map(str, cfg['seeds']))}) with its 95% interval; \"settled\" means over the final "
        f"{TAIL:.0%} of the steps.\n",
        "![Training loss, sharpness λ_max with 2/η dashed, and λ_max·η/2, against step, per learning rate]"
        "(edge_of_stability.png)\n",
        tables.markdown(["η", "2/η", "seeds that reached 2/η", "diverged", "first step at 2/η",
                         "settled λ_max·η/2", "peak λ_max·η/2", "final training loss",
                         "steps the loss rose (final 20%)"],
                        [[f"{r['lr']:g}", claims.number(r["two_over_lr"]), r["seeds_at_edge"], r["diverged"],
                          r["steps_to_edge"], r["sharpness_ratio"], r["peak_sharpness_ratio"],
                          r["final_train_loss"], r["loss_rise_fraction"]] for r in rows]),
        f"λ_max at initialisation: {claims.ci(initial)} ({claims.seeds(initial)}).\n",
        "## Per learning rate\n",
    ]
    for r in rows:
        lr = r["lr"]
        ratio = summary[f"sharpness_ratio/{key(lr)}"]
        quantity = f"settled λ_max·η/2 at η = {lr:g}"
        sentence = claims.within(ratio, lo, hi, quantity=quantity)
        start = claims.below(summary["initial_sharpness"], 2 / lr, quantity="λ_max at initialisation") + "."
        if r["diverged"]:
            at = ", ".join(map(str, r["diverged_at"]))
            who = "every seed" if r["diverged"] == n else f"{r['diverged']} of {n} seeds"
            lines.append(f"- **η = {lr:g}** (2/η = {claims.number(2 / lr)}): {who} diverged, the loss non-finite or "
                         f"a thousandfold its first value (at step{'s' * (r['diverged'] > 1)} {at}); a diverged seed is not averaged away, so "
                         f"no settled value has an interval here. {_capital(start)}")
            continue
        parts = [sentence + ".", _edge_sentence(summary, r), start]
        parts.append(claims.sign(summary[f"final_stretch_loss_change/{key(lr)}"],
                                 quantity="the loss change over the final 20% of steps",
                                 positive="the loss rose", negative="the loss kept falling") + "; "
                     + claims.below(summary[f"loss_rise_fraction/{key(lr)}"], 0.0,
                                    quantity="the share of those steps on which the loss rose",
                                    show=claims.percent) + ".")
        if _side(ratio, lo, hi) != "within":
            parts.append(_why(summary, r, lo, hi))
        lines.append(f"- **η = {lr:g}** (2/η = {claims.number(2 / lr)}): " + " ".join(_capital(p) for p in parts))
    lines.append("\n## Verdict\n")
    lines.append(verdict(summary, rows, lo, hi, n))
    return "\n".join(lines) + "\n"


def _capital(sentence: str) -> str:
    """The sentence with a capital first letter (a Latin one only: λ_max stays λ_max)."""
    return sentence[:1].upper() + sentence[1:] if sentence[:1].isascii() else sentence


def _edge_sentence(summary: Summary, row: dict) -> str:
    name = f"steps_to_edge/{key(row['lr'])}"
    if name in summary:
        return (f"Every seed's λ_max reached 2/η, first at step {claims.ci(summary[name], lambda v: f'{v:.0f}')} "
                f"({claims.seeds(summary[name])}).")
    return f"λ_max reached 2/η in {row['seeds_at_edge']} seeds."


def _why(summary: Summary, row: dict, lo: float, hi: float) -> str:
    """What the run measured about a settled ratio outside the band: the trajectory of λ_max."""
    lr = row["lr"]
    sharpening = claims.sign(summary[f"sharpening/{key(lr)}"], quantity="λ_max's change from the first to the last "
                             "measurement", positive="progressive sharpening", negative="the sharpness fell")
    return (f"Why: λ_max went from {claims.ci(summary['initial_sharpness'])} at initialisation to "
            f"{claims.ci(summary[f'final_sharpness/{key(lr)}'])} at the last step, against 2/η = "
            f"{claims.number(2 / lr)}; {sharpening}.")


def _side(est, lo: float, hi: float) -> str:
    """Where an estimate's interval lies against [lo, hi], as :func:`claims.within` decides it: "within",
    "outside" or "undecided"."""
    sentence = claims.within(est, lo, hi, quantity="x")
    return "within" if " lay within " in sentence else "outside" if " lay outside " in sentence else "undecided"


def _start(summary: Summary, lr: float) -> str:
    """Where λ_max started against 2/η, as :func:`claims.below` decides it: "below", "above" or "undecided"."""
    sentence = claims.below(summary["initial_sharpness"], 2 / lr, quantity="x")
    return "below" if " was below " in sentence else "above" if " was above " in sentence else "undecided"


def verdict(summary: Summary, rows: list[dict], lo: float, hi: float, n: int) -> str:
    """Cohen et al.'s prediction, settled λ_max·η/2 in [lo, hi] once λ_max has reached 2/η, learning rate by
    learning rate; a learning rate at which some seed never reached 2/η did not test it."""
    lrs = [r["lr"] for r in rows]
    diverged = [r["lr"] for r in rows if r["diverged"]]
    tested = [lr for lr in lrs if f"steps_to_edge/{key(lr)}" in summary and lr not in diverged]
    sides = {lr: _side(summary[f"sharpness_ratio/{key(lr)}"], lo, hi) for lr in tested}
    named = lambda chosen: "{" + ", ".join(f"{lr:g}" for lr in chosen) + "}"  # noqa: E731
    of = lambda side: [lr for lr in tested if sides[lr] == side]  # noqa: E731
    parts = []
    if of("within"):
        parts.append(f"Cohen et al.'s prediction held at η ∈ {named(of('within'))}: every seed's λ_max reached "
                     f"2/η, and the settled λ_max·η/2's 95% interval lay within [{lo:g}, {hi:g}] (n = {n} seeds).")
        rose = [lr for lr in of("within") if _start(summary, lr) == "below"]
        fell = [lr for lr in of("within") if _start(summary, lr) == "above"]
        if rose:
            parts.append(f"At η ∈ {named(rose)} λ_max started below 2/η and rose to it (progressive sharpening).")
        if fell:
            parts.append(f"At η ∈ {named(fell)} it started above 2/η and came down to it: the edge was reached "
                         f"without progressive sharpening.")
    if of("outside"):
        parts.append(f"It failed at η ∈ {named(of('outside'))}: λ_max reached 2/η, but the settled interval lay "
                     f"outside [{lo:g}, {hi:g}].")
    if of("undecided"):
        parts.append(f"At η ∈ {named(of('undecided'))} {n} seeds did not decide it: the settled interval straddles "
                     f"the band's edge.")
    if diverged:
        parts.append(f"At η ∈ {named(diverged)} gradient descent diverged in some seeds (the loss became "
                     f"non-finite or grew a thousandfold), so the prediction was not tested there.")
    untested = [lr for lr in lrs if lr not in tested and lr not in diverged]
    if untested:
        parts.append(f"At η ∈ {named(untested)} λ_max did not reach 2/η in every seed within the budget, so the "
                     f"prediction was not tested there.")
    if not tested:
        parts.append("The prediction was not tested: at no learning rate did every seed's λ_max reach 2/η without "
                     "diverging.")
    elif not of("within"):
        parts.append("The prediction did not reproduce at any learning rate where it was tested.")
    if set(sides.values()) != {"within"} or untested or diverged:
        parts.append("The lines above give what the run measured where it did not hold.")
    return " ".join(parts)
