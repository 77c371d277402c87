"""Every eviction method at fixed token budgets: accuracy, KV bytes, prefill time and process peak memory.

    python benchmarks/eviction.py [--length 4096] [--budgets 64,128,256,512] [--samples 2]
                                  [--protocols query-aware,query-agnostic] [--out results.json]

Tasks: passkey and niah_single at `--length` tokens (needles at evenly spread depths). Each
(method, budget, protocol) runs in its own process so its peak RSS is its own. Ratios are against
dense measured in the same run. Query-aware: the question is part of the prompt the method
compresses; query-agnostic: the context is compressed alone and the question appended afterwards.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = [
    "streaming_llm",
    "h2o",
    "keyformer",
    "snapkv",
    "compresskv",
    "adaptive(snapkv:budget={b})",
    "adaptive(compresskv:budget={b})",
]
TASKS = ["passkey", "niah_single"]


def spec_for(method: str, budget: int) -> str:
    return method.format(b=budget) if "{b}" in method else f"{method}:budget={budget}"


def worker(args: argparse.Namespace) -> None:
    """Run one spec on every sample and print one JSON line (inside a fresh process)."""
    import tokensift
    from tokensift.bench.runner import token_counter
    from tokensift.bench.tasks import get_task

    model = tokensift.load(args.model)
    count = token_counter(model)
    rows = []
    depths = [(i + 0.5) / args.samples for i in range(args.samples)]
    for task_name in TASKS:
        task = get_task(task_name)
        for sample in task.samples(count, args.length, 1, seed=0, depths=depths):
            kwargs = {"max_new_tokens": sample.max_new_tokens, "answer_prefix": sample.answer_prefix}
            if args.protocol == "query-agnostic":
                context = sample.prompt[: sample.prompt.rindex(sample.question)]
                out = tokensift.generate(model, context, args.spec, question=sample.question, **kwargs)
            else:
                out = tokensift.generate(model, sample.prompt, args.spec, **kwargs)
            s = out.stats
            rows.append(
                {
                    "task": task_name,
                    "score": task.score(sample, out.text),
                    "kv_bytes_peak": s.kv_bytes_peak,
                    "kv_bytes_dense": s.kv_bytes_dense,
                    "prefill_seconds": s.prefill_seconds,
                    "applied": s.applied,
                }
            )
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"spec": args.spec, "protocol": args.protocol, "rows": rows, "peak_rss": peak_rss}))


def run_one(args: argparse.Namespace, spec: str, protocol: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--spec",
        spec,
        "--protocol",
        protocol,
        "--model",
        args.model,
        "--length",
        str(args.length),
        "--samples",
        str(args.samples),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(result: dict) -> dict:
    rows = result["rows"]
    by_task = {t: [r["score"] for r in rows if r["task"] == t] for t in TASKS}
    return {
        "acc": {t: sum(v) / len(v) for t, v in by_task.items()},
        "kv": sum(r["kv_bytes_peak"] for r in rows) / len(rows),
        "prefill": sum(r["prefill_seconds"] for r in rows) / len(rows),
        "rss": result["peak_rss"],
        "applied": all(r["applied"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--budgets", default="64,128,256,512")
    parser.add_argument("--samples", type=int, default=2, help="needle depths per task")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="names, or templates with {b}")
    parser.add_argument("--protocols", default="query-aware,query-agnostic")
    parser.add_argument(
        "--agnostic-budgets", default="256", help="budgets also run query-agnostic (the protocol table)"
    )
    parser.add_argument("--out", type=Path, help="also write the raw results as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--protocol", default="query-aware", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    budgets = [int(b) for b in args.budgets.split(",")]
    methods = args.methods
    protocols = args.protocols.split(",")
    started = time.time()
    results: dict[str, dict] = {}
    agnostic = [int(b) for b in args.agnostic_budgets.split(",")]
    for protocol in protocols:
        results[f"dense|{protocol}"] = summarise(run_one(args, "dense", protocol))
        for budget in budgets if protocol == "query-aware" else agnostic:
            for method in methods:
                spec = spec_for(method, budget)
                results[f"{spec}|{protocol}"] = summarise(run_one(args, spec, protocol))
                print(f"[{time.time() - started:.0f}s] {spec} ({protocol}) done", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))

    print(
        f"model {args.model}, {args.length}-token prompts, {args.samples} depths x {len(TASKS)} tasks "
        f"per cell, {time.strftime('%Y-%m-%d')}"
    )
    for protocol in protocols:
        print(f"\n### {protocol}\n")
        print(table(results, methods, budgets if protocol == "query-aware" else agnostic, protocol))


def table(results: dict[str, dict], methods: list[str], budgets: list[int], protocol: str) -> str:
    dense = results[f"dense|{protocol}"]
    lines = [
        "| method | budget | passkey | niah_single | KV / dense | prefill+compress vs dense | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
        f"| dense | - | {dense['acc']['passkey']:.2f} | {dense['acc']['niah_single']:.2f} | 1.000 | 1.00x "
        f"| {dense['rss'] / 2**20:.0f} |",
    ]
    for budget in budgets:
        cells = {m: results[f"{spec_for(m, budget)}|{protocol}"] for m in methods}
        best = max(methods, key=lambda m: sum(cells[m]["acc"].values()))
        if sum(cells[best]["acc"].values()) == 0:
            best = ""  # nobody retrieves anything at this budget: no winner
        for method, r in cells.items():
            name = method.replace(":budget={b}", "") + (" **best**" if method == best else "")
            lines.append(
                f"| {name} | {budget} | {r['acc']['passkey']:.2f} | {r['acc']['niah_single']:.2f} | "
                f"{r['kv'] / dense['kv']:.3f} | {r['prefill'] / dense['prefill']:.2f}x "
                f"| {r['rss'] / 2**20:.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
