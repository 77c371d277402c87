"""Every eviction method at fixed token budgets: accuracy, KV bytes, prefill time and process peak memory.

    python benchmarks/eviction.py [--length 4096] [--budgets 64,128,256,512] [--depths 4]
                                  [--protocols query-aware,query-agnostic] [--out runs/eviction]

Two phases, both resumable (rerun the same command after a kill):

1. Quality. passkey and niah_single at `--length` tokens, needles at `--depths` evenly spread depths,
   through the bench runner (`OUT/<protocol>/results.jsonl`): one exact prefill per sample is shared
   by the plans that compress only after it, so the sweep costs a few prefills per sample, not one per
   cell. Query-aware: the method compresses the prompt with its question; query-agnostic: the
   context alone, question appended afterwards (every budget in `--agnostic-budgets`).
2. Cost. Each (protocol, method, budget) runs one passkey sample through its own real prefill in a
   fresh process, under that protocol (query-agnostic: the context is prefilled and compressed
   alone, the question appended after), `--repeats` times after a warm-up, so the prefill time
   (compression included) and the process peak RSS (first run) are its own (`OUT/cost.json`).

All ratios are against dense measured in the same run; a speed-up is dense time / method time,
per repeat (paired by repeat index, the processes running one after another), reported as median
[interquartile range] (tokensift.bench.timing). `--cost-only --quality-from FILE` measures the cost
of the given protocols only and takes the accuracy cells from an earlier results file.
"""

from __future__ import annotations

import argparse
import json
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


def depths(n: int) -> list[float]:
    return [round((i + 0.5) / n, 4) for i in range(n)]


def cost_worker(args: argparse.Namespace) -> None:
    """One passkey sample through the spec's own prefill, in this fresh process; prints one JSON line."""
    import tokensift
    from tokensift.bench.runner import token_counter
    from tokensift.bench.tasks import get_task

    model = tokensift.load(args.model)
    task = get_task("passkey")
    (sample,) = task.samples(token_counter(model), args.length, 1, seed=0, depths=[0.5])
    prompt, question = task.protocol_prompt(sample, args.protocol)
    # A short warm-up faults in the (memory-mapped) weights; then reset the process's peak-RSS mark
    # (Linux) so the figure is this generation's, not the model load's.
    tokensift.generate(model, "Hello", "dense", max_new_tokens=1)
    Path("/proc/self/clear_refs").write_text("5")
    loaded = _status_kib("VmRSS") * 1024
    seconds = []
    for i in range(args.repeats):
        out = tokensift.generate(
            model,
            prompt,
            args.spec,
            question=question,
            max_new_tokens=sample.max_new_tokens,
            answer_prefix=sample.answer_prefix,
        )
        seconds.append(out.stats.prefill_seconds)
        if i == 0:
            peak_rss = _status_kib("VmHWM") * 1024
    print(
        json.dumps(
            {
                "prefill_seconds": seconds,
                "kv_bytes_peak": out.stats.kv_bytes_peak,
                "peak_rss": peak_rss,
                "rss_after_load": loaded,
                "protocol": args.protocol,
            }
        )
    )


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def cost_key(protocol: str, spec: str) -> str:
    """Key of a cost cell in cost.json: the spec, prefixed by the protocol unless query-aware."""
    return spec if protocol == "query-aware" else f"{protocol}|{spec}"


def cost(args: argparse.Namespace, protocol: str, specs: list[str]) -> dict[str, dict]:
    """Cost cells of one protocol, keyed by spec (resumable through OUT/cost.json)."""
    path = args.out / "cost.json"
    done: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    for spec in specs:
        if cost_key(protocol, spec) in done:
            continue
        cmd = [sys.executable, __file__, "--cost-worker", "--spec", spec, "--model", args.model]
        cmd += ["--length", str(args.length), "--protocol", protocol, "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{spec} failed:\n{proc.stderr[-2000:]}")
        done[cost_key(protocol, spec)] = json.loads(proc.stdout.strip().splitlines()[-1])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        tmp.replace(path)
        print(f"cost: {protocol} {spec} done", file=sys.stderr)
    return {spec: done[cost_key(protocol, spec)] for spec in specs}


def quality(args: argparse.Namespace, model, protocol: str, specs: list[str]) -> dict[str, dict]:
    """Per spec: mean score per task and mean KV bytes held, from the bench rows of this protocol."""
    from tokensift.bench.config import BenchConfig
    from tokensift.bench.runner import run_bench
    from tokensift.runtime.plan import Plan

    config = BenchConfig(
        tasks=TASKS,
        methods=["dense", *specs],
        lengths=[args.length],
        model=args.model,
        samples=1,
        depths=depths(args.depths),
        depth_samples=1,
        protocol=protocol,
    )
    rows = run_bench(config, args.out / protocol, model=model)
    cells: dict[str, dict] = {}
    for spec in ["dense", *specs]:
        mine = [r for r in rows if r["method_spec"] == Plan.of(spec).spec and r["length"] == args.length]
        if any(r.get("score") is None for r in mine):
            raise SystemExit(f"{spec}: {next(r['error'] for r in mine if r.get('score') is None)}")
        cells[spec] = {
            "acc": {t: _mean([r["score"] for r in mine if r["task"] == t]) for t in TASKS},
            "kv": _mean([r["kv_bytes_peak"] for r in mine]),
            "applied": all(r.get("applied", True) for r in mine),
            "n": len(mine),
        }
    return cells


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--budgets", default="64,128,256,512")
    parser.add_argument("--depths", type=int, default=4, help="needle depths per task")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="names, or templates with {b}")
    parser.add_argument("--protocols", default="query-aware,query-agnostic")
    parser.add_argument("--agnostic-budgets", default="256", help="budgets also run query-agnostic")
    parser.add_argument("--out", type=Path, default=Path("runs/eviction"))
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills per cost process")
    parser.add_argument("--cost-only", action="store_true", help="skip the accuracy phase")
    parser.add_argument("--quality-from", type=Path, help="results.json whose accuracy cells to reuse")
    parser.add_argument("--render", type=Path, help="print the tables of a saved results.json and exit")
    parser.add_argument("--cost-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--protocol", default="query-aware", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cost_worker:
        cost_worker(args)
        return
    if args.render:
        render(json.loads(args.render.read_text()), args.methods)
        return
    from tokensift.bench.timing import check_repeats

    check_repeats(args.repeats)
    if args.cost_only and args.quality_from is None:
        raise SystemExit("--cost-only needs --quality-from FILE (the accuracy cells to show)")

    import tokensift

    started = time.time()
    budgets = {
        "query-aware": [int(b) for b in args.budgets.split(",")],
        "query-agnostic": [int(b) for b in args.agnostic_budgets.split(",")],
    }
    protocols = args.protocols.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cost_only:
        earlier = json.loads(args.quality_from.read_text())["quality"]
        cells = {p: earlier[p] for p in protocols}
    else:
        model = tokensift.load(args.model)
        cells = {}
        for protocol in protocols:
            specs = [spec_for(m, b) for b in budgets[protocol] for m in args.methods]
            cells[protocol] = quality(args, model, protocol, specs)
        del model
    costs = {
        p: cost(args, p, ["dense", *[spec_for(m, b) for b in budgets[p] for m in args.methods]])
        for p in protocols
    }
    (args.out / "results.json").write_text(
        json.dumps({"quality": cells, "cost": costs, "repeats": args.repeats}, indent=1)
    )

    print(
        f"model {args.model}, {args.length}-token prompts, {args.depths} depths x {len(TASKS)} tasks per "
        f"cell; cost columns from one passkey sample per cell in its own process under the protocol, "
        f"{args.repeats} timed prefills each; {time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s"
    )
    for protocol in protocols:
        print(f"\n### {protocol}\n")
        print(table(cells[protocol], costs[protocol], args.methods, budgets[protocol]))


def render(saved: dict, methods: list[str]) -> None:
    """The tables of a results.json. Files from before the per-protocol cost phase hold one flat
    cost dict, measured query-aware: other protocols then show no cost."""
    for protocol, cells in saved["quality"].items():
        costs = saved.get("cost", {})
        if "dense" in costs:  # the old flat layout
            costs = {"query-aware": costs}
        budgets = sorted({int(s.rsplit("budget=", 1)[1].rstrip(")")) for s in cells if "budget=" in s})
        print(f"\n### {protocol}\n")
        print(table(cells, costs.get(protocol, {}), methods, budgets))


def table(cells: dict[str, dict], costs: dict[str, dict], methods: list[str], budgets: list[int]) -> str:
    dense, dense_cost = cells["dense"], costs.get("dense")
    lines = [
        "| method | budget | passkey | niah_single | KV / dense "
        "| prefill+compress speed-up (dense / method) | peak RSS MiB (over loaded model) |",
        "|---|---|---|---|---|---|---|",
        f"| dense | - | {dense['acc']['passkey']:.2f} | {dense['acc']['niah_single']:.2f} | 1.000 | "
        + (f"1.00x | {_rss(dense_cost)} |" if dense_cost else "- | - |"),
    ]
    for budget in budgets:
        specs = {m: spec_for(m, budget) for m in methods}
        best = max(methods, key=lambda m: sum(cells[specs[m]]["acc"].values()))
        if sum(cells[specs[best]]["acc"].values()) == 0:
            best = ""  # nobody retrieves anything at this budget: no winner
        for method, spec in specs.items():
            r, c = cells[spec], costs.get(spec)
            name = method.replace(":budget={b}", "") + (" **best**" if method == best else "")
            timing = _speedup(dense_cost, c) if c and dense_cost else "-"
            rss = _rss(c) if c else "-"
            lines.append(
                f"| {name} | {budget} | {r['acc']['passkey']:.2f} | {r['acc']['niah_single']:.2f} | "
                f"{r['kv'] / dense['kv']:.3f} | {timing} | {rss} |"
            )
    return "\n".join(lines)


def _speedup(dense: dict, method: dict) -> str:
    """Dense prefill time / method prefill time: median [IQR] over repeats (one run: that ratio)."""
    from tokensift.bench.timing import speedup

    base, mine = dense["prefill_seconds"], method["prefill_seconds"]
    if not isinstance(base, list):  # cost files from before the repeats
        return f"{base / mine:.2f}x (1 run)"
    return speedup(base, mine).format(2, "x")


def _rss(c: dict) -> str:
    return f"{c['peak_rss'] / 2**20:.0f} ({(c['peak_rss'] - c['rss_after_load']) / 2**20:+.0f})"


if __name__ == "__main__":
    main()
