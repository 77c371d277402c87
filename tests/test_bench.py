"""The bench runner resumes, survives a killed run, and its report builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tokensift
from tests.conftest import tiny_smol_model
from tokensift.bench.report import aggregate, write_report
from tokensift.bench.results import read_rows
from tokensift.bench.runner import BenchConfig, run_bench


@pytest.fixture(scope="module")
def small_real_tokenizer_model() -> tokensift.Model:
    """A tiny random Llama over SmolLM2's tokenizer: real prompts, fast forwards."""
    return tiny_smol_model()


def _config() -> BenchConfig:
    return BenchConfig(
        tasks=["passkey", "perplexity"],
        methods=["dense", "streaming_llm:budget=0.5"],
        lengths=[256],
        samples=1,
        depths=[0.25, 0.75],
    )


def test_bench_resumes_and_repairs(tmp_path: Path, small_real_tokenizer_model: tokensift.Model) -> None:
    rows = run_bench(_config(), tmp_path, progress=False, model=small_real_tokenizer_model)
    assert len(rows) == 2 * 2 + 2  # passkey: 2 depths x 2 methods; perplexity: 2 methods
    first = (tmp_path / "results.jsonl").read_text()
    for row in rows:
        assert {
            "prefill_seconds",
            "decode_seconds",
            "kv_bytes_peak",
            "kv_bytes_dense",
            "params",
            "applied",
        } <= set(row)
        assert row["method_spec"].startswith(row["method"].split(":")[0])
    # Rerunning the same grid adds nothing.
    run_bench(_config(), tmp_path, progress=False, model=small_real_tokenizer_model)
    assert (tmp_path / "results.jsonl").read_text() == first
    # A run killed mid-write leaves a truncated line: it is dropped and that row recomputed.
    lines = first.splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    again = run_bench(_config(), tmp_path, progress=False, model=small_real_tokenizer_model)
    assert len(again) == len(rows)
    assert len(read_rows(tmp_path / "results.jsonl")) == len(rows)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert len(meta["runs"]) == 3 and meta["runs"][0]["config"]["seed"] == 0


def _row(method: str, length: int, depth: float, score: float, kv: float) -> dict[str, object]:
    return {
        "model": "m",
        "task": "passkey",
        "metric": "accuracy",
        "method": method,
        "method_spec": method,
        "length": length,
        "depth": depth,
        "index": 0,
        "seed": 0,
        "score": score,
        "kv_bytes_peak": kv,
        "kv_bytes_dense": 100.0,
        "prefill_seconds": 1.0,
        "decode_tokens_per_second": 10.0,
        "applied": True,
        "notes": [],
    }


def test_report_from_fixture(tmp_path: Path) -> None:
    rows = [
        _row(m, n, d, s, kv)
        for m, s, kv in [("dense", 1.0, 100.0), ("snapkv:budget=0.25", 0.5, 27.0)]
        for n in (1024, 2048)
        for d in (0.1, 0.9)
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = write_report(tmp_path).read_text()
    assert "| passkey | snapkv:budget=0.25 | 1k | 2 | 50.0% | 0.270 |" in summary
    assert (tmp_path / "passkey_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "accuracy_vs_kv.png").stat().st_size > 1000
    agg = aggregate(rows)
    assert [a["method"] for a in agg][:2] == ["dense", "dense"]


def test_shared_prefill_and_protocols(tmp_path: Path, small_real_tokenizer_model: tokensift.Model) -> None:
    def config(**kw: object) -> BenchConfig:
        return BenchConfig(
            tasks=["passkey"],
            methods=[
                "dense",
                "snapkv:budget=0.5,window_size=8",
                "streaming_llm:budget=0.5",
                "h2o:budget=0.5",
            ],
            lengths=[256],
            samples=1,
            depths=[0.5],
            **kw,
        )

    shared = run_bench(config(), tmp_path / "shared", progress=False, model=small_real_tokenizer_model)
    own = run_bench(
        config(share_prefill=False), tmp_path / "own", progress=False, model=small_real_tokenizer_model
    )
    for a, b in zip(shared, own, strict=True):
        assert a["prediction"] == b["prediction"] and a["kv_bytes_peak"] == b["kv_bytes_peak"], a["method"]
        assert ("shared_prefill_seconds" in a["counters"]) == (a["method"] != "h2o:budget=0.5")
        assert "shared_prefill_seconds" not in b["counters"]
    agnostic = run_bench(
        config(protocol="query-agnostic"),
        tmp_path / "shared",
        progress=False,
        model=small_real_tokenizer_model,
    )
    new = [r for r in agnostic if r["protocol"] == "query-agnostic"]
    assert len(new) == 4 and all(r["method"].endswith("[query-agnostic]") for r in new)
    assert all(r["counters"]["question_tokens"] > 0 for r in new)


def test_dtype_is_recorded_and_keys_rows(tmp_path: Path, small_real_tokenizer_model: tokensift.Model) -> None:
    """Rows say which dtype ran, and a bf16 run into the same directory does not count fp32 rows as done."""
    config = BenchConfig(tasks=["passkey"], methods=["dense"], lengths=[256], samples=1, depths=[0.5])
    rows = run_bench(config, tmp_path, progress=False, model=small_real_tokenizer_model)
    assert [r["dtype"] for r in rows] == ["float32"]
    tiny = small_real_tokenizer_model
    bf16 = tokensift.wrap(tiny.model.to(torch.bfloat16), tiny.tokenizer, name="tiny-smol")
    try:
        both = run_bench(config, tmp_path, progress=False, model=bf16)
    finally:
        small_real_tokenizer_model.model.to(torch.float32)
    assert sorted(r["dtype"] for r in both) == ["bfloat16", "float32"]
    with pytest.raises(tokensift.TokensiftError, match="dtype"):
        BenchConfig(tasks=["passkey"], methods=["dense"], lengths=[256], dtype="float8").validate()


def test_bench_hands_free_heap_back_after_every_cell(
    tmp_path: Path, small_real_tokenizer_model: tokensift.Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """glibc keeps a finished cell's freed caches in its heap, resident: `run_bench` trims once per
    cell, after the cell's rows are written."""
    from tokensift.bench import runner
    from tokensift.runtime import memory

    rows_at_trim: list[int] = []
    out = tmp_path / "run"
    monkeypatch.setattr(
        memory,
        "trim",
        lambda min_interval=0.5: rows_at_trim.append(len(read_rows(out / "results.jsonl"))) or True,
    )
    rows = runner.run_bench(_config(), out, progress=False, model=small_real_tokenizer_model)
    # cells: passkey at two depths (two methods each), perplexity once: a trim after each cell's rows
    assert rows_at_trim == [2, 4, 6], rows_at_trim
    assert len(rows) == 6


@pytest.mark.parametrize("batch_decode", [False, True])
def test_a_finished_cell_leaves_no_cache_for_the_cyclic_collector(
    tmp_path: Path, small_real_tokenizer_model: tokensift.Model, batch_decode: bool
) -> None:
    """Reference counting alone frees every cache of a finished cell: a cache held in a reference
    cycle lives until Python's next full collection, and a 4k leaderboard run held gigabytes of
    finished caches that way. Shared prefills (exact and column sums), ragged layers (adaptive) and
    batched decoding are all in the cell."""
    import gc

    from tokensift.bench.runner import prepare_run, run_cell
    from tokensift.runtime.cache import TokenCache, TokenLayer

    config = BenchConfig(
        tasks=["niah_single_1"],
        methods=[
            "dense",
            "snapkv:budget=0.5",
            "adaptive(snapkv:budget=0.5)",
            "h2o:budget=0.5",
            "keyformer:budget=0.5",
            "tova:budget=0.5",
            "streaming_llm:budget=0.5",
        ],
        lengths=[256],
        samples=1,
        depths=[0.5],
        batch_decode=batch_decode,
    )
    run = prepare_run(config, tmp_path, small_real_tokenizer_model, progress=False)

    def alive() -> int:
        return sum(isinstance(o, (TokenCache, TokenLayer)) for o in gc.get_objects())

    gc.collect()
    before = alive()
    gc.disable()
    try:
        rows = [row for cell in run.cells for row in run_cell(run.model, config, cell, run.plans)]
        left = alive() - before
    finally:
        gc.enable()
    assert len(rows) == 7 and all(r.get("error") is None for r in rows), rows
    assert any(r["method_resolved"].startswith("adaptive") for r in rows)
    assert left == 0, f"{left} caches or layers wait for the cyclic collector"


def test_trim_returns_freed_heap_pages() -> None:
    """`memory.trim` really shrinks RSS after many freed blocks below the mmap threshold (glibc)."""
    import ctypes

    from tokensift.runtime import memory

    libc = memory._LIBC
    if libc is None:
        pytest.skip("not glibc")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, n = 64 * 1024, 4096  # 256 MiB in blocks under glibc's smallest mmap threshold (128 KiB)
    blocks = [libc.malloc(block) for _ in range(n)]
    for b in blocks:
        ctypes.memset(b, 1, block)
    keep = libc.malloc(block)  # allocated last, at the top of the heap: glibc cannot trim below it
    for b in blocks:
        libc.free(b)
    before = rss()
    assert memory.trim(min_interval=0)
    after = rss()
    libc.free(keep)
    assert before - after > 128 * 1024 * 1024, (before, after)
