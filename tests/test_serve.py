"""`tokensift serve` on tiny random models: a real uvicorn server on a free loopback port per test
group, the official openai client, malformed requests, the KV pool, guards and disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
import uvicorn  # noqa: E402

import tokensift  # noqa: E402
from tests.conftest import tiny_model, tiny_smol_model  # noqa: E402
from tokensift.errors import TokensiftError  # noqa: E402
from tokensift.runtime.generate import eos_ids  # noqa: E402
from tokensift.runtime.plan import Plan  # noqa: E402
from tokensift.serve import config_from_args, require_extra  # noqa: E402
from tokensift.serve.app import create_app  # noqa: E402
from tokensift.serve.config import ServeConfig  # noqa: E402
from tokensift.serve.engine import KVPool, reservation_bytes  # noqa: E402
from tokensift.serve.guards import EosGuard, RepetitionGuard  # noqa: E402

pytestmark = pytest.mark.timeout(300)
LONG = " ".join(f"word{i % 50}" for i in range(400))  # 1120 tokens of text
NO_REPETITION = {"min_pattern_size": 1024, "max_pattern_size": 1024, "min_count": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(model: tokensift.Model, **options: object) -> Iterator[str]:
    """A uvicorn server for `create_app` on a free loopback port, stopped on exit. Allocator tuning is
    off unless asked for: mallopt settings are process-wide and would outlive the server."""
    options.setdefault("malloc_tuning", "off")
    config = ServeConfig(model="tiny-smol", host="127.0.0.1", port=free_port(), **options)  # type: ignore[arg-type]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, model=model), host="127.0.0.1", port=config.port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_idle(base: str, timeout: float = 30) -> dict:
    """/health once nothing runs, waits or holds KV (fails if that never happens)."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{base}/health").json()
        pool = health["kv_pool"]
        if health["running"] == health["waiting"] == pool["reserved_bytes"] == pool["held_bytes"] == 0:
            return health
        assert time.monotonic() < deadline, f"pool never drained: {health}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def smol() -> tokensift.Model:
    return tiny_smol_model()


@pytest.fixture(scope="module")
def server(smol: tokensift.Model) -> Iterator[str]:
    with serving(smol, kv_pool_mib=64, max_new_tokens_cap=256, max_body_bytes=200_000) as base:
        yield base


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_plain_streamed_and_chat(server: str) -> None:
    c = client(server)
    models = c.models.list()
    assert [m.id for m in models.data] == ["tiny-smol"]

    plain = c.completions.create(
        model="tiny-smol", prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert plain.object == "text_completion" and plain.choices[0].finish_reason in ("length", "stop")
    assert plain.usage.completion_tokens == 6 and plain.usage.prompt_tokens > 0
    assert plain.choices[0].text
    again = c.completions.create(
        model="tiny-smol", prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert again.choices[0].text == plain.choices[0].text  # greedy is deterministic

    chunks = list(
        c.chat.completions.create(
            model="tiny-smol",
            messages=[{"role": "user", "content": "Say hello"}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].usage.completion_tokens == 8
    assert chunks[0].choices[0].delta.role == "assistant"

    chat = c.chat.completions.create(
        model="tiny-smol", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, temperature=0
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == text  # the stream carried the same text, deltas joined
    extension = chat.model_extra["tokensift"]
    assert extension["method"] == "dense" and extension["replica"] and extension["stats"]["new_tokens"] == 8

    streamed = c.completions.create(
        model="tiny-smol", prompt="Once upon", max_tokens=5, temperature=0, stream=True
    )
    assert sum(1 for ch in streamed if ch.choices and ch.choices[0].text) >= 1


def test_raw_stream_ends_with_done(server: str) -> None:
    body = {"prompt": "Hello", "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["tokensift"]["stats"]["new_tokens"] == 4


def test_per_request_methods_change_stats(server: str) -> None:
    c = client(server)

    def run(method: str | None) -> dict:
        extra = {} if method is None else {"tokensift": {"method": method}}
        out = c.completions.create(
            model="tiny-smol", prompt=LONG, max_tokens=4, temperature=0, extra_body=extra
        )
        return out.model_extra["tokensift"]

    dense, snap, h2o = run(None), run("snapkv:budget=0.25"), run("streaming_llm:budget=64")
    assert dense["method"] == "dense" and dense["stats"]["tokens_evicted"] == 0
    assert snap["method"].startswith("snapkv") and snap["params"][0]["budget_tokens"] > 0
    assert snap["stats"]["tokens_evicted"] > 0 and h2o["stats"]["tokens_evicted"] > 0
    assert snap["stats"]["kv_bytes_final"] < 0.5 * dense["stats"]["kv_bytes_final"]
    # Two layers: while one layer compresses it still holds the whole prompt, so peak and reservation
    # shrink less than the final cache (on a 30-layer model that transient is 1/30 of the prompt).
    assert snap["kv_reserved_bytes"] < 0.8 * dense["kv_reserved_bytes"]
    for ext in (dense, snap, h2o):  # every reservation covered what the cache really held
        assert ext["stats"]["kv_bytes_peak"] <= ext["kv_reserved_bytes"]
    q = c.completions.create(
        model="tiny-smol",
        prompt=LONG,
        max_tokens=3,
        extra_body={"tokensift": {"method": "snapkv:budget=0.25", "question": "Which word came first?"}},
    ).model_extra["tokensift"]
    assert q["stats"]["counters"]["question_tokens"] > 0
    wait_idle(server)


MALFORMED: list[tuple[str, object]] = [
    ("not json", b"{not json"),
    ("json array", [1, 2]),
    ("missing prompt", {"max_tokens": 3}),
    ("max_tokens string", {"prompt": "x", "max_tokens": "5"}),
    ("max_tokens zero", {"prompt": "x", "max_tokens": 0}),
    ("max_tokens over cap", {"prompt": "x", "max_tokens": 100_000}),
    ("n > 1", {"prompt": "x", "n": 2}),
    ("best_of", {"prompt": "x", "best_of": 3}),
    ("logprobs", {"prompt": "x", "logprobs": 5}),
    ("unknown field", {"prompt": "x", "max_token": 5}),
    ("temperature string", {"prompt": "x", "temperature": "hot"}),
    ("temperature range", {"prompt": "x", "temperature": 7}),
    ("top_p zero", {"prompt": "x", "top_p": 0}),
    ("too many stops", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
    ("empty stop", {"prompt": "x", "stop": [""]}),
    ("stream not bool", {"prompt": "x", "stream": "yes"}),
    ("seed string", {"prompt": "x", "seed": "1"}),
    ("prompt int", {"prompt": 3}),
    ("two prompts", {"prompt": ["a", "b"]}),
    ("token id out of vocab", {"prompt": [1, 2, 10**9]}),
    ("empty prompt", {"prompt": ""}),
    ("unknown method", {"prompt": "x", "tokensift": {"method": "nope"}}),
    ("malformed method", {"prompt": "x", "tokensift": {"method": "snapkv:budget="}}),
    ("bad budget", {"prompt": "x", "tokensift": {"method": "snapkv:budget=1.5"}}),
    ("same hook twice", {"prompt": "x", "tokensift": {"method": "snapkv+h2o"}}),
    ("tokensift unknown key", {"prompt": "x", "tokensift": {"methd": "dense"}}),
    ("tokensift not object", {"prompt": "x", "tokensift": "snapkv"}),
    ("empty question", {"prompt": "x", "tokensift": {"question": " "}}),
    ("repetition min_count 1", {"prompt": "x", "repetition_detection": {"min_count": 1}}),
    (
        "repetition sizes",
        {"prompt": "x", "repetition_detection": {"min_pattern_size": 9, "max_pattern_size": 3}},
    ),
    ("penalty", {"prompt": "x", "presence_penalty": 1.0}),
    ("echo", {"prompt": "x", "echo": True}),
    ("wrong model", {"prompt": "x", "model": "gpt-4"}),
    ("context overflow", {"prompt": [5] * 1900, "max_tokens": 200}),
    ("body too big", {"prompt": "x" * 300_000}),
    ("seed too big", {"prompt": "x", "seed": 10**30}),
    ("NaN constant", b'{"prompt": "x", "temperature": NaN}'),
    ("nested too deeply", b"[" * 100_000),
    ("lone surrogate", b'{"prompt": "\\ud800"}'),
    ("stop too long", {"prompt": "x", "stop": ["a" * 5000]}),
    ("snapkv budget under its window", {"prompt": "x " * 200, "tokensift": {"method": "snapkv:budget=1"}}),
    ("sparse with exact scores", {"prompt": "x", "tokensift": {"method": "h2o+quest"}}),
]
MALFORMED_CHAT: list[tuple[str, object]] = [
    ("no messages", {"messages": []}),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}),
    ("content int", {"messages": [{"role": "user", "content": 5}]}),
    ("tools", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
    ("logprobs", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 3}),
    ("assistant last", {"messages": [{"role": "assistant", "content": "hi"}]}),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}),
    (
        "both caps differ",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "max_completion_tokens": 4},
    ),
]


@pytest.mark.parametrize(
    ("path", "name", "body"),
    [("/v1/completions", n, b) for n, b in MALFORMED]
    + [("/v1/chat/completions", n, b) for n, b in MALFORMED_CHAT],
    ids=[n for n, _ in MALFORMED] + [f"chat-{n}" for n, _ in MALFORMED_CHAT],
)
def test_malformed_requests_get_4xx_with_a_reason(server: str, path: str, name: str, body: object) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + path, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert message and "\n" not in message


def test_pool_is_empty_after_the_malformed_and_method_runs(server: str) -> None:
    body = {"prompt": LONG, "max_tokens": 2, "tokensift": {"method": "snapkv:budget=0.25"}}
    assert httpx.post(f"{server}/v1/completions", json=body, timeout=60).status_code == 200
    health = wait_idle(server)
    assert health["status"] == "ok"
    metrics = httpx.get(f"{server}/metrics").text
    assert 'tokensift:time_to_first_token_seconds_bucket{le="2560.0"' in metrics
    assert 'tokensift:e2e_request_latency_seconds_bucket{le="7680.0"' in metrics
    assert "tokensift:kv_cache_usage_perc" in metrics and "tokensift:num_requests_waiting" in metrics
    assert 'tokensift:requests_by_method_total{method="snapkv"' in metrics
    assert (
        'tokensift:requests_rejected_total{model_name="tiny-smol",reason="invalid",status="400"}' in metrics
    )
    assert "tokensift:kv_reservation_exceeded_total" in metrics


def test_allow_list_and_never_fits(smol: tokensift.Model) -> None:
    with serving(smol, allow_methods=["snapkv", "streaming_llm"], kv_pool_mib=0.16) as base:
        refused = httpx.post(f"{base}/v1/completions", json={"prompt": LONG, "tokensift": {"method": "h2o"}})
        assert refused.status_code == 400 and "not allowed" in refused.json()["error"]["message"]
        # ~800 dense tokens x 256 bytes per token = 0.2 MiB > 0.16 MiB: never fits dense, fits compressed.
        never = httpx.post(f"{base}/v1/completions", json={"prompt": LONG, "max_tokens": 4})
        assert never.status_code == 400
        assert (
            "MiB of KV cache" in never.json()["error"]["message"]
            and "0.16 MiB" in never.json()["error"]["message"]
        )
        ok = httpx.post(
            f"{base}/v1/completions",
            json={"prompt": LONG, "max_tokens": 4, "tokensift": {"method": "streaming_llm:budget=64"}},
            timeout=60,
        )
        assert ok.status_code == 200, ok.text
        wait_idle(base)


def test_full_queue_answers_429_with_retry_after(smol: tokensift.Model) -> None:
    with serving(smol, max_running=1, max_queue=1, eos_guard=False) as base:
        body = {"prompt": "Tell a story", "max_tokens": 120, "repetition_detection": NO_REPETITION}

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as ac:
                return await asyncio.gather(*[ac.post(f"{base}/v1/completions", json=body) for _ in range(5)])

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}, codes
        busy = next(r for r in responses if r.status_code == 429)
        assert int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["error"]["message"]
        wait_idle(base)


def test_timeout_ends_with_length_and_frees_kv(smol: tokensift.Model) -> None:
    # 2000 tokens take the tiny model several seconds even on a quiet machine (it wrote 256 within
    # the old 0.6 s once nothing else ran), so the 0.3 s deadline, not the cap, ends the request.
    with serving(smol, request_timeout=0.3, eos_guard=False, max_new_tokens_cap=2000) as base:
        r = httpx.post(
            f"{base}/v1/completions",
            json={"prompt": "Go on", "max_tokens": 2000, "repetition_detection": NO_REPETITION},
            timeout=60,
        ).json()
        assert r["choices"][0]["finish_reason"] == "length" and r["tokensift"]["stop"] == "timeout"
        assert r["choices"][0]["stop_reason"] == "timeout" and r["usage"]["completion_tokens"] < 2000
        wait_idle(base)


def test_repetition_detection_stops_a_loop(server: str) -> None:
    # Greedy on a random model falls into a cycle quickly; the guard must end it, not the cap.
    r = httpx.post(
        f"{server}/v1/completions",
        json={
            "prompt": "a b a b a b",
            "max_tokens": 256,
            "temperature": 0,
            "repetition_detection": {"min_pattern_size": 1, "max_pattern_size": 32, "min_count": 3},
        },
        timeout=60,
    ).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["stop_reason"] == "repetition_detected" and r["usage"]["completion_tokens"] < 256
    metrics = httpx.get(f"{server}/metrics").text
    assert 'tokensift:guard_stops_total{guard="repetition_detected"' in metrics


def test_repetition_guard_unit() -> None:
    guard = RepetitionGuard(min_pattern_size=2, max_pattern_size=4, min_count=3)
    assert guard.check([9, 1, 2, 3, 1, 2, 3, 1, 2, 3])
    assert not guard.check([9, 1, 2, 3, 1, 2, 3, 1, 2, 4])
    assert not guard.check([5, 5, 5, 5])  # needs 3 copies of a 2-token block: 6 tokens
    assert guard.check([5, 5, 5, 5, 5, 5])
    assert not RepetitionGuard(2, 4, 3).check([1, 2, 1, 2, 1])


def suppressed_eos_model(scale: float, favourite: int | None = None) -> tokensift.Model:
    """The tiny model with its EOS logits pinned at -1e4 (it never ends) and its head scaled by `scale`
    (large: confident, low-entropy output; 1: near-uniform, high-entropy output); with `favourite`,
    that token's logit is raised by 1e4 so the output repeats it (a degenerate loop)."""
    model = tiny_smol_model(seed=3)
    old = model.model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight * scale)
        head.bias.zero_()
        head.bias[sorted(eos_ids(model))] = -1e4
        if favourite is not None:
            head.bias[favourite] = 1e4
    model.model.lm_head = head
    return model


def test_eos_guard_default_stops_a_repetitive_eos_suppressing_model() -> None:
    """Default criteria (the low-entropy one off): suppressed EOS plus a repetitive window stops it."""
    assert ServeConfig().eos_guard_entropy == 0
    body = {"prompt": "Write", "max_tokens": 200, "temperature": 0, "repetition_detection": NO_REPETITION}
    with serving(
        suppressed_eos_model(scale=1.0, favourite=7), eos_guard_after=24, eos_guard_window=16
    ) as base:
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        assert r["choices"][0]["stop_reason"] == "eos_suppressed", r["tokensift"]
        assert 24 <= r["usage"]["completion_tokens"] < 200


def test_eos_guard_stops_an_eos_suppressing_model() -> None:
    """The low-entropy criterion (off by default, `--eos-guard-entropy`) stops confident output."""
    guard = {"eos_guard_after": 24, "eos_guard_window": 16, "eos_guard_entropy": 0.5}
    body = {"prompt": "Write", "max_tokens": 200, "temperature": 0, "repetition_detection": NO_REPETITION}
    with serving(suppressed_eos_model(scale=400.0), **guard) as base:
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        assert r["choices"][0]["stop_reason"] == "eos_suppressed", r["tokensift"]
        assert 24 <= r["usage"]["completion_tokens"] < 200
        assert r["tokensift"]["eos_guard"]["eos_prob_max_window"] < 1e-4
        assert 'guard="eos_suppressed"' in httpx.get(f"{base}/metrics").text
        wait_idle(base)
    with serving(suppressed_eos_model(scale=400.0), eos_guard=False) as base:  # the guard is what stopped it
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        assert r["usage"]["completion_tokens"] == 200 and r["tokensift"]["stop"] == "max_new_tokens"
    # EOS just as suppressed, but sampled, high-entropy output: the floor alone must not fire.
    with serving(suppressed_eos_model(scale=1.0), **guard) as base:
        r = httpx.post(f"{base}/v1/completions", json={**body, "temperature": 1.0}, timeout=60).json()
        assert r["tokensift"]["stop"] == "max_new_tokens", r["tokensift"]


def test_eos_guard_unit_needs_low_entropy_or_repetition() -> None:
    g = EosGuard([0], after=4, window=4, floor=1e-3, entropy=0.5, distinct=0.25)
    confident = torch.full((10,), -50.0)
    confident[5] = 50.0
    assert [g.step(list(range(i + 1)), confident) for i in range(6)] == [False] * 3 + [True] * 3
    flat = torch.zeros(10)
    flat[0] = -50.0
    g = EosGuard([0], after=4, window=4, floor=1e-3)
    assert not any(g.step(list(range(i + 1)), flat) for i in range(8))


def test_client_disconnect_cancels_and_frees_kv(smol: tokensift.Model) -> None:
    with serving(smol, eos_guard=False, max_new_tokens_cap=900) as base:
        body = {"prompt": LONG, "max_tokens": 900, "stream": True, "repetition_detection": NO_REPETITION}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept open: closing this iterator closes the connection
            while not next(lines).startswith("data: {"):
                pass
            busy = httpx.get(f"{base}/health").json()
            assert busy["running"] == 1 and busy["kv_pool"]["reserved_bytes"] > 0
        wait_idle(base, timeout=20)  # the worker stopped at its next token and released the pool
        metrics = httpx.get(f"{base}/metrics").text
        assert 'guard="cancelled"' in metrics
        tokens = [ln for ln in metrics.splitlines() if ln.startswith("tokensift:generation_tokens_total")]
        assert float(tokens[0].split()[-1]) < 900


def test_reservation_covers_measured_peak(smol: tokensift.Model) -> None:
    ids = smol.tokenizer(LONG)["input_ids"]
    specs = [
        "dense",
        "snapkv:budget=0.25",
        "h2o:budget=0.25",
        "streaming_llm:budget=100",
        "adaptive(snapkv:budget=0.25)",
    ]
    for spec in specs:
        out = tokensift.generate(smol, ids, spec, max_new_tokens=8, ignore_eos=True)
        reserved = reservation_bytes(smol, Plan.of(spec), len(ids), 0, 8)
        assert out.stats.kv_bytes_peak <= reserved, (spec, out.stats.kv_bytes_peak, reserved)
    deep = tiny_model(layers=24, context=8192)  # the one-layer transient is 1/24 of the prompt
    dense = reservation_bytes(deep, Plan.of("dense"), 4000, 0, 64)
    snap = reservation_bytes(deep, Plan.of("snapkv:budget=0.25"), 4000, 0, 64)
    assert 3.0 < dense / snap < 4.2  # the same pool admits ~3.5x as many long snapkv requests


def test_kv_pool_fifo_and_queue_limit() -> None:
    async def scenario() -> None:
        pool = KVPool(capacity=100, max_queue=1, max_running=8, on_change=lambda: None)
        await pool.acquire(80, 1, 1)
        waiter = asyncio.ensure_future(pool.acquire(50, 5, 1))
        await asyncio.sleep(0.01)
        assert pool.waiting == 1 and not waiter.done()
        with pytest.raises(Exception, match="busy"):
            await pool.acquire(10, 1, 1)  # the queue is full
        pool.release(80)
        await waiter
        assert pool.reserved == 50 and pool.running == 1
        with pytest.raises(Exception, match="waited"):
            await pool.acquire(60, 0.05, 1)  # times out in the queue and leaves it
        assert pool.waiting == 0
        pool.release(50)
        assert pool.reserved == 0 and pool.running == 0

    asyncio.run(scenario())


def test_cli_config_and_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokensift.cli import build_parser, main

    args = build_parser().parse_args(
        [
            "serve",
            "--kv-pool-mib",
            "64",
            "--allow-methods",
            "snapkv,h2o",
            "--no-eos-guard",
            "--replica-id",
            "r1",
        ]
    )
    config = config_from_args(args)
    assert config.kv_pool_mib == 64 and config.allow_methods == ["snapkv", "h2o"] and not config.eos_guard
    assert config.replica == "r1" and config.host == "127.0.0.1"
    assert main(["serve", "--method", "nope"]) == 2  # bad default method: one-line error
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "fastapi" else real(n, *a))
    with pytest.raises(TokensiftError, match=r"pip install 'tokensift\[serve\]'"):
        require_extra()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("eos_guard_entropy", -0.1),
        ("eos_guard_floor", 0.0),
        ("eos_guard_distinct", 1.5),
        ("eos_guard_window", 0),
    ],
)
def test_bad_eos_guard_settings_are_refused(option: str, value: float) -> None:
    with pytest.raises(TokensiftError, match=option):
        ServeConfig(**{option: value})  # type: ignore[arg-type]


def _tune_in_a_child(names: tuple[str, ...]) -> dict:
    """The real `memory.tune_malloc`, run in a fresh interpreter: mallopt settings are process-wide and
    cannot be undone, so this test process's allocator (and the rest of the suite's speed) stays as is."""
    code = (
        "import json, sys; from tokensift.runtime import memory; "
        "print(json.dumps(memory.tune_malloc(tuple(sys.argv[1:]))))"
    )
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("tuning", ["all", "off", "trim", "arena_max,trim"])
def test_health_reports_the_allocator_settings(
    smol: tokensift.Model, tuning: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokensift.runtime import memory

    trims: list[bool] = []
    monkeypatch.setattr(memory, "tune_malloc", _tune_in_a_child)
    monkeypatch.setattr(memory, "trim", lambda: trims.append(True) or True)
    with serving(smol, malloc_tuning=tuning) as base:
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
        allocator = wait_idle(base)["allocator"]
    glibc = memory._LIBC is not None
    names = memory.parse_tuning(tuning)
    assert allocator["applied"] is (bool(names) and glibc), allocator
    assert bool(trims) is ("trim" in names), (tuning, trims)
    if names and glibc:
        assert allocator["settings"] == list(names)
        assert ("mmap_threshold" in allocator) is ("mmap_threshold" in names)
        if "arena_max" in names:
            assert allocator["arena_max"] == memory.ARENA_MAX
        if tuning == "all":
            assert allocator["mmap_threshold"] == memory.MMAP_THRESHOLD


def test_malloc_tuning_names_are_checked() -> None:
    from tokensift.runtime import memory

    assert memory.parse_tuning("all") == memory.NAMES
    assert memory.parse_tuning(" OFF ") == ()
    assert memory.parse_tuning("trim, arena_max") == ("arena_max", "trim")
    with pytest.raises(TokensiftError, match=r"unknown setting.*arenas"):
        ServeConfig(malloc_tuning="arenas,trim")
    from tokensift.cli import build_parser, main

    def parsed(*argv: str) -> tuple[str, ...]:
        return config_from_args(build_parser().parse_args(["serve", *argv])).malloc_settings

    assert parsed() == ServeConfig().malloc_settings == ("arena_max", "trim")  # the documented default
    assert parsed("--malloc-tuning") == memory.NAMES and parsed("--malloc-tuning", "off") == ()
    assert parsed("--malloc-tuning", "trim") == ("trim",)
    assert main(["serve", "--malloc-tuning", "arenas"]) == 2  # one-line error, no traceback


def test_trim_is_rate_limited() -> None:
    from tokensift.runtime import memory

    if memory._LIBC is None:
        pytest.skip("not glibc")
    memory.trim(min_interval=0)
    assert not memory.trim(min_interval=60)  # just ran
    assert memory.trim(min_interval=0)
