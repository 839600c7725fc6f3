"""The experiment layer's arithmetic: intervals against known cases, sentences that never call a difference
whose interval holds 0, tables whose cells cannot break the markdown."""

import math
import random

import pytest
from hypothesis import given, settings, strategies as st

from pyco.studies import claims, intervals, tables
from pyco.studies.intervals import Estimate

pytest.importorskip("scipy")


def test_t_interval_known_cases():
    e = intervals.t_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.30265273 (tables)
    assert e.mean == 2.0 and e.n == 3
    assert e.lo == pytest.approx(2 - 4.30265273 / math.sqrt(3), rel=1e-8)
    assert e.hi == pytest.approx(2 + 4.30265273 / math.sqrt(3), rel=1e-8)
    e = intervals.t_interval([5.0, 5.0, 5.0, 5.0])
    assert (e.lo, e.hi) == (5.0, 5.0) and not e.excludes(5.0) and e.excludes(4.999)
    # a large sample approaches the normal interval: 1.96 standard errors
    xs = [float(i % 7) for i in range(7000)]
    e = intervals.t_interval(xs)
    se = (sum((x - e.mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 / len(xs) ** 0.5
    assert (e.hi - e.mean) / se == pytest.approx(1.96, abs=2e-3)


def test_one_value_and_a_diverged_seed_have_no_interval():
    e = intervals.t_interval([3.0])
    assert not e.has_interval and e.sign == 0 and e.to_dict() == {"mean": 3.0, "ci95": [None, None], "n": 1}
    e = intervals.t_interval([1.0, float("nan"), 2.0])
    assert not e.has_interval and e.to_dict()["ci95"] == [None, None]
    with pytest.raises(ValueError, match="no values"):
        intervals.t_interval([])


def test_infinities_of_both_signs_give_nan_not_an_error():
    e = intervals.paired([math.inf, 1.0, 2.0], [math.inf, 0.5, 1.0])  # both diverged on seed 0: inf − inf
    assert math.isnan(e.mean) and not e.has_interval and e.sign == 0
    e = intervals.t_interval([math.inf, -math.inf])
    assert math.isnan(e.mean) and not e.has_interval
    assert intervals.t_interval([math.inf, 1.0]).mean == math.inf


def test_paired_removes_the_shared_spread():
    base = [10.0, 20.0, 30.0, 40.0]
    a = [b + 1.0 + d for b, d in zip(base, (0.01, -0.01, 0.02, -0.02))]
    unpaired = intervals.t_interval([x - y for x, y in zip(a, [statistics_mean(base)] * 4)])
    e = intervals.paired(a, base)
    assert e.mean == pytest.approx(1.0) and e.sign == 1 and e.lo > 0.9
    assert not unpaired.excludes(0.0)  # the seed-to-seed spread would hide the difference
    with pytest.raises(ValueError, match="pair them"):
        intervals.paired([1.0, 2.0], [1.0])


def statistics_mean(xs):
    return sum(xs) / len(xs)


def test_bootstrap_is_reproducible_and_covers_the_mean():
    rng = random.Random(1)
    xs = [rng.gauss(3.0, 1.0) for _ in range(40)]
    a, b = intervals.bootstrap(xs, seed=7), intervals.bootstrap(xs, seed=7)
    assert (a.lo, a.hi) == (b.lo, b.hi) and a.lo < a.mean < a.hi
    t = intervals.t_interval(xs)
    assert a.lo == pytest.approx(t.lo, abs=0.15) and a.hi == pytest.approx(t.hi, abs=0.15)


def test_coverage_of_the_t_interval_is_near_95_percent():
    rng = random.Random(0)
    hits = sum(intervals.t_interval([rng.gauss(0.0, 1.0) for _ in range(3)]).excludes(0.0) for _ in range(4000))
    assert 0.035 < hits / 4000 < 0.065  # a 95% interval misses the true mean about 5% of the time


def test_summary_schema():
    s = intervals.Summary()
    s.add("loss/a", [1.0, 2.0, 3.0])
    s.add("gain", [2.0, 3.0, 4.0], against=[1.0, 2.0, 3.1])
    d = s.to_dict()
    assert set(d) == {"loss/a", "gain"}
    assert set(d["loss/a"]) == {"mean", "ci95", "n"} and d["loss/a"]["n"] == 3 and len(d["loss/a"]["ci95"]) == 2
    back = intervals.from_dict(d["loss/a"])
    assert back == Estimate(2.0, s["loss/a"].lo, s["loss/a"].hi, 3)


estimates = st.builds(
    lambda m, a, b, n: Estimate(m, min(a, b), max(a, b), n),
    st.floats(-1e3, 1e3), st.floats(-1e3, 1e3), st.floats(-1e3, 1e3), st.integers(1, 10))


@settings(max_examples=500, deadline=None, derandomize=True)
@given(estimates)
def test_sentences_never_call_a_difference_whose_interval_holds_zero(e):
    d = claims.difference("A", "B", e, quantity="loss")
    s = claims.sign(e, quantity="the cross term", positive="cancel", negative="compound")
    holds_zero = e.n < 2 or e.lo <= 0 <= e.hi
    if holds_zero:
        assert d.startswith("no measurable difference") and "had no measurable sign" in s
    else:
        assert ("lower" in d) == (e.hi < 0) and ("higher" in d) == (e.lo > 0)
        assert ("was positive" in s) == (e.lo > 0) and ("was negative" in s) == (e.hi < 0)
    b = claims.below(e, 0.05, quantity="the error")
    if " below " in b:
        assert e.n >= 2 and e.hi < 0.05
    if " above " in b:
        assert e.n >= 2 and e.lo > 0.05


def test_sentences_name_the_interval_and_the_seeds():
    d = claims.difference("gelu", "relu", intervals.t_interval([-0.3, -0.2, -0.25]), quantity="error")
    assert d.startswith("gelu had a lower error than relu") and "n = 3 paired seeds" in d and "[" in d
    w = claims.within(intervals.t_interval([0.9, 1.0, 1.1]), 0.8, 1.25, quantity="sharpness")
    assert "not decided" in w  # the interval [0.75, 1.25] reaches past 0.8
    w = claims.within(intervals.t_interval([0.95, 1.0, 1.05]), 0.8, 1.25, quantity="sharpness")
    assert "lay within" in w


def test_tables_escape_bars_and_render_one_row_per_line():
    text = tables.markdown(["median cross/|first|", "n"], [["a|b", 3], ["x\ny", 4]])
    lines = text.splitlines()
    assert lines[0] == "| median cross/\\|first\\| | n |"
    assert lines[1] == "|---|---|" and lines[2] == "| a\\|b | 3 |" and lines[3] == "| x y | 4 |"
    for line in lines:  # every unescaped bar is a column border: 3 per row of 2 columns
        assert line.replace("\\|", "").count("|") == 3
    assert tables.escape("already \\| escaped") == "already \\| escaped"
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        tables.markdown(["a", "b"], [["x"]])


def test_percent_keeps_small_fractions_visible():
    assert claims.percent(0.0523) == "5.2%" and claims.percent(0.0071) == "0.71%"
    assert claims.percent(0.00023) == "0.023%" and claims.percent(-0.00023) == "-0.023%"
    assert claims.percent(0.0) == "0.0%" and claims.percent(float("nan")) == "n/a"
