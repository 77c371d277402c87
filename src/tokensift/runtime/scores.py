"""Score slices that methods need, computed in chunks: never a full n x n attention matrix.

Causality is by shape everywhere: a forward's L queries are the last L of the n keys, so query i sees
keys j <= n - L + i. GQA follows transformers: query head h uses KV head h // n_rep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # masked logits -> the scores whose column sums count

# Upper bound on the elements of one chunk of logits (16 MiB in float32): small chunks stay in cache.
MAX_CHUNK_ELEMENTS = 1 << 22


class KeyBias:
    """An additive logit bias per query head and key slot of the layer that is attending: (B, H_q, n).

    Set by the runtime around one layer's attention (`key_bias`); the exact kernels below (and the
    gathered sparse-decode kernel) add it to their logits, as an additive mask column for the fused
    SDPA calls, and mark it `used`. A kernel that cannot apply it leaves `used` False, and the
    runtime reports that the bias did not run there.
    """

    def __init__(self, columns: torch.Tensor):
        self.columns = columns
        self.used = False

    def take(self, n_keys: int, q_heads: int) -> torch.Tensor | None:
        """The columns for an attention of all query heads over all n_keys slots of the layer (None
        for an attention over a part of them)."""
        if self.columns.shape[-1] != n_keys or self.columns.shape[1] != q_heads:
            return None
        self.used = True
        return self.columns


ACTIVE_BIAS: ContextVar[KeyBias | None] = ContextVar("tokensift_key_bias", default=None)


@contextmanager
def key_bias(columns: torch.Tensor | None) -> Iterator[KeyBias | None]:
    """Make `columns` (B, H_q, n) the bias of the attention computed inside the block."""
    bias = None if columns is None else KeyBias(columns)
    token = ACTIVE_BIAS.set(bias)
    try:
        yield bias
    finally:
        ACTIVE_BIAS.reset(token)


def active_bias(n_keys: int, q_heads: int) -> torch.Tensor | None:
    bias = ACTIVE_BIAS.get()
    return None if bias is None else bias.take(n_keys, q_heads)


class TreeMask:
    """Which of a multi-token forward's own tokens each of its queries sees: (L, L) bool, row i
    seeing new token j (tree verification: a node sees its ancestors and itself; a plain forward is
    the lower triangle). Keys already cached are visible to every query. Set around a whole model
    forward (`tree_mask`); the exact kernels below apply it and mark it `used` per layer, and the
    runtime refuses a layer whose kernel did not (a tree forward must never run as a causal one).
    """

    def __init__(self, visible: torch.Tensor):
        self.visible = visible
        self.used = False

    def take(self, length: int) -> torch.Tensor | None:
        if self.visible.shape[-1] != length:
            return None
        self.used = True
        return self.visible


ACTIVE_TREE: ContextVar[TreeMask | None] = ContextVar("tokensift_tree_mask", default=None)


@contextmanager
def tree_mask(visible: torch.Tensor | None) -> Iterator[TreeMask | None]:
    """Make `visible` (L, L) bool the new-token visibility of the forward run inside the block."""
    mask = None if visible is None else TreeMask(visible)
    token = ACTIVE_TREE.set(mask)
    try:
        yield mask
    finally:
        ACTIVE_TREE.reset(token)


def active_tree(length: int) -> torch.Tensor | None:
    mask = ACTIVE_TREE.get()
    return None if mask is None or length == 1 else mask.take(length)


def _visible_block(tree: torch.Tensor, first: int, last: int, offset: int, visible: int) -> torch.Tensor:
    """Bool mask (last - first, visible) for queries first..last-1 of a tree forward: every cached key,
    then the new tokens the tree lets each query see."""
    rows = last - first
    past = torch.ones(rows, offset, dtype=torch.bool, device=tree.device)
    return torch.cat([past, tree[first:last, : visible - offset]], dim=1)


def group_mean(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Reduce per-query-head scores (B, H_q, ...) to per-KV-head scores (B, H_kv, ...) by the group mean."""
    b, hq = x.shape[:2]
    if hq == kv_heads:
        return x
    return x.reshape(b, kv_heads, hq // kv_heads, *x.shape[2:]).mean(dim=2)


def chunk_rows(n_keys: int, heads: int, max_elements: int = MAX_CHUNK_ELEMENTS) -> int:
    """How many query rows fit in one chunk of logits over n_keys keys for `heads` query heads."""
    return max(1, max_elements // max(1, heads * n_keys))


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, hq, length, d = q.shape
    return q.reshape(b, kv_heads, hq // kv_heads, length, d)


def _mask_causal_block(logits: torch.Tensor, first_query: int, offset: int) -> None:
    """Mask keys after each query in place. Rows are queries first_query.. (relative), keys absolute."""
    rows, cols = logits.shape[-2], logits.shape[-1]
    q_abs = torch.arange(rows, device=logits.device) + first_query + offset
    start = offset + first_query  # keys before this column are visible to every row of the chunk
    if start + 1 >= cols:
        return
    k_abs = torch.arange(start + 1, cols, device=logits.device)
    future = k_abs[None, :] > q_abs[:, None]
    logits[..., start + 1 :].masked_fill_(future, float("-inf"))


def attention_with_colsums(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    max_elements: int = MAX_CHUNK_ELEMENTS,
    score_fn: ScoreFn | Sequence[ScoreFn | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention output plus the column sums of the softmax probabilities (H2O, Keyformer).

    q: (B, H_q, L, D); k, v: (B, H_kv, n, D) with the L queries being the last L positions.
    Returns out (B, H_q, L, D) and colsum (B, H_q, n), the attention each key received summed over
    this forward's queries. Memory is O(chunk * n), compute O(L * n). `score_fn` turns a chunk of
    masked logits (B, H_kv, n_rep, rows, keys) into the scores summed instead of the probabilities
    (Keyformer's Gumbel softmax); the attention output always uses the plain softmax. A sequence of
    score functions (None: the probabilities) accumulates one column sum per function from the same
    logits, each exactly as alone, stacked: (F, B, H_q, n) (one shared prefill for several scorers).
    """
    b, hq, length, d = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    offset = n - length
    qg = _grouped(q, kv_heads)
    kt = k.unsqueeze(2).transpose(-1, -2)
    vg = v.unsqueeze(2)
    out = q.new_empty(qg.shape)
    several = isinstance(score_fn, (list, tuple))
    fns: list[ScoreFn | None] = list(score_fn) if several else [score_fn]  # type: ignore[arg-type,list-item]
    sums = [torch.zeros(b, kv_heads, hq // kv_heads, n, dtype=torch.float32, device=q.device) for _ in fns]
    step = chunk_rows(n, hq, max_elements)
    bias = active_bias(n, hq)
    if bias is not None:
        bias = bias.float().reshape(b, kv_heads, hq // kv_heads, 1, n)
    tree = active_tree(length)
    for s in range(0, length, step):
        e = min(length, s + step)
        visible = offset + e
        logits = torch.matmul(qg[..., s:e, :], kt[..., :visible]).float().mul_(scale)
        if bias is not None:
            logits += bias[..., :visible]
        if tree is not None:
            logits.masked_fill_(~_visible_block(tree, s, e, offset, visible), float("-inf"))
        else:
            _mask_causal_block(logits, s, offset)
        probs = torch.softmax(logits, dim=-1)
        out[..., s:e, :] = torch.matmul(probs.to(v.dtype), vg[..., :visible, :])
        for colsum, fn in zip(sums, fns, strict=True):
            colsum[..., :visible] += (probs if fn is None else fn(logits)).sum(dim=-2)
    colsums = [colsum.reshape(b, hq, n) for colsum in sums]
    return out.reshape(b, hq, length, d), torch.stack(colsums) if several else colsums[0]


def window_scores(q_window: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of the last w queries over all n keys, summed over the window: (B, H_q, n).

    Used by SnapKV and CompressKV: only a w x n slice is ever formed.
    """
    b, hq, w, _ = q_window.shape
    kv_heads, n = k.shape[1], k.shape[2]
    # Scaled in place: no second w x n copy (a float32 matmul's result is its own fresh tensor).
    logits = torch.matmul(_grouped(q_window, kv_heads), k.unsqueeze(2).transpose(-1, -2)).float().mul_(scale)
    _mask_causal_block(logits, 0, n - w)
    return torch.softmax(logits, dim=-1).sum(dim=-2).reshape(b, hq, n)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal attention through SDPA, GQA without repeating keys. Returns (B, H_q, L, D).

    An active `key_bias` is added to the logits as an additive mask column (fused SDPA throughout).
    """
    b, hq, length, d = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    rep = hq // kv_heads
    bias = active_bias(n, hq)
    tree = active_tree(length)
    if bias is not None or tree is not None:
        if bias is None:
            bias = q.new_zeros(b, hq, n)
        return _biased_attention(q, k, v, scale, bias.to(q.dtype), tree)
    if length == 1:
        if rep == 1:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        # One query per head: pack the group's queries as rows against their shared KV head.
        packed = q.reshape(b, kv_heads, rep, d)
        return F.scaled_dot_product_attention(packed, k, v, scale=scale).reshape(b, hq, 1, d)
    if length == n:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=rep > 1)
    # Queries appended to a cache: bottom-right causal mask, built per chunk of queries.
    out = q.new_empty(b, hq, length, d)
    offset = n - length
    step = chunk_rows(n, 1, MAX_CHUNK_ELEMENTS // 4)
    for s in range(0, length, step):
        e = min(length, s + step)
        q_abs = torch.arange(s, e, device=q.device) + offset
        mask = torch.arange(offset + e, device=q.device)[None, :] <= q_abs[:, None]
        out[:, :, s:e] = F.scaled_dot_product_attention(
            q[:, :, s:e],
            k[:, :, : offset + e],
            v[:, :, : offset + e],
            attn_mask=mask,
            scale=scale,
            enable_gqa=rep > 1,
        )
    return out


def _biased_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor,
    tree: torch.Tensor | None = None,
) -> torch.Tensor:
    """`dense_attention` with an additive bias (B, H_q, n) on the logits, as a float SDPA mask, and
    the new tokens masked by `tree` (L, L) instead of causally when given."""
    b, hq, length, d = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    rep = hq // kv_heads
    if length == 1:
        # Pack the group's queries as rows against their shared KV head; the bias rows follow.
        packed = q.reshape(b, kv_heads, rep, d)
        mask = bias.reshape(b, kv_heads, rep, n)
        return F.scaled_dot_product_attention(packed, k, v, attn_mask=mask, scale=scale).reshape(b, hq, 1, d)
    out = q.new_empty(b, hq, length, d)
    offset = n - length
    step = chunk_rows(n, hq, MAX_CHUNK_ELEMENTS)
    for s in range(0, length, step):
        e = min(length, s + step)
        visible = offset + e
        if tree is not None:
            hidden = ~_visible_block(tree, s, e, offset, visible)
        else:
            q_abs = torch.arange(s, e, device=q.device) + offset
            hidden = torch.arange(visible, device=q.device)[None, :] > q_abs[:, None]
        mask = torch.where(hidden, float("-inf"), bias[:, :, None, :visible])
        out[:, :, s:e] = F.scaled_dot_product_attention(
            q[:, :, s:e],
            k[:, :, :visible],
            v[:, :, :visible],
            attn_mask=mask,
            scale=scale,
            enable_gqa=rep > 1,
        )
    return out
