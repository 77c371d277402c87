"""The kvpress presses we add (TOVA, Knorm, PyramidKV, KeyDiff): their papers' definitions, checked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import tokensift
from tokensift.errors import TokensiftError
from tokensift.methods import parse_method
from tokensift.methods.pyramidkv import pyramid_budgets
from tokensift.runtime.cache import TokenCache
from tokensift.runtime.generate import forward

from .conftest import prompt_ids, tiny_model

PROMPT = 96


def _fake_layer(b: int = 1, kv: int = 2, n: int = 20, d: int = 8, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(k=torch.randn(b, kv, n, d, generator=g))


def test_knorm_scores_are_minus_key_norms() -> None:
    layer = _fake_layer()
    scores = parse_method("knorm:budget=4").token_scores(layer, torch.zeros(1, 4, 1, 8), 1.0, 4)
    expected = -layer.k.norm(dim=-1)
    torch.testing.assert_close(scores, expected)
    kept = scores.topk(4, dim=-1).indices
    smallest = layer.k.norm(dim=-1).topk(4, dim=-1, largest=False).indices
    assert torch.equal(kept.sort(dim=-1).values, smallest.sort(dim=-1).values)


def test_keydiff_keeps_keys_least_similar_to_the_mean_key() -> None:
    layer = _fake_layer()
    scores = parse_method("keydiff:budget=4").token_scores(layer, torch.zeros(1, 4, 1, 8), 1.0, 4)
    unit = F.normalize(layer.k, dim=-1)
    anchor = unit.mean(dim=2, keepdim=True)
    cosine = F.cosine_similarity(layer.k, anchor.expand_as(layer.k), dim=-1)
    torch.testing.assert_close(scores, -cosine, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("heads", ["each", "mean"])
def test_tova_scores_are_the_last_query_attention(heads: str) -> None:
    layer = _fake_layer(kv=2, n=12)
    g = torch.Generator().manual_seed(3)
    query = torch.randn(1, 4, 5, 8, generator=g)  # 4 query heads, 2 per KV head; 5-token forward
    scores = parse_method(f"tova:budget=4,heads={heads}").token_scores(layer, query, 0.3, 4)
    k = layer.k.repeat_interleave(2, dim=1)  # (1, 4, n, d)
    probs = torch.softmax((query[:, :, -1:] @ k.transpose(-1, -2)).squeeze(2) * 0.3, dim=-1)
    expected = probs.reshape(1, 2, 2, 12).mean(dim=2)  # group mean per KV head
    if heads == "mean":
        expected = expected.mean(dim=1, keepdim=True).expand_as(expected)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)


def test_tova_holds_its_budget_at_every_step() -> None:
    model = tiny_model("llama", layers=3)
    out = tokensift.generate(model, prompt_ids(PROMPT), "tova:budget=40", max_new_tokens=12)
    assert out.stats.applied
    assert out.stats.tokens_held == 40
    # The prompt lost PROMPT - 40 tokens per layer and each later step one more.
    per_layer = out.stats.tokens_evicted / model.num_layers
    assert per_layer == PROMPT - 40 + out.stats.new_tokens - 1


@pytest.mark.parametrize("name", ["knorm", "keydiff", "tova"])
def test_one_shot_prompt_compression_keeps_the_best_scored_tokens(name: str) -> None:
    """The prefill's keys of every layer equal dense's (compression runs after each layer's attention),
    so the positions each layer keeps must be the top-`budget` by the score of dense's keys."""
    model = tiny_model("qwen2", layers=3)
    ids = torch.tensor([prompt_ids(PROMPT)])
    budget = 30
    with torch.inference_mode():
        dense = TokenCache(model, "dense", prompt_tokens=PROMPT)
        forward(model, ids, dense)
        method = TokenCache(model, f"{name}:budget={budget}", prompt_tokens=PROMPT)
        forward(model, ids, method)
    for layer_d, layer_m in zip(dense.layers, method.layers, strict=True):
        assert layer_m.n == budget
        if name == "tova":
            continue  # needs the last query, checked on its scores above
        k = layer_d.k.float()
        if name == "knorm":
            score = -k.norm(dim=-1)
        else:
            unit = F.normalize(k, dim=-1)
            score = (unit * F.normalize(unit.mean(dim=2, keepdim=True), dim=-1)).sum(-1).neg()
        expected = score.topk(budget, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(layer_m.positions.long(), expected), name


def test_pyramid_budgets_follow_the_schedule() -> None:
    budgets = pyramid_budgets(1024, 32, 4096, 24, 20.0)
    assert budgets == sorted(budgets, reverse=True)
    assert abs(sum(budgets) / len(budgets) - 1024) < 1
    assert budgets[-1] == round((1024 - 32) / 20) + 32
    # A budget close to the prompt caps the bottom layer at the prompt and keeps the mean.
    capped = pyramid_budgets(900, 32, 1000, 8, 20.0)
    assert max(capped) <= 1000 and abs(sum(capped) / 8 - 900) < 1
    # No slope fits (one layer): plain SnapKV budgets.
    assert pyramid_budgets(100, 32, 1000, 1, 20.0) == [100]


def test_pyramidkv_layers_hold_their_budgets() -> None:
    model = tiny_model("llama", layers=4)
    ids = torch.tensor([prompt_ids(PROMPT)])
    with torch.inference_mode():
        cache = TokenCache(model, "pyramidkv:budget=48,window_size=8,beta=4", prompt_tokens=PROMPT)
        forward(model, ids, cache)
    expected = pyramid_budgets(48, 8, PROMPT, 4, 4.0)
    assert [layer.n for layer in cache.layers] == expected
    assert expected[0] > expected[-1]


def test_pyramidkv_says_when_no_pyramid_fits() -> None:
    """The schedule falls back to equal budgets (SnapKV) when the top layer would keep fewer prefix
    tokens than the window (as in KVCache-Factory and kvpress, e.g. ratio 0.75 at 4k with beta 20):
    the run says so instead of calling itself a pyramid."""
    model = tiny_model("llama", layers=4)
    flat = pyramid_budgets(24, 8, PROMPT, 4, 20.0)  # (24 - 8) / 20 < 8: no slope fits
    assert len(set(flat)) == 1
    out = tokensift.generate(model, prompt_ids(PROMPT), "pyramidkv:budget=24,window_size=8", max_new_tokens=2)
    assert out.stats.applied and any("this run is SnapKV" in n for n in out.stats.notes)
    steep = tokensift.generate(
        model, prompt_ids(PROMPT), "pyramidkv:budget=48,window_size=8,beta=4", max_new_tokens=2
    )
    assert not any("pyramidkv" in n for n in steep.stats.notes)


def test_pyramidkv_rejects_a_flat_beta() -> None:
    with pytest.raises(TokensiftError, match="beta"):
        parse_method("pyramidkv:beta=0.5")
    with pytest.raises(TokensiftError, match="heads"):
        parse_method("tova:heads=all")


@pytest.mark.parametrize(
    "spec", ["knorm:budget=32", "keydiff:budget=32", "tova:budget=32", "pyramidkv:budget=32,window_size=8"]
)
def test_token_budgets_and_ratios_both_work(spec: str) -> None:
    model = tiny_model("llama", layers=2)
    by_tokens = tokensift.generate(model, prompt_ids(128), spec, max_new_tokens=4)
    by_ratio = tokensift.generate(model, prompt_ids(128), spec.replace("=32", "=0.25"), max_new_tokens=4)
    assert by_tokens.stats.applied and by_ratio.stats.applied
    assert by_tokens.token_ids == by_ratio.token_ids  # 0.25 of 128 prompt tokens is 32


def test_compression_ratio_maps_to_budgets_as_kvpress_writes_it() -> None:
    from tokensift.commands import expand_compression_ratios
    from tokensift.methods.spec import with_compression_ratio

    assert with_compression_ratio("snapkv", 0.75).startswith("snapkv:budget=0.25,")
    assert with_compression_ratio("adaptive(snapkv)", 0.875).startswith("adaptive(snapkv:budget=0.125,")
    assert with_compression_ratio("dense", 0.5) == "dense"
    composed = with_compression_ratio("knorm+quest:budget=64", 0.5)
    assert composed.startswith("knorm:budget=0.5+quest:budget=64")
    specs = expand_compression_ratios(["dense", "tova"], [0.25, 0.5])
    assert specs == ["dense", "tova:budget=0.75,heads=each", "tova:budget=0.5,heads=each"]
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(TokensiftError, match="compression ratio"):
            with_compression_ratio("snapkv", bad)
    with pytest.raises(TokensiftError, match="names a budget and a compression ratio"):
        with_compression_ratio("snapkv:budget=0.3", 0.5)
