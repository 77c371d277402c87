"""benchmarks/long_context.py end to end on a tiny random Qwen2 (a smoke run: every part writes its
rows, dense is its own baseline, a spec that cannot run is recorded as skipped, eviction holds less
KV than dense). The real run (qwen2.5-coder-0.5b at 8k-32k) is far too heavy for a test."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest

import tokensift.runtime.attention as attention

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model_type": "qwen2",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
}


def _module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("long_context", ROOT / "benchmarks" / "long_context.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_long_context_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "run_layer", attention.run_layer)  # the benchmark wraps it: restore
    config, out = tmp_path / "tiny.json", tmp_path / "lc.json"
    config.write_text(json.dumps(TINY))
    argv = ["long_context.py", "--random-weights", str(config), "--dtype", "float32", "--lengths", "320"]
    argv += ["--budgets", "96", "--eviction-budgets", "0.5", "--new-tokens", "3", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _module().main()
    doc = json.loads(out.read_text())
    assert "random weights" in doc["note"]
    rows = doc["rows"]
    ran = {(r["part"], r["spec"].split(":")[0]) for r in rows if "skipped" not in r}
    for method in ("dense", "quest", "tokenselect", "tidaldecode"):
        assert ("decode", method) in ran, method
    for method in ("dense", "a_shape", "minference", "dhsa"):
        assert ("prefill", method) in ran, method
    assert {("eviction", "dense"), ("eviction", "snapkv"), ("eviction", "adaptive(snapkv")} <= ran
    skipped = {r["spec"].split(":")[0]: r["skipped"] for r in rows if "skipped" in r}
    assert "compresskv" in skipped and "calibration" in skipped["compresskv"]  # tiny: no shipped file
    dense = next(r for r in rows if r["part"] == "decode" and r["spec"] == "dense")
    assert dense["decode_vs_dense"]["median"] == 1.0 and dense["same_tokens_as_dense"]
    snap = next(r for r in rows if r["part"] == "eviction" and r["spec"].startswith("snapkv"))
    assert snap["applied"] and snap["kv_final_vs_dense"] < 0.75
    assert all(r["length"] == 320 for r in rows)


def test_shared_prefill_eviction_rows_hold_what_their_own_prefill_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attention, "run_layer", attention.run_layer)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    docs = {}
    for shared in (False, True):
        out = tmp_path / f"ev_{shared}.json"
        argv = ["long_context.py", "--random-weights", str(config), "--dtype", "float32", "--lengths", "320"]
        argv += ["--parts", "eviction", "--eviction-methods", "snapkv", "adaptive(snapkv)", "streaming_llm"]
        argv += ["--eviction-budgets", "0.5", "--new-tokens", "4", "--repeats", "1", "--out", str(out)]
        monkeypatch.setattr(sys, "argv", argv + (["--share-prefill"] if shared else []))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _module().main()
        docs[shared] = {r["spec"]: r for r in json.loads(out.read_text())["rows"] if "skipped" not in r}
    assert docs[True].keys() == docs[False].keys() and len(docs[True]) == 4
    for spec, row in docs[True].items():
        own = docs[False][spec]
        assert row["prefill_shared"] and not own["prefill_shared"], spec
        for field in ("kv_mib_final", "kv_mib_peak", "tokens_held", "applied"):
            assert row[field] == own[field], (spec, field)
    assert docs[True]["snapkv:budget=0.5"]["kv_final_vs_dense"] < 0.75
