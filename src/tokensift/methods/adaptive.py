"""Head-adaptive budgets (AdaKV): one layer budget spent across KV heads by score, stored ragged."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import EvictionMethod, register

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


def adaptive_selection(scores: torch.Tensor, budget: int, alpha: float) -> list[torch.Tensor]:
    """Slots kept per head when `budget * heads` tokens are shared by score across the heads.

    scores: (H, n), +inf for tokens that must stay. Each head first secures its `alpha * budget`
    best tokens (AdaKV's safeguard); the rest go to the highest scores of any head.
    Returns one sorted index tensor per head (lengths differ).
    """
    heads, n = scores.shape
    total = min(heads * budget, heads * n)
    guarded = scores.clone()
    safe = min(n, int(alpha * budget))
    if safe:
        guarded.scatter_(-1, guarded.topk(safe, dim=-1).indices, float("inf"))
    flat = guarded.flatten().topk(total).indices
    head, slot = flat // n, flat % n
    return [slot[head == h].sort().values for h in range(heads)]


@register
@dataclass
class Adaptive(EvictionMethod):
    """Share each layer's budget across its KV heads by score, keeping every head's tokens ragged.

    The wrapped scorer rates each token per KV head once, at the prompt; instead of keeping the
    same number per head, the layer keeps its `budget x heads` best tokens wherever they are, each
    head first securing `alpha x budget` of its own. Heads are stored flattened with offsets (no
    padding), so the bytes held equal the tokens kept, and attention runs per head over exactly its
    tokens. Unlike kvpress, which only masks keys, this really frees the memory. The counter
    `adaptive_tokens_moved` says how many tokens heads hold beyond the per-head budget; a scorer that
    rates every KV head of a layer alike (compresskv's shared vote) leaves nothing to move, and a
    note says so.

    Based on Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
    Efficient LLM Inference", arXiv 2407.11550.

    Parameters
    ----------
    method:
        A one-shot scorer whose budget is used per head on average: `adaptive(snapkv:budget=0.25)`.
    alpha:
        Share of the per-head budget every head is guaranteed (AdaKV safeguard: 0.2).
    """

    name = "adaptive"
    paper = "Feng et al., Ada-KV: Adaptive Budget Allocation for Efficient LLM Inference, arXiv 2407.11550"
    wraps: ClassVar[bool] = True

    method: EvictionMethod | None = None
    alpha: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.method, EvictionMethod) or getattr(self.method, "wraps", False):
            raise TokensiftError("adaptive wraps one eviction method, e.g. adaptive(snapkv:budget=0.25)")
        if not self.method.one_shot:
            raise TokensiftError(
                f"adaptive budgets need a one-shot scorer (snapkv, compresskv); {self.method.name} evicts at "
                "every step"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise TokensiftError(f"adaptive alpha must lie in [0, 1], got {self.alpha}")
        self.budget = self.method.budget

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def spec(self) -> str:
        return f"{self.name}({self.method.spec()}):alpha={self.alpha}"  # type: ignore[union-attr]

    def resolve(self, prompt_tokens: int) -> Self:
        assert self.method is not None
        new = dataclasses.replace(self, method=self.method.resolve(prompt_tokens))
        new.budget_tokens = new.method.tokens  # type: ignore[union-attr]
        return new

    def resolved_params(self) -> dict[str, Any]:
        assert self.method is not None
        return {
            "alpha": self.alpha,
            "budget_tokens": self.budget_tokens,
            "method": self.method.resolved_params(),
        }

    def compress(
        self, layer: TokenLayer, query: torch.Tensor, colsum: torch.Tensor | None, scale: float
    ) -> None:
        from tokensift.runtime.ragged import RaggedLayer

        assert self.method is not None
        if getattr(layer, "ragged", False):
            if query.shape[2] > 1:
                layer.cache.note(
                    "adaptive: compresses the prompt once; later multi-token forwards are kept whole"
                )
            return
        self.method.observe(layer, query, colsum, scale)
        if not self.method.should_compress(layer, query):
            return
        budget = self.method.layer_tokens(layer)
        scores = self.method.token_scores(layer, query, scale, budget)
        if scores is None:
            return
        if scores.shape[0] != 1:
            raise TokensiftError("head-adaptive budgets support batch size 1")
        if scores.shape[1] > 1 and bool((scores[0] == scores[0, :1]).all()):
            layer.cache.note(
                f"adaptive: {self.method.name} scores every KV head of a layer alike, so no budget moves "
                f"between heads and the tokens kept are {self.method.name}'s own"
            )
        index = adaptive_selection(scores[0], budget, self.alpha)
        # Tokens a head holds beyond the per-head budget: what the sharing moved between heads.
        moved = sum(max(0, len(i) - budget) for i in index)
        layer.cache.count("adaptive_tokens_moved", moved)
        layer.cache.replace_layer(RaggedLayer.from_selection(layer, index))
