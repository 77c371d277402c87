"""bild:lossless=true on tiny random models: the small model drafts while confident, the large one
verifies with the standard speculative rule, so the output is the large model's own (greedy: token
identical; sampling: the same distribution)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch

import tokensift
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
        out.append(ids + ids[:24])
    return out


def test_lossless_bild_is_large_greedy() -> None:
    """At thresholds where the lossy rule leaves the large model's output, lossless stays on it."""
    large, small = noisy_pair(noise=0.3)
    kept = rollbacks = diverged = 0
    for ids in _prompts():
        target = tokensift.generate(large, ids, max_new_tokens=NEW, ignore_eos=True).token_ids
        lossy = tokensift.generate(
            large, ids, BiLD(small_model=small, fallback_threshold=0.0), max_new_tokens=NEW, ignore_eos=True
        )
        out = tokensift.generate(
            large,
            ids,
            BiLD(small_model=small, fallback_threshold=0.0, lossless=True),
            max_new_tokens=NEW,
            ignore_eos=True,
        )
        assert out.token_ids == target
        assert out.stats.applied
        c = out.stats.counters
        assert c["rolled_back_tokens"] == c["draft_tokens"] - c["accepted_tokens"]
        kept += c["bild_small_tokens"]
        rollbacks += c["bild_rollbacks"]
        diverged += lossy.token_ids != target
    assert kept > 10 and rollbacks > 0  # small tokens kept and rejected
    assert diverged > 0  # the same drafts under the lossy rule leave the large model's output


def _chain(temperature: float, seed: int) -> Decoding:
    return Decoding(
        model=None,  # type: ignore[arg-type]
        cache=None,  # type: ignore[arg-type]
        max_new_tokens=4,
        temperature=temperature,
        generator=torch.Generator().manual_seed(seed),
    )


def test_speculative_rule_keeps_the_distribution() -> None:
    """Markov chains: large p, small q (different); drafts sampled from q, verified by the rule: the
    committed 2-token outputs follow p."""
    v, n = 4, 12000
    logits_p = torch.tensor(
        [[2.0, 0.5, -1.0, 0.0], [0.0, 1.5, 1.0, -0.5], [1.0, -1.0, 0.3, 0.8], [-0.5, 0.2, 0.9, 1.1]]
    )
    q = torch.softmax(torch.tensor([[0.0, 2.0, 0.5, 0.0]] * v), -1)
    p = torch.softmax(logits_p, -1)
    decoding = _chain(1.0, 0)
    g = torch.Generator().manual_seed(1)
    seen: Counter[tuple[int, ...]] = Counter()
    for _ in range(n):
        seq = [0]
        while len(seq) < 3:
            y1 = int(torch.multinomial(q[seq[-1]], 1, generator=g))
            y2 = int(torch.multinomial(q[y1], 1, generator=g))
            rows = logits_p[[seq[-1], y1, y2]]
            keep, new = speculative_accept(decoding, rows, [y1, y2], [q[seq[-1]], q[y1]])
            seq += [*[y1, y2][:keep], new]
        seen[tuple(seq[1:3])] += 1
    expected = {(a, b): float(p[0][a] * p[a][b]) for a in range(v) for b in range(v)}
    tv = 0.5 * sum(abs(seen[k] / n - e) for k, e in expected.items())
    assert tv < 0.03, tv


def test_lossless_bild_samples() -> None:
    large, small = noisy_pair(noise=0.1)
    ids = _prompts()[0]
    method = BiLD(small_model=small, fallback_threshold=0.0, lossless=True)
    runs = [
        tokensift.generate(large, ids, method, max_new_tokens=NEW, temperature=0.7, seed=5, ignore_eos=True)
        for _ in range(2)
    ]
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == NEW
    assert runs[0].stats.counters["bild_small_tokens"] > 0
