"""Batched decoding (issue 13, part 5): requests that share a plan decode in one forward per step.

Runtime level: generations on their own threads meet in `DecodeBatcher` rounds and must produce
the same greedy tokens and KV bytes as alone, for dense, eviction, sparse-decode, re-positioning and
head-adaptive plans, members leaving mid-batch. Server level: concurrent requests are batched
(reported in `tokensift`), answers match the same requests run alone, streaming works inside a batch,
a request that stops early releases its reservation while the others still run.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

import tokensift
from tests.conftest import prompt_ids
from tokensift.errors import TokensiftError
from tokensift.runtime.batch import DecodeBatcher
from tokensift.runtime.generate import Generation, generate

pytestmark = pytest.mark.timeout(300)

SPECS = [
    "dense",
    "snapkv:budget=40,window_size=8",
    "h2o:budget=0.5",
    "tova:budget=24",
    "quest:budget=48,dense_layers=0",
    "streaming_llm:budget=32",
    "adaptive(snapkv:budget=40,window_size=8)",
]


def run_batched(
    model: tokensift.Model, prompts: list[list[int]], spec: str, max_new: list[int], max_batch: int = 8
) -> tuple[list[Generation], list[tuple[int, int]], DecodeBatcher]:
    batcher = DecodeBatcher(model, max_batch)
    out: list[Generation | None] = [None] * len(prompts)
    info: list[tuple[int, int]] = [(0, 0)] * len(prompts)
    errors: list[BaseException] = []
    start = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        try:
            if i < max_batch:  # the first rows join before any prefill ends: no timing race
                batcher.join(i)
            start.wait()
            out[i] = generate(
                model,
                prompts[i],
                spec,
                max_new_tokens=max_new[i],
                ignore_eos=True,
                decode_step=lambda d, t: batcher.step(i, d.cache, t),
            )
        except BaseException as exc:
            errors.append(exc)
        finally:
            info[i] = batcher.leave(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert all(o is not None for o in out)
    return out, info, batcher  # type: ignore[return-value]


@pytest.mark.parametrize("spec", SPECS)
def test_batched_decode_matches_each_request_alone(tiny: tokensift.Model, spec: str) -> None:
    prompts = [prompt_ids(n, seed=i) for i, n in enumerate((60, 70, 45, 90))]
    max_new = [20, 6, 30, 14]  # the short ones leave the batch while the others go on
    alone = [
        generate(tiny, p, spec, max_new_tokens=k, ignore_eos=True)
        for p, k in zip(prompts, max_new, strict=True)
    ]
    batched, info, batcher = run_batched(tiny, prompts, spec, max_new)
    for a, b in zip(alone, batched, strict=True):
        assert b.token_ids == a.token_ids
        assert b.stats.kv_bytes_peak == a.stats.kv_bytes_peak
        assert b.stats.tokens_evicted == a.stats.tokens_evicted
        assert b.stats.new_tokens == a.stats.new_tokens
    # every decode step of every request ran through the batcher, 4 rows at first
    assert [steps for _, steps in info] == [k - 1 for k in max_new]
    assert [b.stats.counters["batched_decode_steps"] for b in batched] == [k - 1 for k in max_new]
    assert max(size for size, _ in info) == 4
    # one forward per round: the longest request's steps, not the sum of all
    assert max(max_new) - 1 <= batcher.forwards < sum(k - 1 for k in max_new)
    assert batcher.size == 0


def test_max_batch_caps_the_rows_per_forward(tiny: tokensift.Model) -> None:
    prompts = [prompt_ids(30 + 5 * i, seed=i) for i in range(5)]
    _, info, _ = run_batched(tiny, prompts, "dense", [12] * 5, max_batch=2)
    assert max(size for size, _ in info) == 2


def test_generate_refuses_a_decode_step_with_a_loop_method(tiny: tokensift.Model) -> None:
    batcher = DecodeBatcher(tiny, 4)
    with pytest.raises(TokensiftError, match="several tokens per forward"):
        generate(
            tiny,
            prompt_ids(40),
            "prompt_lookup",
            max_new_tokens=4,
            decode_step=lambda d, t: batcher.step(0, d.cache, t),
        )


# -- through the server ------------------------------------------------------------------------------

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tests.conftest import tiny_smol_model  # noqa: E402
from tests.test_serve import NO_REPETITION, serving, wait_idle  # noqa: E402

PROMPTS = ["Tell a story about a cat", "The weather today", "List some numbers: 1, 2,", "Once upon a time"]


@pytest.fixture(scope="module")
def smol() -> tokensift.Model:
    return tiny_smol_model()


def body(i: int, max_tokens: int, method: str, stream: bool = False) -> dict:
    return {
        "prompt": PROMPTS[i],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "repetition_detection": NO_REPETITION,
        "tokensift": {"method": method},
    }


async def post(ac: httpx.AsyncClient, base: str, payload: dict) -> dict:
    """The response body; for a stream, its text joined and the final chunk's tokensift block."""
    if not payload["stream"]:
        r = await ac.post(f"{base}/v1/completions", json=payload)
        assert r.status_code == 200, r.text
        return r.json()
    text, final = "", None
    async with ac.stream("POST", f"{base}/v1/completions", json=payload) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0]
            text += choice["text"]
            if choice["finish_reason"] is not None:
                final = chunk
    assert final is not None
    return {"choices": [{**final["choices"][0], "text": text}], "tokensift": final["tokensift"]}


@pytest.mark.parametrize("method", ["dense", "snapkv:budget=8,window_size=4"])
def test_server_batches_concurrent_requests_like_alone(smol: tokensift.Model, method: str) -> None:
    lengths = [120, 12, 120, 60]  # request 1 leaves the batch early
    with serving(smol, eos_guard=False, max_new_tokens_cap=256) as base:

        async def scenario() -> tuple[list[dict], list[dict], dict, list[int]]:
            async with httpx.AsyncClient(timeout=120) as ac:
                alone = [await post(ac, base, body(i, n, method)) for i, n in enumerate(lengths)]
                health_after_short: dict = {}

                async def short() -> dict:
                    out = await post(ac, base, body(1, lengths[1], method))
                    health_after_short.update((await ac.get(f"{base}/health")).json())
                    return out

                together = await asyncio.gather(
                    post(ac, base, body(0, lengths[0], method)),
                    short(),
                    post(ac, base, body(2, lengths[2], method, stream=True)),
                    post(ac, base, body(3, lengths[3], method)),
                )
                reserved = [r["tokensift"]["kv_reserved_bytes"] for r in together]
                return alone, list(together), health_after_short, reserved

        alone, together, health, reserved = asyncio.run(scenario())
        for a, b in zip(alone, together, strict=True):
            assert b["choices"][0]["text"] == a["choices"][0]["text"]
            assert b["tokensift"]["stats"]["new_tokens"] == a["tokensift"]["stats"]["new_tokens"]
            assert b["tokensift"]["stats"]["kv_bytes_peak"] == a["tokensift"]["stats"]["kv_bytes_peak"]
            assert a["tokensift"]["batched"] and a["tokensift"]["batch_size_max"] == 1
            assert b["tokensift"]["batched"] and b["tokensift"]["unbatched_reason"] is None
        assert max(b["tokensift"]["batch_size_max"] for b in together) >= 2
        assert together[2]["tokensift"]["batch_size_max"] >= 2  # the stream decoded inside the batch
        # the short request released its reservation when it left; the long ones still held theirs
        assert health["running"] >= 1
        assert health["kv_pool"]["reserved_bytes"] <= sum(reserved) - reserved[1]
        wait_idle(base)


def test_server_max_batch_1_and_loop_methods_decode_alone(smol: tokensift.Model) -> None:
    with serving(smol, eos_guard=False, max_batch=1) as base:
        r = httpx.post(f"{base}/v1/completions", json=body(0, 8, "dense"), timeout=60).json()
        assert not r["tokensift"]["batched"] and "max-batch 1" in r["tokensift"]["unbatched_reason"]
        assert r["tokensift"]["batch_size_max"] == 1
        wait_idle(base)
    with serving(smol, eos_guard=False) as base:
        r = httpx.post(f"{base}/v1/completions", json=body(0, 8, "prompt_lookup"), timeout=60).json()
        assert not r["tokensift"]["batched"] and "loop method" in r["tokensift"]["unbatched_reason"]
        wait_idle(base)


def test_batchers_share_one_batcher_per_plan_and_forget_it_when_idle(tiny: tokensift.Model) -> None:
    from tokensift.runtime.plan import Plan
    from tokensift.serve.engine import Batchers

    batchers = Batchers(max_batch=4)
    dense, snap = Plan.of("dense"), Plan.of("snapkv:budget=0.25")
    a, _ = batchers.acquire(dense, tiny)
    b, _ = batchers.acquire(dense, tiny)
    c, _ = batchers.acquire(snap, tiny)
    assert a is b and a is not c
    batchers.release(dense)
    assert batchers.active["dense"] == (a, 1)
    batchers.release(dense)
    batchers.release(snap)
    assert batchers.active == {}
    loop, reason = batchers.acquire(Plan.of("prompt_lookup"), tiny)
    assert loop is None and reason and "loop method" in reason
    off, reason = Batchers(max_batch=1).acquire(dense, tiny)
    assert off is None and reason and "--max-batch 1" in reason
