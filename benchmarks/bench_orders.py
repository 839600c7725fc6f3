"""Times one step of each update order on MLP chains of k = 2..32 blocks, side by side in one run.

Subjects, each on its own copy of the model with its own optimizer (SGD with momentum, pyco's by default):

    simultaneous          the inner optimizer's own step (one forward + backward)
    gauss-seidel naive    pyco.GaussSeidel with a closure: k full forward + backward passes
    gauss-seidel chain    pyco.ChainGaussSeidel: recomputes only the part of the chain that moved
    block-coord top       pyco.BlockCoordinate with only the top block active (backward stops at once)
    block-coord bottom    pyco.BlockCoordinate with only the bottom block active (full backward, one weight grad)
    coupled solve         pyco.Coupled, a step that solves for the block scales (f and C by k Hessian-vector
                          products of the proposal, then a k×k box-constrained solve)
    coupled reuse         pyco.Coupled, a step that reuses its scales (every > 1, between solves)

Coupled at every = 1, 10, 100 is reported as (solve + (every − 1)·reuse) / every over simultaneous, from the two
kinds of step timed in the same rounds (per workload: benchmarks/bench_workloads.py).

A block is Linear(width, width) + tanh. Rounds interleave the subjects so that drift hits them alike; medians
are reported, with the ratios the project sets targets for (k >= 8: chain <= 0.6x naive, top-block
block-coordinate <= 0.6x simultaneous).

    python benchmarks/bench_orders.py                  # k = 2, 4, 8, 16, 32; table on stdout
    python benchmarks/bench_orders.py --quick          # fewer rounds, under two minutes on 2 cores
    python benchmarks/bench_orders.py --out benchmarks/results/orders-cpu.json
    python benchmarks/bench_orders.py --device cuda    # torch.optim.SGD inside if pyco was built without CUDA
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch
from torch import nn

import pyco
from bench_common import coupled_every, time_round, machine, parse, report

TARGET_FROM_K = 8
TARGETS = {"chain_vs_naive": 0.6, "top_vs_simultaneous": 0.6}


def chain(k: int, width: int, device, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(k):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(device)  # no tanh after the top layer


def inner_optimizer(name: str, params):
    if name == "pyco":
        return pyco.optim.SGD(params, lr=1e-3, momentum=0.9)
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def subjects(k: int, args, device, x, y) -> dict:
    """name -> a function that runs one step, each on its own copy of the same model."""
    base = chain(k, args.width, device)
    out = {}

    def with_copy(make_step):
        model = copy.deepcopy(base)
        return make_step(model, inner_optimizer(args.optimizer, model.parameters()))

    def simultaneous(model, opt):
        return lambda: opt.step(closure_for(model, opt, x, y))

    def naive(model, opt):
        gs = pyco.GaussSeidel(opt, pyco.blocks.by_module(model), "backward")
        return lambda: gs.step(closure_for(model, gs, x, y))

    def incremental(model, opt):
        gs = pyco.ChainGaussSeidel(opt, model, nn.functional.mse_loss, sweep="backward")
        return lambda: gs.step(x, y)

    def coordinate(which):
        def make(model, opt):
            blocks = pyco.blocks.by_module(model)
            bc = pyco.BlockCoordinate(opt, blocks, active=0, always=[blocks.names[which]])
            return lambda: bc.step(closure_for(model, bc, x, y))
        return make

    def coupled(every):
        def make(model, opt):
            c = pyco.Coupled(opt, pyco.blocks.by_module(model), every=every, model=model)
            return lambda: c.step(closure_for(model, c, x, y))
        return make

    for name, make in (("simultaneous", simultaneous), ("gauss-seidel naive", naive),
                       ("gauss-seidel chain", incremental), ("block-coord top", coordinate(-1)),
                       ("block-coord bottom", coordinate(0)), ("coupled solve", coupled(1)),
                       ("coupled reuse", coupled(10 ** 9))):  # the reusing one solves at warm-up
        out[name] = with_copy(make)
    return out


def time_k(k: int, args, device) -> dict:
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(args.batch, args.width, generator=gen).to(device)
    y = torch.randn(args.batch, args.width, generator=gen).to(device)
    steps = subjects(k, args, device, x, y)
    times = {name: [] for name in steps}
    for step in steps.values():  # warm-up: optimizer state, allocator, thread pools
        step()
        step()
    for _ in range(args.repeats):
        time_round(steps, times, device)
    rows = {name: {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3}
            for name, ts in times.items()}
    med = {name: row["median_ms"] for name, row in rows.items()}
    ratios = {
        "naive_vs_simultaneous": med["gauss-seidel naive"] / med["simultaneous"],
        "chain_vs_naive": med["gauss-seidel chain"] / med["gauss-seidel naive"],
        "chain_vs_simultaneous": med["gauss-seidel chain"] / med["simultaneous"],
        "top_vs_simultaneous": med["block-coord top"] / med["simultaneous"],
        "bottom_vs_simultaneous": med["block-coord bottom"] / med["simultaneous"],
    }
    ratios.update({f"coupled_every_{n}_vs_simultaneous": c["ratio"] for n, c in
                   coupled_every(times["coupled solve"], times["coupled reuse"], times["simultaneous"]).items()})
    return {"k": k, "rows": rows, "ratios": ratios}


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type != "cpu" and not pyco._ext.has_cuda_kernels():
        args.optimizer = "torch"  # this build of pyco has CPU kernels only
    result = {
        "benchmark": "orders",
        **machine(device),
        "optimizer": f"{args.optimizer} SGD(lr=1e-3, momentum=0.9)",
        "width": args.width,
        "batch": args.batch,
        "repeats": args.repeats,
        "load_average_before": os.getloadavg()[0],
    }
    # Other processes on the machine distort every subject alike within a round, not the medians' ratios much;
    # the load average before and after tells whether they were there.
    result["chains"] = [time_k(k, args, device) for k in args.k]
    result["load_average_after"] = os.getloadavg()[0]
    result["targets"] = check_targets(result["chains"])
    return result


def check_targets(chains: list[dict]) -> dict:
    out = {}
    for key, limit in TARGETS.items():
        worst = max((c["ratios"][key] for c in chains if c["k"] >= TARGET_FROM_K), default=None)
        out[key] = {"limit": limit, "from_k": TARGET_FROM_K, "worst": worst,
                    "met": None if worst is None else worst <= limit}
    return out


def table(result: dict) -> str:
    names = list(result["chains"][0]["rows"])
    lines = [
        f"{result['device_name']} | {result['threads']} threads | torch {result['torch']} | {result['optimizer']} | "
        f"blocks Linear({result['width']}, {result['width']}) + tanh, batch {result['batch']} | "
        f"median of {result['repeats']} | load average {result['load_average_before']:.1f} -> "
        f"{result['load_average_after']:.1f}",
        "",
        f"{'k':>3s} " + " ".join(f"{n:>19s}" for n in names) + f" {'chain/naive':>12s} {'top/simult':>11s}"
        + "".join(f" {'coupled/' + str(n):>12s}" for n in (1, 10, 100)),
    ]
    for c in result["chains"]:
        cells = " ".join(f"{c['rows'][n]['median_ms']:16.2f} ms" for n in names)
        lines.append(f"{c['k']:3d} {cells} {c['ratios']['chain_vs_naive']:11.2f}x "
                     f"{c['ratios']['top_vs_simultaneous']:10.2f}x"
                     + "".join(f" {c['ratios'][f'coupled_every_{n}_vs_simultaneous']:11.2f}x" for n in (1, 10, 100)))
    for key, t in result["targets"].items():
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        worst = "-" if t["worst"] is None else f"{t['worst']:.2f}"
        lines.append(f"target {key} <= {t['limit']} for k >= {t['from_k']}: worst {worst} -> {verdict}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="numbers of blocks")
    parser.add_argument("--width", type=int, default=256, help="width of every Linear (default 256)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--optimizer", choices=["pyco", "torch"], default="pyco",
                        help="inner SGD: pyco.optim (default) or torch.optim")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per subject (default 15)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="5 timed steps per subject (under two minutes)")
    parser.add_argument("--out", help="write the results as JSON to this path")


def main(argv=None) -> int:
    args = parse(__doc__, add_arguments, argv, count="repeats", quick={"repeats": 5})
    result = run(args)
    return report(result, table(result), args.out)


if __name__ == "__main__":
    sys.exit(main())
