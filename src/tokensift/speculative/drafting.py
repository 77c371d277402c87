"""The draft-and-verify loop of model-free speculative decoding, and its two draft sources."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tokensift.speculative.suffix_tree import Draft, SuffixTree
from tokensift.speculative.verify import LoopStats, Verifier, accept_draft, accept_tree

if TYPE_CHECKING:
    import torch

    from tokensift.runtime.generate import Decoding


class Drafter(Protocol):
    """A source of draft tokens that follows the sequence as it grows."""

    def start(self, prompt: list[int]) -> None: ...
    def propose(self, max_tokens: int) -> list[int] | Draft: ...  # a path, or a token tree
    def feedback(self, accepted: int) -> None: ...  # how many of the last proposal the model accepted
    def observe(self, tokens: list[int]) -> None: ...
    def finish(self, response: list[int]) -> None: ...


def draft_loop(decoding: Decoding, logits: torch.Tensor, drafter: Drafter, name: str) -> None:
    """Decode with drafts: each step verifies [last token, *draft] in one forward, commits the accepted
    prefix plus one target token and rolls the cache back past the rejected rest. A branching draft
    (a token tree) is verified in one tree-masked forward and the longest accepted path is kept;
    under a plan whose kernels take no tree mask its likeliest path is verified instead."""
    verifier = Verifier(decoding)
    stats = LoopStats()
    per_step: list[int] = decoding.cache.shared.setdefault("loop_step_tokens", [])  # tokens per step
    asked = 0  # steps with room for a draft
    start = time.perf_counter()
    drafter.start(decoding.prompt)
    token = decoding.sample(logits)
    try:
        if decoding.accept(token, logits):
            return
        drafter.observe([token])
        while True:
            t0 = time.perf_counter()
            room = decoding.max_new_tokens - len(decoding.tokens) - 1  # the step adds one more itself
            draft, parents = as_tree(drafter.propose(room) if room > 0 else [])
            if parents is not None and not verifier.takes_trees:
                draft, parents = first_path(draft, parents), None
                decoding.cache.note(
                    f"{name}: this plan's attention takes no tree mask; drafts verified as paths"
                )
            asked += room > 0
            t1 = time.perf_counter()
            if parents is None:
                rows = verifier.forward([token, *draft])
                committed = accept_draft(decoding, rows, draft)
                verifier.keep(len(committed))  # the input token and the accepted drafts stay cached
            else:
                rows = verifier.forward([token, *draft], [-1, *(p + 1 for p in parents)])
                committed, path = accept_tree(decoding, rows, draft, parents)
                verifier.keep(path)  # the input token and the accepted path stay cached
                stats.tree_steps += 1
            drafter.feedback(len(committed) - 1)
            stats.draft_seconds += t1 - t0
            stats.verify_seconds += time.perf_counter() - t1
            stats.steps += 1
            stats.drafted += len(draft)
            stats.accepted += len(committed) - 1
            stats.empty += not draft
            stats.committed += len(committed)
            per_step.append(len(committed))
            for tok, row in committed:
                if decoding.accept(tok, row):
                    return
            drafter.observe([tok for tok, _ in committed])
            token = committed[-1][0]
    finally:
        drafter.finish(decoding.tokens)
        stats.record(decoding.cache, time.perf_counter() - start)
        if stats.steps and not stats.drafted:
            why = "proposed no draft tokens" if asked else "had no room to draft (max_new_tokens too small)"
            decoding.cache.note(
                f"{name} {why}: all {stats.steps} steps decoded one token each, as plain decoding does"
            )
        elif stats.drafted and not stats.accepted:
            decoding.cache.note(
                f"{name}: the model accepted none of the {stats.drafted} draft tokens; every step "
                "decoded one token, as plain decoding does"
            )
        elif not stats.steps:
            decoding.cache.note(f"{name}: the prefill wrote the only token; no decode step to draft for")


def as_tree(proposal: list[int] | Draft) -> tuple[list[int], list[int] | None]:
    """(tokens, parents) of a proposal; parents None when it is a plain path."""
    if not isinstance(proposal, Draft):
        return list(proposal), None
    tokens, parents = proposal.token_ids, proposal.parents
    if all(p == i - 1 for i, p in enumerate(parents)):
        return tokens, None
    return tokens, parents


def first_path(tokens: list[int], parents: list[int]) -> list[int]:
    """The path through a token tree that always takes the first (likeliest) child."""
    path, at = [], -1
    for i, parent in enumerate(parents):
        if parent == at:
            path.append(tokens[i])
            at = i
    return path


@dataclass
class SuffixCache:
    """The global tree over earlier responses, evicting the oldest beyond `max_requests` (-1: no limit)."""

    max_depth: int
    max_requests: int
    tree: SuffixTree = field(init=False)
    order: deque[int] = field(default_factory=deque)
    next_id: int = 0

    def __post_init__(self) -> None:
        self.tree = SuffixTree(self.max_depth)

    def add(self, response: list[int]) -> None:
        if self.max_requests == 0 or not response:
            return
        self.tree.extend(self.next_id, response)
        self.order.append(self.next_id)
        self.next_id += 1
        while self.max_requests > 0 and len(self.order) > self.max_requests:
            self.tree.remove(self.order.popleft())


# Global trees live for the process, one per (model, depth): later requests draft from earlier ones.
_GLOBAL: dict[tuple[str, int], SuffixCache] = {}


def global_cache(model: str, max_depth: int, max_requests: int) -> SuffixCache:
    key = (model, max_depth)
    cache = _GLOBAL.get(key)
    if cache is None or cache.max_requests != max_requests:
        cache = _GLOBAL[key] = SuffixCache(max_depth, max_requests)
    return cache


def clear_global_caches() -> None:
    """Forget every earlier response (tests and benchmarks start from a known state)."""
    _GLOBAL.clear()


@dataclass
class VerifyCost:
    """How much of a draft is worth verifying when a longer forward is not free.

    On a CPU a forward over 1 + j tokens costs about 1 + cost * (1 + j / 16) one-token forwards
    (measured with one thread: cost ~0.7 for smollm2-135m, ~1.0 for the Qwen2.5-Coder 0.5B and 1.5B;
    the step from one row to several is the expensive part, more rows are cheap), and yields
    1 + (expected accepted tokens). The draft is cut to the prefix with the best expected tokens per
    unit of time, never shorter than `min_tokens` (extra rows cost little once there are several),
    and not verified at all when no prefix beats a plain step. Expected accepted tokens are the
    draft's probabilities times a factor learned per match-length bucket from what the model
    accepted: the tree's estimates count the context's own unfinished occurrence (a pattern seen
    once before gets 0.5) and are optimistic on short matches in free text, so the factor starts at
    `start` and moves to the observed ratio.
    """

    cost: float
    start: float = 2.0
    weight: float = 2.0  # pseudo-tokens behind the starting factor
    min_tokens: int = 4
    accepted: list[float] = field(default_factory=lambda: [0.0] * 6)
    expected: list[float] = field(default_factory=lambda: [0.0] * 6)
    pending: tuple[int, float] | None = None  # (bucket, expected tokens) of the last verified draft

    @staticmethod
    def bucket(match_len: int) -> int:
        return min(max(match_len, 1).bit_length() - 1, 5)  # 1, 2-3, 4-7, 8-15, 16-31, 32+

    def cut(self, draft: Draft) -> int:
        """Tokens of `draft` to verify."""
        self.pending = None
        if not draft.token_ids:
            return 0
        b = self.bucket(draft.match_len)
        factor = (self.accepted[b] + self.start * self.weight) / (self.expected[b] + self.weight)
        best, best_rate, gain = 0, 1.0, 0.0
        for j, p in enumerate(draft.probs, 1):
            gain += min(1.0, factor * p)
            rate = (1.0 + gain) / (1.0 + self.cost * (1.0 + j / 16))
            if rate > best_rate:
                best, best_rate = j, rate
        if best:
            best = max(best, min(self.min_tokens, len(draft)))
            self.pending = (b, sum(draft.probs[:best]))
        return best

    def update(self, accepted: int) -> None:
        if self.pending is not None:
            b, expected = self.pending
            self.accepted[b] += accepted
            self.expected[b] += expected
            self.pending = None


@dataclass
class SuffixDrafter:
    """SuffixDecoding's draft source: a per-request tree over prompt + output and the global tree."""

    shared: SuffixCache
    max_spec_tokens: int
    max_spec_factor: float
    max_spec_offset: float
    min_token_prob: float
    verify_cost: float = 0.0
    tree: bool = False  # draft token trees (verified in one tree-masked forward)
    max_branches: int = 0  # children per tree node (0: no limit)
    local: SuffixTree = field(init=False)
    cost: VerifyCost = field(init=False)
    context: list[int] = field(default_factory=list)
    from_global: int = 0  # steps whose draft came from the global tree
    withheld: int = 0  # draft tokens not verified because they were not worth a longer forward

    def __post_init__(self) -> None:
        self.local = SuffixTree(self.shared.max_depth)
        self.cost = VerifyCost(self.verify_cost)

    def start(self, prompt: list[int]) -> None:
        self.local.extend(0, prompt)
        self.context = list(prompt)

    def observe(self, tokens: list[int]) -> None:
        self.local.extend(0, tokens)
        self.context += tokens

    def speculate(self, max_tokens: int) -> Draft:
        args = (
            max_tokens,
            self.max_spec_factor,
            self.max_spec_offset,
            self.min_token_prob,
            self.tree,
            self.max_branches,
        )
        draft = self.local.speculate(self.context, *args)
        if self.shared.tree.num_seqs:
            other = self.shared.tree.speculate(self.context, *args)
            if other.score > draft.score:
                self.from_global += 1
                return other
        return draft

    def propose(self, max_tokens: int) -> Draft:
        draft = self.speculate(min(max_tokens, self.max_spec_tokens))
        if self.verify_cost <= 0:
            return draft  # the paper: verify every draft
        # A tree lists parents before children, likeliest first: any prefix is a tree.
        keep = self.cost.cut(draft)
        self.withheld += len(draft) - keep
        return Draft(
            draft.token_ids[:keep], draft.parents[:keep], draft.probs[:keep], match_len=draft.match_len
        )

    def feedback(self, accepted: int) -> None:
        self.cost.update(accepted)

    def finish(self, response: list[int]) -> None:
        self.shared.add(list(response))


@dataclass
class NgramDrafter:
    """Prompt lookup: the tokens that followed the earliest earlier occurrence of the last n-gram,
    trying n = max_ngram down to min_ngram (as transformers' prompt lookup does)."""

    num_tokens: int
    max_ngram: int
    min_ngram: int
    seq: list[int] = field(default_factory=list)
    first: dict[tuple[int, ...], int] = field(default_factory=dict)  # earliest start of each n-gram

    def start(self, prompt: list[int]) -> None:
        self.observe(prompt)

    def observe(self, tokens: list[int]) -> None:
        for token in tokens:
            self.seq.append(token)
            end = len(self.seq)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.first.setdefault(tuple(self.seq[end - n :]), end - n)

    def propose(self, max_tokens: int) -> list[int]:
        seq, end = self.seq, len(self.seq)
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            start = self.first.get(tuple(seq[end - n :]))
            if start is not None and start + n < end:
                return seq[start + n : start + n + min(self.num_tokens, max_tokens)]
        return []

    def feedback(self, accepted: int) -> None:
        pass

    def finish(self, response: list[int]) -> None:
        pass
