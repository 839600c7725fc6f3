"""The probe's second-order part: C from Hessian-vector products with block-restricted tangents.

g = ∇L is taken once, with ``create_graph=True``. For the tangent v_j (Δ_j on block j, zero elsewhere)
H v_j = ∇_θ (g_j·Δ_j) is one backward pass through the graph of g, and C_ij = Δ_i·(H v_j)_i.

About half of that work is skipped, without approximation. The blocks are put in forward order (the
reverse of the order in which the first backward produced their gradients) and for v_j the backward asks
only for the blocks at or after j: autograd then prunes the part of the graph that leads only to
earlier blocks (on a chain, the whole forward pass below block j and every weight-gradient product below
it). The entries before j are the symmetric ones, C_ij = C_ji, which the earlier tangent computed (H is
symmetric).

Tangents go ``batch`` at a time: several in one backward with ``is_grads_batched=True`` (vmap over the
backward), or one by one. On a CPU one by one is the faster (benchmarks/bench_probe.py: the vmap batch
takes 1.2–2.5× as long for k = 4..32 on an MLP and a transformer, since vmap carries every tangent
through every node and the pruning is per call), so that is the default there; on a GPU, where a launch
per node costs more, as many as fit in half the free memory. A batch that fails (an op without a batching
rule, an allocation that fails) is retried smaller, down to one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

log = logging.getLogger("pyco.probe")


class GradientGraph:
    """g = ∇L at θ with its graph, for Hessian-vector products; the blocks' forward order; the graph's size.

    Args:
        loss: the loss at θ, attached to the graph.
        params: the parameters, block by block.
        members: for each block, the indices (into ``params``) of its parameters.
        deltas: Δ, aligned with ``params``.
    """

    def __init__(self, loss_fn, params: Sequence[torch.Tensor], members: list[list[int]], deltas):
        self.params, self.members, self.deltas = list(params), members, list(deltas)
        stamps: dict[int, int] = {}  # parameter index -> when the first backward finished its gradient

        def stamp(i):
            def hook(grad):
                stamps.setdefault(i, len(stamps))
            return hook

        handles = [p.register_hook(stamp(i)) for i, p in enumerate(params)]
        saved = _SavedBytes()
        try:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                loss = loss_fn()
                self.grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        if self.params and all(g is None for g in self.grads):
            raise ValueError(
                f"pyco.probe: the loss does not depend on any of the blocks' {len(self.params)} parameters, so "
                "every cross term would be 0; were the blocks made from another copy of the model than the one "
                "the loss evaluates (copy.deepcopy the model and its blocks together)?")
        self.graph_bytes = saved.bytes
        # A block's gradient is finished when the last of its parameters' is; unused blocks go last.
        done = [max((stamps.get(i, -1) for i in m), default=-1) for m in members]
        self.forward = sorted(range(len(members)), key=lambda b: -done[b] if done[b] >= 0 else len(params))
        self.live = [g is not None and g.requires_grad for g in self.grads]

    def block_flat(self, tensors, blocks: Sequence[int], rows: int | None = None) -> torch.Tensor:
        """The tensors (aligned with params) of the listed blocks, flattened and concatenated in that order
        ([N] or, with rows, [rows, N]); None entries count as zeros."""
        parts = []
        for b in blocks:
            for i in self.members[b]:
                t = tensors[i]
                shape = self.deltas[i].shape if rows is None else (rows, *self.deltas[i].shape)
                t = self.deltas[i].new_zeros(shape) if t is None else t
                parts.append(t.reshape(-1) if rows is None else t.reshape(rows, -1))
        if not parts:
            return self.deltas[0].new_zeros(0 if rows is None else (rows, 0))
        return torch.cat(parts, dim=0 if rows is None else 1)

    def hvp(self, tangent_blocks: Sequence[int], input_blocks: Sequence[int], rows: int | None = None):
        """(H v)_p for p in ``input_blocks``, v = Δ on ``tangent_blocks``. With ``rows``, the listed tangent
        blocks are rows 0..rows−1 of one batched product (results [rows, *p.shape])."""
        outputs, tangents = [], []
        for r, b in enumerate(tangent_blocks):
            for i in self.members[b]:
                if not self.live[i]:
                    continue
                outputs.append(self.grads[i])
                if rows is None:
                    tangents.append(self.deltas[i])
                else:
                    v = self.deltas[i].new_zeros((rows, *self.deltas[i].shape))
                    v[r] = self.deltas[i]
                    tangents.append(v)
        inputs = [i for b in input_blocks for i in self.members[b]]
        result: list[torch.Tensor | None] = [None] * len(self.params)
        if outputs:
            hv = torch.autograd.grad(outputs, [self.params[i] for i in inputs], grad_outputs=tangents,
                                     retain_graph=True, allow_unused=True, is_grads_batched=rows is not None)
            for i, h in zip(inputs, hv):
                result[i] = h
        return result


def first_order(graph: GradientGraph, block_dot) -> torch.Tensor:
    """f_i = g_i·Δ_i per block."""
    blocks = range(len(graph.members))
    grads = [None if g is None else g.detach() for g in graph.grads]
    return block_dot(graph.block_flat(grads, blocks)[None], graph.block_flat(graph.deltas, blocks),
                     _offsets(graph, blocks))[0]


def row_sums(graph: GradientGraph, block_dot) -> torch.Tensor:
    """Σ_j C_ij = Δ_i·(HΔ)_i per block, from one Hessian-vector product."""
    blocks = list(range(len(graph.members)))
    hv = graph.hvp(blocks, blocks)
    return block_dot(graph.block_flat(hv, blocks)[None], graph.block_flat(graph.deltas, blocks),
                     _offsets(graph, blocks))[0]


def cross_matrix(graph: GradientGraph, block_dot, batch: int | None) -> torch.Tensor:
    """C [k, k], C[i, j] = Δ_iᵀ H_ij Δ_j, from k pruned Hessian-vector products (see the module docstring)."""
    fwd = graph.forward
    k = len(fwd)
    delta = graph.block_flat(graph.deltas, fwd)
    offsets = _offsets(graph, fwd)
    size = batch or _default_batch(graph, delta)
    cp = torch.zeros(k, k, dtype=torch.float64)  # in forward positions: cp[s, r] = C[fwd[s], fwd[r]]
    start = 0
    while start < k:
        stop = min(k, start + size)
        rows = None if stop - start == 1 else stop - start
        try:
            hv = graph.hvp(fwd[start:stop], fwd[start:], rows)
        except RuntimeError as exc:  # an op without a batching rule, or an allocation that failed
            if rows is None:
                raise
            size = max(1, rows // 2) if _is_memory_error(exc) else 1
            log.info("batched Hessian-vector products over %d tangents failed (%s); now %d at a time", rows, exc, size)
            continue
        flat = graph.block_flat(hv, fwd[start:], rows or 1)
        part = block_dot(flat, delta[offsets[start]:], [o - offsets[start] for o in offsets[start:]])
        cp[start:, start:stop] = part.t()
        start = stop
    earlier = torch.ones(k, k, dtype=torch.bool).triu(1)  # cp[s, r], s < r: block s before the tangent's
    cp = torch.where(earlier, cp.t(), cp)
    back = torch.tensor(fwd).argsort()
    return cp[back][:, back]


def _offsets(graph: GradientGraph, blocks: Sequence[int]) -> list[int]:
    off = [0]
    for b in blocks:
        off.append(off[-1] + sum(graph.deltas[i].numel() for i in graph.members[b]))
    return off


def _is_memory_error(exc: RuntimeError) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "memory" in str(exc).lower()


def _default_batch(graph: GradientGraph, delta: torch.Tensor) -> int:
    """One tangent at a time on a CPU (measured faster); on a GPU as many as fit in half the free memory."""
    k = len(graph.members)
    if delta.device.type == "cpu":
        return 1
    per_tangent = 3 * delta.numel() * delta.element_size() + graph.graph_bytes
    free = _free_memory(delta.device)
    return k if free is None else max(1, min(k, int(free // 2 // per_tangent)))


class _SavedBytes:
    """Counts the bytes autograd saves for backward: an estimate of what one batched tangent costs (shared
    storages count once per save, which errs on the large side)."""

    def __init__(self):
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes += t.numel() * t.element_size()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def _free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
