"""Column-sum evictors (H2O, Keyformer) at every budget and scoring rule share one prefill, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tokensift
from tests.conftest import prompt_ids, tiny_model, tiny_smol_model
from tokensift.bench.runner import BenchConfig, run_bench
from tokensift.methods.keyformer import CounterNoise, gumbel_softmax_scores
from tokensift.runtime import shared_prefill
from tokensift.runtime.cache import TokenCache
from tokensift.runtime.generate import forward
from tokensift.runtime.plan import Plan
from tokensift.runtime.scores import attention_with_colsums
from tokensift.runtime.shared_prefill import COLSUMS, EXACT, SharedPrefill, prefill_key, scores_key

H2O = ["h2o:budget=20", "h2o:budget=45", "h2o:budget=0.5", "h2o:budget=70,recent_fraction=0.2"]
KEYFORMER = ["keyformer:budget=20", "keyformer:budget=0.5", "keyformer:budget=60,recent_fraction=0.5"]


def _own_cache(model: tokensift.Model, spec: str, ids: list[int]) -> tuple[TokenCache, torch.Tensor]:
    with torch.inference_mode():
        cache = TokenCache(model, Plan.of(spec), prompt_tokens=len(ids))
        logits = forward(model, torch.tensor([ids]), cache)[0, -1]
    return cache, logits


@pytest.mark.parametrize("family", [H2O, KEYFORMER], ids=["h2o", "keyformer"])
def test_one_prefill_serves_every_budget_with_the_same_cache(family: list[str]) -> None:
    model = tiny_model("qwen2", layers=3)  # GQA: column sums are averaged over each KV head's group
    ids = prompt_ids(90)
    # One prefill for both families (and two Keyformer seeds): every plan gets its own scoring's sums.
    others = [Plan.of(s) for s in [*H2O, *KEYFORMER, "keyformer:budget=20,seed=3"]]
    shared = SharedPrefill.run(model, ids, Plan.of(family[-1]), also=others)
    assert shared.key == COLSUMS and shared.colsums is not None and len(shared.colsums) == 3
    assert all(len(sums) == 3 for sums in shared.colsums.values())  # one per layer
    for spec in family:
        own, own_logits = _own_cache(model, spec, ids)
        with torch.inference_mode():
            cache = TokenCache(model, Plan.of(spec), prompt_tokens=len(ids))
            logits = shared.fill(cache)
        torch.testing.assert_close(logits, own_logits, atol=1e-5, rtol=1e-5)
        assert own.evicted > 0 and cache.evicted == own.evicted, spec
        for a, b in zip(cache.layers, own.layers, strict=True):
            # Same kept tokens per head, same tensors, same accumulated scores.
            assert torch.equal(a.positions, b.positions), spec
            assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v), spec
            assert a.states.keys() == b.states.keys()
            for name in a.states:
                torch.testing.assert_close(a.state(name), b.state(name), atol=1e-6, rtol=1e-6)
            assert a.extra == b.extra  # Keyformer's step counter advanced once, as in its own forward
        assert cache.kv_bytes_peak == own.kv_bytes_peak and cache.aux_bytes_peak == own.aux_bytes_peak
        assert cache.counters["shared_prefill_colsums"] == 1


@pytest.mark.parametrize("spec", [H2O[0], H2O[2], KEYFORMER[0], KEYFORMER[1]])
def test_generation_from_a_shared_colsum_prefill_equals_its_own(spec: str) -> None:
    model = tiny_model("llama", layers=2)
    ids = prompt_ids(80)
    own = tokensift.generate(model, ids, spec, max_new_tokens=10, return_logits=True, ignore_eos=True)
    family = H2O if spec.startswith("h2o") else KEYFORMER
    shared = SharedPrefill.run(model, ids, Plan.of(family[1]))  # built by another budget's plan
    out = tokensift.generate(
        model, ids, spec, max_new_tokens=10, return_logits=True, ignore_eos=True, shared=shared
    )
    assert out.token_ids == own.token_ids
    for a, b in zip(out.logits or [], own.logits or [], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert out.stats.tokens_evicted == own.stats.tokens_evicted > 0
    assert out.stats.kv_bytes_peak == own.stats.kv_bytes_peak
    assert out.stats.applied == own.stats.applied is True
    assert out.stats.notes == own.stats.notes
    assert out.stats.counters["shared_prefill_seconds"] == shared.seconds
    assert out.stats.counters["shared_prefill_colsums"] == 1
    assert "shared_prefill_colsums" not in own.stats.counters


def test_prefill_keys_group_only_identical_scoring() -> None:
    def key(spec: str) -> object:
        return prefill_key(Plan.of(spec))

    def scoring(spec: str) -> object:
        return scores_key(Plan.of(spec))

    # One prefill (the column-sum kernel) serves both families; each scoring rule keeps its own sums.
    assert {key(s) for s in H2O + KEYFORMER} == {COLSUMS}
    assert len({scoring(s) for s in H2O}) == 1 and len({scoring(s) for s in KEYFORMER}) == 1
    assert scoring(H2O[0]) != scoring(KEYFORMER[0])  # Gumbel scores are not H2O's softmax sums
    assert scoring("keyformer:budget=20,seed=1") != scoring(KEYFORMER[0])
    assert scoring("keyformer:budget=20,noise=false") != scoring(KEYFORMER[0])
    assert scoring("keyformer:budget=20,tau_init=0.5") != scoring(KEYFORMER[0])
    assert scoring("dense") is None and scoring("snapkv:budget=40,window_size=8") is None
    assert key("dense") == key("snapkv:budget=40,window_size=8") == key("tova:budget=40") == EXACT
    # A wrapper that does not declare a key runs its own prefill.
    assert key("decoding(h2o:budget=40):every=4,target=32") is None


def test_a_colsum_prefill_refuses_scorings_it_did_not_record() -> None:
    model = tiny_model("llama")
    ids = prompt_ids(50)
    shared = SharedPrefill.run(model, ids, Plan.of("h2o:budget=20"))
    for spec in ["dense", "snapkv:budget=20,window_size=8", "keyformer:budget=20"]:
        with pytest.raises(tokensift.TokensiftError, match="cannot serve"):
            tokensift.generate(model, ids, spec, max_new_tokens=2, shared=shared)
    with pytest.raises(tokensift.TokensiftError, match="cannot serve"):
        tokensift.generate(model, prompt_ids(50, seed=9), "h2o:budget=30", max_new_tokens=2, shared=shared)


def test_bench_runs_one_prefill_per_family(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_smol_model()
    methods = [
        "dense",
        "h2o:budget=0.25",
        "snapkv:budget=0.5,window_size=8",
        "h2o:budget=0.5",
        "keyformer:budget=0.5",
        "h2o:budget=0.75",
        "keyformer:budget=0.75",
    ]
    config = {"tasks": ["passkey"], "methods": methods, "lengths": [256], "samples": 1, "depths": [0.5]}
    runs: list[tuple[object, ...]] = []
    real_run = SharedPrefill.run.__func__  # type: ignore[attr-defined]

    def counting_run(cls: type[SharedPrefill], *args: object, **kwargs: object) -> SharedPrefill:
        out = real_run(cls, *args, **kwargs)
        runs.append(out.key)
        return out

    prompt_forwards = 0

    def count_prefill(module: torch.nn.Module, args: object, kwargs: dict[str, torch.Tensor]) -> None:
        nonlocal prompt_forwards
        prompt_forwards += int(kwargs["input_ids"].shape[1] > 1)

    hook = model.model.register_forward_pre_hook(count_prefill, with_kwargs=True)
    try:
        monkeypatch.setattr(shared_prefill.SharedPrefill, "run", classmethod(counting_run))
        shared = run_bench(BenchConfig(**config), tmp_path / "shared", progress=False, model=model)
        shared_forwards, prompt_forwards = prompt_forwards, 0
        own = run_bench(
            BenchConfig(**config, share_prefill=False), tmp_path / "own", progress=False, model=model
        )
    finally:
        hook.remove()
    # Two prefills (exact; the column-sum kernel for H2O and Keyformer): two prompt forwards, not seven.
    assert sorted(map(str, runs)) == sorted(map(str, [EXACT, COLSUMS]))
    assert shared_forwards == 2 and prompt_forwards == len(methods)
    for a, b in zip(shared, own, strict=True):
        assert a["method"] == b["method"]
        assert not a.get("error") and not b.get("error"), a.get("error") or b.get("error")
        for field in ("prediction", "score", "tokens_evicted", "kv_bytes_peak", "applied", "notes"):
            assert a[field] == b[field], (a["method"], field)
        assert "shared_prefill_seconds" in a["counters"] and "shared_prefill_seconds" not in b["counters"]
        colsum = a["method"].startswith(("h2o", "keyformer"))
        assert a["counters"].get("shared_prefill_colsums", 0) == int(colsum)


def test_several_scorings_sum_from_one_pass_exactly_as_alone() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    noise = CounterNoise(0, 1, 0)

    def gumbel(logits: torch.Tensor) -> torch.Tensor:
        return gumbel_softmax_scores(logits, 1.5, noise)

    def square(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1) ** 2

    small = 2 * 6 * 7  # several chunks
    out, stacked = attention_with_colsums(q, k, v, 0.4, max_elements=small, score_fn=[None, gumbel, square])
    assert stacked.shape == (3, 1, 6, 40)
    for index, fn in enumerate([None, gumbel, square]):
        alone_out, alone = attention_with_colsums(q, k, v, 0.4, max_elements=small, score_fn=fn)
        assert torch.equal(out, alone_out)  # the output never depends on the scores summed
        assert torch.equal(stacked[index], alone), index
    assert not torch.equal(stacked[0], stacked[1]) and not torch.equal(stacked[0], stacked[2])
