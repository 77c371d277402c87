"""benchmarks/decode_bytes.py: values a decode step reads, and the speed-up bound they imply."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tokensift

from .conftest import BENCHMARKS, VOCAB, load_benchmark, tiny_model


def test_counts_untied_head_reads_all_but_the_embedding_table() -> None:
    bench = load_benchmark("decode_bytes")
    model = tiny_model("llama", layers=3)
    c = bench.counts(model)
    total = sum(p.numel() for p in model.model.parameters())
    assert c["parameters"] == total and not c["tied_embeddings"]
    assert c["weights_read_per_step"] == total - VOCAB * 64 + 64
    assert c["kv_values_per_token"] == 3 * 2 * 2 * 16  # layers x K,V x KV heads x head_dim


def test_counts_tied_head_counts_the_table_once() -> None:
    bench = load_benchmark("decode_bytes")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    model = tokensift.wrap(LlamaForCausalLM(config), name="tiny-tied")
    c = bench.counts(model)
    assert c["tied_embeddings"] and c["weights_read_per_step"] == c["parameters"]
    assert c["kv_values_per_token"] == 2 * 2 * 4 * 8


def test_bound_and_what_reaches_the_target() -> None:
    bench = load_benchmark("decode_bytes")
    w, k = 1000.0, 10.0
    assert bench.bound(w, 500, math.inf) == pytest.approx(1.5)
    assert bench.bound(w, 500, 8) < bench.bound(w, 500, math.inf)
    n = bench.needed(w, k, 2.5, 8)
    assert bench.bound(w, k * n, 8) == pytest.approx(2.5)
    assert bench.needed(w, k, 8, 8) == math.inf  # attention 8x faster can never make the step 8x faster
    c = {"weights_read_per_step": w, "kv_values_per_token": k}
    rows = bench.rows(c, [50, 100], 2, 2.5, 8)
    assert [r["kv_values"] for r in rows] == [1000, 2000]
    assert rows[1]["bound_free_attention"] == pytest.approx(3.0)
    assert all(bench.bound(w, r["batch_for_target"] * k * r["length"], 8) >= 2.5 for r in rows)
    assert all(bench.bound(w, (r["batch_for_target"] - 1) * k * r["length"], 8) < 2.5 for r in rows)


def test_measured_splits_a_dense_step_into_attention_and_the_rest() -> None:
    bench = load_benchmark("decode_bytes")
    c = {"weights_read_per_step": 3_000_000, "kv_values_per_token": 100}
    row = {
        "part": "decode",
        "spec": "dense",
        "dtype": "bfloat16",
        "length": 20_000,
        "decode_tps": {"median": 10.0},
        "attention_ms_per_token": {"median": 40.0},
    }
    other = {**row, "spec": "quest:budget=64"}
    (m,) = bench.measured(c, {"rows": [row, other]}, "x.json")
    assert m["step_ms"] == pytest.approx(100) and m["rest_ms"] == pytest.approx(60)
    assert m["weights_gb_per_s"] == pytest.approx(3e6 * 2 / 60 / 1e6)
    assert m["kv_gb_per_s"] == pytest.approx(100 * 20_000 * 2 / 40 / 1e6)
    assert m["bound_free_attention"] == pytest.approx(100 / 60)
    doc = {
        "model": "m",
        "counts": {**c, "parameters": 3e6, "tied_embeddings": 0, "layers": 1, "kv_heads": 1, "head_dim": 50},
        "target": 2.5,
        "attention_speedup": 8.0,
        "rows": bench.rows(c, [1000], 1, 2.5, 8.0),
        "tokens_for_target": None,
        "measured": [m],
    }
    table = bench.render(doc)
    assert "| x.json | bfloat16 | 20000 | 100.0 | 40.0 | 60.0 |" in table and "never" in table


def test_unreadable_measured_file_is_one_line_exit_2(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "decode_bytes.py"), "--measured", str(bad), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--measured" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
