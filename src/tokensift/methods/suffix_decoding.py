"""SuffixDecoding: model-free speculative decoding from suffix trees over prompt, output and history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokensift.errors import TokensiftError
from tokensift.methods.base import LoopMethod, register
from tokensift.speculative.drafting import SuffixDrafter, draft_loop, global_cache

if TYPE_CHECKING:
    import torch

    from tokensift.runtime.generate import Decoding


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

    Verifying a draft is nearly free on a GPU but costs about `verify_cost * (1 + j / 16)` extra
    one-token forwards for j draft tokens on a CPU, so a draft is cut to its prefix with the best
    expected tokens per unit of time (its probabilities, calibrated per match length by what the
    model accepted) and skipped when no prefix beats a plain step; `verify_cost=0` verifies every
    draft, as the paper does.

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
    max_spec_tokens:
        Most draft tokens per step (vLLM default: 16).
    max_spec_factor, max_spec_offset:
        Draft at most `factor * match_length + offset` tokens (paper: 1.0 and 0).
    min_token_prob:
        Stop drafting where the estimated token probability falls below this (paper: 0.1).
    max_cached_requests:
        Responses kept in the global tree, oldest evicted first; -1 keeps all, 0 disables it.
    verify_cost:
        Extra cost of a multi-token verification forward, in one-token forwards (measured on one
        CPU core: ~0.7 for smollm2-135m, ~1.0 for the Qwen2.5-Coder models; 0 on a GPU, where the
        paper verifies every draft).
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
    max_spec_tokens: int = 16
    max_spec_factor: float = 1.0
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1
    max_cached_requests: int = 1000
    verify_cost: float = 1.0
    tree: bool = False
    max_branches: int = 4

    def __post_init__(self) -> None:
        if self.max_depth < 2:
            raise TokensiftError(f"suffix_decoding max_depth must be >= 2, got {self.max_depth}")
        if self.max_spec_tokens < 1:
            raise TokensiftError(f"suffix_decoding max_spec_tokens must be >= 1, got {self.max_spec_tokens}")
        if self.max_spec_factor < 0:
            raise TokensiftError(f"suffix_decoding max_spec_factor must be >= 0, got {self.max_spec_factor}")
        if not 0.0 <= self.min_token_prob <= 1.0:
            raise TokensiftError(
                f"suffix_decoding min_token_prob must lie in [0, 1], got {self.min_token_prob}"
            )
        if self.verify_cost < 0:
            raise TokensiftError(f"suffix_decoding verify_cost must be >= 0, got {self.verify_cost}")
        if self.max_branches < 0:
            raise TokensiftError(f"suffix_decoding max_branches must be >= 0, got {self.max_branches}")
        if self.max_cached_requests < -1:
            raise TokensiftError(
                "suffix_decoding max_cached_requests must be -1 (no limit) or >= 0, "
                f"got {self.max_cached_requests}"
            )

    def decode(self, decoding: Decoding, logits: torch.Tensor) -> None:
        shared = global_cache(decoding.model.name, self.max_depth, self.max_cached_requests)
        decoding.cache.count("suffix_cached_responses", shared.tree.num_seqs)
        drafter = SuffixDrafter(
            shared,
            self.max_spec_tokens,
            self.max_spec_factor,
            self.max_spec_offset,
            self.min_token_prob,
            self.verify_cost,
            self.tree,
            self.max_branches,
        )
        try:
            draft_loop(decoding, logits, drafter, self.name)
        finally:
            decoding.cache.count("suffix_drafts_from_global", drafter.from_global)
            decoding.cache.count("suffix_withheld_tokens", drafter.withheld)
