"""DHSA: dynamic hierarchical sparse attention with learned chunk boundaries."""

from __future__ import annotations

import base64
import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from tokensift.errors import TokensiftError
from tokensift.methods.base import Budget, SparsePrefillMethod, check_budget, register, resolve_budget
from tokensift.runtime import block_sparse as bsa

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


CHUNKINGS = ("learned", "fixed")


class BoundaryPredictor(nn.Module):
    """The paper's boundary predictor (BoundarySimilarityAttn): for every gap after token t it encodes
    the `window` keys left of the gap and the `window` keys right of it with one self-attention
    layer over the 2*window tokens, mean-pools each side and scores [left, right, |left - right|,
    left * right, cosine] with an MLP. Input: a layer's keys, KV heads concatenated (B, L, C)."""

    def __init__(self, channels: int, window: int = 4, hidden: int = 256, heads: int = 4):
        super().__init__()
        self.window = window
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(4 * channels + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Boundary logits (B, L): logit t scores a chunk boundary between tokens t and t + 1."""
        b, length, c = x.shape
        w, heads = self.window, self.attn.num_heads
        # nn.MultiheadAttention over each window of 2w tokens (zeros beyond both ends, as in the
        # reference), with the per-token input projection done once per token instead of per window.
        proj = F.linear(F.pad(x, (0, 0, w - 1, w)), self.attn.in_proj_weight, self.attn.in_proj_bias)
        windows = proj.unfold(1, 2 * w, 1).permute(0, 1, 3, 2).reshape(b * length, 2 * w, 3, heads, -1)
        q, k, v = (t.transpose(1, 2) for t in windows.unbind(2))
        mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * length, 2 * w, c)
        enc = self.norm(self.attn.out_proj(mixed))
        left = enc[:, :w].mean(1).view(b, length, c)
        right = enc[:, w:].mean(1).view(b, length, c)
        sim = F.cosine_similarity(left, right, dim=-1, eps=1e-6)[..., None]
        feats = torch.cat([left, right, (left - right).abs(), left * right, sim], dim=-1)
        return self.mlp(feats).squeeze(-1)

    def state(self) -> dict[str, Any]:
        """Weights as JSON-friendly float16 base64 strings with their shapes."""
        return {
            name: {"shape": list(t.shape), "f16": base64.b64encode(t.half().numpy().tobytes()).decode()}
            for name, t in self.state_dict().items()
        }

    @classmethod
    def from_state(cls, config: dict[str, Any], weights: dict[str, Any]) -> BoundaryPredictor:
        model = cls(
            int(config["channels"]), int(config["window"]), int(config["hidden"]), int(config["heads"])
        )
        tensors = {}
        for name, entry in weights.items():
            raw = torch.frombuffer(bytearray(base64.b64decode(entry["f16"])), dtype=torch.float16)
            tensors[name] = raw.float().reshape(entry["shape"])
        model.load_state_dict(tensors)
        return model.eval()


def key_features(keys: torch.Tensor) -> torch.Tensor:
    """Predictor input from a layer's keys (B, H_kv, L, D): KV heads concatenated, (B, L, H_kv * D)."""
    b, h, length, d = keys.shape
    return keys.transpose(1, 2).reshape(b, length, h * d).float()


def nms_1d(scores: torch.Tensor, candidates: torch.Tensor, window: int) -> torch.Tensor:
    """Greedy 1-D non-maximum suppression, vectorised: a candidate survives unless a higher-scoring
    survivor lies within `window` positions. scores, candidates: (L,). Returns a bool mask (L,).

    Each round keeps every candidate that beats all remaining candidates within the window (greedy
    would keep it too) and removes their neighbours; rounds repeat until none remain, which gives
    exactly the greedy result.
    """
    length = scores.shape[0]
    # Distinct ranks break ties the way a stable descending sort does (earlier position first).
    order = torch.sort(scores, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(length, device=scores.device))
    strength = (length - rank).float()
    alive = candidates.clone()
    kept = torch.zeros_like(candidates)
    span = 2 * window + 1
    while bool(alive.any()):
        s = torch.where(alive, strength, 0.0)[None, None]
        peak = alive & (F.max_pool1d(s, span, 1, window)[0, 0] == s[0, 0])
        kept |= peak
        near = F.max_pool1d(peak.float()[None, None], span, 1, window)[0, 0] > 0
        alive &= ~near
    return kept


def select_boundaries(
    logits: torch.Tensor,
    chunks: int,
    *,
    window: int = 4,
    threshold: float | None = 1.1,
    nms_window: int = 8,
    tail: int = 64,
) -> torch.Tensor:
    """Chunk boundaries [0, b_1, ..., L] from boundary logits (L,), as the paper's inference does:
    the first window - 1 and last `window` gaps are excluded, gaps scoring above `threshold` (every
    gap when None) are candidates, greedy NMS with `nms_window` picks at most `chunks` of them by
    score, and the gap before the last `tail` tokens (the instruction) is always a boundary with none
    after it."""
    length = logits.shape[0]
    logits = logits.clone()
    logits[: window - 1] = -100.0
    logits[max(0, length - window) :] = -100.0
    cand = logits > (threshold if threshold is not None else -100.0)  # -100: the excluded gaps
    forced = length - tail if 0 < tail < length else None
    if forced is not None:
        cand[forced - nms_window : forced + nms_window + 1] = False
        cand[forced:] = False
    kept = nms_1d(logits, cand, nms_window)
    picks = torch.nonzero(kept).flatten()
    budget = chunks - (forced is not None)
    if picks.numel() > budget:
        picks = picks[logits[picks].topk(max(0, budget)).indices]
    if forced is not None:
        picks = torch.cat([picks, torch.tensor([forced - 1], device=picks.device)])
    inner = torch.unique(picks + 1)
    inner = inner[(inner > 0) & (inner < length)]
    ends = torch.tensor([0, length], device=logits.device)
    return torch.cat([ends[:1], inner, ends[1:]])


def even_boundaries(length: int, chunks: int, tail: int = 0) -> torch.Tensor:
    """Boundaries [0, ..., L] of `chunks` chunks of (near) equal length; with a `tail`, the last chunk
    is the last `tail` tokens, as `select_boundaries` forces, and the others share the rest."""
    forced = 0 < tail < length
    body = length - tail if forced else length
    inner = max(1, chunks - forced)
    edges = torch.unique(torch.linspace(0, body, inner + 1).round().long())
    return torch.cat([edges, torch.tensor([length])]) if forced else edges


def chunk_keys(keys: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Length-normalised chunk representations (B, C, D): the mean key of each chunk [b_i, b_i+1)
    times sqrt(chunk length), from prefix sums. keys: (B, L, D) (already averaged over heads)."""
    prefix = F.pad(keys.cumsum(dim=1), (0, 0, 1, 0))
    sums = prefix[:, boundaries[1:]] - prefix[:, boundaries[:-1]]
    lengths = (boundaries[1:] - boundaries[:-1]).clamp(min=1).to(keys.dtype)[None, :, None]
    return sums / lengths * lengths.sqrt()


def upsample(chunk_scores: torch.Tensor, boundaries: torch.Tensor, n: int) -> torch.Tensor:
    """Token-level scores (..., n) from chunk-level scores (..., C): token j takes its chunk's score."""
    chunk_of = torch.searchsorted(boundaries, torch.arange(n, device=boundaries.device), right=True) - 1
    return chunk_scores[..., chunk_of]


def block_queries(query: torch.Tensor, start_row: int, block_size: int) -> torch.Tensor:
    """Query block representations (B, nq, D): the mean query over heads and the block's rows, times
    sqrt(rows) (the length-normalised aggregation; only a partial last block differs)."""
    b, h, length, d = query.shape
    full = (length - start_row) // block_size
    sums = query[:, :, start_row : start_row + full * block_size].view(b, h, full, block_size, d).sum((1, 3))
    rows = [block_size] * full
    if start_row + full * block_size < length:
        sums = torch.cat([sums, query[:, :, start_row + full * block_size :].sum((1, 2))[:, None]], dim=1)
        rows.append(length - start_row - full * block_size)
    counts = torch.tensor(rows, dtype=sums.dtype, device=sums.device)[:, None]
    return sums.float() / (h * counts) * counts.sqrt()


def dhsa_past(
    query: torch.Tensor,
    keys: torch.Tensor,
    boundaries: torch.Tensor,
    start_row: int,
    *,
    budget: int,
    block_size: int,
    sinks: int,
    local: int,
) -> torch.Tensor:
    """Past keys of every query block, shared by all heads: (B, 1, nq, budget - block_size).

    Query blocks (from `start_row`, with at least budget - block_size keys before each) and key
    chunks are represented by length-normalised means over heads; each block keeps the first `sinks`
    tokens, the `local` most recent ones (its own block included) and the tokens with the best
    upsampled chunk score among the others. Selecting whole chunks in score order, the last one cut
    to fit, picks the same tokens as a top-k over the upsampled token scores (up to ties), at
    chunk rather than token cost.
    """
    b, _, length, _ = query.shape
    n = keys.shape[2]
    device = query.device
    q_rep = block_queries(query, start_row, block_size)
    k_rep = chunk_keys(keys.mean(dim=1).float(), boundaries)
    scores = torch.matmul(q_rep, k_rep.transpose(1, 2))  # (B, nq, C): chunk-level similarity
    nq = scores.shape[1]

    firsts = bsa.block_starts(length, n, start_row, block_size).to(device)
    recent = local - block_size  # recent tokens before the block (the rest of `local` is the block)
    picks = budget - block_size - sinks - recent
    # Tokens of chunk c open to block j (past the sinks, before its recent window): [lo, hi).
    lo = boundaries[:-1].clamp(min=sinks)
    hi = torch.minimum(boundaries[1:][None, :], (firsts - recent)[:, None])
    size = (hi - lo).clamp_(min=0)  # (nq, C)
    scores.masked_fill_(size[None] == 0, -math.inf)
    order = scores.argsort(dim=-1, descending=True)  # (B, nq, C)
    sizes = size.expand(b, nq, -1).gather(-1, order)
    ends = sizes.cumsum(-1)
    slot = torch.arange(picks, device=device).expand(b, nq, picks).contiguous()
    pos = torch.searchsorted(ends, slot, right=True)  # which ranked chunk fills each slot
    into = slot - (ends.gather(-1, pos) - sizes.gather(-1, pos))
    top = lo[order.gather(-1, pos)] + into

    sink = torch.arange(sinks, device=device).expand(b, nq, sinks)
    near = (firsts - recent)[:, None] + torch.arange(recent, device=device)
    return torch.cat([sink, top, near.expand(b, nq, recent)], dim=-1)[:, None]


@register
@dataclass
class DHSA(SparsePrefillMethod):
    """Dynamic hierarchical sparse prefill: learned chunks, chunk-level scores, token-level top-k.

    A small trained boundary predictor reads the first layer's keys and marks chunk boundaries
    (threshold, greedy NMS, at most L / block_size * chunk_beta chunks; the last `dense_tail`
    tokens form their own chunk); the boundaries are shared by all layers. In every layer, query
    blocks of `block_size` rows and the key chunks are represented by head-averaged means scaled by
    sqrt(length) (so neither short nor long chunks are favoured); chunk scores are upsampled to
    tokens, and each query block attends to the first `sinks` tokens, the `local` most recent ones
    and the best-scoring others, `budget` tokens in all, shared by every head. The last `dense_tail`
    queries (the instruction) attend densely. Decoding stays dense, as in the reference code.

    Based on Xiong, Zou, Fekri and Cho, "Long-Context Modeling with Dynamic Hierarchical Sparse
    Attention for On-Device LLMs", arXiv 2510.24606 (legacy, paper-v1 code path).

    The predictor is trained per model by `tokensift calibrate dhsa --model NAME` following the
    paper's recipe for labels and loss (the attention-mass ratio across each gap, positive at 2x;
    focal BCE, gamma 2, pos_weight 1.3; Adam), with these parts not reproduced: the training data
    (the paper's ~60K long QA and summarisation samples from six Hugging Face datasets, 512-8K
    tokens, are replaced by 20 windows of 2048 tokens of the shipped Jane Austen novels), the base
    model (Gemma-2-2B there), the optimisation scale (two epochs over ~60K samples at lr 1e-4 there;
    here ~160 Adam steps at lr 1e-3, each on 512-token slices of 6 layers), and the released
    predictor weights (for Gemma-2, and not reachable offline). The reference's quirk of overwriting
    the 128 lowest selected indices with the sinks is replaced by reserving `sinks` slots.

    Parameters
    ----------
    budget:
        Keys each query block attends to (its own block, sinks and local included): an int or a
        fraction of the prompt (paper: 2048 for 8K-128K prompts).
    block_size:
        Query block rows (paper flag default: 64).
    sinks:
        First tokens every block keeps (code: 128 global tokens).
    local:
        Most recent tokens every block keeps, its own block included (code: 128).
    dense_tail:
        Last queries of each multi-token forward that attend densely to every key; with a tail, the
        gap before it is also a forced chunk boundary (the instruction is its own chunk). 0
        (default) is the sparse pattern alone; the reference code uses 64. Same parameter and
        default in every sparse-prefill method.
    chunk_beta:
        At most L / block_size * chunk_beta chunks (code: 8).
    threshold:
        Boundary logit threshold; None (default) takes the one calibrated with the predictor
        (`tokensift calibrate dhsa` picks the F1-best threshold on held-out windows, so that
        boundaries are the gaps the predictor calls boundaries). Code: 1.1, on its released
        predictor's logit scale, where our predictors put almost no gap. A very low value (-100)
        makes every gap a candidate, leaving the boundaries to NMS spacing.
    nms_window:
        NMS half-width between boundaries (code: 8).
    chunking:
        "learned" (default) or "fixed": the ablation, with as many equal-length chunks as the
        predictor makes on the same prompt (same mean chunk length, same budget, so the same
        sparsity), to measure what the learned boundaries add.
    predictor:
        Predictor file; by default the model's calibration (user cache, else shipped).
    """

    name = "dhsa"
    paper = "Xiong et al., Long-Context Modeling with Dynamic Hierarchical Sparse Attention, arXiv 2510.24606"

    budget: Budget = 1024
    block_size: int = 64
    sinks: int = 128
    local: int = 128
    dense_tail: int = 0
    chunk_beta: int = 8
    threshold: float | None = None
    nms_window: int = 8
    chunking: str = "learned"
    predictor: str = ""
    budget_tokens: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if self.block_size < 1 or self.chunk_beta < 1 or self.nms_window < 0:
            raise TokensiftError("dhsa block_size and chunk_beta must be >= 1 and nms_window >= 0")
        if self.sinks < 0 or self.dense_tail < 0:
            raise TokensiftError("dhsa sinks and dense_tail must be >= 0")
        if self.local < self.block_size:
            raise TokensiftError(f"dhsa local ({self.local}) must cover a block ({self.block_size} tokens)")
        if self.chunking not in CHUNKINGS:
            raise TokensiftError(f"dhsa chunking must be {' or '.join(CHUNKINGS)}, not {self.chunking!r}")

    def resolve(self, prompt_tokens: int) -> Self:
        new = dataclasses.replace(self)
        new.budget_tokens = resolve_budget(self.budget, prompt_tokens)
        if new.budget_tokens < self.sinks + self.local:
            raise TokensiftError(
                f"dhsa budget resolves to {new.budget_tokens} tokens, less than sinks {self.sinks} + "
                f"local {self.local}"
            )
        return new

    def resolved_params(self) -> dict[str, Any]:
        return {**self.params(), "budget_tokens": self.budget_tokens}

    def boundary_predictor(self, layer: TokenLayer) -> BoundaryPredictor:
        shared = layer.cache.shared
        if "dhsa_predictor" not in shared:
            from tokensift.calibration import load_artefact

            document = load_artefact("dhsa", layer.cache.handle, self.predictor or None)
            shared["dhsa_predictor"] = BoundaryPredictor.from_state(
                document["predictor"], document["weights"]
            ).to(layer.cache.handle.device)  # float32 (key_features casts), on the model's device
            shared["dhsa_threshold"] = (document.get("threshold") or {}).get("logit")
        return shared["dhsa_predictor"]

    def logit_threshold(self, layer: TokenLayer) -> float | None:
        """The threshold given, else the one calibrated with the predictor; a predictor file from
        before thresholds were calibrated gives None (every gap a candidate), with a note."""
        if self.threshold is not None:
            return self.threshold
        self.boundary_predictor(layer)
        calibrated = layer.cache.shared["dhsa_threshold"]
        if calibrated is None:
            name = layer.cache.handle.name
            layer.cache.note(
                f"dhsa: the predictor of {name} has no calibrated threshold, so every gap was a boundary "
                f"candidate (NMS spacing sets the chunks): run `tokensift calibrate dhsa --model {name} "
                "--reuse-predictor FILE` or pass threshold=..."
            )
            return None
        return float(calibrated)

    def boundaries(self, layer: TokenLayer, keys: torch.Tensor) -> torch.Tensor:
        """Chunk boundaries over the n keys, predicted from the first layer's keys, shared by layers."""
        shared = layer.cache.shared
        n = keys.shape[2]
        cached = shared.get("dhsa_boundaries")
        if layer.index == 0 or cached is None or int(cached[-1]) != n:
            logits = self.boundary_logits(layer, keys)
            chunks = n // self.block_size * self.chunk_beta
            tail = self.dense_tail if self.dense_tail < n else 0
            window = self.boundary_predictor(layer).window
            cached = select_boundaries(
                logits,
                chunks,
                window=window,
                threshold=self.logit_threshold(layer),
                nms_window=self.nms_window,
                tail=tail,
            )
            if self.chunking == "fixed":
                cached = even_boundaries(n, len(cached) - 1, tail).to(cached.device)
            shared["dhsa_boundaries"] = cached
            layer.cache.count("dhsa_chunks", len(cached) - 1)
        return cached

    def boundary_logits(self, layer: TokenLayer, keys: torch.Tensor) -> torch.Tensor:
        """Predictor logits for all n keys of the first layer. A later forward (chunked prefill)
        recomputes only the gaps whose right-hand window it changed, while the cache is append-only."""
        predictor = self.boundary_predictor(layer)
        shared, n, w = layer.cache.shared, keys.shape[2], predictor.window
        old = shared.get("dhsa_logits")
        keep = 0
        if old is not None and old[0] == layer.version and old[1].shape[0] < n:
            keep = max(0, old[1].shape[0] - w)  # gaps whose window reached past the old end change
        first = max(0, keep - (w - 1))  # left context of the first recomputed gap
        with torch.inference_mode():
            fresh = predictor(key_features(keys[:1, :, first:]))[0][keep - first :]
        logits = torch.cat([old[1][:keep], fresh]) if keep else fresh
        shared["dhsa_logits"] = (layer.version, logits)
        return logits

    def prefill_attention(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        budget = (
            self.budget_tokens
            if self.budget_tokens is not None
            else resolve_budget(self.budget, keys.shape[2])
        )
        length, n = query.shape[2], keys.shape[2]
        # Blocks with no more than budget - block_size keys before them would keep them all: dense.
        start = bsa.first_sparse_row(length, n, budget - self.block_size + 1, self.block_size)
        calls = []
        if start < bsa.tail_start(length, self.dense_tail):
            boundaries = self.boundaries(layer, keys)
            with bsa.one_thread():
                past = dhsa_past(
                    query,
                    keys,
                    boundaries,
                    start,
                    budget=budget,
                    block_size=self.block_size,
                    sinks=self.sinks,
                    local=self.local,
                )
            kv_heads = keys.shape[1]
            groups = bsa.Groups.per_kv_head(kv_heads, query.shape[1] // kv_heads, query.device)
            calls.append(bsa.SparseCall(start, past, groups))
        return bsa.run_plan(
            layer.cache, self.name, query, keys, values, scale, calls, self.block_size, self.dense_tail
        )
