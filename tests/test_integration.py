"""Integration on the real embedded model (SmolLM2-135M-Instruct, loaded offline from its PyPI GGUF)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks import get_task
from tokensift.runtime.plan import Plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol() -> tokensift.Model:
    return tokensift.load("smollm2-135m")


def test_loads_offline_with_checked_hash(smol: tokensift.Model) -> None:
    info = smol.describe()
    assert info["layers"] == 30 and info["kv_heads"] == 3 and info["context_length"] == 8192
    assert smol.sha256 == tokensift.models.EMBEDDED["smollm2-135m"].sha256
    assert tokensift.load("smollm2-135m") is smol  # loaded once per process


def test_coherent_generation(smol: tokensift.Model) -> None:
    out = tokensift.generate(
        smol, "What is the capital of France? Answer in one sentence.", max_new_tokens=24
    )
    assert "Paris" in out.text
    assert out.stats.stop_reason == "eos"


def test_sampling_is_seeded(smol: tokensift.Model) -> None:
    a = tokensift.generate(smol, "Write a word.", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = tokensift.generate(smol, "Write a word.", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids


def test_stop_strings(smol: tokensift.Model) -> None:
    out = tokensift.generate(smol, "Count from 1 to 20, separated by commas.", max_new_tokens=60, stop=["7"])
    assert out.stats.stop_reason == "stop" and "7" not in out.text and "6" in out.text


def test_dense_finds_1k_passkey(smol: tokensift.Model) -> None:
    task = get_task("passkey")
    samples = task.samples(token_counter(smol), 1024, 1, seed=0, depths=[0.1, 0.5, 0.9])
    scores = [task.evaluate(smol, Plan.of("dense"), s)["score"] for s in samples]
    assert scores == [1.0, 1.0, 1.0]


def test_eviction_holds_a_quarter_of_dense(smol: tokensift.Model) -> None:
    task = get_task("passkey")
    sample = task.samples(token_counter(smol), 2048, 1, seed=0, depths=[0.5])[0]
    for spec in ["snapkv:budget=0.25", "h2o:budget=0.25", "streaming_llm:budget=0.25"]:
        row = task.evaluate(smol, Plan.of(spec), sample)
        assert row["applied"]
        assert row["kv_bytes_peak"] <= 0.30 * row["kv_bytes_dense"], spec


def test_perplexity_chunks_equal_one_forward(smol: tokensift.Model) -> None:
    task = get_task("perplexity")
    sample = task.samples(token_counter(smol), 512, 1, seed=1)[0]
    row = task.evaluate(smol, Plan.of("dense"), sample)
    ids = smol.tokenizer(sample.prompt, add_special_tokens=False)["input_ids"][:512]
    with torch.inference_mode():
        logits = smol.model(torch.tensor([ids])).logits[0]
    ref = math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert row["score"] == pytest.approx(ref, rel=1e-4)
    evicted = task.evaluate(smol, Plan.of("streaming_llm:budget=64"), sample)
    assert evicted["score"] != pytest.approx(ref, rel=1e-4)  # eviction really changes what is scored


def test_cli_generate_json() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokensift.cli",
            "generate",
            "--json",
            "--max-new-tokens",
            "8",
            "--method",
            "streaming_llm:budget=16",
            "Say hello.",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["stats"]["params"][0]["budget_tokens"] == 16
    assert data["stats"]["kv_bytes_peak"] < data["stats"]["kv_bytes_dense"]
