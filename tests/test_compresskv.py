"""CompressKV: budget allocation, head-voted selection, calibration artefacts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tokensift
from tokensift.calibration import save_artefact
from tokensift.calibration.compresskv import rouge1_recall
from tokensift.methods.compresskv import allocate_budgets
from tokensift.methods.snapkv import pool_scores
from tokensift.runtime.scores import window_scores

from .conftest import prompt_ids, tiny_model


def test_uniform_scores_give_equal_budgets() -> None:
    assert allocate_budgets([0.25] * 4, 64) == [64] * 4
    assert allocate_budgets([0.0] * 3, 100) == [100] * 3


def test_skewed_scores_and_clamps() -> None:
    layers, budget = 4, 64
    out = allocate_budgets([1.0, 0.0, 0.0, 0.0], budget)
    assert out[0] == min(3 * budget, 32 + (layers * budget - 32 * layers)) == 160
    assert out[1:] == [32, 32, 32] and sum(out) == layers * budget
    # The cap binds: layer 0 stops at 3B and the leftover goes to the next layers by score.
    out = allocate_budgets([1.0, 0.05, 0.0, 0.0], 128)
    assert out == [384, 64, 32, 32]  # 32 + round(.952 * 384) = 398 is capped at 384; layer 1 gets the 14
    for scores in ([0.5, 0.3, 0.2], [0.9, 0.05, 0.05, 0.0, 0.0], [1e-3] * 7):
        for budget in (16, 48, 512):
            got = allocate_budgets(scores, budget)
            assert sum(got) == len(scores) * budget
            assert all(min(32, budget) <= b <= 3 * budget for b in got)


def test_rouge1_recall() -> None:
    assert rouge1_recall("eat a sandwich in the park", "Eat a sandwich.") == 1.0
    assert rouge1_recall("nothing here", "eat a sandwich") == 0.0
    assert rouge1_recall("a a", "a a b b") == 0.5


def _artefact(model: tokensift.Model, tmp_path: Path, layer_scores: list[float] | None = None) -> Path:
    layers, heads = model.num_layers, int(model.config.num_attention_heads)
    g = torch.Generator().manual_seed(0)
    ranking = [torch.randperm(heads, generator=g).tolist() for _ in range(layers)]
    payload = {"heads": ranking, "layer_scores": layer_scores or [1.0 / layers] * layers}
    return save_artefact("compresskv", model, payload, "test", tmp_path / "compresskv.json")


def test_full_budget_is_dense(tmp_path: Path) -> None:
    model = tiny_model("qwen2", layers=3)
    path = _artefact(model, tmp_path)
    ids = prompt_ids(96)
    dense = tokensift.generate(model, ids, "dense", max_new_tokens=10, return_logits=True)
    with pytest.warns(tokensift.NoOpWarning):
        out = tokensift.generate(
            model,
            ids,
            f"compresskv:budget=1.0,uniform=true,calibration={path}",
            max_new_tokens=10,
            return_logits=True,
        )
    assert out.token_ids == dense.token_ids
    for a, b in zip(out.logits or [], dense.logits or [], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layer_budgets_follow_the_profile(tmp_path: Path) -> None:
    model = tiny_model("llama", layers=4)
    path = _artefact(model, tmp_path, layer_scores=[0.7, 0.1, 0.1, 0.1])
    cache = tokensift.TokenCache(model, f"compresskv:budget=48,min_budget=16,calibration={path}")
    with torch.inference_mode():
        model.model(torch.tensor([prompt_ids(200)]), cache=cache, use_cache=True)
    held = cache.tokens_held
    assert sum(held) == 4 * 48 and held[0] > held[1] and min(held) >= 16
    # One selection per layer, shared by every KV head.
    for layer in cache.layers:
        assert torch.equal(layer.positions[0, 0], layer.positions[0, 1])


def test_all_heads_voting_is_snapkv_with_head_mean(tmp_path: Path) -> None:
    model = tiny_model("llama", layers=1)
    path = _artefact(model, tmp_path)
    heads = int(model.config.num_attention_heads)
    spec = f"compresskv:budget=40,first_k={heads},uniform=true,min_budget=40,calibration={path}"
    cache = tokensift.TokenCache(model, spec, prompt_tokens=120)
    method = cache.plan.evict
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 120, 16, generator=g), torch.randn(1, 2, 120, 16, generator=g)
    query = torch.randn(1, heads, 120, 16, generator=g)
    layer = cache.layers[0]
    layer.update(k, v)
    method.compress(layer, query, None, 0.25)
    votes = window_scores(query[:, :, -8:], k, 0.25)[..., :112]
    reference = pool_scores(votes, 5, "avg").mean(dim=1)[0].topk(32).indices.sort().values
    expected = torch.cat([reference, torch.arange(112, 120)])
    assert layer.positions[0, 0].tolist() == expected.tolist()


def test_missing_calibration_names_the_command() -> None:
    model = tiny_model("llama")
    with pytest.raises(tokensift.TokensiftError, match="tokensift calibrate compresskv --model"):
        tokensift.generate(model, prompt_ids(100), "compresskv:budget=40", max_new_tokens=2)


def test_artefact_for_other_weights_is_rejected(tmp_path: Path) -> None:
    path = _artefact(tiny_model("llama", seed=0), tmp_path)
    other = tiny_model("llama", seed=1)
    with pytest.raises(tokensift.TokensiftError, match="not for these weights"):
        tokensift.generate(
            other, prompt_ids(100), f"compresskv:budget=40,calibration={path}", max_new_tokens=2
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_artefact_serves_the_same_weights_in_other_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    """A calibration made on float32 weights loads on the same weights cast to bf16 or fp16 (its
    rounded checksums); other weights in that dtype are still refused, and so is an artefact made
    in bf16 on the same weights in fp16 (bf16's rounding is not fp16's)."""
    path = _artefact(tiny_model("llama", seed=0), tmp_path)
    spec = f"compresskv:budget=40,calibration={path}"
    same = tiny_model("llama", seed=0)
    same.model.to(dtype)
    assert tokensift.generate(same, prompt_ids(100), spec, max_new_tokens=2).stats.applied
    other = tiny_model("llama", seed=1)
    other.model.to(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(tokensift.TokensiftError, match=rf"not for these weights \({name}\)"):
        tokensift.generate(other, prompt_ids(100), spec, max_new_tokens=2)
    if dtype == torch.float16:
        bf16 = tiny_model("llama", seed=0)
        bf16.model.to(torch.bfloat16)
        bf16_path = _artefact(bf16, tmp_path / "bf16")
        with pytest.raises(tokensift.TokensiftError, match="not for these weights"):
            tokensift.generate(
                same, prompt_ids(100), f"compresskv:budget=40,calibration={bf16_path}", max_new_tokens=2
            )


@pytest.mark.slow
def test_shipped_calibration_runs_on_smollm2() -> None:
    smol = tokensift.load("smollm2-135m")
    out = tokensift.generate(smol, "Tell me about rivers. " * 60, "compresskv:budget=64", max_new_tokens=8)
    assert out.stats.applied and out.stats.kv_bytes_peak < 0.5 * out.stats.kv_bytes_dense


def test_observer_sees_every_layer_once_per_forward() -> None:
    model = tiny_model("llama", layers=3)
    cache = tokensift.TokenCache(model, None)
    seen: list[tuple[int, int]] = []
    cache.observer = lambda module, layer, q, k, v, scale: seen.append((layer.index, q.shape[2]))
    with torch.inference_mode():
        model.model(torch.tensor([prompt_ids(20)]), cache=cache, use_cache=True)
    assert seen == [(0, 20), (1, 20), (2, 20)]


def test_layer_profile_is_measured_on_the_prefill() -> None:
    """The error profile compares each layer's prefill output with full and compressed K/V: one
    forward per prompt, no decode step, a normalised positive score per layer."""
    from tokensift.calibration import compresskv as calib

    model = tiny_model("llama")
    heads = [list(range(int(model.config.num_attention_heads)))] * model.num_layers
    prompts = {"a": [prompt_ids(60)], "b": [prompt_ids(48)]}
    forwards: list[int] = []
    real_forward = calib.forward

    def counting_forward(model_, ids, cache):  # type: ignore[no-untyped-def]
        forwards.append(ids.shape[1])
        return real_forward(model_, ids, cache)

    calib.forward = counting_forward
    try:
        scores = calib.layer_errors(model, heads, prompts, budget=16, window=8, first_k=2)
    finally:
        calib.forward = real_forward
    assert forwards == [60, 48]  # the prompts' prefills only
    assert len(scores) == model.num_layers and all(s > 0 for s in scores)
    assert abs(sum(scores) - 1.0) < 1e-6
    with pytest.raises(tokensift.TokensiftError, match="profile-budget"):
        calib.layer_errors(model, heads, {"a": [prompt_ids(12)]}, budget=16, window=8, first_k=2)
