"""The benchmarks' shared timing helper: medians, quartiles, paired speed-ups, the lower-quartile rule."""

from __future__ import annotations

import pytest

from tokensift.bench.timing import MIN_REPEATS, Spread, call_ms, check_repeats, speedup


def test_spread_is_median_and_inclusive_quartiles() -> None:
    s = Spread.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.n) == (3.0, 2.0, 4.0, 5)
    assert Spread.of([7.0]) == Spread(7.0, 7.0, 7.0, 1)
    assert s.format(1, "x") == "3.0x [2.0-4.0]"
    with pytest.raises(ValueError):
        Spread.of([])


def test_speedup_is_dense_over_method_paired_by_repeat() -> None:
    dense = [10.0, 20.0, 10.0, 10.0, 10.0]
    method = [5.0, 10.0, 10.0, 4.0, 8.0]  # the slow second repeat hit both alike
    s = speedup(dense, method)
    assert s.median == 2.0 and s.q1 == 1.25 and s.q3 == 2.0
    with pytest.raises(ValueError, match="unpaired"):
        speedup([1.0], [1.0, 2.0])


def test_a_target_is_met_only_by_the_lower_quartile() -> None:
    s = Spread.of([1.2, 1.45, 1.5, 1.6, 1.7])
    assert s.median >= 1.4 and not s.meets(1.5)
    assert s.meets(1.45)


def test_too_few_repeats_warn_and_none_is_an_error() -> None:
    assert check_repeats(MIN_REPEATS) == MIN_REPEATS
    with pytest.warns(UserWarning, match="quick look"):
        check_repeats(2)
    with pytest.raises(SystemExit):
        check_repeats(0)


def test_call_ms_times_each_call_after_the_warmups() -> None:
    calls = []
    samples = call_ms(lambda: calls.append(len(calls)), repeats=4, warmups=2)
    assert len(calls) == 6 and len(samples) == 4 and all(s >= 0 for s in samples)
