"""Eviction with the prompt split across ranks: each rank scores its own slice, against one global budget.

Supported: SnapKV (one-shot, scored by the last `window_size` prompt queries). Each rank receives
the window's queries and their final log-sum-exps (all_gather of at most `window_size` rows), so the
probabilities it computes for its own keys are the exact softmax over the whole sequence. The
per-token votes (4 bytes per KV head and token: 1/(2 x head_dim) of the KV bytes) are then
all_gathered, and every rank pools them and takes the top-k exactly as single-process SnapKV does on
the same vector, ties included; each rank keeps the winners in its slice. So the tokens kept are the
ones single-process SnapKV keeps: a global budget, not budget/P per rank (which would keep a
different set whenever the important tokens are unevenly spread, as they usually are).

A rank's heads may keep different numbers of its tokens; they are stored padded to the largest with
padding slots at a position no query sees (counted in the bytes held and in `cp_padding_slots`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokensift.distributed.blocks import PAD_POSITION
from tokensift.distributed.partition import rank_length, rank_positions
from tokensift.errors import TokensiftError
from tokensift.methods.base import EvictionMethod, top_tokens
from tokensift.methods.snapkv import SnapKV, pool_scores
from tokensift.runtime.plan import Plan
from tokensift.runtime.scores import group_mean

if TYPE_CHECKING:
    from tokensift.distributed.cache import ShardCache, ShardLayer


def check_plan(plan: Plan) -> None:
    """Refuse, in one line, what the split cache cannot run exactly."""
    for method in plan.methods:
        if not method.hooks:
            continue
        if isinstance(method, EvictionMethod) and type(method) is SnapKV:
            continue
        raise TokensiftError(
            f"{method.name} does not run with --context-parallel: the split cache composes with "
            "dense attention and snapkv eviction only (methods that need every query's attention "
            "column sums, re-position keys, or choose keys per decode step are not distributed yet)"
        )


def evict_prompt(
    cache: ShardCache, layer: ShardLayer, query: torch.Tensor, lse: torch.Tensor, scale: float
) -> None:
    method = cache.plan.evict
    assert isinstance(method, SnapKV)
    comm, n, w = cache.comm, cache.prompt_len, method.window_size
    budget = method.layer_tokens(layer)
    if n <= budget:
        return
    parts = comm.world
    positions = [rank_positions(n, parts, r).to(query.device) for r in range(parts)]
    # The window's queries with their final LSE, from whichever ranks hold the last w positions.
    window_rows = [int((p >= n - w).sum()) for p in positions]
    mine = positions[comm.rank] >= n - w
    packed = torch.cat([query[:, :, mine].float(), lse[:, :, mine].unsqueeze(-1)], dim=-1)
    gathered = comm.all_gather_padded(packed, 2, window_rows)
    window = torch.cat(gathered, dim=2)
    window_pos = torch.cat([p[p >= n - w] for p in positions])
    order = window_pos.argsort()
    window, window_pos = window[:, :, order], window_pos[order]
    q_w, lse_w = window[..., :-1], window[..., -1]
    # Exact softmax probabilities of the window over this rank's keys, summed over the window.
    b, hq, _, d = q_w.shape
    kv_heads = layer.k.shape[1]
    grouped = q_w.reshape(b, kv_heads, hq // kv_heads, w, d)
    logits = torch.matmul(grouped, layer.k.float().unsqueeze(2).transpose(-1, -2)) * scale
    local_pos = positions[comm.rank]
    logits.masked_fill_(local_pos[None, :] > window_pos[:, None], float("-inf"))
    probs = torch.exp(logits - lse_w.reshape(b, kv_heads, hq // kv_heads, w, 1))
    votes = group_mean(probs.sum(dim=-2).reshape(b, hq, -1), kv_heads)
    # Every rank assembles the global vote vector and selects exactly as single-process SnapKV.
    lengths = [rank_length(n, parts, r) for r in range(parts)]
    everyone = comm.all_gather_padded(votes.contiguous(), 2, lengths)
    total = votes.new_empty(b, kv_heads, n)
    for pos, part in zip(positions, everyone, strict=True):
        total[..., pos] = part
    scores = pool_scores(total[..., : n - w], method.kernel_size, method.pooling)
    scores = torch.cat([scores, scores.new_full((b, kv_heads, w), float("inf"))], dim=-1)
    kept = torch.zeros(b, kv_heads, n, dtype=torch.bool, device=query.device)
    kept.scatter_(-1, top_tokens(scores, budget), True)
    keep_slots(cache, layer, kept[..., local_pos])


def keep_slots(cache: ShardCache, layer: ShardLayer, mask: torch.Tensor) -> None:
    """Keep the slots `mask` (B, H, n) marks, per head; heads padded to the largest count."""
    counts = mask.sum(dim=-1)
    widest, before = int(counts.max()), layer.n
    if bool((counts == before).all()):
        return
    # Kept slots first, in cache order; the tail of each head's row is padding.
    slots = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :widest]
    if widest < before:
        layer.keep(slots)  # counts `before - widest` evicted tokens per head
    else:  # some head keeps all its tokens here: reorder in place (TokenLayer.keep would not)
        assert layer.keys is not None and layer.values is not None and layer.pos is not None
        for t in (layer.keys, layer.values):
            t[..., :widest, :] = t[..., :widest, :].gather(
                2, slots.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])
            )
        layer.pos[..., :widest] = layer.pos[..., :widest].gather(-1, slots)
        layer.version += 1
    assert layer.pos is not None
    padding = torch.arange(widest, device=counts.device)[None, None, :] >= counts[..., None]
    layer.pos[..., :widest][padding] = PAD_POSITION
    layer.evicted += widest - float(counts.float().mean())
    pads = int(padding.sum())
    cache.count("cp_padding_slots", pads)
    cache.count("cp_padding_bytes", pads * 2 * layer.k.shape[-1] * layer.k.element_size())
