"""Per-block statistics of one optimizer step, as computed by the fused kernels in the update's pass."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FIELDS = ("grad_sq", "update_sq", "grad_dot_update", "param_sq")


@dataclass(frozen=True)
class BlockStats:
    """Statistics of one step, one row per block.

    For block b with tensors θ (before the step), g (the gradient, after GradScaler's unscaling and before
    ``maximize`` or weight decay) and u = θ_after − θ_before (the update as stored):

    - ``grad_sq[b]`` = Σ g², ``update_sq[b]`` = Σ u², ``grad_dot_update[b]`` = Σ g·u (the first-order
      loss change of the step, f_b in the probe's notation), ``param_sq[b]`` = Σ θ².

    Parameters without a gradient contribute nothing. ``skipped`` is True when the step changed nothing
    (GradScaler found inf, or non-finite gradients under ``nonfinite="skip"``); the sums are then zero.

    For CUDA parameters ``values`` is a device tensor, written by the step's kernels without a host
    synchronization (reading it waits for them); where the skip was decided on the device, ``skipped`` is a
    0-dim bool tensor there (``bool(stats.skipped)`` waits too).

    Example::

        opt = pyco.optim.Adam(model.parameters())
        loss.backward(); opt.step()
        opt.last_stats.to_dict()   # {'group0': {'grad_sq': ..., 'update_sq': ..., ...}}
    """

    names: tuple[str, ...]
    values: torch.Tensor  # float64 [k, 4], columns in FIELDS order, on the device of the parameters
    skipped: bool | torch.Tensor = False
    skipped_blocks: tuple[str, ...] = ()  # blocks left unchanged by nonfinite="skip-block" (their rows are zero)

    @property
    def grad_sq(self) -> torch.Tensor:
        return self.values[:, 0]

    @property
    def update_sq(self) -> torch.Tensor:
        return self.values[:, 1]

    @property
    def grad_dot_update(self) -> torch.Tensor:
        return self.values[:, 2]

    @property
    def param_sq(self) -> torch.Tensor:
        return self.values[:, 3]

    @property
    def finite(self) -> bool:
        """False when a gradient or update of this step was inf or NaN (the sums show it)."""
        return bool(torch.isfinite(self.values).all())

    def __getitem__(self, name: str) -> dict[str, float]:
        try:
            row = self.names.index(name)
        except ValueError:
            raise KeyError(f"no block named {name!r}; blocks are {list(self.names)}") from None
        return dict(zip(FIELDS, self.values[row].tolist()))

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {name: self[name] for name in self.names}

    def update_to_param_ratio(self) -> dict[str, float]:
        """‖u‖/‖θ‖ per block: how far each block moved relative to its size."""
        return {
            n: (math.sqrt(u) / math.sqrt(p) if p > 0 else math.inf)
            for n, u, p in zip(self.names, self.update_sq.tolist(), self.param_sq.tolist())
        }

    @classmethod
    def zeros(cls, names: tuple[str, ...], *, skipped: bool) -> "BlockStats":
        return cls(names, torch.zeros(len(names), len(FIELDS), dtype=torch.float64), skipped)
