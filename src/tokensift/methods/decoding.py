"""Decode-time compression: bring the cache back to a target size every N generated tokens."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import Budget, EvictionMethod, check_budget, register, resolve_budget

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


@register
@dataclass
class DecodeCompression(EvictionMethod):
    """Compress every `every` generated tokens back to `target`, so long generations stay bounded.

    The wrapped method compresses the prompt as usual. During decoding it keeps observing (H2O and
    Keyformer keep accumulating scores) but evicts only every `every` tokens, back to `target`
    tokens per KV head, with its own scores; window scorers (SnapKV, CompressKV) vote with the last
    queries of the generation. The cache therefore oscillates between `target` and
    `target + every` instead of growing without bound.

    Same idea as kvpress's DecodingPress (compression interval and target size).

    Parameters
    ----------
    method:
        The scoring method: `decoding(snapkv:budget=0.25):every=64,target=512`.
    every:
        Generated tokens between compressions.
    target:
        Tokens per KV head after each compression (int, or a fraction of the prompt); 0 means the
        wrapped method's budget.
    """

    name = "decoding"
    paper = "kvpress DecodingPress (NVIDIA); scorers as in the wrapped method's paper"
    wraps: ClassVar[bool] = True

    method: EvictionMethod | None = None
    every: int = 64
    target: Budget = 0
    target_tokens: int | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.method, EvictionMethod) or getattr(self.method, "wraps", False):
            raise TokensiftError(
                "decoding wraps one eviction method, e.g. decoding(snapkv:budget=0.25):every=64"
            )
        if self.every < 1:
            raise TokensiftError(f"decoding every must be >= 1, got {self.every}")
        if self.target != 0:
            check_budget(self.target, "decoding target")
        self.budget = self.method.budget

    @property
    def needs_colsums(self) -> bool:  # type: ignore[override]
        return self.method.needs_colsums  # type: ignore[union-attr]

    @property
    def repositions(self) -> bool:  # type: ignore[override]
        return self.method.repositions  # type: ignore[union-attr]

    def column_scores(self, layer: TokenLayer) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self.method.column_scores(layer)  # type: ignore[union-attr]

    def params(self) -> dict[str, Any]:
        return {"every": self.every, "target": self.target}

    def spec(self) -> str:
        return f"{self.name}({self.method.spec()}):every={self.every},target={self.target}"  # type: ignore[union-attr]

    def resolve(self, prompt_tokens: int) -> Self:
        assert self.method is not None
        new = dataclasses.replace(self, method=self.method.resolve(prompt_tokens))
        new.budget_tokens = new.method.tokens  # type: ignore[union-attr]
        new.target_tokens = (
            new.budget_tokens if self.target == 0 else resolve_budget(self.target, prompt_tokens)
        )
        window = getattr(self.method, "window_size", 0)
        if new.target_tokens <= window:
            raise TokensiftError(
                f"decoding target of {new.target_tokens} tokens does not exceed the window {window}"
            )
        return new

    def resolved_params(self) -> dict[str, Any]:
        assert self.method is not None
        return {**self.params(), "target_tokens": self.target_tokens, "method": self.method.resolved_params()}

    def compress(
        self, layer: TokenLayer, query: torch.Tensor, colsum: torch.Tensor | None, scale: float
    ) -> None:
        inner = self.method
        assert inner is not None and self.target_tokens is not None
        window = getattr(inner, "window_size", 0)
        if window:
            # The last queries of the sequence, for window scorers at decode time.
            recent = layer.extra.get("recent_queries")
            recent = (
                query if recent is None or query.shape[2] >= window else torch.cat([recent, query], dim=2)
            )
            layer.extra["recent_queries"] = recent[:, :, -window:]
        if query.shape[2] > 1:
            inner.compress(layer, query, colsum, scale)
            layer.extra["decode_steps"] = 0
            return
        inner.observe(layer, query, colsum, scale)
        steps = layer.extra["decode_steps"] = layer.extra.get("decode_steps", 0) + 1
        if steps % self.every == 0 and layer.n > self.target_tokens:
            inner.evict_to(layer, layer.extra.get("recent_queries", query), scale, self.target_tokens)
            if layer.index == 0:
                layer.cache.count("decode_compressions")
