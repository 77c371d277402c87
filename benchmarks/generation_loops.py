"""Generation loops against what users already have: transformers' greedy and prompt lookup, and ours.

    python benchmarks/generation_loops.py [--models qwen2.5-coder-0.5b] [--length 400] [--repeats 5]

Part 1 (each of --models): in one process, on the same prompt token ids (chat template applied
once, fp32 as loaded), warm:
- transformers: `model.generate(ids, do_sample=False)` (greedy) and with `prompt_lookup_num_tokens`
  3, 5 and 10 (--hf-lookup; the best per workload is shown, all are kept in the JSON);
- ours: dense greedy, `prompt_lookup`, `suffix_decoding` (single path) and
  `suffix_decoding:tree=true` (token trees, one tree-masked forward).
Prompts: the repetitive workloads of tokensift.bench.tasks.loop_workloads at a held-out seed (--seed,
never used for tuning; the verification cost model was set on seed 0) and open-ended chat prompts
as the control. Each prompt runs --repeats times; inside a repeat every method runs once, in an
order rotated per repeat, so load changes hit them alike. Global suffix trees are cleared before
every generation: drafts come from the request's own prompt and output only.

Times. End-to-end: wall-clock seconds of the whole call (prefill + decode). Decode: ours from
`stats.decode_seconds`; transformers' end-to-end time minus the same repeat's prefill (a
`max_new_tokens=1` transformers call on the prompt), since `generate` does not report it. Speed-ups
are rates (tokens per second) paired per repeat, median [IQR] over every repeat of a workload's
prompts (tokensift.bench.timing); a target counts as met only if its lower quartile meets it.
Every row says whether its tokens equal transformers' greedy tokens (and ours).

With --hf-lookup-mode select, each prompt first runs transformers' lookup once per num_tokens
(a selection run, kept in the JSON) and only the fastest is timed in the repeats.

Torch runs on its default thread count (what a user gets) unless --threads is given; the thread
count and the load average (before and after every prompt) are recorded.

Part 2 (--pair LARGE:SMALL, models sharing a tokenizer; not re-measured for issue 16): the large
model alone, the small model alone, bild and entropy_routing at their default thresholds: tokens/s
relative to the large model and agreement with its greedy output.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks.loop_workloads import OPEN_ENDED_PROMPTS, WORKLOADS
from tokensift.bench.timing import Spread, add_repeats_argument, check_repeats
from tokensift.runtime.generate import encode, eos_ids
from tokensift.speculative import clear_global_caches

OURS = ["prompt_lookup", "suffix_decoding", "suffix_decoding:tree=true"]  # --ours replaces this list
HF_GREEDY, OUR_GREEDY = "hf_greedy", "greedy"
SUFFIX, TREE = "suffix_decoding", "suffix_decoding:tree=true"
CONTROL = "open-ended"


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
    model: tokensift.Model,
    workloads: list[str],
    length: int,
    samples: int,
    chats: int,
    seed: int = 0,
    chat_start: int = 0,
) -> list[Prompt]:
    count = token_counter(model)
    out = []
    for name in workloads:
        task = WORKLOADS[name]()
        out += [Prompt(name, s.prompt, task, s) for s in task.samples(count, length, samples, seed=seed)]
    out += [Prompt(CONTROL, p) for p in OPEN_ENDED_PROMPTS[chat_start : chat_start + chats]]
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


def by_group(items: list[Prompt], results: list[dict[str, Runs]]) -> dict[str, list[dict[str, Runs]]]:
    groups: dict[str, list[dict[str, Runs]]] = {}
    for prompt, row in zip(items, results, strict=True):
        groups.setdefault(prompt.group, []).append(row)
    return groups


def _fmt(spread: dict[str, float]) -> str:
    return Spread(spread["median"], spread["q1"], spread["q3"], spread["n"]).format(2, "x")


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


# ---------------------------------------------------------------------------------------------
# Part 1: one model, transformers beside ours


@dataclass
class Timed:
    """One method on one prompt: every repeat's times, the tokens, the loop counters."""

    total: list[float] = field(default_factory=list)  # end-to-end seconds per repeat
    decode: list[float] = field(default_factory=list)  # decode seconds per repeat
    tokens: list[int] = field(default_factory=list)
    stable: bool = True  # the same tokens in every repeat
    counters: dict[str, float] = field(default_factory=dict)
    score: float | None = None

    def add(self, tokens: list[int], total: float, decode: float) -> None:
        if self.total and tokens != self.tokens:
            self.stable = False
        self.tokens, self.total, self.decode = tokens, [*self.total, total], [*self.decode, decode]

    def rates(self, kind: str) -> list[float]:
        """Tokens per second per repeat: decode ((new - 1) / decode s) or end-to-end (new / total s)."""
        if kind == "decode":
            return [max(1, len(self.tokens) - 1) / max(s, 1e-9) for s in self.decode]
        return [len(self.tokens) / s for s in self.total]


@dataclass
class Row:
    """One prompt: its prefill reference and every method's runs, keyed by method label."""

    prompt: Prompt
    new_tokens: int
    ids: list[int]
    runs: dict[str, Timed] = field(default_factory=dict)
    prefill: list[float] = field(default_factory=list)  # transformers' 1-token call, per repeat
    selection: dict[str, float] = field(default_factory=dict)  # --hf-lookup-mode select: seconds per n
    load: list[tuple[float, float, float]] = field(default_factory=list)  # os.getloadavg() before, after


def hf_key(n: int) -> str:
    return f"hf_lookup_{n}"


def hf_generate(
    model: tokensift.Model, ids: list[int], new_tokens: int, lookup: int | None
) -> tuple[list[int], float]:
    """transformers' own greedy `generate` (with prompt lookup when `lookup`): new tokens, seconds."""
    hf = model.model
    eos = sorted(eos_ids(model))
    pad = hf.generation_config.pad_token_id
    kwargs: dict[str, Any] = {
        "do_sample": False,
        "max_new_tokens": new_tokens,
        "eos_token_id": eos,
        "pad_token_id": eos[0] if pad is None else pad,
    }
    if lookup:
        kwargs["prompt_lookup_num_tokens"] = lookup
    input_ids = torch.tensor([ids], device=model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    seconds = time.perf_counter() - start
    return [int(t) for t in out[0, len(ids) :]], seconds


def our_generate(model: tokensift.Model, ids: list[int], method: str | None, new_tokens: int) -> Any:
    clear_global_caches()
    start = time.perf_counter()
    out = tokensift.generate(model, ids, method, max_new_tokens=new_tokens)
    return out, time.perf_counter() - start


def run_method(model: tokensift.Model, row: Row, key: str, prefill: float) -> None:
    timed = row.runs.setdefault(key, Timed())
    if key == HF_GREEDY or key.startswith("hf_lookup_"):
        lookup = None if key == HF_GREEDY else int(key.rsplit("_", 1)[1])
        tokens, seconds = hf_generate(model, row.ids, row.new_tokens, lookup)
        timed.add(tokens, seconds, seconds - prefill)
        text = model.tokenizer.decode(tokens, skip_special_tokens=True)
    else:
        out, seconds = our_generate(model, row.ids, None if key == OUR_GREEDY else key, row.new_tokens)
        timed.add(out.token_ids, seconds, out.stats.decode_seconds)
        timed.counters = out.stats.counters
        text = out.text
    if row.prompt.task is not None:
        timed.score = row.prompt.task.score(row.prompt.sample, text)


def measure_prompt(
    model: tokensift.Model, row: Row, lookups: list[int], ours: list[str], repeats: int, mode: str
) -> None:
    row.load.append(os.getloadavg())
    if mode == "select":
        for n in lookups:
            row.selection[str(n)] = hf_generate(model, row.ids, row.new_tokens, n)[1]
        lookups = [int(min(row.selection, key=lambda n: row.selection[n]))]
    keys = [HF_GREEDY, *map(hf_key, lookups), OUR_GREEDY, *ours]
    for r in range(repeats):
        prefill = hf_generate(model, row.ids, 1, None)[1]
        row.prefill.append(prefill)
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotated per repeat
            run_method(model, row, key, prefill)
    row.load.append(os.getloadavg())


def best_lookup(rows: list[Row]) -> str:
    """transformers' fastest prompt lookup over a workload's rows (median decode tokens/s), among
    the settings every row ran."""
    keys = [k for k in rows[0].runs if k.startswith("hf_lookup_") and all(k in r.runs for r in rows)]
    if not keys:  # select mode chose different settings per prompt: each row's own
        return ""
    return max(keys, key=lambda k: statistics.median(x for r in rows for x in r.runs[k].rates("decode")))


def row_lookup(row: Row, group_best: str) -> str:
    return group_best or next(k for k in row.runs if k.startswith("hf_lookup_"))


def ratio(
    rows: list[Row], key: str | Callable[[Row], str], base: str | Callable[[Row], str], kind: str
) -> Spread:
    """Speed-up of `key` over `base` (rate ratio), paired per repeat, over every repeat of `rows`."""
    values = []
    for row in rows:
        k = key(row) if callable(key) else key
        b = base(row) if callable(base) else base
        values += [x / y for x, y in zip(row.runs[k].rates(kind), row.runs[b].rates(kind), strict=True)]
    return Spread.of(values)


def groups(rows: list[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for row in rows:
        out.setdefault(row.prompt.group, []).append(row)
    return out


def one_model_table(model: str, rows: list[Row], ours: list[str]) -> tuple[list[dict[str, Any]], str]:
    """Per workload: speeds, speed-ups with IQR, token identity; returns the rows and the markdown."""
    table, lines = [], []
    head = (
        "| workload | prompts | new tokens | transformers greedy tok/s | transformers best lookup "
        "(vs its greedy) | our greedy vs transformers greedy |"
    )
    rule = "|---|---|---|---|---|---|"
    for key in ours:
        head += f" {key}: vs transformers best lookup / vs our greedy |"
        rule += "---|"
    head += " identical to transformers greedy (our greedy, " + ", ".join(ours) + ", best lookup) | score |"
    rule += "---|---|"
    lines += [head, rule]
    for group, grows in groups(rows).items():
        best = best_lookup(grows)
        look = partial(row_lookup, group_best=best)
        used = sorted({look(r).rsplit("_", 1)[1] for r in grows}, key=int)
        hf_tps = statistics.median(x for r in grows for x in r.runs[HF_GREEDY].rates("decode"))
        entry: dict[str, Any] = {
            "model": model,
            "workload": group,
            "prompts": len(grows),
            "new_tokens": statistics.mean(len(r.runs[HF_GREEDY].tokens) for r in grows),
            "hf_greedy_decode_tokens_per_second": hf_tps,
            "hf_best_lookup": used,
            "hf_lookup_vs_hf_greedy": {
                k: ratio(grows, k, HF_GREEDY, "decode").as_dict()
                for k in grows[0].runs
                if k.startswith("hf_lookup_") and all(k in r.runs for r in grows)
            },
            "hf_best_lookup_vs_hf_greedy": ratio(grows, look, HF_GREEDY, "decode").as_dict(),
            "our_greedy_vs_hf_greedy": ratio(grows, OUR_GREEDY, HF_GREEDY, "decode").as_dict(),
            "our_greedy_vs_hf_greedy_end_to_end": ratio(grows, OUR_GREEDY, HF_GREEDY, "total").as_dict(),
            "identical_to_hf_greedy": {
                k: sum(r.runs[k].tokens == r.runs[HF_GREEDY].tokens for r in grows)
                for k in [OUR_GREEDY, *ours]
            }
            | {"hf_best_lookup": sum(r.runs[look(r)].tokens == r.runs[HF_GREEDY].tokens for r in grows)},
            "identical_to_our_greedy": {
                k: sum(r.runs[k].tokens == r.runs[OUR_GREEDY].tokens for r in grows) for k in ours
            },
            "same_tokens_every_repeat": all(t.stable for r in grows for t in r.runs.values()),
            "score": None,
            "methods": {},
        }
        scores = [r.runs[HF_GREEDY].score for r in grows if r.runs[HF_GREEDY].score is not None]
        entry["score"] = statistics.mean(scores) if scores else None
        line = (
            f"| {group} | {len(grows)} | {entry['new_tokens']:.0f} | {hf_tps:.1f} | "
            f"{'/'.join(used)}: {_spread(entry['hf_best_lookup_vs_hf_greedy'])} | "
            f"{_spread(entry['our_greedy_vs_hf_greedy'])} |"
        )
        for key in ours:
            stats = {
                "vs_hf_best_lookup": ratio(grows, key, look, "decode").as_dict(),
                "vs_our_greedy": ratio(grows, key, OUR_GREEDY, "decode").as_dict(),
                "vs_hf_best_lookup_end_to_end": ratio(grows, key, look, "total").as_dict(),
                "vs_our_greedy_end_to_end": ratio(grows, key, OUR_GREEDY, "total").as_dict(),
                "tokens_per_step": statistics.mean(
                    r.runs[key].counters.get("loop_tokens_per_step", 1.0) for r in grows
                ),
                "acceptance_rate": statistics.mean(
                    r.runs[key].counters.get("loop_acceptance_rate", 0.0) for r in grows
                ),
            }
            entry["methods"][key] = stats
            line += f" {_spread(stats['vs_hf_best_lookup'])} / {_spread(stats['vs_our_greedy'])} |"
        if TREE in ours and SUFFIX in ours:
            entry["tree_vs_single_path"] = ratio(grows, TREE, SUFFIX, "decode").as_dict()
        ident = entry["identical_to_hf_greedy"]
        line += (
            f" {', '.join(str(ident[k]) for k in [OUR_GREEDY, *ours, 'hf_best_lookup'])} of {len(grows)} |"
        )
        line += f" {entry['score']:.2f} |" if scores else " - |"
        lines.append(line)
        table.append(entry)
    return table, "\n".join(lines)


def _spread(d: dict[str, float]) -> str:
    return Spread(d["median"], d["q1"], d["q3"], d["n"]).format(2, "x")


def targets(rows: list[Row]) -> dict[str, Any]:
    """Issue 16's targets on this run: suffix_decoding >= 2x transformers' best prompt lookup on every
    repetitive workload, >= 0.98x our greedy on open chat (lower quartile), and tree vs single path."""
    out: dict[str, Any] = {}
    repetitive = []
    for group, grows in groups(rows).items():
        if SUFFIX not in grows[0].runs:
            continue
        if group == CONTROL:
            s = ratio(grows, SUFFIX, OUR_GREEDY, "decode")
            out[group] = {
                "target": "suffix_decoding >= 0.98x our greedy",
                "spread": s.as_dict(),
                "met": s.meets(0.98),
            }
        else:
            best = best_lookup(grows)
            s = ratio(grows, SUFFIX, partial(row_lookup, group_best=best), "decode")
            out[group] = {
                "target": "suffix_decoding >= 2x transformers' best lookup",
                "spread": s.as_dict(),
                "met": s.meets(2.0),
            }
            repetitive += grows
    if repetitive and TREE in repetitive[0].runs:
        s = ratio(repetitive, TREE, SUFFIX, "decode")
        out["tree_vs_single_path_repetitive"] = {"spread": s.as_dict(), "tree_wins_at_q1": s.meets(1.0)}
    return out


def row_json(row: Row) -> dict[str, Any]:
    return {
        "group": row.prompt.group,
        "prompt_chars": len(row.prompt.text),
        "prompt_tokens": len(row.ids),
        "max_new_tokens": row.new_tokens,
        "prefill_seconds": row.prefill,
        "lookup_selection_seconds": row.selection,
        "loadavg_before_after": row.load,
        "runs": {
            key: {
                "end_to_end_seconds": t.total,
                "decode_seconds": t.decode,
                "new_tokens": len(t.tokens),
                "same_tokens_every_repeat": t.stable,
                "identical_to_hf_greedy": t.tokens == row.runs[HF_GREEDY].tokens
                if HF_GREEDY in row.runs
                else None,
                "token_ids": t.tokens,
                "score": t.score,
                "counters": t.counters,
            }
            for key, t in row.runs.items()
        },
    }


def one_model_prompts(model: tokensift.Model, args: argparse.Namespace) -> list[Row]:
    items = prompts(model, args.workloads, args.length, args.samples, args.chats, args.seed, args.chat_start)
    rows, counts = [], {}
    for p in items:
        wanted = p.sample.max_new_tokens if p.sample is not None else args.new_tokens
        counts[p.group] = counts.get(p.group, -1) + 1
        rows.append((counts[p.group], Row(p, min(wanted, args.new_tokens), encode(model, p.text))))
    # The first prompt of every workload (the open-chat control first), then the second of every
    # workload, ...: a run cut short still covers every workload.
    return [row for _, row in sorted(rows, key=lambda x: (x[0], x[1].prompt.group != CONTROL))]


def warm_up(model: tokensift.Model, lookups: list[int], ours: list[str]) -> None:
    ids = encode(model, "Repeat after me: one two three, one two three, one two three.")
    hf_generate(model, ids, 8, None)
    for n in lookups:
        hf_generate(model, ids, 8, n)
    for method in [None, *ours]:
        our_generate(model, ids, method, 8)


def save_one_model(args: argparse.Namespace, report: dict[str, Any], name: str, rows: list[Row]) -> None:
    done = [r for r in rows if r.runs]
    if not done:
        return
    table, markdown = one_model_table(name, done, args.ours)
    loads = [x[0] for r in done for x in r.load]
    report["one_model"][name] = {
        "table": table,
        "targets": targets(done),
        "loadavg_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "prompts": [row_json(r) for r in done],
        "markdown": markdown,
    }
    report["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(args.json, report)
    md = [
        f"# {report['command']}",
        "",
        f"started {report['started']} UTC, torch threads {report['torch_threads']}",
    ]
    for model_name, part in report["one_model"].items():
        md += ["", f"## {model_name} (1-min load average {part['loadavg_1min']})", "", part["markdown"], ""]
        md += ["targets: " + json.dumps(part["targets"])]
    args.json.with_suffix(".md").write_text("\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["qwen2.5-coder-0.5b"])
    parser.add_argument("--ours", nargs="+", default=OURS, help="our lossless loop method specs")
    parser.add_argument(
        "--hf-lookup", nargs="+", type=int, default=[3, 5, 10], help="prompt_lookup_num_tokens"
    )
    parser.add_argument(
        "--hf-lookup-mode",
        choices=["all", "select"],
        default="all",
        help="all: every num_tokens in every repeat; select: one selection run each, then the fastest",
    )
    parser.add_argument("--pair", default="", help="LARGE:SMALL, e.g. qwen2.5-coder-1.5b:qwen2.5-coder-0.5b")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--pair-workloads", nargs="+", default=["edit_code", "self_refine"])
    parser.add_argument("--length", type=int, default=400, help="prompt tokens of the workloads")
    parser.add_argument("--pair-length", type=int, default=300, help="prompt tokens of the pair's workloads")
    parser.add_argument("--samples", type=int, default=2, help="prompts per workload")
    parser.add_argument("--seed", type=int, default=2026, help="workload seed (held out: tuning used seed 0)")
    parser.add_argument("--chats", type=int, default=2, help="open-ended chat prompts")
    parser.add_argument(
        "--chat-start", type=int, default=4, help="first chat prompt (held out: 0-3 were used before)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=128, help="cap on the workloads' own output budgets"
    )
    parser.add_argument("--pair-new-tokens", type=int, default=40)
    add_repeats_argument(parser)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own default)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/generation_loops.json"))
    args = parser.parse_args()
    check_repeats(args.repeats)
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"generation loops, {args.length}-token workload prompts, up to {args.new_tokens} new tokens, "
        f"{args.repeats} interleaved repeats, torch threads {torch.get_num_threads()} (default "
        f"{default_threads}), load {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M')}",
        flush=True,
    )
    report: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch_threads": torch.get_num_threads(),
        "torch_default_threads": default_threads,
        "loadavg_at_start": os.getloadavg(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "one_model": {},
        "pair": None,
    }

    for name in args.models:
        model = tokensift.load(name)
        warm_up(model, args.hf_lookup, args.ours)
        rows = one_model_prompts(model, args)
        print(f"\n{name} ({model.dtype}): {len(rows)} prompts", flush=True)
        for i, row in enumerate(rows):
            start = time.perf_counter()
            measure_prompt(model, row, args.hf_lookup, args.ours, args.repeats, args.hf_lookup_mode)
            save_one_model(args, report, name, rows)
            print(
                f"  [{i + 1}/{len(rows)}] {row.prompt.group} ({len(row.ids)} prompt tokens, "
                f"{time.perf_counter() - start:.0f} s): "
                + ", ".join(f"{k} {statistics.median(t.rates('decode')):.1f}" for k, t in row.runs.items()),
                flush=True,
            )
        print("\n" + report["one_model"][name]["markdown"])
        print("targets: " + json.dumps(report["one_model"][name]["targets"]))
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
