"""Times one optimizer step of pyco against torch.optim's implementations, side by side in one run.

Subjects: SGD with momentum and Adam over float32 parameters, for torch's for-loop, foreach=True and
fused=True implementations, pyco with and without per-block statistics (its CPU or CUDA kernels, following
the device), and torch fused followed by the extra passes that give the same statistics. Shapes: those of
a GPT-style transformer (``--size`` sets the total, in realistic layer shapes), or many small tensors
(``--shapes small``: 2,000 tensors of 4K elements, where launch and host overheads dominate). The machine's
bandwidth is measured in the same run, on arrays far larger than the caches: on a CPU the faster of
torch's and pyco's in-place ``a += b`` (12 bytes/element), on a GPU a device-to-device copy (bytes read +
written). Rounds interleave
the subjects so that drift hits them alike (unless their optimizer states would not fit in GPU memory
together: then one subject after another); medians are reported.

    python benchmarks/bench_update.py                 # ~42M elements, table on stdout
    python benchmarks/bench_update.py --quick         # ~10M elements
    python benchmarks/bench_update.py --out benchmarks/results/cpu.json
    python benchmarks/bench_update.py --device cuda --size 1e9 --out benchmarks/results/cuda-1e9.json
    python benchmarks/bench_update.py --device cuda --shapes small --out benchmarks/results/cuda-small.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

import pyco
from bench_common import machine, parse, report

BYTES_PER_ELEMENT = {"adam": 28, "sgd": 20}  # fp32: Adam reads θ,g,m,v writes θ,m,v; SGD θ,g,b / θ,b


def transformer_shapes(layers: int, d: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-style transformer (tied embedding, pre-norm blocks)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def transformer_shapes_for(size: float) -> list[tuple[int, ...]]:
    """Transformer shapes of about ``size`` elements: the widest d_model with at least 12 layers, vocab 50257."""
    vocab = 50257
    for d in (8192, 4096, 2048, 1024, 512, 256, 128):
        per_layer = 12 * d * d + 13 * d
        layers = round((size - (vocab + 1024 + 2) * d) / per_layer)
        if layers >= 12 or d == 128:
            return transformer_shapes(max(1, layers), d, vocab)
    raise AssertionError("unreachable")


def shapes_for(args) -> list[tuple[int, ...]]:
    if args.shapes == "small":
        return [(args.tensor_numel,)] * args.tensors
    if args.size is not None:
        return transformer_shapes_for(args.size)
    return transformer_shapes(12, 256 if args.quick else 512, 8192)


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
    if device.type == "cpu" or pyco.info()["cuda_kernels"]:
        out["pyco"] = lambda ps: p(ps, stats=False, **kw)
        out["pyco + stats"] = lambda ps: p(ps, stats=True, **kw)
    return out


STATE_BUFFERS = {"adam": 2, "sgd": 1}  # optimizer state tensors per parameter (float32, like it)


def fits_together(device, numel: int, rule: str, count: int) -> bool:
    """Whether every subject's state fits in GPU memory at once, with the parameters and gradients and room for
    six full-size temporaries (torch's foreach intermediates, the stats passes' copies)."""
    if device.type != "cuda":
        return True
    need = 4 * numel * (2 + 6 + STATE_BUFFERS[rule] * count)
    return need < 0.8 * torch.cuda.get_device_properties(device).total_memory


def time_steps(opts: dict, device, repeats: int) -> dict[str, list[float]]:
    """Per subject, the wall time of each of `repeats` steps, in interleaved rounds (after a warm-up step
    each: state creation, first touch of memory, plan upload)."""
    times = {name: [] for name in opts}
    for opt in opts.values():
        opt.step()
    for _ in range(repeats):
        for name, opt in opts.items():
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def bandwidth_probes(device, elements: int, repeats: int) -> dict[str, float]:
    """GB/s of each way this run measures the memory bandwidth (median of `repeats`, after a warm-up).

    CPU: in-place ``a += b`` (reads a and b, writes a: 12 bytes/element) by torch, and by pyco's streaming
    loop (the update kernels' chunks, threads and prefetching; torch's loop does not prefetch, and on some
    machines reaches less than an optimizer step does). GPU: a device-to-device copy (8 bytes/element)."""
    a = torch.randn(elements, device=device)
    b = torch.randn(elements, device=device)
    if device.type == "cuda":
        probes = {"torch copy_": (8, lambda: a.copy_(b))}
    else:
        from pyco._ext import _C

        threads = torch.get_num_threads()
        probes = {
            "torch a.add_(b)": (12, lambda: a.add_(b)),
            "pyco stream_add": (12, lambda: _C.stream_add(a.data_ptr(), b.data_ptr(), elements, num_threads=threads)),
        }
    result = {}
    for name, (per, fn) in probes.items():
        times = []
        for _ in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        result[name] = per * elements / statistics.median(times[1:]) / 1e9
    return result


def run(args) -> dict:
    device = torch.device(args.device)
    shapes = shapes_for(args)
    numel = sum(math.prod(s) for s in shapes)
    result = {
        "benchmark": "update",
        **machine(device),
        "shapes": args.shapes,
        "tensors": len(shapes),
        "elements": numel,
        "repeats": args.repeats,
        "rules": {},
    }
    # Far larger than the caches (a GPU's L2 is up to ~100 MB): 2^26 elements at least, 2^28 on a GPU.
    bw_elems = min(max(4 * numel, 1 << (28 if device.type == "cuda" else 26)), 1 << 30)
    result["bandwidth_probes_GBps"] = bandwidth_probes(device, bw_elems, args.repeats)
    result["bandwidth_GBps"] = max(result["bandwidth_probes_GBps"].values())  # the best the memory gave
    for rule in args.rules:
        params = make_params(shapes, device)
        makers = subjects(rule, device)
        interleave = fits_together(device, numel, rule, len(makers))
        result.setdefault("interleaved", {})[rule] = interleave
        if interleave:
            times = time_steps({name: make(params) for name, make in makers.items()}, device, args.repeats)
        else:  # one subject at a time, its state freed before the next
            times = {}
            for name, make in makers.items():
                times.update(time_steps({name: make(params)}, device, args.repeats))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
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
        del params, times
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def table(result: dict) -> str:
    lines = [
        f"{result['device_name']} | {result['threads']} threads | torch {result['torch']} | "
        f"{result['tensors']} tensors ({result['shapes']}), {result['elements'] / 1e6:.1f}M float32 elements | "
        f"bandwidth {result['bandwidth_GBps']:.1f} GB/s ("
        + ", ".join(f"{name} {gbps:.1f}" for name, gbps in result["bandwidth_probes_GBps"].items())
        + f") | median of {result['repeats']}",
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
    parser.add_argument("--size", type=float, help="total elements in transformer shapes, e.g. 1e9 (default: "
                                                   "12 layers of d_model 512, or 256 with --quick)")
    parser.add_argument("--shapes", choices=["transformer", "small"], default="transformer",
                        help="transformer layers, or many small tensors (--tensors of --tensor-numel elements)")
    parser.add_argument("--tensors", type=int, default=2000, help="--shapes small: how many (default 2000)")
    parser.add_argument("--tensor-numel", type=int, default=4096, help="--shapes small: elements each (default 4096)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads, which pyco follows (default: torch's choice)")
    parser.add_argument("--out", help="write the results as JSON to this path")


def main(argv=None) -> int:
    args = parse(__doc__, add_arguments, argv, count="repeats", quick={})  # --quick: smaller shapes
    result = run(args)
    return report(result, table(result), args.out)


if __name__ == "__main__":
    sys.exit(main())
