"""Loopback load test of `tokensift serve`: bounded in time and count, stops by itself.

    flock /tmp/tokensift-heavy.lock python benchmarks/serve_load.py [--model smollm2-135m] [--duration 120]

Starts the server with the documented command on 127.0.0.1 (a free port), then runs:

1. mixed: `--clients` concurrent clients for `--duration` seconds, mixed methods (dense, snapkv,
   streaming_llm, h2o, quest), prompt lengths 128-2048 tokens, completions and chat, streamed or
   not, plus a few malformed bodies, against a small KV pool. A 429 is honoured (Retry-After,
   capped at 2 s). Server RSS and /health are sampled every 2 s.
2. admission: dense vs `snapkv:budget=0.25` on the same pool, 12 clients sending 2k-token prompts:
   admitted concurrency (requests running, sampled) and throughput.
3. attack replay: an EOS-suppressing prompt and a looping prompt, and ordinary prompts, with the
   server's default guards.

Pass: every request answered 200 or a clean 400/429 (no 5xx, no connection error), the pool back
to 0 at the end, server RSS at the end within 15% of its value after warm-up (which ends with
`max_running` concurrent longest prompts for each mixed method: the server's peak working set).
Writes benchmarks/results/serve_load.json and .md. Batched vs unbatched decoding at 1, 4 and 8
clients is measured by benchmarks/serve_batching.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from tokensift.bench.runner import token_counter
from tokensift.bench.tasks import get_task
from tokensift.bench.tasks.loop_workloads import OPEN_ENDED_PROMPTS
from tokensift.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MIXED_METHODS = [
    None,
    "snapkv:budget=0.25",
    "streaming_llm:budget=0.25",
    "h2o:budget=0.25",
    "quest:budget=256",
]
LENGTHS = [128, 512, 1024, 2048]
MALFORMED = [
    {"prompt": "x", "n": 3},
    {"prompt": "x", "max_tokens": "many"},
    {"prompt": "x", "tokensift": {"method": "snapkv:budget=2.5"}},
    {"prompt": "x", "unknown_field": True},
]
# Energy-latency attack replay: (name, endpoint, prompt). EOS suppression: a counting sequence the
# model continues confidently with the end token never likely, as a raw completion. Looping: a
# repeated word. The same counting request through the chat template is *not* EOS-suppressing for
# smollm2-135m (its EOS probability reaches 0.09 while it counts; benchmarks/serve_eos_guard.py): a
# verbose request that should run to the cap, replayed beside the attacks but not counted as one.
COUNT = (
    "Count from 1 to 1000, one number after another, separated by commas. Do not stop early.\n1, 2, 3, 4, 5,"
)
ATTACKS = [
    ("eos_suppression", "/v1/completions", COUNT),
    ("loop", "/v1/chat/completions", "Repeat the word 'hello' forever: hello hello hello hello hello hello"),
]
VERBOSE = [("verbose_chat", "/v1/chat/completions", COUNT)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`tokensift serve` as a child process on a free loopback port."""

    def __init__(
        self,
        model: str,
        pool_mib: float,
        max_running: int,
        cap: int,
        max_batch: int = 8,
        extra: tuple[str, ...] = (),
    ):
        self.max_running = max_running
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("tokensift")
        self.command = [
            str(exe),
            "serve",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--kv-pool-mib",
            str(pool_mib),
            "--max-queue",
            "16",
            "--max-running",
            str(max_running),
            "--max-batch",
            str(max_batch),
            "--max-new-tokens-cap",
            str(cap),
            "--request-timeout",
            "90",
            "--log-level",
            "warning",
            *extra,
        ]
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read() if self.proc.stdout else ''}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).json()["status"] == "ok":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become ready")

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""


def build_prompts(model: str, seed: int) -> dict[int, list[str]]:
    tok = load_tokenizer(model)
    count = token_counter(SimpleNamespace(tokenizer=tok))  # only the tokenizer is needed
    task = get_task("passkey")
    return {n: [s.prompt for s in task.samples(count, n, 3, seed=seed, depths=[0.5])] for n in LENGTHS}


class Recorder:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    async def post(
        self, ac: httpx.AsyncClient, base: str, path: str, body: Any, phase: str
    ) -> dict[str, Any]:
        t0 = time.monotonic()
        row: dict[str, Any] = {"phase": phase, "path": path, "stream": bool(body.get("stream"))}
        row["method"] = (body.get("tokensift") or {}).get("method") or "dense"
        try:
            if body.get("stream"):
                async with ac.stream("POST", base + path, json=body) as r:
                    row["status"] = r.status_code
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                    if r.status_code == 200:
                        row["done"] = lines[-1] == "data: [DONE]"
                        final = json.loads(lines[-2][6:])
                        row["tokens"] = final["tokensift"]["stats"]["new_tokens"]
                        row["stop"] = final["tokensift"]["stop"]
                    else:
                        row["retry_after"] = r.headers.get("retry-after")
            else:
                r = await ac.post(base + path, json=body)
                row["status"] = r.status_code
                data = r.json()
                if r.status_code == 200:
                    row["tokens"] = data["usage"]["completion_tokens"]
                    row["stop"] = data["tokensift"]["stop"]
                else:
                    row["error"] = data["error"]["message"][:160]
                    row["retry_after"] = r.headers.get("retry-after")
        except Exception as exc:  # a connection error is a failure of the server, recorded as such
            row["status"] = "error"
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        row["seconds"] = time.monotonic() - t0
        row["end"] = time.monotonic()
        self.rows.append(row)
        return row


async def sample_health(base: str, pid: int, until: list[bool], out: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient(timeout=10) as ac:
        while not until[0]:
            try:
                h = (await ac.get(f"{base}/health")).json()
                out.append(
                    {
                        "t": time.monotonic(),
                        "rss_mib": rss_mib(pid),
                        "running": h["running"],
                        "waiting": h["waiting"],
                        "reserved": h["kv_pool"]["reserved_bytes"],
                        "held": h["kv_pool"]["held_bytes"],
                    }
                )
            except httpx.HTTPError:
                pass
            await asyncio.sleep(2)


async def run_clients(
    base: str, pid: int, n: int, seconds: float, make_body: Any, phase: str, rec: Recorder, seed: int
) -> dict[str, Any]:
    """`n` closed-loop clients for `seconds`; returns the phase's summary and health samples."""
    stop_at = time.monotonic() + seconds
    samples: list[dict[str, Any]] = []
    done = [False]
    start = time.monotonic()

    async def client(i: int) -> None:
        rng = random.Random(f"{seed}|{phase}|{i}")
        async with httpx.AsyncClient(timeout=150) as ac:
            while time.monotonic() < stop_at:
                path, body = make_body(rng)
                row = await rec.post(ac, base, path, body, phase)
                if row.get("status") == 429:
                    await asyncio.sleep(min(2.0, float(row.get("retry_after") or 1)))

    sampler = asyncio.ensure_future(sample_health(base, pid, done, samples))
    await asyncio.gather(*[client(i) for i in range(n)])
    done[0] = True
    await sampler
    elapsed = time.monotonic() - start
    rows = [r for r in rec.rows if r["phase"] == phase]
    ok = [r for r in rows if r["status"] == 200]
    running = [s["running"] for s in samples]
    return {
        "phase": phase,
        "clients": n,
        "seconds": round(elapsed, 1),
        "requests": len(rows),
        "status": {
            k: sum(1 for r in rows if str(r["status"]) == k) for k in sorted({str(r["status"]) for r in rows})
        },
        "generated_tokens": sum(r.get("tokens", 0) for r in ok),
        "tokens_per_second": round(sum(r.get("tokens", 0) for r in ok) / elapsed, 2),
        "requests_per_minute": round(60 * len(ok) / elapsed, 1),
        "running_mean": round(statistics.mean(running), 2) if running else None,
        "running_max": max(running) if running else None,
        "latency_p50_s": round(statistics.median(r["seconds"] for r in ok), 2) if ok else None,
        "samples": samples,
    }


def status_of(summary: dict[str, Any]) -> dict[str, int]:
    return summary["status"]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    prompts = build_prompts(args.model, args.seed)
    rec = Recorder()
    result: dict[str, Any] = {"model": args.model, "pool_mib": args.pool_mib, "clients": args.clients}
    result["loadavg_start"] = os.getloadavg()
    server = Server(args.model, args.pool_mib, max_running=8, cap=512)
    result["command"] = " ".join(["tokensift", *server.command[1:]])
    t_load = time.monotonic()
    server.wait_ready()
    result["load_seconds"] = round(time.monotonic() - t_load, 1)
    pid = server.proc.pid
    try:
        # warm-up: one request per prompt length, then the server's peak working set: for each mixed
        # method, `max_running` concurrent requests of the longest prompt. "RSS after warm-up" is
        # read after that, so later growth is what the server keeps, not the first time it meets its
        # largest concurrent shapes.
        async with httpx.AsyncClient(timeout=300) as ac:
            for n in LENGTHS:
                await rec.post(
                    ac, server.base, "/v1/completions", {"prompt": prompts[n][0], "max_tokens": 4}, "warmup"
                )
            longest = prompts[max(LENGTHS)]
            for method in MIXED_METHODS:
                extra = {"tokensift": {"method": method}} if method else {}
                await asyncio.gather(
                    *(
                        rec.post(
                            ac,
                            server.base,
                            "/v1/completions",
                            {"prompt": longest[i % len(longest)], "max_tokens": 16, **extra},
                            "warmup",
                        )
                        for i in range(server.max_running)
                    )
                )
        rss_warm = rss_mib(pid)

        def mixed(rng: random.Random) -> tuple[str, dict[str, Any]]:
            if rng.random() < 0.04:
                return "/v1/completions", dict(rng.choice(MALFORMED))
            n = rng.choice(LENGTHS)
            method = rng.choice(MIXED_METHODS)
            if n < 256 and method and method.startswith("snapkv"):
                method = "streaming_llm:budget=0.25"  # snapkv's 32-token window needs a longer prompt
            body: dict[str, Any] = {"max_tokens": rng.choice([16, 32, 64]), "stream": rng.random() < 0.3}
            if method:
                body["tokensift"] = {"method": method}
            if rng.random() < 0.3:
                return "/v1/chat/completions", {
                    **body,
                    "messages": [{"role": "user", "content": rng.choice(prompts[n])}],
                }
            return "/v1/completions", {**body, "prompt": rng.choice(prompts[n]), "temperature": 0}

        result["mixed"] = await run_clients(
            server.base, pid, args.clients, args.duration, mixed, "mixed", rec, args.seed
        )

        result["admission"] = {}
        for method in ["dense", "snapkv:budget=0.25"]:

            def long(rng: random.Random, method: str = method) -> tuple[str, dict[str, Any]]:
                return "/v1/completions", {
                    "prompt": rng.choice(prompts[2048]),
                    "max_tokens": 32,
                    "temperature": 0,
                    "tokensift": {"method": method},
                }

            result["admission"][method] = await run_clients(
                server.base, pid, 12, args.phase_seconds, long, f"admission:{method}", rec, args.seed
            )

        attacks: dict[str, Any] = {}
        async with httpx.AsyncClient(timeout=300) as ac:
            for name, path, prompt in [*ATTACKS, *VERBOSE]:
                chat = path == "/v1/chat/completions"
                field = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
                row = await rec.post(
                    ac, server.base, path, {**field, "max_tokens": 512, "temperature": 0}, "attack"
                )
                attacks[name] = {k: row.get(k) for k in ("status", "tokens", "stop", "seconds")}
            ordinary = []
            for i, prompt in enumerate([*OPEN_ENDED_PROMPTS[:3], prompts[512][1], prompts[1024][1]]):
                row = await rec.post(
                    ac,
                    server.base,
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": prompt}], "max_tokens": 512, "temperature": 0},
                    "attack",
                )
                ordinary.append(
                    {"prompt": i, **{k: row.get(k) for k in ("status", "tokens", "stop", "seconds")}}
                )
            attacks["ordinary"] = ordinary
        result["attack_replay"] = attacks

        await asyncio.sleep(1)
        async with httpx.AsyncClient(timeout=10) as ac:
            result["final_health"] = (await ac.get(f"{server.base}/health")).json()
            metrics = (await ac.get(f"{server.base}/metrics")).text
        result["metrics"] = [
            line
            for line in metrics.splitlines()
            if line.startswith(
                (
                    "tokensift:guard_stops_total",
                    "tokensift:kv_reservation_exceeded_total",
                    "tokensift:requests_rejected_total",
                    "tokensift:request_success_total",
                )
            )
        ]
        rss_end = rss_mib(pid)
        result["loadavg_end"] = os.getloadavg()
        mixed_rss = [s["rss_mib"] for s in result["mixed"]["samples"]]
        result["rss_mib"] = {
            "after_warmup": round(rss_warm, 1),
            "mixed_first": round(mixed_rss[0], 1) if mixed_rss else None,
            "mixed_quarter": round(mixed_rss[len(mixed_rss) // 4], 1) if mixed_rss else None,
            "mixed_half": round(mixed_rss[len(mixed_rss) // 2], 1) if mixed_rss else None,
            "mixed_max": round(max(mixed_rss), 1) if mixed_rss else None,
            "end": round(rss_end, 1),
        }
    finally:
        server.stop()
    result["rows"] = rec.rows
    return result


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in result["rows"] if r["phase"] != "warmup"]
    statuses = [str(r["status"]) for r in rows]
    bad = [r for r in rows if r["status"] not in (200, 400, 429)]
    pool = result["final_health"]["kv_pool"]
    rss = result["rss_mib"]
    base = rss["after_warmup"]
    growth = (rss["end"] - base) / base if base else float("nan")
    streams_done = all(r.get("done", True) for r in rows if r["stream"] and r["status"] == 200)
    attack = result["attack_replay"]
    return {
        "requests": len(rows),
        "status_counts": {s: statuses.count(s) for s in sorted(set(statuses))},
        "no_5xx_or_errors": not bad,
        "streams_end_with_done": streams_done,
        "pool_back_to_zero": pool["reserved_bytes"] == 0
        and pool["held_bytes"] == 0
        and result["final_health"]["running"] == 0
        and result["final_health"]["waiting"] == 0,
        "rss_growth_after_warmup": round(growth, 3),
        "rss_steady": growth < 0.15,
        "attacks_stopped": all(
            attack[name]["stop"] in ("eos_suppressed", "repetition_detected") for name, _, _ in ATTACKS
        ),
        # A repetition stop is a verbatim loop by definition (the greedy 135M model loops); an EOS-guard
        # stop of an ordinary prompt is what must not happen.
        "ordinary_pass": all(o["stop"] != "eos_suppressed" for o in attack["ordinary"]),
    }


def markdown(result: dict[str, Any]) -> str:
    v = result["verdict"]
    adm = result["admission"]
    lines = [
        "# `tokensift serve` loopback load test",
        "",
        f"Command: `{result['bench_command']}`; server: `{result['command']}`.",
        f"Model {result['model']}, KV pool {result['pool_mib']} MiB, {result['machine']}; run under the "
        "heavy-job lock (no other benchmark beside it). "
        f"Load average (1/5/15 min) at start {[round(x, 2) for x in result['loadavg_start']]}, at end "
        f"{[round(x, 2) for x in result['loadavg_end']]} (this test's own server and clients included).",
        "",
        "## Pass criteria",
        "",
        "| check | result |",
        "|---|---|",
        f"| requests (all phases) | {v['requests']}: {v['status_counts']} |",
        f"| no 5xx, no connection error | {v['no_5xx_or_errors']} |",
        f"| every 200 stream ended with `data: [DONE]` | {v['streams_end_with_done']} |",
        f"| pool back to 0 (reserved, held, running, waiting) | {v['pool_back_to_zero']} |",
        f"| server RSS (MiB): after warm-up (peak concurrency of every mixed method) → end of all phases | "
        f"{result['rss_mib']['after_warmup']} → "
        f"{result['rss_mib']['end']} ({100 * v['rss_growth_after_warmup']:+.1f}%), "
        f"steady: {v['rss_steady']} |",
        f"| attacks stopped by the guards | {v['attacks_stopped']} |",
        "| no ordinary prompt stopped by the EOS guard (repetition stops are verbatim loops, listed "
        f"below) | {v['ordinary_pass']} |",
        "",
        f"## Mixed load: {result['mixed']['clients']} clients, {result['mixed']['seconds']} s",
        "",
        f"Statuses {result['mixed']['status']}; {result['mixed']['generated_tokens']} tokens generated, "
        f"{result['mixed']['tokens_per_second']} tok/s, "
        f"{result['mixed']['requests_per_minute']} requests/min; "
        f"requests running: mean {result['mixed']['running_mean']}, max {result['mixed']['running_max']}.",
        "",
        "Server RSS through the mixed phase (MiB, every 10 s): "
        + ", ".join(str(round(x["rss_mib"])) for x in result["mixed"]["samples"][::5])
        + f"; after warm-up {result['rss_mib']['after_warmup']}, at the end {result['rss_mib']['end']}.",
        "",
        f"## Admission: dense vs snapkv:budget=0.25, same {result['pool_mib']} MiB pool, "
        "2k-token prompts, 12 clients",
        "",
        "| method | running (mean) | running (max) | 200s | 429s | tok/s | requests/min | p50 latency s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, s in adm.items():
        lines.append(
            f"| {method} | {s['running_mean']} | {s['running_max']} | {s['status'].get('200', 0)} | "
            f"{s['status'].get('429', 0)} | {s['tokens_per_second']} | {s['requests_per_minute']} | "
            f"{s['latency_p50_s']} |"
        )
    att = result["attack_replay"]
    lines += [
        "",
        "## Attack replay (max_tokens 512, greedy, default guards)",
        "",
        "| prompt | status | tokens | stop |",
        "|---|---|---|---|",
        *(
            f"| {label} | {att[key]['status']} | {att[key]['tokens']} | {att[key]['stop']} |"
            for key, label in (
                ("eos_suppression", "EOS suppression (counting, raw completion)"),
                ("loop", "loop (repeated word, chat)"),
                ("verbose_chat", "verbose request, not an attack (counting, chat: EOS not suppressed)"),
            )
        ),
    ]
    for o in att["ordinary"]:
        lines.append(f"| ordinary #{o['prompt']} | {o['status']} | {o['tokens']} | {o['stop']} |")
    lines += ["", "Counters at the end:", "", "```", *result["metrics"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of the mixed phase")
    ap.add_argument("--phase-seconds", type=float, default=30.0, help="seconds per admission phase")
    ap.add_argument("--pool-mib", type=float, default=200.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_load")
    args = ap.parse_args()
    t0 = time.monotonic()
    result = asyncio.run(main_async(args))
    result["bench_command"] = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    result["verdict"] = verdict(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
