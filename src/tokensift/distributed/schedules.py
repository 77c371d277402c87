"""Exact causal attention with the sequence split across ranks: `ring` and `tokenring`.

Both schedules take this rank's queries, keys and values (its zigzag slice, see `partition`) and
return this rank's attention output and log-sum-exp, equal to dense attention over the whole
sequence up to rounding. Messages are posted non-blocking before each step's block is computed and
waited for after it, so transfer overlaps compute.

ring (Liu et al., Ring Attention, 2023; ring-flash-attention's zigzag variant): keys and values
travel one way round the ring (rank r sends to r+1); at step s rank r holds the block of rank r-s,
attends its own queries to it and merges by log-sum-exp.

tokenring (Wang et al., TokenRing, 2024): queries travel the other way (rank r sends to r-1), so at
step s rank r attends the queries of rank r+s to its own keys; the partial result (block_out,
block_lse) goes straight back to the queries' owner over the full mesh while the next block is
computed. Only the query rows that can see a rank's keys are sent to it (with the zigzag split:
all rows before the ring wraps, the back chunk after), as in the official implementation.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from tokensift.distributed.blocks import attend_block, merge, merge_into
from tokensift.distributed.comm import TAG_KEYS, TAG_LSE, TAG_OUT, TAG_QUERIES, TAG_VALUES, Comm
from tokensift.distributed.partition import rank_length, rank_positions, visible_rows

Schedule = Callable[
    [Comm, torch.Tensor, torch.Tensor, torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]
]


def _timed(
    comm: Comm, fn: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    t0 = time.perf_counter()
    result = fn()
    comm.compute_seconds += time.perf_counter() - t0
    return result


def ring_attention(
    comm: Comm, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values rotate; q, k, v are this rank's slice of an n-token sequence. Returns (out, lse)."""
    parts, rank = comm.world, comm.rank
    q_pos = rank_positions(n, parts, rank)
    out = lse = None
    for step in range(parts):
        source = (rank - step) % parts
        requests, next_k, next_v = [], k, v
        if step < parts - 1:
            incoming = (rank - step - 1) % parts
            size = rank_length(n, parts, incoming)
            next_k = k.new_empty((*k.shape[:2], size, k.shape[-1]))
            next_v = v.new_empty((*v.shape[:2], size, v.shape[-1]))
            requests = [
                comm.isend(k, (rank + 1) % parts, TAG_KEYS),
                comm.isend(v, (rank + 1) % parts, TAG_VALUES),
                comm.irecv(next_k, (rank - 1) % parts, TAG_KEYS),
                comm.irecv(next_v, (rank - 1) % parts, TAG_VALUES),
            ]
        k_pos = rank_positions(n, parts, source)
        block = _timed(comm, lambda: attend_block(q, k, v, q_pos, k_pos, scale))  # noqa: B023
        out, lse = block if out is None else merge(out, lse, *block)
        comm.wait(requests)
        k, v = next_k, next_v
    assert out is not None and lse is not None
    return out, lse


def tokenring_attention(
    comm: Comm, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries travel one way, partial outputs return the other. Returns this rank's (out, lse)."""
    parts, rank = comm.world, comm.rank
    k_pos = rank_positions(n, parts, rank)
    held_q, held_first = q, 0  # the query rows held now: rows held_first.. of their owner's slice
    out = lse = None
    returning: list[tuple[list, torch.Tensor, torch.Tensor, int]] = []  # results on their way back
    for step in range(parts):
        source = (rank + step) % parts
        q_requests, next_q, next_first = [], held_q, held_first
        if step < parts - 1:
            behind, ahead = (rank - 1) % parts, (rank + 1) % parts
            send_first = visible_rows(n, parts, source, behind)
            if send_first < held_first:
                raise RuntimeError("tokenring: the partition sends rows a rank does not hold")
            incoming = (rank + step + 1) % parts
            next_first = visible_rows(n, parts, incoming, rank)
            rows = rank_length(n, parts, incoming) - next_first
            next_q = q.new_empty((*q.shape[:2], rows, q.shape[-1]))
            q_requests = [
                comm.isend(held_q[..., send_first - held_first :, :], behind, TAG_QUERIES),
                comm.irecv(next_q, ahead, TAG_QUERIES),
            ]
        q_pos = rank_positions(n, parts, source)[held_first:]
        block_out, block_lse = _timed(comm, lambda: attend_block(held_q, k, v, q_pos, k_pos, scale))  # noqa: B023
        if step == 0:
            out, lse = block_out, block_lse
        else:
            # Back to the owner of these queries; meanwhile receive our rows computed by rank - step.
            helper = (rank - step) % parts
            first = visible_rows(n, parts, rank, helper)
            got_out = q.new_empty((*q.shape[:2], q.shape[2] - first, q.shape[-1]))
            got_lse = torch.empty(got_out.shape[:-1], dtype=torch.float32, device=q.device)
            requests = [
                comm.isend(block_out.to(q.dtype), source, TAG_OUT),
                comm.isend(block_lse, source, TAG_LSE),
                comm.irecv(got_out, helper, TAG_OUT),
                comm.irecv(got_lse, helper, TAG_LSE),
            ]
            returning.append((requests, got_out, got_lse, first))
        comm.wait(q_requests)
        held_q, held_first = next_q, next_first
        # Results sent back during the previous step have had a whole block of compute to arrive.
        while len(returning) > (1 if step < parts - 1 else 0):
            requests, got_out, got_lse, first = returning.pop(0)
            comm.wait(requests)
            assert out is not None and lse is not None
            merge_into(out, lse, got_out.float(), got_lse, first)
    assert out is not None and lse is not None
    return out, lse


SCHEDULES: dict[str, Schedule] = {"ring": ring_attention, "tokenring": tokenring_attention}


def replicated_attention(
    comm: Comm,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode: every rank has the same queries and its own keys; partials merge by LSE (all_gather)."""
    out, lse = _timed(comm, lambda: attend_block(q, k, v, q_pos, k_pos, scale))
    packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1)
    parts = comm.all_gather(packed)
    out, lse = parts[0][..., :-1], parts[0][..., -1]
    for part in parts[1:]:
        out, lse = merge(out, lse, part[..., :-1], part[..., -1])
    return out
