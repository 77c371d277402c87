"""bild's prompt-lookup drafts under the fixed schedule (`lookup=N`, verified by the large model):
greedy output stays the large model's, a deterministic draft keeps the sampling distribution under
the speculative rule, and the lookup is counted."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch

import tokensift
from tokensift.errors import TokensiftError
from tokensift.methods.bild import BiLD, speculative_accept
from tokensift.runtime.generate import Decoding

from .conftest import fresh_speculative_state, noisy_pair, prompt_ids

NEW = 48


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    with fresh_speculative_state():
        yield


def _prompts() -> list[list[int]]:
    out = []
    for seed in range(3):
        ids = prompt_ids(40, seed=seed)
        out.append(ids + ids[:24] + ids)  # repeated spans: something to look up
    return out


@pytest.mark.parametrize("fallback", [0.0, 0.6])
def test_lookup_keeps_large_greedy(fallback: float) -> None:
    large, small = noisy_pair(noise=0.3)
    looked = small_kept = 0
    for ids in _prompts():
        target = tokensift.generate(large, ids, max_new_tokens=NEW, ignore_eos=True).token_ids
        method = BiLD(
            small_model=small,
            fallback_threshold=fallback,
            lossless=True,
            schedule="fixed",
            lookup=8,
            lookup_ngram=2,
        )
        out = tokensift.generate(large, ids, method, max_new_tokens=NEW, ignore_eos=True)
        assert out.token_ids == target
        c = out.stats.counters
        assert c["accepted_tokens"] == c["bild_small_tokens"] + c["bild_lookup_tokens"]
        assert c["rolled_back_tokens"] == c["draft_tokens"] - c["accepted_tokens"]
        looked += c["bild_lookup_tokens"]
        small_kept += c["bild_small_tokens"]
        assert c["bild_lookup_drafts"] > 0
    assert looked > 0  # the lookup drafted and was accepted
    if fallback == 0.0:
        assert small_kept > 0  # the small model still drafts where the lookup finds nothing


def test_lookup_off_counts_nothing() -> None:
    large, small = noisy_pair(noise=0.3)
    out = tokensift.generate(
        large,
        _prompts()[0],
        BiLD(small_model=small, fallback_threshold=0.0, lossless=True, schedule="fixed"),
        max_new_tokens=16,
    )
    assert out.stats.counters["bild_lookup_drafts"] == 0 and out.stats.counters["bild_lookup_tokens"] == 0


def test_deterministic_draft_keeps_the_distribution() -> None:
    """A draft that is always the same token (q one-hot), verified by the speculative rule: the
    committed token follows p."""
    v, n = 4, 20000
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7], [0.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(logits[0], -1)
    decoding = Decoding(
        model=None,  # type: ignore[arg-type]
        cache=None,  # type: ignore[arg-type]
        max_new_tokens=4,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    one_hot = torch.zeros(v).index_fill_(0, torch.tensor([3]), 1.0)
    seen: Counter[int] = Counter()
    for _ in range(n):
        keep, new = speculative_accept(decoding, logits, [3], [one_hot])
        seen[3 if keep else new] += 1
    tv = 0.5 * sum(abs(seen[k] / n - float(p[k])) for k in range(v))
    assert tv < 0.02, tv


def test_lookup_samples_reproducibly() -> None:
    large, small = noisy_pair(noise=0.1)
    method = BiLD(
        small_model=small, fallback_threshold=0.0, lossless=True, schedule="fixed", lookup=8, lookup_ngram=2
    )
    runs = [
        tokensift.generate(
            large, _prompts()[1], method, max_new_tokens=NEW, temperature=0.7, seed=5, ignore_eos=True
        )
        for _ in range(2)
    ]
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == NEW


def test_bad_lookup() -> None:
    with pytest.raises(TokensiftError, match="lookup"):
        BiLD(lookup=-1)
    with pytest.raises(TokensiftError, match="lookup"):
        BiLD(lookup_ngram=0)
