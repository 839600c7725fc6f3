"""Estimates over seeds: a mean with its 95% interval, the form every number a study reports takes.

An :class:`Estimate` is what ``results.json``'s ``summary`` holds for each name:
``{"mean": x, "ci95": [lo, hi], "n": seeds}``. Intervals are Student's t over the seeds (the default: a few
seeds, roughly normal means), or a percentile bootstrap (``bootstrap``) for skewed statistics such as a
median over steps. Seeds that pair (the same seed under two methods: same initialisation, same batches)
are compared by :func:`paired`, the interval of the per-seed differences, which removes the seed-to-seed
spread both share. One value has no interval: its ``ci95`` is ``[None, None]`` and nothing is claimed of it.

    >>> e = t_interval([1.0, 2.0, 3.0])
    >>> e.mean, round(e.lo, 3), round(e.hi, 3), e.n
    (2.0, -0.484, 4.484, 3)
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` seeds with its 95% interval [lo, hi] (``nan`` bounds when n < 2); ``values`` the
    per-seed numbers it came from."""

    mean: float
    lo: float
    hi: float
    n: int
    values: tuple[float, ...] = field(default=(), compare=False)

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and math.isfinite(self.lo) and math.isfinite(self.hi)

    def excludes(self, x: float = 0.0) -> bool:
        """True when the interval lies wholly on one side of ``x``: a difference from ``x`` that can be called."""
        return self.has_interval and (self.lo > x or self.hi < x)

    @property
    def sign(self) -> int:
        """+1 or -1 when the interval excludes 0, else 0 (no measurable sign)."""
        return (1 if self.lo > 0 else -1) if self.excludes(0.0) else 0

    def to_dict(self) -> dict:
        bound = lambda v: v if math.isfinite(v) else None  # noqa: E731
        return {"mean": _plain(self.mean), "ci95": [bound(self.lo), bound(self.hi)] if self.has_interval
                else [None, None], "n": self.n}

    def scaled(self, factor: float) -> "Estimate":
        lo, hi = sorted((self.lo * factor, self.hi * factor)) if self.has_interval else (math.nan, math.nan)
        return Estimate(self.mean * factor, lo, hi, self.n, tuple(v * factor for v in self.values))


def _plain(x: float):
    return x if math.isfinite(x) else str(x)


def _finite(values: Sequence[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{what}: no values")
    return out


def t_quantile(level: float, df: int) -> float:
    """The two-sided Student's t critical value: P(|T_df| <= q) = level."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    try:
        from scipy.stats import t
    except ImportError as exc:  # scipy is in the studies extra
        raise ImportError("intervals need scipy: pip install 'pyco[studies]'") from exc
    return float(t.ppf(0.5 + level / 2, df))


def t_interval(values: Sequence[float], level: float = LEVEL) -> Estimate:
    """Mean and Student's t interval of ``values`` (one per seed). A non-finite value makes the interval nan
    (a diverged seed is not averaged away)."""
    xs = _finite(values, "t_interval")
    n = len(xs)
    if not all(math.isfinite(x) for x in xs):  # inf, −inf or nan: their plain sum says which (fmean raises)
        return Estimate(sum(xs) / n, math.nan, math.nan, n, tuple(xs))
    mean = statistics.fmean(xs)
    if n < 2:
        return Estimate(mean, math.nan, math.nan, n, tuple(xs))
    half = t_quantile(level, n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n, tuple(xs))


def paired(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Estimate:
    """The interval of the mean per-seed difference a_i − b_i (a and b measured on the same seeds)."""
    a, b = _finite(a, "paired"), _finite(b, "paired")
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} values against {len(b)}; pair them seed by seed")
    return t_interval([x - y for x, y in zip(a, b)], level)


def bootstrap(values: Sequence[float], statistic: Callable[[Sequence[float]], float] = statistics.fmean, *,
              resamples: int = 2000, seed: int = 0, level: float = LEVEL) -> Estimate:
    """``statistic(values)`` with a percentile-bootstrap interval (``resamples`` resamples with replacement,
    drawn from a generator seeded with ``seed``, so the interval is reproducible)."""
    xs = _finite(values, "bootstrap")
    point = float(statistic(xs))
    n = len(xs)
    if n < 2 or not all(math.isfinite(x) for x in xs):
        return Estimate(point, math.nan, math.nan, n, tuple(xs))
    rng = random.Random(seed)
    stats = sorted(float(statistic(rng.choices(xs, k=n))) for _ in range(resamples))
    tail = (1 - level) / 2
    lo = stats[int(math.floor(tail * (resamples - 1)))]
    hi = stats[int(math.ceil((1 - tail) * (resamples - 1)))]
    return Estimate(point, lo, hi, n, tuple(xs))


class Summary(dict):
    """``results.json``'s ``summary``: name -> :class:`Estimate`. ``add`` takes per-seed values."""

    def add(self, name: str, values: Sequence[float], *, against: Sequence[float] | None = None) -> Estimate:
        """Stores and returns the estimate of ``values`` (or, with ``against``, of the paired difference)."""
        est = t_interval(values) if against is None else paired(values, against)
        self[name] = est
        return est

    def to_dict(self) -> dict:
        return {k: v.to_dict() for k, v in self.items()}


def from_dict(data: Mapping) -> Estimate:
    """An :class:`Estimate` back from its ``to_dict`` form (values not kept)."""
    lo, hi = data["ci95"]
    mean = data["mean"]
    return Estimate(float(mean), math.nan if lo is None else float(lo), math.nan if hi is None else float(hi),
                    int(data["n"]))
