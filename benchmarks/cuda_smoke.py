"""Smoke test of pyco's CUDA kernels against its CPU kernels, small enough to run under compute-sanitizer.

Every storage dtype (float32, float64, float16, bfloat16) x rule (SGD plain, with momentum + dampening +
weight decay, nesterov, maximize; Adam, AdamW, Adam amsgrad), on awkward tensors: views at a storage offset
of one element (parameter and gradient: no 16-byte alignment, the kernels' scalar path), odd sizes (1, 3,
4097, several chunks), an empty tensor, a transposed (non-contiguous) and a strided (non-dense) parameter;
one step unscales GradScaler-style (grad_scale on the device); statistics on. Two rules also run with
nonfinite="skip" and an inf in one step (the non-finite check kernel). Both sides start from the same values
and see the same gradients; after every step SGD must agree bitwise (parameters, unscaled gradients, state),
Adam within 2 ulps of the storage type (its bias corrections use the device's pow), the statistics to
rounding.

    python benchmarks/cuda_smoke.py                 # one line per case; exit status 1 on any mismatch
    python benchmarks/cuda_smoke.py --quick         # fewer steps and a smaller big tensor (sanitizers)
    python benchmarks/cuda_smoke.py --out smoke.json
    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/cuda_smoke.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import pyco

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
RULES = {
    "sgd": ("SGD", dict(lr=0.05)),
    "sgd-momentum": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "sgd-nesterov": ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1)),
    "sgd-maximize": ("SGD", dict(lr=0.05, momentum=0.9, maximize=True)),
    "adam": ("Adam", dict(lr=0.01, weight_decay=0.1)),
    "adamw": ("AdamW", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01)),
    "amsgrad": ("Adam", dict(lr=0.01, amsgrad=True, maximize=True)),
}
NONFINITE = ("sgd-momentum", "adam")  # also run with nonfinite="skip" and an inf in one step
SCALE = 256.0  # GradScaler-style scale of one step's gradients


def layouts(big: int):
    """(name, shape of the base tensor, view of the base that is the tensor)."""
    return [
        ("offset-1", (big + 1,), lambda t: t[1:]),
        ("odd-1", (1,), lambda t: t),
        ("odd-3", (3,), lambda t: t),
        ("odd-4097-offset-1", (4098,), lambda t: t[1:]),
        ("empty", (0,), lambda t: t),
        ("transposed", (65, 33), lambda t: t.t()),
        ("strided", (17, 10), lambda t: t[:, ::2]),
    ]


def twin_tensors(specs, dtype, gen, devices):
    """The same values, views and strides on each device: one list of tensors per device."""
    out = [[] for _ in devices]
    for _, shape, view in specs:
        values = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        for tensors, d in zip(out, devices):
            tensors.append(view(values.to(d, copy=True)))
    return out


def tolerance(dtype, exact: bool):
    if exact:
        return 0.0, 0.0
    tiny = {torch.float16: 2.0 ** -23, torch.bfloat16: 2.0 ** -132}.get(dtype, 1e-12)
    return 2 * torch.finfo(dtype).eps, tiny


INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def mismatch(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> str | None:
    """None when a (CUDA) matches b (CPU): bitwise for rtol = atol = 0 (NaN payloads and signed zeros
    included), else within rtol·|b| + atol (a NaN matching a NaN)."""
    a, b = a.detach().cpu(), b.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    if a.numel() == 0:
        return None
    x, y = a.reshape(-1), b.reshape(-1)
    if rtol == 0.0 and atol == 0.0:
        bad = x.view(INT_OF_SIZE[x.element_size()]) != y.view(INT_OF_SIZE[y.element_size()])
    else:
        x, y = x.double(), y.double()
        bad = ~(((x - y).abs() <= rtol * y.abs() + atol) | (torch.isnan(x) & torch.isnan(y)))
    if not bad.any():
        return None
    i = int(bad.nonzero()[0])
    return f"element {i}: CUDA {x[i].item()!r}, CPU {y[i].item()!r} ({int(bad.sum())} elements differ)"


def stats_mismatch(a: torch.Tensor, b: torch.Tensor, rtol: float) -> str | None:
    a = a.detach().cpu()
    for r in range(b.shape[0]):
        scale = float(b[r].abs().max()) * rtol + 1e-300
        worst = float((a[r] - b[r]).abs().max())
        if not worst <= scale:
            return f"statistics row {r}: CUDA {a[r].tolist()}, CPU {b[r].tolist()}"
    return None


def run_case(dtype, rule: str, steps: int, big: int, nonfinite: str, seed: int, device="cuda") -> tuple[bool, str]:
    """One case: `device` (CUDA) against the CPU; device="cpu" holds the CPU against itself, a check of this
    script."""
    kind, hyper = RULES[rule]
    specs = layouts(big)
    sides = (torch.device(device), torch.device("cpu"))  # 0: the side under test, 1: the CPU reference
    gen = torch.Generator().manual_seed(seed)
    params = [[torch.nn.Parameter(t) for t in ts] for ts in twin_tensors(specs, dtype, gen, sides)]
    assert params[0][0].data_ptr() % 16 != 0 and not params[0][5].is_contiguous()  # misaligned, strided
    opts = [getattr(pyco.optim, kind)(ps, nonfinite=nonfinite, **hyper) for ps in params]
    exact = kind == "SGD"
    rtol, atol = tolerance(dtype, exact)
    stats_rtol = 1e-12 if dtype == torch.float64 else 1e-5
    skipped_steps = 0
    for step in range(steps):
        scale = SCALE if step == 1 else 1.0
        for ps, grads in zip(params, twin_tensors(specs, dtype, gen, sides)):
            for p, g in zip(ps, grads):
                p.grad = g.mul_(scale)  # exact: a power of two
        poison = nonfinite == "skip" and step == 2
        if poison:
            for ps in params:
                ps[3].grad[5] = float("inf")
        if scale != 1.0:
            opts[0].grad_scale = torch.tensor(scale, device=sides[0])  # read on the device
            opts[1].grad_scale = scale
        for opt in opts:
            opt.step()
            opt.__dict__.pop("grad_scale", None)
        if sides[0].type == "cuda":
            torch.cuda.synchronize()
        where = f"step {step}"
        if poison:
            skipped_steps += 1
            if not bool(opts[0].last_stats.skipped):
                return False, f"{where}: an inf gradient, nonfinite='skip', but the CUDA step was not skipped"
        for (name, _, _), a, b in zip(specs, params[0], params[1]):
            problem = mismatch(a, b.detach(), rtol, atol)
            if problem:
                return False, f"{where}: param {name}: {problem}"
            problem = mismatch(a.grad, b.grad, 0.0, 0.0)
            if problem:
                return False, f"{where}: grad {name} (after unscaling): {problem}"
            for key, value in opts[1].state.get(b, {}).items():
                ours = opts[0].state[a][key]
                if key == "step":  # a counter: the same number (pyco keeps it on the parameter's device)
                    problem = None if float(ours) == float(value) else f"{float(ours)} vs {float(value)}"
                else:
                    problem = mismatch(ours, value, rtol, atol)
                if problem:
                    return False, f"{where}: state {key} of {name}: {problem}"
        problem = stats_mismatch(opts[0].last_stats.values, opts[1].last_stats.values, stats_rtol)
        if problem:
            return False, f"{where}: {problem}"
    how = "bitwise" if exact else f"within {rtol / torch.finfo(dtype).eps:.0f} ulp"
    return True, f"{steps} steps {how}, statistics to {stats_rtol:g}" + (
        f", {skipped_steps} skipped" if skipped_steps else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps, a big tensor of 2 chunks")
    parser.add_argument("--steps", type=int, help="steps per case (default 4, --quick 3)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES))
    parser.add_argument("--out", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_smoke: no CUDA GPU (torch.cuda.is_available() is False): nothing to test", file=sys.stderr)
        return 2
    if not pyco.info()["cuda_kernels"]:
        print("cuda_smoke: this build of pyco has no CUDA kernels (PYCO_CUDA=ON)", file=sys.stderr)
        return 1
    chunk = pyco._ext.cuda_kernels().CHUNK_ELEMS
    steps = args.steps or (3 if args.quick else 4)
    big = chunk + 7 if args.quick else 3 * chunk + 7
    results, failed = [], 0
    start = time.perf_counter()
    for dname in args.dtypes:
        for rule in args.rules:
            for nonfinite in ("apply", "skip") if rule in NONFINITE else ("apply",):
                ok, detail = run_case(DTYPES[dname], rule, steps, big, nonfinite, seed=len(results))
                failed += not ok
                label = rule + (" nonfinite=skip" if nonfinite == "skip" else "")
                print(f"{dname:9} {label:28} {'OK  ' if ok else 'FAIL'} {detail}", flush=True)
                results.append(dict(dtype=dname, rule=rule, nonfinite=nonfinite, ok=ok, detail=detail))
    seconds = time.perf_counter() - start
    print(f"cuda_smoke: {len(results) - failed} of {len(results)} cases OK in {seconds:.1f} s on "
          f"{torch.cuda.get_device_name()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), seconds=seconds, failed=failed, results=results),
                      f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
