"""ZeroTuning against dense on held-out classification splits, plus its effect on retrieval and perplexity.

For each model: the labelled tasks' `test` split (disjoint from the `calibration` split the shipped
profile was searched on) is scored by exact label match, dense and with the model's calibrated
profile (`zerotuning:profile=default`), and optionally a fixed uncalibrated setting. Accuracy comes
with a 95% bootstrap interval, and the dense -> zerotuning difference with a paired bootstrap
interval. The same plans run a passkey retrieval task and perplexity on Austen prose, to show the
bias does not silently break them.

    OMP_NUM_THREADS=1 flock /tmp/tokensift-heavy.lock .venv/bin/python benchmarks/zerotuning.py
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks import get_task
from tokensift.runtime.plan import Plan

OUT = Path(__file__).parent / "results" / "zerotuning.json"
PROFILE_KEYS = ("objective", "tasks", "gamma", "table", "calibrated", "baseline", "command")


def bootstrap(values: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return [means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]]


def classify(model: tokensift.Model, plan: Plan, samples: list, task, new_tokens: int) -> list[float]:
    out = []
    for sample in samples:
        result = tokensift.generate(model, sample.prompt, plan, max_new_tokens=new_tokens, raw=True)
        out.append(task.score(sample, result.text))
    return out


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model = tokensift.load(name)
    plans = {"dense": Plan.of("dense"), "zerotuning (calibrated)": Plan.of("zerotuning:profile=default")}
    for spec in args.fixed:
        plans[spec] = Plan.of(spec)
    from tokensift.calibration import load_artefact

    artefact = load_artefact("zerotuning", model)
    row: dict[str, Any] = {
        "model": name,
        "profile": {
            k: artefact[k] for k in ("objective", "tasks", "gamma", "table", "calibrated", "baseline")
        },
        "classification": {},
    }
    for task_name in args.tasks:
        task = get_task(f"{task_name}:split=test")
        samples = task.samples(lambda a, b: 0, 0, args.n, seed=args.seed)
        scores = {
            label: classify(model, plan, samples, task, args.new_tokens) for label, plan in plans.items()
        }
        dense = scores["dense"]
        entry = {"n": len(samples), "chance": 1 / len(task.labels)}
        for label, values in scores.items():
            diff = [a - b for a, b in zip(values, dense, strict=True)]
            entry[label] = {
                "accuracy": sum(values) / len(values),
                "ci95": bootstrap(values),
                "delta_vs_dense": sum(diff) / len(diff),
                "delta_ci95": bootstrap(diff),
            }
        row["classification"][task_name] = entry
        print(name, task_name, {k: round(v["accuracy"], 3) for k, v in entry.items() if isinstance(v, dict)})
    count = token_counter(model)
    retrieval = get_task("passkey")
    keys = retrieval.samples(count, args.retrieval_length, args.retrieval_n, seed=args.seed)
    row["passkey"] = {"length": args.retrieval_length, "n": len(keys)}
    ppl_task = get_task("perplexity")
    ppl_sample = ppl_task.samples(count, args.ppl_length, 1, seed=args.seed)[0]
    row["perplexity"] = {"length": args.ppl_length}
    for label, plan in plans.items():
        hits = [retrieval.evaluate(model, plan, s)["score"] for s in keys]
        row["passkey"][label] = sum(hits) / len(hits)
        row["perplexity"][label] = ppl_task.evaluate(model, plan, ppl_sample)["score"]
    print(name, "passkey", row["passkey"], "perplexity", row["perplexity"])
    return row


def acc(entry: dict[str, Any]) -> str:
    return f"{entry['accuracy']:.3f} [{entry['ci95'][0]:.2f}, {entry['ci95'][1]:.2f}]"


def table(result: dict[str, Any]) -> str:
    """The README table: accuracy (95% CI) per model, task and plan, and the paired difference."""
    lines = [
        "| model | task (test split) | n | dense | zerotuning (calibrated) | difference (95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["models"]:
        for task, e in row["classification"].items():
            d, z = e["dense"], e["zerotuning (calibrated)"]
            lines.append(
                f"| {row['model']} | {task} | {e['n']} | {acc(d)} | {acc(z)} "
                f"| {z['delta_vs_dense']:+.3f} [{z['delta_ci95'][0]:+.2f}, {z['delta_ci95'][1]:+.2f}] |"
            )
    lines += [
        "",
        "| model | profile (γ, heads) | passkey dense / zt | perplexity dense / zt |",
        "|---|---|---|---|",
    ]
    for row in result["models"]:
        p, k, q = row["profile"], row["passkey"], row["perplexity"]
        lines.append(
            f"| {row['model']} | γ={p['gamma']}, {len(p['table'])} heads ({p['objective']}) "
            f"| {k['dense']:.2f} / {k['zerotuning (calibrated)']:.2f} (n={k['n']}, {k['length']} tok) "
            f"| {q['dense']:.3f} / {q['zerotuning (calibrated)']:.3f} ({q['length']} tok) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    parser.add_argument("--tasks", default="sentiment,topic")
    parser.add_argument("--n", type=int, default=40, help="test samples per task")
    parser.add_argument("--fixed", nargs="*", default=[], help="uncalibrated specs to add")
    parser.add_argument(
        "--new-tokens", type=int, default=2, help="tokens generated (the first word is scored)"
    )
    parser.add_argument("--retrieval-length", type=int, default=1024)
    parser.add_argument("--retrieval-n", type=int, default=5)
    parser.add_argument("--ppl-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--merge", action="store_true", help="keep other models' rows already in --out")
    parser.add_argument("--table", action="store_true", help="print the README table of --out and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    args.tasks = args.tasks.split(",")
    start = time.time()
    rows = [run_model(m, args) for m in args.models.split(",")]
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "seconds": time.time() - start,
        "note": "raw prompts (no chat template) for classification, as the calibration; passkey and "
        "perplexity use the bench's defaults. Accuracy by exact label match on the test split.",
        "models": rows,
    }
    if args.merge and args.out.is_file():
        # Keep the other models' rows of an earlier run (each model's rows carry their own args).
        done = {r["model"] for r in rows}
        rows += [r for r in json.loads(args.out.read_text())["models"] if r["model"] not in done]
    for row in rows:
        row.setdefault("args", result["args"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
