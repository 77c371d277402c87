"""One prefill of a prompt shared by every plan it serves exactly (same tensors, same logits).

Dense attention, the one-shot evictors (SnapKV, CompressKV, adaptive budgets), StreamingLLM, the
sparse-decode methods and the generation loops all compute the prompt's attention exactly and only
then compress: their prefills produce identical hidden states, keys and values. A bench comparing
several of them on one sample therefore runs the prompt once, keeps every layer's keys, values and
last queries, and lets each plan fill its own cache layer by layer and compress it there, exactly as
it would have inside its own forward (the same tensors, the same order, so the same peak bytes).

Evictors that accumulate column sums of every prompt query (`needs_colsums`) compute the prompt's
attention with the chunked column-sum kernel (`scores.attention_with_colsums`), so they cannot share
the dense prefill; but a layer's eviction runs after its attention over the whole prompt, so later
layers see the same inputs and the sums do not depend on the budget. That kernel's attention output
does not depend on the scores it sums either. So every column-sum evictor that declares a
`prefill_scores_key` (H2O at any budget, Keyformer at any budget and scoring parameters) shares one
prefill run with that kernel: it sums, from the same logits, one set of column sums per distinct
scoring key, and each plan evicts from its own key's sums with its own budget, exactly as inside its
own forward. Sparse-prefill methods run their own prefill.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokensift.methods.base import EvictionMethod
from tokensift.models import Model
from tokensift.runtime.cache import PENDING, TokenCache
from tokensift.runtime.plan import Plan
from tokensift.runtime.scores import ScoreFn

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer

WINDOW = 64  # last prompt queries kept per layer: enough for every window scorer's default
EXACT: tuple[Any, ...] = ("exact",)  # the key of plans served by the exact dense prefill
COLSUMS: tuple[Any, ...] = ("colsums",)  # the key of plans served by the column-sum kernel's prefill


def prefill_key(plan: Plan) -> tuple[Any, ...] | None:
    """Which shared prefill can serve a plan: `EXACT` when its prefill is exact dense attention
    followed by compression from the last queries, `COLSUMS` for a column-sum evictor that declares a
    `prefill_scores_key`, None when it must run its own prefill."""
    evict = plan.evict
    if (plan.prefill is not None and plan.prefill.changes_prefill) or plan.bias is not None:
        return None  # a sparse-prefill kernel or a logit bias changes the prefill itself
    if evict is None:
        return EXACT
    inner = getattr(evict, "method", None) or evict
    if getattr(inner, "window_size", 0) > WINDOW:
        return None
    if not evict.needs_colsums:
        return EXACT
    return None if scores_key(plan) is None else COLSUMS


def scores_key(plan: Plan) -> tuple[Any, ...] | None:
    """A column-sum evictor's `prefill_scores_key` (None for any other plan)."""
    evict = plan.evict
    return evict.prefill_scores_key() if evict is not None and evict.needs_colsums else None


def shareable(plan: Plan) -> bool:
    """Whether some shared prefill can serve the plan (see `prefill_key`)."""
    return prefill_key(plan) is not None


@dataclass
class _ColsumRecorder(EvictionMethod):
    """Stands in for column-sum evictors during a shared prefill: each layer's attention runs with
    the column-sum kernel, which sums every source's scores (one per scoring key), and the layer
    keeps those sums instead of evicting."""

    budget: float = 1.0
    sources: tuple[EvictionMethod, ...] = ()
    needs_colsums = True

    def column_scores(self, layer: TokenLayer) -> list[ScoreFn | None]:  # type: ignore[override]
        return [source.column_scores(layer) for source in self.sources]

    def compress(
        self, layer: TokenLayer, query: torch.Tensor, colsum: torch.Tensor | None, scale: float
    ) -> None:
        layer.extra["shared_colsum"] = colsum


@dataclass
class SharedPrefill:
    """The prompt's per-layer keys/values (as a dense cache holds them), last queries and logits;
    for a column-sum family also every layer's column sums of the prompt's queries."""

    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor]
    scales: list[float]
    logits: torch.Tensor
    seconds: float
    key: tuple[Any, ...] = EXACT
    colsums: dict[tuple[Any, ...], list[torch.Tensor]] | None = None  # scoring key -> per-layer sums

    @classmethod
    def run(
        cls, model: Model, ids: list[int], plan: Plan | None = None, also: Sequence[Plan] = ()
    ) -> SharedPrefill:
        """Prefill `ids` once for every plan with `plan`'s `prefill_key` (default: the exact one). A
        column-sum prefill records the sums of `plan`'s scoring and of every plan in `also` (plans of
        the same `prefill_key`), so it serves all of their scoring keys."""
        from tokensift.runtime.generate import forward

        key = EXACT if plan is None else prefill_key(plan)
        if key is None:
            raise ValueError(f"no shared prefill can serve {plan.spec if plan else None}")
        recorder, families = None, []
        if key != EXACT:
            assert plan is not None
            sources: dict[tuple[Any, ...], EvictionMethod] = {}
            for one in (plan, *also):
                if prefill_key(one) != key:
                    raise ValueError(f"a column-sum prefill cannot serve {one.spec}")
                assert one.evict is not None
                sources.setdefault(scores_key(one), one.evict)  # type: ignore[arg-type]
            families = list(sources)
            recorder = _ColsumRecorder(sources=tuple(sources.values()))
        queries: list[torch.Tensor] = []
        scales: list[float] = []

        def observe(module, layer, query, keys, values, scale) -> None:
            queries.append(query[:, :, -WINDOW:].clone())
            scales.append(scale)

        with torch.inference_mode():
            cache = TokenCache(model, recorder)
            cache.observer = observe
            t0 = time.perf_counter()
            logits = forward(model, torch.tensor([ids], device=next(model.model.parameters()).device), cache)
            seconds = time.perf_counter() - t0
        colsums = None
        if recorder is not None:
            stacks = [layer.extra.pop("shared_colsum") for layer in cache.layers]  # (F, B, H_q, n) each
            colsums = {family: [s[i] for s in stacks] for i, family in enumerate(families)}
        return cls(
            ids=list(ids),
            keys=[layer.k for layer in cache.layers],
            values=[layer.v for layer in cache.layers],
            queries=queries,
            scales=scales,
            logits=logits[0, -1],
            seconds=seconds,
            key=key,
            colsums=colsums,
        )

    def serves(self, plan: Plan, ids: list[int]) -> bool:
        """Whether this prefill gives `plan` on `ids` exactly what its own prefill would."""
        if self.ids != list(ids) or prefill_key(plan) != self.key:
            return False
        return self.colsums is None or scores_key(plan) in self.colsums

    def fill(self, cache: TokenCache) -> torch.Tensor:
        """Load the prompt into `cache` layer by layer, compressing as its plan would; returns the
        last-position logits. Each layer gets its own copy, so plans never share storage. A
        column-sum evictor gets its layer's recorded sums where its forward would have computed them
        (after asking for its scoring kernel, as that forward does)."""
        evict = cache.plan.evict
        for index, layer in enumerate(cache.layers):
            layer.update(self.keys[index].clone(), self.values[index].clone())
            PENDING.set(None)
            if evict is None:
                continue
            colsum = None
            if self.colsums is not None:
                evict.column_scores(layer)  # what the method notes when asked, as in its own forward
                colsum = self.colsums[scores_key(cache.plan)][index].clone()  # type: ignore[index]
            evict.compress(layer, self.queries[index], colsum, self.scales[index])
        cache.count("shared_prefill_seconds", self.seconds)
        if self.colsums is not None:
            cache.count("shared_prefill_colsums")  # this plan's column sums came from a shared prefill
        return self.logits
