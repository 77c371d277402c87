"""CompressKV: semantic-retrieval heads choose the tokens, layer budgets follow eviction error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import Budget, EvictionMethod, register
from tokensift.methods.snapkv import pool_scores
from tokensift.runtime.scores import window_scores

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenCache, TokenLayer


def allocate_budgets(
    scores: list[float], budget: int, min_budget: int = 32, max_factor: float = 3.0
) -> list[int]:
    """Per-layer budgets summing exactly to len(scores) * budget (CompressKV's error-aware allocation).

    Every layer starts at `min_budget` (capped at the nominal budget); the remaining tokens go in
    proportion to the layer scores, clipped to [min_budget, max_factor * budget]; the rounding and
    clipping difference is then settled one token at a time: added to the highest-scoring layers
    below the cap, or taken from the lowest-scoring layers above the floor.
    """
    layers = len(scores)
    if layers == 0:
        return []
    total = layers * budget
    low, high = min(min_budget, budget), max(budget, int(max_factor * budget))
    weight = sum(scores)
    shares = [s / weight for s in scores] if weight > 0 else [1.0 / layers] * layers
    out = [min(high, max(low, low + round(share * (total - low * layers)))) for share in shares]
    order = sorted(range(layers), key=lambda i: -shares[i])
    diff = total - sum(out)
    while diff:
        if diff > 0:
            i = next(i for i in order if out[i] < high)
            out[i] += 1
        else:
            i = next(i for i in reversed(order) if out[i] > low)
            out[i] -= 1
        diff = total - sum(out)
    return out


@register
@dataclass
class CompressKV(EvictionMethod):
    """Compress the prompt with the votes of each layer's semantic retrieval heads, at layer budgets
    set by each layer's measured eviction error.

    Offline (`tokensift calibrate compresskv --model M`), needle runs rank every head by the
    attention mass it puts on the needle while the answer is produced (runs whose answer misses the
    needle are dropped by a ROUGE-1 filter), and a per-layer profile measures how much each layer's
    prefill attention output (through o_proj, on the prompt's last window of queries) changes when
    its K/V are compressed to a tiny budget. Online, after the prompt, layer l keeps B_l tokens:
    the last `window_size` plus the top B_l - w of one score vector, the window attention of its
    `first_k` best heads averaged (after avg-pooling), shared by all KV heads of the layer. The B_l
    follow the error profile, clamped to [min_budget, max_factor * B], and sum exactly to layers * B.
    Keys keep their original positions.

    Based on Lin et al., "CompressKV: Semantic Retrieval Heads Know What Tokens are Not Important
    Before Generation", arXiv 2508.02401.

    Parameters
    ----------
    budget:
        Nominal tokens per layer (int, or fraction of the prompt); layers get more or fewer.
    window_size:
        Observation window (paper: 8).
    kernel_size:
        Pooling kernel (paper: 5).
    pooling:
        "avg" (paper) or "max".
    first_k:
        Retrieval heads per layer that vote (paper: 4).
    min_budget, max_factor:
        Per-layer clamps: at least min_budget tokens, at most max_factor x budget (paper: 32, 3).
    uniform:
        Give every layer the nominal budget (ablation: head selection without layer allocation).
    calibration:
        Path of a calibration artefact; empty means the model's shipped or user-built one.
    """

    name = "compresskv"
    paper = "Lin et al., CompressKV: Semantic Retrieval Heads Know What Tokens are Not Important, 2025"
    one_shot = True

    budget: Budget = 0.25
    window_size: int = 8
    kernel_size: int = 5
    pooling: Literal["avg", "max"] = "avg"
    first_k: int = 4
    min_budget: int = 32
    max_factor: float = 3.0
    uniform: bool = False
    calibration: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size < 1 or self.first_k < 1 or self.min_budget < 1:
            raise TokensiftError("compresskv window_size, first_k and min_budget must be >= 1")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise TokensiftError(
                f"compresskv kernel_size must be a positive odd number, got {self.kernel_size}"
            )
        if self.max_factor < 1:
            raise TokensiftError(f"compresskv max_factor must be >= 1, got {self.max_factor}")

    def check_resolved(self) -> None:
        if min(self.tokens, self.min_budget) <= self.window_size:
            raise TokensiftError(
                f"compresskv budget resolves to {self.tokens} tokens; layer budgets must exceed window_size "
                f"{self.window_size}"
            )

    def _artefact(self, cache: TokenCache) -> dict[str, Any]:
        from tokensift.calibration import load_artefact

        artefact = cache.shared.get("compresskv")
        if artefact is None:
            if cache.handle is None and not self.calibration:
                raise TokensiftError(
                    "compresskv needs a tokensift Model or calibration=PATH to find its heads"
                )
            artefact = load_artefact(self.name, cache.handle, self.calibration or None)
            layers = len(artefact["heads"])
            if layers != cache.num_layers:
                raise TokensiftError(
                    f"compresskv calibration has {layers} layers, the model {cache.num_layers}"
                )
            scores = [1.0] * cache.num_layers if self.uniform else artefact["layer_scores"]
            artefact = {
                **artefact,
                "budgets": allocate_budgets(scores, self.tokens, self.min_budget, self.max_factor),
            }
            cache.shared["compresskv"] = artefact
        return artefact

    def layer_tokens(self, layer: TokenLayer) -> int:
        return self._artefact(layer.cache)["budgets"][layer.index]

    def should_compress(self, layer: TokenLayer, query: torch.Tensor) -> bool:
        return query.shape[2] > 1 and layer.n > self.layer_tokens(layer)

    def token_scores(
        self, layer: TokenLayer, query: torch.Tensor, scale: float, budget: int
    ) -> torch.Tensor | None:
        n, w = layer.n, self.window_size
        if query.shape[2] < w:
            layer.cache.note(f"compresskv: a {query.shape[2]}-token forward is shorter than window_size {w}")
            return None
        heads = self._artefact(layer.cache)["heads"][layer.index][: self.first_k]
        votes = window_scores(query[:, :, -w:], layer.k, scale)[:, heads, : n - w]
        shared = pool_scores(votes, self.kernel_size, self.pooling).mean(dim=1, keepdim=True)
        scores = shared.expand(-1, layer.k.shape[1], -1)
        return torch.cat([scores, scores.new_full((*scores.shape[:2], w), float("inf"))], dim=-1)
