"""Chunked prefill with on-the-fly eviction (`prefill_chunk=`, `--prefill-chunk`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tokensift
from tokensift import TokensiftError
from tokensift.bench.config import BenchConfig
from tokensift.bench.results import read_rows
from tokensift.bench.runner import run_bench
from tokensift.cli import main
from tokensift.runtime.cache import TokenCache, _capacity
from tokensift.runtime.generate import Decoding

from .conftest import prompt_ids, tiny_model, tiny_smol_model


def run(model: tokensift.Model, ids: list[int], method: str, chunk: int | None, **kw: Any):
    """A generation plus its cache (as the prefill left it when max_new_tokens is 1)."""
    seen: dict[str, TokenCache] = {}

    def grab(decoding: Decoding, token: int, logits: torch.Tensor | None) -> None:
        seen.setdefault("cache", decoding.cache)

    out = tokensift.generate(model, ids, method, prefill_chunk=chunk, on_token=grab, ignore_eos=True, **kw)
    return out, seen["cache"]


@pytest.fixture(scope="module")
def model() -> tokensift.Model:
    return tiny_model("qwen2", context=1024)


def test_chunk_covering_the_prompt_is_unchunked(model: tokensift.Model) -> None:
    ids = prompt_ids(200)
    plain = tokensift.generate(model, ids, "snapkv:budget=0.25", max_new_tokens=6, return_logits=True)
    for chunk, lookahead in ((200, 0), (500, 16)):
        with pytest.warns(tokensift.NoOpWarning, match=f"prefill_chunk {chunk} covers the whole prompt"):
            out = tokensift.generate(
                model,
                ids,
                "snapkv:budget=0.25",
                max_new_tokens=6,
                return_logits=True,
                prefill_chunk=chunk,
                prefill_lookahead=lookahead,
            )
        assert ("no earlier chunk" in out.stats.notes[0]) == bool(lookahead)
        assert "prefill_lookahead_tokens" not in out.stats.counters
        assert out.token_ids == plain.token_ids
        assert all(torch.equal(a, b) for a, b in zip(out.logits or [], plain.logits or [], strict=True))
        assert out.stats.counters["prefill_chunks"] == 1
        assert out.stats.prefill_chunk == chunk
        assert out.stats.kv_bytes_peak == plain.stats.kv_bytes_peak


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_dense_chunked_matches_unchunked(kind: str) -> None:
    model = tiny_model(kind, context=1024)
    ids = prompt_ids(300)
    plain = tokensift.generate(model, ids, "dense", max_new_tokens=8, return_logits=True, ignore_eos=True)
    out = tokensift.generate(
        model, ids, "dense", max_new_tokens=8, return_logits=True, ignore_eos=True, prefill_chunk=64
    )
    assert out.stats.counters["prefill_chunks"] == 5  # 44 + 4 x 64: the first chunk takes the remainder
    assert out.token_ids == plain.token_ids
    for a, b in zip(out.logits or [], plain.logits or [], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_snapkv_chunked_peak_is_budget_plus_chunk(model: tokensift.Model) -> None:
    ids = prompt_ids(512)
    plain, _ = run(model, ids, "snapkv:budget=0.25", None, max_new_tokens=1)
    out, cache = run(model, ids, "snapkv:budget=0.25", 64, max_new_tokens=1)
    per_token = model.kv_bytes_per_token
    budget = 128  # 0.25 of the whole 512-token prompt, not of a 64-token chunk
    assert out.stats.params[0]["budget_tokens"] == budget
    assert cache.tokens_held == [budget] * cache.num_layers
    assert out.stats.counters["prefill_chunks"] == 8
    assert out.stats.kv_bytes_peak <= _capacity(budget + 64) * per_token
    # Eviction runs layer by layer, so even one-shot holds the whole prompt in one layer only (plus
    # the others compressed); chunking caps that layer at budget + chunk as well.
    layers = cache.num_layers
    per_layer = per_token // layers
    assert out.stats.kv_bytes_peak <= ((layers - 1) * _capacity(budget) + _capacity(budget + 64)) * per_layer
    assert plain.stats.kv_bytes_peak >= ((layers - 1) * budget + 512) * per_layer
    assert plain.stats.kv_bytes_peak - out.stats.kv_bytes_peak >= (512 - _capacity(budget + 64)) * per_layer
    assert out.stats.applied and out.stats.tokens_evicted > 0


def test_kept_keys_sit_at_their_true_positions(model: tokensift.Model) -> None:
    ids = prompt_ids(512)
    _, dense = run(model, ids, "dense", None, max_new_tokens=1)
    _, chunked = run(model, ids, "snapkv:budget=0.25", 64, max_new_tokens=1)
    layer, full = chunked.layers[0], dense.layers[0]
    pos = layer.positions
    assert bool((pos.diff(dim=-1) > 0).all()) and int(pos.max()) == 511
    assert int(pos.min()) < 384  # kept tokens from early chunks, not just the last ones
    # Layer 0's keys depend only on the token and its RoPE position: equal to the dense keys there.
    expect = full.k.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, full.k.shape[-1]))
    torch.testing.assert_close(layer.k, expect, atol=1e-5, rtol=1e-5)
    assert chunked.next_position == 512


@pytest.mark.filterwarnings("ignore:h2o evicted nothing")
def test_h2o_accumulates_across_chunks(model: tokensift.Model) -> None:
    ids = prompt_ids(256)
    # A budget of the whole prompt evicts nothing: the accumulated scores must equal one-shot's.
    _, whole = run(model, ids, "h2o:budget=1.0", None, max_new_tokens=1)
    _, chunked = run(model, ids, "h2o:budget=1.0", 64, max_new_tokens=1)
    for a, b in zip(whole.layers, chunked.layers, strict=True):
        torch.testing.assert_close(b.state("h2o"), a.state("h2o"), atol=1e-4, rtol=1e-4)
    # With eviction, tokens of the first chunk survive on their accumulated attention.
    out, cache = run(model, ids, "h2o:budget=0.25,recent_fraction=0.5", 64, max_new_tokens=1)
    assert out.stats.tokens_evicted > 0
    assert int(cache.layers[0].positions.min()) < 64
    assert bool((cache.layers[0].state("h2o")[..., :32] > 0).all())


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_chunk_is_refused(model: tokensift.Model, bad: Any) -> None:
    with pytest.raises(TokensiftError, match="prefill_chunk must be a positive number"):
        tokensift.generate(model, prompt_ids(50), "snapkv", prefill_chunk=bad)


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_cli_refuses_bad_chunk(command: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = (
        ["generate", "hello", "--prefill-chunk", "0"]
        if command == "generate"
        else [
            "bench",
            "--tasks",
            "passkey",
            "--methods",
            "dense",
            "--lengths",
            "256",
            "--prefill-chunk",
            "-1",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "prefill_chunk must be a positive number" in err and "\n" not in err


def test_bench_chunked_rows(tmp_path: Path) -> None:
    model = tiny_smol_model()
    config = BenchConfig(
        tasks=["passkey"],
        methods=["dense", "snapkv:budget=0.5"],
        lengths=[256],
        samples=1,
        depths=[0.5],
        prefill_chunk=64,
    )
    run_bench(config, tmp_path / "out", progress=False, model=model)
    rows = read_rows(tmp_path / "out" / "results.jsonl")
    assert len(rows) == 2 and all(r["prefill_chunk"] == 64 for r in rows)
    assert all(r["method"].endswith("[prefill-chunk 64]") for r in rows)
    assert all(r["counters"]["prefill_chunks"] >= 4 for r in rows)
    # The same grid unchunked is a different row, not a resumed one.
    run_bench(
        BenchConfig(tasks=["passkey"], methods=["dense"], lengths=[256], samples=1, depths=[0.5]),
        tmp_path / "out",
        progress=False,
        model=model,
    )
    assert len(read_rows(tmp_path / "out" / "results.jsonl")) == 3


def test_perplexity_rows_use_the_bench_chunk(tmp_path: Path) -> None:
    """Perplexity feeds its window in chunks through the method's cache: `--prefill-chunk` sets their
    size (the row says so and resumes as itself); a lookahead, which would pick what a chunk keeps from
    text not yet read, is refused in the row."""
    model = tiny_smol_model()

    def rows(out: str, **kw: Any) -> list[dict[str, Any]]:
        config = BenchConfig(
            tasks=["perplexity"], methods=["dense", "streaming_llm:budget=64"], lengths=[256], samples=1, **kw
        )
        run_bench(config, tmp_path / out, progress=False, model=model)
        return read_rows(tmp_path / out / "results.jsonl")

    own, chunked = rows("own"), rows("chunked", prefill_chunk=32)
    assert [r["counters"]["prefill_chunks"] for r in own] == [1, 1]  # the task's 256 covers the window
    assert [r["counters"]["prefill_chunks"] for r in chunked] == [8, 8]
    assert all(r["prefill_chunk"] == 32 and r["method"].endswith("[prefill-chunk 32]") for r in chunked)
    assert chunked[0]["score"] == pytest.approx(own[0]["score"], rel=1e-4)  # dense: chunking is exact
    assert chunked[1]["score"] != pytest.approx(own[1]["score"], rel=1e-4)  # evicting between chunks
    assert len(rows("chunked", prefill_chunk=32)) == 2  # resumed: nothing new
    (refused, _) = rows("lookahead", prefill_chunk=32, prefill_lookahead=8)
    assert refused["score"] is None and "drop --prefill-lookahead" in refused["error"]


# -- prefill_lookahead: the prompt's tail scores every chunk ---------------------------------------


def prefill(model: tokensift.Model, ids: list[int], method: str, chunk: int, lookahead: int, observer=None):
    """The cache after `prefill_chunked` (the logits it returns and the cache)."""
    from tokensift.runtime.generate import prefill_chunked
    from tokensift.runtime.plan import Plan

    with torch.inference_mode():
        cache = TokenCache(model, Plan.of(method), prompt_tokens=len(ids))
        cache.observer = observer
        logits = prefill_chunked(Decoding(model, cache, 1), ids, chunk, lookahead)
    return logits, cache


def test_lookahead_leaves_no_trace_under_dense(model: tokensift.Model) -> None:
    ids = prompt_ids(300)
    plain = tokensift.generate(model, ids, "dense", max_new_tokens=8, return_logits=True, ignore_eos=True)
    out = tokensift.generate(
        model,
        ids,
        "dense",
        max_new_tokens=8,
        return_logits=True,
        ignore_eos=True,
        prefill_chunk=64,
        prefill_lookahead=16,
    )
    # 5 chunks (44 + 4 x 64); the last one holds the tail itself, so 4 forwards carry it.
    assert out.stats.counters["prefill_chunks"] == 5
    assert out.stats.counters["prefill_lookahead_tokens"] == 4 * 16
    assert out.stats.prefill_lookahead == 16
    assert out.token_ids == plain.token_ids
    for a, b in zip(out.logits or [], plain.logits or [], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert out.stats.tokens_held == plain.stats.tokens_held == 300 + 7


def test_lookahead_tail_sits_at_its_true_positions(model: tokensift.Model) -> None:
    ids = prompt_ids(256)
    _, dense = prefill(model, ids, "dense", 256, 0)
    tails: list[torch.Tensor] = []

    def watch(module, layer, query, keys, values, scale) -> None:
        if layer.index == 0 and query.shape[2] == 64 + 8:
            tails.append(keys[:, :, -8:].clone())

    _, cache = prefill(model, ids, "snapkv:budget=0.25,window_size=8", 64, 8, observer=watch)
    assert len(tails) == 3  # chunks 1-3 of 4 carry the tail; the last is the tail's own chunk
    # Layer 0's keys depend only on the token and its RoPE position: the tail's keys equal the dense
    # keys at the prompt's last 8 positions, in every chunk's forward.
    for keys in tails:
        torch.testing.assert_close(keys, dense.layers[0].k[:, :, 248:256], atol=1e-5, rtol=1e-5)
    for layer in cache.layers:
        pos = layer.positions
        assert bool((pos.diff(dim=-1) > 0).all()) and int(pos.max()) == 255
    assert cache.next_position == 256 and cache.tokens_held == [64] * cache.num_layers


def test_lookahead_changes_what_early_chunks_keep(model: tokensift.Model) -> None:
    ids = prompt_ids(512)
    _, own = prefill(model, ids, "snapkv:budget=0.25,window_size=16", 64, 0)
    _, ahead = prefill(model, ids, "snapkv:budget=0.25,window_size=16", 64, 16)
    # The last chunk's own window scores the final compression in both; what earlier chunks left
    # for it differs because they were scored by another window.
    pairs = zip(own.layers, ahead.layers, strict=True)
    assert any(not torch.equal(a.positions, b.positions) for a, b in pairs)
    assert ahead.counters["prefill_lookahead_tokens"] == 7 * 16


@pytest.mark.parametrize(
    ("chunk", "lookahead", "method", "message"),
    [
        (None, 8, "snapkv", "prefill_lookahead needs prefill_chunk"),
        (64, 65, "snapkv", "prefill_lookahead 65 exceeds prefill_chunk 64"),
        (64, -1, "snapkv", "prefill_lookahead must be a number of tokens >= 0"),
        (64, 8, "streaming_llm:budget=0.25", "re-positions kept keys"),
    ],
)
def test_bad_lookahead_is_refused(model: tokensift.Model, chunk, lookahead, method, message) -> None:
    with pytest.raises(TokensiftError, match=message):
        tokensift.generate(model, prompt_ids(200), method, prefill_chunk=chunk, prefill_lookahead=lookahead)


def test_cli_refuses_lookahead_without_chunk(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hello", "--prefill-lookahead", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "prefill_lookahead needs prefill_chunk" in err and "\n" not in err


def test_bench_lookahead_rows_are_their_own(tmp_path: Path) -> None:
    model = tiny_smol_model()
    grid = dict(tasks=["passkey"], methods=["snapkv:budget=0.5"], lengths=[256], samples=1, depths=[0.5])
    run_bench(BenchConfig(**grid, prefill_chunk=64), tmp_path / "out", progress=False, model=model)
    run_bench(
        BenchConfig(**grid, prefill_chunk=64, prefill_lookahead=32),
        tmp_path / "out",
        progress=False,
        model=model,
    )
    rows = read_rows(tmp_path / "out" / "results.jsonl")
    assert [r["prefill_lookahead"] for r in rows] == [0, 32]
    assert rows[1]["method"].endswith("[prefill-chunk 64, lookahead 32]")
    assert rows[1]["counters"]["prefill_lookahead_tokens"] == 3 * 32
