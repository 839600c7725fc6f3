"""Making a recomputation see the same batch: the random-number state (dropout masks) and the module buffers
(batch-norm running statistics) as they were, or as one evaluation left them."""

from __future__ import annotations

import torch
from torch import nn


class RandomState:
    """The CPU generator's state and, where CUDA is in use, every CUDA device's.

    Restoring it before a recomputation replays the same random draws (the same dropout masks); restoring the
    state taken after the first evaluation leaves the generators as one plain evaluation would have.
    CUDA states are taken only when CUDA is already initialized, so a CPU run never starts CUDA.
    """

    __slots__ = ("cpu", "cuda")

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda_in_use else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class BufferReplay:
    """Replays module buffers (batch norm's running_mean, running_var, num_batches_tracked, and any other
    buffer a forward pass reads or changes) as the random state is replayed: every recomputation starts from
    the values they had before the step, and after the step they are as the first evaluation left them, so
    running statistics advance once per step, not once per recomputation.

    The buffers are listed per module of ``groups`` (the whole model, or the children of a chain, so that a
    partial recomputation resets only the children it runs), afresh at every step: a module may register
    buffers lazily (``nn.LazyBatchNorm1d``).
    """

    def __init__(self, groups: list[nn.Module]) -> None:
        self.groups = groups
        self.buffers: list[list[torch.Tensor]] = []
        self.before: list[list[torch.Tensor]] = []
        self.after: list[list[torch.Tensor]] | None = None

    def begin(self) -> None:
        """Before the first evaluation."""
        self.buffers = [list(module.buffers()) for module in self.groups]
        self.before = _copies(self.buffers)
        self.after = None

    def first_done(self) -> None:
        """After the first evaluation."""
        self.after = _copies(self.buffers)

    def replay(self, first_group: int = 0) -> None:
        """Before a recomputation that runs groups ``first_group`` and up: their values from before the step."""
        _assign(self.buffers[first_group:], self.before[first_group:])

    def rollback(self) -> None:
        """After a step that raised: every buffer back to its value before the step."""
        _assign(self.buffers, self.before)
        self.after = None

    def finish(self) -> None:
        """After the step (also after an error): as the first evaluation left them, if it finished."""
        if self.after is not None:
            _assign(self.buffers, self.after)
        self.after = None


def _copies(groups: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [[b.detach().clone() for b in buffers] for buffers in groups]


@torch.no_grad()
def _assign(targets: list[list[torch.Tensor]], values: list[list[torch.Tensor]]) -> None:
    for buffers, saved in zip(targets, values):
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)
