"""TokenSelect: per-head criticality, soft voting across heads, sinks + top-k + local window."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self

import torch
import torch.nn.functional as F

from tokensift.errors import TokensiftError
from tokensift.methods.base import Budget, SparseDecodeMethod, check_budget, register, resolve_budget
from tokensift.runtime.rope import shift_keys
from tokensift.runtime.sparse_decode import (
    GrowingRows,
    Stopwatch,
    attend,
    dense_step,
    expand_heads,
    fresh_state,
    gather,
    grouped,
    new_state,
    record,
    rotary_frequencies,
    single_thread,
    topk_indices,
    track_state_bytes,
)

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer

# The reference configuration: 128 sinks + top-2048 + 512 local tokens (2688 in all).
REFERENCE_INIT, REFERENCE_TOPK, REFERENCE_LOCAL = 128, 2048, 512
REFERENCE_BUDGET = REFERENCE_INIT + REFERENCE_TOPK + REFERENCE_LOCAL


def soft_votes(logits: torch.Tensor, shared: bool) -> torch.Tensor:
    """Per-head softmax over candidate tokens, then summed over heads.

    logits (B, H_kv, rep, N) of every query head against its KV head's candidates. shared=True sums
    over all query heads, one vote per token for the whole layer (B, N), as TokenSelect does; False
    sums within each GQA group only (B, H_kv, N), for caches holding different tokens per KV head.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.sum(dim=(1, 2)) if shared else probs.sum(dim=2)


def max_pool(scores: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The reference's optional 1-D max-pool (stride 1, padding (k - 1) // 2) over token votes."""
    if kernel_size <= 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=(kernel_size - 1) // 2)
    return pooled.reshape(*scores.shape[:-1], pooled.shape[-1])


def selection_index(top: torch.Tensor, n_init: int, n_local: int, n: int) -> torch.Tensor:
    """Slots attended: [0, n_init) + top + [n - n_local, n); top is (B, k) or (B, H, k)."""
    lead = top.shape[:-1]
    sinks = torch.arange(n_init, device=top.device).expand(*lead, n_init)
    local = torch.arange(n - n_local, n, device=top.device).expand(*lead, n_local)
    return torch.cat([sinks, top, local], dim=-1)


@register
@dataclass
class TokenSelect(SparseDecodeMethod):
    """Attend each decode query to sinks, its most critical tokens and a local window.

    Every query head scores the candidate tokens (all but the first `n_init` and the last `n_local`)
    with raw Q.K dot products against its KV head, turns them into a softmax over tokens, and the
    heads' softmaxes are summed (soft voting): one score per token for the layer, so one head with a
    sharp preference outvotes heads with flat ones. The top-k tokens by vote, optionally max-pooled,
    plus the sinks and the local window are gathered and attended in one fused call. The Selection
    Cache reuses a layer's last top-k while the query stays similar to the query that chose it
    (cosine >= `similarity_threshold`); reuses are counted in the stats as `selection_reuses`.

    Positions: with positions="original" keys keep the true positions they were cached at (G3-i); the
    selection is the paper's but not its length extrapolation. positions="compacted" is the reference's
    scheme (G3-ii): the plan re-positions, so the cache stores keys before RoPE; criticality is scored
    with the query rotated to position `n_local` against the un-rotated keys (every candidate at the
    same relative distance), and attention rotates the selected keys to their index in the selection
    and the query to the last index. (The runtime still rotates the whole cache to slot positions for
    re-positioning plans at every step, so this mode is for fidelity, not speed.) If the cache holds
    different tokens per KV head (after per-head eviction such as SnapKV), votes are summed within each
    GQA group and every KV head selects its own tokens.

    Based on Wu, Pan et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for
    LLMs via Dynamic Token-Level KV Cache Selection", EMNLP 2025.

    Parameters
    ----------
    budget:
        Tokens attended per decode query (n_init + top-k + n_local): an int count or a fraction of
        the prompt. The reference's 128 + 2048 + 512 is budget=2688.
    n_init:
        Initial (sink) tokens always attended; None scales the reference's 128 of 2688 to the budget.
    n_local:
        Most recent tokens always attended, the current one included; None scales the reference's
        512 of 2688 to the budget.
    kernel_size:
        Max-pool kernel over the votes (reference: per dataset, e.g. 6 for passkey); 0 or 1 is off.
    selection_cache:
        Reuse the last selection while the query stays similar (paper: on; released code: off).
    similarity_threshold:
        Cosine similarity of query fingerprints above which the selection is reused (reference: 0.9).
    positions:
        "original" (keys keep their true positions) or "compacted" (the reference's re-positioning).
    score_dtype:
        dtype of the criticality dot products: "float32", or "bfloat16" (as the reference kernel
        computes them) from a bfloat16 copy of the keys, which halves the memory read per step.
    """

    name = "tokenselect"
    paper = (
        "Wu, Pan et al., TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs "
        "via Dynamic Token-Level KV Cache Selection, EMNLP 2025"
    )

    budget: Budget = 1024
    n_init: int | None = None
    n_local: int | None = None
    kernel_size: int = 0
    selection_cache: bool = True
    similarity_threshold: float = 0.9
    positions: Literal["original", "compacted"] = "original"
    score_dtype: Literal["float32", "bfloat16"] = "float32"
    budget_tokens: int | None = field(default=None, init=False, repr=False, compare=False)
    init_tokens: int = field(default=0, init=False, repr=False, compare=False)
    local_tokens: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_budget(self.budget)
        for what, value in (("n_init", self.n_init), ("n_local", self.n_local)):
            if value is not None and value < (1 if what == "n_local" else 0):
                raise TokensiftError(f"tokenselect {what} must be >= {int(what == 'n_local')}, got {value}")
        if self.kernel_size < 0:
            raise TokensiftError(f"tokenselect kernel_size must be >= 0, got {self.kernel_size}")
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise TokensiftError(
                f"tokenselect similarity_threshold is a cosine in [-1, 1], got {self.similarity_threshold}"
            )
        if self.positions not in ("original", "compacted"):
            raise TokensiftError(
                f"tokenselect positions must be original or compacted, got {self.positions!r}"
            )
        if self.score_dtype not in ("float32", "bfloat16"):
            raise TokensiftError(
                f"tokenselect score_dtype must be float32 or bfloat16, got {self.score_dtype!r}"
            )

    @property  # type: ignore[override]
    def repositions(self) -> bool:  # type: ignore[override]
        return self.positions == "compacted"

    def resolve(self, prompt_tokens: int) -> Self:
        new = dataclasses.replace(self)
        budget = resolve_budget(self.budget, prompt_tokens)
        scaled = budget / REFERENCE_BUDGET
        new.budget_tokens = budget
        new.init_tokens = self.n_init if self.n_init is not None else round(REFERENCE_INIT * scaled)
        new.local_tokens = (
            self.n_local if self.n_local is not None else max(1, round(REFERENCE_LOCAL * scaled))
        )
        if new.top_k < 1:
            raise TokensiftError(
                f"tokenselect budget of {budget} tokens leaves no top-k after n_init {new.init_tokens} "
                f"and n_local {new.local_tokens}"
            )
        return new

    @property
    def top_k(self) -> int:
        if self.budget_tokens is None:
            raise RuntimeError("tokenselect: budget used before it was resolved against a prompt")
        return self.budget_tokens - self.init_tokens - self.local_tokens

    def resolved_params(self) -> dict[str, Any]:
        return {
            **self.params(),
            "budget_tokens": self.budget_tokens,
            "n_init_tokens": self.init_tokens,
            "n_local_tokens": self.local_tokens,
            "top_k": self.top_k,
        }

    def decode_attention(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        n, kv = keys.shape[2], keys.shape[1]
        n_init, n_local, k = self.init_tokens, self.local_tokens, self.top_k
        if n_init + k + n_local >= n:
            layer.cache.note(
                f"tokenselect: its budget of {n_init + k + n_local} tokens covered the whole cache at some "
                "decode steps; those steps attended densely"
            )
            return dense_step(layer, query, keys, values, scale)
        compacted = self.positions == "compacted"
        rope = layer.cache.rope
        if compacted:
            # The plan re-positions, so the cache holds keys before RoPE (layer.k) and the model
            # rotated the query to the cache's last slot, n - 1: take that rotation off.
            assert rope is not None
            keys, values = layer.k, layer.v
            query = shift_keys(query, torch.full((1,), 1 - n, device=query.device), rope.inv_freq)
        with single_thread():
            watch = Stopwatch(query.device)
            state = self.state(layer, keys)
            fingerprint = self.fingerprint(layer, query, compacted)
            top = self.reused(layer, state, fingerprint)
            if top is None:
                probe = query
                if compacted:  # the reference scores with the query at position n_local, keys un-rotated
                    probe = shift_keys(query, torch.full((1,), n_local, device=query.device), rope.inv_freq)
                source = state["shadow"].live if "shadow" in state else keys
                candidates = source[:, :, n_init : n - n_local]
                logits = grouped(probe.to(candidates.dtype), kv) @ candidates.transpose(-1, -2)
                votes = max_pool(soft_votes(logits, state["aligned"]), self.kernel_size)
                top = topk_indices(votes, k) + n_init
                if compacted:
                    top = top.sort(dim=-1).values
                state["fingerprint"], state["top"] = fingerprint, top
                layer.cache.count("selections_computed")
            index = selection_index(top, n_init, n_local, n)
            if index.dim() == 2:
                index = expand_heads(index, kv)
            watch.selected()
            k_sel, v_sel = gather(keys, index), gather(values, index)
            if compacted:  # rotate the selection to positions 0..m-1 and the query to m-1
                m = index.shape[-1]
                k_sel = rope.rotate(k_sel)
                query = shift_keys(query, torch.full((1,), m - 1, device=query.device), rope.inv_freq)
            out = attend(query, k_sel, v_sel, scale)
            watch.attended()
            record(layer, watch, index.shape[-1], sparse=True)
            return out

    def fingerprint(self, layer: TokenLayer, query: torch.Tensor, compacted: bool) -> torch.Tensor:
        """The query as the Selection Cache compares it: without its rotary position, as the reference
        (which rotates every query to the same position) effectively compares queries. Otherwise two
        identical queries one position apart would differ by a rotation."""
        if not compacted and self.selection_cache:
            inv_freq = rotary_frequencies(layer)
            if inv_freq is not None:  # the query sits at the last position the cache reports
                position = layer.get_seq_length() - 1
                query = shift_keys(query, torch.full((1,), -position, device=query.device), inv_freq)
        return query.reshape(query.shape[0], -1)

    def reused(
        self, layer: TokenLayer, state: dict[str, Any], fingerprint: torch.Tensor
    ) -> torch.Tensor | None:
        """The cached top-k if the Selection Cache applies to this query, else None."""
        if not self.selection_cache or "fingerprint" not in state:
            return None
        similarity = F.cosine_similarity(fingerprint.float(), state["fingerprint"].float(), dim=-1)
        if bool((similarity < self.similarity_threshold).any()):
            return None
        layer.cache.count("selection_reuses")
        return state["top"]

    def state(self, layer: TokenLayer, keys: torch.Tensor) -> dict[str, Any]:
        """Per-layer state: slot alignment across heads, the bfloat16 scoring copy, the last selection."""
        dtype = torch.bfloat16 if self.score_dtype == "bfloat16" else keys.dtype
        state = fresh_state(layer, "tokenselect", positions=self.positions, dtype=dtype)
        if state is None:
            state = new_state(layer, "tokenselect", positions=self.positions, dtype=dtype)
            pos = layer.positions
            state["aligned"] = layer.evicted == 0 or bool((pos == pos[:, :1]).all())
            if not state["aligned"]:
                layer.cache.note(
                    "tokenselect: the cache holds different tokens per KV head (per-head eviction), so "
                    "votes are summed within each GQA group and each KV head selects its own tokens"
                )
            if dtype != keys.dtype:
                state["shadow"] = GrowingRows(keys, dtype)
        shadow: GrowingRows | None = state.get("shadow")
        if shadow is not None and shadow.n < keys.shape[2]:
            shadow.append(keys[:, :, shadow.n :].to(dtype))
            track_state_bytes(layer, "tokenselect", [shadow.data])
        return state
