"""What the benchmark scripts share: naming the machine they ran on, printing and writing results."""

from __future__ import annotations

import argparse
import json
import platform
import statistics


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device) -> dict:
    """What every result file starts with: the device the run used, its name, torch's threads and versions."""
    import torch

    import pyco

    device = torch.device(device)
    return {
        "device": str(device) if device.type == "cuda" else f"cpu: {platform.processor() or platform.machine()}",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pyco": pyco.info(),
    }


def parse(doc: str, add_arguments, argv, *, count: str, quick: dict) -> argparse.Namespace:
    """Parses a benchmark's command line: ``--quick`` sets the attributes in ``quick``; the attribute named
    ``count`` (timed steps or rounds per subject) must be at least 3, for a median; ``--threads``, where the
    script has it, is handed to torch.set_num_threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    if getattr(args, count) < 3:
        parser.error(f"--{count} must be at least 3 for a median")
    import torch

    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return args


def report(result: dict, table: str, out: str | None) -> int:
    """Prints the table and, given a path, writes the results as JSON there. Returns the exit status."""
    print(table)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {out}")
    return 0


def time_round(steps: dict, times: dict, device) -> None:
    """One interleaved round: each subject of ``steps`` (name -> zero-argument callable) once, its wall time
    appended to ``times[name]``, the device synchronised before and after each."""
    import time

    import torch

    for name, step in steps.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name].append(time.perf_counter() - t0)


COUPLED_EVERY = (1, 10, 100)


def coupled_every(solve: list[float], reuse: list[float], base: list[float], everies=COUPLED_EVERY) -> dict:
    """pyco.Coupled at ``every`` = N as a multiple of the base step: one solving step and N − 1 reusing ones
    per N steps, (solve + (N − 1)·reuse) / N, from the timings of the two kinds of step in the same rounds as
    the base. Ratio of medians, and the range of the per-round ratios."""
    out = {}
    for n in everies:
        per_round = [(s + (n - 1) * r) / n / b for s, r, b in zip(solve, reuse, base)]
        amortised = (statistics.median(solve) + (n - 1) * statistics.median(reuse)) / n
        out[str(n)] = {"ratio": amortised / statistics.median(base), "ratio_min": min(per_round),
                       "ratio_max": max(per_round)}
    return out
