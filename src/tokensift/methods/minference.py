"""MInference: per-head sparse prefill patterns (A-shape, vertical-slash, block-sparse) found offline."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tokensift.errors import TokensiftError
from tokensift.methods.a_shape import a_shape_dense_rows
from tokensift.methods.base import SparsePrefillMethod, register
from tokensift.runtime import block_sparse as bsa
from tokensift.runtime.block_sparse import a_shape_past, a_shape_row_mask

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer

PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
# One head's pattern: (kind, a, b) with (sinks, local), (verticals, slashes) or (key blocks, 0).
HeadPattern = tuple[str, int, int]


def last_query_probs(query: torch.Tensor, keys: torch.Tensor, scale: float, last_q: int) -> torch.Tensor:
    """Softmax attention of the forward's last `last_q` queries over all n keys: (B, H_q, last_q, n),
    causal among themselves. The only score slice vertical-slash needs (last_q x n, never n x n)."""
    b, hq, _, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    rep = hq // hkv
    # The group's query heads as rows against their shared KV head: no repeated keys.
    ql = query[:, :, -last_q:].reshape(b, hkv, rep * last_q, d)
    logits = torch.matmul(ql, keys.transpose(-1, -2)).view(b, hkv, rep, last_q, n).float().mul_(scale)
    tail = logits[..., n - last_q :]
    tail.masked_fill_(
        torch.ones(last_q, last_q, dtype=torch.bool, device=query.device).triu_(1), float("-inf")
    )
    return torch.softmax(logits, dim=-1).view(b, hq, last_q, n)


def diagonal_sums(probs: torch.Tensor) -> torch.Tensor:
    """Attention mass per diagonal: out[..., o] sums probs[..., i, j] over key j = query_i - o, for the
    last rows of an n-key sequence (row i at position n - rows + i). probs: (..., rows, n) -> (..., n).

    Skew trick: with the keys reversed, row i's offset is its column plus i - rows + 1, so shifting
    row i right by i (a strided view of the zero-padded rows) lines each diagonal up in one column.
    """
    rows, n = probs.shape[-2:]
    padded = F.pad(probs.flip(-1), (0, rows))
    skew = padded.flatten(-2)[..., : rows * (n + rows - 1)].view(*probs.shape[:-2], rows, n + rows - 1)
    return skew.sum(-2)[..., rows - 1 : rows - 1 + n]


def _compact(keep: torch.Tensor, values: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    """The kept values of each row, in order, in `width` slots padded with `fill`."""
    slot = torch.where(keep, keep.cumsum(-1) - 1, width)
    out = torch.full((*values.shape[:-1], width + 1), fill, dtype=values.dtype, device=values.device)
    return out.scatter_(-1, slot.clamp_(max=width), values)[..., :width]


def slash_bands(
    probs: torch.Tensor, slash: torch.Tensor, *, block_size: int, recent_slashes: int = 100
) -> torch.Tensor:
    """Past keys the chosen diagonals make a query block read, relative to its first row: (B, H, n)
    bools, entry d - 1 for key first - d. probs: (B, H, last_q, n); slash: (H,) diagonal counts,
    the first `recent_slashes` diagonals forced in (counts include them). As in MInference's
    kernel, diagonal o makes a block read the band of `block_size` keys [first - o, first - o + bs).
    """
    b, h, _, n = probs.shape
    device = probs.device
    slash = slash.clamp(min=recent_slashes, max=n).to(device)
    score = diagonal_sums(probs)
    score[..., :recent_slashes] = math.inf
    top = score.topk(int(slash.max()), dim=-1).indices
    chosen = torch.zeros(b, h, n + 1, dtype=torch.long, device=device)
    ranked = torch.arange(top.shape[-1], device=device) < slash[:, None]
    chosen[..., 1:].scatter_(-1, top, ranked.expand_as(top).long())
    # Key first - d (d >= 1) lies in the band of offset o when d <= o < d + block_size.
    prefix = chosen.cumsum(-1)  # prefix[t] = number of chosen offsets below t
    d = torch.arange(1, n + 1, device=device)
    return (prefix[..., (d + block_size).clamp(max=n)] - prefix[..., d.clamp(max=n)]) > 0


def vertical_slash_past(
    probs: torch.Tensor,
    firsts: torch.Tensor,
    vertical: torch.Tensor,
    slash: torch.Tensor,
    *,
    block_size: int,
    vertical_sinks: int = 30,
    recent_slashes: int = 100,
    covered: torch.Tensor | None = None,
) -> torch.Tensor:
    """Past keys of every query block under the vertical-slash pattern: (B, H, nq, width).

    probs: (B, H, last_q, n) from `last_query_probs`; vertical, slash: (H,) counts per head. The
    vertical score of a key is the attention the last queries give it (the first `vertical_sinks`
    keys forced in; counts include them); diagonals make bands as in `slash_bands` (pass `covered`
    if already computed), and verticals inside a block's bands are skipped, as in the reference
    kernel. The heads share one width (the largest pattern); a block with fewer keys is topped up
    with the next-ranked verticals before it, work the padded kernel would do anyway, so every
    block's keys are a superset of the reference pattern's.
    """
    b, h, _, n = probs.shape
    device = probs.device
    vertical = vertical.clamp(min=vertical_sinks, max=n).to(device)
    if covered is None:
        covered = slash_bands(probs, slash, block_size=block_size, recent_slashes=recent_slashes)
    bands = covered.sum(-1)  # (B, H) past keys the bands give a block far from the start
    width, c = int((bands + vertical).max()), int(bands.max())
    rank = min(n, width + 2 * block_size)
    vert_score = probs.sum(dim=-2)
    vert_score[..., :vertical_sinks] = math.inf
    cand = vert_score.topk(rank, dim=-1).indices  # verticals in rank order
    firsts = firsts.to(device)
    nq = len(firsts)

    # Slash keys of block j: first_j - d for every covered d, ascending; the invalid ones (before key
    # 0, early blocks only) come first.
    d = torch.arange(1, n + 1, device=device)  # distance before the block, near to far
    rel = _compact(covered, -d.expand(b, h, n), c, -(1 << 40)).flip(-1)  # (B, H, c), fill first
    slash_keys = rel[:, :, None, :] + firsts[:, None]  # (B, H, nq, c)
    slash_ok = (slash_keys >= 0).sum(-1, keepdim=True)  # (B, H, nq, 1)
    # Verticals before the block and outside its bands, in rank order, until the block is full.
    gap = firsts[:, None] - cand[:, :, None, :]  # (B, H, nq, rank): key = first - gap
    ok = covered.gather(-1, gap.sub(1).clamp_(0, n - 1).view(b, h, -1)).view(gap.shape).logical_not_()
    ok &= gap >= 1
    slot = ok.cumsum(-1, dtype=torch.int32).add_(slash_ok - 1)  # output slot after the slash keys
    slot.masked_fill_(~ok, width).clamp_(max=width)
    out = torch.full((b, h, nq, width + 1), n, dtype=torch.long, device=device)
    out.scatter_(-1, slot.long(), cand[:, :, None, :].expand(gap.shape))
    # The valid slash keys are the last slash_ok of the c: shift them to the front.
    shift = (torch.arange(c, device=device) - (c - slash_ok)).clamp_(min=-1)
    out.scatter_(-1, torch.where(shift >= 0, shift, width), slash_keys)
    return out[..., :width]


def block_sparse_past(
    query: torch.Tensor, keys: torch.Tensor, start_row: int, top_k: int, block_size: int
) -> torch.Tensor:
    """Past keys of every query block under the block-sparse pattern: (B, H_q, nq, (top_k - 1) * bs).

    Queries and keys are mean-pooled over blocks of `block_size`; each query block keeps its own
    (diagonal) block plus the `top_k - 1` earlier key blocks with the largest pooled dot product.
    Query blocks must start at multiples of the block size (`start_row` from `first_sparse_row`).
    """
    b, hq, length, d = query.shape
    hkv, n = keys.shape[1], keys.shape[2]
    device = query.device
    nq, nk = -(-(length - start_row) // block_size), -(-n // block_size)
    picks = min(top_k - 1, nk)
    if picks <= 0:
        return torch.full((b, hq, nq, 0), n, dtype=torch.long, device=device)

    def pool(x: torch.Tensor, blocks: int) -> torch.Tensor:
        """Mean over each block of rows; the last block may be partial."""
        size = x.shape[2]
        full = size // block_size
        out = x.new_empty(*x.shape[:2], blocks, d)
        out[:, :, :full] = x[:, :, : full * block_size].view(*x.shape[:2], full, block_size, d).mean(-2)
        if full < blocks:
            out[:, :, full:] = x[:, :, full * block_size :].mean(-2, keepdim=True)
        return out

    q_pool, k_pool = pool(query[:, :, start_row:], nq), pool(keys, nk)
    scores = torch.matmul(q_pool.view(b, hkv, hq // hkv, nq, d), k_pool.unsqueeze(2).transpose(-1, -2)).view(
        b, hq, nq, nk
    )
    own = (n - length + start_row) // block_size + torch.arange(nq, device=device)
    scores.masked_fill_(torch.arange(nk, device=device)[None, :] >= own[:, None], -math.inf)
    best = scores.topk(picks, dim=-1)
    tokens = best.indices[..., None] * block_size + torch.arange(block_size, device=device)
    tokens.masked_fill_(best.values[..., None] == -math.inf, n)
    return tokens.flatten(-2)


def group_heads(patterns: list[HeadPattern]) -> dict[HeadPattern | str, list[int]]:
    """Heads by the kernel call that serves them: all vertical-slash heads together, all block-sparse
    heads together, A-shape heads by their (sinks, local)."""
    groups: dict[HeadPattern | str, list[int]] = {}
    for head, (kind, a, b) in enumerate(patterns):
        key: HeadPattern | str = (kind, a, b) if kind == "a_shape" else kind
        groups.setdefault(key, []).append(head)
    return groups


def kv_groups(heads: torch.Tensor, n_rep: int, shared: bool) -> bsa.Groups:
    """Kernel groups for heads of one call: per query head, except that heads sharing a KV head and
    a static pattern (A-shape) are stacked on it when every KV head holds as many of them."""
    if shared:
        kv = heads // n_rep
        counts = torch.bincount(kv)
        counts = counts[counts > 0]
        if bool((counts == counts[0]).all()):
            order = torch.argsort(kv, stable=True)
            return bsa.Groups(heads[order].view(-1, int(counts[0])), kv[order][:: int(counts[0])])
    return bsa.Groups.per_query_head(heads, n_rep)


def parse_patterns(document: dict[str, Any], layers: int, heads: int, source: str) -> list[list[HeadPattern]]:
    """Validate a pattern file: one [kind, a, b, recall] entry per query head of every layer."""
    table = document.get("patterns")
    if not isinstance(table, list) or len(table) != layers or any(len(row) != heads for row in table):
        raise TokensiftError(
            f"minference pattern file {source} does not hold {layers} layers x {heads} heads"
        )
    out = []
    for row in table:
        parsed = []
        for entry in row:
            kind, a, b = entry[0], int(entry[1]), int(entry[2])
            if kind not in PATTERNS:
                raise TokensiftError(f"minference pattern file {source}: unknown pattern {kind!r}")
            parsed.append((kind, a, b))
        out.append(parsed)
    return out


@register
@dataclass
class MInference(SparsePrefillMethod):
    """Sparse prefill with one of three patterns per attention head, chosen offline for the model.

    Each head was assigned A-shape (sinks + local window), vertical-slash or block-sparse by
    `tokensift calibrate minference --model NAME`, which measures on a long prompt how much of each
    head's attention mass every candidate keeps at the same cost and stores the best. At prefill,
    vertical-slash heads estimate their indices online from the last `last_q` queries (top verticals
    and top diagonals, with the first keys and the most recent diagonals forced in), block-sparse
    heads pick key blocks by pooled query-key scores, and A-shape heads use their static window.
    Each query block then attends to its gathered keys only, with fused attention calls. Rows whose
    causal prefix is no longer than a pattern's keys run dense. Decoding is untouched.

    Based on Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
    Dynamic Sparse Attention", NeurIPS 2024.

    Parameters
    ----------
    config:
        Pattern file; by default the model's calibration (user cache, else the one shipped).
    last_q:
        Last queries that estimate vertical-slash indices (paper: 64).
    block_size:
        Query and key block size (paper: 64).
    vertical_sinks:
        First keys always kept by vertical-slash heads (paper: 30).
    recent_slashes:
        Most recent diagonals always kept by vertical-slash heads (kernel: 100).
    dense_tail:
        Last queries of each multi-token forward that attend densely to every key. 0 (default, as
        in the paper) is the patterns alone; 64 lets a question at the end of the prompt see all of
        it (MInference's later Tri-shape). Same parameter and default in every sparse-prefill
        method. The reference runs the heads whose search winner is A-shape or block-sparse as
        vertical-slash (1000, 6096), which at 2K-16K tokens is close to dense; here they run as
        found, which costs the embedded models passkey retrieval without the tail (see the README).
    """

    name = "minference"
    paper = "Jiang et al., MInference 1.0: Accelerating Pre-filling for Long-Context LLMs, NeurIPS 2024"

    config: str = ""
    last_q: int = 64
    block_size: int = 64
    vertical_sinks: int = 30
    recent_slashes: int = 100
    dense_tail: int = 0

    def __post_init__(self) -> None:
        for field_name in ("last_q", "block_size", "vertical_sinks", "recent_slashes"):
            if getattr(self, field_name) < 1:
                raise TokensiftError(f"minference {field_name} must be >= 1, got {getattr(self, field_name)}")
        if self.dense_tail < 0:
            raise TokensiftError(f"minference dense_tail must be >= 0, got {self.dense_tail}")

    def patterns(self, layer: TokenLayer) -> list[HeadPattern]:
        """This layer's per-head patterns, loaded once per generation from the calibration file."""
        shared = layer.cache.shared
        if "minference_patterns" not in shared:
            from tokensift.calibration import load_artefact

            handle = layer.cache.handle
            document = load_artefact("minference", handle, self.config or None)
            shared["minference_patterns"] = parse_patterns(
                document,
                handle.num_layers,
                int(handle.config.num_attention_heads),
                self.config or handle.name,
            )
        return shared["minference_patterns"][layer.index]

    def prefill_attention(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        patterns = self.patterns(layer)
        length = query.shape[2]
        if length < self.last_q:
            layer.cache.note(
                f"minference: a {length}-token forward is shorter than last_q {self.last_q}; "
                "attention ran dense"
            )
            out = query.new_empty(query.shape)
            bsa.dense_rows(query, keys, values, scale, out, length)
            return out
        rep = query.shape[1] // keys.shape[1]
        with bsa.one_thread():
            calls = [
                bsa.SparseCall(
                    first,
                    past,
                    kv_groups(heads, rep, shared=window is not None),
                    heads,
                    row_mask=None if window is None else a_shape_row_mask(*window, self.block_size),
                    window=window,
                )
                for first, heads, past, window in self.layer_plan(query, keys, scale, patterns)
            ]
        return bsa.run_plan(
            layer.cache, self.name, query, keys, values, scale, calls, self.block_size, self.dense_tail
        )

    def layer_plan(
        self, query: torch.Tensor, keys: torch.Tensor, scale: float, patterns: list[HeadPattern]
    ) -> list[tuple[int, torch.Tensor, torch.Tensor, tuple[int, int] | None]]:
        """(start row, heads, past keys, A-shape (sinks, local) or None) for each kernel call of the
        layer; heads whose pattern covers the whole forward are left out (they run dense)."""
        length, n = query.shape[2], keys.shape[2]
        bs, device = self.block_size, query.device
        plans = []
        probs = None
        for key, heads in group_heads(patterns).items():
            index = torch.tensor(heads, device=device)
            if isinstance(key, tuple):
                _, sinks, local = key
                first = a_shape_dense_rows(length, n, sinks, local)
                if first >= length:
                    continue
                firsts = bsa.block_starts(length, n, first, bs).to(device)
                past = a_shape_past(firsts, sinks, local, n)[None, None]
                plans.append((first, index, past, (sinks, local)))
            elif key == "block_sparse":
                top_k = max(patterns[h][1] for h in heads)
                first = bsa.first_sparse_row(length, n, (top_k - 1) * bs, bs)
                if first >= length:
                    continue
                past = block_sparse_past(query, keys, first, top_k, bs)[:, index]
                plans.append((first, index, past, None))
            else:
                if probs is None:
                    probs = last_query_probs(query, keys, scale, self.last_q)
                aligned = bsa.first_sparse_row(length, n, 0, bs)
                past = vertical_slash_past(
                    probs[:, index],
                    bsa.block_starts(length, n, aligned, bs),
                    torch.tensor([patterns[h][1] for h in heads]),
                    torch.tensor([patterns[h][2] for h in heads]),
                    block_size=bs,
                    vertical_sinks=self.vertical_sinks,
                    recent_slashes=self.recent_slashes,
                )
                first = bsa.first_sparse_row(length, n, past.shape[-1], bs)
                if first >= length:
                    continue
                plans.append((first, index, past[:, :, (first - aligned) // bs :], None))
        return plans
