"""Head-adaptive budgets that really free memory, and decode-time compression."""

from __future__ import annotations

import pytest
import torch

import tokensift
from tokensift.methods.adaptive import adaptive_selection
from tokensift.runtime.ragged import RaggedLayer

from .conftest import prompt_ids, tiny_model

ADAPTIVE = "adaptive(snapkv:budget=40,window_size=8):alpha=0.2"


def _prefill(model: tokensift.Model, spec: str, n: int = 120) -> tokensift.TokenCache:
    cache = tokensift.TokenCache(model.model, spec)
    with torch.inference_mode():
        model.model(torch.tensor([prompt_ids(n)]), cache=cache, use_cache=True)
    return cache


def test_adaptive_selection_follows_scores() -> None:
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 0.5, 0.2, 0.1]])
    # budget 2 per head, 4 in all; alpha 0.5 guarantees each head its single best token.
    kept = adaptive_selection(scores, budget=2, alpha=0.5)
    assert [k.tolist() for k in kept] == [[0, 1, 2], [0]]
    kept = adaptive_selection(scores, budget=2, alpha=0.0)
    assert [k.tolist() for k in kept] == [[0, 1, 2, 3], []]


def test_ragged_heads_hold_exactly_their_tokens() -> None:
    model = tiny_model("llama", layers=3)
    cache = _prefill(model, ADAPTIVE)
    per_token = 2 * model.head_dim * 4  # K and V, float32
    lengths = []
    for layer in cache.layers:
        assert isinstance(layer, RaggedLayer)
        assert int(layer.lengths.sum()) == 40 * model.num_kv_heads
        assert int(layer.lengths.min()) >= 8 + 8  # window + alpha * budget
        assert layer.nbytes()[0] == int(layer.lengths.sum()) * per_token
        lengths.append(layer.lengths.tolist())
    assert any(a != b for a, b in lengths)  # heads really differ
    assert cache.kv_bytes == sum(layer.nbytes()[0] for layer in cache.layers)


def test_ragged_attention_equals_masked_dense() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 50, 16
    model = tiny_model("llama")
    cache = tokensift.TokenCache(model.model, None)
    layer = cache.layers[0]
    k, v = torch.randn(1, 2, n, d, generator=g), torch.randn(1, 2, n, d, generator=g)
    layer.update(k, v)
    index = [torch.tensor([0, 3, 7, 20, 49]), torch.arange(10, 50)]
    ragged = RaggedLayer.from_selection(layer, index)
    query = torch.randn(1, 4, 1, d, generator=g)
    mask = torch.zeros(1, 2, 1, n, dtype=torch.bool)
    for h, i in enumerate(index):
        mask[0, h, 0, i] = True
    reference = torch.nn.functional.scaled_dot_product_attention(
        query,
        k.repeat_interleave(2, 1),
        v.repeat_interleave(2, 1),
        attn_mask=mask.repeat_interleave(2, 1),
        scale=0.25,
    )
    torch.testing.assert_close(ragged.attention(query, 0.25), reference, atol=1e-5, rtol=1e-5)
    # Appending a token lands at the end of every head.
    ragged.update(torch.randn(1, 2, 1, d), torch.randn(1, 2, 1, d))
    assert ragged.lengths.tolist() == [6, 41] and ragged.head(0)[2].tolist() == [0, 3, 7, 20, 49, 50]


def test_adaptive_generation_runs_and_full_budget_is_dense() -> None:
    model = tiny_model("qwen2", layers=3)
    ids = prompt_ids(96)
    dense = tokensift.generate(model, ids, "dense", max_new_tokens=12, return_logits=True)
    with pytest.warns(tokensift.NoOpWarning):
        full = tokensift.generate(
            model, ids, "adaptive(snapkv:budget=1.0)", max_new_tokens=12, return_logits=True
        )
    assert full.token_ids == dense.token_ids
    out = tokensift.generate(model, ids, ADAPTIVE.replace("40", "30"), max_new_tokens=12)
    assert out.stats.applied and out.stats.kv_bytes_final < 0.5 * out.stats.kv_bytes_dense


def test_adaptive_rejects_continuous_scorers() -> None:
    with pytest.raises(tokensift.TokensiftError, match="one-shot"):
        tokensift.Plan.of("adaptive(h2o:budget=0.25)")


def test_decode_compression_bounds_the_cache() -> None:
    model = tiny_model("llama", layers=2)
    out = tokensift.generate(
        model,
        prompt_ids(100),
        "decoding(snapkv:budget=40,window_size=8):every=16,target=32",
        max_new_tokens=60,
        ignore_eos=True,
    )
    assert out.stats.counters["decode_compressions"] == 59 // 16
    held = out.stats.tokens_held
    assert 32 <= held <= 32 + 16


def test_decode_compression_every_step_is_h2o() -> None:
    model = tiny_model("llama", layers=2)
    ids = prompt_ids(100)
    h2o = tokensift.generate(model, ids, "h2o:budget=40", max_new_tokens=20, ignore_eos=True)
    wrapped = tokensift.generate(
        model, ids, "decoding(h2o:budget=40):every=1,target=40", max_new_tokens=20, ignore_eos=True
    )
    assert wrapped.token_ids == h2o.token_ids
    assert wrapped.stats.tokens_held == h2o.stats.tokens_held == 40


def test_adaptive_says_when_the_scorer_leaves_nothing_to_share(tmp_path) -> None:
    """CompressKV scores every KV head of a layer with one vote vector, so AdaKV's sharing has no head
    to move budget to: the wrapper must say so (note, zero counter) and keep compresskv's tokens."""
    from .test_applied import Files

    model = tiny_model("qwen2", layers=3)
    inner = f"compresskv:budget=40,min_budget=16,calibration={Files(tmp_path, model).compresskv()}"
    ids = prompt_ids(96)
    plain = tokensift.generate(model, ids, inner, max_new_tokens=12, ignore_eos=True)
    with pytest.warns(tokensift.NoOpWarning, match="no budget moves between heads"):
        wrapped = tokensift.generate(model, ids, f"adaptive({inner})", max_new_tokens=12, ignore_eos=True)
    assert wrapped.token_ids == plain.token_ids
    assert wrapped.stats.tokens_evicted == plain.stats.tokens_evicted
    assert wrapped.stats.counters["adaptive_tokens_moved"] == 0
    assert wrapped.stats.applied  # compresskv itself evicted; the note says the wrapper added nothing
    # A per-head scorer does move budget, and says nothing of the kind.
    snap = tokensift.generate(model, ids, ADAPTIVE, max_new_tokens=12, ignore_eos=True)
    assert snap.stats.counters["adaptive_tokens_moved"] > 0
    assert not any("no budget moves" in n for n in snap.stats.notes)
