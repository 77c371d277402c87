"""Batched decoding of a bench cell (`--batch-decode`, on in the leaderboard suites): every plan of a
sample prefills in turn and then decodes in one batch, one forward per step, each over its own cache.
The rows must be the rows the plans give one after another: same tokens, scores and KV bytes."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import prompt_ids
from tokensift.bench.config import BenchConfig
from tokensift.bench.runner import run_bench
from tokensift.bench.suites import get_suite
from tokensift.runtime.batch import run_lockstep
from tokensift.runtime.generate import generate

from .conftest import tiny_smol_model

pytestmark = pytest.mark.timeout(600)

# dense and one-shot plans (one shared prefill), column-sum evictors (another), evictors that go on
# evicting while decoding, a head-ragged cache, sparse decoding, and a loop method, which verifies
# several tokens per forward and so decodes alone.
METHODS = [
    "dense",
    "snapkv:budget=0.5,window_size=8",
    "h2o:budget=0.5",
    "keyformer:budget=0.5",
    "streaming_llm:budget=0.5",
    "tova:budget=0.5",
    "adaptive(snapkv:budget=0.5,window_size=8)",
    "quest:budget=0.5,dense_layers=0",
    "prompt_lookup",
]
SAME = (
    "prediction",
    "score",
    "new_tokens",
    "kv_bytes_peak",
    "kv_bytes_final",
    "tokens_evicted",
    "stop_reason",
)


def test_batched_cell_rows_match_the_plans_run_one_after_another(tmp_path: Path) -> None:
    model = tiny_smol_model()
    config = BenchConfig(
        tasks=["niah_single_1"],
        methods=METHODS,
        lengths=[256],
        samples=1,
        depths=[0.5],
        protocol="both",
    )
    alone = run_bench(config, tmp_path / "alone", progress=False, model=model)
    batched = run_bench(
        dataclasses.replace(config, batch_decode=True), tmp_path / "batched", progress=False, model=model
    )
    key = lambda r: (r["task"], r["protocol"], r["method_spec"])  # noqa: E731
    assert len(alone) == len(batched) == 2 * len(METHODS)
    alone_by = {key(r): r for r in alone}
    decoders = len(METHODS) - 1
    for row in batched:
        a = alone_by[key(row)]
        assert not row.get("error") and not a.get("error"), (row.get("error"), a.get("error"))
        assert {f: row[f] for f in SAME} == {f: a[f] for f in SAME}, key(row)
        if row["method_spec"].startswith("prompt_lookup"):
            assert "decode_batch" not in row
            continue
        batch = row["decode_batch"]
        assert batch["rows"] == decoders
        # every decode step went through the batch, and the first round held every plan
        assert batch["steps"] == row["new_tokens"] - 1 == row["counters"].get("batched_decode_steps", 0)
        assert batch["size_max"] == (decoders if row["new_tokens"] > 1 else 0)
    assert any(r["new_tokens"] > 1 for r in batched)
    cells = {(r["task"], r["protocol"]) for r in batched}
    for cell in cells:  # each batched row carries an equal share of its cell's wall time
        shares = {
            r["wall_seconds"] for r in batched if (r["task"], r["protocol"]) == cell and "decode_batch" in r
        }
        assert len(shares) == 1


def test_leaderboard_suites_batch_their_decodes() -> None:
    assert get_suite("leaderboard").batch_decode and get_suite("leaderboard-sparse").batch_decode
    assert not get_suite("ruler-lite").batch_decode  # its rows report decode speed per plan


def test_lockstep_prefills_one_at_a_time_in_order_and_hands_back_errors() -> None:
    model = tiny_smol_model()
    prompts = [prompt_ids(40 + 10 * i, seed=i) for i in range(4)]
    busy = threading.Lock()
    order: list[int] = []
    overlaps: list[int] = []

    def job(i: int, fail: bool = False):
        def run(step):
            if not busy.acquire(blocking=False):  # another job is prefilling: not one at a time
                overlaps.append(i)
                busy.acquire()
            order.append(i)
            time.sleep(0.02)
            busy.release()
            if fail:
                raise ValueError(f"job {i} refused")
            return generate(
                model, prompts[i], "dense", max_new_tokens=6 + i, ignore_eos=True, decode_step=step
            )

        return run

    results, info = run_lockstep(model, [job(0), job(1), job(2, fail=True), job(3)])
    assert order == [0, 1, 2, 3] and not overlaps
    assert isinstance(results[2], ValueError) and info[2] == (0, 0)
    for i in (0, 1, 3):
        alone = generate(model, prompts[i], "dense", max_new_tokens=6 + i, ignore_eos=True)
        assert results[i].token_ids == alone.token_ids  # type: ignore[union-attr]
        assert info[i] == (3, 5 + i)  # three jobs decoded together; each step of each went batched
