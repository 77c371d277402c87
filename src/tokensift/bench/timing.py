"""Repeated timings for the speed benchmarks: medians with their interquartile range.

Every speed benchmark (benchmarks/*.py) times each cell `repeats` times (at least `MIN_REPEATS`),
interleaving the methods inside each repeat so that drifts in machine load hit them alike, and
reports the median with the interquartile range (IQR). A speed-up is always dense time / method
time, computed per repeat from the paired runs of that repeat, and a target counts as met only when
the lower quartile of those paired ratios meets it (`Spread.meets`).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MIN_REPEATS = 5


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of repeated measurements (inclusive quartiles, numpy's default)."""

    median: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        data = [float(v) for v in values]
        if not data:
            raise ValueError("no measurements")
        if len(data) == 1:
            return cls(data[0], data[0], data[0], 1)
        q1, median, q3 = statistics.quantiles(data, n=4, method="inclusive")
        return cls(median, q1, q3, len(data))

    def meets(self, target: float) -> bool:
        """A higher-is-better quantity (a speed-up) meets `target` only if its lower quartile does."""
        return self.q1 >= target

    def format(self, digits: int = 2, suffix: str = "") -> str:
        """`1.49x [1.41-1.55]`: the median, then the interquartile range."""
        f = f"{{:.{digits}f}}"
        return f"{f.format(self.median)}{suffix} [{f.format(self.q1)}-{f.format(self.q3)}]"

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "n": self.n}


def call_ms(fn: Callable[[], object], repeats: int, warmups: int = 1) -> list[float]:
    """Wall milliseconds of `repeats` calls of `fn` after `warmups` untimed ones (micro-benchmarks of
    one operation; `fn` synchronises an accelerator itself if it needs to)."""
    for _ in range(warmups):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - t0))
    return samples


def speedup(dense: Sequence[float], method: Sequence[float]) -> Spread:
    """Dense time / method time for each repeat (paired: the same repeat of both), as a Spread.
    Pass times (seconds); for rates (tokens/s) pass them the other way round."""
    if len(dense) != len(method):
        raise ValueError(f"unpaired repeats: {len(dense)} dense, {len(method)} method")
    return Spread.of(d / m for d, m in zip(dense, method, strict=True))


def check_repeats(repeats: int) -> int:
    """The repeat count, with a warning when it is below `MIN_REPEATS` (a quick look, not a claim)."""
    if repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {repeats}")
    if repeats < MIN_REPEATS:
        warnings.warn(
            f"{repeats} repeat(s): fewer than {MIN_REPEATS}, so the quartiles say little; use this run "
            "for a quick look, not for a speed claim",
            stacklevel=2,
        )
    return repeats


def add_repeats_argument(parser: Any, default: int = MIN_REPEATS) -> None:
    """The `--repeats` option every speed benchmark takes."""
    parser.add_argument(
        "--repeats",
        type=int,
        default=default,
        help=f"timed repeats per cell, methods interleaved (medians with IQR; claims need >= {MIN_REPEATS})",
    )
