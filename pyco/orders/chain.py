"""Gauss–Seidel sweeps on chains (``nn.Sequential``) that recompute only the part of the network that moved."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from pyco import _dtensor
from pyco import blocks as _blocks
from pyco.orders._replay import BufferReplay, RandomState
from pyco.orders.gauss_seidel import GaussSeidel, Rollback, Sweep, combine_stats
from pyco.stats import BlockStats


class ChainGaussSeidel(GaussSeidel):
    r"""Gauss–Seidel sweeps on an ``nn.Sequential`` that recompute only what the sweep changed: the same
    update as :class:`GaussSeidel` with the closure ``loss_fn(model(input), target).backward()``, at about half
    the cost or less.

    Write the chain as a_0 = input, a_i = f_i(a_{i-1}) (f_i the i-th child); the *entry* e(b) of block b is the
    first child holding one of its parameters, and its *segment* runs from e(b) to the next entry. The input
    of child e(b) depends only on the children before it, so it stays valid until a block whose entry comes
    before e(b) moves; the step keeps the activation entering every entry child (with its autograd graph) and
    the random state the first forward had there. To recompute block b's gradient after block p moved:

    - if e(b) < e(p), block b's segment and everything below it are unchanged, and the segment's graph from
      the forward that last ran it has not been backpropagated yet: the forward restarts above that segment,
      and ``torch.autograd.grad`` runs from the loss through the blocks above into block b's parameters;
    - otherwise the forward restarts at e(p), the lowest child whose input the move made stale.

    The backward only computes what block b's gradient needs (no weight gradient of another block, nothing
    below block b). With the backward sweep (top block first) recomputing block b costs the blocks above it,
    forward and backward: about (k − 1)/2 blocks on average, instead of k for the generic path. Dropout replays
    the random state of the first forward at the restart child, so masks match, and buffers are replayed per
    child as in :class:`GaussSeidel`.

    Any blocks over the model's children give the exact result; the saving needs blocks aligned with the chain
    (each block within consecutive children, as ``by_module`` gives for an MLP). The model's forward must be
    ``nn.Sequential``'s own (children applied in order).

    A step is all or nothing, as for :class:`GaussSeidel`: if ``loss_fn`` or a child raises in the middle of a
    sweep, everything the step changed is put back and the exception propagates.

    Under ``torch.nn.parallel.DistributedDataParallel`` pass the wrapped chain (``ddp.module``) and
    ``process_group``: each rank runs the chain on its part of the batch and every block's recomputed
    gradient is averaged over the group (one all-reduce of that block's gradient, as DDP would), so the step
    equals the single-process step on the whole batch when the ranks' batches have the same size and
    ``loss_fn`` takes the mean. Buffers (batch norm) stay per rank.

    Args:
        optimizer, sweep, seed: as :class:`GaussSeidel`.
        model (nn.Sequential): the chain.
        loss_fn: ``loss_fn(output, target)`` returns the scalar loss.
        blocks: default ``pyco.blocks.by_module(model)``.
        process_group (default None): a ``torch.distributed`` process group (``torch.distributed.group.WORLD``)
            over which to average the gradients; None: no communication.

    Example::

        opt = pyco.ChainGaussSeidel(pyco.optim.SGD(model.parameters(), lr=0.1), model, nn.functional.mse_loss)
        for x, y in batches:
            loss = opt.step(x, y)
    """

    def __init__(self, optimizer: Optimizer, model: nn.Sequential, loss_fn: Callable, blocks=None,
                 sweep: str | Sequence[str] = "backward", *, seed: int = 0, process_group=None):
        _dtensor.refuse("ChainGaussSeidel", "its partial backward passes (torch.autograd.grad into one block) do "
                        "not run FSDP2's gradient reduce-scatter; use pyco.GaussSeidel with a closure, which does",
                        model.parameters() if isinstance(model, nn.Module) else ())
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("ChainGaussSeidel: got DistributedDataParallel, whose reducer cannot run the partial "
                            "backward passes of the sweep; pass the chain itself (ddp.module) and "
                            "process_group=torch.distributed.group.WORLD to average the gradients over the ranks")
        if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
            raise TypeError(f"ChainGaussSeidel needs an nn.Sequential that applies its children in order, got "
                            f"{type(model).__name__}; use GaussSeidel with a closure for other models")
        if not callable(loss_fn):
            raise TypeError(f"ChainGaussSeidel: loss_fn must be callable as loss_fn(output, target), got "
                            f"{type(loss_fn).__name__}")
        super().__init__(optimizer, _blocks.by_module(model) if blocks is None else blocks, sweep, model=model,
                         seed=seed)
        self.loss_fn = loss_fn
        self.process_group = process_group
        self._children = list(model)
        self._buffers = BufferReplay(self._children)  # per child: a partial recomputation replays its part
        self._entry = _entry_children(self.blocks, self._children)
        entries = sorted(set(self._entry))
        self._entry_set = set(entries)
        self._segment_end = [next((e for e in entries if e > first), len(self._children)) for first in self._entry]

    def step(self, input: torch.Tensor, target=None):  # noqa: A002 - torch's naming
        """One sweep on the batch (input, target). Returns the loss at the parameters before the step."""
        if callable(input) and not isinstance(input, torch.Tensor):
            raise TypeError("ChainGaussSeidel.step takes the batch (input, target), not a closure; use "
                            "GaussSeidel for closures")
        cache = _EntryCache(input)
        rows: dict[int, BlockStats | None] = {}
        with Sweep(self) as sweep:  # snapshots the sweep generator too: take it before drawing the order
            order = self._next_sweep()
            loss = self._loss_from(cache, 0, target)
            sweep.first_evaluation_done()
            self._update(order[0], loss, rows, sweep.undo)
            for previous, b in zip(order, order[1:]):
                start = self._restart_child(b, previous)
                self._buffers.replay(start)
                self._update(b, self._loss_from(cache, start, target), rows, sweep.undo)
        self.last_stats = combine_stats(self.blocks.names, rows)
        self.steps += 1
        return loss.detach()

    def _restart_child(self, b: int, previous: int) -> int:
        """Where the forward for block b's gradient starts once block ``previous`` moved (see the class doc)."""
        if self._entry[b] < self._entry[previous]:
            return self._segment_end[b]  # b's segment is unchanged; its graph is reused
        return self._entry[previous]

    def _loss_from(self, cache: "_EntryCache", start: int, target) -> torch.Tensor:
        """The loss from a forward that starts at child ``start`` (an entry child, or 0) from the activation
        cached there and with the random state the first forward had there, caching the entry activations it
        passes on the way."""
        x = cache.resume(start)
        with torch.enable_grad():
            for i in range(start, len(self._children)):
                if i > start and i in self._entry_set:
                    cache.keep(i, x)
                x = self._children[i](x)
            return self.loss_fn(x, target)

    def _update(self, b: int, loss: torch.Tensor, rows: dict, undo: Rollback) -> None:
        """Gives block b the gradient of ``loss`` (the backward from the loss down to block b, nothing else),
        averaged over ``process_group``, and moves it."""
        params = self._block_params(b)
        grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        if self.process_group is not None:
            grads = _average(grads, params, self.process_group)
        for p, g in zip(params, grads):
            p.grad = g
        undo.before_update(params)
        rows[b] = self._step_blocks([b])


class _EntryCache:
    """The activations entering the entry children (with their autograd graphs) and the random state the
    sweep's first forward had there; later forwards replace the activations they recompute (the states stay:
    they are replayed, so they are the same)."""

    def __init__(self, input: torch.Tensor):  # noqa: A002
        self.inputs: dict[int, torch.Tensor] = {0: input}
        self.randoms: dict[int, RandomState] = {}

    def keep(self, i: int, x: torch.Tensor) -> None:
        self.inputs[i] = x  # not detached: a later backward may run through the graph below it
        if i not in self.randoms:
            self.randoms[i] = RandomState()

    def resume(self, start: int) -> torch.Tensor:
        if start in self.randoms:
            self.randoms[start].restore()
        else:  # the first forward: remember the state it starts from
            self.randoms[start] = RandomState()
        return self.inputs[start]


def _average(grads: list, params: Sequence[torch.Tensor], group) -> list[torch.Tensor]:
    """The mean over the ranks of ``group`` of one block's gradients, in one all-reduce (a missing gradient
    counts as zeros: a rank whose batch does not reach a parameter contributes nothing to it)."""
    import torch.distributed as dist

    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    out, start = [], 0
    for g in grads:
        out.append(flat[start:start + g.numel()].view(g.shape))
        start += g.numel()
    return out


def _entry_children(blocks: _blocks.Blocks, children: Sequence[nn.Module]) -> list[int]:
    """For each block, the index of the first child that holds one of its parameters."""
    first: dict[int, int] = {}
    for i, child in enumerate(children):
        for p in child.parameters():
            first.setdefault(id(p), i)
    entries = []
    for name in blocks:
        inside = [first[id(p)] for p in blocks[name] if id(p) in first]
        if len(inside) != len(blocks[name]):
            outside = next(p for p in blocks[name] if id(p) not in first)
            raise ValueError(f"block {name!r} holds {blocks.describe(outside)}, which no child of the Sequential "
                             "holds; build the blocks from the model (pyco.blocks.by_module(model))")
        entries.append(min(inside))
    return entries
