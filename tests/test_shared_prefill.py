"""A prefill shared by several plans gives each exactly what its own prefill would have."""

from __future__ import annotations

import pytest
import torch

import tokensift
from tokensift.runtime.plan import Plan
from tokensift.runtime.shared_prefill import SharedPrefill, shareable

from .conftest import prompt_ids, tiny_model

SHAREABLE = [
    "dense",
    "snapkv:budget=40,window_size=8",
    "streaming_llm:budget=40",
    "adaptive(snapkv:budget=40,window_size=8)",
    "decoding(snapkv:budget=40,window_size=8):every=4,target=32",
    # Sparse decoding attends densely at prefill (HiP when told to): the dense prefill serves it.
    "quest:budget=32,page_size=8",
    "tokenselect:budget=32",
    "tidaldecode:budget=32,sparse_layer_start=1,correction_layer=2",
    "hip:budget=32,sparse_prefill=false,dense_layers=1,window=8,refresh_interval=2",
]


@pytest.mark.parametrize("spec", SHAREABLE)
def test_shared_prefill_equals_own_prefill(spec: str) -> None:
    model = tiny_model("qwen2", layers=3)
    ids = prompt_ids(90)
    own = tokensift.generate(model, ids, spec, max_new_tokens=12, return_logits=True, ignore_eos=True)
    shared = SharedPrefill.run(model, ids)
    out = tokensift.generate(
        model, ids, spec, max_new_tokens=12, return_logits=True, ignore_eos=True, shared=shared
    )
    assert out.token_ids == own.token_ids
    for a, b in zip(out.logits or [], own.logits or [], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert out.stats.kv_bytes_peak == own.stats.kv_bytes_peak
    assert out.stats.tokens_evicted == own.stats.tokens_evicted
    assert out.stats.counters["shared_prefill_seconds"] == shared.seconds
    # The shared tensors are never written: a second plan sees the same prompt.
    again = tokensift.generate(model, ids, spec, max_new_tokens=12, ignore_eos=True, shared=shared)
    assert again.token_ids == own.token_ids


def test_which_plans_share() -> None:
    assert all(shareable(Plan.of(s)) for s in SHAREABLE)
    assert not shareable(Plan.of("snapkv:budget=200,window_size=100"))
    assert not shareable(Plan.of("hip:budget=32"))  # its own block-sparse prefill
    # A logit bias (ZeroTuning) changes the prefill's attention: no shared dense prefill may serve it.
    assert not shareable(Plan.of("zerotuning:gamma=2"))
    assert not shareable(Plan.of("zerotuning:gamma=2+snapkv:budget=64"))
    # Column-sum evictors share a prefill of their own scoring rule (tests/test_shared_prefill_colsums.py).


def test_shared_prefill_refuses_another_prompt() -> None:
    model = tiny_model("llama")
    shared = SharedPrefill.run(model, prompt_ids(50))
    with pytest.raises(tokensift.TokensiftError, match="cannot serve"):
        tokensift.generate(model, prompt_ids(50, seed=9), "dense", max_new_tokens=2, shared=shared)
    with pytest.raises(tokensift.TokensiftError, match="cannot serve"):
        tokensift.generate(model, prompt_ids(50), "h2o:budget=20", max_new_tokens=2, shared=shared)
