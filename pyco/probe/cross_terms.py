"""The exact second-order split of one step's loss change into blocks.

For blocks B_1..B_k, a step Δ = (Δ_1..Δ_k), the gradient g and the Hessian H of the loss at θ on one fixed
batch:

    ΔL = L(θ+Δ) − L(θ) = Σ_i f_i + ½ Σ_i C_ii + ½ Σ_{i≠j} C_ij + R,   f_i = g_i·Δ_i,   C_ij = Δ_iᵀ H_ij Δ_j.

C comes from Hessian-vector products (double backward), not from an approximation: g = ∇L is taken once
with ``create_graph=True``; the k block-restricted tangents v_j (Δ_j on block j, zero elsewhere) each go
through a backward pass of g, which gives H v_j; then C_ij = Δ_i·(H v_j)_i, summed block by block by a
deterministic kernel (:func:`block_dot`). Each pass asks only for the blocks at or after j in forward
order, which lets autograd skip about half the graph; the rest of C is its symmetric half
(pyco/probe/_hvp.py has the details and the choice between batched and one-by-one passes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from pyco import _dtensor
from pyco._ext import _C
from pyco.blocks import Blocks
from pyco.probe import _hvp
from pyco.probe._evaluation import FixedBatch
from pyco.probe.report import CrossTerms

MODES = ("full", "rows")


def cross_terms(loss_fn: Callable[[], torch.Tensor], blocks, update, *, mode: str = "full",
                dtype: torch.dtype | None = None, alone: bool = True, max_batch: int | None = None,
                process_group=None) -> CrossTerms:
    """Splits the loss change of the step ``update`` into first-order, within-block, cross-block and
    higher-order parts, exactly (see the module docstring for the formulas).

    Args:
        loss_fn: zero-argument callable returning the scalar loss on one fixed batch (it closes over the
            model and the batch). It is evaluated several times: dropout masks are replayed (every call
            starts from the same random state), batch-norm buffers are restored before each call, and the
            model is left bitwise as it was. Every evaluation runs ``scaled_dot_product_attention`` on its
            math backend (``torch.nn.attention.sdpa_kernel([SDPBackend.MATH])``, whatever the caller
            selected): the flash and memory-efficient kernels on CUDA, and the fused CPU kernel, have no
            double backward, which the Hessian-vector products need. A transformer's probe is therefore exact
            but runs attention at the math backend's speed and memory ([batch, heads, t, t] scores).
        blocks: a :class:`pyco.blocks.Blocks` (``by_module(model)``, ...), a dict name -> parameters or a
            list of (name, parameters) pairs.
        update: Δ, as a list aligned with ``blocks.params()`` (block by block) or a dict parameter -> Δ.
        mode: ``"full"``: the whole k×k matrix C (k pruned Hessian-vector products). ``"rows"``: one
            Hessian-vector product HΔ gives only the row sums Σ_j C_ij and ΔᵀHΔ (C, the within/cross split
            and the Gauss–Seidel prediction are then None).
        dtype: evaluate in this dtype, for instance ``torch.float64`` for a float32 model: the probe casts
            the blocks' parameters, the parameters and floating buffers of every module that runs and the
            floating tensors passed to a module's forward, in place, and puts the originals back bitwise
            afterwards, so the same ``loss_fn`` works unchanged. None: the parameters' own dtype.
        alone: also measure alone_i = L(θ + Δ_i only) − L(θ) (k more forward passes).
        max_batch: tangents per backward pass: 1 runs them one by one, more batches them in one
            backward with ``is_grads_batched=True`` (vmap). None: one by one on a CPU, where it measures
            faster, and as many as fit in half the free memory on a GPU.
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``): the report
            is then the one for the global batch, the union of the ranks' batches. Every rank calls
            ``cross_terms`` with its own part of the batch and the same ``update``; each computes f, C, the
            losses and alone on its part and one all-reduce of those k² + O(k) numbers averages them (the
            global loss is the mean of the ranks' losses, as DDP assumes: equal batch sizes, mean-reduced
            losses). Explicit, never detected: None (default) is the local probe, with or without
            torch.distributed. Under ``DistributedDataParallel`` the probe differentiates twice, which DDP's
            reducer cannot: evaluate ``ddp.module`` in ``loss_fn`` (blocks from ``by_module(ddp)`` are
            bypassed automatically: calling the DDP runs its module, with no communication).

    Returns:
        a :class:`CrossTerms` report.

    Example::

        blocks = pyco.blocks.by_module(model)
        loss_fn = lambda: F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss_fn(), blocks.params())
        report = pyco.probe.cross_terms(loss_fn, blocks, [-0.1 * g for g in grads], dtype=torch.float64)
        print(report.table())
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a zero-argument callable returning the loss, got {type(loss_fn).__name__}")
    check_options(mode, dtype, alone, max_batch, process_group)
    blocks = Blocks.of(blocks)
    params = blocks.params()
    check_params(blocks)
    deltas = aligned_update(blocks, params, update)
    with bypassing_ddp([blocks.module]), FixedBatch(loss_fn, params, dtype) as batch:
        deltas = [d.detach().to(batch.working(p).dtype) for p, d in zip(params, deltas)]
        first, c, rows, quadratic = _second_order(batch, blocks, deltas, mode, max_batch)
        with torch.no_grad():
            before = batch.loss()
            after = batch.loss(dict(enumerate(deltas)))
            alone_dl = _alone(batch, blocks, deltas, before) if alone else None
    dtype_name = str(before.dtype).replace("torch.", "")
    before, after = before.double().reshape(1), after.double().reshape(1)
    if process_group is not None:
        first, c, rows, quadratic, before, after, alone_dl = _group_mean(
            process_group, first, c, rows, torch.tensor([quadratic], dtype=torch.float64), before, after, alone_dl)
        quadratic = float(quadratic)
    return CrossTerms(
        names=blocks.names, numel=tuple(blocks.numel()), mode=mode, dtype=dtype_name,
        loss_before=before.item(), loss_after=after.item(), first_order=first, C=c, row_sums=rows,
        quadratic=quadratic, alone=alone_dl,
    )


def check_options(mode, dtype, alone, max_batch, process_group) -> None:
    """The probe's options, checked (also by :func:`pyco.probe.record`, before its step)."""
    if mode not in MODES:
        raise ValueError(f"Invalid mode: {mode!r} (expected one of {MODES})")
    if not isinstance(alone, bool):
        raise TypeError(f"Invalid alone: {alone!r} (expected True or False)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"Invalid dtype: {dtype!r} (expected None or a floating-point torch.dtype)")
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"Invalid max_batch: {max_batch!r} (expected None or an int >= 1)")
    _check_group(process_group)


def check_params(blocks: Blocks) -> None:
    """What the probe needs of every parameter before it is given a step: real floating point, requiring grad,
    no DTensor (FSDP2)."""
    _dtensor.refuse("pyco.probe", "its Hessian-vector products need a double backward through the model, which "
                    "FSDP2 does not provide. Probe an unsharded copy (a plain model loaded with the full state dict, "
                    "torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True) with "
                    "process_group= for the global batch, or train under DistributedDataParallel, which the probe "
                    "supports", blocks.params())
    for p in blocks.params():
        where = f"block {_block_of(blocks, p)!r} ({blocks.describe(p)})"
        if not p.is_floating_point():
            raise TypeError(f"{where} is {p.dtype}; the probe decomposes steps of real floating-point parameters")
        if not p.requires_grad:
            raise ValueError(f"{where} does not require grad: the probe differentiates the loss with respect to "
                             f"every parameter of the blocks; leave frozen parameters out of the blocks")


def _check_group(process_group) -> None:
    if process_group is None:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group was given but torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group(...) first, or pass process_group=None")


def _group_mean(group, *values):
    """The mean over the ranks of ``group`` of each tensor in ``values`` (None stays None), in one all-reduce
    of float64 numbers: only these block-sized results cross the network."""
    import torch.distributed as dist

    present = [v for v in values if v is not None]
    flat = torch.cat([v.detach().double().reshape(-1).cpu() for v in present])
    if dist.get_backend(group) == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat, group=group)
    flat = (flat / dist.get_world_size(group)).cpu()
    out, start = [], 0
    for v in values:
        if v is None:
            out.append(None)
            continue
        out.append(flat[start:start + v.numel()].reshape(v.shape).clone())
        start += v.numel()
    return out


@contextlib.contextmanager
def bypassing_ddp(modules):
    """While inside, calling one of these ``DistributedDataParallel`` modules runs its ``module`` directly:
    no reducer, no buffer broadcast, no collective (double backward through DDP's hooks is not possible)."""
    ddps = [m for m in modules if isinstance(m, nn.parallel.DistributedDataParallel)]
    saved = [m.__dict__.get("forward", _MISSING) for m in ddps]
    try:
        for m in ddps:
            m.__dict__["forward"] = m.module.__call__
        yield
    finally:
        for m, old in zip(ddps, saved):
            if old is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = old


_MISSING = object()


def aligned_update(blocks: Blocks, params: list[torch.Tensor], update) -> list[torch.Tensor]:
    """Δ as a list aligned with ``params``, checked against them (shape, dtype kind, device)."""
    if not params:
        raise ValueError("blocks hold no parameters: give at least one block with at least one parameter")
    if isinstance(update, Mapping):
        known = {id(p) for p in params}
        extra = [k for k in update if not isinstance(k, torch.Tensor) or id(k) not in known]
        if extra:
            what = blocks.describe(extra[0]) if isinstance(extra[0], torch.Tensor) else repr(extra[0])
            raise ValueError(f"update holds a step for {what}, which is in no block; build the update from "
                             f"the blocks' parameters")
        by_id = {id(k): v for k, v in update.items()}
        missing = [p for p in params if id(p) not in by_id]
        if missing:
            p = missing[0]
            raise ValueError(f"update has no step for block {_block_of(blocks, p)!r} ({blocks.describe(p)}); "
                             f"give every parameter of the blocks a step (zeros for one that does not move)")
        deltas = [by_id[id(p)] for p in params]
    elif isinstance(update, Sequence) and not isinstance(update, (str, bytes)):
        if len(update) != len(params):
            raise ValueError(f"update has {len(update)} tensors but the blocks hold {len(params)} parameters; "
                             f"give one step per parameter, block by block (blocks.params() order), or a dict")
        deltas = list(update)
    else:
        raise TypeError(f"update must be a list of tensors aligned with blocks.params() or a dict "
                        f"parameter -> tensor, got {type(update).__name__}")
    for p, d in zip(params, deltas):
        _check_step(blocks, p, d)
    return deltas


def _block_of(blocks: Blocks, p: torch.Tensor) -> str:
    return blocks.names[blocks.index(p)]


def _check_step(blocks: Blocks, p: torch.Tensor, d) -> None:
    where = f"block {_block_of(blocks, p)!r} ({blocks.describe(p)})"
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"update for {where} is a {type(d).__name__}, expected a tensor")
    if d.shape != p.shape:
        raise ValueError(f"update for {where} has shape {list(d.shape)}, expected the parameter's {list(p.shape)}")
    if not (d.is_floating_point() and p.is_floating_point()):
        raise TypeError(f"update for {where}: parameter {p.dtype} and step {d.dtype} must both be real "
                        f"floating point")
    if d.device != p.device:
        raise ValueError(f"update for {where} is on {d.device}, the parameter on {p.device}")
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"update for {where} holds inf or NaN; the probe decomposes a finite step")


# ---- the second-order part ---------------------------------------------------------------------------

def _second_order(batch: FixedBatch, blocks: Blocks, deltas, mode: str, max_batch: int | None):
    """(f [k], C [k, k] or None, row sums [k], ΔᵀHΔ) from one gradient and k (or one) Hessian-vector
    products (pyco/probe/_hvp.py)."""
    members, start = [], 0
    for name in blocks.names:
        members.append(list(range(start, start + len(blocks[name]))))
        start += len(blocks[name])
    graph = _hvp.GradientGraph(lambda: batch.loss(grad=True), batch.params, members, deltas)
    first = _hvp.first_order(graph, block_dot)
    if mode == "rows":
        rows = _hvp.row_sums(graph, block_dot)
        return first, None, rows, float(rows.sum())
    c = _hvp.cross_matrix(graph, block_dot, max_batch)
    return first, c, c.sum(dim=1), float(c.sum())


def _alone(batch: FixedBatch, blocks: Blocks, deltas, before: torch.Tensor) -> torch.Tensor:
    """alone_i = L(θ + Δ_i only) − L(θ) for every block i, in float64."""
    out = torch.empty(len(blocks), dtype=torch.float64)
    start = 0
    for b, n in enumerate(len(blocks[name]) for name in blocks.names):
        shifted = batch.loss({i: deltas[i] for i in range(start, start + n)})
        out[b] = shifted.double() - before.double()
        start += n
    return out


# ---- the kernel ----------------------------------------------------------------------------------------

def block_dot(rows: torch.Tensor, delta: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """Segmented dot products: ``out[j, i] = Σ_{n in [offsets[i], offsets[i+1])} delta[n]·rows[j, n]``.

    rows is [m, N], delta [N] (N = offsets[-1]); returns float64 [m, len(offsets) − 1]. float32/float64
    CPU tensors run pyco's kernel (products and sums in float64, fixed chunks, fixed order: bitwise the
    same for any thread count); anything else runs :func:`block_dot_torch`.

    Example::

        block_dot(torch.ones(2, 5), torch.arange(5.0), [0, 2, 5])  # tensor([[1., 9.], [1., 9.]])
    """
    offsets = list(offsets)
    if not offsets or offsets[0] != 0:
        raise ValueError(f"block_dot: offsets must start with 0 (one more entry than blocks), got {offsets[:4]}")
    n = offsets[-1]
    if rows.dim() != 2 or delta.dim() != 1 or rows.shape[1] != n or delta.shape[0] != n:
        raise ValueError(f"block_dot: rows {list(rows.shape)} and delta {list(delta.shape)} do not fit the "
                         f"offsets (expected rows [m, {n}] and delta [{n}])")
    if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.float64) or rows.dtype != delta.dtype:
        return block_dot_torch(rows, delta, offsets)
    rows, delta = rows.contiguous(), delta.contiguous()
    off = torch.tensor(offsets, dtype=torch.int64)
    out = torch.empty(rows.shape[0], len(offsets) - 1, dtype=torch.float64)
    _C.block_dot(rows.data_ptr(), delta.data_ptr(), _C.DTYPE_CODES[str(rows.dtype).replace("torch.", "")],
                 rows.shape[0], off.data_ptr(), len(offsets) - 1, out.data_ptr(),
                 num_threads=torch.get_num_threads())
    return out


def block_dot_torch(rows: torch.Tensor, delta: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """The plain-torch twin of :func:`block_dot` (float64, any device); returns a CPU tensor."""
    rows, delta = rows.double(), delta.double()
    cols = [rows[:, a:b] @ delta[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return torch.stack(cols, dim=1).cpu() if cols else torch.zeros(rows.shape[0], 0, dtype=torch.float64)
