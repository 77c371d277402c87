"""Dynamic sparse decoding against dense on the same prompts: decode speed, attention time, selection
overhead and retrieval accuracy, as ratios to dense measured in the same run.

    python benchmarks/sparse_decode.py [--model smollm2-135m] [--lengths 2048 4096 8192]
        [--budgets 256 512 1024] [--methods quest tokenselect ...] [--new-tokens 32] [--repeats 5]
        [--accuracy-lengths 8192] [--accuracy-budgets 512] [--samples 1] [--profile-budget 512]
        [--threads N] [--json benchmarks/results/sparse_decode.json]

Every prompt is prefilled once, densely, and its K/V are replayed into a fresh cache per method
(`TokenLayer.update`, as the model's own forward fills a cache), so all methods decode from the same
state. Prefill is dense for every method measured here (HiP runs with sparse_prefill=false): the
comparison is about decoding. The replay is checked once against a genuine `generate()`.

`--threads 1` decodes on one thread, dense and methods alike. On a busy machine a multi-threaded
op waits for its second thread to be scheduled, which costs dense decoding far more than the
methods' sparse steps (they run single-threaded by design): with one thread the comparison measures
the skipped work, not the scheduler.

Speed: the passkey prompt (depth 0.5) of each length, `--new-tokens` greedy tokens (EOS ignored),
`--repeats` rounds (>= 5 for a claim) with the methods in rotated order; medians with the
interquartile range, and speed-ups (dense time / method time) paired per round, so a target is met
only when the lower quartile of the ratio meets it (tokensift.bench.timing). "attention" is the wall time of
tokensift's per-layer attention call (`runtime.attention.run_layer`) for decode queries, timed around
it for dense and methods alike (selection included); "selection" is the share of that time the method
reports as `selection_seconds`.

Profiles: at the largest length, each method at `--profile-budget` and dense, 8 steps under
torch.profiler (top ops by self CPU time; time outside attention / selection / attention proper).
Accuracy: passkey (depths 0.1/0.5/0.9) and niah_single (depths 0.25/0.75), `--samples` per depth,
at `--accuracy-lengths` and `--accuracy-budgets`, scored by the tasks' scorers, with dense on the
same prompts; "agreement" is the share of prompts whose greedy tokens equal dense's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import tokensift
import tokensift.runtime.attention as attention
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks import get_task
from tokensift.bench.timing import Spread, add_repeats_argument, check_repeats, speedup
from tokensift.runtime.cache import PENDING, TokenCache
from tokensift.runtime.generate import Decoding, decode_plain, encode, eos_ids, forward

METHODS = ["quest", "tokenselect", "tidaldecode", "hip"]
EXTRA = {"hip": ",sparse_prefill=false"}  # decode-only HiP: every method shares the dense prefill
TASKS = {"passkey": [0.1, 0.5, 0.9], "niah_single": [0.25, 0.75]}
TARGETS = {"decode_vs_dense": 1.4, "attention_speedup": 6.0}  # at the largest context, accuracy budget


class AttentionClock:
    """Wall time spent in decode-query attention calls (run_layer with one query), all layers."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.inner = attention.run_layer

    def __call__(self, layer: Any, query: torch.Tensor, *args: Any) -> torch.Tensor:
        if query.shape[2] != 1:
            return self.inner(layer, query, *args)
        t = time.perf_counter()
        out = self.inner(layer, query, *args)
        self.seconds += time.perf_counter() - t
        return out


@dataclass
class Prefilled:
    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor
    seconds: float


@dataclass
class Run:
    tokens: list[int]
    decode_seconds: float
    attention_seconds: float
    counters: dict[str, float] = field(default_factory=dict)


PREFILL_THREADS = torch.get_num_threads()  # prefill keeps every thread; `--threads` is for decoding


def prefill(model: tokensift.Model, ids: list[int]) -> Prefilled:
    threads = torch.get_num_threads()
    torch.set_num_threads(PREFILL_THREADS)
    t = time.perf_counter()
    with torch.inference_mode():
        cache = TokenCache(model, "dense", prompt_tokens=len(ids))
        logits = forward(model, torch.tensor([ids]), cache)[0, -1]
    seconds = time.perf_counter() - t
    torch.set_num_threads(threads)
    return Prefilled(ids, [(layer.k, layer.v) for layer in cache.layers], logits, seconds)


def decode(
    model: tokensift.Model,
    spec: str,
    pre: Prefilled,
    new_tokens: int,
    clock: AttentionClock,
    ignore_eos: bool,
) -> Run:
    """Greedy decoding under `spec` from a replay of the dense prefill."""
    with torch.inference_mode():
        cache = TokenCache(model, spec, prompt_tokens=len(pre.ids))
        for layer, (k, v) in zip(cache.layers, pre.kv, strict=True):
            layer.update(k, v)  # adopts the prefill tensors; the first append reallocates, never writes them
        PENDING.set(None)
        decoding = Decoding(model, cache, new_tokens, eos=eos_ids(model), ignore_eos=ignore_eos)
        clock.seconds = 0.0
        t = time.perf_counter()
        decode_plain(decoding, pre.logits)
        seconds = time.perf_counter() - t
    return Run(decoding.tokens, seconds, clock.seconds, dict(cache.counters))


def specs(methods: list[str], budgets: list[int]) -> list[str]:
    return ["dense"] + [f"{m}:budget={b}{EXTRA.get(m, '')}" for m in methods for b in budgets]


def speed(model, lengths, all_specs, args, clock, profiles):  # type: ignore[no-untyped-def]
    """Speed rows for every length and spec; profiles of the methods at `--profile-budget` at the
    largest length, from the same prefill, are appended to `profiles`."""
    rows = []
    task = get_task("passkey")
    for length in lengths:
        sample = task.samples(token_counter(model), length, 1, seed=0, depths=[0.5])[0]
        pre = prefill(model, encode(model, sample.prompt))
        print(f"speed {length}: prefill {len(pre.ids)} tokens in {pre.seconds:.1f} s", flush=True)
        runs: dict[str, list[Run]] = {s: [] for s in all_specs}
        for r in range(args.repeats):
            order = all_specs[r % len(all_specs) :] + all_specs[: r % len(all_specs)]
            for spec in order:
                runs[spec].append(decode(model, spec, pre, args.new_tokens, clock, ignore_eos=True))
        steps = args.new_tokens - 1
        base = runs["dense"]
        for spec, rs in runs.items():
            tps = Spread.of(steps / r.decode_seconds for r in rs)
            att = Spread.of(r.attention_seconds / steps for r in rs)
            # Paired per repeat: dense time / method time of the same round.
            decode_ratio = speedup([r.decode_seconds for r in base], [r.decode_seconds for r in rs])
            att_ratio = speedup([r.attention_seconds for r in base], [r.attention_seconds for r in rs])
            c = rs[0].counters
            cached = len(pre.ids) + (steps + 1) / 2  # mean cache length over the decode steps
            select = statistics.median(
                r.counters.get("selection_seconds", 0.0) / r.attention_seconds for r in rs
            )
            reuse = c.get("selection_reuses", 0.0) / max(
                1.0, c.get("selection_reuses", 0) + c.get("selections_computed", 0)
            )
            rows.append(
                {
                    "length": len(pre.ids),
                    "spec": spec,
                    "decode_tps": tps.median,
                    "decode_vs_dense": decode_ratio.median,
                    "attention_ms": att.median * 1e3,
                    "attention_speedup": att_ratio.median,
                    "spread": {
                        "decode_tps": tps.as_dict(),
                        "decode_vs_dense": decode_ratio.as_dict(),
                        "attention_speedup": att_ratio.as_dict(),
                    },
                    "decode_seconds": [r.decode_seconds for r in rs],
                    "attention_seconds": [r.attention_seconds for r in rs],
                    "selection_share": select,
                    # Per layer-step means; dense runs count nothing and attend to everything.
                    "tokens_attended": c["tokens_attended"] / c["decode_layer_steps"] if c else cached,
                    "tokens_cached": c["tokens_cached"] / c["decode_layer_steps"] if c else cached,
                    "reuse": reuse,
                    "same_tokens_as_dense": rs[0].tokens == base[0].tokens,
                }
            )
        if length == max(lengths) and args.profile_budget:
            for spec in specs(args.methods, [args.profile_budget]):
                profiles.append(profile(model, spec, pre, clock))
    return rows


def accuracy(model, lengths, all_specs, args, clock) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    rows = []
    count = token_counter(model)
    for length in lengths:
        scores: dict[tuple[str, str], list[float]] = {}
        same: dict[str, list[bool]] = {}
        for name, depths in TASKS.items():
            task = get_task(name)
            for sample in task.samples(count, length, args.samples, seed=0, depths=depths):
                pre = prefill(model, encode(model, sample.prompt, answer_prefix=sample.answer_prefix))
                tokens: dict[str, list[int]] = {}
                for spec in all_specs:
                    run = decode(model, spec, pre, sample.max_new_tokens, clock, ignore_eos=False)
                    tokens[spec] = run.tokens
                    text = model.tokenizer.decode(run.tokens, skip_special_tokens=True)
                    scores.setdefault((name, spec), []).append(task.score(sample, text))
                for spec in all_specs:
                    same.setdefault(spec, []).append(tokens[spec] == tokens["dense"])
                print(f"accuracy {len(pre.ids)} {name} depth {sample.depth}: done", flush=True)
        for spec in all_specs:
            rows.append(
                {
                    "length": length,
                    "spec": spec,
                    **{n: statistics.mean(scores[(n, spec)]) for n in TASKS},
                    "prompts": {n: len(scores[(n, spec)]) for n in TASKS},
                    "agreement": statistics.mean(same[spec]),  # greedy tokens identical to dense
                }
            )
    return rows


def check_replay(model: tokensift.Model, length: int, clock: AttentionClock) -> None:
    """The replayed prefill must decode exactly as a genuine generate() does."""
    sample = get_task("passkey").samples(token_counter(model), length, 1, seed=0, depths=[0.5])[0]
    real = tokensift.generate(model, sample.prompt, "dense", max_new_tokens=8, ignore_eos=True)
    replayed = decode(model, "dense", prefill(model, encode(model, sample.prompt)), 8, clock, True)
    if real.token_ids != replayed.tokens:
        raise SystemExit(f"replay check failed: {real.token_ids} != {replayed.tokens}")
    print("replay check: replayed prefill decodes exactly as generate()", flush=True)


def profile(
    model: tokensift.Model, spec: str, pre: Prefilled, clock: AttentionClock, steps: int = 8
) -> dict[str, Any]:
    """Where `steps` decode steps of `spec` spend their time: torch ops by self CPU time, and the
    split between the model outside attention, selection and the attention itself."""
    decode(model, spec, pre, 4, clock, True)  # warm-up
    with torch.profiler.profile() as prof:
        run = decode(model, spec, pre, steps + 1, clock, True)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    selection = run.counters.get("selection_seconds", 0.0)
    split = {
        "decode_ms_per_step": 1e3 * run.decode_seconds / steps,
        "outside_attention_ms_per_step": 1e3 * (run.decode_seconds - run.attention_seconds) / steps,
        "selection_ms_per_step": 1e3 * selection / steps,
        "attention_without_selection_ms_per_step": 1e3 * (run.attention_seconds - selection) / steps,
    }
    print(f"\nprofile of {steps} decode steps, {spec}, {len(pre.ids)} tokens (profiler on):")
    print("  " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()))
    for e in ops:
        print(f"  {e.key:40s} {100 * e.self_cpu_time_total / total:5.1f}%  calls {e.count}")
    return {
        "spec": spec,
        "length": len(pre.ids),
        **split,
        "top_ops": [
            {"op": e.key, "self_share": e.self_cpu_time_total / total, "calls": e.count} for e in ops
        ],
    }


def ratio(row: dict[str, Any], key: str, digits: int = 2) -> str:
    """A speed-up with its interquartile range over the paired repeats, e.g. `1.49x [1.41-1.55]`
    (runs saved before the spread was recorded show the median alone)."""
    spread = row.get("spread", {}).get(key)
    if spread is None:
        return f"{row[key]:.{digits}f}x"
    return Spread(spread["median"], spread["q1"], spread["q3"], spread["n"]).format(digits, "x")


def tables(result: dict[str, Any], speed: bool = True, accuracy: bool = True) -> str:
    """The results as markdown tables."""
    args, out = result["args"], []
    if speed and result.get("speed"):
        out += [
            f"\nDecode speed ({args['new_tokens']} tokens, median of {args['repeats']} paired repeats "
            "[interquartile range]; speed-up = dense time / method time):\n",
            "| context | method | decode tok/s | vs dense | attention ms/token | attention speed-up "
            "| selection share | tokens attended / cached | selection reuse |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["speed"]:
            out.append(
                f"| {r['length']} | {r['spec']} | {r['decode_tps']:.1f} | {ratio(r, 'decode_vs_dense')} "
                f"| {r['attention_ms']:.1f} | {ratio(r, 'attention_speedup', 1)} "
                f"| {100 * r['selection_share']:.0f}% "
                f"| {r['tokens_attended']:.0f} / {r['tokens_cached']:.0f} | {100 * r['reuse']:.0f}% |"
            )
        for p in result.get("profiles", []):
            out.append(
                f"\nprofile {p['spec']} at {p['length']}: {p['decode_ms_per_step']:.1f} ms/step = "
                f"{p['outside_attention_ms_per_step']:.1f} outside attention + "
                f"{p['selection_ms_per_step']:.1f} selection + "
                f"{p['attention_without_selection_ms_per_step']:.1f} attention; top ops: "
                + ", ".join(f"{o['op']} {100 * o['self_share']:.0f}%" for o in p["top_ops"][:6])
            )
    if accuracy and result.get("accuracy"):
        n_pk, n_niah = (len(TASKS[t]) * args["samples"] for t in ("passkey", "niah_single"))
        out += [
            f"\nAccuracy (passkey: {n_pk} prompts, niah_single: {n_niah} prompts per context):\n",
            "| context | method | passkey | niah_single | same tokens as dense |",
            "|---|---|---|---|---|",
        ]
        for r in result["accuracy"]:
            out.append(
                f"| {r['length']} | {r['spec']} | {r['passkey']:.2f} | {r['niah_single']:.2f} "
                f"| {r['agreement']:.2f} |"
            )
    return "\n".join(out)


def summary(result: dict[str, Any]) -> str:
    """README-sized tables: every spec at the largest context (with accuracy where measured), and the
    ratios to dense of each method at the accuracy budget across contexts."""
    rows, acc = result["speed"], {(a["length"], a["spec"]): a for a in result.get("accuracy", [])}
    longest = max(r["length"] for r in rows)
    acc_length = max((a["length"] for a in result.get("accuracy", [])), default=None)
    out = [
        f"| method, {longest} tokens | decode tok/s | vs dense | attention ms/token | attention "
        "speed-up | selection share | passkey | niah_single |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["length"] == longest:
            a = acc.get((acc_length, r["spec"]))
            scores = f"{a['passkey']:.2f} | {a['niah_single']:.2f}" if a else "- | -"
            out.append(
                f"| `{r['spec'].replace(',sparse_prefill=false', '')}` | {r['decode_tps']:.1f} "
                f"| {ratio(r, 'decode_vs_dense')} | {r['attention_ms']:.1f} "
                f"| {ratio(r, 'attention_speedup', 1)} | {100 * r['selection_share']:.0f}% | {scores} |"
            )
    lengths = sorted({r["length"] for r in rows})
    budget = result["args"]["accuracy_budgets"][0]
    out += [
        "",
        f"| budget {budget}: decode / attention vs dense | " + " | ".join(f"{n}" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for method in result["args"]["methods"]:
        cells = [
            f"{ratio(r, 'decode_vs_dense')} / {ratio(r, 'attention_speedup', 1)}"
            for n in lengths
            for r in rows
            if r["length"] == n and r["spec"].startswith(f"{method}:budget={budget}")
        ]
        out.append(f"| `{method}` | " + " | ".join(cells) + " |")
    out.append("")
    for key, target in TARGETS.items():
        met, missed = [], []
        for r in rows:
            if r["length"] == longest and r["spec"] != "dense" and f":budget={budget}" in r["spec"]:
                spread = r.get("spread", {}).get(key)
                q1 = spread["q1"] if spread else r[key]  # old runs: the median stands in
                (met if q1 >= target else missed).append(f"{r['spec'].split(':')[0]} {q1:.2f}x")
        out.append(
            f"target {key} >= {target}x at {longest} tokens, budget {budget} (lower quartile): "
            f"met by {', '.join(met) or 'none'}; missed by {', '.join(missed) or 'none'}"
        )
    return "\n".join(out)


def write(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=tokensift.DEFAULT_MODEL)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--new-tokens", type=int, default=32)
    add_repeats_argument(parser)
    parser.add_argument("--accuracy-lengths", type=int, nargs="*", default=[8192])
    parser.add_argument("--accuracy-budgets", type=int, nargs="+", default=[512])
    parser.add_argument("--samples", type=int, default=1, help="accuracy samples per task and depth")
    parser.add_argument("--profile-budget", type=int, default=512, help="0: no profiles")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads while decoding (default: torch's)"
    )
    parser.add_argument("--json", default=None, help="write all results to this file (after each part)")
    parser.add_argument("--render", default=None, help="print the tables of a saved JSON and exit")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        print(tables(saved) + "\n\nSummary:\n\n" + summary(saved))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    check_repeats(args.repeats)

    model = tokensift.load(args.model)
    # Prompts are built to `length` tokens; keep room for the generated ones inside the context.
    room = max(args.new_tokens, 32) + 8

    def fit(ns: list[int]) -> list[int]:
        return [min(n, model.context_length - room) if model.context_length else n for n in ns]

    lengths, acc_lengths = fit(args.lengths), fit(args.accuracy_lengths)
    clock = AttentionClock()
    attention.run_layer = clock  # tokensift_attention looks run_layer up at call time
    start = time.time()
    header = (
        f"model {model.name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(header, flush=True)
    result: dict[str, Any] = {"setup": header, "args": vars(args)}
    check_replay(model, min(lengths), clock)
    profiles: list[dict[str, Any]] = []
    speed_rows = speed(model, lengths, specs(args.methods, args.budgets), args, clock, profiles)
    result.update(speed=speed_rows, profiles=profiles)
    write(args.json, result)
    print(tables(result), flush=True)
    acc_specs = specs(args.methods, args.accuracy_budgets)
    result["accuracy"] = accuracy(model, acc_lengths, acc_specs, args, clock) if acc_lengths else []
    write(args.json, result)
    print(tables(result, speed=False), flush=True)
    print("\nSummary:\n\n" + summary(result), flush=True)
    result["seconds"] = time.time() - start
    write(args.json, result)
    print(f"\ntotal {result['seconds']:.0f} s, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
