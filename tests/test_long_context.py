"""benchmarks/long_context.py end to end on a tiny random Qwen2 (a smoke run: every part writes its
rows, dense is its own baseline, a spec that cannot run is recorded as skipped, eviction holds less
KV than dense). The real run (qwen2.5-coder-0.5b at 8k-32k) is far too heavy for a test."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

import tokensift.runtime.attention as attention

from .conftest import load_benchmark, tiny_smol_model

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


def test_long_context_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "run_layer", attention.run_layer)  # the benchmark wraps it: restore
    config, out = tmp_path / "tiny.json", tmp_path / "lc.json"
    config.write_text(json.dumps(TINY))
    argv = ["long_context.py", "--random-weights", str(config), "--dtype", "float32", "--lengths", "320"]
    argv += ["--budgets", "96", "--eviction-budgets", "0.5", "--new-tokens", "3", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_benchmark("long_context").main()
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
            load_benchmark("long_context").main()
        docs[shared] = {r["spec"]: r for r in json.loads(out.read_text())["rows"] if "skipped" not in r}
    assert docs[True].keys() == docs[False].keys() and len(docs[True]) == 4
    for spec, row in docs[True].items():
        own = docs[False][spec]
        assert row["prefill_shared"] and not own["prefill_shared"], spec
        for field in ("kv_mib_final", "kv_mib_peak", "tokens_held", "applied"):
            assert row[field] == own[field], (spec, field)
    assert docs[True]["snapkv:budget=0.5"]["kv_final_vs_dense"] < 0.75


def test_prefill_part_scores_each_depth_and_resumes_without_rerunning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--prefill-depths: repeat r prefills the passkey prompt at depth r mod the depths and scores its
    answer for every spec; --resume keeps the timed runs already in the file and runs only the rest."""
    import argparse

    import torch

    lc = load_benchmark("long_context")
    model = tiny_smol_model(context=4096)
    clock = lc.Clock(torch.device("cpu"))
    monkeypatch.setattr(attention, "run_layer", clock)
    out = tmp_path / "pre.json"
    ids = lc.prompt_ids(model, 600, 20)
    base_row = {"dtype": "float32", "length": len(ids), "device": "cpu", "model": model.name}

    def run(repeats: int, resume: bool) -> dict:
        args = argparse.Namespace(
            prefill_methods=["a_shape"],
            prefill_tail=16,
            prefill_depths=[0.2, 0.8],
            new_tokens=12,
            repeats=repeats,
        )
        results = lc.Results(out, {"setup": "test"}, resume=resume)
        lc.prefill_part(model, ids, 600, args, clock, {}, base_row, results)
        return json.loads(out.read_text())

    first = run(2, resume=False)
    assert [(r["spec"].split(":")[0], r["repeat"]) for r in first["runs"]] == [
        ("dense", 0),
        ("a_shape", 0),
        ("a_shape", 1),
        ("dense", 1),  # rotated order
    ]
    row = next(r for r in first["rows"] if r["spec"] == "a_shape:dense_tail=16")
    assert row["depths"] == [0.2, 0.8] and len(row["scores"]) == 2
    assert all(s in (0.0, 1.0) for s in row["scores"])
    assert all(r["answer"] and "prediction" in r for r in first["runs"])
    assert lc.found(row) == f"{sum(row['scores']):.0f}/2"
    # A killed run keeps its runs: resuming with one more repeat reruns nothing already timed.
    again = run(3, resume=True)
    assert again["runs"][:4] == first["runs"] and len(again["runs"]) == 6
    assert {r["depth"] for r in again["runs"][4:]} == {0.2}
    row = next(r for r in again["rows"] if r["spec"] == "a_shape:dense_tail=16")
    assert row["prefill_runs"][:2] == [r["prefill"] for r in first["runs"] if r["spec"].startswith("a_shape")]
    assert row["depths"] == [0.2, 0.8, 0.2]


@pytest.mark.parametrize(
    "extra",
    [["--prefill-depths", "1.5"], ["--prefill-tail", "-1"], ["--resume"], ["--new-tokens", "1"]],
)
def test_bad_arguments_exit_2_with_one_line(
    extra: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["long_context.py", "--repeats", "5", *extra])
    with pytest.raises(SystemExit) as stop:
        load_benchmark("long_context").main()
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert extra[0] in err


def test_resume_from_a_corrupt_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lc.json"
    out.write_text('{"rows": [')  # a half-written file
    with pytest.raises(SystemExit) as stop:
        load_benchmark("long_context").Results(out, {"setup": "test"}, resume=True)
    assert stop.value.code == 2 and "rerun without --resume" in capsys.readouterr().err
    assert out.read_text() == '{"rows": ['  # left as it was


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"vocab_size": 8}'])
def test_random_weights_config_that_is_not_one_exits_2(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text(text)
    out = tmp_path / "lc.json"
    argv = ["long_context.py", "--random-weights", str(config), "--dtype", "float32", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        load_benchmark("long_context").main()
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith("error: --random-weights") and "config.json" in err[-1]
    assert not out.exists()  # refused before anything is written
