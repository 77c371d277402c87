"""TOVA: evict the token the current query attends to least, at every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import Budget, EvictionMethod, register
from tokensift.runtime.scores import group_mean, window_scores

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


@register
@dataclass
class TOVA(EvictionMethod):
    """Token Omission Via Attention: keep the tokens the newest query attends to most.

    Whenever a layer holds more than `budget` tokens, the softmax attention of the forward's last
    query scores every cached token and the lowest-scoring ones go, so after the prompt the cache
    holds `budget` tokens and every decode step evicts the one token that step attended to least
    (the cache behaves like a fixed-size multi-state RNN). `heads="each"` scores per KV head (the
    query heads of a GQA group averaged); `heads="mean"` averages over all heads of the layer and
    evicts the same tokens from every head (the paper's layer-wise policy, and kvpress's).

    Based on Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024.

    Parameters
    ----------
    budget:
        Tokens kept per KV head: an int count or a fraction of the prompt.
    heads:
        "each" (per KV head) or "mean" (one ranking per layer).
    """

    name = "tova"
    paper = "Oren et al., Transformers are Multi-State RNNs, EMNLP 2024"

    budget: Budget = 0.25
    heads: Literal["each", "mean"] = "each"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heads not in ("each", "mean"):
            raise TokensiftError(f"tova heads must be each or mean, got {self.heads!r}")

    def token_scores(self, layer: TokenLayer, query: torch.Tensor, scale: float, budget: int) -> torch.Tensor:
        scores = group_mean(window_scores(query[:, :, -1:], layer.k, scale), layer.k.shape[1])
        if self.heads == "mean":
            scores = scores.mean(dim=1, keepdim=True).expand_as(scores)
        return scores
