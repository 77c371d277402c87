"""SnapKV: one-shot prompt compression from an observation window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from tokensift.errors import TokensiftError
from tokensift.methods.base import Budget, EvictionMethod, register
from tokensift.runtime.scores import group_mean, window_scores

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling along tokens (stride 1, same length) so kept tokens bring their neighbours."""
    if kernel_size <= 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pad = kernel_size // 2
    if pooling == "max":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    else:
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=False)
    return pooled[..., : scores.shape[-1]].reshape(scores.shape)


@register
@dataclass
class SnapKV(EvictionMethod):
    """Compress the prompt once, keeping the tokens its last queries attend to.

    The last `window_size` prompt queries (the observation window) vote for prefix tokens with their
    softmax attention; votes are summed over the window, averaged over the query heads of each KV
    head (GQA group mean), pooled with a 1-D kernel so neighbours come along, and the top
    `budget - window_size` prefix tokens per KV head are kept with the window itself. Compression
    happens after every multi-token forward; decode steps append without evicting.

    Based on Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024.

    Parameters
    ----------
    budget:
        Tokens kept per KV head (window included): an int count or a fraction of the prompt.
    window_size:
        Observation window of last prompt queries (paper configs: 32).
    kernel_size:
        Pooling kernel over token scores (paper configs: 7).
    pooling:
        "max" (paper) or "avg" (kvpress, CompressKV).
    """

    name = "snapkv"
    one_shot = True
    paper = "Li et al., SnapKV: LLM Knows What You are Looking for Before Generation, NeurIPS 2024"

    budget: Budget = 0.25
    window_size: int = 32
    kernel_size: int = 7
    pooling: Literal["max", "avg"] = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1:
            raise TokensiftError(f"snapkv window_size must be >= 1, got {self.window_size}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise TokensiftError(f"snapkv kernel_size must be a positive odd number, got {self.kernel_size}")
        if self.pooling not in ("max", "avg"):
            raise TokensiftError(f"snapkv pooling must be max or avg, got {self.pooling!r}")

    def check_resolved(self) -> None:
        if self.tokens <= self.window_size:
            raise TokensiftError(
                f"snapkv budget resolves to {self.tokens} tokens, which does not exceed "
                f"window_size {self.window_size}"
            )

    def should_compress(self, layer: TokenLayer, query: torch.Tensor) -> bool:
        # One-shot: after multi-token forwards (the prompt, or a chunk of it); decoding appends.
        return query.shape[2] > 1 and layer.n > self.layer_tokens(layer)

    def token_scores(
        self, layer: TokenLayer, query: torch.Tensor, scale: float, budget: int
    ) -> torch.Tensor | None:
        length, n, w = query.shape[2], layer.n, self.window_size
        if length < w:
            layer.cache.note(
                f"snapkv: a {length}-token forward is shorter than window_size {w}; not compressed"
            )
            return None
        votes = window_scores(query[:, :, -w:], layer.k, scale)[..., : n - w]
        scores = pool_scores(group_mean(votes, layer.k.shape[1]), self.kernel_size, self.pooling)
        return torch.cat([scores, scores.new_full((*scores.shape[:2], w), float("inf"))], dim=-1)
