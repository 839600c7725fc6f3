"""Times one optimizer step of pyco against torch.optim's implementations, side by side in one run.

Subjects: SGD with momentum and Adam over the parameter shapes of a 12-layer transformer (float32),
for torch's for-loop, foreach=True and fused=True implementations, pyco with and without per-block
statistics, and torch fused followed by the extra passes that give the same statistics. The machine's
bandwidth is measured in the same run (in-place ``a += b`` on arrays far larger than the caches,
12 bytes/element on a CPU; a device-to-device copy on a GPU). Rounds interleave the subjects so that
drift hits them alike; medians are reported.

    python benchmarks/bench_update.py                 # ~42M elements, table on stdout
    python benchmarks/bench_update.py --quick         # ~10M elements
    python benchmarks/bench_update.py --out benchmarks/results/cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import pyco

BYTES_PER_ELEMENT = {"adam": 28, "sgd": 20}  # fp32: Adam reads θ,g,m,v writes θ,m,v; SGD θ,g,b / θ,b


def transformer_shapes(layers: int, d: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-style transformer (tied embedding, pre-norm blocks)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def make_params(shapes, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(device))
        p.grad = torch.randn(s, generator=g).to(device)
        params.append(p)
    return params


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class TorchWithStats:
    """torch fused step plus the passes that give pyco's statistics (Σg², Σu², Σg·u, Σθ² over the model)."""

    def __init__(self, opt):
        self.opt = opt

    def step(self):
        params = [p for group in self.opt.param_groups for p in group["params"]]
        grads = [p.grad for p in params]
        before = torch._foreach_mul(params, 1.0)
        self.opt.step()
        update = torch._foreach_sub(params, before)
        stats = torch.stack([
            torch.stack(torch._foreach_norm(grads)).square().sum(),
            torch.stack(torch._foreach_norm(update)).square().sum(),
            torch.stack([t.sum() for t in torch._foreach_mul(grads, update)]).sum(),
            torch.stack(torch._foreach_norm(before)).square().sum(),
        ])
        return stats


def subjects(rule: str, device):
    if rule == "adam":
        kw = dict(lr=1e-3)
        t, p = torch.optim.Adam, pyco.optim.Adam
    else:
        kw = dict(lr=1e-3, momentum=0.9)
        t, p = torch.optim.SGD, pyco.optim.SGD
    out = {
        "torch for-loop": lambda ps: t(ps, foreach=False, **kw),
        "torch foreach": lambda ps: t(ps, foreach=True, **kw),
        "torch fused": lambda ps: t(ps, fused=True, **kw),
        "torch fused + stats passes": lambda ps: TorchWithStats(t(ps, fused=True, **kw)),
    }
    if device.type == "cpu":  # pyco's CUDA kernels are a separate piece of work
        out["pyco"] = lambda ps: p(ps, stats=False, **kw)
        out["pyco + stats"] = lambda ps: p(ps, stats=True, **kw)
    return out


def bandwidth_gbps(device, elements: int, repeats: int) -> float:
    a = torch.randn(elements, device=device)
    b = torch.randn(elements, device=device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            a.copy_(b)  # device-to-device copy: 8 bytes/element read + written
        else:
            a.add_(b)  # in-place add: reads a and b, writes a (12 bytes/element)
        sync(device)
        times.append(time.perf_counter() - t0)
    per = 8 if device.type == "cuda" else 12
    return per * elements / statistics.median(times[1:]) / 1e9


def run(args) -> dict:
    device = torch.device(args.device)
    d = 256 if args.quick else 512
    shapes = transformer_shapes(12, d, 8192)
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    result = {
        "benchmark": "update",
        "device": args.device if device.type == "cuda" else f"cpu: {platform.processor() or platform.machine()}",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyco": pyco.info(),
        "tensors": len(shapes),
        "elements": numel,
        "repeats": args.repeats,
        "rules": {},
    }
    bw_elems = max(4 * numel, 1 << 26)
    result["bandwidth_GBps"] = bandwidth_gbps(device, bw_elems, args.repeats)
    for rule in args.rules:
        params = make_params(shapes, device)
        opts = {name: make(params) for name, make in subjects(rule, device).items()}
        times = {name: [] for name in opts}
        for name, opt in opts.items():  # warm-up: state creation, first-touch of memory
            opt.step()
        for _ in range(args.repeats):
            for name, opt in opts.items():
                sync(device)
                t0 = time.perf_counter()
                opt.step()
                sync(device)
                times[name].append(time.perf_counter() - t0)
        rows = {}
        bytes_per = BYTES_PER_ELEMENT[rule]
        for name, ts in times.items():
            med = statistics.median(ts)
            gbps = bytes_per * numel / med / 1e9
            rows[name] = {
                "median_ms": med * 1e3,
                "min_ms": min(ts) * 1e3,
                "max_ms": max(ts) * 1e3,
                "GBps": gbps,
                "fraction_of_bandwidth": gbps / result["bandwidth_GBps"],
            }
        fastest = min(rows[n]["median_ms"] for n in rows if n.startswith("torch") and "stats" not in n)
        for name, row in rows.items():
            row["speedup_vs_fastest_torch"] = fastest / row["median_ms"]
        if "pyco" in rows:
            rows["pyco + stats"]["stats_overhead"] = rows["pyco + stats"]["median_ms"] / rows["pyco"]["median_ms"] - 1
            rows["pyco + stats"]["speedup_vs_torch_fused_plus_stats"] = (
                rows["torch fused + stats passes"]["median_ms"] / rows["pyco + stats"]["median_ms"])
        result["rules"][rule] = rows
        del opts, params
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(result: dict) -> str:
    lines = [
        f"{result['device_name']} | {result['threads']} threads | torch {result['torch']} | "
        f"{result['tensors']} tensors, {result['elements'] / 1e6:.1f}M float32 elements | "
        f"bandwidth {result['bandwidth_GBps']:.1f} GB/s | median of {result['repeats']}",
    ]
    for rule, rows in result["rules"].items():
        lines.append(f"\n{rule} ({BYTES_PER_ELEMENT[rule]} bytes/element)")
        lines.append(f"{'implementation':28s} {'ms/step':>9s} {'GB/s':>7s} {'of bw':>6s} {'vs fastest torch':>17s}")
        for name, r in rows.items():
            lines.append(f"{name:28s} {r['median_ms']:9.2f} {r['GBps']:7.1f} {r['fraction_of_bandwidth']:6.0%} "
                         f"{r['speedup_vs_fastest_torch']:16.2f}x")
        if "pyco + stats" in rows:
            r = rows["pyco + stats"]
            lines.append(f"statistics cost over the update alone: {r['stats_overhead']:+.1%}; "
                         f"pyco + stats vs torch fused + stats passes: {r['speedup_vs_torch_fused_plus_stats']:.2f}x")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--rules", nargs="+", default=["adam", "sgd"], choices=["adam", "sgd"])
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per implementation (default 15)")
    parser.add_argument("--quick", action="store_true", help="d_model 256 (~10M elements) instead of 512 (~42M)")
    parser.add_argument("--out", help="write the results as JSON to this path")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 for a median")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    result = run(args)
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
