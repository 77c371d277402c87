"""The dense decode loop against transformers' generate (issue 15, part 3): the benchmark's two paths
give the same greedy tokens on a tiny random model, and the per-step shortcuts of the decode loop
(no byte accounting on a plain append, a scalar position write, hook owners looked up once) keep the
cache's bookkeeping exactly what a full recount gives."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import tokensift
from tokensift.methods.base import Hook
from tokensift.runtime.plan import Plan

from .conftest import prompt_ids, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model_type": "qwen2",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
}


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "decode_vs_generate", ROOT / "benchmarks" / "decode_vs_generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["decode_vs_generate"] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end on a random Qwen2 built from a config file: rows per length, a length beyond the
    context skipped with a note, the same tokens on both paths, ratios from paired repeats."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "r.json"
    argv = ["decode_vs_generate.py", "--random-weights", str(config), "--lengths", "64", "2048"]
    argv += ["--new-tokens", "12", "--repeats", "2", "--warmup-tokens", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.warns(UserWarning, match="repeat"):
        _bench().main()
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["prompt_tokens"] == 64 and row["repeats"] == 2
    assert row["same_tokens"] and row["first_difference"] is None
    assert row["ours_tokens_stable"] and row["generate_tokens_stable"]
    assert row["raw"]["order"] == ["ours-first", "generate-first"]
    assert row["decode_ratio"]["n"] == 2 and row["ours_decode_tps"]["median"] > 0
    assert any("2048 skipped" in note for note in result["notes"])
    assert out.with_suffix(".md").read_text().count("| 64 |") == 1
    # the model is left with tokensift's attention
    model = _bench().build_random(str(config), torch.float32)
    assert model.model.config._attn_implementation == "tokensift"


def _both_paths():  # type: ignore[no-untyped-def]
    """The benchmark module, a tiny Qwen2 with its attention switch (left on ours), a prompt, the CPU."""
    bench = _bench()
    model = tiny_model("qwen2", layers=2)
    switch = bench.Switch(model, "sdpa")
    switch.ours()
    return bench, model, switch, prompt_ids(100), torch.device("cpu")


def test_ours_and_generate_agree_on_tokens() -> None:
    bench, model, switch, ids, cpu = _both_paths()
    ours = bench.run_ours(model, ids, 20, cpu)
    switch.generate()
    theirs = bench.run_generate(model, ids, 20, cpu)
    switch.ours()
    assert len(ours.tokens) == len(theirs.tokens) == 20
    assert ours.tokens == theirs.tokens
    assert ours.prefill_seconds > 0 and ours.decode_seconds > 0 and theirs.decode_seconds > 0
    # EOS is off on both sides: with a generated token made the EOS, both still decode 20 tokens
    # (transformers fills an unset eos_token_id from the model's generation config)
    model.model.generation_config.eos_token_id = ours.tokens[3]
    switch.generate()
    again = bench.run_generate(model, ids, 20, cpu)
    switch.ours()
    assert again.tokens == ours.tokens


def test_shared_prefill_gives_both_paths_the_end_to_end_tokens() -> None:
    """Started from one shared prefill (generate from a DynamicCache copy of all prompt tokens but the
    last), both paths give the tokens of an end-to-end run, repeat after repeat: the copy is fresh
    each time, so a repeat never decodes from the cache an earlier one grew."""
    from tokensift.runtime.shared_prefill import SharedPrefill

    bench, model, switch, ids, cpu = _both_paths()
    plain = bench.run_ours(model, ids, 16, cpu)
    with torch.inference_mode():
        shared = SharedPrefill.run(model, ids)
    for _ in range(2):
        switch.ours()
        ours = bench.run_ours(model, ids, 16, cpu, shared)
        switch.generate()
        theirs = bench.run_generate(model, ids, 16, cpu, shared)
        assert ours.tokens == theirs.tokens == plain.tokens
    switch.ours()
    assert all(k.shape[2] == len(ids) for k in shared.keys)  # the shared prefill itself is untouched


def test_bookkeeping_after_decode_matches_a_recount() -> None:
    """Appends skip the byte accounting unless they reallocate: after a long decode (several
    reallocations) the counted bytes still equal the storage held, and positions are 0..seen-1."""
    model = tiny_model("llama", layers=2)
    out = tokensift.generate(model, prompt_ids(40), "dense", max_new_tokens=121, ignore_eos=True)
    assert out.stats.new_tokens == 121  # 120 fed back: the cache ends at 160 tokens, as below
    cache = tokensift.TokenCache(model.model, "dense")
    with torch.inference_mode():
        model.model(torch.tensor([prompt_ids(40)]), cache=cache, use_cache=True)
        for t in range(120):
            n = cache.next_position
            model.model(
                torch.tensor([[5 + t % 50]]), position_ids=torch.tensor([[n]]), cache=cache, use_cache=True
            )
    held = sum(sum(layer.nbytes()) for layer in cache.layers)
    assert cache.kv_bytes + cache.aux_bytes == held
    assert cache.kv_bytes_peak >= cache.kv_bytes > 0
    for layer in cache.layers:
        assert layer.capacity > layer.n == 160  # reallocated with headroom at least once
        expected = torch.arange(160).expand(1, layer.positions.shape[1], 160)
        assert torch.equal(layer.positions, expected)
    assert out.stats.kv_bytes_final == cache.kv_bytes and out.stats.kv_bytes_peak == cache.kv_bytes_peak


def test_hook_owner_lookup_matches_a_scan() -> None:
    plan = Plan.of("snapkv:budget=0.5+quest:budget=64")
    for hook in Hook:
        scanned = next((m for m in plan.methods if hook in m.hooks), None)
        assert plan.by_hook(hook) is scanned
    assert plan.evict is not None and plan.select is not None and plan.loop is None
    resolved = plan.resolve(100)
    assert resolved.evict is resolved.methods[0] and resolved.select is resolved.methods[1]
