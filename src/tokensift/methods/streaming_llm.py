"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import Budget, EvictionMethod, register

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


def sink_window_indices(n: int, budget: int, sinks: int, device: torch.device | None = None) -> torch.Tensor:
    """Cache slots StreamingLLM keeps out of n: the first `sinks` and the last `budget - sinks`."""
    window = budget - sinks
    return torch.cat([torch.arange(sinks, device=device), torch.arange(n - window, n, device=device)])


@register
@dataclass
class StreamingLLM(EvictionMethod):
    """Keep the first tokens as attention sinks plus a window of the most recent tokens.

    The cache holds `budget` tokens per layer at every step: `sinks` initial tokens that absorb
    attention mass, and the `budget - sinks` most recent ones; the middle is evicted. Keys are
    re-positioned inside the cache (G3-ii): a key at cache index j is rotated to position j and new
    queries take position `cache length`, which bounds relative distances. Needs no scores.

    Based on Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024.

    Parameters
    ----------
    budget:
        Tokens kept per layer, sinks included: an int count or a fraction of the prompt.
    sinks:
        Initial tokens always kept (paper: 4).
    """

    name = "streaming_llm"
    paper = "Xiao et al., Efficient Streaming Language Models with Attention Sinks, ICLR 2024"
    repositions = True

    budget: Budget = 0.25
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise TokensiftError(f"streaming_llm sinks must be >= 0, got {self.sinks}")

    def check_resolved(self) -> None:
        if self.tokens <= self.sinks:
            raise TokensiftError(
                f"streaming_llm budget resolves to {self.tokens} tokens, which leaves no recent window "
                f"after {self.sinks} sinks"
            )

    def token_scores(self, layer: TokenLayer, query: torch.Tensor, scale: float, budget: int) -> torch.Tensor:
        scores = torch.full(layer.positions.shape, float("-inf"), device=layer.device)
        scores[..., sink_window_indices(layer.n, budget, self.sinks, layer.device)] = float("inf")
        return scores
