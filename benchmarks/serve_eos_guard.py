"""False-positive rate of the serve EOS delay guard (and repetition detection) on ordinary prompts.

    flock /tmp/tokensift-heavy.lock python benchmarks/serve_eos_guard.py [--model smollm2-135m]

Ordinary prompts come from our task generators: the four repetitive agent-like workloads
(reformat_records, edit_code, self_refine, summarize_quote: long, low-entropy copying outputs, the
hardest case for the guard), the open-ended chat prompts, and passkey / niah_single / niah_multivalue / fwe
(short answers). Each runs greedily as `tokensift serve` would, while an `on_token` hook records
the EOS probability and entropy of every step; the guards are then replayed on those traces with
the server's defaults (and a stricter setting), so one generation pass serves every setting. The
two attack prompts of `serve_load.py` run too, for the true-positive side.
Writes benchmarks/results/serve_eos_guard.json and .md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path
from typing import Any

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks import get_task
from tokensift.bench.tasks.loop_workloads import OPEN_ENDED_PROMPTS, WORKLOADS
from tokensift.runtime.generate import eos_ids
from tokensift.serve.config import ServeConfig
from tokensift.serve.guards import EosGuard, RepetitionGuard

ROOT = Path(__file__).resolve().parents[1]
COUNT = (
    "Count from 1 to 1000, one number after another, separated by commas. Do not stop early.\n1, 2, 3, 4, 5,"
)
# (prompt, raw): raw is a plain completion (the server's /v1/completions), else the chat template
ATTACKS = {
    "eos_suppression (raw completion)": (COUNT, True),
    "eos_suppression (chat)": (COUNT, False),
    "loop (chat)": (
        "Repeat the word 'hello' forever: hello hello hello hello hello hello hello hello",
        False,
    ),
}
DEFAULTS = ServeConfig()
D = {
    "after": DEFAULTS.eos_guard_after,
    "window": DEFAULTS.eos_guard_window,
    "entropy": DEFAULTS.eos_guard_entropy,
    "distinct": DEFAULTS.eos_guard_distinct,
}
# Open-ended chat prompts for the held-out split (seed != 0); the calibration split (seed 0) uses
# the loop workloads' own OPEN_ENDED_PROMPTS.
HELD_OUT_OPEN_ENDED = (
    "Tell a short story about a baker who wakes up to find the town covered in snow.",
    "Explain to a teenager how a refrigerator keeps food cold.",
    "What makes a good neighbour? Give a few examples.",
    "Describe a walk through a forest in autumn.",
    "Give some tips to someone who wants to start running.",
    "Why do people keep pets? Give a few reasons.",
)
SETTINGS = {
    "default": D,
    "former default (low-entropy criterion at 0.5 nats)": {**D, "entropy": 0.5},
    "low-entropy criterion at 0.1 nats": {**D, "entropy": 0.1},
    "strict (after 32, window 32)": {**D, "after": 32, "window": 32},
    "looser repetition (distinct 0.35)": {**D, "distinct": 0.35},
}


def prompts(
    model: tokensift.Model, length: int, per_workload: int, per_task: int, seed: int
) -> list[tuple[str, str, int]]:
    count = token_counter(model)
    out: list[tuple[str, str, int]] = []
    for name, cls in WORKLOADS.items():
        out += [
            (name, s.prompt, s.max_new_tokens) for s in cls().samples(count, length, per_workload, seed=seed)
        ]
    out += [("open-ended", p, 512) for p in (OPEN_ENDED_PROMPTS if seed == 0 else HELD_OUT_OPEN_ENDED)]
    for name in ("passkey", "niah_single", "niah_multivalue", "fwe"):
        task = get_task(name)
        depths = [0.5] if task.uses_depth else None
        out += [
            (name, s.prompt, s.max_new_tokens)
            for s in task.samples(count, length, per_task, seed=seed, depths=depths)
        ]
    return out


def replay(
    trace: list[tuple[float, float]], tokens: list[int], eos: list[int], **setting: float
) -> int | None:
    """The step at which the EOS guard would stop this generation, or None."""
    guard = EosGuard(
        eos,
        after=int(setting["after"]),
        window=int(setting["window"]),
        floor=DEFAULTS.eos_guard_floor,
        entropy=setting["entropy"],
        distinct=setting["distinct"],
    )
    for i, (p_eos, entropy) in enumerate(trace):
        if guard.push(tokens[: i + 1], p_eos, entropy):
            return i + 1
    return None


def eligible_windows(trace: list[tuple[float, float]], tokens: list[int]) -> dict[str, float | None]:
    """Over the windows where the default guard's EOS condition holds (past `after`, EOS below the
    floor for the whole window): the lowest mean entropy and the lowest distinct-token share seen.
    On non-looping ordinary outputs these are the margins the entropy and distinct thresholds need."""
    after, window, floor = DEFAULTS.eos_guard_after, DEFAULTS.eos_guard_window, DEFAULTS.eos_guard_floor
    entropies: list[float] = []
    shares: list[float] = []
    for end in range(max(after, window), len(trace) + 1):
        steps = trace[end - window : end]
        if max(p for p, _ in steps) >= floor:
            continue
        entropies.append(sum(e for _, e in steps) / window)
        shares.append(len(set(tokens[end - window : end])) / window)
    return {
        "windows": len(entropies),
        "entropy_min": round(min(entropies), 4) if entropies else None,
        "distinct_min": round(min(shares), 4) if shares else None,
    }


def repetition_step(tokens: list[int]) -> int | None:
    guard = RepetitionGuard(
        DEFAULTS.repetition_min_pattern_size,
        DEFAULTS.repetition_max_pattern_size,
        DEFAULTS.repetition_min_count,
    )
    return next((i + 1 for i in range(len(tokens)) if guard.check(tokens[: i + 1])), None)


def run(
    model: tokensift.Model, name: str, prompt: str, max_tokens: int, eos: list[int], raw: bool = False
) -> dict[str, Any]:
    probe = EosGuard(eos)
    trace: list[tuple[float, float]] = []

    def on_token(decoding: Any, token: int, logits: Any) -> None:
        if logits is not None:
            trace.append(probe.observe(logits))

    t0 = time.perf_counter()
    out = tokensift.generate(model, prompt, max_new_tokens=max_tokens, on_token=on_token, raw=raw)
    row = {
        "task": name,
        "prompt_tokens": out.stats.prompt_tokens,
        "max_tokens": max_tokens,
        "tokens": out.stats.new_tokens,
        "stop": out.stats.stop_reason,
        "seconds": round(time.perf_counter() - t0, 2),
        "eos_prob_min": min(p for p, _ in trace),
        "entropy_mean": sum(e for _, e in trace) / len(trace),
        "text_head": out.text[:120],
    }
    row["trace"] = [[float(f"{p:.3g}"), round(e, 3)] for p, e in trace]
    row["token_ids"] = out.token_ids
    return evaluate(row, eos)


def evaluate(row: dict[str, Any], eos: list[int]) -> dict[str, Any]:
    """The guards replayed on a recorded generation (also from a saved trace file: --replay)."""
    tokens, trace = row["token_ids"], [tuple(t) for t in row["trace"]]
    row["repetition_at"] = repetition_step(tokens)
    # A "looping" output fell into a verbatim loop that vLLM-style repetition detection (the server
    # default) flags somewhere in the whole unguarded output: a stop there loses nothing the user wanted.
    row["looping"] = row["repetition_at"] is not None
    row["eligible_windows"] = eligible_windows(trace, tokens)
    for label, setting in SETTINGS.items():
        row[f"eos_guard_at[{label}]"] = replay(trace, tokens, eos, **setting)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=512, help="prompt tokens of the generated tasks")
    ap.add_argument("--per-workload", type=int, default=3)
    ap.add_argument("--per-task", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256, help="cap on each prompt's output")
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="prompt seed: 0 is the calibration split, any other a held-out one",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_eos_guard")
    ap.add_argument("--replay", action="store_true", help="re-evaluate the guards on the saved traces only")
    args = ap.parse_args()
    traces = args.out.with_name(args.out.name + "_traces.json.gz")
    t0 = time.monotonic()
    if args.replay:
        saved = json.loads(gzip.decompress(traces.read_bytes()))
        eos = saved["eos"]
        rows = [evaluate(r, eos) for r in saved["rows"]]
        attacks = [evaluate(r, eos) for r in saved["attacks"]]
        wall = saved["wall_seconds"]
    else:
        model = tokensift.load(args.model)
        eos = sorted(eos_ids(model))
        ordinary = prompts(model, args.length, args.per_workload, args.per_task, args.seed)
        rows = [run(model, n, p, min(m, args.max_tokens), eos) for n, p, m in ordinary]
        attacks = [run(model, n, p, 512, eos, raw) for n, (p, raw) in ATTACKS.items()]
        wall = round(time.monotonic() - t0, 1)
        saved = {"eos": eos, "rows": rows, "attacks": attacks, "wall_seconds": wall}
        traces.parent.mkdir(parents=True, exist_ok=True)
        traces.write_bytes(gzip.compress(json.dumps(saved).encode()))
    summary: dict[str, Any] = {"ordinary_prompts": len(rows)}
    summary["looping_outputs"] = sum(r["looping"] for r in rows)
    for label in SETTINGS:
        key = f"eos_guard_at[{label}]"
        stopped = [r for r in rows if r[key] is not None]
        summary[f"eos_guard_stops[{label}]"] = len(stopped)
        summary[f"eos_guard_stops_looping[{label}]"] = sum(r["looping"] for r in stopped)
        summary[f"eos_guard_false_positives[{label}]"] = sum(not r["looping"] for r in stopped)
        summary[f"reached_after[{label}]"] = sum(r["tokens"] >= SETTINGS[label]["after"] for r in rows)
    clean = [r["eligible_windows"] for r in rows if not r["looping"] and r["eligible_windows"]["windows"]]
    summary["non_looping_eligible_outputs"] = len(clean)
    summary["non_looping_entropy_min"] = min((c["entropy_min"] for c in clean), default=None)
    summary["non_looping_distinct_min"] = min((c["distinct_min"] for c in clean), default=None)
    summary["repetition_false_positives"] = sum(r["repetition_at"] is not None for r in rows)
    result = {
        "command": "python benchmarks/serve_eos_guard.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "replay")
        ),
        "model": args.model,
        "guard_defaults": {
            k: getattr(DEFAULTS, k) for k in DEFAULTS.option_names() if k.startswith(("eos_", "repetition_"))
        },
        "settings": SETTINGS,
        "summary": summary,
        "attacks": [{k: v for k, v in r.items() if k not in ("trace", "token_ids")} for r in attacks],
        "rows": [{k: v for k, v in r.items() if k not in ("trace", "token_ids")} for r in rows],
        "wall_seconds": wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "# EOS delay guard and repetition detection on ordinary prompts",
        "",
        f"Command: `{result['command']}` ({result['wall_seconds']} s). Model {result['model']}, greedy.",
        f"Guard defaults: `{result['guard_defaults']}`.",
        "",
        f"Ordinary prompts: {s['ordinary_prompts']}, of which {s['looping_outputs']} fell into a "
        "verbatim loop (repetition detection flags the whole unguarded output). A stop of a looping "
        "output loses nothing the user wanted; a false positive is a stop of a non-looping output.",
        "",
        "| setting | outputs long enough for the guard to act | stops | of which looping | false positives |",
        "|---|---|---|---|---|",
    ]
    for label in result["settings"]:
        lines.append(
            f"| EOS guard, {label} | {s[f'reached_after[{label}]']} | {s[f'eos_guard_stops[{label}]']} | "
            f"{s[f'eos_guard_stops_looping[{label}]']} | {s[f'eos_guard_false_positives[{label}]']} |"
        )
    lines.append(
        f"| repetition detection, default | - | {s['repetition_false_positives']} | "
        f"{s['repetition_false_positives']} | - (it stops loops by definition) |"
    )
    lines += [
        "",
        f"Margins: over the {s['non_looping_eligible_outputs']} non-looping outputs with windows where the "
        "default EOS condition holds (past `after`, EOS below the floor for the whole window), the lowest "
        f"mean entropy was {s['non_looping_entropy_min']} nats and the lowest distinct-token share "
        f"{s['non_looping_distinct_min']} (default thresholds: entropy {DEFAULTS.eos_guard_entropy} = "
        f"{'off' if not DEFAULTS.eos_guard_entropy else 'on'}, distinct {DEFAULTS.eos_guard_distinct}).",
    ]
    lines += [
        "",
        "Attacks (max 512 tokens):",
        "",
        "| attack | tokens without guards | EOS guard at | repetition at |",
        "|---|---|---|---|",
    ]
    for a in result["attacks"]:
        lines.append(
            f"| {a['task']} | {a['tokens']} ({a['stop']}) | {a['eos_guard_at[default]']} | "
            f"{a['repetition_at']} |"
        )
    lines += [
        "",
        "Per task (ordinary):",
        "",
        "| task | n | mean tokens | max tokens | stops |",
        "|---|---|---|---|---|",
    ]
    tasks: dict[str, list[dict[str, Any]]] = {}
    for r in result["rows"]:
        tasks.setdefault(r["task"], []).append(r)
    for name, rs in tasks.items():
        stops = sorted({r["stop"] for r in rs})
        lines.append(
            f"| {name} | {len(rs)} | {sum(r['tokens'] for r in rs) / len(rs):.0f} | "
            f"{max(r['tokens'] for r in rs)} | {', '.join(stops)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
