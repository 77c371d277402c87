"""Hand-computed examples for each method and the score slices they use."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tokensift
from tokensift.methods.base import top_tokens
from tokensift.methods.snapkv import pool_scores
from tokensift.methods.streaming_llm import sink_window_indices
from tokensift.runtime.scores import attention_with_colsums, dense_attention, window_scores

from .conftest import prompt_ids, tiny_model


def _eager(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: full causal attention probabilities (bottom-right aligned), GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    length, n = q.shape[2], k.shape[2]
    logits = q @ k.transpose(-1, -2) * scale
    future = torch.arange(n)[None, :] > torch.arange(n - length, n)[:, None]
    probs = logits.masked_fill(future, float("-inf")).softmax(-1)
    return probs @ v, probs


def _layer(method: tokensift.Method, n: int, heads: int = 1, dim: int = 16, seed: int = 0):
    """A real TokenLayer (of a tiny model's cache) filled with n random tokens."""
    model = tiny_model("llama")
    cache = tokensift.TokenCache(model.model, method, prompt_tokens=n)
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(1, heads, n, dim, generator=g), torch.randn(1, heads, n, dim, generator=g)
    layer = cache.layers[0]
    layer.update(k, v)
    return cache, layer, k, v


def test_h2o_worked_example() -> None:
    # methods.md 1(f)(3): causal P rows [1], [.5,.5], [.2,.3,.5], [.1,.2,.3,.4]
    p = torch.tensor([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.2, 0.3, 0.4]])
    colsum = p.sum(0).view(1, 1, 4)
    torch.testing.assert_close(colsum[0, 0], torch.tensor([1.8, 1.0, 0.8, 0.4]))
    method = tokensift.H2O(budget=3, recent_fraction=2 / 3)
    cache, layer, _, _ = _layer(method, 4)
    resolved = cache.plan.evict
    assert resolved.recent == 2 and resolved.tokens - resolved.recent == 1
    resolved.compress(layer, torch.zeros(1, 1, 4, 8), colsum, 1.0)
    assert layer.positions[0, 0].tolist() == [0, 2, 3]
    torch.testing.assert_close(layer.state("h2o")[0, 0], torch.tensor([1.8, 0.8, 0.4]))


def test_h2o_without_heavy_hitters_is_a_recent_window() -> None:
    method = tokensift.H2O(budget=4, recent_fraction=1.0)
    cache, layer, _, _ = _layer(method, 10, heads=1)
    cache.plan.evict.compress(layer, torch.zeros(1, 2, 10, 16), torch.rand(1, 2, 10), 1.0)
    assert layer.positions[0, 0].tolist() == [6, 7, 8, 9]


def test_h2o_gqa_scores_are_group_means() -> None:
    method = tokensift.H2O(budget=2, recent_fraction=0.5)
    cache, layer, _, _ = _layer(method, 3, heads=1)
    colsum = torch.tensor([[[3.0, 0.0, 1.0], [1.0, 2.0, 1.0]]])  # two query heads share KV head 0
    cache.plan.evict.compress(layer, torch.zeros(1, 2, 3, 8), colsum, 1.0)
    assert layer.positions[0, 0].tolist() == [0, 2]  # mean scores [2.0, 1.0, 1.0]: token 0 is heavy
    torch.testing.assert_close(layer.state("h2o")[0, 0], torch.tensor([2.0, 1.0]))


def test_snapkv_hand_made_window() -> None:
    # Every window query points at key 5; all other keys are orthogonal to it.
    n, w, d = 20, 4, 16
    k = torch.zeros(1, 1, n, d)
    k[..., :, 1] = 1.0
    k[0, 0, 5] = torch.tensor([1.0] + [0.0] * (d - 1))
    q = torch.zeros(1, 1, n, d)
    q[..., 0] = 20.0
    votes = window_scores(q[:, :, -w:], k, 1.0)[..., : n - w]
    assert votes[0, 0].argmax().item() == 5
    assert math.isclose(votes[0, 0, 5].item(), w, rel_tol=1e-6)
    assert top_tokens(pool_scores(votes, 1, "max"), 1)[0, 0].tolist() == [5]
    # Max-pooling with kernel 3 spreads the vote to both neighbours.
    assert top_tokens(pool_scores(votes, 3, "max"), 3)[0, 0].tolist() == [4, 5, 6]

    method = tokensift.SnapKV(budget=w + 3, window_size=w, kernel_size=3)
    cache, layer, _, _ = _layer(method, n)
    layer.keys[..., :n, :] = k
    cache.plan.evict.compress(layer, q, None, 1.0)
    assert layer.positions[0, 0].tolist() == [4, 5, 6, 16, 17, 18, 19]


def test_snapkv_avg_pooling_keeps_length() -> None:
    scores = torch.arange(10.0).view(1, 1, 10)
    pooled = pool_scores(scores, 5, "avg")
    assert pooled.shape == scores.shape
    assert pooled[0, 0, 0].item() == pytest.approx(1.0)  # mean of 0, 1, 2 (padding not counted)


def test_snapkv_short_forward_is_reported() -> None:
    method = tokensift.SnapKV(budget=40, window_size=32)
    cache, layer, _, _ = _layer(method, 60)
    cache.plan.evict.compress(layer, torch.zeros(1, 1, 16, 8), None, 1.0)  # a 16-token chunk < window
    assert layer.n == 60 and any("shorter than window_size" in n for n in cache.notes)


def test_streaming_llm_keeps_sinks_and_window() -> None:
    assert sink_window_indices(20, 8, 4).tolist() == [0, 1, 2, 3, 16, 17, 18, 19]
    method = tokensift.StreamingLLM(budget=8, sinks=4)
    cache, layer, _, _ = _layer(method, 20)
    cache.plan.evict.compress(layer, torch.zeros(1, 1, 20, 16), None, 1.0)
    assert layer.positions[0, 0].tolist() == [0, 1, 2, 3, 16, 17, 18, 19]
    assert cache.next_position == 8  # re-positioned: the next query sits right after the cache


def test_streaming_llm_rolling_positions() -> None:
    """After eviction the key at cache index j is rotated exactly as if computed at position j."""
    model = tiny_model("llama")
    rotary = model.model.model.rotary_emb
    n, budget, d = 30, 10, 16
    raw = torch.randn(1, 2, n, d)

    def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary(x, positions.view(1, -1))  # transformers' own RoPE at these positions
        return x * cos[:, None] + torch.cat((-x[..., d // 2 :], x[..., : d // 2]), -1) * sin[:, None]

    cache = tokensift.TokenCache(model.model, tokensift.StreamingLLM(budget=budget, sinks=4))
    layer = cache.layers[0]
    layer.update(rope(raw, torch.arange(n)), raw.clone())
    cache.plan.evict.compress(layer, torch.zeros(1, 4, n, d), None, 1.0)
    kept = torch.tensor([0, 1, 2, 3, 24, 25, 26, 27, 28, 29])
    expected = rope(raw[:, :, kept], torch.arange(budget))
    torch.testing.assert_close(layer.attention_keys(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [64, 17, 1])
def test_colsums_match_eager(length: int) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 4, length, 8, generator=g),
        torch.randn(1, 2, 64, 8, generator=g),
        torch.randn(1, 2, 64, 8),
    )
    out, colsum = attention_with_colsums(q, k, v, 0.35, max_elements=4 * 64 * 5)  # force several chunks
    ref_out, probs = _eager(q, k, v, 0.35)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(colsum, probs.sum(-2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_attention(q, k, v, 0.35), ref_out, atol=1e-5, rtol=1e-5)


def test_window_scores_match_eager() -> None:
    q, k, v = torch.randn(1, 6, 48, 8), torch.randn(1, 3, 48, 8), torch.randn(1, 3, 48, 8)
    _, probs = _eager(q, k, v, 0.3)
    torch.testing.assert_close(
        window_scores(q[:, :, -8:], k, 0.3), probs[:, :, -8:].sum(-2), atol=1e-5, rtol=1e-5
    )


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_h2o_prefill_colsums_never_materialise_n_by_n() -> None:
    n = 8192
    q, k, v = torch.randn(1, 1, n, 4), torch.randn(1, 1, n, 4), torch.randn(1, 1, n, 4)
    with _LargestTensor() as probe:
        attention_with_colsums(q, k, v, 0.5)
    assert probe.largest < n * n // 8


def test_keyformer_without_noise_at_tau_one_selects_like_h2o() -> None:
    model = tiny_model("qwen2", layers=3)
    ids = prompt_ids(80)
    h2o = tokensift.generate(model, ids, "h2o:budget=24,recent_fraction=0.5", max_new_tokens=12)
    kf_spec = "keyformer:budget=24,recent_fraction=0.5,noise=false,tau_init=1,tau_end=1"
    plan = tokensift.Plan.of(kf_spec)
    keyformer = tokensift.generate(model, ids, plan, max_new_tokens=12)
    assert keyformer.token_ids == h2o.token_ids
    # Same kept positions in every layer, not just the same tokens.
    caches = []
    for spec in ["h2o:budget=24,recent_fraction=0.5", kf_spec]:
        cache = tokensift.TokenCache(model.model, spec)
        with torch.inference_mode():
            model.model(torch.tensor([ids]), cache=cache, use_cache=True)
        caches.append([layer.positions.clone() for layer in cache.layers])
    for a, b in zip(*caches, strict=True):
        assert torch.equal(a, b)


def test_keyformer_noise_changes_selection_and_is_seeded() -> None:
    model = tiny_model("llama", layers=2)
    ids = prompt_ids(80)

    def kept(spec: str) -> list[torch.Tensor]:
        cache = tokensift.TokenCache(model.model, spec)
        with torch.inference_mode():
            model.model(torch.tensor([ids]), cache=cache, use_cache=True)
        return [layer.positions.clone() for layer in cache.layers]

    a, b = kept("keyformer:budget=24,seed=1"), kept("keyformer:budget=24,seed=1")
    c = kept("keyformer:budget=24,seed=2")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_keyformer_temperature_schedule() -> None:
    method = tokensift.methods.REGISTRY["keyformer"](tau_init=1.0, tau_end=2.0)
    assert [method.temperature(t, 8) for t in (0, 4, 8)] == [1.0, 1.5, 2.0]


def test_keyformer_gumbel_scores_keep_the_mask() -> None:
    from tokensift.methods.keyformer import CounterNoise, gumbel_softmax_scores

    logits = torch.tensor([[0.0, 1.0, float("-inf")]])
    scores = gumbel_softmax_scores(logits, 2.0, CounterNoise(0))
    assert scores[0, 2] == 0 and torch.isclose(scores.sum(), torch.tensor(1.0))
    torch.testing.assert_close(gumbel_softmax_scores(logits, 1.0, None), logits.softmax(-1))


def test_keyformer_noise_is_gumbel() -> None:
    """The exponential-draw form samples exactly softmax(x + Gumbel): argmax frequencies equal softmax(x)."""
    from tokensift.methods.keyformer import CounterNoise, gumbel_softmax_scores

    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).expand(20000, 3)
    picks = gumbel_softmax_scores(logits, 1.0, CounterNoise(0)).argmax(-1)
    freq = torch.bincount(picks, minlength=3).float() / len(picks)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.015, rtol=0)
    # At tau 2 the argmax still follows softmax(x) (Gumbel-max), the scores are flatter.
    flat = gumbel_softmax_scores(logits[:1], 2.0, None)
    assert flat.max() < torch.softmax(logits[:1], -1).max()
