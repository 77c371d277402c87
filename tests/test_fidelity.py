"""Full budget reproduces dense exactly; small budgets really shrink the cache."""

from __future__ import annotations

import warnings

import pytest
import torch

import tokensift
from tokensift import NoOpWarning
from tokensift.runtime.cache import _capacity

from .conftest import prompt_ids, tiny_model

PROMPT, NEW = 96, 16
# Continuous evictors must cover prompt + generated tokens; SnapKV compresses the prompt only.
FULL_BUDGET = {
    "streaming_llm": f"streaming_llm:budget={PROMPT + NEW}",
    "h2o": f"h2o:budget={PROMPT + NEW}",
    "keyformer": f"keyformer:budget={PROMPT + NEW}",
    "snapkv": "snapkv:budget=1.0",
}


def _dense(model: tokensift.Model, ids: list[int]) -> tokensift.Generation:
    return tokensift.generate(model, ids, "dense", max_new_tokens=NEW, return_logits=True)


def test_dense_matches_transformers_sdpa(tiny: tokensift.Model) -> None:
    ids = prompt_ids(PROMPT)
    ours = _dense(tiny, ids)
    tiny.model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            ref = tiny.model.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
    finally:
        tiny.model.set_attn_implementation("tokensift")
    assert ours.token_ids == ref.sequences[0, PROMPT:].tolist()
    for a, b in zip(ours.logits or [], ref.logits, strict=True):
        torch.testing.assert_close(a, b[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(FULL_BUDGET))
def test_full_budget_is_dense(tiny: tokensift.Model, name: str) -> None:
    ids = prompt_ids(PROMPT)
    dense = _dense(tiny, ids)
    with pytest.warns(NoOpWarning, match="evicted nothing"):
        out = tokensift.generate(tiny, ids, FULL_BUDGET[name], max_new_tokens=NEW, return_logits=True)
    assert out.token_ids == dense.token_ids
    for a, b in zip(out.logits or [], dense.logits or [], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert out.stats.tokens_evicted == 0
    assert not out.stats.applied
    assert any("evicted nothing" in n for n in out.stats.notes)


@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "keyformer", "snapkv"])
def test_small_budget_shrinks_memory(name: str) -> None:
    model = tiny_model("llama", layers=4)
    budget = 40
    spec = f"{name}:budget={budget}" + (",window_size=8" if name == "snapkv" else "")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoOpWarning)  # it must apply
        out = tokensift.generate(model, prompt_ids(PROMPT), spec, max_new_tokens=NEW)
    s = out.stats
    held = budget + (
        out.stats.new_tokens - 1 if name == "snapkv" else 0
    )  # SnapKV's cache grows after prefill
    assert s.tokens_held == held
    per_token_layer = model.kv_bytes_per_token // model.num_layers
    assert s.kv_bytes_final <= model.num_layers * _capacity(held) * per_token_layer
    assert s.kv_bytes_final < 0.6 * s.kv_bytes_dense
    assert s.applied and s.tokens_evicted > 0


def test_peak_counts_storage_not_views() -> None:
    """Bytes are measured from tensor storage: a slice of a big buffer still counts as the big buffer."""
    model = tiny_model("llama", layers=2)
    cache = tokensift.TokenCache(model.model, "dense")
    with torch.inference_mode():
        model.model(torch.tensor([prompt_ids(50)]), cache=cache, use_cache=True)
    layer = cache.layers[0]
    per_layer = layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
    layer.n = 10  # pretend only 10 tokens are live: storage still holds 50
    assert layer.nbytes()[0] == per_layer


def test_hf_generate_interop(tiny: tokensift.Model) -> None:
    """Eviction works through transformers' own generate with our cache passed in."""
    ids = prompt_ids(PROMPT)
    for spec in [
        "snapkv:budget=40,window_size=8",
        "h2o:budget=40",
        "streaming_llm:budget=40",
        "keyformer:budget=40",
    ]:
        ours = tokensift.generate(tiny, ids, spec, max_new_tokens=NEW)
        cache = tokensift.TokenCache(tiny.model, spec)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            out = tiny.model.generate(
                torch.tensor([ids]), past_key_values=cache, max_new_tokens=NEW, do_sample=False
            )
        assert out[0, PROMPT:].tolist() == ours.token_ids, spec
        assert max(cache.tokens_held) < PROMPT
