"""The sentences a report makes of its numbers: a difference is called only when its 95% interval excludes
zero; otherwise the sentence says "no measurable difference" and gives the interval and the number of seeds.

Every generated claim goes through :func:`difference`, :func:`sign` or :func:`below`, so no report can call
a difference its interval does not support.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pyco.studies.intervals import Estimate


def number(x: float, digits: int = 3) -> str:
    """3 significant digits (scientific when small or large); nan and inf as words."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def percent(x: float) -> str:
    """A fraction as a percentage: one decimal from 1% up, two significant digits below (0.023%, not 0.0%)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{100 * x:.2g}%" if 0 < abs(x) < 0.01 else f"{x:.1%}"


def ci(est: Estimate, show: Callable[[float], str] = number, *, signed: bool = False) -> str:
    """``mean [lo, hi]``, or ``mean (n = 1, no interval)``."""
    plus = (lambda v: ("+" if v > 0 else "") + show(v)) if signed else show
    if not est.has_interval:
        return f"{plus(est.mean)} (n = {est.n}, no interval)"
    return f"{plus(est.mean)} [{plus(est.lo)}, {plus(est.hi)}]"


def seeds(est: Estimate, paired: bool = False) -> str:
    return f"n = {est.n}{' paired' if paired else ''} seed{'s' if est.n != 1 else ''}"


def difference(a: str, b: str, diff: Estimate, *, quantity: str, show: Callable[[float], str] = number,
               smaller: str = "lower", larger: str = "higher", paired: bool = True) -> str:
    """A sentence on ``diff`` = (a − b) of ``quantity``: "a had a lower quantity than b: difference d [lo, hi]
    (n = …)" when the interval excludes 0, else "no measurable difference in quantity between a and b"."""
    where = f"difference {ci(diff, show, signed=True)}, {seeds(diff, paired)}"
    if diff.sign == 0:
        return f"no measurable difference in {quantity} between {a} and {b} ({where})"
    word = smaller if diff.sign < 0 else larger
    return f"{a} had a {word} {quantity} than {b} ({where})"


def sign(est: Estimate, *, quantity: str, positive: str, negative: str,
         show: Callable[[float], str] = number) -> str:
    """"quantity was positive: positive-meaning (mean [lo, hi], n = …)" when the interval excludes 0, else
    "quantity had no measurable sign"."""
    where = f"{ci(est, show, signed=True)}, {seeds(est)}"
    if est.sign == 0:
        return f"{quantity} had no measurable sign ({where})"
    return f"{quantity} was {'positive' if est.sign > 0 else 'negative'}: {positive if est.sign > 0 else negative} ({where})"


def below(est: Estimate, threshold: float, *, quantity: str, show: Callable[[float], str] = number) -> str:
    """"quantity was below threshold" only when the whole interval is; "above" only when the whole interval
    is; otherwise "not distinguishable from threshold"."""
    where = f"{ci(est, show)}, {seeds(est)}"
    if est.excludes(threshold):
        side = "below" if est.hi < threshold else "above"
        return f"{quantity} was {side} {show(threshold)} ({where})"
    return f"{quantity} was not distinguishable from {show(threshold)} ({where})"


def within(est: Estimate, lo: float, hi: float, *, quantity: str, show: Callable[[float], str] = number) -> str:
    """"quantity lay within [lo, hi]" only when the whole interval does; "outside" only when the whole interval
    lies outside; otherwise undecided."""
    where = f"{ci(est, show)}, {seeds(est)}"
    if est.has_interval and lo <= est.lo and est.hi <= hi:
        return f"{quantity} lay within [{show(lo)}, {show(hi)}] ({where})"
    if est.has_interval and (est.hi < lo or est.lo > hi):
        return f"{quantity} lay outside [{show(lo)}, {show(hi)}] ({where})"
    return f"{quantity} is not decided against [{show(lo)}, {show(hi)}] by {est.n} seeds ({where})"
