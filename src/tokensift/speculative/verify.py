"""Draft verification shared by the loop methods: one target forward over several tokens, the
acceptance rule, and an exact rollback that respects the rest of the plan.

A verification forward must show the target what plain decoding would have shown it, one token at a
time, and leave the cache as if the rejected tokens had never been seen:

- Eviction is deferred. During the forward the evictor only records each layer's queries; after the
  rollback it catches up once, seeing the step as one decode step whose attention column sums cover
  every accepted token. So nothing a rejected token caused survives (its keys, its attention in
  H2O's scores, evictions it triggered), and `crop` is an exact rollback because nothing was evicted
  between the append and the crop. Prompt-only compressors (SnapKV) never act on decode steps, so
  their composition is token-identical to the compressor alone.
- A sparse-prefill method does not run on decode steps, so it is switched off for verification.
- A sparse-decode method selects per query: each draft query gets the method's decode attention over
  the keys it would have seen had it been decoded alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokensift.methods.base import EvictionMethod, SparseDecodeMethod, SparsePrefillMethod
from tokensift.runtime.plan import Plan
from tokensift.runtime.scores import attention_with_colsums

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenCache, TokenLayer
    from tokensift.runtime.generate import Decoding


@dataclass
class DeferredEviction(EvictionMethod):
    """Stands in for the plan's evictor during a verification forward: records queries, evicts nothing."""

    inner: EvictionMethod | None = None
    queries: dict[int, tuple[torch.Tensor, float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        assert self.inner is not None
        # Class-level switches the attention function reads, mirrored per instance.
        self.needs_colsums = self.inner.needs_colsums  # type: ignore[misc]
        self.repositions = self.inner.repositions  # type: ignore[misc]
        self.budget_tokens = self.inner.budget_tokens

    def column_scores(self, layer: TokenLayer) -> None:
        return None  # the verification forward's column sums are discarded: no noise drawn for them

    def compress(
        self, layer: TokenLayer, query: torch.Tensor, colsum: torch.Tensor | None, scale: float
    ) -> None:
        self.queries[layer.index] = (query, scale)

    def catch_up(self, cache: TokenCache, kept: list[int]) -> None:
        """After the rollback: one eviction step over the accepted rows `kept` of the forward."""
        assert self.inner is not None
        for layer in cache.layers:
            query, scale = self.queries.pop(layer.index)
            query = query[:, :, kept]
            colsum = None
            if self.inner.needs_colsums:
                score_fn = self.inner.column_scores(layer)
                _, colsum = attention_with_colsums(query, layer.k, layer.v, scale, score_fn=score_fn)
            self.inner.compress(layer, query[:, :, -1:], colsum, scale)


@dataclass
class PerQueryDecode(SparsePrefillMethod):
    """Stands in for the prefill hook during verification: each query gets the sparse-decode method's
    attention over the keys visible to it, with the layer looking as it did at that decode step
    (live tokens, tokens seen) and its own view of the cache's shared state, so selections one layer
    hands to the next (TidalDecode) stay per query."""

    metered: ClassVar[bool] = False  # decode steps, counted by the sparse-decode method

    select: SparseDecodeMethod | None = None
    views: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def prefill_attention(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        assert self.select is not None
        cache = layer.cache
        length, n = query.shape[2], keys.shape[2]
        if len(self.views) != length:
            self.views = [dict(cache.shared) for _ in range(length)]
        full = layer.n, layer.seen, layer.last_query_len, cache.shared
        outs = []
        try:
            for i in range(length):
                back = length - 1 - i
                layer.n, layer.seen, layer.last_query_len = full[0] - back, full[1] - back, 1
                cache.shared = self.views[i]
                visible = n - back
                outs.append(
                    self.select.decode_attention(
                        layer, query[:, :, i : i + 1], keys[:, :, :visible], values[:, :, :visible], scale
                    )
                )
        finally:
            layer.n, layer.seen, layer.last_query_len, cache.shared = full
        return torch.cat(outs, dim=2)

    def settle(self, cache: TokenCache, kept: int) -> None:
        """Keep the shared state as the last accepted query left it."""
        if self.views:
            cache.shared = self.views[kept - 1]
            self.views = []


# On CPU, MKL multiplies a 3-row input through a slow small-matrix path: a 3-token forward cost
# 1.9-2.9x a one-token forward where a 4-token one cost 1.5-2.0x (smollm2-135m, Qwen2.5-Coder 0.5B
# and 1.5B, one thread). Such forwards get a filler row, cropped with the rejected tokens.
PAD_ROWS = {3: 4}


class Verifier:
    """Runs a loop method's multi-token forwards through `decoding`'s cache as plain decoding would."""

    def __init__(self, decoding: Decoding):
        self.decoding = decoding
        self.cache = decoding.cache
        base = self.cache.plan
        self.deferred: DeferredEviction | None = None
        methods: list[Any] = []
        for method in base.methods:
            if method is base.evict:
                self.deferred = DeferredEviction(budget=method.budget, inner=base.evict)
                methods.append(self.deferred)
            elif method is not base.prefill:
                methods.append(method)
        self.per_query: PerQueryDecode | None = None
        if base.select is not None:
            self.per_query = PerQueryDecode(select=base.select)
            methods.append(self.per_query)
        self.plan = Plan(tuple(methods), base.prompt_tokens)
        self.pad = decoding.device.type == "cpu"
        self.pending = 0

    @property
    def takes_trees(self) -> bool:
        """Whether a tree of drafts can be verified in one forward under this plan: the exact kernels
        take the tree mask; per-query sparse decode, re-positioned keys and per-head (ragged) layers
        do not."""
        plan = self.cache.plan
        return (
            self.per_query is None
            and not plan.repositions
            and not any(getattr(layer, "ragged", False) for layer in self.cache.layers)
        )

    def forward(self, ids: Sequence[int], parents: Sequence[int] | None = None) -> torch.Tensor:
        """Logits (len(ids), vocab) for tokens appended at the next positions; call `keep` afterwards.

        With `parents` (row index of each row's parent, -1 for the first row) the rows are a token
        tree verified in one forward: each row sees its ancestors and sits at the position after them.
        """
        if len(ids) == 1:  # a plain decode step: the plan as is
            self.pending = 0
            return self.decoding.forward(ids)
        rows = list(ids)
        links = list(parents) if parents is not None else None
        if self.pad:
            extra = PAD_ROWS.get(len(rows), len(rows)) - len(rows)
            rows += rows[-1:] * extra
            if links is not None:
                links += [len(links) - 1 + i for i in range(extra)]  # a chain below the last row
        visible = None if links is None else tree_visibility(links)
        base = self.cache.plan
        self.cache.plan = self.plan
        try:
            logits = self.decoding.forward(rows, visible=visible)
        finally:
            self.cache.plan = base
        self.pending = len(rows)
        return logits[: len(ids)]

    def keep(self, kept: int | Sequence[int]) -> None:
        """Keep the first `kept` tokens of the last forward (or the rows `kept` of a tree forward, in
        order, compacted): drop the rest, then let eviction catch up."""
        if not self.pending:
            return
        rows = list(range(kept)) if isinstance(kept, int) else list(kept)
        if rows == list(range(len(rows))):
            drop = self.pending - len(rows)
            if drop > 0:
                self.cache.crop(-drop)
        else:
            self.cache.keep_recent(rows, self.pending)
        if self.per_query is not None:
            self.per_query.settle(self.cache, len(rows))
        if self.deferred is not None:
            self.deferred.catch_up(self.cache, rows)
        self.pending = 0


def tree_visibility(parents: Sequence[int]) -> torch.Tensor:
    """(L, L) bool: row i sees row j when j is i or an ancestor of i (`parents[i] < i`, -1 for a root)."""
    n = len(parents)
    visible = torch.eye(n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            if parent >= i:
                raise ValueError(f"tree row {i} has parent {parent}: parents must come first")
            visible[i] |= visible[parent]
    return visible


def accept_draft(
    decoding: Decoding, rows: torch.Tensor, draft: Sequence[int]
) -> list[tuple[int, torch.Tensor]]:
    """Tokens the target commits after verifying `draft`: the accepted prefix plus one more token
    (the correction at the first rejection, else the bonus), each with the logits it came from.

    `rows[j]` are the target's logits after the j-th input (the last committed token, then the draft).
    Greedy: accept while the draft equals the argmax. Sampling: the standard rejection rule for a
    deterministic draft (q = 1 on the drafted token): accept with probability p(token), else draw from
    p with that token removed; this leaves the target distribution unchanged.
    """
    from tokensift.runtime.generate import sampling_probs  # generate imports the methods that import us

    out: list[tuple[int, torch.Tensor]] = []
    for j, token in enumerate(draft):
        row = rows[j]
        if decoding.temperature <= 0:
            choice = decoding.sample(row)
            out.append((choice, row))
            if choice != token:
                return out
            continue
        p = sampling_probs(row, decoding.temperature, decoding.top_p)
        if float(torch.rand((), generator=decoding.generator)) < float(p[token]):
            out.append((token, row))
            continue
        p[token] = 0
        out.append((int(torch.multinomial((p / p.sum()).cpu(), 1, generator=decoding.generator)), row))
        return out
    row = rows[len(draft)]
    out.append((decoding.sample(row), row))
    return out


def accept_tree(
    decoding: Decoding, rows: torch.Tensor, draft: Sequence[int], parents: Sequence[int]
) -> tuple[list[tuple[int, torch.Tensor]], list[int]]:
    """`accept_draft` for a token tree: the committed tokens and the forward rows they leave cached.

    `rows[0]` follows the last committed token, `rows[i + 1]` draft node i, whose parent is node
    `parents[i]` (-1: the last committed token). From the current row, greedy takes the argmax and
    descends into the child holding it, if any. Sampling tries the children in draft order with the
    rejection rule for deterministic drafts: accept child c with probability p(c), else remove c from
    p, renormalise and try the next one; when none is accepted the token is drawn from what is left.
    Each step is an exact draw from p (sampling without replacement until a hit), so the output
    keeps the target distribution. The path ends at the first token no child holds.
    """
    from tokensift.runtime.generate import sampling_probs

    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent + 1, []).append(i + 1)
    out: list[tuple[int, torch.Tensor]] = []
    path = [0]
    row_id = 0
    while True:
        row = rows[row_id]
        kids = children.get(row_id, [])
        by_token = {draft[k - 1]: k for k in kids}
        if decoding.temperature <= 0:
            choice = decoding.sample(row)
        else:
            p = sampling_probs(row, decoding.temperature, decoding.top_p)
            choice = -1
            for k in kids:
                token = draft[k - 1]
                mass = float(p.sum())
                if mass > 0 and float(torch.rand((), generator=decoding.generator)) * mass < float(p[token]):
                    choice = token
                    break
                p[token] = 0
            if choice < 0:
                choice = int(torch.multinomial((p / p.sum()).cpu(), 1, generator=decoding.generator))
        out.append((choice, row))
        nxt = by_token.get(choice)
        if nxt is None:
            return out, path
        path.append(nxt)
        row_id = nxt


def record_loop(
    cache: TokenCache,
    *,
    drafted: int,
    accepted: int,
    forwards_saved: int,
    small_model_tokens: int | None = None,
) -> None:
    """The counters every loop method reports: draft tokens proposed, accepted and rolled back, model
    forwards saved against plain decoding and, for a small-large pair, tokens the small model wrote."""
    cache.count("draft_tokens", drafted)
    cache.count("accepted_tokens", accepted)
    cache.count("rolled_back_tokens", drafted - accepted)
    cache.count("forwards_saved", forwards_saved)
    if small_model_tokens is not None:
        cache.count("small_model_tokens", small_model_tokens)


@dataclass
class LoopStats:
    """Per-generation counters of a draft-and-verify loop: the `record_loop` counters, the rest under
    `loop_*`."""

    steps: int = 0  # target forwards after the prefill
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens accepted
    empty: int = 0  # steps without a draft
    tree_steps: int = 0  # steps that verified a branching draft in one tree-masked forward
    committed: int = 0  # tokens committed by those forwards
    draft_seconds: float = 0.0  # spent proposing drafts
    verify_seconds: float = 0.0  # spent in target forwards, acceptance and rollback

    def record(self, cache: TokenCache, seconds: float) -> None:
        # Plain decoding runs one forward per committed token; the loop ran `steps`.
        record_loop(
            cache, drafted=self.drafted, accepted=self.accepted, forwards_saved=self.committed - self.steps
        )
        for name, value in dataclasses.asdict(self).items():
            if name not in ("drafted", "accepted"):
                cache.count(f"loop_{name}", value)
        if self.steps:
            cache.count("loop_tokens_per_step", self.committed / self.steps)
        if self.drafted:
            cache.count("loop_acceptance_rate", self.accepted / self.drafted)
        if seconds > 0:
            cache.count("loop_tokens_per_second", self.committed / seconds)
