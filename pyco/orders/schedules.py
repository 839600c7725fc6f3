"""Which blocks a block-coordinate step updates: the schedules, their position and their random generator."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SCHEDULES = ("cyclic", "cyclic-descending", "reshuffle", "random-subset", "greedy")


class BlockSchedule:
    """Picks ``active`` blocks out of a pool (block indices, in block order) each time it is asked.

    - "cyclic": consecutive windows of the pool, ascending, wrapping around: with 4 blocks and active=1,
      0, 1, 2, 3, 0, ...; with active=2, {0,1}, {2,3}, {0,1}, ...
    - "cyclic-descending": the same from the last block down: 3, 2, 1, 0, 3, ...
    - "reshuffle": epochs; each epoch a fresh random permutation of the pool, taken ``active`` at a time, so
      every block is active once per epoch (when ``active`` does not divide the pool, the epoch's last window
      is topped up with other blocks drawn at random).
    - "random-subset": ``active`` blocks drawn uniformly without replacement, independently every time.
    - "greedy": the ``active`` blocks with the largest gradient norms (``grad_norms``, one per block).

    Randomness comes from the schedule's own ``torch.Generator`` (seeded), never from the global one, so the
    schedule neither disturbs nor depends on the model's random numbers.
    """

    def __init__(self, kind: str, pool: Sequence[int], active: int, seed: int = 0):
        if kind not in SCHEDULES:
            raise ValueError(f"Invalid schedule: {kind!r} (expected one of {SCHEDULES})")
        self.kind = kind
        self.pool = list(reversed(pool)) if kind == "cyclic-descending" else list(pool)
        self.active = active
        self.generator = torch.Generator().manual_seed(int(seed))
        self.cursor = 0  # position in the pool (cyclic) or in the epoch's permutation (reshuffle)
        self.permutation: list[int] = []

    @property
    def needs_gradients(self) -> bool:
        return self.kind == "greedy"

    def next(self, grad_norms: torch.Tensor | None = None) -> list[int]:
        """The next active blocks (indices, ascending). ``grad_norms`` (one per block) is needed by "greedy"."""
        if self.active == 0:
            return []
        if self.kind in ("cyclic", "cyclic-descending"):
            chosen = [self.pool[(self.cursor + j) % len(self.pool)] for j in range(self.active)]
            self.cursor = (self.cursor + self.active) % len(self.pool)
        elif self.kind == "reshuffle":
            chosen = self._next_reshuffled()
        elif self.kind == "random-subset":
            chosen = [self.pool[i] for i in self._randperm(len(self.pool))[: self.active]]
        else:
            if grad_norms is None:
                raise RuntimeError("the greedy schedule needs the gradient norms of every block")
            norms = grad_norms[self.pool]
            # Stable: among equal norms the earlier block wins, so the choice is deterministic.
            order = sorted(range(len(self.pool)), key=lambda i: -float(norms[i]))
            chosen = [self.pool[i] for i in order[: self.active]]
        return sorted(chosen)

    def _next_reshuffled(self) -> list[int]:
        if self.cursor == 0:
            self.permutation = [self.pool[i] for i in self._randperm(len(self.pool))]
        chosen = self.permutation[self.cursor : self.cursor + self.active]
        self.cursor += self.active
        if self.cursor >= len(self.pool):
            self.cursor = 0
        if len(chosen) < self.active:
            others = [b for b in self.pool if b not in chosen]
            chosen += [others[i] for i in self._randperm(len(others))[: self.active - len(chosen)]]
        return chosen

    def _randperm(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.generator).tolist()

    # ---- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "permutation": list(self.permutation), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        self.permutation = [int(b) for b in state["permutation"]]
        self.generator.set_state(state["generator"])
