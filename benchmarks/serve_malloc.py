"""What each glibc malloc tuning of the server (`--malloc-tuning`) costs and saves.

    flock /tmp/tokensift-heavy.lock python benchmarks/serve_malloc.py [--variants off trim all] [--repeats 5]

One server on 127.0.0.1 per `--variants` entry (a `--malloc-tuning` value: off = glibc's defaults,
all, or a comma list of tokensift.runtime.memory.NAMES), all with the same options. Each repeat sends
one round to each server in turn (the order rotating between repeats): `--max-running`
simultaneous requests, half 2k-token passkey completions (prefill-heavy, 16 new tokens), half
open-ended chat requests (decode-heavy, 48 new tokens), the long ones cycling through dense,
SnapKV, H2O and Quest. Reported per server: round seconds and RSS after each round, median [IQR];
the paired time ratio baseline / variant per repeat, the baseline being the first variant (above
1: the variant is faster).
Writes benchmarks/results/serve_malloc.json and .md.
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
from serve_load import Server, build_prompts, rss_mib
from tokensift.bench.tasks.loop_workloads import OPEN_ENDED_PROMPTS
from tokensift.bench.timing import Spread, add_repeats_argument, check_repeats, speedup

ROOT = Path(__file__).resolve().parents[1]
METHODS = [None, "snapkv:budget=0.25", "h2o:budget=0.25", "quest:budget=256"]


async def one_round(base: str, prompts: list[str], running: int) -> float:
    async def ask(ac: httpx.AsyncClient, i: int) -> None:
        method = METHODS[(i // 2) % len(METHODS)]  # the long prompts cycle through the methods
        extra = {"tokensift": {"method": method}} if method else {}
        if i % 2 == 0:
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": 16, "temperature": 0, **extra}
            path = "/v1/completions"
        else:
            content = OPEN_ENDED_PROMPTS[i % len(OPEN_ENDED_PROMPTS)]
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": 48}
            path = "/v1/chat/completions"
        r = await ac.post(base + path, json={**body, "temperature": 0})
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as ac:
        await asyncio.gather(*(ask(ac, i) for i in range(running)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-running", type=int, default=8)
    ap.add_argument("--pool-mib", type=float, default=1024.0)
    ap.add_argument("--variants", nargs="+", default=["off", "trim", "all"], help="--malloc-tuning values")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_malloc")
    add_repeats_argument(ap)
    args = ap.parse_args()
    check_repeats(args.repeats)
    prompts = build_prompts(args.model, seed=7)[2048]
    servers = {
        v: Server(args.model, args.pool_mib, args.max_running, cap=64, extra=("--malloc-tuning", v))
        for v in args.variants
    }
    result: dict[str, Any] = {"model": args.model, "loadavg_start": os.getloadavg(), "runs": []}
    try:
        for s in servers.values():
            s.wait_ready()
        for name, s in servers.items():  # warm-up round, untimed
            asyncio.run(one_round(s.base, prompts, args.max_running))
            result[f"allocator_{name}"] = httpx.get(f"{s.base}/health").json()["allocator"]
            result[f"rss_after_warmup_{name}"] = round(rss_mib(s.proc.pid), 1)
        for rep in range(args.repeats):
            names = list(servers)
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                s = servers[name]
                seconds = asyncio.run(one_round(s.base, prompts, args.max_running))
                result["runs"].append(
                    {"repeat": rep, "server": name, "seconds": seconds, "rss_mib": rss_mib(s.proc.pid)}
                )
                print(result["runs"][-1], flush=True)
    finally:
        for s in servers.values():
            s.stop()
    result["loadavg_end"] = os.getloadavg()
    by = {n: [r for r in result["runs"] if r["server"] == n] for n in servers}
    result["summary"] = {
        n: {
            "seconds": Spread.of(r["seconds"] for r in rs).as_dict(),
            "rss_mib": Spread.of(r["rss_mib"] for r in rs).as_dict(),
            "rss_last": rs[-1]["rss_mib"],
        }
        for n, rs in by.items()
    }
    base = args.variants[0]
    ratios = {
        n: speedup([r["seconds"] for r in by[base]], [r["seconds"] for r in by[n]]) for n in args.variants[1:]
    }
    result["baseline"] = base
    result["baseline_over_variant_time"] = {n: r.as_dict() for n, r in ratios.items()}
    result["command"] = "python benchmarks/serve_malloc.py " + " ".join(sys.argv[1:])
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result, ratios))
    print(markdown(result, ratios))


def markdown(result: dict[str, Any], ratios: dict[str, Spread]) -> str:
    s, base = result["summary"], result["baseline"]
    lines = [
        "# Server allocator tuning: cost and saving",
        "",
        f"Command: `{result['command']}`; model {result['model']}, {result['machine']}, load average "
        f"{[round(x, 2) for x in result['loadavg_start']]} at start, "
        f"{[round(x, 2) for x in result['loadavg_end']]} at end.",
        "",
        f"| `--malloc-tuning` | round seconds, median [IQR] | {base} / this, paired | RSS after warm-up MiB "
        "| RSS after rounds MiB, median [IQR] | RSS at the end MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name in s:
        sec, rss = Spread(**s[name]["seconds"]), Spread(**s[name]["rss_mib"])
        ratio = ratios[name].format(3) + "x" if name in ratios else "baseline"
        lines.append(
            f"| {name} | {sec.format(2)} | {ratio} | {result[f'rss_after_warmup_{name}']} | {rss.format(0)} "
            f"| {s[name]['rss_last']:.0f} |"
        )
    lines += ["", f"Above 1x the variant's rounds are faster than {base}'s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
