"""One exact prefill shared by every plan whose prefill attention is exact.

Dense attention, the one-shot evictors (SnapKV, CompressKV, adaptive budgets), StreamingLLM, the
sparse-decode methods and the generation loops all compute the prompt's attention exactly and only
then compress: their prefills produce identical hidden states, keys and values. A bench comparing
several of them on one sample therefore runs the prompt once, keeps every layer's keys, values and
last queries, and lets each plan fill its own cache layer by layer and compress it there, exactly as
it would have inside its own forward (the same tensors, the same order, so the same peak bytes).
H2O and Keyformer (they score every prompt query) and sparse-prefill methods run their own prefill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tokensift.models import Model
from tokensift.runtime.cache import PENDING, TokenCache
from tokensift.runtime.plan import Plan

WINDOW = 64  # last prompt queries kept per layer: enough for every window scorer's default


def shareable(plan: Plan) -> bool:
    """Whether a plan's prefill is exact dense attention followed by compression from the last queries."""
    evict = plan.evict
    if plan.prefill is not None:
        return False
    if evict is None:
        return True
    inner = getattr(evict, "method", None) or evict
    return not evict.needs_colsums and getattr(inner, "window_size", 0) <= WINDOW


@dataclass
class SharedPrefill:
    """The prompt's per-layer keys/values (as a dense cache holds them), last queries and logits."""

    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor]
    scales: list[float]
    logits: torch.Tensor
    seconds: float

    @classmethod
    def run(cls, model: Model, ids: list[int]) -> SharedPrefill:
        from tokensift.runtime.generate import forward

        queries: list[torch.Tensor] = []
        scales: list[float] = []

        def observe(module, layer, query, keys, values, scale) -> None:
            queries.append(query[:, :, -WINDOW:].clone())
            scales.append(scale)

        with torch.inference_mode():
            cache = TokenCache(model, None)
            cache.observer = observe
            t0 = time.perf_counter()
            logits = forward(model, torch.tensor([ids], device=next(model.model.parameters()).device), cache)
            seconds = time.perf_counter() - t0
        return cls(
            ids=list(ids),
            keys=[layer.k for layer in cache.layers],
            values=[layer.v for layer in cache.layers],
            queries=queries,
            scales=scales,
            logits=logits[0, -1],
            seconds=seconds,
        )

    def fill(self, cache: TokenCache) -> torch.Tensor:
        """Load the prompt into `cache` layer by layer, compressing as its plan would; returns the
        last-position logits. Each layer gets its own copy, so plans never share storage."""
        evict = cache.plan.evict
        for index, layer in enumerate(cache.layers):
            layer.update(self.keys[index].clone(), self.values[index].clone())
            PENDING.set(None)
            if evict is not None:
                evict.compress(layer, self.queries[index], None, self.scales[index])
        cache.count("shared_prefill_seconds", self.seconds)
        return self.logits
