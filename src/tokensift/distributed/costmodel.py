"""A communication model of one layer's prefill attention under `ring` and `tokenring`.

From the partition alone it counts, per step and rank, the query-key pairs a block computes and the
bytes each message carries (the same messages `schedules` sends, so the byte counts can be checked
against what a run counted). A step lasts as long as its slowest rank's compute or its slowest
transfer, whichever is longer (transfer fully overlapped with compute, full-duplex links, full
mesh: tokenring's query stream and result stream use different links):

    ring:      T = sum_s max(compute_s, kv_s)                          (kv_s: 0 at the last step)
    tokenring: T = sum_s max(compute_s, q_s, out_{s-1}) + out_{P-1}    (the last result is exposed)

Compute time is pairs x 4 x head_dim x query heads / a compute rate (flop/s), measured or assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from tokensift.distributed.partition import rank_positions


@dataclass(frozen=True)
class Shape:
    """Attention shape of a model: query heads, KV heads, head dim, bytes per element."""

    q_heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 4


def _pairs(q_pos: torch.Tensor, k_pos: torch.Tensor) -> int:
    return int(torch.searchsorted(k_pos, q_pos, right=True).sum())


@lru_cache(maxsize=64)
def _step_rows(n: int, parts: int, schedule: str) -> tuple[tuple[tuple[int, int, int, int], ...], ...]:
    """Per step, per rank: (pairs computed, K/V rows sent, query rows sent, result rows sent)."""
    pos = [rank_positions(n, parts, r) for r in range(parts)]
    length = [len(p) for p in pos]
    first = [[int(torch.searchsorted(pos[s], pos[d][0])) for d in range(parts)] for s in range(parts)]
    steps = []
    for s in range(parts):
        row = []
        for r in range(parts):
            last = s == parts - 1
            if schedule == "ring":
                source = (r - s) % parts
                row.append((_pairs(pos[r], pos[source]), 0 if last else length[source], 0, 0))
            else:
                source = (r + s) % parts
                ahead = first[source][(r - 1) % parts]
                row.append(
                    (
                        _pairs(pos[source][first[source][r] :], pos[r]),
                        0,
                        0 if last else length[source] - ahead,
                        0 if s == 0 else length[source] - first[source][r],
                    )
                )
        steps.append(tuple(row))
    return tuple(steps)


def step_costs(n: int, parts: int, shape: Shape, schedule: str) -> list[dict[str, list[int]]]:
    """Per step: each rank's causal pairs computed and bytes sent, by message stream."""
    row_q = shape.q_heads * shape.head_dim * shape.dtype_bytes
    row_kv = 2 * shape.kv_heads * shape.head_dim * shape.dtype_bytes
    row_out = row_q + shape.q_heads * 4  # block_out in the model dtype + float32 lse
    return [
        {
            "pairs": [c[0] for c in step],
            "kv_bytes": [c[1] * row_kv for c in step],
            "q_bytes": [c[2] * row_q for c in step],
            "out_bytes": [c[3] * row_out for c in step],
        }
        for step in _step_rows(n, parts, schedule)
    ]


def bytes_per_rank(n: int, parts: int, shape: Shape, schedule: str) -> list[int]:
    """Point-to-point bytes each rank sends for one layer's prefill attention."""
    steps = step_costs(n, parts, shape, schedule)
    return [sum(st[k][r] for st in steps for k in ("kv_bytes", "q_bytes", "out_bytes")) for r in range(parts)]


def layer_seconds(
    n: int, parts: int, shape: Shape, schedule: str, flops: float, bandwidth: float
) -> dict[str, float]:
    """Projected time of one layer's prefill attention, its compute part, and its exposed transfer."""
    steps = step_costs(n, parts, shape, schedule)
    per_pair = 4 * shape.head_dim * shape.q_heads / flops
    total = compute = 0.0
    previous_out = 0.0
    for st in steps:
        c = max(st["pairs"]) * per_pair
        if schedule == "ring":
            t = max(c, max(st["kv_bytes"]) / bandwidth)
        else:
            t = max(c, max(st["q_bytes"]) / bandwidth, previous_out)
            previous_out = max(st["out_bytes"]) / bandwidth
        total += t
        compute += c
    total += 0.0 if schedule == "ring" else previous_out
    return {"seconds": total, "compute_seconds": compute, "exposed_comm_seconds": total - compute}
