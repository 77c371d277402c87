"""Quest: query-aware page selection from per-page key bounds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import Budget, SparseDecodeMethod, check_budget, register, resolve_budget
from tokensift.runtime.sparse_decode import (
    PageSummary,
    Stopwatch,
    dense_step,
    fresh_state,
    grouped,
    new_state,
    record,
    single_thread,
    sparse_attention,
    topk_indices,
    track_state_bytes,
)

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


def select_pages(bound: torch.Tensor, pages: int, group_reduce: str) -> torch.Tensor:
    """Top `pages` pages per KV head by upper bound: (B, H_kv, pages).

    bound (B, H_kv, rep, P) holds the bounds of the query heads of each GQA group; they are reduced
    over the group (max keeps an upper bound for every head of the group; mean is offered too).
    """
    score = bound.amax(dim=2) if group_reduce == "max" else bound.mean(dim=2)
    return topk_indices(score, pages)


def page_tokens(pages: torch.Tensor, page_size: int, first: int, n: int) -> torch.Tensor:
    """Slots of the selected pages (B, H, p) followed by the slots [first, n) of the current page."""
    offsets = torch.arange(page_size, device=pages.device)
    chosen = (pages.unsqueeze(-1) * page_size + offsets).flatten(-2)
    current = torch.arange(first, n, device=pages.device).expand(*pages.shape[:2], n - first)
    return torch.cat([chosen, current], dim=-1)


@register
@dataclass
class Quest(SparseDecodeMethod):
    """Attend each decode query to the pages whose key bounds promise the largest scores.

    The cache is cut into pages of `page_size` slots. For each complete page Quest keeps the
    per-channel minimum and maximum of its keys, computed once when the page fills. A decode query
    scores every page with the upper bound sum_c max(q_c * max_c, q_c * min_c), which no key of the
    page can exceed, takes the top `budget // page_size - 1` pages per KV head (bounds reduced over the
    query heads of each GQA group) and always adds the current, still filling page; the chosen pages
    are gathered and attended in one fused call. The first `dense_layers` layers stay dense. Nothing is
    evicted and keys keep their positions.

    Based on Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
    ICML 2024.

    Parameters
    ----------
    budget:
        Tokens attended per decode query, current page included: an int count or a fraction of the
        prompt; rounded down to whole pages (paper: 256-4096, 1024 and 2048 common).
    page_size:
        Slots per page (paper: 16).
    dense_layers:
        Leading layers that attend densely (paper: 2).
    group_reduce:
        How the bounds of a GQA group's query heads are combined into one page score per KV head:
        "max" (keeps an upper bound for every head) or "mean".
    """

    name = "quest"
    paper = "Tang et al., Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference, ICML 2024"

    budget: Budget = 1024
    page_size: int = 16
    dense_layers: int = 2
    group_reduce: Literal["max", "mean"] = "max"
    budget_tokens: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if self.page_size < 1:
            raise TokensiftError(f"quest page_size must be >= 1, got {self.page_size}")
        if self.dense_layers < 0:
            raise TokensiftError(f"quest dense_layers must be >= 0, got {self.dense_layers}")
        if self.group_reduce not in ("max", "mean"):
            raise TokensiftError(f"quest group_reduce must be max or mean, got {self.group_reduce!r}")

    def resolve(self, prompt_tokens: int) -> Self:
        new = dataclasses.replace(self)
        new.budget_tokens = resolve_budget(self.budget, prompt_tokens)
        if new.budget_tokens < 2 * self.page_size:
            raise TokensiftError(
                f"quest budget resolves to {new.budget_tokens} tokens; at least two pages "
                f"({2 * self.page_size} tokens) are needed: the current page and one selected page"
            )
        return new

    def resolved_params(self) -> dict[str, Any]:
        return {**self.params(), "budget_tokens": self.budget_tokens}

    @property
    def pages(self) -> int:
        """Pages attended per query, the current page included."""
        if self.budget_tokens is None:
            raise RuntimeError("quest: budget used before it was resolved against a prompt")
        return self.budget_tokens // self.page_size

    def decode_attention(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        n, p = keys.shape[2], self.page_size
        current = (n - 1) // p  # pages before the current one are complete
        if layer.index < self.dense_layers:
            if self.dense_layers >= layer.cache.num_layers:
                layer.cache.note(
                    f"quest: dense_layers={self.dense_layers} covers all {layer.cache.num_layers} layers of "
                    "this model; decoding is dense"
                )
            return dense_step(layer, query, keys, values, scale)
        if current <= self.pages - 1:
            layer.cache.note(
                f"quest: its budget of {self.pages} pages covered the whole cache at some decode steps; "
                "those steps attended densely"
            )
            return dense_step(layer, query, keys, values, scale)
        with single_thread():
            return self.sparse_step(layer, query, keys, values, scale)

    def page_summary(self, layer: TokenLayer, keys: torch.Tensor) -> PageSummary:
        """This layer's page summary, rebuilt from scratch whenever the cache moved its slots."""
        state = fresh_state(layer, "quest", page_size=self.page_size)
        if state is None:
            state = new_state(layer, "quest", page_size=self.page_size)
            state["summary"] = PageSummary(keys, self.page_size)
        return state["summary"]

    def sparse_step(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Bound the complete pages, pick the best, attend to them and the current page."""
        n, p = keys.shape[2], self.page_size
        current = (n - 1) // p
        watch = Stopwatch(query.device)
        summary = self.page_summary(layer, keys)
        if summary.pages < current:
            summary.update(keys, current)
            track_state_bytes(layer, "quest", [summary.bounds.data])
        bound = summary.page_scores(grouped(query, keys.shape[1]), current)
        chosen = select_pages(bound, self.pages - 1, self.group_reduce)
        index = page_tokens(chosen, p, current * p, n)
        watch.selected()
        out = sparse_attention(query, keys, values, index, scale)
        watch.attended()
        record(layer, watch, index.shape[-1], sparse=True)
        return out
