"""The cost of communicating, per workload: one step of each update order and one probe, as multiples of one
plain simultaneous training step of the same workload on the same batch, measured side by side in one run.

Subjects, each on its own copy of the workload's model with its own optimizer (the workload's recipe, pyco's
fused optimizers), all on one fixed training batch:

    simultaneous          the optimizer's own step: one forward and backward (the unit of every ratio)
    gauss-seidel          pyco.GaussSeidel, backward sweep: k forward and backward passes for k blocks
    gauss-seidel chain    pyco.ChainGaussSeidel (chains only): recomputes only the part of the chain that moved
    block-coord top       pyco.BlockCoordinate, only the last block active (backward stops at once)
    block-coord bottom    pyco.BlockCoordinate, only the first block active (a full backward)
    probe full C          pyco.probe.cross_terms, the k×k matrix C of a plain gradient step (float64, alone=False)
    probe rows            the same in mode="rows": one Hessian-vector product (float64, alone=False)
    record                pyco.probe.record of a real step: the step, full C and alone (float64), as the
                          coadaptation study records
    monitor               a step recorded by pyco.probe.Monitor (its defaults: full C in float64, no alone):
                          what a recorded step of a monitored training run costs
    coupled solve         a pyco.Coupled step that solves for the block scales (the probe's f and C of the
                          optimizer's proposal, the parameters' dtype, a k×k box-constrained solve)
    coupled reuse         a pyco.Coupled step that reuses its scales (every > 1, between solves)

``coupled`` per workload: Coupled at every = 1, 10, 100 as (solve + (every − 1)·reuse) / every, from the two
kinds of step timed in the same rounds.

Rounds interleave the subjects so that drift and other processes hit them alike; each ratio is the ratio of
medians, and its spread the range of the per-round ratios. The JSON names the threads and the load average
before and after each workload.

    python benchmarks/bench_workloads.py                               # the built-in workloads, cpu size
    python benchmarks/bench_workloads.py --out benchmarks/results/workloads-cpu.json
    python benchmarks/bench_workloads.py --workloads mnist1d-cnn mymodels:make --rounds 7
    python benchmarks/bench_workloads.py --quick                       # 3 rounds, no budget runs

With ``--budget-seeds N`` (default 3) the same run also trains each workload for its default budget (its
recipe: optimizer, learning rate, steps) from N seeds and reports its held-out metrics: mean and 95%
interval (Student's t over the seeds), the numbers the workloads' documentation quotes.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

import pyco
from bench_common import COUPLED_EVERY, coupled_every, time_round, machine, parse, report
from pyco.studies import load_workload, workloads
from pyco.studies.intervals import t_interval
from pyco.studies.workload import map_tensors

SUBJECTS = ("simultaneous", "gauss-seidel", "gauss-seidel chain", "block-coord top", "block-coord bottom",
            "probe full C", "probe rows", "record", "monitor", "coupled solve", "coupled reuse")


def closure_for(workload, model, opt, batch):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = workload.loss(batch, model)
        loss.backward()
        return loss

    return closure


def subjects(workload, batch) -> dict:
    """name -> a function that runs one step (or one probe), each on its own copy of the model."""
    out = {}

    def copy_of():
        model, blocks = copy.deepcopy((workload.model, workload.blocks))
        return model, blocks, workload.recipe.make(model.parameters())

    model, blocks, opt = copy_of()
    out["simultaneous"] = (lambda m, o: lambda: o.step(closure_for(workload, m, o, batch)))(model, opt)

    model, blocks, opt = copy_of()
    gs = pyco.GaussSeidel(opt, blocks, sweep="backward", model=model)
    out["gauss-seidel"] = (lambda m, o: lambda: o.step(closure_for(workload, m, o, batch)))(model, gs)

    if workload.is_chain:
        model, blocks, opt = copy_of()
        chain = pyco.ChainGaussSeidel(opt, model, workload.chain_loss, blocks=blocks, sweep="backward")
        x, y = batch
        out["gauss-seidel chain"] = (lambda c: lambda: c.step(x, y))(chain)

    for name, which in (("block-coord top", -1), ("block-coord bottom", 0)):
        model, blocks, opt = copy_of()
        bc = pyco.BlockCoordinate(opt, blocks, active=0, always=[blocks.names[which]])
        out[name] = (lambda m, o: lambda: o.step(closure_for(workload, m, o, batch)))(model, bc)

    model, blocks, _ = copy_of()
    loss_fn = (lambda m: lambda: workload.loss(batch, m))(model)
    grads = torch.autograd.grad(loss_fn(), blocks.params())
    update = [-workload.recipe.lr * g for g in grads]
    # bound now: ``blocks`` is rebound below, and a probe of blocks the loss does not depend on costs nothing
    for name, mode in (("probe full C", "full"), ("probe rows", "rows")):
        out[name] = (lambda f, b, u, m: lambda: pyco.probe.cross_terms(f, b, u, mode=m, dtype=torch.float64,
                                                                        alone=False))(loss_fn, blocks, update, mode)

    model, blocks, opt = copy_of()
    out["record"] = (lambda m, b, o: lambda: pyco.probe.record(o, closure_for(workload, m, o, batch), b,
                                                                dtype=torch.float64))(model, blocks, opt)
    model, blocks, opt = copy_of()
    monitor = pyco.probe.Monitor(opt, blocks, every=1)  # every step recorded: the cost of a recorded step
    out["monitor"] = (lambda m, o, mon: lambda: mon.step(closure_for(workload, m, o, batch)))(model, opt, monitor)
    for name, every in (("coupled solve", 1), ("coupled reuse", 10 ** 9)):  # the reusing one solves at warm-up
        model, blocks, opt = copy_of()
        coupled = pyco.Coupled(opt, blocks, every=every, model=model)
        out[name] = (lambda m, o: lambda: o.step(closure_for(workload, m, o, batch)))(model, coupled)
    return {name: out[name] for name in SUBJECTS if name in out}


def time_workload(spec: str, args, device) -> dict:
    builtin = spec in workloads.names()
    factory = load_workload(spec, size=args.size, device=str(device)) if builtin else load_workload(spec)
    workload = factory(0)
    batch = next(workload.batches())
    load_before = os.getloadavg()[0]
    steps = subjects(workload, batch)
    for step in steps.values():  # warm-up: optimizer state, allocator, thread pools
        step()
    times = {name: [] for name in steps}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        time_round(steps, times, device)
    base = times["simultaneous"]
    rows = {}
    for name, ts in times.items():
        per_round = [t / b for t, b in zip(ts, base)]
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        rows[name] = {
            "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
            "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3, "times_ms": [t * 1e3 for t in ts],
            "ratio": statistics.median(ts) / statistics.median(base),
            "ratio_min": min(per_round), "ratio_max": max(per_round),
        }
    return {
        "workload": workload.name, "spec": factory.spec, "options": factory.options,
        "parameters": workload.parameters, "blocks": len(workload.blocks), "chain": workload.is_chain,
        "optimizer": f"pyco {workload.recipe.optimizer} lr {workload.recipe.lr}", "batch": describe_batch(batch),
        "load_average_before": load_before, "load_average_rounds": loads, "load_average_after": os.getloadavg()[0],
        "rows": rows,
        "coupled": coupled_every(times["coupled solve"], times["coupled reuse"], base),
    }


def interval(values: list[float]) -> dict:
    """Mean and 95% interval (Student's t) of the values, one per seed."""
    e = t_interval(values)
    return {"mean": e.mean, "low": e.lo, "high": e.hi, "values": list(values)}


def budget(spec: str, args, device) -> dict:
    """Trains the workload for its default budget from each seed; its held-out metrics over the seeds."""
    builtin = spec in workloads.names()
    factory = load_workload(spec, size=args.size, device=str(device)) if builtin else load_workload(spec)
    runs = []
    for seed in range(args.budget_seeds):
        workload = factory(seed)
        opt = workload.recipe.make(workload.model.parameters())
        batches = workload.batches()
        t0 = time.perf_counter()
        for _ in range(workload.recipe.steps):
            opt.step(closure_for(workload, workload.model, opt, next(batches)))
        runs.append({"seed": seed, "seconds": time.perf_counter() - t0, **workload.evaluate()})
    metrics = [k for k in runs[0] if k not in ("seed", "seconds")]
    return {"workload": workload.name, "spec": factory.spec, "parameters": workload.parameters,
            "recipe": workload.recipe.to_dict(), "runs": runs,
            "metrics": {k: interval([r[k] for r in runs]) for k in metrics},
            "median_seconds": statistics.median(r["seconds"] for r in runs)}


def describe_batch(batch) -> str:
    shapes = []
    map_tensors(batch, lambda t: shapes.append(f"{list(t.shape)} {str(t.dtype)[6:]}") or t)
    return ", ".join(shapes)


def run(args) -> dict:
    device = torch.device(args.device)
    result = {
        "benchmark": "workloads",
        **machine(device),
        "size": args.size,
        "rounds": args.rounds,
        "subjects": list(SUBJECTS),
        "load_average_before": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }
    result["workloads"] = [time_workload(spec, args, device) for spec in args.workloads]
    if args.budget_seeds:
        result["budget_seeds"] = args.budget_seeds
        result["budget"] = [budget(spec, args, device) for spec in args.workloads]
    result["load_average_after"] = os.getloadavg()[0]
    return result


def table(result: dict) -> str:
    lines = [
        f"{result['device_name']} | {result['threads']} threads | torch {result['torch']} | size {result['size']} | "
        f"median of {result['rounds']} rounds | load average {result['load_average_before']:.1f} -> "
        f"{result['load_average_after']:.1f} on {result['cpu_count']} cores",
        "",
        "one step of each order, and one probe, as a multiple of one simultaneous step (ratio of medians; "
        "range of the per-round ratios)",
        "",
        "| workload | params | k | simultaneous | " + " | ".join(SUBJECTS[1:]) + " |",
        "|---|---|---|---|" + "---|" * (len(SUBJECTS) - 1),
    ]
    for w in result["workloads"]:
        cells = []
        for name in SUBJECTS[1:]:
            row = w["rows"].get(name)
            cells.append("—" if row is None else f"{row['ratio']:.2g}× ({row['ratio_min']:.2g}–{row['ratio_max']:.2g})")
        sim = w["rows"]["simultaneous"]["median_ms"]
        lines.append(f"| {w['workload']} | {w['parameters']:,} | {w['blocks']} | {sim:.3g} ms | " + " | ".join(cells)
                     + " |")
    lines += ["", "pyco.Coupled at every = N, as a multiple of one simultaneous step: (solve + (N − 1)·reuse) / N", "",
              "| workload | " + " | ".join(f"every {n}" for n in COUPLED_EVERY) + " |",
              "|---|" + "---|" * len(COUPLED_EVERY)]
    for w in result["workloads"]:
        cells = [f"{c['ratio']:.2g}× ({c['ratio_min']:.2g}–{c['ratio_max']:.2g})"
                 for c in (w["coupled"][str(n)] for n in COUPLED_EVERY)]
        lines.append(f"| {w['workload']} | " + " | ".join(cells) + " |")
    if result.get("budget"):
        lines += ["", f"the default budget, {result['budget_seeds']} seeds: held-out metrics, mean [95% interval]", "",
                  "| workload | params | recipe | " + " | ".join(("accuracy", "bits per byte", "loss"))
                  + " | seconds (median) |", "|---|---|---|---|---|---|---|"]
        for b in result["budget"]:
            r = b["recipe"]
            cells = []
            for key, pct in (("accuracy", True), ("bits_per_byte", False), ("loss", False)):
                m = b["metrics"].get(key)
                cells.append("—" if m is None else (f"{m['mean']:.1%} [{m['low']:.1%}, {m['high']:.1%}]" if pct else
                                                    f"{m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"))
            lines.append(f"| {b['workload']} | {b['parameters']:,} | {r['optimizer']} lr {r['lr']:g}, {r['steps']} steps "
                         f"| " + " | ".join(cells) + f" | {b['median_seconds']:.0f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workloads", nargs="+", default=workloads.names(),
                        help="built-in workload names or module.path:function SPECs (default: every built-in)")
    parser.add_argument("--size", default="cpu", choices=("tiny", "cpu", "gpu"), help="built-in size (default cpu)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds over all subjects (default 5)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--budget-seeds", type=int, default=3,
                        help="also train each workload for its default budget from this many seeds (0: skip; "
                             "default 3)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, no budget runs")
    parser.add_argument("--out", help="write the results as JSON to this path")


def main(argv=None) -> int:
    args = parse(__doc__, add_arguments, argv, count="rounds", quick={"rounds": 3, "budget_seeds": 0})
    result = run(args)
    return report(result, table(result), args.out)


if __name__ == "__main__":
    sys.exit(main())
