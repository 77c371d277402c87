"""BiLD: a small model writes, the large model steps in when the small one is unsure or wrong."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import LoopMethod, register
from tokensift.models import Model
from tokensift.runtime.generate import sampling_probs
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
        Longest prompt-lookup draft tried before the small model drafts (0: never).
    lookup_ngram:
        Tokens matched by the lookup.
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
    lookup: int = 0
    lookup_ngram: int = 3
    small_model: Model | None = field(default=None, repr=False, compare=False)  # an in-memory model

    def __post_init__(self) -> None:
        if not 0.0 <= self.fallback_threshold <= 1.0:
            raise TokensiftError(f"bild fallback_threshold must lie in [0, 1], got {self.fallback_threshold}")
        if not self.rollback_threshold >= 0:
            raise TokensiftError(f"bild rollback_threshold must be >= 0, got {self.rollback_threshold}")
        if self.num_small_iters < 1:
            raise TokensiftError(f"bild num_small_iters must be >= 1, got {self.num_small_iters}")
        if self.lookup < 0 or self.lookup_ngram < 1:
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
        sampling = decoding.temperature > 0
        cache = decoding.cache
        small = Follower(small_model(self.small_model or self.small, decoding.model, self.name))
        large = Verifier(decoding)
        eos = set() if decoding.ignore_eos else decoding.eos
        seq = list(decoding.prompt)
        token = decoding.sample(logits)  # the large model's prefill writes the first token
        seq.append(token)
        counts = dict.fromkeys(
            ["large_forwards", "small_tokens", "fallbacks", "rollbacks", "lookup_drafts", "lookup_tokens"], 0
        )
        lookup = NgramDrafter(self.lookup, self.lookup_ngram, self.lookup_ngram) if self.lookup else None
        if lookup is not None:
            lookup.start(seq)
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
            for name, value in counts.items():
                cache.count(f"bild_{name}", value)
            cache.count("bild_small_forwards", small.forwards)
            # Where the decode time went (host clock; on an accelerator it includes waits on queued work).
            total = time.perf_counter() - begin
            cache.count("bild_small_seconds", seconds["small"])
            cache.count("bild_large_seconds", seconds["large"])
            cache.count("bild_other_seconds", total - seconds["small"] - seconds["large"])
            cache.count("bild_small_share", counts["small_tokens"] / max(1, len(decoding.tokens)))
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
