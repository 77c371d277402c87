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
Every row says whether its tokens equal transformers' greedy tokens (and ours), and how many of the
decode tokens are novel (their pair with the previous token occurs nowhere earlier in prompt and
output, so no model-free draft could hold them) with the ceiling that puts on any model-free
drafter's speed-up over transformers' best lookup (`copy_ceiling`).

With --hf-lookup-mode select, each prompt first runs transformers' lookup once per num_tokens
(a selection run, kept in the JSON) and only the fastest is timed in the repeats.

Torch runs on its default thread count (what a user gets) unless --threads is given; the thread
count and the load average (before and after every prompt) are recorded.

Part 2 (--pair LARGE:SMALL, models sharing a tokenizer; --models with no names skips part 1), on the
large model in one process, same prompt ids, warm, rotated repeats as above: transformers' greedy
and assisted generation (`generate(..., assistant_model=small)`, its own default drafting schedule),
our dense greedy and --pair-ours (default `bild:lossless=true`, `bild`, `entropy_routing`, each at its
default thresholds, with small=SMALL). Per workload: decode rate ratios vs transformers' greedy and
assisted (paired per repeat, median [IQR]), token identity and first divergence from the large
model's greedy, rows reproduced and exact match of the rewrite (edit_records), for `change_function`
(tokensift.bench.tasks.code_tests) the code's generated tests run in a sandboxed subprocess (prompts
whose code passed all of them, share of calls passed; score = that share), and the target
`bild:lossless=true` >= 1.2x assisted (lower quartile) and identical. Then, for each lossy loop, both
models' probabilities at the first token where it left the large model's greedy output.
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
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks.code_tests import CODE_WORKLOADS
from tokensift.bench.tasks.loop_workloads import OPEN_ENDED_PROMPTS, WORKLOADS
from tokensift.bench.timing import Spread, add_repeats_argument, check_repeats
from tokensift.runtime.generate import encode, eos_ids
from tokensift.speculative import clear_global_caches

OURS = ["prompt_lookup", "suffix_decoding", "suffix_decoding:tree=true"]  # --ours replaces this list
HF_GREEDY, HF_ASSISTED, OUR_GREEDY = "hf_greedy", "hf_assisted", "greedy"
SUFFIX, TREE = "suffix_decoding", "suffix_decoding:tree=true"
CONTROL = "open-ended"


@dataclass
class Prompt:
    group: str  # a workload name or "open-ended"
    text: str
    task: Any = None
    sample: Any = None


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
        task = {**WORKLOADS, **CODE_WORKLOADS}[name]()
        out += [Prompt(name, s.prompt, task, s) for s in task.samples(count, length, samples, seed=seed)]
    out += [Prompt(CONTROL, p) for p in OPEN_ENDED_PROMPTS[chat_start : chat_start + chats]]
    return out


def agreement(tokens: list[int], reference: list[int]) -> float:
    """Share of positions where the two token lists agree (over the longer one)."""
    n = max(len(tokens), len(reference))
    return sum(a == b for a, b in zip(tokens, reference, strict=False)) / n if n else 1.0


def first_divergence(tokens: list[int], reference: list[int]) -> int:
    """Index of the first token that differs from `reference` (its length if none does)."""
    for i, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return i
    return len(reference) if len(tokens) >= len(reference) else len(tokens)


def rows_and_load(done: list[Row]) -> dict[str, Any]:
    """The report's per-prompt rows and the 1-minute load averages seen while they ran."""
    loads = [x[0] for r in done for x in r.load]
    return {
        "loadavg_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
        "prompts": [row_json(r) for r in done],
    }


def save_report(path: Path, report: dict[str, Any]) -> None:
    report["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(path, report)
    write_markdown(path.with_suffix(".md"), report)


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
    exact: bool | None = None  # the task's exact match (the JSON/CSV rewrite), where it has one
    tests: dict[str, Any] | None = None  # the code's run against the task's tests (change_function)

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
    model: tokensift.Model,
    ids: list[int],
    new_tokens: int,
    lookup: int | None,
    assistant: tokensift.Model | None = None,
) -> tuple[list[int], float]:
    """transformers' own greedy `generate` (with prompt lookup when `lookup`, assisted generation with
    `assistant` drafting): new tokens, seconds."""
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
    if assistant is not None:
        kwargs["assistant_model"] = assistant.model
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


def run_method(
    model: tokensift.Model, row: Row, key: str, prefill: float, assistant: tokensift.Model | None = None
) -> None:
    timed = row.runs.setdefault(key, Timed())
    if key.startswith("hf_"):
        lookup = int(key.rsplit("_", 1)[1]) if key.startswith("hf_lookup_") else None
        helper = assistant if key == HF_ASSISTED else None
        tokens, seconds = hf_generate(model, row.ids, row.new_tokens, lookup, helper)
        timed.add(tokens, seconds, seconds - prefill)
        text = model.tokenizer.decode(tokens, skip_special_tokens=True)
    else:
        out, seconds = our_generate(model, row.ids, None if key == OUR_GREEDY else key, row.new_tokens)
        timed.add(out.token_ids, seconds, out.stats.decode_seconds)
        timed.counters = out.stats.counters
        text = out.text
    if row.prompt.task is not None and hasattr(row.prompt.task, "check"):  # code run against its tests
        run = row.prompt.task.check(row.prompt.sample, text)
        timed.score, timed.tests = run.share, run.as_dict()
    elif row.prompt.task is not None:
        timed.score = row.prompt.task.score(row.prompt.sample, text)
    if row.prompt.task is not None and hasattr(row.prompt.task, "exact"):
        timed.exact = row.prompt.task.exact(row.prompt.sample, text)


def measure_prompt(
    model: tokensift.Model, row: Row, lookups: list[int], ours: list[str], repeats: int, mode: str
) -> None:
    row.load.append(os.getloadavg())
    if mode == "select":
        for n in lookups:
            row.selection[str(n)] = hf_generate(model, row.ids, row.new_tokens, n)[1]
        lookups = [int(min(row.selection, key=lambda n: row.selection[n]))]
    measure_keys(model, row, [HF_GREEDY, *map(hf_key, lookups), OUR_GREEDY, *ours], repeats)
    row.load.append(os.getloadavg())


def measure_keys(
    model: tokensift.Model, row: Row, keys: list[str], repeats: int, assistant: tokensift.Model | None = None
) -> None:
    """Every method of `keys` once per repeat, in an order rotated per repeat, after a transformers
    1-token call that gives the repeat's prefill time."""
    for r in range(repeats):
        prefill = hf_generate(model, row.ids, 1, None)[1]
        row.prefill.append(prefill)
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            run_method(model, row, key, prefill, assistant)


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


def novel_flags(prompt: list[int], output: list[int]) -> list[bool]:
    """For each decode token (every output token after the prefill's first), whether no draft copied
    from the prompt and output could have held it: the pair (previous token, token) occurs nowhere
    earlier in them. A suffix-match or n-gram draft copies a span of that text, so each drafted token
    continues a pair seen before; a token after an unseen pair can only be a step's own model token,
    one per step. Earlier responses (SuffixDecoding's global tree) are left out: the benchmark clears
    them."""
    seen = set(pairwise(prompt))
    if prompt and output:
        seen.add((prompt[-1], output[0]))
    flags = []
    for pair in pairwise(output):
        flags.append(pair not in seen)
        seen.add(pair)
    return flags


def novel_tokens(prompt: list[int], output: list[int]) -> int:
    return sum(novel_flags(prompt, output))


def copy_ceiling(rows: list[Row], look: Callable[[Row], str]) -> tuple[Spread | None, list[int]]:
    """The most any model-free drafter could run over transformers' lookup on these rows, paired per
    repeat, and each row's novel tokens. Each novel token costs at least one step, and a step at
    least one plain decode step of ours, so the decode takes at least novel x our greedy's seconds
    per token: ceiling = (decode tokens / novel) x (our greedy's rate / the lookup's rate). None when
    some row has no novel token (no ceiling below infinity)."""
    novel = [novel_tokens(r.ids, r.runs[HF_GREEDY].tokens) for r in rows]
    if not all(novel):
        return None, novel
    values = []
    for row, n in zip(rows, novel, strict=True):
        steps = (len(row.runs[HF_GREEDY].tokens) - 1) / n
        ours, theirs = row.runs[OUR_GREEDY].rates("decode"), row.runs[look(row)].rates("decode")
        values += [steps * g / lk for g, lk in zip(ours, theirs, strict=True)]
    return Spread.of(values), novel


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
    head += " novel tokens | ceiling of any model-free drafter vs best lookup |"
    rule += "---|---|---|---|"
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
        ceiling, novel = copy_ceiling(grows, look)
        entry["novel_tokens"] = novel
        entry["copy_ceiling_vs_hf_best_lookup"] = ceiling.as_dict() if ceiling else None
        limit = _spread(entry["copy_ceiling_vs_hf_best_lookup"]) if ceiling else "-"
        line += f" {', '.join(map(str, novel))} | {limit} |"
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
            look = partial(row_lookup, group_best=best_lookup(grows))
            s = ratio(grows, SUFFIX, look, "decode")
            ceiling, _ = copy_ceiling(grows, look)
            out[group] = {
                "target": "suffix_decoding >= 2x transformers' best lookup",
                "spread": s.as_dict(),
                "met": s.meets(2.0),
                # The most any model-free drafter could reach here (copy_ceiling): below 2 at its upper
                # quartile, no drafting schedule can meet the target on these outputs.
                "ceiling": ceiling.as_dict() if ceiling else None,
                "reachable": ceiling is None or ceiling.q3 >= 2.0,
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
                "exact_match": t.exact,
                "tests": t.tests,
                "first_divergence_from_hf_greedy": first_divergence(t.tokens, row.runs[HF_GREEDY].tokens)
                if HF_GREEDY in row.runs
                else None,
                "counters": t.counters,
            }
            for key, t in row.runs.items()
        },
    }


def one_model_prompts(model: tokensift.Model, args: argparse.Namespace) -> list[Row]:
    items = prompts(model, args.workloads, args.length, args.samples, args.chats, args.seed, args.chat_start)
    return make_rows(model, items, args.new_tokens)


def make_rows(model: tokensift.Model, items: list[Prompt], cap: int) -> list[Row]:
    """One row per prompt: its ids and new-token budget (the workload's own, at most `cap`)."""
    rows, counts = [], {}
    for p in items:
        wanted = p.sample.max_new_tokens if p.sample is not None else cap
        counts[p.group] = counts.get(p.group, -1) + 1
        rows.append((counts[p.group], Row(p, min(wanted, cap), encode(model, p.text))))
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
    report["one_model"][name] = {
        "table": table,
        "targets": targets(done),
        **rows_and_load(done),
        "markdown": markdown,
    }
    save_report(args.json, report)


# ---------------------------------------------------------------------------------------------
# Part 2: a large/small pair, transformers' greedy and assisted generation beside our two-model loops

PAIR_OURS = ["bild:lossless=true", "bild", "entropy_routing"]  # --pair-ours replaces this list


def with_small(spec: str, small: str) -> str:
    """`spec` with the pair's small model as its `small` parameter."""
    return f"{spec}{',' if ':' in spec else ':'}small={small}"


def label(key: str, small: str) -> str:
    return key.replace(f",small={small}", "").replace(f":small={small}", "")


def pair_row_stats(rows: list[Row], key: str) -> dict[str, Any]:
    """One method on a group's rows: speed against transformers, identity with the large model's
    greedy output (transformers'), and task quality."""
    assisted = HF_ASSISTED in rows[0].runs
    scores = [r.runs[key].score for r in rows if r.runs[key].score is not None]
    exact = [r.runs[key].exact for r in rows if r.runs[key].exact is not None]
    tests = [r.runs[key].tests for r in rows if r.runs[key].tests is not None]
    shares = [
        r.runs[key].counters.get("bild_small_share", r.runs[key].counters.get("routing_share")) for r in rows
    ]
    diverged = [first_divergence(r.runs[key].tokens, r.runs[HF_GREEDY].tokens) for r in rows]
    return {
        "decode_tokens_per_second": statistics.median(x for r in rows for x in r.runs[key].rates("decode")),
        "vs_hf_greedy": ratio(rows, key, HF_GREEDY, "decode").as_dict(),
        "vs_hf_assisted": ratio(rows, key, HF_ASSISTED, "decode").as_dict() if assisted else None,
        "vs_hf_greedy_end_to_end": ratio(rows, key, HF_GREEDY, "total").as_dict(),
        "vs_hf_assisted_end_to_end": ratio(rows, key, HF_ASSISTED, "total").as_dict() if assisted else None,
        "identical_to_hf_greedy": sum(r.runs[key].tokens == r.runs[HF_GREEDY].tokens for r in rows),
        "prefix_agreement": statistics.mean(
            d / max(1, len(r.runs[HF_GREEDY].tokens)) for d, r in zip(diverged, rows, strict=True)
        ),
        "first_divergence": diverged,
        "agreement": statistics.mean(agreement(r.runs[key].tokens, r.runs[HF_GREEDY].tokens) for r in rows),
        "score": statistics.mean(scores) if scores else None,
        "exact_match": sum(exact) if exact else None,
        "tests_all_passed": sum(t["ok"] for t in tests) if tests else None,
        "test_calls_passed": sum(t["passed"] for t in tests) / sum(t["total"] for t in tests)
        if tests
        else None,
        "small_share": statistics.mean(shares) if all(x is not None for x in shares) else None,
        "same_tokens_every_repeat": all(r.runs[key].stable for r in rows),
    }


def _opt(d: dict[str, float] | None) -> str:
    return "-" if d is None else _spread(d)


def pair_table(rows: list[Row], keys: list[str], small: str) -> tuple[list[dict[str, Any]], str]:
    """Per workload and method: the figures of `pair_row_stats`; returns the rows and the markdown
    (with the code's tests where a workload has them: prompts whose code passed every test, and the
    share of test calls passed)."""
    coded = any(t.tests is not None for r in rows for t in r.runs.values())
    lines = [
        "| workload | prompts | new tokens | method | decode tok/s | vs transformers greedy | "
        "vs transformers assisted | end-to-end vs assisted | identical to large greedy | "
        "prefix agreement | small share | "
        + ("tests passed (all) | test calls passed | " if coded else "")
        + "rows reproduced | exact match |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if coded else ""),
    ]
    table = []
    for group, grows in groups(rows).items():
        new = statistics.mean(len(r.runs[HF_GREEDY].tokens) for r in grows)
        for key in keys:
            entry = {"workload": group, "method": key, "prompts": len(grows), "new_tokens": new}
            entry |= pair_row_stats(grows, key)
            table.append(entry)
            share, score, exact = entry["small_share"], entry["score"], entry["exact_match"]
            lines.append(
                f"| {group} | {len(grows)} | {new:.0f} | {label(key, small)} | "
                f"{entry['decode_tokens_per_second']:.2f} | {_spread(entry['vs_hf_greedy'])} | "
                f"{_opt(entry['vs_hf_assisted'])} | {_opt(entry['vs_hf_assisted_end_to_end'])} | "
                f"{entry['identical_to_hf_greedy']}/{len(grows)} | {entry['prefix_agreement']:.2f} | "
                + ("-" if share is None else f"{share:.2f}")
                + " | "
                + (_tests_cells(entry, len(grows)) if coded else "")
                + ("-" if score is None or entry["tests_all_passed"] is not None else f"{score:.2f}")
                + " | "
                + ("-" if exact is None else f"{exact}/{len(grows)}")
                + " |"
            )
    return table, "\n".join(lines)


def _tests_cells(entry: dict[str, Any], prompts: int) -> str:
    if entry["tests_all_passed"] is None:
        return "- | - | "
    return f"{entry['tests_all_passed']}/{prompts} | {entry['test_calls_passed']:.2f} | "


def pair_targets(rows: list[Row], lossless: str) -> dict[str, Any]:
    """Issue 16: the lossless mode token-identical to the large model's greedy and >= 1.2x
    transformers' assisted generation (decode rate, paired per repeat; met if the lower quartile is)."""
    if lossless not in rows[0].runs:
        return {}
    out: dict[str, Any] = {}
    for group, grows in [("all", rows), *groups(rows).items()]:
        s = ratio(grows, lossless, HF_ASSISTED, "decode")
        same = sum(r.runs[lossless].tokens == r.runs[HF_GREEDY].tokens for r in grows)
        out[group] = {
            "target": f"{lossless} identical to transformers greedy and >= 1.2x transformers assisted",
            "spread": s.as_dict(),
            "identical": f"{same}/{len(grows)}",
            "met": s.meets(1.2) and same == len(grows),
        }
    return out


def warm_pair(large: tokensift.Model, small: tokensift.Model, ours: list[str]) -> None:
    ids = encode(large, "Repeat after me: one two three, one two three, one two three.")
    hf_generate(large, ids, 8, None)
    hf_generate(large, ids, 8, None, small)
    for method in [None, *ours]:
        our_generate(large, ids, method, 8)


def save_pair(
    args: argparse.Namespace, report: dict[str, Any], rows: list[Row], keys: list[str], small: tokensift.Model
) -> None:
    done = [r for r in rows if r.runs]
    if not done:
        return
    ours = [k for k in keys if k not in (HF_GREEDY, HF_ASSISTED, OUR_GREEDY)]
    table, markdown = pair_table(done, keys, small.name)
    gen = small.model.generation_config
    report["pair"] |= {
        "keys": keys,
        "table": table,
        "targets": {
            label(k, small.name): pair_targets(done, k)
            for k in ours
            if "lossless=true" in k and HF_ASSISTED in keys
        },
        "assistant_generation_config": {
            k: getattr(gen, k, None)
            for k in (
                "num_assistant_tokens",
                "num_assistant_tokens_schedule",
                "assistant_confidence_threshold",
            )
        },
        **rows_and_load(done),
        "markdown": markdown,
    }
    save_report(args.json, report)


def next_token(model: tokensift.Model, ids: list[int]) -> torch.Tensor:
    """The model's next-token probabilities after `ids` (one uncached forward)."""
    with torch.inference_mode():
        logits = model.model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1]
    return torch.softmax(logits.float(), dim=-1)


def divergence(
    large: tokensift.Model, small: tokensift.Model, rows: list[Row], keys: list[str]
) -> list[dict[str, Any]]:
    """For each lossy loop and prompt, both models' view of the first token where the loop left the
    large model's greedy output: the large model's probability of the loop's token (its BiLD
    cross-entropy) and of its own argmax, the small model's confidence and entropy there."""
    out = []
    for row in rows:
        ref = row.runs[HF_GREEDY].tokens
        for key in keys:
            tokens = row.runs[key].tokens
            d = first_divergence(tokens, ref)
            entry: dict[str, Any] = {"group": row.prompt.group, "method": key, "first_divergence": d}
            if d < min(len(tokens), len(ref)):
                prefix = row.ids + ref[:d]
                p, q = next_token(large, prefix), next_token(small, prefix)
                ours, theirs = tokens[d], ref[d]
                entry |= {
                    "new_tokens": len(ref),
                    "loop_token": ours,
                    "large_token": theirs,
                    "text_before": large.tokenizer.decode(ref[max(0, d - 8) : d]) if large.tokenizer else "",
                    "loop_text": large.tokenizer.decode([ours]) if large.tokenizer else "",
                    "large_text": large.tokenizer.decode([theirs]) if large.tokenizer else "",
                    "large_p_loop_token": float(p[ours]),
                    "large_cross_entropy_loop_token": float(-torch.log(p[ours].clamp_min(1e-30))),
                    "large_p_own_token": float(p[theirs]),
                    "small_p_loop_token": float(q[ours]),
                    "small_p_large_token": float(q[theirs]),
                    "small_top_p": float(q.max()),
                    "small_entropy_nats": float(-(q * q.clamp_min(1e-30).log()).sum()),
                }
            out.append(entry)
    return out


def run_pair(args: argparse.Namespace, report: dict[str, Any]) -> None:
    large_name, small_name = args.pair.split(":")
    large, small = tokensift.load(large_name), tokensift.load(small_name)
    ours = [with_small(s, small_name) for s in args.pair_ours]
    keys = [HF_GREEDY, *args.pair_baselines, *ours]
    warm_pair(large, small, ours)
    items = prompts(
        large,
        args.pair_workloads,
        args.pair_length,
        args.pair_samples,
        args.pair_chats,
        args.seed,
        args.chat_start,
    )
    rows = make_rows(large, items, args.pair_new_tokens)
    report["pair"] = {"large": large_name, "small": small_name, "dtype": str(large.dtype)}
    print(f"\n{large_name} + {small_name} ({large.dtype}): {len(rows)} prompts", flush=True)
    for i, row in enumerate(rows):
        start = time.perf_counter()
        row.load.append(os.getloadavg())
        measure_keys(large, row, keys, args.repeats, small)
        row.load.append(os.getloadavg())
        save_pair(args, report, rows, keys, small)
        print(
            f"  [{i + 1}/{len(rows)}] {row.prompt.group} ({len(row.ids)} prompt tokens, "
            f"{row.new_tokens} new, {time.perf_counter() - start:.0f} s): "
            + ", ".join(
                f"{label(k, small_name)} {statistics.median(t.rates('decode')):.2f}"
                for k, t in row.runs.items()
            ),
            flush=True,
        )
    lossy = [k for k in ours if "lossless=true" not in k]
    report["pair"]["divergence"] = divergence(large, small, rows, lossy)
    save(args.json, report)
    for d in report["pair"]["divergence"]:
        print("  divergence " + json.dumps(d), flush=True)
    print("\n" + report["pair"]["markdown"])
    print("targets: " + json.dumps(report["pair"]["targets"]))


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    md = [
        f"# {report['command']}",
        "",
        f"started {report['started']} UTC, torch threads {report['torch_threads']}",
    ]
    for model_name, part in report["one_model"].items():
        md += ["", f"## {model_name} (1-min load average {part['loadavg_1min']})", "", part["markdown"], ""]
        md += ["targets: " + json.dumps(part["targets"])]
    pair = report.get("pair") or {}
    if "markdown" in pair:
        md += [
            "",
            f"## {pair['large']} with {pair['small']} ({pair['dtype']}; "
            f"1-min load average {pair['loadavg_1min']})",
            "",
            pair["markdown"],
            "",
            "targets: " + json.dumps(pair["targets"]),
            "",
            "transformers assistant settings: " + json.dumps(pair["assistant_generation_config"]),
        ]
    path.write_text("\n".join(md) + "\n")


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
    parser.add_argument("--pair-workloads", nargs="+", default=["edit_records", "edit_code"])
    parser.add_argument(
        "--pair-ours", nargs="+", default=PAIR_OURS, help="our two-model loop specs (small= is added)"
    )
    parser.add_argument(
        "--pair-baselines",
        nargs="*",
        default=[HF_ASSISTED, OUR_GREEDY],
        choices=[HF_ASSISTED, OUR_GREEDY],
        help="besides transformers' greedy (always run: the reference)",
    )
    parser.add_argument("--pair-samples", type=int, default=2, help="prompts per workload for the pair")
    parser.add_argument("--pair-chats", type=int, default=0, help="open-ended chat prompts for the pair")
    parser.add_argument("--length", type=int, default=400, help="prompt tokens of the workloads")
    parser.add_argument("--pair-length", type=int, default=200, help="prompt tokens of the pair's workloads")
    parser.add_argument("--samples", type=int, default=2, help="prompts per workload")
    parser.add_argument("--seed", type=int, default=2026, help="workload seed (held out: tuning used seed 0)")
    parser.add_argument("--chats", type=int, default=2, help="open-ended chat prompts")
    parser.add_argument(
        "--chat-start", type=int, default=4, help="first chat prompt (held out: 0-3 were used before)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=128, help="cap on the workloads' own output budgets"
    )
    parser.add_argument(
        "--pair-new-tokens", type=int, default=96, help="cap on the pair workloads' own output budgets"
    )
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
        run_pair(args, report)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(args.json, report)
    print(f"\nwrote {args.json}")


def save(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
