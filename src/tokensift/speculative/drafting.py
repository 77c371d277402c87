"""The draft-and-verify loop of model-free speculative decoding, and its two draft sources."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tokensift.speculative.cost import ForwardCost
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


BUCKETS = 6  # match lengths 1, 2-3, 4-7, 8-15, 16-31, 32+


@dataclass
class DraftCut:
    """How much of a draft is worth verifying when a longer forward is not free.

    A step that verifies j draft tokens costs `cost(1 + j)` one-token forwards and commits 1 + the
    accepted drafts; draft token i is expected to be accepted with chance min(1, f * prob_i), where
    prob_i is the suffix tree's estimate (the frequency-based path probability of SuffixDecoding's
    score) and f a factor learned from what the model accepted, per match-length bucket. The draft is
    cut to the prefix with the most expected tokens per unit of time (never shorter than
    `min_tokens`) and not verified at all unless that rate beats a plain step's 1 and `min_rate`.

    The tree's estimates count the context's own unfinished occurrence (a pattern seen once before
    gets 0.5) and are optimistic on short matches in free text, so f starts at `start`, backed by
    `weight` pseudo-tokens, and moves to the observed ratio (accepted / expected). With `pooled` a
    bucket's prior is the whole generation's observed ratio instead of `start`, so a bucket seen for
    the first time starts from how drafting has gone so far. With `judged_only` the expected side
    counts only the tokens the model judged (the accepted ones and the first rejected one; those
    after a rejection were never judged), so one early miss of a long draft does not read as a miss
    of every token in it.
    """

    cost: ForwardCost
    start: float = 2.0
    weight: float = 2.0
    min_tokens: int = 4
    min_rate: float = 1.0
    pooled: bool = False
    accepted: list[float] = field(default_factory=lambda: [0.0] * BUCKETS)
    expected: list[float] = field(default_factory=lambda: [0.0] * BUCKETS)
    judged_only: bool = False  # count only the tokens the model judged (up to the first rejection)
    pending: tuple[int, list[float]] | None = None  # (bucket, probabilities) of the last verified draft

    @staticmethod
    def bucket(match_len: int) -> int:
        return min(max(match_len, 1).bit_length() - 1, BUCKETS - 1)

    def factor(self, bucket: int) -> float:
        prior = self.start
        if self.pooled:
            prior = (sum(self.accepted) + self.start * self.weight) / (sum(self.expected) + self.weight)
        return (self.accepted[bucket] + prior * self.weight) / (self.expected[bucket] + self.weight)

    def best(self, draft: Draft) -> tuple[int, float]:
        """(tokens of `draft` worth verifying, the expected rate); (0, 1.0) when none are."""
        if not draft.token_ids:
            return 0, 1.0
        f = self.factor(self.bucket(draft.match_len))
        keep, rate = self.cost.best_prefix([min(1.0, f * p) for p in draft.probs], self.min_rate)
        if keep:
            keep = max(keep, min(self.min_tokens, len(draft)))
        return keep, rate

    def take(self, draft: Draft, keep: int) -> Draft:
        """The first `keep` tokens of `draft` (a token tree lists parents first: any prefix is a tree),
        remembered for `update`."""
        self.pending = (self.bucket(draft.match_len), draft.probs[:keep]) if keep else None
        return Draft(
            draft.token_ids[:keep], draft.parents[:keep], draft.probs[:keep], match_len=draft.match_len
        )

    def cut(self, draft: Draft) -> Draft:
        return self.take(draft, self.best(draft)[0])

    def update(self, accepted: int) -> None:
        if self.pending is not None:
            b, probs = self.pending
            self.accepted[b] += accepted
            self.expected[b] += sum(probs[: accepted + 1] if self.judged_only else probs)
            self.pending = None


@dataclass
class AdaptiveCut:
    """The adaptive schedule's choice of how much of a draft to verify (suffix_decoding).

    Draft token i is judged only if every token before it was accepted; its chance of acceptance
    then is min(1, f * q_i), q_i the suffix tree's conditional estimate (the token's path probability
    over its parent's, so within an edge 1) and f a factor learned from this generation's judged
    tokens: one per match-length bucket for a draft's first token (prior `first_prior`, or, once
    there is evidence, the ratio pooled over every bucket), one for the tokens after an accepted one
    (prior `next_prior`), each the ratio of accepted tokens to the sum of their q, with `weight`
    pseudo-tokens of prior. Token i's gain is the product of those chances up to it (the expected
    number of accepted tokens is their sum), and the draft is cut to the prefix with the most
    expected tokens per unit of time under `cost` (`ForwardCost.best_prefix`), none unless that
    beats `min_rate`. In free text a draft's first token is rarely accepted and the factors fall
    after a few misses; where the output copies its input they rise and long drafts pay.

    A token tree's gains follow its parents; what the model accepted is counted along the tree's
    likeliest path (an approximation: the accepted branch may be another).
    """

    cost: ForwardCost
    first_prior: float = 1.0
    next_prior: float = 1.0
    weight: float = 2.0
    min_rate: float = 1.0
    first_accepted: list[float] = field(default_factory=lambda: [0.0] * BUCKETS)
    first_expected: list[float] = field(default_factory=lambda: [0.0] * BUCKETS)
    next_accepted: float = 0.0
    next_expected: float = 0.0
    pending: tuple[int, list[float]] | None = None  # (bucket, q along the likeliest path)

    bucket = staticmethod(DraftCut.bucket)

    def first_factor(self, bucket: int) -> float:
        prior = (sum(self.first_accepted) + self.first_prior * self.weight) / (
            sum(self.first_expected) + self.weight
        )
        return (self.first_accepted[bucket] + prior * self.weight) / (
            self.first_expected[bucket] + self.weight
        )

    def next_factor(self) -> float:
        return (self.next_accepted + self.next_prior * self.weight) / (self.next_expected + self.weight)

    @staticmethod
    def conditionals(draft: Draft) -> list[float]:
        """q_i: each token's probability given its parent's (a child of the context: its own)."""
        out = []
        for prob, parent in zip(draft.probs, draft.parents, strict=True):
            above = draft.probs[parent] if parent >= 0 else 1.0
            out.append(min(1.0, prob / above) if above > 0 else 0.0)
        return out

    def gains(self, draft: Draft) -> list[float]:
        first, after = self.first_factor(self.bucket(draft.match_len)), self.next_factor()
        gains: list[float] = []
        for q, parent in zip(self.conditionals(draft), draft.parents, strict=True):
            if parent < 0:
                gains.append(min(1.0, first * q))
            else:
                gains.append(gains[parent] * min(1.0, after * q))
        return gains

    def best(self, draft: Draft) -> tuple[int, float]:
        """(tokens of `draft` worth verifying, the expected rate); (0, 1.0) when none are."""
        if not draft.token_ids:
            return 0, 1.0
        return self.cost.best_prefix(self.gains(draft), self.min_rate)

    def take(self, draft: Draft, keep: int) -> Draft:
        """The first `keep` tokens of `draft` (parents come first: any prefix of a tree is a tree),
        remembered for `update`."""
        kept = Draft(
            draft.token_ids[:keep], draft.parents[:keep], draft.probs[:keep], match_len=draft.match_len
        )
        self.pending = None
        if keep:
            q = self.conditionals(kept)
            chain, at = [], -1
            for i, parent in enumerate(kept.parents):  # the likeliest path: first child at each level
                if parent == at:
                    chain.append(q[i])
                    at = i
            self.pending = (self.bucket(draft.match_len), chain)
        return kept

    def update(self, accepted: int) -> None:
        if self.pending is None:
            return
        b, chain = self.pending
        self.pending = None
        for i, q in enumerate(chain[: accepted + 1]):  # the judged tokens
            hit = float(i < accepted)
            if i == 0:
                self.first_accepted[b] += hit
                self.first_expected[b] += q
            else:
                self.next_accepted += hit
                self.next_expected += q


@dataclass
class SuffixDrafter:
    """SuffixDecoding's draft source: a per-request tree over prompt + output and the global tree.

    `cut` None verifies every draft (the paper). Otherwise, with `adaptive`, the draft of every
    match length (not only the paper's best-scoring one) is cut to its best prefix and the draft with
    the best expected rate is verified; without it the paper's draft is cut."""

    shared: SuffixCache
    max_spec_tokens: int
    max_spec_factor: float
    max_spec_offset: float
    min_token_prob: float
    cut: DraftCut | AdaptiveCut | None = None
    adaptive: bool = False
    tree: bool = False  # draft token trees (verified in one tree-masked forward)
    max_branches: int = 0  # children per tree node (0: no limit)
    copy_offset: float = 0.0  # added to max_spec_offset while the model copies (see `copying`)
    copy_window: int = 1  # steps looked back for an accepted draft token
    local: SuffixTree = field(init=False)
    recent: deque[int] = field(init=False)  # accepted draft tokens of the last `copy_window` steps
    context: list[int] = field(default_factory=list)
    from_global: int = 0  # steps whose draft came from the global tree
    withheld: int = 0  # draft tokens not verified because they were not worth a longer forward
    skipped: int = 0  # adaptive: steps with a candidate draft but none worth verifying
    seen: bool = False  # adaptive: the last proposal had a candidate draft

    def __post_init__(self) -> None:
        self.local = SuffixTree(self.shared.max_depth)
        self.recent = deque(maxlen=self.copy_window)

    def start(self, prompt: list[int]) -> None:
        self.local.extend(0, prompt)
        self.context = list(prompt)

    def observe(self, tokens: list[int]) -> None:
        self.local.extend(0, tokens)
        self.context += tokens

    @property
    def copying(self) -> bool:
        """Whether one of the last `copy_window` steps accepted a draft token: the output is copying
        a span of its context, so a short match after an edit is worth a longer draft."""
        return any(self.recent)

    def args(self, max_tokens: int) -> tuple[int, float, float, float, bool, int]:
        return (
            max_tokens,
            self.max_spec_factor,
            self.max_spec_offset + (self.copy_offset if self.copying else 0.0),
            self.min_token_prob,
            self.tree,
            self.max_branches,
        )

    def speculate(self, max_tokens: int) -> Draft:
        """The paper's draft: the best score of the request's tree, unless the global tree's beats it."""
        draft = self.local.speculate(self.context, *self.args(max_tokens))
        if self.shared.tree.num_seqs:
            other = self.shared.tree.speculate(self.context, *self.args(max_tokens))
            if other.score > draft.score:
                self.from_global += 1
                return other
        return draft

    def best_rate(self, tree: SuffixTree, max_tokens: int) -> tuple[float, Draft, int]:
        """The match length whose draft has the best expected rate, its draft and how much of it to
        verify (ties go to the longer match, as the paper's score does)."""
        assert self.cut is not None
        best: tuple[float, Draft, int] = (1.0, Draft(), 0)
        for draft in tree.candidates(self.context, *self.args(max_tokens)):
            keep, rate = self.cut.best(draft)
            if keep and rate >= best[0]:
                best = (rate, draft, keep)
            self.seen |= bool(draft.token_ids)
        return best

    def propose(self, max_tokens: int) -> Draft:
        max_tokens = min(max_tokens, self.max_spec_tokens)
        if self.cut is None:
            return self.speculate(max_tokens)  # the paper: verify every draft
        if not self.adaptive:
            draft = self.speculate(max_tokens)
            kept = self.cut.cut(draft)
            self.withheld += len(draft) - len(kept)
            return kept
        self.seen = False
        rate, draft, keep = self.best_rate(self.local, max_tokens)
        if self.shared.tree.num_seqs:
            other = self.best_rate(self.shared.tree, max_tokens)
            if other[0] > rate:
                rate, draft, keep = other
                self.from_global += 1
        self.withheld += len(draft) - keep
        self.skipped += self.seen and not keep
        return self.cut.take(draft, keep)

    def feedback(self, accepted: int) -> None:
        if self.cut is not None:
            self.cut.update(accepted)
        self.recent.append(accepted)

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
