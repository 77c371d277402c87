"""H2O: heavy hitters plus a recent window, evicting at every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import Budget, EvictionMethod, register
from tokensift.runtime.scores import group_mean

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


@register
@dataclass
class H2O(EvictionMethod):
    """Keep the heavy hitters (most accumulated attention) and the most recent tokens.

    Every key accumulates the softmax attention it receives from every query, prompt queries
    included (column sums computed in chunks, never the full matrix). Whenever a layer holds more
    than `budget` tokens, it keeps the `budget - recent` highest-scoring tokens outside the recent
    window plus the recent window; this runs after each step's attention, so step t attends to
    budget + 1 tokens and the cache returns to the budget. Scores are raw sums, as in the paper; with
    GQA they are averaged over the query heads of each KV head. Keys keep their original positions.

    Based on Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", NeurIPS 2023.

    Parameters
    ----------
    budget:
        Tokens kept per KV head (heavy + recent): an int count or a fraction of the prompt.
    recent_fraction:
        Share of the budget given to the recent window (paper: heavy 10% + recent 10%, i.e. 0.5).
    """

    name = "h2o"
    paper = "Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs, NeurIPS 2023"
    needs_colsums = True

    budget: Budget = 0.25
    recent_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise TokensiftError(f"h2o recent_fraction must lie in [0, 1], got {self.recent_fraction}")

    @property
    def recent(self) -> int:
        return min(self.tokens, round(self.tokens * self.recent_fraction))

    def check_resolved(self) -> None:
        if self.recent < 1:
            raise TokensiftError(f"h2o budget of {self.tokens} tokens leaves no recent window")

    def resolved_params(self) -> dict[str, object]:
        return {**super().resolved_params(), "recent_tokens": self.recent}

    def prefill_scores_key(self) -> tuple[object, ...]:
        """The prompt's column sums follow from the scoring rule alone: the budget and the recent
        window only choose what to keep from them, after each layer's attention over the whole
        prompt. Subclasses (Keyformer) key by their own class and every other parameter."""
        rest = {k: v for k, v in self.params().items() if k not in ("budget", "recent_fraction")}
        return (type(self).__qualname__, tuple(sorted(rest.items())))

    def observe(
        self, layer: TokenLayer, query: torch.Tensor, colsum: torch.Tensor | None, scale: float
    ) -> None:
        assert colsum is not None
        scores = layer.state(self.name)
        scores += group_mean(colsum, scores.shape[1])

    def token_scores(self, layer: TokenLayer, query: torch.Tensor, scale: float, budget: int) -> torch.Tensor:
        recent = min(budget, round(budget * self.recent_fraction))
        scores = layer.state(self.name).clone()
        scores[..., layer.n - recent :] = float("inf")
        return scores
