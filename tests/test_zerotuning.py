"""ZeroTuning: the logit bias equals the official post-softmax rescaling; gamma=1 is exactly dense."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from transformers import AttentionInterface

import tokensift
from tokensift import NoOpWarning
from tokensift.errors import TokensiftError
from tokensift.methods import REGISTRY, Hook, parse_method
from tokensift.methods.zerotuning import ZeroTuning, parse_layers

from .conftest import prompt_ids, tiny_model

PROMPT, NEW = 48, 8


def _reference_attention(table: dict[int, dict[int, float]]):
    """Eager attention with the official ZeroTuning step: column 0 of the post-softmax weights of the
    chosen heads times gamma, rows renormalised (FeijiangHan/ZeroTuning, `ZeroTuning_Attention`)."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rep = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(rep, dim=1)
        v = value.repeat_interleave(rep, dim=1)
        logits = query @ k.transpose(-1, -2) * scaling
        length, n = query.shape[2], k.shape[2]
        future = torch.arange(n)[None, :] > torch.arange(n - length, n)[:, None]
        weights = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        row = table.get(module.layer_idx, {})
        if row:
            scale = torch.ones_like(weights)
            for head, gamma in row.items():
                scale[:, head, :, 0] = gamma
            weights = weights * scale
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights @ v).transpose(1, 2).contiguous(), None

    return attention


def _reference_logits(model: tokensift.Model, ids: list[int], table, steps: int) -> list[torch.Tensor]:
    """Greedy decoding by full recomputation with the reference attention: logits per new token."""
    AttentionInterface.register("zt_reference", _reference_attention(table))
    model.model.set_attn_implementation("zt_reference")
    out, seq = [], list(ids)
    try:
        with torch.no_grad():
            for _ in range(steps):
                logits = model.model(torch.tensor([seq]), use_cache=False).logits[0, -1]
                out.append(logits)
                seq.append(int(logits.argmax()))
    finally:
        model.model.set_attn_implementation("tokensift")
    return out


def test_gamma_one_is_identical_to_dense(tiny: tokensift.Model) -> None:
    ids = prompt_ids(PROMPT)
    dense = tokensift.generate(tiny, ids, "dense", max_new_tokens=NEW, return_logits=True)
    with pytest.warns(NoOpWarning, match="gamma = 1"):
        out = tokensift.generate(tiny, ids, "zerotuning:gamma=1", max_new_tokens=NEW, return_logits=True)
    assert out.token_ids == dense.token_ids
    for a, b in zip(out.logits or [], dense.logits or [], strict=True):
        assert torch.equal(a, b)
    assert not out.stats.applied
    assert out.stats.counters.get("biased_layer_forwards", 0) == 0


@pytest.mark.parametrize(
    "spec, table",
    [
        ("zerotuning:gamma=2.5", {0: dict.fromkeys(range(4), 2.5), 1: dict.fromkeys(range(4), 2.5)}),
        ("zerotuning:gamma=0.4,layers=1,heads=0/3", {1: {0: 0.4, 3: 0.4}}),
        ("zerotuning:gamma=0.3:1.7/1.1:0.5", {0: {3: 1.7}, 1: {1: 0.5}}),
    ],
)
def test_bias_equals_official_rescaling(tiny: tokensift.Model, spec: str, table) -> None:
    ids = prompt_ids(PROMPT)
    out = tokensift.generate(tiny, ids, spec, max_new_tokens=NEW, return_logits=True)
    ref = _reference_logits(tiny, ids, table, NEW)
    for a, b in zip(out.logits or [], ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    dense = tokensift.generate(tiny, ids, "dense", max_new_tokens=NEW, return_logits=True)
    assert not torch.allclose(out.logits[0], dense.logits[0])  # type: ignore[index]
    assert out.stats.applied
    # Every forward (prefill + NEW - 1 decode steps) of every biased layer.
    assert out.stats.counters["biased_layer_forwards"] == len(table) * NEW


def test_bias_through_colsum_and_gathered_kernels() -> None:
    """H2O (exact column sums) and Quest (gathered decode) run the same biased attention."""
    model = tiny_model("llama")
    ids = prompt_ids(PROMPT)
    table = {0: dict.fromkeys(range(4), 3.0), 1: dict.fromkeys(range(4), 3.0)}
    ref = _reference_logits(model, ids, table, NEW)
    for other in (f"h2o:budget={PROMPT + NEW}", "quest:budget=4096,page_size=16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoOpWarning)
            out = tokensift.generate(
                model, ids, f"zerotuning:gamma=3+{other}", max_new_tokens=NEW, return_logits=True
            )
        for a, b in zip(out.logits or [], ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert out.stats.counters["biased_layer_forwards"] == 2 * NEW
        assert not any("logit bias" in n for n in out.stats.notes)


def test_bias_follows_the_initial_token_and_reports_its_eviction() -> None:
    model = tiny_model("llama")
    ids = prompt_ids(PROMPT)
    kept = tokensift.generate(
        model, ids, "zerotuning:gamma=2+streaming_llm:budget=16,sinks=4", max_new_tokens=NEW
    )
    assert kept.stats.counters["biased_layer_forwards"] == 2 * NEW
    assert "bias_target_missing_layer_forwards" not in kept.stats.counters
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        dropped = tokensift.generate(
            model, ids, "zerotuning:gamma=2+streaming_llm:budget=16,sinks=0", max_new_tokens=NEW
        )
    # The prefill sees the initial token; after eviction every decode step finds it gone.
    assert dropped.stats.counters["biased_layer_forwards"] == 2
    assert dropped.stats.counters["bias_target_missing_layer_forwards"] == 2 * (NEW - 1)
    assert any("no longer holds a biased token" in n for n in dropped.stats.notes)


def test_spec_round_trip_and_layer_shorthands() -> None:
    method = parse_method("zerotuning:gamma=0.3:1.5/2.1:0.5")
    assert isinstance(method, ZeroTuning)
    assert method.gamma == {0: {3: 1.5}, 2: {1: 0.5}}
    assert parse_method(method.spec()) == method
    assert parse_layers("early", 30) == list(range(10))
    assert parse_layers("0-2/7", 30) == [0, 1, 2, 7]
    table = ZeroTuning(gamma=2.0, layers="early", heads=[1]).table(6, 4)
    assert table == {0: {1: 2.0}, 1: {1: 2.0}}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("zerotuning:gamma=0", "> 0"),
        ("zerotuning:gamma=-1", "> 0"),
        ("zerotuning:gamma=nan", "finite"),
        ("zerotuning:gamma=1:2", "table like"),
        ("zerotuning:layers=first", "all, early"),
        ("zerotuning:heads=x", "all or like"),
        ("zerotuning:gamma=2,profile=default", "either a profile"),
    ],
)
def test_bad_parameters_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(TokensiftError, match=message):
        method = parse_method(spec)
        method.table(2, 4)


def test_out_of_range_heads_fail_at_generation() -> None:
    with pytest.raises(TokensiftError, match="head 9 does not exist"):
        tokensift.generate(
            tiny_model("llama"), prompt_ids(16), "zerotuning:gamma=2,heads=9", max_new_tokens=2
        )


def test_profile_artefact_applies_its_table(tmp_path) -> None:
    from tokensift.calibration import save_artefact

    model = tiny_model("llama")
    path = save_artefact("zerotuning", model, {"table": [[1, 2, 2.0]]}, "test", tmp_path / "zt.json")
    ids = prompt_ids(PROMPT)
    by_profile = tokensift.generate(
        model, ids, f"zerotuning:profile={path}", max_new_tokens=NEW, return_logits=True
    )
    by_table = tokensift.generate(
        model, ids, "zerotuning:gamma=1.2:2.0", max_new_tokens=NEW, return_logits=True
    )
    for a, b in zip(by_profile.logits or [], by_table.logits or [], strict=True):
        assert torch.equal(a, b)
    assert by_profile.stats.counters["biased_layer_forwards"] == NEW
    assert math.isclose(math.log(2.0), 0.6931471805599453)


# -- composition matrix: the bias with every method of another hook ------------------------------------
SPECS = {
    "adaptive": "adaptive(snapkv:budget=40,window_size=8)",
    "decoding": "decoding(h2o:budget=40)",
    "snapkv": "snapkv:budget=40,window_size=8",
    "pyramidkv": "pyramidkv:budget=40,window_size=8",
}
OTHERS = sorted(
    name for name, cls in REGISTRY.items() if cls.hooks and not cls.hooks & {Hook.BIAS, Hook.CONTEXT}
)


@pytest.mark.parametrize("name", OTHERS)
def test_composes_with_every_method(name: str) -> None:
    """Every method that runs alone on the tiny model runs with the bias, and the bias ran: in every
    decode forward at least (prefill kernels of block-sparse methods take no bias, and say so)."""
    model = tiny_model("llama", layers=4)
    ids = prompt_ids(96)
    spec = SPECS.get(name, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOpWarning)
        try:
            alone = tokensift.generate(model, ids, spec, max_new_tokens=NEW, return_logits=True)
        except TokensiftError as exc:
            pytest.skip(f"{name} does not run on the tiny model alone: {exc}")
        both = tokensift.generate(
            model, ids, f"zerotuning:gamma=4+{spec}", max_new_tokens=NEW, return_logits=True
        )
    counters = both.stats.counters
    assert counters["biased_layer_forwards"] > 0
    ran = counters["biased_layer_forwards"] + counters.get("bias_skipped_layer_forwards", 0)
    # A layer forward whose cache lost the initial token in some heads is counted as missing (and as
    # biased too when other heads still hold it).
    missing = counters.get("bias_target_missing_layer_forwards", 0)
    if Hook.LOOP not in REGISTRY[name].hooks:  # loop methods verify several tokens per forward
        assert ran <= 4 * NEW <= ran + missing
    if counters.get("bias_skipped_layer_forwards"):
        assert any("without the bias" in n or "does not take a logit bias" in n for n in both.stats.notes)
    pairs = zip(both.logits or [], alone.logits or [], strict=False)
    assert any(not torch.equal(a, b) for a, b in pairs)  # the bias changed the computation


# -- calibration ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["accuracy", "entropy"])
def test_calibration_profiles_selects_and_sweeps(objective: str) -> None:
    """On a tiny model with a character tokenizer: every profiled head has its effect, the sweep holds
    the unmodified model at gamma 1, and the chosen gamma scores no worse than it on the split."""
    import argparse

    from tokensift.calibration.zerotuning import gamma_grid, run

    from .test_crag import char_model

    model = char_model()
    args = argparse.Namespace(
        task="sentiment", objective=objective, samples=3, layers="0-1", max_heads=2, rate_min=0.5,
        rate_max=2.0, rate_step=0.5, seed=0, batch=5, chat=False,
    )  # fmt: skip
    out = run(model, args)
    assert out["grid"] == gamma_grid(0.5, 2.0, 0.5) == [0.5, 1.0, 1.5, 2.0]
    assert [len(r) for r in out["head_effects"]["2.0"][:2]] == [4, 4]
    assert out["head_effects"]["2.0"][2:] == [None] * (model.num_layers - 2)
    one = next(r for r in out["sweep"] if r["gamma"] == 1.0)
    assert one["objective"] == out["baseline"]["objective"] and one["heads"] == 0
    assert out["calibrated"]["objective"] >= out["baseline"]["objective"]
    chosen = out["up_heads"] if out["gamma"] > 1 else out["down_heads"] if out["gamma"] < 1 else []
    assert out["table"] == [[layer, head, out["gamma"]] for layer, head in chosen]
    assert len(out["up_heads"]) <= 2 and len(out["down_heads"]) <= 2
    # Batched rows give the same scores as one table at a time.
    from tokensift.calibration.zerotuning import Prompts

    prompts = Prompts(model, ["sentiment"], 3, 0, batch=2)
    tables = [{}, {0: {1: 2.0}}, {1: {3: 0.5}}]
    batched = prompts.score(tables, objective)
    for table, expect in zip(tables, batched, strict=True):
        assert prompts.score([table], objective)[0]["entropy"] == pytest.approx(expect["entropy"], abs=1e-5)


def test_calibration_rejects_bad_grids() -> None:
    from tokensift.calibration.zerotuning import gamma_grid

    with pytest.raises(TokensiftError, match="rate_min"):
        gamma_grid(0.0, 2.0, 0.5)
    with pytest.raises(TokensiftError, match="rate_step"):
        gamma_grid(1.0, 2.0, 0.0)
