"""PyramidKV: SnapKV with layer budgets that shrink from the bottom layer to the top."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tokensift.errors import TokensiftError
from tokensift.methods.base import register
from tokensift.methods.snapkv import SnapKV

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


def pyramid_budgets(budget: int, window: int, prompt: int, layers: int, beta: float) -> list[int]:
    """Tokens per layer (window included) on an arithmetic slope whose mean is `budget`.

    The top layer keeps (budget - window) / beta prefix tokens, the bottom one the mirror image
    around the mean; where the bottom layer would exceed the prompt it is capped and the top raised
    to keep the mean. Where no slope fits, every layer gets `budget` (SnapKV).
    """
    mean = budget - window
    low = mean / beta
    high = 2 * mean - low
    if high >= prompt - window:
        high = prompt - window
        low = 2 * mean - high
    if layers < 2 or not prompt >= high >= low >= window:
        return [budget] * layers
    step = (high - low) / (layers - 1)
    return [round(high - i * step) + window for i in range(layers)]


@register
@dataclass
class PyramidKV(SnapKV):
    """SnapKV scoring inside each layer, with budgets that decrease from the bottom layer to the top.

    Attention is spread widely in low layers and concentrates on a few tokens in high layers
    ("pyramidal information funneling"), so low layers get more of the cache: per-layer budgets fall
    linearly from bottom to top, the top layer keeping 1/beta of the average prefix budget, and
    average to `budget` over the layers. Inside a layer tokens are chosen exactly as SnapKV does
    (observation window, pooling, window always kept).

    Based on Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling", 2024 (budget schedule as in the authors' KVCache-Factory and kvpress).

    Parameters
    ----------
    budget:
        Average tokens kept per KV head over the layers (window included).
    beta:
        Steepness: the top layer keeps 1/beta of the average prefix budget (paper: 20).
    window_size, kernel_size, pooling:
        As SnapKV (PyramidKV's defaults: window 32, kernel 7, avg pooling).
    """

    name = "pyramidkv"
    paper = "Cai et al., PyramidKV: Dynamic KV Cache Compression via Pyramidal Information Funneling, 2024"

    beta: float = 20.0
    pooling: Literal["max", "avg"] = "avg"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta >= 1:
            raise TokensiftError(f"pyramidkv beta must be >= 1, got {self.beta}")

    def _budgets(self, layer: TokenLayer) -> list[int]:
        cache = layer.cache
        prompt = cache.prompt_tokens or layer.seen
        key = f"pyramidkv_budgets_{prompt}"
        if key not in cache.shared:
            budgets = pyramid_budgets(self.tokens, self.window_size, prompt, cache.num_layers, self.beta)
            cache.shared[key] = budgets
            if cache.num_layers > 1 and len(set(budgets)) == 1:
                # The schedule's own fallback (KVCache-Factory's, kvpress's): say so, it is SnapKV now.
                cache.note(
                    f"pyramidkv: no pyramid fits a {self.tokens}-token budget on a {prompt}-token prompt "
                    f"(its top layer would keep fewer than window_size={self.window_size} beyond the "
                    "window, or the bottom one more than the prompt), so every layer keeps the same "
                    "budget: this run is SnapKV"
                )
        return cache.shared[key]

    def layer_tokens(self, layer: TokenLayer) -> int:
        return self._budgets(layer)[layer.index]
