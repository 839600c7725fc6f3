"""Times the probe's full k×k cross-term matrix C against the ways one could get it, side by side in one run.

Models: a 32-layer tanh MLP (cross-entropy) and a 4-layer GPT-style transformer (explicit-softmax causal
attention, cross-entropy), each with its parameters split into k = 4, 8, 16, 32 contiguous blocks and the
step Δ = −0.1·g. Subjects, for each (model, k):

    pyco full C             pyco.probe.cross_terms(..., alone=False) as it runs by default on a CPU: one
                            gradient with create_graph, then one pruned double backward per block tangent
                            (only the blocks at or after it), the block_dot kernel
    pyco full C (vmap batch) the same with max_batch=k: all k tangents in one batched double backward
    pyco rows               mode="rows": one Hessian-vector product gives the row sums of C
    torch.func fwd-over-rev vmap over the k tangents of jvp(grad(loss)) with functional_call, then block_dot
                            (the forward-over-reverse alternative, measured to choose between them)
    curvlinops H @ V        curvlinops.HessianLinearOperator applied to the same k columns, then C
    one HVP                 one Hessian-vector product (gradient with create_graph + one double backward)
    forward+backward        one plain gradient

The pyco rows include the probe's two extra forward passes (L(θ) and L(θ+Δ)). Rounds interleave the
subjects so that drift hits them alike; medians are reported.

    python benchmarks/bench_probe.py                 # table on stdout
    python benchmarks/bench_probe.py --quick         # k = 4, 16 and fewer rounds
    python benchmarks/bench_probe.py --out benchmarks/results/probe-cpu.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import pyco
from bench_common import machine, parse, report
from pyco.probe import block_dot

# ---- models -------------------------------------------------------------------------------------------


def mlp(depth: int = 32, width: int = 128, d_in: int = 64, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.ln2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Returns logits flattened to [batch·time, vocab], so that the loss is a plain cross-entropy."""

    def __init__(self, vocab: int = 64, d: int = 64, heads: int = 4, layers: int = 4, context: int = 32):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        return self.head(self.ln_f(self.blocks(x))).reshape(-1, self.head.out_features)


def make_case(name: str, seed: int = 0):
    torch.manual_seed(seed)
    if name == "mlp":
        model = mlp()
        x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    else:
        model = GPT()
        x = torch.randint(0, 64, (8, 32))
        y = torch.randint(0, 64, (8 * 32,))
    return model, x, y


def contiguous_blocks(model: nn.Module, k: int) -> pyco.blocks.Blocks:
    """k blocks of consecutive parameters (registration order), as equal in count as possible."""
    named = [(n, p) for n, p in model.named_parameters()]
    if k > len(named):
        raise ValueError(f"{k} blocks asked for a model with {len(named)} parameters")
    bounds = [round(i * len(named) / k) for i in range(k + 1)]
    names = {id(p): n for n, p in named}
    return pyco.blocks.Blocks([(named[a][0], [p for _, p in named[a:b]]) for a, b in zip(bounds[:-1], bounds[1:])],
                              names)


# ---- subjects -----------------------------------------------------------------------------------------


def subjects(model, x, y, blocks, have_curvlinops: bool):
    params = blocks.params()
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    grads = torch.autograd.grad(loss_fn(), params)
    update = [-0.1 * g for g in grads]
    k = len(blocks)
    offsets = [0]
    for n in blocks.numel():
        offsets.append(offsets[-1] + n)
    delta = torch.cat([d.reshape(-1) for d in update])
    block_of = [blocks.index(p) for p in params]
    tangents = []  # [k, *shape]: Δ_p in the row of p's block
    for p, d, b in zip(params, update, block_of):
        v = torch.zeros(k, *p.shape)
        v[b] = d
        tangents.append(v)

    def hvp():
        g = torch.autograd.grad(loss_fn(), params, create_graph=True)
        torch.autograd.grad(g, params, grad_outputs=update)

    def forward_backward():
        torch.autograd.grad(loss_fn(), params)

    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    primals = tuple(p.detach() for p in params)

    def loss_of(*ps):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(keys, ps)), (x,)), y)

    def fwd_over_rev():
        grad_fn = torch.func.grad(loss_of, argnums=tuple(range(len(params))))
        hv = torch.func.vmap(lambda *v: torch.func.jvp(grad_fn, primals, v)[1])(*tangents)
        return block_dot(torch.cat([h.reshape(k, -1) for h in hv], dim=1), delta, offsets)

    out = {
        "pyco full C": lambda: pyco.probe.cross_terms(loss_fn, blocks, update, alone=False),
        "pyco full C (vmap batch)": lambda: pyco.probe.cross_terms(loss_fn, blocks, update, alone=False, max_batch=k),
        "pyco rows": lambda: pyco.probe.cross_terms(loss_fn, blocks, update, alone=False, mode="rows"),
        "torch.func fwd-over-rev": fwd_over_rev,
    }
    if have_curvlinops:
        out["curvlinops H @ V"] = curvlinops_subject(model, x, y, params, tangents, delta, offsets)
    out["one HVP"] = hvp
    out["forward+backward"] = forward_backward
    return out


def curvlinops_subject(model, x, y, params, tangents, delta, offsets):
    from curvlinops import HessianLinearOperator

    op = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    k = tangents[0].shape[0]
    columns = [v.movedim(0, -1).contiguous() for v in tangents]  # curvlinops' list format: [*shape, k]

    def run():
        hv = op @ columns
        return block_dot(torch.cat([h.movedim(-1, 0).reshape(k, -1) for h in hv], dim=1), delta, offsets)

    return run


def have_curvlinops() -> bool:
    try:
        import curvlinops  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the run ------------------------------------------------------------------------------------------


def check_agreement(model, x, y, blocks) -> float:
    """Largest |C_pyco − C_fwd-over-rev| / max|C|: the subjects compute the same numbers."""
    subj = subjects(model, x, y, blocks, False)
    report = subj["pyco full C"]()
    other = subj["torch.func fwd-over-rev"]().t()
    return float((report.C - other).abs().max() / report.C.abs().max())


def time_case(model, x, y, k: int, rounds: int, curv: bool) -> dict:
    blocks = contiguous_blocks(model, k)
    subj = subjects(model, x, y, blocks, curv)
    times = {name: [] for name in subj}
    for fn in subj.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in subj.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = {name: {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3}
            for name, ts in times.items()}
    full = rows["pyco full C"]["median_ms"]
    hvp = rows["one HVP"]["median_ms"]
    result = {"k": k, "params": sum(blocks.numel()), "rows": rows,
              "full_over_k_hvp": full / (k * hvp),
              "full_over_forward_backward": full / rows["forward+backward"]["median_ms"],
              "c_agreement_vs_fwd_over_rev": check_agreement(model, x, y, blocks)}
    if curv:
        result["full_over_curvlinops"] = full / rows["curvlinops H @ V"]["median_ms"]
    return result


def run(args) -> dict:
    curv = not args.no_curvlinops and have_curvlinops()
    result = {
        "benchmark": "probe",
        **machine("cpu"),
        "curvlinops": _curvlinops_version() if curv else None,
        "rounds": args.rounds,
        "cases": {},
    }
    for name in args.models:
        model, x, y = make_case(name)
        result["cases"][name] = [time_case(model, x, y, k, args.rounds, curv) for k in args.ks]
    return result


def _curvlinops_version() -> str:
    from importlib.metadata import version

    return version("curvlinops-for-pytorch")


def table(result: dict) -> str:
    lines = [f"{result['device_name']} | {result['threads']} threads | torch {result['torch']} | "
             f"curvlinops {result['curvlinops'] or 'not installed'} | median of {result['rounds']} rounds (ms)"]
    for model, cases in result["cases"].items():
        names = list(cases[0]["rows"])
        lines.append(f"\n{model} ({cases[0]['params']} parameters)")
        lines.append(f"{'subject':26s}" + "".join(f"{'k=' + str(c['k']):>10s}" for c in cases))
        for n in names:
            lines.append(f"{n:26s}" + "".join(f"{c['rows'][n]['median_ms']:10.1f}" for c in cases))
        lines.append(f"{'full / (k · one HVP)':26s}" + "".join(f"{c['full_over_k_hvp']:10.2f}" for c in cases))
        if "full_over_curvlinops" in cases[0]:
            lines.append(f"{'full / curvlinops':26s}" + "".join(f"{c['full_over_curvlinops']:10.2f}" for c in cases))
        lines.append(f"{'full / forward+backward':26s}"
                     + "".join(f"{c['full_over_forward_backward']:10.1f}" for c in cases))
        lines.append(f"{'C rel. diff vs fwd-over-rev':26s}"
                     + "".join(f"{c['c_agreement_vs_fwd_over_rev']:10.1e}" for c in cases))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"], choices=["mlp", "transformer"])
    parser.add_argument("--ks", nargs="+", type=int, default=[4, 8, 16, 32], help="block counts (default 4 8 16 32)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per subject (default 7)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    parser.add_argument("--quick", action="store_true", help="k = 4 and 16, 3 rounds")
    parser.add_argument("--no-curvlinops", action="store_true", help="leave curvlinops out even if installed")
    parser.add_argument("--out", help="write the results as JSON to this path")


def main(argv=None) -> int:
    args = parse(__doc__, add_arguments, argv, count="rounds", quick={"ks": [4, 16], "rounds": 3})
    result = run(args)
    return report(result, table(result), args.out)


if __name__ == "__main__":
    sys.exit(main())
