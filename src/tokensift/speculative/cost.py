"""What a multi-token forward costs, for the loops that decide how long a draft is worth verifying."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardCost:
    """The time of a forward over `rows` new tokens, in one-token forwards of the same model.

    One token costs 1; two or more cost 1 + `batch` + `row` * (rows - 1). On a CPU the step from one
    row to two is the expensive part (a matrix-vector product becomes a matrix product: measured
    ~1.8x for the Qwen2.5-Coder 0.5B and 1.5B with 2 threads) and each further row adds little (~6%);
    on a GPU both are near 0, which is where speculative decoding's papers verify every draft.
    """

    batch: float = 0.8
    row: float = 0.06

    def __call__(self, rows: int) -> float:
        return 1.0 if rows <= 1 else 1.0 + self.batch + self.row * (rows - 1)

    def best_prefix(self, gains: list[float], min_rate: float = 1.0) -> tuple[int, float]:
        """(j, rate): the number of draft tokens to verify after the last committed token, and the
        expected tokens per unit of time that gives, where `gains[i]` is the chance draft token i is
        accepted (non-increasing along a path). A step commits 1 + the accepted drafts and costs
        `self(1 + j)`; j = 0 (a plain step, rate 1) unless some prefix's rate exceeds `min_rate`."""
        best, best_rate, total = 0, 1.0, 0.0
        bar = max(min_rate, 1.0)
        for j, gain in enumerate(gains, 1):
            total += gain
            rate = (1.0 + total) / self(1 + j)
            if rate > best_rate and rate > bar:
                best, best_rate = j, rate
        return best, best_rate
