"""SuffixDecoding: model-free speculative decoding from suffix trees over prompt, output and history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tokensift.errors import TokensiftError
from tokensift.methods.base import LoopMethod, register
from tokensift.speculative.cost import ForwardCost
from tokensift.speculative.drafting import (
    AdaptiveCut,
    DraftCut,
    SuffixCache,
    SuffixDrafter,
    draft_loop,
    global_cache,
)

if TYPE_CHECKING:
    import torch

    from tokensift.runtime.generate import Decoding

# The fixed schedule's draft caps (calibration: benchmarks/suffix_decoding_calibration.py grid-copy,
# seed 0): vLLM's default cap is 16 with no offset; 32 and, while the output copies, 24 more tokens
# than the match length allows.
FIXED_MAX_SPEC, FIXED_COPY_OFFSET, COPY_WINDOW = 32, 24.0, 2
# The adaptive schedule's defaults (calibration: benchmarks/suffix_decoding_calibration.py, seed 0).
ADAPTIVE_MAX_SPEC, ADAPTIVE_OFFSET = 48, 8.0


@register
@dataclass
class SuffixDecoding(LoopMethod):
    """Draft continuations from suffix trees and let the model verify them, losslessly.

    A per-request suffix tree holds the prompt and the tokens generated so far; a global tree holds
    earlier responses of the same model in this process (oldest evicted first). Each step matches
    the last p tokens for every p, drafts at most `max_spec_factor * p + max_spec_offset` tokens down
    the most frequent path while the estimated probability stays above `min_token_prob`, keeps the
    draft with the highest expected number of accepted tokens, and verifies [last token, *draft] in
    one forward: greedy keeps the longest prefix equal to the model's argmax, sampling uses the
    standard rejection rule, and the model's own next token is committed after it. The cache is
    rolled back past the rejected tokens (eviction in the plan waits for the rollback). Greedy
    output is the model's own greedy output; drafts only decide how many tokens one forward yields.

    Verifying a draft is nearly free on a GPU, where the paper verifies every draft, but not on a
    CPU: there a forward over 1 + j tokens costs about 1 + `batch_cost` + `row_cost` * j one-token
    forwards (~1.8x for two tokens, a few % per further token, measured for the Qwen2.5-Coder
    models with 2 threads), so a draft of one or two weak tokens loses time and a long confident one
    is cheap. The default `schedule=fixed` keeps the paper's draft (best score, ties to the longer
    match; the global tree's only when strictly better) and cuts it to the prefix with the best
    expected tokens per unit of time under 1 + `verify_cost` * (1 + j / 16), with a per-bucket
    acceptance factor starting at 2 and at least 4 tokens, skipping it when no prefix beats a plain
    step; `schedule=fixed,verify_cost=0` verifies every draft, as the paper does. While the output
    copies (one of the last `copy_window` steps accepted a draft token) a draft may run
    `copy_offset` tokens past the paper's `max_spec_factor * p` (not in the paper): right after an
    edit the match is short, and the copy it interrupted usually goes on.

    `schedule=adaptive` (opt-in; not in the paper) weighs, for the draft of every match length p
    (each at most `min(max_spec_tokens, max_spec_factor * p + max_spec_offset)` tokens, walked while
    the tree's estimate is at least `min_token_prob`), each prefix's expected tokens per unit of
    time and verifies the best prefix of the best draft, or nothing when no rate beats plain
    decoding's 1 (or `min_rate`). Expected tokens come from the tree's frequency estimates (the terms
    of the paper's score) times acceptance factors learned during the generation: one for a draft's
    first token per match-length bucket (prior `first_prior`), one for each token after an accepted
    one (prior `next_prior`), both backed by `prior_weight` pseudo-tokens (see
    `tokensift.speculative.drafting.AdaptiveCut`). It does not explore: after early misses it can
    stop drafting for the rest of a generation, which is why it is not the default (held-out
    measurement: docs/generation_loops.md). With `batch_cost=0,row_cost=0` (a GPU) every candidate
    is worth verifying whole.

    With `tree=true` the draft is a token tree (the paper's speculation tree): from the match, the
    likeliest continuations by the tree's frequency counts, best first, at most `max_branches`
    children per node. All its nodes are verified in one forward with a tree attention mask (each
    node sees its ancestors, at the position after them), the longest path the model accepts is
    committed and the cache keeps only that path's keys and values. Greedy output stays the model's
    own; sampling tries a node's children one by one with the rejection rule, which keeps the
    target distribution. Plans whose attention takes no tree mask (sparse decode, re-positioned or
    per-head caches) verify the tree's likeliest path instead, with a note.

    Based on Oliaro, Jia, Campos, Qiao, "SuffixDecoding: Extreme Speculative Decoding for Emerging
    AI Applications", NeurIPS 2025 (reference: snowflakedb/ArcticInference).

    Parameters
    ----------
    max_depth:
        Longest suffix stored in the trees and longest context match (paper: 64).
    schedule:
        `fixed` (the paper's draft, cut by `verify_cost`) or `adaptive` (the cost and acceptance
        models above, opt-in).
    max_spec_tokens:
        Most draft tokens per step. None: `FIXED_MAX_SPEC` (32; vLLM's default is 16) under `fixed`,
        `ADAPTIVE_MAX_SPEC` (48) under `adaptive`, where the cost model decides how much of a draft
        is verified.
    max_spec_factor, max_spec_offset:
        Draft at most `factor * match_length + offset` tokens (paper: 1.0 and 0). Offset None: 0
        under `fixed`, `ADAPTIVE_OFFSET` (8) under `adaptive`, so that a short match (say right after
        a renamed identifier) can still propose a long copy and the cost model judges it.
    copy_offset, copy_window:
        Extra draft tokens allowed (on top of `max_spec_offset`) while one of the last `copy_window`
        steps accepted a draft token. Offset None: `FIXED_COPY_OFFSET` (24) under `fixed` (set on
        calibration seed 0: on the plateau of the replay's best repetitive speed-ups whose worst open
        chat prompt stays the paper rule's), 0 under `adaptive`. 0 is the paper's rule.
    min_token_prob:
        Stop drafting where the estimated token probability falls below this (paper: 0.1).
    max_cached_requests:
        Responses kept in the global tree, oldest evicted first; -1 keeps all, 0 disables it.
    batch_cost, row_cost:
        `adaptive`: a forward over 1 + j tokens costs 1 + batch_cost + row_cost * j one-token
        forwards (`tokensift.speculative.cost.ForwardCost`, shared with `bild`'s adaptive schedule,
        same defaults; qwen2.5-coder-0.5b, 2 threads, measured 1.9x for 2 tokens, 1.6-1.9x for 4-16,
        3.3x for 48: benchmarks/results/suffix_decoding_calibration.json). 0 and 0 on a GPU.
    min_rate:
        `adaptive`: verify a draft only if its expected tokens per unit of time exceed this.
    first_prior, next_prior, prior_weight:
        `adaptive`: starting acceptance factors of a draft's first token and of the tokens after an
        accepted one, and their weight in pseudo-tokens (set on calibration seed 0 by replaying the
        drafts against greedy output with the measured forward costs).
    verify_cost:
        `fixed`: extra cost of a multi-token verification forward, in one-token forwards, in the
        earlier model 1 + verify_cost * (1 + j / 16); 0 verifies every draft, as the paper does.
    tree:
        Draft and verify token trees instead of single paths. Default off, from the measurement:
        on qwen2.5-coder-0.5b (2 CPU threads, 7 repetitive workloads, 35 paired repeats; README,
        benchmarks/results/generation_loops.json) tree vs single path was 1.02x [0.93-1.06], so
        the tree does not win at the lower quartile: a wider forward is not free on a CPU.
    max_branches:
        Most children per tree node (0: no limit); only with `tree`.
    """

    name = "suffix_decoding"
    paper = (
        "Oliaro et al., SuffixDecoding: Extreme Speculative Decoding for Emerging AI Applications, "
        "NeurIPS 2025"
    )

    max_depth: int = 64
    schedule: Literal["adaptive", "fixed"] = "fixed"
    max_spec_tokens: int | None = None
    max_spec_factor: float = 1.0
    max_spec_offset: float | None = None
    min_token_prob: float = 0.1
    max_cached_requests: int = 1000
    batch_cost: float = 0.8
    row_cost: float = 0.06
    min_rate: float = 1.0
    first_prior: float = 0.7
    next_prior: float = 0.8
    prior_weight: float = 4.0
    verify_cost: float = 1.0
    tree: bool = False
    max_branches: int = 4
    copy_offset: float | None = None
    copy_window: int = COPY_WINDOW

    def __post_init__(self) -> None:
        if self.max_depth < 2:
            raise TokensiftError(f"suffix_decoding max_depth must be >= 2, got {self.max_depth}")
        if self.schedule not in ("adaptive", "fixed"):
            raise TokensiftError(f"suffix_decoding schedule must be adaptive or fixed, got {self.schedule!r}")
        if self.max_spec_tokens is not None and self.max_spec_tokens < 1:
            raise TokensiftError(f"suffix_decoding max_spec_tokens must be >= 1, got {self.max_spec_tokens}")
        if self.max_spec_factor < 0:
            raise TokensiftError(f"suffix_decoding max_spec_factor must be >= 0, got {self.max_spec_factor}")
        if self.max_spec_offset is not None and self.max_spec_offset < 0:
            raise TokensiftError(f"suffix_decoding max_spec_offset must be >= 0, got {self.max_spec_offset}")
        if self.copy_offset is not None and self.copy_offset < 0:
            raise TokensiftError(f"suffix_decoding copy_offset must be >= 0, got {self.copy_offset}")
        if self.copy_window < 1:
            raise TokensiftError(f"suffix_decoding copy_window must be >= 1, got {self.copy_window}")
        if not 0.0 <= self.min_token_prob <= 1.0:
            raise TokensiftError(
                f"suffix_decoding min_token_prob must lie in [0, 1], got {self.min_token_prob}"
            )
        for name in ("verify_cost", "batch_cost", "row_cost", "min_rate", "prior_weight"):
            if getattr(self, name) < 0:
                raise TokensiftError(f"suffix_decoding {name} must be >= 0, got {getattr(self, name)}")
        for name in ("first_prior", "next_prior"):
            if not getattr(self, name) > 0:
                raise TokensiftError(f"suffix_decoding {name} must be > 0, got {getattr(self, name)}")
        if self.max_branches < 0:
            raise TokensiftError(f"suffix_decoding max_branches must be >= 0, got {self.max_branches}")
        if self.max_cached_requests < -1:
            raise TokensiftError(
                "suffix_decoding max_cached_requests must be -1 (no limit) or >= 0, "
                f"got {self.max_cached_requests}"
            )

    @property
    def adaptive(self) -> bool:
        return self.schedule == "adaptive"

    def drafter(self, shared: SuffixCache) -> SuffixDrafter:
        """The draft source with this method's settings (the defaults of the schedule filled in)."""
        adaptive = self.adaptive
        spec = self.max_spec_tokens or (ADAPTIVE_MAX_SPEC if adaptive else FIXED_MAX_SPEC)
        offset = self.max_spec_offset
        if offset is None:
            offset = ADAPTIVE_OFFSET if adaptive else 0.0
        copy_offset = self.copy_offset
        if copy_offset is None:
            copy_offset = 0.0 if adaptive else FIXED_COPY_OFFSET
        if adaptive:
            cut: DraftCut | AdaptiveCut | None = AdaptiveCut(
                ForwardCost(self.batch_cost, self.row_cost),
                self.first_prior,
                self.next_prior,
                self.prior_weight,
                self.min_rate,
            )
        elif self.verify_cost > 0:
            # The earlier model: 1 + c * (1 + j / 16) for j draft tokens, factor prior 2 per bucket.
            cut = DraftCut(ForwardCost(self.verify_cost, self.verify_cost / 16))
        else:
            cut = None  # the paper: verify every draft
        return SuffixDrafter(
            shared,
            spec,
            self.max_spec_factor,
            offset,
            self.min_token_prob,
            cut,
            adaptive,
            self.tree,
            self.max_branches,
            copy_offset,
            self.copy_window,
        )

    def decode(self, decoding: Decoding, logits: torch.Tensor) -> None:
        shared = global_cache(decoding.model.name, self.max_depth, self.max_cached_requests)
        decoding.cache.count("suffix_cached_responses", shared.tree.num_seqs)
        drafter = self.drafter(shared)
        try:
            draft_loop(decoding, logits, drafter, self.name)
        finally:
            decoding.cache.count("suffix_drafts_from_global", drafter.from_global)
            decoding.cache.count("suffix_withheld_tokens", drafter.withheld)
            if self.adaptive:
                decoding.cache.count("suffix_skipped_drafts", drafter.skipped)
