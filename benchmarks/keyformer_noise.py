"""Keyformer's prefill with counter-based Gumbel noise, beside dense and H2O on one leaderboard prompt.

    flock /tmp/tokensift-heavy.lock python benchmarks/keyformer_noise.py \
        [--task niah_single_1] [--ratio 0.25] [--rounds 2] [--before] [--agnostic] [--out PATH.json]

The prompt is the leaderboard suite's first sample of `--task` (qwen2.5-coder-0.5b, 4k, query-aware,
the same sample as the committed rows of benchmarks/results/leaderboard). Each method runs the
suite's own `Task.evaluate` (prefill, compression, greedy answer), one after another in one process:
dense, H2O and Keyformer at the compression ratio, interleaved for `--rounds` rounds (a cost that
grows per call, or a load change, shows between rounds); with `--before` the first round also runs
Keyformer with the previous noise (a seeded serial torch generator's `exponential_` on every prompt
logit), and with `--agnostic` the last round also runs Keyformer under the query-agnostic protocol
(the context prefilled alone, then the question).
Then, for the second question of issue 17's leaderboard: where the needle's value tokens sit in the
prompt and which of them StreamingLLM's and H2O's prefill keep, per layer and KV head. Timings on the
shared 2-core machine are noisy: compare ratios within one run.

    python benchmarks/keyformer_noise.py --rerun-rows benchmarks/results/leaderboard/results.jsonl \
        --out PATH.json

re-runs instead every Keyformer row of a leaderboard results file with the current noise and puts
each row's old and new prediction, score and prefill seconds side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.suites import SUITES
from tokensift.bench.tasks import get_task
from tokensift.methods.keyformer import Keyformer
from tokensift.methods.spec import with_compression_ratio
from tokensift.models import load
from tokensift.runtime.generate import encode_split


@dataclass
class SerialNoiseKeyformer(Keyformer):
    """Keyformer with the noise of commit 94ed91d: one seeded CPU generator, `exponential_` per logit."""

    def column_scores(self, layer: Any) -> Any:
        steps = self.steps or layer.cache.shared.get("max_new_tokens") or 128
        tau = self.temperature(layer.extra.get("keyformer_step", 0), steps)
        generator = layer.cache.shared.get("keyformer_rng")
        if generator is None:
            generator = layer.cache.shared["keyformer_rng"] = torch.Generator(layer.device).manual_seed(
                self.seed
            )

        def scores(logits: torch.Tensor) -> torch.Tensor:
            probs = torch.softmax(logits / tau, dim=-1)
            noise = torch.empty_like(probs).exponential_(generator=generator)
            weights = probs.div_(noise) if tau == 1.0 else probs.mul_(noise.pow_(-1.0 / tau))
            return weights.div_(weights.sum(dim=-1, keepdim=True))

        return scores


def needle_span(tokenizer: Any, ids: list[int], value: str) -> list[int]:
    """Positions of the shortest run of tokens that decodes to `value` (surrounding spaces aside)."""
    for a in range(len(ids)):
        for b in range(a + 1, min(len(ids), a + 16) + 1):
            text = tokenizer.decode(ids[a:b]).strip()
            if not text:
                break  # a run starts at a token that shows part of the value
            if text == value:
                return list(range(a, b))
            if not value.startswith(text):
                break
    raise SystemExit(f"needle value {value!r} not found in the prompt's tokens")


def kept_needle(model: Any, ids: list[int], spec: str, span: list[int]) -> dict[str, Any]:
    """After one prefill under `spec`: how many needle tokens each layer's KV heads hold."""
    cache = tokensift.TokenCache(model.model, spec)
    with torch.inference_mode():
        model.model(torch.tensor([ids]), cache=cache, use_cache=True)
    needle = torch.tensor(span)
    per_layer = []
    for layer in cache.layers:
        held = torch.isin(layer.positions[0], needle).sum(dim=-1)  # (H_kv,) needle tokens per head
        per_layer.append(held.tolist())
    flat = [n for heads in per_layer for n in heads]
    return {
        "spec": spec,
        "tokens_held_per_head": layer.positions.shape[-1],
        "needle_tokens_held_per_layer_and_kv_head": per_layer,
        "heads_holding_the_whole_needle": sum(n == len(span) for n in flat),
        "heads_holding_none_of_it": sum(n == 0 for n in flat),
        "heads": len(flat),
    }


def rerun_rows(results: Path, out: Path) -> None:
    """Re-run every Keyformer row of a leaderboard results file with the current noise: old vs new."""
    suite = SUITES["leaderboard"]
    model = load(suite.model, dtype=suite.dtype)
    count = token_counter(model)
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    compared = []
    for row in rows:
        if not row["method_spec"].startswith("keyformer:"):
            continue
        task = get_task(row["task"])
        samples = task.samples(
            count, row["length"], suite.samples_for(task.uses_depth), row["seed"], suite.depths
        )
        sample = next(x for x in samples if x.index == row["index"] and x.depth == row["depth"])
        result = task.evaluate(model, tokensift.Plan.of(row["method_spec"]), sample, row["protocol"])
        compared.append(
            {
                **{k: row[k] for k in ("task", "index", "depth", "protocol", "method_spec")},
                "old": {k: row[k] for k in ("prediction", "score", "prefill_seconds")},
                "new": {k: result[k] for k in ("prediction", "score", "prefill_seconds")},
            }
        )
        print(json.dumps(compared[-1]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/keyformer_noise.py --rerun-rows {results} --out {out}"
    out.write_text(json.dumps({"command": command, "rows": compared}, indent=1) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="niah_single_1")
    parser.add_argument("--ratio", type=float, default=0.25, help="compression ratio (fraction removed)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", action="store_true", help="also run the previous serial-generator noise")
    parser.add_argument("--agnostic", action="store_true", help="also Keyformer once, query-agnostic")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/keyformer_noise.json"))
    parser.add_argument(
        "--rerun-rows", type=Path, help="instead: re-run the Keyformer rows of this leaderboard results.jsonl"
    )
    args = parser.parse_args()
    if args.rerun_rows:
        return rerun_rows(args.rerun_rows, args.out)

    suite = SUITES["leaderboard"]
    model = load(suite.model, dtype=suite.dtype)
    task = get_task(args.task)
    n = suite.samples_for(task.uses_depth)
    sample = task.samples(token_counter(model), suite.lengths[0], n, suite.seed, suite.depths)[0]
    specs = {m: with_compression_ratio(m, args.ratio) for m in ("streaming_llm", "h2o", "keyformer")}
    methods: list[tuple[str, Any]] = [("dense", "dense"), ("h2o", specs["h2o"])]
    methods.append(("keyformer", specs["keyformer"]))
    runs = [(i, label, plan) for i in range(args.rounds) for label, plan in methods]
    if args.before:
        budget = float(specs["keyformer"].split("budget=")[1].split(",")[0])
        before = tokensift.Plan.of(SerialNoiseKeyformer(budget=budget))
        runs.insert(len(methods), (0, "keyformer, serial-generator noise (before)", before))
    if args.agnostic:
        runs.append((args.rounds - 1, "keyformer [query-agnostic]", specs["keyformer"]))
    text, _ = task.protocol_prompt(sample, "query-aware")
    ids = encode_split(model, text, None, answer_prefix=sample.answer_prefix)[0]
    tokensift.generate(model, ids[:256], "dense", max_new_tokens=2)  # warm-up: lazy imports and inits
    rows = []
    for round_, label, plan in runs:
        t0, cpu0 = time.perf_counter(), time.process_time()
        protocol = "query-agnostic" if label.endswith("[query-agnostic]") else "query-aware"
        result = task.evaluate(model, tokensift.Plan.of(plan), sample, protocol)
        rows.append(
            {
                "round": round_,
                "method": label,
                "spec": plan if isinstance(plan, str) else repr(plan.methods[0]),
                "prefill_seconds": result["prefill_seconds"],
                "wall_seconds": time.perf_counter() - t0,
                "process_cpu_seconds": time.process_time() - cpu0,
                "prediction": result["prediction"],
                "score": result["score"],
                "tokens_held": result.get("tokens_held"),
                "load_1min_after": os.getloadavg()[0],
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    span = needle_span(model.tokenizer, ids, sample.answer[0])
    keeps = [kept_needle(model, ids, specs[m], span) for m in ("streaming_llm", "h2o")]
    for keep in keeps:
        print(json.dumps({k: v for k, v in keep.items() if "per_layer" not in k}), flush=True)

    by_method: dict[str, list[float]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r["prefill_seconds"])
    median = {m: statistics.median(v) for m, v in by_method.items()}
    per_round = [[r for r in rows if r["round"] == i] for i in range(args.rounds)]
    report = {
        "command": "python benchmarks/keyformer_noise.py "
        + " ".join(
            [f"--task {args.task}", f"--ratio {args.ratio}", f"--rounds {args.rounds}"]
            + (["--before"] if args.before else [])
            + (["--agnostic"] if args.agnostic else [])
        ),
        "model": suite.model,
        "task": args.task,
        "length": sample.length,
        "depth": sample.depth,
        "index": sample.index,
        "prompt_tokens": len(ids),
        "answer": sample.answer,
        "torch_threads": torch.get_num_threads(),
        "runs": rows,
        "prefill_seconds_median": median,
        "prefill_over_dense_median": {m: v / median["dense"] for m, v in median.items()},
        "prefill_over_dense_per_round": [
            {r["method"]: r["prefill_seconds"] / group[0]["prefill_seconds"] for r in group}
            for group in per_round
        ],
        "needle_positions": span,
        "needle_kept_after_prefill": keeps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
