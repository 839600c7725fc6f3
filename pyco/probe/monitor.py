"""Watching a real training run: every N-th step split exactly, one JSON line per recorded step.

    monitor = pyco.probe.Monitor(opt, pyco.blocks.by_module(model), every=100, out="runs/probe")
    for x, y in loader:
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        monitor.step(closure)            # where the loop called opt.step(closure)
    monitor.close()                      # then: pyco plot runs/probe

Training is bitwise what ``opt.step(closure)`` alone gives: a recorded step is :func:`pyco.probe.record`,
which runs the real step first and restores everything it touched afterwards.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pyco.blocks import Blocks, by_group
from pyco.probe.cross_terms import check_options, check_params, cross_terms
from pyco.probe.record import _record
from pyco.probe.report import CrossTerms

LOG = "probe.jsonl"
STAT_FIELDS = ("grad_sq", "update_sq", "grad_dot_update", "param_sq")


class Monitor:
    """Records the exact decomposition of every ``every``-th step of a training loop.

    The steps recorded are the 1st, the (1 + every)-th, the (1 + 2·every)-th, ... of ``step`` calls. For
    each, one JSON object is appended to ``out/probe.jsonl`` (when ``out`` is given) and kept as
    ``last`` (a :class:`~pyco.probe.CrossTerms`):

    - ``step``, ``blocks``, ``numel``, ``loss`` (what the optimizer's step returned, when a number);
    - the parts: ``first_order`` (per block), ``C`` (k×k; None in mode "rows"), ``within``, ``cross``,
      ``second_order``, ``remainder``, ``actual``, ``loss_before``, ``loss_after``;
    - ``stats``: per block, Σg², Σu², Σg·u and Σθ², with g the gradients the step left in ``.grad``, u the
      update the step made and θ the parameters before it (computed here, so any optimizer works);
    - ``probe_seconds``: the recording's wall time, and ``train_step_seconds``: the median plain step so far.

    With ``tensorboard`` (default: when ``torch.utils.tensorboard`` imports) the totals and each block's
    first-order term are also written as TensorBoard scalars under ``pyco/`` to ``out``. TensorBoard is never
    required: ``tensorboard=True`` without it raises ImportError, ``None`` just skips it.

    Args:
        optimizer: any ``torch.optim.Optimizer`` or order (``pyco.GaussSeidel``...) with ``step(closure)``.
        blocks: the partition to report on (default: one block per param group).
        every: record every ``every``-th step (int >= 1).
        out: a directory for ``probe.jsonl`` (and the TensorBoard events); None keeps nothing on disk.
        mode, dtype, alone, max_batch, process_group: as for :func:`pyco.probe.record` (``dtype`` defaults
            to float64 here, the probe's exact setting).

    A recording costs several training steps (each Hessian-vector product is about two backward passes;
    ``mode="rows"`` needs one, ``mode="full"`` k); :meth:`cost` gives the measured multiple.
    """

    def __init__(self, optimizer, blocks=None, *, every: int = 100, out: str | os.PathLike | None = None,
                 mode: str = "full", dtype: torch.dtype | None = torch.float64, alone: bool = False,
                 max_batch: int | None = None, process_group=None, tensorboard: bool | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Monitor: every must be an int >= 1, got {every!r}")
        if not (hasattr(optimizer, "param_groups") and callable(getattr(optimizer, "step", None))):
            raise TypeError(f"Monitor: optimizer must be a torch.optim.Optimizer (or an order wrapping one), got "
                            f"{type(optimizer).__name__}")
        if tensorboard not in (None, True, False):
            raise TypeError(f"Monitor: tensorboard must be None (when available), True or False, got {tensorboard!r}")
        check_options(mode, dtype, alone, max_batch, process_group)
        self.blocks = by_group(optimizer) if blocks is None else Blocks.of(blocks)
        self.blocks.check_covers([p for g in optimizer.param_groups for p in g["params"]])
        check_params(self.blocks)
        self.optimizer, self.every = optimizer, every
        self._options = dict(mode=mode, dtype=dtype, alone=alone, max_batch=max_batch, process_group=process_group)
        self.out = None if out is None else Path(out)
        if self.out is not None:
            if self.out.exists() and not self.out.is_dir():
                raise NotADirectoryError(f"Monitor: out={str(self.out)!r} is a file; name a directory for {LOG}")
            self.out.mkdir(parents=True, exist_ok=True)
        self._writer = _tensorboard(tensorboard, self.out)
        self.steps = 0
        self.last: CrossTerms | None = None
        self.probe_seconds: list[float] = []
        self.step_seconds: list[float] = []

    @property
    def path(self) -> Path | None:
        """The JSON-lines log (None without ``out``)."""
        return None if self.out is None else self.out / LOG

    def due(self) -> bool:
        """Whether the next ``step`` call is recorded."""
        return self.steps % self.every == 0

    def step(self, closure: Callable[[], torch.Tensor]):
        """``optimizer.step(closure)``, recorded when due; returns what the optimizer's step returned."""
        if not callable(closure):
            raise TypeError(f"Monitor.step: closure must be callable (it computes the loss and calls backward), got "
                            f"{type(closure).__name__}")
        if not self.due():
            start = time.perf_counter()
            returned = self.optimizer.step(closure)
            self.step_seconds.append(time.perf_counter() - start)
            self.steps += 1
            return returned
        params = self.blocks.params()
        before = [p.detach().clone() for p in params]
        start = time.perf_counter()
        report, returned = _record(self.optimizer, closure, self.blocks, **self._options)
        self._log(report, returned, params, before, time.perf_counter() - start)
        return returned

    # -- loops that call optimizer.step() without a closure (Trainer, Lightning) -----------------------------
    def before_step(self) -> None:
        """For a loop that calls ``optimizer.step()`` itself: call this after the backward pass and before the
        step, and :meth:`after_step` right after it. Keeps the parameters when the step is due."""
        self._before = [p.detach().clone() for p in self.blocks.params()] if self.due() else None
        self._pending = True

    def after_step(self, loss_fn: Callable[[], torch.Tensor], returned=None) -> CrossTerms | None:
        """Decomposes the step the optimizer just took (when due): Δ = θ_now − θ_kept by :meth:`before_step`,
        split at θ_kept by :func:`pyco.probe.cross_terms` on ``loss_fn()`` (the loss of the step's batch at the
        current parameters). The parameters are put back to θ_now afterwards, bitwise; gradients and optimizer
        state are not touched. Dropout in ``loss_fn`` draws the probe's own masks (the same at every point),
        not the real step's. Returns the report, or None when the step was not due."""
        if not getattr(self, "_pending", False):
            raise RuntimeError("Monitor.after_step: call before_step() before optimizer.step(), then after_step()")
        self._pending = False
        before, self._before = self._before, None
        if before is None:
            self.steps += 1
            return None
        if not callable(loss_fn):
            raise TypeError(f"Monitor.after_step: loss_fn must be callable, got {type(loss_fn).__name__}")
        params = self.blocks.params()
        after = [p.detach().clone() for p in params]
        update = [a - b for a, b in zip(after, before)]
        start = time.perf_counter()
        try:
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.copy_(b)
            report = cross_terms(loss_fn, self.blocks, update, **self._options)
        finally:
            with torch.no_grad():
                for p, a in zip(params, after):
                    p.copy_(a)
        self._log(report, returned, params, before, time.perf_counter() - start)
        return report

    def _log(self, report: CrossTerms, returned, params, before, seconds: float) -> None:
        self.steps += 1
        self.last = report
        self.probe_seconds.append(seconds)
        entry = self._entry(report, returned, params, before, seconds)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry, allow_nan=False) + "\n")
        if self._writer is not None:
            self._scalars(entry)

    def _entry(self, report: CrossTerms, returned, params, before, seconds: float) -> dict:
        stats = {}
        saved = {id(p): b for p, b in zip(params, before)}
        for name in self.blocks.names:
            sums = dict.fromkeys(STAT_FIELDS, 0.0)
            for p in self.blocks[name]:
                b = saved[id(p)].double()
                u = p.detach().double() - b
                sums["update_sq"] += float((u * u).sum())
                sums["param_sq"] += float((b * b).sum())
                if p.grad is not None:
                    g = p.grad.detach().double()
                    sums["grad_sq"] += float((g * g).sum())
                    sums["grad_dot_update"] += float((g * u).sum())
            stats[name] = sums
        d = report.to_dict()
        if isinstance(returned, torch.Tensor):
            loss = float(returned.detach()) if returned.numel() == 1 else None
        else:
            loss = float(returned) if isinstance(returned, (int, float)) else None
        entry = {"step": self.steps, "blocks": d["names"], "numel": d["numel"], "loss": loss, "mode": d["mode"],
                 "first_order": report.first_order.tolist(), "C": d["C"], "within": d["within"], "cross": d["cross"],
                 "second_order": d["second_order"], "remainder": d["remainder"], "actual": d["actual"],
                 "loss_before": d["loss_before"], "loss_after": d["loss_after"], "alone": d["alone"],
                 "stats": stats, "probe_seconds": seconds,
                 "train_step_seconds": statistics.median(self.step_seconds) if self.step_seconds else None}
        return _finite(entry)

    def _scalars(self, entry: dict) -> None:
        step = entry["step"]
        for key in ("actual", "first_order", "within", "cross", "remainder", "loss"):
            value = entry[key]
            if isinstance(value, list):
                value = sum(v for v in value if v is not None)
            if value is not None:
                self._writer.add_scalar(f"pyco/{key}", value, step)
        for name, f in zip(entry["blocks"], entry["first_order"]):
            if f is not None:
                self._writer.add_scalar(f"pyco/first_order/{name}", f, step)
        self._writer.flush()

    def cost(self) -> dict:
        """The measured cost: median seconds of a recorded step and of a plain one, and their ratio (None until
        both were seen)."""
        probe = statistics.median(self.probe_seconds) if self.probe_seconds else None
        plain = statistics.median(self.step_seconds) if self.step_seconds else None
        return {"recorded_step_seconds": probe, "train_step_seconds": plain,
                "ratio": probe / plain if probe is not None and plain else None,
                "recorded": len(self.probe_seconds), "plain": len(self.step_seconds)}

    def state_dict(self) -> dict:
        """The step count, so a resumed run records the same steps."""
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        steps = state.get("steps") if isinstance(state, dict) else None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"Monitor.load_state_dict: expected {{'steps': int >= 0}}, got {state!r}")
        self.steps = steps

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tensorboard(wanted: bool | None, out: Path | None):
    if wanted is False or (wanted is None and out is None):
        return None
    if out is None:
        raise ValueError("Monitor: tensorboard=True needs out= (the directory its event files go to)")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if wanted:
            raise ImportError(f"Monitor(tensorboard=True): torch.utils.tensorboard is not importable ({exc}); "
                              f"pip install tensorboard, or pass tensorboard=None") from None
        return None
    return SummaryWriter(log_dir=str(out))


def _finite(x):
    """Non-finite floats as None (JSON has no NaN), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def read_log(path: str | os.PathLike) -> list[dict]:
    """The entries of a Monitor log: ``path`` the directory (its ``probe.jsonl``) or the file itself. A last
    line cut short (a run killed while writing) is left out; any other bad line raises ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG
    if not path.is_file():
        raise FileNotFoundError(f"no Monitor log at {str(path)!r}; Monitor(out=DIR) writes DIR/{LOG}")
    lines = path.read_text().splitlines()
    entries = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break  # the last line of a run cut short
            raise ValueError(f"{path}: line {i + 1} is not a JSON object ({exc})") from None
    return entries
