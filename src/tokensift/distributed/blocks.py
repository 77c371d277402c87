"""One block of exact attention that also returns its log-sum-exp, and the merge of such blocks.

A block is some queries against some keys, each with its absolute position; a key is visible to a
query when its position is not later. Blocks computed on different ranks merge exactly through
their log-sum-exps (the online-softmax rule), so splitting the keys changes nothing but rounding.
The LSE is not something torch's public SDPA returns, so a block is a chunked matmul + logsumexp:
never more than `MAX_CHUNK_ELEMENTS` logits at once, and only over the keys a chunk can see.
"""

from __future__ import annotations

import itertools

import torch

from tokensift.runtime.scores import MAX_CHUNK_ELEMENTS, chunk_rows

# Position given to padding slots of a layer's per-head storage: later than any query, so never seen.
PAD_POSITION = 1 << 62


def _runs(pos: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) spans of consecutive positions in a sorted position vector."""
    if pos.numel() == 0:
        return []
    breaks = (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist()
    edges = [0, *breaks, pos.numel()]
    return list(itertools.pairwise(edges))


def attend_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    max_elements: int = MAX_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q (B, H_q, L, D) over k, v (B, H_kv, n, D): (out float32, lse float32 (B, H_q, L)).

    q_pos (L,) is sorted. k_pos is (n,) sorted (prompt blocks: each query chunk only touches the
    key prefix it can see) or (B, H_kv, n) per head (a decode cache after eviction, padding slots at
    `PAD_POSITION`). Rows that see no key get out 0 and lse -inf, which the merge ignores.
    """
    b, hq, length, d = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    rep = hq // kv_heads
    q_pos, k_pos = q_pos.to(q.device), k_pos.to(q.device)
    qg = q.reshape(b, kv_heads, rep, length, d)
    kt = k.unsqueeze(2).transpose(-1, -2)
    vg = v.unsqueeze(2)
    out = torch.zeros(b, kv_heads, rep, length, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, kv_heads, rep, length), float("-inf"), dtype=torch.float32, device=q.device)
    shared = k_pos.dim() == 1
    step = chunk_rows(max(n, 1), hq, max_elements)
    for start, end in _runs(q_pos):
        for s in range(start, end, step):
            e = min(end, s + step)
            rows = q_pos[s:e]
            if shared:
                visible = int(torch.searchsorted(k_pos, rows[-1], right=True))
                if visible == 0:
                    continue
                keys_pos = k_pos[:visible]
                masked = bool(keys_pos[-1] > rows[0])
            else:
                visible, keys_pos, masked = n, k_pos.unsqueeze(2), True
            logits = torch.matmul(qg[..., s:e, :], kt[..., :visible]).float().mul_(scale)
            if masked:
                logits.masked_fill_(keys_pos.unsqueeze(-2) > rows[:, None], float("-inf"))
            block_lse = torch.logsumexp(logits, dim=-1)
            safe = torch.where(torch.isfinite(block_lse), block_lse, torch.zeros_like(block_lse))
            probs = torch.exp(logits - safe.unsqueeze(-1))
            out[..., s:e, :] = torch.matmul(probs.to(v.dtype), vg[..., :visible, :]).float()
            lse[..., s:e] = block_lse
    return out.reshape(b, hq, length, d), lse.reshape(b, hq, length)


def merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets: out (..., L, D), lse (..., L)."""
    top = torch.maximum(lse, block_lse)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    a, b = torch.exp(lse - top), torch.exp(block_lse - top)
    total = a + b
    new_out = (out * a.unsqueeze(-1) + block_out * b.unsqueeze(-1)) / torch.where(
        total > 0, total, torch.ones_like(total)
    ).unsqueeze(-1)
    return new_out, top + torch.log(total)


def merge_into(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor, first_row: int
) -> None:
    """Merge a block covering rows first_row.. of (out, lse) in place."""
    o, m = merge(out[..., first_row:, :], lse[..., first_row:], block_out, block_lse)
    out[..., first_row:, :] = o
    lse[..., first_row:] = m
