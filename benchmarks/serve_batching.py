"""Batched decoding in `tokensift serve`: tokens/s at 1, 4 and 8 concurrent clients, batched vs not.

    flock /tmp/tokensift-heavy.lock python benchmarks/serve_batching.py [--model smollm2-135m] [--repeats 5]

Two servers on 127.0.0.1 with the same options (`--max-running 8`), one with the default
`--max-batch 8` (requests sharing a plan decode in one forward per step) and one with
`--max-batch 1` (every request its own forwards, requests still concurrent on worker threads).
Each repeat sends, for each client count N, one round of N simultaneous chat requests (the
open-ended prompts of our loop workloads, greedy, `max_tokens` fixed) to each server in turn, the
order alternating between repeats so that load drifts hit both alike. tokens/s = completion tokens
of the round / its wall time (first request sent to last answer). Reported: median [IQR] over the
repeats and the paired batched/unbatched ratio per repeat (`tokensift.bench.timing`), plus the
largest batch each request reported (`tokensift.batch_size_max`).
Writes benchmarks/results/serve_batching.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import Server
from tokensift.bench.tasks.loop_workloads import OPEN_ENDED_PROMPTS
from tokensift.bench.timing import Spread, add_repeats_argument, check_repeats, speedup

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = (1, 4, 8)


async def round_of(base: str, n: int, max_tokens: int, offset: int) -> dict[str, Any]:
    """n simultaneous requests; their tokens, wall time and reported batch sizes."""

    async def one(ac: httpx.AsyncClient, i: int) -> dict[str, Any]:
        prompt = OPEN_ENDED_PROMPTS[(offset + i) % len(OPEN_ENDED_PROMPTS)]
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        r = await ac.post(f"{base}/v1/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        return {
            "tokens": data["usage"]["completion_tokens"],
            "batch_size_max": data["tokensift"]["batch_size_max"],
            "batched": data["tokensift"]["batched"],
            "stop": data["tokensift"]["stop"],
        }

    async with httpx.AsyncClient(timeout=300) as ac:
        t0 = time.perf_counter()
        rows = await asyncio.gather(*[one(ac, i) for i in range(n)])
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in rows)
    return {
        "clients": n,
        "seconds": wall,
        "tokens": tokens,
        "tokens_per_second": tokens / wall,
        "requests": rows,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    servers = {
        "batched": Server(args.model, args.pool_mib, max_running=8, cap=args.max_tokens, max_batch=8),
        "unbatched": Server(args.model, args.pool_mib, max_running=8, cap=args.max_tokens, max_batch=1),
    }
    result: dict[str, Any] = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "commands": {k: " ".join(["tokensift", *s.command[1:]]) for k, s in servers.items()},
        "loadavg_start": os.getloadavg(),
    }
    try:
        for s in servers.values():
            s.wait_ready()
        for s in servers.values():  # warm-up: one round of 2 requests each
            await round_of(s.base, 2, 8, 0)
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {k: {n: [] for n in CLIENTS} for k in servers}
        for rep in range(args.repeats):
            order = list(servers) if rep % 2 == 0 else list(servers)[::-1]
            for n in CLIENTS:
                for key in order:
                    row = await round_of(servers[key].base, n, args.max_tokens, rep)
                    runs[key][n].append(row)
                    print(f"repeat {rep} {key} {n} clients: {row['tokens_per_second']:.1f} tok/s", flush=True)
        result["loadavg_end"] = os.getloadavg()
        async with httpx.AsyncClient(timeout=10) as ac:
            result["final_health"] = {
                k: (await ac.get(f"{s.base}/health")).json() for k, s in servers.items()
            }
    finally:
        for s in servers.values():
            s.stop()
    table: dict[str, Any] = {}
    for n in CLIENTS:
        b = [r["tokens_per_second"] for r in runs["batched"][n]]
        u = [r["tokens_per_second"] for r in runs["unbatched"][n]]
        table[n] = {
            "batched_tok_s": Spread.of(b).as_dict(),
            "unbatched_tok_s": Spread.of(u).as_dict(),
            "ratio": speedup(b, u).as_dict(),  # rates: batched / unbatched per repeat
            "batch_size_max": max(q["batch_size_max"] for r in runs["batched"][n] for q in r["requests"]),
            "batch_size_max_median": Spread.of(
                [q["batch_size_max"] for r in runs["batched"][n] for q in r["requests"]]
            ).median,
            "mean_tokens_per_request": sum(r["tokens"] for r in runs["batched"][n] + runs["unbatched"][n])
            / sum(n for _ in runs["batched"][n] + runs["unbatched"][n]),
        }
    result["table"] = table
    result["runs"] = runs
    return result


def fmt(d: dict[str, Any], digits: int = 1, suffix: str = "") -> str:
    return Spread(d["median"], d["q1"], d["q3"], d["n"]).format(digits, suffix)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# `tokensift serve`: batched decoding vs one request per forward",
        "",
        f"Command: `{result['bench_command']}` ({result['wall_seconds']} s, {result['machine']}).",
        f"Servers: `{result['commands']['batched']}` and the same with `--max-batch 1`.",
        f"Model {result['model']}, chat requests (open-ended prompts), greedy, max_tokens "
        f"{result['max_tokens']}; {result['repeats']} repeats, median [IQR]. Load average (1/5/15 min) at "
        f"start {[round(x, 2) for x in result['loadavg_start']]}, at end "
        f"{[round(x, 2) for x in result['loadavg_end']]}: other jobs shared the 2 cores, so absolute "
        "figures are pessimistic; the ratio is paired within each repeat.",
        "",
        "| clients | batched tok/s | unbatched tok/s | batched / unbatched | largest batch (median, max) |",
        "|---|---|---|---|---|",
    ]
    for n, row in result["table"].items():
        lines.append(
            f"| {n} | {fmt(row['batched_tok_s'])} | {fmt(row['unbatched_tok_s'])} | "
            f"{fmt(row['ratio'], 2, 'x')} | {row['batch_size_max_median']:.0f}, {row['batch_size_max']} |"
        )
    lines += [
        "",
        "Unbatched requests still run concurrently (8 worker threads); batched ones share one forward per",
        "decode step, each prefilled alone.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--pool-mib", type=float, default=512.0)
    add_repeats_argument(ap)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_batching")
    args = ap.parse_args()
    check_repeats(args.repeats)
    t0 = time.monotonic()
    result = asyncio.run(main_async(args))
    result["bench_command"] = "python benchmarks/serve_batching.py " + " ".join(sys.argv[1:])
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
