"""Block-sparse prefill attention: every query block attends only to the keys gathered for it.

Shared by the sparse-prefill methods (A-shape, MInference, DHSA). A method decides, for each query
block of `block_size` rows and each *group* of query heads, which key indices the block may see
(`index`, padded with the sentinel `n`); this module does the rest with no per-token Python loop:

- the group's queries are packed as rows (query heads sharing one selection and one KV head are
  stacked, so a gathered key serves `rep * block_size` rows),
- the selected K/V rows are gathered into preallocated buffers (fresh allocations page-fault and
  cost more than the gather itself on CPU),
- one fused SDPA call per chunk of (group, block) units computes the attention, with an additive
  mask for causality, padding and (A-shape) the token-exact sliding window.

Work is therefore proportional to rows x selected keys, never rows x n, and the n x n score matrix
is never formed. Causality is by shape as everywhere in the runtime: the L queries of a forward are
the last L of the n keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tokensift.runtime.scores import dense_attention

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenCache

# Elements of gathered K + V + mask per chunk of units (~48 MiB in float32): big enough for fused
# calls to run at full speed, small enough to stay out of the page-fault path.
CHUNK_ELEMENTS = 12 << 20


@dataclass(frozen=True)
class Groups:
    """Which query heads share a selection: `heads[g]` are the query heads of group g (all reading KV
    head `kv[g]`); a selection indexed by group applies to all of them."""

    heads: torch.Tensor  # (G, rep) long
    kv: torch.Tensor  # (G,) long

    @staticmethod
    def per_query_head(q_heads: torch.Tensor, n_rep: int) -> Groups:
        """One group per query head (MInference's per-head patterns)."""
        q_heads = q_heads.long()
        return Groups(q_heads[:, None], q_heads // n_rep)

    @staticmethod
    def per_kv_head(kv_heads: int, n_rep: int, device: torch.device | None = None) -> Groups:
        """One group per KV head holding all its query heads (selections shared across heads)."""
        heads = torch.arange(kv_heads * n_rep, device=device).view(kv_heads, n_rep)
        return Groups(heads, torch.arange(kv_heads, device=device))


def query_blocks(length: int, start_row: int, block_size: int, offset: int) -> tuple[int, torch.Tensor]:
    """Number of query blocks from `start_row` and each block's (first, end) absolute positions."""
    nq = -(-(length - start_row) // block_size)
    first = offset + start_row + torch.arange(nq) * block_size
    return nq, torch.stack([first, (first + block_size).clamp(max=offset + length)], dim=-1)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    index: torch.Tensor,
    groups: Groups,
    out: torch.Tensor,
    *,
    block_size: int,
    start_row: int = 0,
    sinks: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
) -> int:
    """Write attention of rows `start_row..` of the groups' query heads into `out` (B, H_q, L, D).

    q: (B, H_q, L, D); k, v: (B, H_kv, n, D). index: (B or 1, G or 1, nq, m) key indices per query
    block (blocks start at `start_row`), padded with n. A key is visible to a row when its index is
    at most the row's position and, where `window` (G,) is given, when it lies within `window[g]`
    tokens of the row or among the first `sinks[g]` tokens. Every row must see at least one key.
    Returns the number of (row, key) pairs computed, padding included.
    """
    b, hq, length, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    offset = n - length
    g, rep = groups.heads.shape
    nq, m = index.shape[-2:]
    rows = rep * block_size
    device = q.device

    # Queries of each (batch, group, block) unit as one row block: (U, rep * block_size, D).
    span = nq * block_size
    qs = q[:, :, start_row : start_row + span]
    if qs.shape[2] < span:
        qs = F.pad(qs, (0, 0, 0, span - qs.shape[2]))
    packed = (
        qs[:, groups.heads.flatten()]
        .view(b, g, rep, nq, block_size, d)
        .transpose(2, 3)
        .reshape(b * g * nq, rows, d)
    )
    # Absolute position of every packed row (padding rows lie past n and see every real key).
    within = torch.arange(block_size, device=device).repeat(rep)
    q_pos = offset + start_row + torch.arange(nq, device=device)[:, None] * block_size + within  # (nq, rows)

    kf = k.contiguous().view(-1, d)
    vf = v.contiguous().view(-1, d)
    base = (torch.arange(b, device=device)[:, None] * hkv + groups.kv[None, :]) * n  # (B, G)
    idx = index.expand(b, g, nq, m).reshape(-1, m)
    units = idx.shape[0]
    row_of_unit = torch.arange(units, device=device) % nq
    group_of_unit = (torch.arange(units, device=device) // nq) % g

    chunk = max(1, min(units, CHUNK_ELEMENTS // (m * (2 * d + rows))))
    kbuf = k.new_empty(chunk, m, d)
    vbuf = v.new_empty(chunk, m, d)
    mask = q.new_empty(chunk, rows, m)
    seen = torch.empty(chunk, rows, m, dtype=torch.bool, device=device)
    zero, minus_inf = q.new_zeros(()), q.new_full((), float("-inf"))
    result = q.new_empty(units, rows, d)
    for u0 in range(0, units, chunk):
        u1 = min(units, u0 + chunk)
        c = u1 - u0
        ids = idx[u0:u1]
        flat = (ids.clamp(max=n - 1) + base.view(-1)[torch.arange(u0, u1, device=device) // nq, None]).view(-1)
        torch.index_select(kf, 0, flat, out=kbuf[:c].view(-1, d))
        torch.index_select(vf, 0, flat, out=vbuf[:c].view(-1, d))
        qp = q_pos[row_of_unit[u0:u1]]  # (c, rows)
        vis = torch.le(ids[:, None, :], qp[:, :, None], out=seen[:c])
        if window is not None:
            gu = group_of_unit[u0:u1]
            near = (qp[:, :, None] - ids[:, None, :]) < window[gu][:, None, None]
            if sinks is not None:
                near |= (ids < sinks[gu][:, None])[:, None, :]
            vis &= near
        torch.where(vis, zero, minus_inf, out=mask[:c])
        result[u0:u1] = F.scaled_dot_product_attention(
            packed[u0:u1, None], kbuf[:c, None], vbuf[:c, None], attn_mask=mask[:c, None], scale=scale
        )[:, 0]

    stop = min(length, start_row + span)
    unpacked = result.view(b, g, nq, rep, block_size, d).transpose(2, 3).reshape(b, g * rep, span, d)
    out[:, groups.heads.flatten(), start_row:stop] = unpacked[:, :, : stop - start_row]
    return units * rows * m


def causal_pairs(length: int, n: int, rows: slice | None = None) -> int:
    """(row, key) pairs dense causal attention evaluates for the given rows of an L-query forward."""
    offset = n - length
    start, stop, _ = (rows or slice(0, length)).indices(length)
    # Row i sees offset + i + 1 keys.
    return (stop - start) * (offset + 1) + (start + stop - 1) * (stop - start) // 2


def dense_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out: torch.Tensor, start: int, stop: int
) -> int:
    """Exact attention for rows [start, stop) of the forward into `out`; returns pairs per head."""
    if stop <= start:
        return 0
    length, n = q.shape[2], k.shape[2]
    visible = n - length + stop
    out[:, :, start:stop] = dense_attention(
        q[:, :, start:stop], k[:, :, :visible], v[:, :, :visible], scale
    )
    return causal_pairs(length, n, slice(start, stop))


def record(cache: TokenCache, heads: int, pairs: int, length: int, n: int) -> None:
    """Counters every sparse-prefill method reports: pairs computed vs pairs dense would compute."""
    cache.count("prefill_attention_pairs", pairs)
    cache.count("prefill_attention_pairs_dense", heads * causal_pairs(length, n))
