"""BiLD: a small model writes, the large model steps in when the small one is unsure or wrong."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import LoopMethod, register
from tokensift.models import Model
from tokensift.runtime.generate import sampling_probs
from tokensift.speculative.cost import ForwardCost
from tokensift.speculative.drafting import NgramDrafter
from tokensift.speculative.pair import Follower, small_model
from tokensift.speculative.verify import Verifier, record_loop

if TYPE_CHECKING:
    from tokensift.runtime.generate import Decoding


def speculative_accept(
    decoding: Decoding, rows: torch.Tensor, pending: list[int], drafts_q: list[torch.Tensor]
) -> tuple[int, int]:
    """(drafts kept, the large model's next token) under the standard rule. `rows[i]` are the large
    model's logits for draft i (rows[len] after the last); `drafts_q[i]` the distribution draft i was
    sampled from (empty when greedy)."""
    if decoding.temperature <= 0:
        for i, token in enumerate(pending):
            best = int(rows[i].argmax())
            if best != token:
                return i, best
        return len(pending), int(rows[len(pending)].argmax())
    for i, token in enumerate(pending):
        p = sampling_probs(rows[i], decoding.temperature, decoding.top_p)
        q = drafts_q[i].to(p.device)
        if float(torch.rand((), generator=decoding.generator)) * float(q[token]) < float(p[token]):
            continue
        residual = (p - q).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is exact
            residual = p
        return i, int(torch.multinomial((residual / residual.sum()).cpu(), 1, generator=decoding.generator))
    p = sampling_probs(rows[len(pending)], decoding.temperature, decoding.top_p)
    return len(pending), int(torch.multinomial(p.cpu(), 1, generator=decoding.generator))


ADAPTIVE_LOOKUP = 32  # `lookup=None` under the adaptive schedule
RATE_PRIOR = 1.0  # pseudo cost units at rate 1 (plain decoding) in the recent rate R
RATE_DECAY = 0.8  # R weighs each earlier large forward's cycle by this much less: it follows the text
CONTINUE_CAP = 0.9  # a small-model step is always taken while P * a(c_last) is at least this
# The grid the acceptance model is fitted on: a(c) = alpha * c ** gamma.
GAMMAS = torch.tensor(
    [0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 5.0]
)
ALPHAS = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.96, 0.98, 0.99, 1.0])
ALPHA_SCALE = 0.1  # the prior's scale on log alpha (log gamma's is 1)
DRAFT_PRIOR_RATE, DRAFT_PRIOR = 1.2, 2.0  # drafting's rate before any draft: 2 cost units at 1.2
# While drafting does not pay, a draft is still tried after EXPLORE plain forwards, the wait doubling
# after each such try (at most MAX_EXPLORE) and back to EXPLORE once drafting pays again.
EXPLORE, MAX_EXPLORE = 4, 64


class AcceptanceModel:
    """a(c) = alpha * c ** gamma: the chance the large model keeps a draft token the small model gave
    confidence c. (alpha, gamma) is the maximum a-posteriori fit, over a grid, to this generation's
    verified drafts (each token up to the first rejection: kept or not), under a prior centred on
    a(c) = c: log-likelihood minus weight * ((log gamma)^2 + (log alpha / 0.1)^2). gamma < 1 when the
    large model keeps more than the small model's confidence says, > 1 when less; alpha < 1 when even
    confident tokens are rejected."""

    def __init__(self, weight: float):
        self.weight = weight
        self.alpha, self.gamma = 1.0, 1.0
        self.kept = 0
        self.kept_log = 0.0  # sum of log c over kept tokens
        self.rejected: list[float] = []  # confidences of rejected tokens
        self.seen = 0

    def estimate(self, confidence: float) -> float:
        return self.alpha * max(confidence, 1e-9) ** self.gamma

    def update(self, confidences: list[float], kept: int) -> None:
        """The verified draft: its first `kept` tokens were kept, the next (if any) rejected; tokens
        after a rejection were never judged and are not counted."""
        for i, confidence in enumerate(confidences[: kept + 1]):
            c = min(max(confidence, 1e-6), 1 - 1e-6)
            self.seen += 1
            if i < kept:
                self.kept += 1
                self.kept_log += math.log(c)
            else:
                self.rejected.append(c)
        if not self.seen:
            return
        g, a = GAMMAS[:, None], ALPHAS[None, :]
        score = self.kept * a.log() + g * self.kept_log  # (G, A)
        if self.rejected:
            c = torch.tensor(self.rejected)[:, None, None]
            score = score + torch.log1p(-(a * c**g).clamp_max(1 - 1e-6)).sum(0)
        score = score - self.weight * (g.log() ** 2 + (a.log() / ALPHA_SCALE) ** 2)
        best = int(score.argmax())
        self.gamma = float(GAMMAS[best // len(ALPHAS)])
        self.alpha = float(ALPHAS[best % len(ALPHAS)])


def lookup_continuation(lookup: NgramDrafter, seq: list[int], max_tokens: int) -> list[int]:
    """Prompt lookup for a sequence that may run past what `lookup` has observed (a draft): the
    tokens that followed the earliest occurrence, in the observed sequence, of seq's last n-gram."""
    if max_tokens <= 0:
        return []
    known = lookup.seq
    for n in range(min(lookup.max_ngram, len(seq) - 1), lookup.min_ngram - 1, -1):
        start = lookup.first.get(tuple(seq[len(seq) - n :]))
        if start is not None and start + n < len(known):
            return known[start + n : start + n + min(lookup.num_tokens, max_tokens)]
    return []


def count_loop(
    cache: Any,
    counts: dict[str, int],
    small_forwards: int,
    seconds: dict[str, float],
    begin: float,
    small_written: int,
    tokens: int,
) -> None:
    """The loop's counters, its small-model forwards, where the decode time went (host clock; on an
    accelerator it includes waits on queued work) and the share of tokens the small model wrote."""
    for name, value in counts.items():
        cache.count(f"bild_{name}", value)
    cache.count("bild_small_forwards", small_forwards)
    total = time.perf_counter() - begin
    cache.count("bild_small_seconds", seconds["small"])
    cache.count("bild_large_seconds", seconds["large"])
    cache.count("bild_other_seconds", total - seconds["small"] - seconds["large"])
    cache.count("bild_small_share", small_written / max(1, tokens))


@register
@dataclass
class BiLD(LoopMethod):
    """Big Little Decoder: the small model generates until it is unsure, the large model checks it.

    The generating model is the large one. After its prefill token, the small model (same tokenizer)
    decodes greedily; when its top probability falls below `fallback_threshold` (the token is
    discarded), or after `num_small_iters` tokens, the large model runs ONE forward over every token
    it has not seen. For each small token y_i it computes d_i = -log p_large(y_i | prefix), from its
    logits one position earlier; at the first i with d_i > `rollback_threshold` the sequence is cut
    there and y_i replaced by the large model's argmax, and both caches are truncated to the kept
    prefix. Without a rollback the large model's next token is appended. Then the small model
    continues. Greedy only. Not lossless in general; `rollback_threshold=0` (every disagreement rolls
    back) or `fallback_threshold=1` (the large model writes every token) gives the large model's
    greedy output exactly. Unlike the reference, small tokens pending when generation ends are
    checked like any others.

    `lossless=true` keeps the drafting (the small model writes while its top probability is at
    least `fallback_threshold`, at most `num_small_iters` tokens) but verifies with the standard
    speculative-decoding rule instead of the rollback threshold (Leviathan et al., ICML 2023):
    greedy keeps the small tokens up to the first one that differs from the large model's argmax and
    then takes the large model's token, so the output is the large model's greedy output; with
    sampling the small model samples its drafts from its distribution q, draft y is kept with
    probability min(1, p(y) / q(y)), and at the first rejection the token is drawn from
    norm(max(0, p - q)), so the output follows the large model's sampling distribution.

    `lookup=N` (off by default; not in the paper) first tries a prompt-lookup draft: the up to N
    tokens that followed the earliest earlier occurrence of the last `lookup_ngram` tokens in the
    prompt or output (Saxena, "Prompt Lookup Decoding", 2023; transformers' `prompt_lookup_num_tokens`).
    When there is one, the large model verifies it under the same rule (a deterministic draft: q is
    one-hot) and the small model only catches up on the accepted tokens, in one forward; otherwise
    the small model drafts as above. It pays where the output copies the prompt.

    `schedule=adaptive` (the default of `lossless=true`; not in the paper) replaces the fixed
    drafting rule (confidence >= `fallback_threshold`, at most `num_small_iters` tokens) by a cost
    model and an acceptance model learned during the generation, so the draft length follows how
    well the small model is doing. Each small-model token's confidence c (its probability of the
    drafted token) maps to an acceptance estimate a(c) = alpha * c ** gamma, fitted to this
    generation's verified drafts (prior a(c) = c, weight `prior_weight`; see `AcceptanceModel`);
    P = the product of a(c) over the draft is the chance the whole draft is kept. Costs are in
    one-token large forwards: a small-model step costs `small_cost`, each extra row of a forward
    `row_cost` of that model's one-token forward. R is the recent rate (committed tokens per cost
    unit over the last large forwards, each earlier one weighted 0.8 less; prior 1, plain decoding).
    Rules, each a marginal tokens-per-cost comparison (cf. SpecDec++, Huang et al. 2024, which stops
    on the predicted rejection probability; transformers adapts a confidence cut from its acceptance
    ROC and grows or shrinks its draft length):
    - a draft starts when the share of drafts whose first token was kept (prior 0.7) is at least
      small_cost + row_cost (a plain decode step gains 1 token per unit), or the lookup has a
      continuation, or to explore (after 4 plain forwards, the wait doubling after each such try up
      to 64); otherwise the large model decodes alone and the small model catches up later in one
      forward;
    - a token the small model wrote joins the draft while P >= R * row_cost (the draft's first
      token always does, so the acceptance model keeps learning);
    - the small model takes another step while P * a(c_last) >= min(R * (small_cost + row_cost),
      0.9), at most `max_draft` tokens.
    With `lookup=N` the prompt lookup drafts for the small model instead of for the large one
    (staged speculation, Spector & Re 2023): the up-to-N tokens that followed the last
    `lookup_ngram` tokens of the sequence (draft included) go through the small model in one
    forward, and while the small model's own token equals the looked-up one it needs no step of its
    own. The draft is exactly the small model's greedy draft (sampling: an exact sample of its
    distribution, the looked-up token kept with probability q(token) and otherwise drawn from q
    without it), only cheaper, so the large model's rule is unchanged. `fallback_threshold` and
    `num_small_iters` are unused in this schedule; `schedule=fixed` keeps BiLD's.

    Based on Kim et al., "Speculative Decoding with Big Little Decoder", NeurIPS 2023
    (reference: kssteven418/BigLittleDecoder).

    Parameters
    ----------
    small:
        The small model: an embedded name or path sharing the large model's tokenizer.
    fallback_threshold:
        Hand over to the large model when the small model's top probability is below this (paper
        default 0.6); 1 always falls back.
    rollback_threshold:
        Cross-entropy above which a small token is rolled back (paper default 5.0; 2-5 works well).
    num_small_iters:
        Small tokens before the large model checks them anyway (paper: 10).
    skip_agreeing:
        Only roll back where the large model's argmax differs from the small token (the safe form of
        the reference code's "minor optimisation"; off: the paper's rule).
    lossless:
        Verify with the standard speculative rule (above): the large model's own output, greedy or
        sampled; `rollback_threshold` and `skip_agreeing` are then unused.
    lookup:
        Longest prompt-lookup draft (0: never). Fixed schedule: tried before the small model
        drafts; adaptive: drafts for the small model. None: 32 with the adaptive schedule, else 0.
    lookup_ngram:
        Tokens matched by the lookup.
    schedule:
        Lossless mode's drafting: `adaptive` (the cost model above) or `fixed` (BiLD's thresholds).
    max_draft:
        Adaptive schedule: longest draft the large model verifies.
    small_cost:
        Adaptive schedule: a small-model step's time in one-token large-model forwards.
    row_cost:
        Adaptive schedule: the time of each extra row of a multi-token forward, as a share of the
        model's one-token forward.
    prior_weight:
        Adaptive schedule: weight of the acceptance model's prior a(c) = c against the verified drafts.
    """

    name = "bild"
    applied_by: ClassVar[tuple[str, ...]] = ("small_model_tokens",)
    paper = "Kim et al., Speculative Decoding with Big Little Decoder, NeurIPS 2023"

    small: str = "qwen2.5-coder-0.5b"
    fallback_threshold: float = 0.6
    rollback_threshold: float = 5.0
    num_small_iters: int = 10
    skip_agreeing: bool = False
    lossless: bool = False
    lookup: int | None = None
    lookup_ngram: int = 3
    schedule: Literal["adaptive", "fixed"] = "adaptive"
    max_draft: int = 64
    small_cost: float = 0.3
    row_cost: float = 0.06
    batch_cost: float = 0.8
    prior_weight: float = 0.5
    small_model: Model | None = field(default=None, repr=False, compare=False)  # an in-memory model

    def __post_init__(self) -> None:
        if not 0.0 <= self.fallback_threshold <= 1.0:
            raise TokensiftError(f"bild fallback_threshold must lie in [0, 1], got {self.fallback_threshold}")
        if not self.rollback_threshold >= 0:
            raise TokensiftError(f"bild rollback_threshold must be >= 0, got {self.rollback_threshold}")
        if self.num_small_iters < 1:
            raise TokensiftError(f"bild num_small_iters must be >= 1, got {self.num_small_iters}")
        if self.max_draft < 1:
            raise TokensiftError(f"bild max_draft must be >= 1, got {self.max_draft}")
        if not (
            self.small_cost >= 0 and self.row_cost >= 0 and self.batch_cost >= 0 and self.prior_weight > 0
        ):
            raise TokensiftError(
                "bild needs small_cost, row_cost and batch_cost >= 0 and prior_weight > 0, got "
                f"{self.small_cost}, {self.row_cost}, {self.batch_cost} and {self.prior_weight}"
            )
        if (self.lookup is not None and self.lookup < 0) or self.lookup_ngram < 1:
            raise TokensiftError(
                f"bild needs lookup >= 0 and lookup_ngram >= 1, got {self.lookup} and {self.lookup_ngram}"
            )

    def params(self) -> dict[str, Any]:
        params = super().params()
        small = params.pop("small_model")
        if small is not None:
            params["small"] = small.name
        return params

    def decode(self, decoding: Decoding, logits: torch.Tensor) -> None:
        if decoding.temperature > 0 and not self.lossless:
            raise TokensiftError("bild decodes greedily: use temperature 0 (or bild:lossless=true)")
        if self.adaptive:
            self.decode_adaptive(decoding, logits)
            return
        sampling = decoding.temperature > 0
        cache = decoding.cache
        small, large, eos, seq, token, lookup = self.start(decoding, logits)
        counts = dict.fromkeys(
            ["large_forwards", "small_tokens", "fallbacks", "rollbacks", "lookup_drafts", "lookup_tokens"], 0
        )
        drafted = 0  # small tokens the large model checked
        seconds = {"small": 0.0, "large": 0.0}  # in small-model steps, in large-model forwards
        begin = time.perf_counter()
        try:
            if decoding.accept(token, logits):
                return
            while True:
                pending: list[int] = []
                drafts_q: list[torch.Tensor] = []  # the distributions the drafts were sampled from
                room = decoding.max_new_tokens - len(decoding.tokens) - 1  # the large model adds one
                guess = lookup.propose(room) if lookup is not None and room > 0 else []
                for t in guess:
                    pending.append(t)
                    if sampling:  # a deterministic draft: q is one-hot
                        drafts_q.append(torch.zeros(logits.shape[-1]).index_fill_(0, torch.tensor([t]), 1.0))
                    if t in eos:
                        break
                seq += pending
                counts["lookup_drafts"] += bool(pending)
                # Small mode: greedy tokens until unsure, out of turns, or at the end.
                while not guess:
                    clock = time.perf_counter()
                    small_logits = small.step(seq)
                    if sampling:
                        probs = sampling_probs(small_logits, decoding.temperature, decoding.top_p)
                    else:
                        probs = torch.softmax(small_logits.float(), dim=-1)
                    confidence, best = probs.max(dim=-1)
                    seconds["small"] += time.perf_counter() - clock
                    if self.fallback_threshold >= 1.0 or float(confidence) < self.fallback_threshold:
                        counts["fallbacks"] += 1
                        break
                    if sampling:
                        best = torch.multinomial(probs.cpu(), 1, generator=decoding.generator)[0]
                        drafts_q.append(probs)
                    pending.append(int(best))
                    seq.append(int(best))
                    if (
                        len(pending) == self.num_small_iters
                        or pending[-1] in eos
                        or len(decoding.tokens) + len(pending) >= decoding.max_new_tokens
                    ):
                        break
                # Large mode: one forward over [last committed token, *pending].
                clock = time.perf_counter()
                rows = large.forward(seq[len(seq) - len(pending) - 1 :])
                seconds["large"] += time.perf_counter() - clock
                counts["large_forwards"] += 1
                drafted += len(pending)
                if self.lossless:
                    keep, new = speculative_accept(decoding, rows, pending, drafts_q)
                else:
                    keep = self.rollback_point(rows, pending)
                    new = int(rows[keep].argmax())
                if keep < len(pending):
                    counts["rollbacks"] += 1
                large.keep(1 + keep)
                del seq[len(seq) - len(pending) + keep :]
                small.truncate(len(seq))
                seq.append(new)
                if lookup is not None:
                    lookup.observe([*pending[:keep], new])
                for i in range(keep):
                    counts["lookup_tokens" if guess else "small_tokens"] += 1
                    if decoding.accept(pending[i], rows[i]):
                        return
                if decoding.accept(new, rows[keep]):
                    return
        finally:
            count_loop(
                cache, counts, small.forwards, seconds, begin, counts["small_tokens"], len(decoding.tokens)
            )
            record_loop(
                cache,
                drafted=drafted,
                accepted=counts["small_tokens"] + counts["lookup_tokens"],
                forwards_saved=len(decoding.tokens) - 1 - counts["large_forwards"],
                small_model_tokens=counts["small_tokens"],
            )
            if not counts["small_tokens"] and not counts["lookup_tokens"]:
                cache.note(
                    f"bild: the large model wrote all {len(decoding.tokens)} tokens (the small model "
                    f"fell back {counts['fallbacks']} times; {drafted} of its tokens were checked, none kept)"
                )

    @property
    def adaptive(self) -> bool:
        """Whether this run drafts under the adaptive schedule (lossless mode only)."""
        return self.lossless and self.schedule == "adaptive"

    @property
    def lookup_tokens(self) -> int:
        """The lookup length in effect: `lookup`, or its default for the schedule."""
        if self.lookup is not None:
            return self.lookup
        return ADAPTIVE_LOOKUP if self.adaptive else 0

    def start(
        self, decoding: Decoding, logits: torch.Tensor
    ) -> tuple[Follower, Verifier, set[int], list[int], int, NgramDrafter | None]:
        """What both loops begin with: the small model following, the large verifying, the stop tokens,
        the sequence with the first token (the large model's prefill writes it) and the lookup drafter
        (None when the lookup length in effect is 0)."""
        small = Follower(small_model(self.small_model or self.small, decoding.model, self.name))
        large = Verifier(decoding)
        eos = set() if decoding.ignore_eos else decoding.eos
        seq = list(decoding.prompt)
        token = decoding.sample(logits)
        seq.append(token)
        n = self.lookup_tokens
        lookup = NgramDrafter(n, self.lookup_ngram, self.lookup_ngram) if n else None
        if lookup is not None:
            lookup.start(seq)
        return small, large, eos, seq, token, lookup

    def decode_adaptive(self, decoding: Decoding, logits: torch.Tensor) -> None:
        """Lossless decoding under the adaptive schedule (see the class docstring)."""
        cache = decoding.cache
        small, large, eos, seq, token, lookup = self.start(decoding, logits)
        n = self.lookup_tokens
        accept = AcceptanceModel(self.prior_weight)
        counts = dict.fromkeys(
            [
                "large_forwards",
                "small_tokens",
                "lookup_tokens",
                "rollbacks",
                "small_steps",
                "staged_forwards",
                "staged_rows",
                "low_confidence_cuts",
                "skipped_drafts",
            ],
            0,
        )
        lengths: list[int] = []  # draft tokens verified per large forward
        drafted = 0
        committed, spent = 0.0, 0.0  # tokens and modelled cost of this generation, for the rate R
        idle = 0  # large forwards since the last draft
        explore = EXPLORE  # plain forwards before a draft is tried anyway
        draft_tokens, draft_cost = 0.0, 0.0  # the same, over the forwards that verified a draft
        seconds = {"small": 0.0, "large": 0.0}
        begin = time.perf_counter()
        try:
            if decoding.accept(token, logits):
                return
            while True:
                rate = (committed + RATE_PRIOR) / (spent + RATE_PRIOR)
                step_bar = min(rate * (self.small_cost + self.row_cost), CONTINUE_CAP)
                room = min(self.max_draft, decoding.max_new_tokens - len(decoding.tokens) - 1)
                base = len(seq)  # committed tokens; the draft follows
                draft_q: list[torch.Tensor] = []
                confidences: list[float] = []
                staged: list[bool] = []  # whether the lookup proposed the token (and the small model agreed)
                cost = 0.0
                guess: list[int] = []  # looked-up tokens the small model has seen after the draft's last
                rows: list[torch.Tensor] = []  # its logits after each of them
                clock = time.perf_counter()
                # Draft while drafting beats plain decoding's rate of 1, when the lookup has a
                # continuation, or to keep exploring.
                drafting = (draft_tokens + DRAFT_PRIOR_RATE * DRAFT_PRIOR) / (draft_cost + DRAFT_PRIOR)
                worth = drafting >= 1.0 or (lookup is not None and bool(lookup_continuation(lookup, seq, 1)))
                if room > 0 and not worth and idle < explore:
                    counts["skipped_drafts"] += 1  # a plain decode step; the small model catches up later
                    idle += 1
                elif room > 0:
                    explore = EXPLORE if worth else min(2 * explore, MAX_EXPLORE)
                    idle = 0
                    cost += self.small_cost * self.forward_cost(len(seq) - small.fed)
                    small_logits = small.step(seq)
                    counts["small_steps"] += 1
                    p_all = 1.0
                    while True:
                        probs = self.draft_probs(decoding, small_logits)
                        hint = guess[0] if guess else None
                        best = self.draft_token(decoding, probs, hint)
                        from_lookup = best == hint
                        confidence = float(probs[best])
                        p_next = p_all * accept.estimate(confidence)
                        # Not worth its verification row; the first is always checked, so the
                        # acceptance model keeps learning even when it starts out doubtful.
                        if len(seq) > base and p_next < rate * self.row_cost:
                            counts["low_confidence_cuts"] += 1
                            break
                        p_all = p_next
                        seq.append(best)
                        draft_q.append(probs)
                        confidences.append(confidence)
                        staged.append(from_lookup)
                        if best in eos or len(seq) - base >= room:
                            break
                        if guess and best == guess[0]:  # the small model saw it: its next logits are there
                            guess.pop(0)
                            small_logits = rows.pop(0)
                            continue
                        if guess:  # the small model chose otherwise: forget the looked-up rest
                            guess, rows = [], []
                            small.truncate(len(seq) - 1)
                        space = min(n, room - (len(seq) - base))
                        guess = lookup_continuation(lookup, seq, space) if lookup is not None else []
                        if not guess and p_all * accept.estimate(confidence) < step_bar:
                            break
                        if guess:
                            out = small.rows([*seq, *guess])  # the new token and the guess, one forward
                            small_logits, rows = out[0], list(out[1:])
                            counts["staged_forwards"] += 1
                            counts["staged_rows"] += len(out)
                            cost += self.small_cost * self.forward_cost(len(out))
                        else:
                            cost += self.small_cost * self.forward_cost(len(seq) - small.fed)
                            small_logits = small.step(seq)
                            counts["small_steps"] += 1
                small.truncate(len(seq))  # looked-up tokens beyond the draft are not the sequence
                seconds["small"] += time.perf_counter() - clock
                pending = seq[base:]
                lengths.append(len(pending))
                clock = time.perf_counter()
                rows_large = large.forward(seq[base - 1 :])
                seconds["large"] += time.perf_counter() - clock
                counts["large_forwards"] += 1
                drafted += len(pending)
                keep, new = speculative_accept(decoding, rows_large, pending, draft_q)
                accept.update(confidences, keep)
                if keep < len(pending):
                    counts["rollbacks"] += 1
                large.keep(1 + keep)
                del seq[base + keep :]
                small.truncate(len(seq))
                seq.append(new)
                if lookup is not None:
                    lookup.observe([*pending[:keep], new])
                cost += self.forward_cost(len(pending) + 1)
                committed = RATE_DECAY * committed + keep + 1
                spent = RATE_DECAY * spent + cost
                if pending:
                    draft_tokens = RATE_DECAY * draft_tokens + keep + 1
                    draft_cost = RATE_DECAY * draft_cost + cost
                for i in range(keep):
                    counts["lookup_tokens" if staged[i] else "small_tokens"] += 1
                    if decoding.accept(pending[i], rows_large[i]):
                        return
                if decoding.accept(new, rows_large[keep]):
                    return
        finally:
            small_written = counts["small_tokens"] + counts["lookup_tokens"]
            count_loop(cache, counts, small.forwards, seconds, begin, small_written, len(decoding.tokens))
            if lengths:
                half = len(lengths) // 2
                cache.count("bild_mean_draft", sum(lengths) / len(lengths))
                cache.count("bild_max_draft", max(lengths))
                # how the schedule moved: mean draft over the first and the second half of the forwards
                cache.count("bild_mean_draft_early", sum(lengths[:half]) / max(1, half))
                cache.count("bild_mean_draft_late", sum(lengths[half:]) / (len(lengths) - half))
            cache.count("bild_final_rate", (committed + RATE_PRIOR) / (spent + RATE_PRIOR))
            record_loop(
                cache,
                drafted=drafted,
                accepted=small_written,
                forwards_saved=len(decoding.tokens) - 1 - counts["large_forwards"],
                small_model_tokens=small_written,
            )
            if not small_written:
                cache.note(
                    f"bild: the large model wrote all {len(decoding.tokens)} tokens ({drafted} small-model "
                    "draft tokens were checked, none kept)"
                )

    def forward_cost(self, rows: int) -> float:
        """A forward over `rows` tokens, in the model's one-token forwards (the cost model shared with
        suffix_decoding's schedule)."""
        return ForwardCost(self.batch_cost, self.row_cost)(rows)

    @staticmethod
    def draft_probs(decoding: Decoding, logits: torch.Tensor) -> torch.Tensor:
        """The small model's distribution its draft token comes from (greedy: the softmax)."""
        if decoding.temperature > 0:
            return sampling_probs(logits, decoding.temperature, decoding.top_p)
        return torch.softmax(logits.float(), dim=-1)

    @staticmethod
    def draft_token(decoding: Decoding, probs: torch.Tensor, hint: int | None) -> int:
        """The small model's draft token from `probs`: greedy, its argmax; sampling, an exact draw
        from `probs` that keeps `hint` (a looked-up token) with probability probs[hint] and otherwise
        draws from probs without it."""
        if decoding.temperature <= 0:
            return int(probs.argmax())
        if hint is not None:
            if float(torch.rand((), generator=decoding.generator)) < float(probs[hint]):
                return hint
            rest = probs.clone()
            rest[hint] = 0
            if float(rest.sum()) > 0:
                return int(torch.multinomial((rest / rest.sum()).cpu(), 1, generator=decoding.generator))
            return hint
        return int(torch.multinomial(probs.cpu(), 1, generator=decoding.generator))

    def rollback_point(self, rows: torch.Tensor, pending: list[int]) -> int:
        """How many pending small tokens survive: the index of the first one whose cross-entropy under
        the large model (logits one position earlier) exceeds the rollback threshold."""
        if not pending:
            return 0
        logp = torch.log_softmax(rows[: len(pending)].float(), dim=-1)
        tokens = torch.tensor(pending, device=rows.device)
        ce = -logp.gather(-1, tokens[:, None])[:, 0]
        bad = ce > self.rollback_threshold
        if self.skip_agreeing:
            bad &= logp.argmax(dim=-1) != tokens
        hits = bad.nonzero()
        return int(hits[0, 0]) if len(hits) else len(pending)
