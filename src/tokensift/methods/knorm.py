"""Knorm: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokensift.methods.base import Budget, EvictionMethod, register

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


@register
@dataclass
class Knorm(EvictionMethod):
    """Compress the prompt once, keeping the keys with the lowest L2 norm in each KV head.

    Keys with a small norm tend to draw high attention (the sink and other heavy hitters have
    unusually small keys), so a key's norm is a query-free proxy for its importance: no attention
    scores are computed, any attention kernel works, and the score is the same before or after
    RoPE (a rotation keeps norms). Compression runs after every multi-token forward; decode steps
    append without evicting.

    Based on Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", EMNLP 2024.

    Parameters
    ----------
    budget:
        Tokens kept per KV head: an int count or a fraction of the prompt.
    """

    name = "knorm"
    one_shot = True
    paper = "Devoto et al., A Simple and Effective L2 Norm-Based Strategy for KV Compression, EMNLP 2024"

    budget: Budget = 0.25

    def should_compress(self, layer: TokenLayer, query: torch.Tensor) -> bool:
        return query.shape[2] > 1 and layer.n > self.layer_tokens(layer)

    def token_scores(self, layer: TokenLayer, query: torch.Tensor, scale: float, budget: int) -> torch.Tensor:
        return -layer.k.float().norm(dim=-1)
