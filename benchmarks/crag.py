"""CRAG against sending all passages, a random subset and top-k by similarity, on the reviews task.

For each item count (4 to 100 reviews), the same samples run five ways: all passages; CRAG (k by
silhouette, one representative per cluster); CRAG with cluster sizes (`counts=true`); a random subset
of the same size as CRAG's; and plain RAG, the top-k passages by embedding similarity to the
question, k the same size (both baselines keep the original order). Prompt tokens are what the model
received (chat template included); accuracy is exact label match of the aspect most reviews
complain about. Plots: docs/crag_tokens.png, docs/crag_accuracy.png.

    OMP_NUM_THREADS=1 flock /tmp/tokensift-heavy.lock .venv/bin/python benchmarks/crag.py
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
from tokensift import embeddings
from tokensift.bench.tasks import get_task

ROOT = Path(__file__).parent.parent
OUT = ROOT / "benchmarks" / "results" / "crag.json"
CONDITIONS = ("all", "crag", "crag+counts", "random", "similarity top-k")


def subset(passages: list[str], question: str, k: int, how: str, seed: int) -> list[str]:
    if how == "random":
        keep = sorted(random.Random(seed).sample(range(len(passages)), k))
    else:
        sims = embeddings.embed(passages) @ embeddings.embed([question])[0]
        keep = sorted(sims.argsort(descending=True)[:k].tolist())
    return [passages[i] for i in keep]


def tokens_only(model, task, sample, method, chosen, condition, t0) -> dict[str, Any]:
    """A row without generation: the prompt tokens the model would receive (accuracy not measured)."""
    from tokensift.runtime.context import build_context
    from tokensift.runtime.generate import encode_split
    from tokensift.runtime.plan import Plan

    text, counters = build_context(Plan.of(method), chosen, sample.meta["intro"], sample.question, 0)
    ids, question_ids = encode_split(model, text, sample.question, answer_prefix=sample.answer_prefix)
    return {
        "items": sample.meta["items"],
        "index": sample.index,
        "condition": condition,
        "answer": sample.answer,
        "prediction": None,
        "score": None,
        "prompt_tokens": len(ids) + len(question_ids),
        "passages_sent": int(counters["passages_kept"]),
        "clusters": counters.get("crag_clusters"),
        "selection_seconds": counters.get("context_seconds", 0.0),
        "seconds": time.perf_counter() - t0,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = tokensift.load(args.model)
    rows = []
    for items in args.items:
        task = get_task(f"reviews:items={items}")
        for sample in task.samples(lambda a, b: 0, 0, args.n, seed=args.seed):
            passages, intro, question = sample.meta["passages"], sample.meta["intro"], sample.question
            kept = None
            for condition in CONDITIONS:
                method, chosen = None, passages
                if condition == "crag":
                    method = "crag"
                elif condition == "crag+counts":
                    method = "crag:counts=true"
                elif condition in ("random", "similarity top-k"):
                    how = "random" if condition == "random" else "similarity"
                    chosen = subset(passages, question, kept or len(passages), how, sample.index)
                t0 = time.perf_counter()
                if args.tokens_only:
                    rows.append(tokens_only(model, task, sample, method, chosen, condition, t0))
                    if condition == "crag":
                        kept = rows[-1]["passages_sent"]
                    continue
                result = tokensift.generate(
                    model,
                    intro,
                    method,
                    passages=chosen,
                    question=question,
                    answer_prefix=sample.answer_prefix,
                    max_new_tokens=4,
                )
                counters = result.stats.counters
                if condition == "crag":
                    kept = int(counters["passages_kept"])
                rows.append(
                    {
                        "items": items,
                        "index": sample.index,
                        "condition": condition,
                        "answer": sample.answer,
                        "prediction": result.text,
                        "score": task.score(sample, result.text),
                        "prompt_tokens": result.stats.prompt_tokens,
                        "passages_sent": int(counters.get("passages_kept", len(chosen))),
                        "clusters": counters.get("crag_clusters"),
                        "selection_seconds": counters.get("context_seconds", 0.0),
                        "seconds": time.perf_counter() - t0,
                    }
                )
        print(items, "done")
    summary = []
    for items in args.items:
        for condition in CONDITIONS:
            group = [r for r in rows if r["items"] == items and r["condition"] == condition]
            summary.append(
                {
                    "items": items,
                    "condition": condition,
                    "n": len(group),
                    "accuracy": None if args.tokens_only else sum(r["score"] for r in group) / len(group),
                    "prompt_tokens": sum(r["prompt_tokens"] for r in group) / len(group),
                    "passages_sent": sum(r["passages_sent"] for r in group) / len(group),
                }
            )
    return {"model": args.model, "summary": summary, "rows": rows}


def plot(result: dict[str, Any], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for condition in CONDITIONS:
        pts = [s for s in summary if s["condition"] == condition]
        ax.plot([s["items"] for s in pts], [s["prompt_tokens"] for s in pts], marker="o", label=condition)
    ax.set_xlabel("reviews in the context")
    ax.set_ylabel("prompt tokens sent (mean)")
    ax.set_title(f"Prompt size vs item count ({result['model']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(docs / "crag_tokens.png", dpi=120)
    if any(s["accuracy"] is None for s in summary):
        return  # --tokens-only: no accuracy to plot
    fig, ax = plt.subplots(figsize=(6, 4))
    for condition in CONDITIONS:
        pts = [s for s in summary if s["condition"] == condition]
        ax.plot([s["prompt_tokens"] for s in pts], [s["accuracy"] for s in pts], marker="o", label=condition)
        for s in pts:
            ax.annotate(str(s["items"]), (s["prompt_tokens"], s["accuracy"]), fontsize=7)
    ax.axhline(0.2, color="grey", lw=0.8, ls="--", label="chance (1/5)")
    ax.set_xscale("log")
    ax.set_xlabel("prompt tokens sent (mean, log scale); labels: reviews in the context")
    ax.set_ylabel("accuracy (most-complained aspect)")
    ax.set_title(f"Accuracy vs tokens ({result['model']}, n per point in crag.json)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "crag_accuracy.png", dpi=120)


def table(result: dict[str, Any]) -> str:
    """The README table: mean prompt tokens and accuracy per item count and condition."""
    items = sorted({s["items"] for s in result["summary"]})
    head = "| condition | " + " | ".join(f"{n} reviews: tokens / acc." for n in items) + " |"
    lines = [head, "|---" * (len(items) + 1) + "|"]
    for condition in CONDITIONS:
        cells = []
        for n in items:
            s = next(x for x in result["summary"] if x["items"] == n and x["condition"] == condition)
            accuracy = "-" if s["accuracy"] is None else f"{s['accuracy']:.2f}"
            cells.append(f"{s['prompt_tokens']:.0f} / {accuracy}")
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--items", type=int, nargs="+", default=[4, 10, 25, 50, 100])
    parser.add_argument("--n", type=int, default=8, help="samples per item count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--table", action="store_true", help="print the README table of --out and exit")
    parser.add_argument("--tokens-only", action="store_true", help="count prompt tokens, generate nothing")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    start = time.time()
    result = run(args)
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result["machine"] = {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()}
    result["seconds"] = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.docs)
    for s in result["summary"]:
        print(s)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
