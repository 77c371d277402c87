"""bild:lossless=true's adaptive schedule (issue 16): draft lengths from a cost model and an
acceptance model learned during the generation, prompt lookup drafting for the small model. The
output stays the large model's (greedy: token identical; sampling: its distribution), and the
schedule follows how well the small model does."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch

import tokensift
from tokensift.errors import TokensiftError
from tokensift.methods.bild import AcceptanceModel, BiLD, lookup_continuation
from tokensift.runtime.generate import Decoding
from tokensift.speculative.drafting import NgramDrafter

from .conftest import fresh_speculative_state, noisy_pair, prompt_ids

NEW = 48
ADAPTIVE = {"lossless": True, "lookup": 0, "small_cost": 0.3, "row_cost": 0.06, "batch_cost": 0.0}


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    with fresh_speculative_state():
        yield


def _prompts(repeat: bool = True) -> list[list[int]]:
    out = []
    for seed in range(3):
        ids = prompt_ids(40, seed=seed)
        out.append(ids + ids[:24] + ids if repeat else ids)  # repeated spans: something to look up
    return out


def sharp_pair(noise: float, scale: float = 3.0) -> tuple[tokensift.Model, tokensift.Model]:
    """conftest's noisy pair with both output layers scaled: confident models, as real ones are (the
    tiny models' top probabilities are around 0.1 otherwise)."""
    large, small = noisy_pair(noise)
    with torch.no_grad():
        for model in (large, small):
            model.model.lm_head.weight.mul_(scale)
    return large, small


def _run(large: tokensift.Model, ids: list[int], method: BiLD, new: int = NEW) -> tokensift.Generation:
    return tokensift.generate(large, ids, method, max_new_tokens=new, ignore_eos=True)


@pytest.mark.parametrize("noise", [0.1, 0.3])
@pytest.mark.parametrize("lookup", [None, 0])
def test_adaptive_is_large_greedy(noise: float, lookup: int | None) -> None:
    large, small = sharp_pair(noise)
    kept = staged = rejected = 0
    for ids in _prompts():
        target = tokensift.generate(large, ids, max_new_tokens=NEW, ignore_eos=True).token_ids
        method = BiLD(small_model=small, lossless=True, lookup=lookup, lookup_ngram=2, batch_cost=0.0)
        out = _run(large, ids, method)
        assert out.token_ids == target
        c = out.stats.counters
        assert (
            c["accepted_tokens"]
            == c["bild_small_tokens"] + c["bild_lookup_tokens"]
            == c["small_model_tokens"]
        )
        assert c["rolled_back_tokens"] == c["draft_tokens"] - c["accepted_tokens"]
        assert c["bild_max_draft"] <= 64
        kept += c["accepted_tokens"]
        staged += c["bild_staged_forwards"]
        rejected += c["bild_rollbacks"]
        if lookup == 0:
            assert c["bild_staged_forwards"] == 0 and c["bild_lookup_tokens"] == 0
    assert kept > 3  # drafts were kept (and, below, rejected): identity is not trivial
    if lookup is None:
        assert staged > 0  # the lookup drafted for the small model
    if noise == 0.3:
        assert rejected > 0  # drafts were also rejected, and the output still is the large model's


def test_fixed_schedule_is_still_bild() -> None:
    """schedule=fixed keeps BiLD's rule: at most num_small_iters tokens per draft, no staging."""
    large, small = noisy_pair(noise=0.1)
    ids = _prompts()[0]
    target = tokensift.generate(large, ids, max_new_tokens=NEW, ignore_eos=True).token_ids
    out = _run(
        large,
        ids,
        BiLD(small_model=small, lossless=True, schedule="fixed", fallback_threshold=0.0, num_small_iters=3),
    )
    assert out.token_ids == target
    c = out.stats.counters
    assert "bild_staged_forwards" not in c and c["bild_large_forwards"] >= (NEW - 1) / 4


def test_schedule_adapts_to_the_small_model() -> None:
    """A small model that always agrees earns longer and longer drafts; one that never does is cut
    back to (almost) nothing. Same costs (a multi-token forward costing no more than its rows, as on
    a GPU), same prompts: only the acceptance history differs."""
    good_large, good_small = sharp_pair(0.0)  # the same weights: every draft token is kept
    bad_large, bad_small = sharp_pair(1.5)
    good_mean = bad_mean = 0.0
    for ids in _prompts(repeat=False):
        good = _run(good_large, ids, BiLD(small_model=good_small, **ADAPTIVE), new=96)
        bad = _run(bad_large, ids, BiLD(small_model=bad_small, **ADAPTIVE), new=96)
        g, b = good.stats.counters, bad.stats.counters
        assert g["rolled_back_tokens"] == 0 and b["accepted_tokens"] == 0
        # the acceptance model learns that every token is kept: later drafts are longer
        assert g["bild_mean_draft_late"] > g["bild_mean_draft_early"]
        # and that the bad model's first tokens are rejected: most forwards go without a draft
        assert b["bild_skipped_drafts"] > b["bild_large_forwards"] / 2 and b["bild_mean_draft"] < 0.6
        assert g["bild_skipped_drafts"] == 0
        good_mean += g["bild_mean_draft"]
        bad_mean += b["bild_mean_draft"]
    assert good_mean > 2.5 * bad_mean


def test_costs_steer_the_draft_length() -> None:
    """Free small steps and rows: drafts run to max_draft (or the end); a small model costlier than
    the large one: drafts only to explore, one token each."""
    large, small = noisy_pair(noise=0.3)
    ids = _prompts(repeat=False)[0]
    free = _run(
        large,
        ids,
        BiLD(
            small_model=small,
            lossless=True,
            lookup=0,
            small_cost=0.0,
            row_cost=0.0,
            batch_cost=0.0,
            max_draft=8,
        ),
    )
    dear = _run(large, ids, BiLD(small_model=small, lossless=True, lookup=0, small_cost=5.0))
    f, d = free.stats.counters, dear.stats.counters
    # every draft is 8 long but the last (the room left) and the one after a bonus-free end
    assert f["bild_max_draft"] == 8 and f["bild_mean_draft"] > 6
    assert d["bild_max_draft"] == 1 and d["bild_skipped_drafts"] > d["bild_large_forwards"] / 2
    drafts = d["bild_large_forwards"] - d["bild_skipped_drafts"]  # less the last, with no room left
    assert drafts - 1 <= d["bild_small_steps"] <= drafts
    assert f["draft_tokens"] == f["bild_mean_draft"] * f["bild_large_forwards"]


def test_acceptance_model_learns() -> None:
    model = AcceptanceModel(weight=2.0)
    assert model.estimate(0.5) == pytest.approx(0.5)  # the prior: a(c) = c
    for _ in range(5):
        model.update([0.5, 0.6, 0.7, 0.5], kept=4)  # all kept: the large model agrees more than c says
    assert model.gamma < 0.5 and model.estimate(0.5) > 0.75
    doubtful = AcceptanceModel(weight=2.0)
    for _ in range(5):
        doubtful.update([0.9, 0.95, 0.9, 0.99], kept=0)  # the first rejected, the rest never judged
    assert doubtful.seen == 5 and doubtful.gamma > 1.5 and doubtful.estimate(0.9) < 0.8


def test_lookup_continuation_runs_past_the_observed_sequence() -> None:
    lookup = NgramDrafter(4, 2, 2)
    lookup.start([5, 6, 7, 8, 9, 10, 5, 6])
    assert lookup_continuation(lookup, [5, 6, 7, 8, 9, 10, 5, 6], 10) == [7, 8, 9, 10]
    # a draft [7, 8] beyond what was observed: the last bigram (7, 8) continues at 9
    assert lookup_continuation(lookup, [5, 6, 7, 8, 9, 10, 5, 6, 7, 8], 3) == [9, 10, 5]
    assert lookup_continuation(lookup, [5, 6, 7, 8, 9, 10, 5, 6, 1, 2], 3) == []
    assert lookup_continuation(lookup, [5, 6], 0) == []


def test_staged_draw_is_an_exact_sample() -> None:
    """Sampling: the small model's draft token, with a looked-up hint, still follows its q."""
    v, n = 5, 20000
    q = torch.softmax(torch.tensor([1.0, 0.3, -0.4, 0.8, 0.0]), -1)
    decoding = Decoding(
        model=None,  # type: ignore[arg-type]
        cache=None,  # type: ignore[arg-type]
        max_new_tokens=4,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    seen: Counter[int] = Counter(BiLD.draft_token(decoding, q, hint=3) for _ in range(n))
    tv = 0.5 * sum(abs(seen[k] / n - float(q[k])) for k in range(v))
    assert tv < 0.02, tv
    assert seen[3] / n == pytest.approx(float(q[3]), abs=0.02)


def test_adaptive_sampling_keeps_the_large_distribution() -> None:
    """The first drafted token (max_new_tokens=3: prefill token, one draft, the bonus), sampled at
    temperature 1 over many seeds, follows the large model's marginal, not the small model's: its
    distance from the exact marginal lies within what exact sampling gives at that sample size."""
    large, small = sharp_pair(0.6)
    ids = prompt_ids(20, seed=0)
    method = BiLD(small_model=small, lossless=True, small_cost=0.0, row_cost=0.0)
    n = 1500
    seen: Counter[int] = Counter()
    drafted = 0
    for seed in range(n):
        out = tokensift.generate(
            large, ids, method, max_new_tokens=3, temperature=1.0, seed=seed, ignore_eos=True
        )
        seen[out.token_ids[1]] += 1
        drafted += out.stats.counters["draft_tokens"]
    assert drafted == n  # every run verified one sampled draft

    def marginal(model: tokensift.Model) -> torch.Tensor:
        """Exact distribution of the second token: sum over the first token of p(x0) p(x1 | x0)."""
        with torch.inference_mode():
            p0 = torch.softmax(large.model(torch.tensor([ids])).logits[0, -1].float(), -1)
            batch = torch.tensor([[*ids, t] for t in range(p0.shape[0])])
            p1 = torch.softmax(model.model(batch).logits[:, -1].float(), -1)
        return p0 @ p1

    p, q = marginal(large), marginal(small)
    empirical = torch.tensor([seen[k] / n for k in range(p.shape[0])])
    tv_large = 0.5 * float((empirical - p).abs().sum())
    tv_small = 0.5 * float((empirical - q).abs().sum())
    g = torch.Generator().manual_seed(0)
    null = sorted(
        0.5
        * float(
            (torch.bincount(torch.multinomial(p, n, replacement=True, generator=g), minlength=len(p)) / n - p)
            .abs()
            .sum()
        )
        for _ in range(200)
    )
    assert tv_large <= null[-3], (tv_large, null[-3])  # within the exact sampler's 99th percentile
    assert tv_small > 2 * null[-1], (tv_small, null[-1])  # the test tells the two models apart


def test_bad_adaptive_options() -> None:
    with pytest.raises(TokensiftError, match="max_draft"):
        BiLD(max_draft=0)
    with pytest.raises(TokensiftError, match="small_cost"):
        BiLD(small_cost=-1.0)
    with pytest.raises(TokensiftError, match="prior_weight"):
        BiLD(prior_weight=0.0)
    with pytest.raises(TokensiftError, match="schedule"):
        tokensift.methods.spec.parse_method("bild:schedule=sometimes")
