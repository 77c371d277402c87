"""Decode speed of the generation-loop methods, as ratios to plain greedy decoding in the same run.

    python benchmarks/generation_loops.py [--models smollm2-135m] [--pair LARGE:SMALL] [--length 400]

Part 1 (each of --models): plain greedy, suffix_decoding and prompt_lookup on the repetitive
workloads of tokensift.bench.tasks.loop_workloads (outputs re-use the prompt) and on open-ended chat
prompts. Decode tokens/s is (new tokens - 1) / decode seconds, the median over --repeats (default 5)
interleaved runs (plain, method, plain, ...); the drafting methods are lossless, so each row also checks that
their tokens equal plain greedy's. Global suffix trees are cleared before every generation: drafts
come from the request's own prompt and output only. Because other processes share the cores, each
ratio is also given in CPU time of this process (decode CPU seconds: the generation's minus a
prefill-only run's), which is what the decode would take on a dedicated core. Speed-ups (plain time /
method time) are paired per repeat and reported as median [IQR] over all pairs of a workload
(tokensift.bench.timing).

Part 2 (--pair LARGE:SMALL, models sharing a tokenizer): the large model alone, the small model
alone, bild and entropy_routing at their default thresholds: tokens/s relative to the large model
and agreement with its greedy output (share of positions with the same token, and whether the whole
output is identical).

Torch runs on --threads threads (default 1: on a shared 2-core machine, two OpenMP threads stall
each other whenever another process runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks.loop_workloads import OPEN_ENDED_PROMPTS, WORKLOADS
from tokensift.bench.timing import Spread, add_repeats_argument, check_repeats
from tokensift.speculative import clear_global_caches

DRAFTERS = ["suffix_decoding", "prompt_lookup"]  # --drafters replaces this list


@dataclass
class Prompt:
    group: str  # a workload name or "open-ended"
    text: str
    task: Any = None
    sample: Any = None


@dataclass
class Runs:
    seconds: list[float] = field(default_factory=list)  # decode wall-clock, per repeat
    cpu: list[float] = field(default_factory=list)  # decode CPU seconds of this process, per repeat
    tokens: list[int] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    score: float | None = None

    @property
    def tps(self) -> float:
        return (len(self.tokens) - 1) / statistics.median(self.seconds)

    def vs(self, base: Runs) -> tuple[list[float], list[float]]:
        """(wall-clock, CPU-time) speed-ups over `base` (its time / this time, per token), one per
        paired repeat."""
        per = (len(self.tokens) - 1) / max(1, len(base.tokens) - 1)
        wall = [per * b / s for b, s in zip(base.seconds, self.seconds, strict=True)]
        cpu = [per * b / s for b, s in zip(base.cpu, self.cpu, strict=True)]
        return wall, cpu


def pooled(rows: list[dict[str, Runs]], key: str, base: str) -> tuple[Spread, Spread]:
    """Wall and CPU speed-ups of `key` over `base`: median [IQR] over every paired repeat of every
    prompt of a group."""
    pairs = [rows_[key].vs(rows_[base]) for rows_ in rows]
    return Spread.of(w for wall, _ in pairs for w in wall), Spread.of(c for _, cpu in pairs for c in cpu)


def prompts(
    model: tokensift.Model, workloads: list[str], length: int, samples: int, chats: int
) -> list[Prompt]:
    count = token_counter(model)
    out = []
    for name in workloads:
        task = WORKLOADS[name]()
        out += [Prompt(name, s.prompt, task, s) for s in task.samples(count, length, samples, seed=0)]
    out += [Prompt("open-ended", p) for p in OPEN_ENDED_PROMPTS[:chats]]
    return out


def prefill_cpu(model: tokensift.Model, prompt: Prompt) -> float:
    start = time.process_time()
    tokensift.generate(model, prompt.text, None, max_new_tokens=1)
    return time.process_time() - start


def run(
    model: tokensift.Model, prompt: Prompt, method: Any, new_tokens: int, runs: Runs, prefill: float
) -> None:
    clear_global_caches()
    start = time.process_time()
    out = tokensift.generate(model, prompt.text, method, max_new_tokens=new_tokens)
    runs.cpu.append(max(1e-9, time.process_time() - start - prefill))
    runs.seconds.append(out.stats.decode_seconds)
    runs.tokens = out.token_ids
    runs.counters = out.stats.counters
    if prompt.task is not None:
        runs.score = prompt.task.score(prompt.sample, out.text)


def measure(
    model: tokensift.Model, items: list[Prompt], methods: list[Any], new_tokens: int, repeats: int
) -> list[dict[str, Runs]]:
    results = []
    for i, prompt in enumerate(items):
        row = {str(m): Runs() for m in methods}
        prefill = prefill_cpu(model, prompt)
        for _ in range(repeats):
            for method in methods:  # interleaved, so load changes hit every method alike
                run(model, prompt, method, new_tokens, row[str(method)], prefill)
        results.append(row)
        print(
            f"  [{i + 1}/{len(items)}] {prompt.group}: "
            + ", ".join(f"{k} {r.tps:.1f}" for k, r in row.items())
        )
    return results


def by_group(items: list[Prompt], results: list[dict[str, Runs]]) -> dict[str, list[dict[str, Runs]]]:
    groups: dict[str, list[dict[str, Runs]]] = {}
    for prompt, row in zip(items, results, strict=True):
        groups.setdefault(prompt.group, []).append(row)
    return groups


def _fmt(spread: dict[str, float]) -> str:
    return Spread(spread["median"], spread["q1"], spread["q3"], spread["n"]).format(2, "x")


def drafting_table(model: str, items: list[Prompt], results: list[dict[str, Runs]]) -> list[dict[str, Any]]:
    """Print the drafting table; returns its rows."""
    print(
        f"\n#### {model}: drafting vs plain greedy (decode tok/s wall-clock; speed-ups = plain time / "
        "method time, wall / CPU, median [IQR] over every paired repeat of the group's prompts)\n"
    )
    head = "| workload | prompts | plain tok/s |"
    rule = "|---|---|---|"
    for d in DRAFTERS:
        head += f" {d} tok/s | vs plain (wall / CPU) | tokens/step | acceptance | identical |"
        rule += "---|---|---|---|---|"
    print(head + " score |")
    print(rule + "---|")
    table = []
    for group, rows in by_group(items, results).items():
        scores = [r["None"].score for r in rows if r["None"].score is not None]
        entry: dict[str, Any] = {
            "model": model,
            "workload": group,
            "prompts": len(rows),
            "plain_tokens_per_second": statistics.mean(r["None"].tps for r in rows),
            "score": statistics.mean(scores) if scores else None,
            "methods": {},
        }
        line = f"| {group} | {len(rows)} | {entry['plain_tokens_per_second']:.1f} |"
        for d in DRAFTERS:
            stats = {
                "tokens_per_second": statistics.mean(r[d].tps for r in rows),
                "speedup_wall": pooled(rows, d, "None")[0].as_dict(),
                "speedup_cpu": pooled(rows, d, "None")[1].as_dict(),
                "tokens_per_step": statistics.mean(
                    r[d].counters.get("loop_tokens_per_step", 1.0) for r in rows
                ),
                "acceptance_rate": statistics.mean(
                    r[d].counters.get("loop_acceptance_rate", 0.0) for r in rows
                ),
                "identical": sum(r[d].tokens == r["None"].tokens for r in rows),
            }
            entry["methods"][d] = stats
            line += (
                f" {stats['tokens_per_second']:.1f} | {_fmt(stats['speedup_wall'])} / "
                f"{_fmt(stats['speedup_cpu'])} | {stats['tokens_per_step']:.2f} | "
                f"{stats['acceptance_rate']:.2f} | {stats['identical']}/{len(rows)} |"
            )
        line += f" {entry['score']:.2f} |" if scores else " - |"
        print(line)
        table.append(entry)
    return table


def agreement(tokens: list[int], reference: list[int]) -> float:
    n = max(len(tokens), len(reference))
    return sum(a == b for a, b in zip(tokens, reference, strict=False)) / n if n else 1.0


def pair_table(
    large: str, small: str, items: list[Prompt], results: list[dict[str, Runs]], keys: list[str]
) -> list[dict[str, Any]]:
    """Print the pair table; returns its rows."""
    print(f"\n#### {large} with {small}: speed vs the large model and agreement with its greedy output\n")
    print(
        "| workload | method | tok/s | vs large (wall / CPU) | agreement | identical | small/routed share "
        "| score |"
    )
    print("|---|---|---|---|---|---|---|---|")
    table = []
    for group, rows in by_group(items, results).items():
        for key in keys:
            label = key.split(":")[0] if key.startswith(("bild", "entropy")) else key
            share, share_text = None, ""
            if key.startswith("bild"):
                share = statistics.mean(r[key].counters["bild_small_share"] for r in rows)
                share_text = f"{share:.2f} small"
            elif key.startswith("entropy"):
                share = statistics.mean(r[key].counters["routing_share"] for r in rows)
                share_text = f"{share:.2f} routed"
            scores = [r[key].score for r in rows if r[key].score is not None]
            entry = {
                "workload": group,
                "method": key,
                "prompts": len(rows),
                "tokens_per_second": statistics.mean(r[key].tps for r in rows),
                "speedup_wall": pooled(rows, key, "large")[0].as_dict(),
                "speedup_cpu": pooled(rows, key, "large")[1].as_dict(),
                "agreement": statistics.mean(agreement(r[key].tokens, r["large"].tokens) for r in rows),
                "identical": sum(r[key].tokens == r["large"].tokens for r in rows),
                "share": share,
                "score": statistics.mean(scores) if scores else None,
            }
            table.append(entry)
            print(
                f"| {group} | {label} | {entry['tokens_per_second']:.2f} | "
                f"{_fmt(entry['speedup_wall'])} / {_fmt(entry['speedup_cpu'])} | "
                f"{entry['agreement']:.2f} | {entry['identical']}/{len(rows)} | {share_text} | "
                + (f"{entry['score']:.2f} |" if scores else "- |")
            )
    return table


def raw(items: list[Prompt], results: list[dict[str, Runs]]) -> list[dict[str, Any]]:
    """Per prompt and method: every repeat's timings, the tokens and the loop counters."""
    return [
        {
            "group": prompt.group,
            "prompt_chars": len(prompt.text),
            "runs": {
                key: {
                    "decode_seconds": r.seconds,
                    "decode_cpu_seconds": r.cpu,
                    "new_tokens": len(r.tokens),
                    "token_ids": r.tokens,
                    "score": r.score,
                    "counters": r.counters,
                }
                for key, r in row.items()
            },
        }
        for prompt, row in zip(items, results, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[tokensift.DEFAULT_MODEL])
    parser.add_argument("--drafters", nargs="+", default=DRAFTERS, help="lossless drafting method specs")
    parser.add_argument("--pair", default="", help="LARGE:SMALL, e.g. qwen2.5-coder-1.5b:qwen2.5-coder-0.5b")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--pair-workloads", nargs="+", default=["edit_code", "self_refine"])
    parser.add_argument("--length", type=int, default=400, help="prompt tokens of the workloads")
    parser.add_argument("--pair-length", type=int, default=300, help="prompt tokens of the pair's workloads")
    parser.add_argument("--samples", type=int, default=2, help="samples per workload")
    parser.add_argument("--chats", type=int, default=4, help="open-ended prompts")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--pair-new-tokens", type=int, default=40)
    add_repeats_argument(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/generation_loops.json"))
    args = parser.parse_args()
    DRAFTERS[:] = args.drafters
    check_repeats(args.repeats)
    torch.set_num_threads(args.threads)
    print(
        f"generation loops, {args.length}-token workload prompts, up to {args.new_tokens} new tokens, "
        f"{args.repeats} interleaved repeats, torch threads {torch.get_num_threads()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    report: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "drafting": {},
        "pair": None,
    }

    for name in args.models:
        model = tokensift.load(name)
        tokensift.generate(model, "Hello", None, max_new_tokens=4)  # warm-up
        items = prompts(model, args.workloads, args.length, args.samples, args.chats)
        print(f"\n{name}: {len(items)} prompts")
        results = measure(model, items, [None, *DRAFTERS], args.new_tokens, args.repeats)
        report["drafting"][name] = {
            "table": drafting_table(name, items, results),
            "prompts": raw(items, results),
        }
        save(args.json, report)
        del model
        tokensift.models._LOADED.clear()
        gc.collect()

    if args.pair:
        large_name, small_name = args.pair.split(":")
        large, small = tokensift.load(large_name), tokensift.load(small_name)
        tokensift.generate(large, "Hello", None, max_new_tokens=2)
        items = prompts(large, args.pair_workloads, args.pair_length, 1, min(args.chats, 2))
        bild = f"bild:small={small_name}"
        routing = f"entropy_routing:small={small_name}"
        print(f"\n{large_name} + {small_name}: {len(items)} prompts")
        results = []
        for i, prompt in enumerate(items):
            row = {k: Runs() for k in ["large", "small", bild, routing]}
            prefill, small_prefill = prefill_cpu(large, prompt), prefill_cpu(small, prompt)
            for _ in range(args.repeats):
                run(large, prompt, None, args.pair_new_tokens, row["large"], prefill)
                run(small, prompt, None, args.pair_new_tokens, row["small"], small_prefill)
                run(large, prompt, bild, args.pair_new_tokens, row[bild], prefill)
                run(large, prompt, routing, args.pair_new_tokens, row[routing], prefill)
            results.append(row)
            print(
                f"  [{i + 1}/{len(items)}] {prompt.group}: "
                + ", ".join(f"{k} {r.tps:.2f}" for k, r in row.items())
            )
        report["pair"] = {
            "large": large_name,
            "small": small_name,
            "table": pair_table(large_name, small_name, items, results, ["large", "small", bild, routing]),
            "prompts": raw(items, results),
        }
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(args.json, report)
    print(f"\nwrote {args.json}")


def save(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
