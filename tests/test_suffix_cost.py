"""suffix_decoding's adaptive schedule: the shared forward-cost model, which drafts it verifies, and
that it stays lossless on tiny random models."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch

import tokensift
from tokensift.errors import TokensiftError
from tokensift.methods.bild import BiLD
from tokensift.methods.suffix_decoding import (
    ADAPTIVE_MAX_SPEC,
    FIXED_COPY_OFFSET,
    FIXED_MAX_SPEC,
    SuffixDecoding,
)
from tokensift.runtime.plan import Plan
from tokensift.speculative import clear_global_caches
from tokensift.speculative.cost import ForwardCost
from tokensift.speculative.drafting import AdaptiveCut, DraftCut, SuffixCache, SuffixDrafter
from tokensift.speculative.suffix_tree import Draft

from .conftest import fresh_speculative_state, prompt_ids, tiny_model

NEW = 48
ADAPTIVE = "suffix_decoding:schedule=adaptive"


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    with fresh_speculative_state():
        yield


def drafter(spec: str, prompt: list[int]) -> SuffixDrafter:
    method = Plan.of(spec).loop
    assert isinstance(method, SuffixDecoding)
    out = method.drafter(SuffixCache(method.max_depth, 0))
    out.start(prompt)
    return out


def test_forward_cost_model() -> None:
    cpu = ForwardCost(batch=0.8, row=0.06)
    assert cpu(1) == 1.0 and cpu(2) == pytest.approx(1.86) and cpu(11) == pytest.approx(2.4)
    # One weak draft token: 1.3 expected tokens for 1.8 forwards loses to a plain step.
    assert cpu.best_prefix([0.3]) == (0, 1.0)
    # Twenty near-certain tokens: all of them, at about 19.6 / 2.94 tokens per forward.
    keep, rate = cpu.best_prefix([0.98] * 20)
    assert keep == 20 and rate == pytest.approx((1 + 0.98 * 20) / cpu(21))
    # A confident head and a weak tail: only the head is worth its rows.
    assert cpu.best_prefix([0.95] * 6 + [0.01] * 10)[0] == 6
    # min_rate raises the bar for starting a draft at all.
    assert cpu.best_prefix([0.6, 0.6], min_rate=1.2) == (0, 1.0)
    # On a GPU (free rows) any chance is worth verifying.
    assert ForwardCost(0.0, 0.0).best_prefix([0.1, 0.05]) == (2, pytest.approx(1.15))


def test_bild_uses_the_shared_cost_model() -> None:
    bild = BiLD(lossless=True, batch_cost=0.7, row_cost=0.05)
    for rows in (1, 2, 9):
        assert bild.forward_cost(rows) == ForwardCost(0.7, 0.05)(rows)


def test_adaptive_skips_a_weak_draft() -> None:
    """`1 2` was followed by 3, 4 and 5 once each: a draft starting at probability 1/4 is not worth
    a multi-row forward on a CPU, though the paper's rule (probability >= 0.1) verifies it, and so
    does the adaptive schedule when rows are free (a GPU)."""
    prompt = [1, 2, 3, 9, 1, 2, 4, 8, 1, 2, 5, 7, 1, 2]
    paper = drafter("suffix_decoding:schedule=fixed,verify_cost=0", prompt)
    assert paper.propose(1).token_ids in ([3], [4], [5])
    adaptive = drafter(ADAPTIVE, prompt)
    assert adaptive.propose(1).token_ids == [] and adaptive.propose(NEW).token_ids == []
    assert adaptive.skipped == 2
    gpu = drafter(ADAPTIVE + ",batch_cost=0,row_cost=0", prompt)
    assert len(gpu.propose(1)) == 1 and len(gpu.propose(NEW)) == 10  # p = 2: 2 + 8 tokens
    # After misses the adaptive schedule no longer starts drafts it took before.
    easy = drafter(ADAPTIVE, [7, 8, 9, 10, 11, 12, 13, 7, 8])
    assert easy.propose(NEW).token_ids[:3] == [9, 10, 11]
    for _ in range(3):
        easy.feedback(0)
        easy.propose(NEW)
    assert easy.propose(NEW).token_ids == []


def test_adaptive_takes_a_long_confident_draft() -> None:
    """The output copies a 100-token span of the prompt. The first draft stays moderate (nothing
    is known about this generation yet); once the model has accepted it whole, the next one runs
    past vLLM's 16-token cap, where the fixed schedule stops at its own cap."""
    span = list(range(10, 110))
    prompt = [*span, 3, 4, 5, *span[:10]]
    adaptive = drafter(ADAPTIVE, prompt)
    first = adaptive.propose(NEW).token_ids
    assert len(first) >= 4 and first == span[10 : 10 + len(first)]
    adaptive.feedback(len(first))
    copied = span[10 : 11 + len(first)]  # the accepted draft and the model's next token
    adaptive.observe(copied)
    second = adaptive.propose(NEW).token_ids
    at = 11 + len(first)
    assert len(second) > 16 and second == span[at : at + len(second)]
    assert len(second) <= ADAPTIVE_MAX_SPEC
    fixed = drafter("suffix_decoding:schedule=fixed", [*prompt, *copied])
    draft = fixed.propose(NEW).token_ids
    assert draft == span[at : at + len(draft)] and len(draft) <= FIXED_MAX_SPEC
    # The room left in the generation caps it.
    assert len(adaptive.propose(5)) <= 5


def test_fixed_schedule_drafts_past_a_short_match_while_the_output_copies() -> None:
    """An edit inside a copy: the output copied `a` (accepted drafts), then wrote a token of its own
    (X) and goes on with the copy. The match after X is one token long, so the paper's rule drafts
    one token; while the last steps accepted drafts the copy offset lets the draft run on."""
    a, b = list(range(10, 40)), list(range(40, 80))
    X = 5
    prompt = [*a, 7, *b, 3, 3, 3, *a]  # the text to copy is a 7 b; the output writes a X b
    fixed = drafter("suffix_decoding:copy_offset=0", prompt)
    fixed.observe([X, 40])  # X was seen once, before 6 in a pair nowhere else: match length 1
    plain = fixed.propose(NEW).token_ids
    assert plain == b[1 : 1 + len(plain)] and len(plain) <= 2
    copying = drafter("suffix_decoding", prompt)
    copying.feedback(12)  # the previous step accepted 12 draft tokens
    copying.observe([X, 40])
    draft = copying.propose(NEW).token_ids
    assert draft == b[1 : 1 + len(draft)] and len(draft) > len(plain) + 8
    # Two steps without an accepted draft token end the copy regime (copy_window 2).
    copying.feedback(0)
    copying.feedback(0)
    assert len(copying.propose(NEW).token_ids) == len(plain)


def test_acceptance_factor_learns_from_judged_tokens() -> None:
    cut = DraftCut(ForwardCost(), start=1.0, weight=2.0, min_tokens=0, pooled=True, judged_only=True)
    draft = Draft([7] * 10, list(range(-1, 9)), [0.5] * 10, match_len=5)
    cut.take(draft, 10)
    cut.update(0)  # the first token was rejected: only it was judged
    pooled = 2.0 / 2.5  # (accepted + prior * weight) / (expected + weight) over every bucket
    assert cut.factor(cut.bucket(5)) == pytest.approx(pooled * 2.0 / 2.5)
    cut.take(draft, 10)
    cut.update(10)  # a full copy: accepted more than the 0.5 estimates said
    assert cut.factor(cut.bucket(5)) > 1.0
    # Another bucket starts from the pooled ratio, not from the prior.
    assert cut.factor(cut.bucket(1)) == pytest.approx((10 + 2) / (5.5 + 2))
    # The earlier model (schedule=fixed) counts every verified token as expected.
    old = DraftCut(ForwardCost(1.0, 1 / 16))
    old.take(draft, 10)
    old.update(0)
    assert old.expected[old.bucket(5)] == pytest.approx(5.0)


@pytest.mark.parametrize(
    "spec",
    [
        "suffix_decoding:schedule=adaptive",
        "suffix_decoding:schedule=adaptive,tree=true",
        "suffix_decoding:schedule=adaptive,batch_cost=0,row_cost=0",
        "suffix_decoding",
    ],
)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_adaptive_is_plain_greedy(spec: str, kind: str) -> None:
    model = tiny_model(kind)
    for seed in range(3):
        base = prompt_ids(40, seed=seed)
        ids = base + base[:24]
        clear_global_caches()
        plain = tokensift.generate(model, ids, None, max_new_tokens=NEW, ignore_eos=True)
        out = tokensift.generate(model, ids, spec, max_new_tokens=NEW, ignore_eos=True)
        assert out.token_ids == plain.token_ids
        c = out.stats.counters
        assert c["loop_committed"] == NEW - 1 and c["loop_steps"] + c["accepted_tokens"] == NEW - 1


def test_adaptive_parameters() -> None:
    fixed = SuffixDecoding()
    assert fixed.schedule == "fixed" and fixed.max_spec_tokens is None  # the default: the earlier rule
    d = fixed.drafter(SuffixCache(64, 0))
    assert (d.max_spec_tokens, d.max_spec_offset, d.min_token_prob) == (FIXED_MAX_SPEC, 0.0, 0.1)
    assert (d.copy_offset, d.copy_window) == (FIXED_COPY_OFFSET, 2)
    assert isinstance(d.cut, DraftCut) and not d.adaptive
    assert SuffixDecoding(verify_cost=0).drafter(SuffixCache(64, 0)).cut is None  # the paper's
    a = SuffixDecoding(schedule="adaptive").drafter(SuffixCache(64, 0))
    assert (a.max_spec_tokens, a.max_spec_offset, a.min_token_prob) == (ADAPTIVE_MAX_SPEC, 8.0, 0.1)
    assert a.copy_offset == 0.0
    assert isinstance(a.cut, AdaptiveCut) and a.adaptive
    for bad in (
        "schedule=greedy",
        "row_cost=-1",
        "first_prior=0",
        "next_prior=-1",
        "max_spec_offset=-1",
        "copy_offset=-1",
        "copy_window=0",
    ):
        with pytest.raises(TokensiftError):
            Plan.of(f"suffix_decoding:{bad}")


@pytest.mark.filterwarnings("ignore::tokensift.NoOpWarning")  # runs where the model kept no draft
def test_adaptive_sampling_keeps_the_distribution() -> None:
    """The first token the loop decodes (max_new_tokens=3: the prefill token, one verified draft,
    then the next), sampled at temperature 1 over many seeds, follows the model's own marginal: its
    distance from the exact marginal lies within what exact sampling gives at that sample size, and
    it is far from what keeping every draft would give."""
    model = tiny_model("llama")
    base = prompt_ids(60, seed=4)
    ids = base + base[:20]
    spec = ADAPTIVE + ",batch_cost=0,row_cost=0"  # free rows: every candidate is verified
    n = 1500
    seen = Counter()
    drafted = 0
    for seed in range(n):
        clear_global_caches()
        out = tokensift.generate(
            model, ids, spec, max_new_tokens=3, temperature=1.0, seed=seed, ignore_eos=True
        )
        seen[out.token_ids[1]] += 1
        drafted += out.stats.counters["draft_tokens"] > 0
    assert drafted > n // 3  # most first tokens were followed by a verified draft

    with torch.inference_mode():
        p0 = torch.softmax(model.model(torch.tensor([ids])).logits[0, -1].float(), -1)
        batch = torch.tensor([[*ids, t] for t in range(p0.shape[0])])
        p1 = torch.softmax(model.model(batch).logits[:, -1].float(), -1)
    exact = p0 @ p1
    naive = torch.zeros_like(exact)  # every draft's first token kept
    for x0 in range(p0.shape[0]):
        draft = drafter(spec, [*ids, x0]).propose(1).token_ids
        naive += p0[x0] * (
            torch.nn.functional.one_hot(torch.tensor(draft[0]), len(exact)) if draft else p1[x0]
        )
    empirical = torch.tensor([seen[k] / n for k in range(len(exact))])
    g = torch.Generator().manual_seed(0)
    null = sorted(
        0.5
        * float(
            (
                torch.bincount(
                    torch.multinomial(exact, n, replacement=True, generator=g), minlength=len(exact)
                )
                / n
                - exact
            )
            .abs()
            .sum()
        )
        for _ in range(200)
    )
    tv = 0.5 * float((empirical - exact).abs().sum())
    tv_naive = 0.5 * float((empirical - naive).abs().sum())
    assert tv <= null[-3], (tv, null[-3])  # within the exact sampler's 99th percentile
    assert tv_naive > 2 * null[-1], (tv_naive, null[-1])  # the test tells the two apart
