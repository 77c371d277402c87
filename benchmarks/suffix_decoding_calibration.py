"""Calibration of suffix_decoding's adaptive schedule (issue 16), on calibration prompts only.

    python benchmarks/suffix_decoding_calibration.py collect   # heavy: loads qwen2.5-coder-0.5b
    python benchmarks/suffix_decoding_calibration.py simulate [SPEC ...]  # light: offline replay
    python benchmarks/suffix_decoding_calibration.py grid      # light: the replay over a grid
    python benchmarks/suffix_decoding_calibration.py grid-copy # light: the fixed schedule's copy offset
    python benchmarks/suffix_decoding_calibration.py oracle    # light: a model-free drafter's best
    python benchmarks/suffix_decoding_calibration.py table RESULTS.json  # the README's table
    python benchmarks/suffix_decoding_calibration.py run SPEC ...  # heavy: timed, calibration prompts

`collect` writes benchmarks/results/suffix_decoding_calibration.json: the seconds of our cached
forward over 1-48 new tokens after a 280-token prefix (fp32, torch's default threads, best of 5),
and, for the generation-loop workloads at the calibration seed 0 (256-token prompts, 48 new tokens,
as the held-out benchmark at seed 2026) and open chat prompts 0-3 (the benchmark uses 4 on), the
prompt ids and our greedy output.

`simulate` replays a drafter on each prompt without the model: greedy output is deterministic, so a
draft's accepted prefix is its longest prefix that equals the greedy continuation, exactly what the
loop commits. Each step's time is the measured forward cost for its row count (3 rows are padded to
4, as the verifier does), so the replay's time is in measured one-token forwards and its speed-up
over greedy is what the model would show without Python or noise. This is where the adaptive
schedule's constants were chosen; the held-out check is benchmarks/generation_loops.py.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import tokensift
from tokensift.bench.timing import Spread
from tokensift.methods.prompt_lookup import PromptLookup
from tokensift.methods.suffix_decoding import SuffixDecoding
from tokensift.runtime.cache import TokenCache
from tokensift.runtime.generate import forward
from tokensift.runtime.plan import Plan
from tokensift.speculative.drafting import NgramDrafter, SuffixCache, as_tree
from tokensift.speculative.verify import PAD_ROWS

OUT = Path(os.environ.get("CALIBRATION", "benchmarks/results/suffix_decoding_calibration.json"))
MODEL = "qwen2.5-coder-0.5b"
FIXED = "suffix_decoding:schedule=fixed"
ROWS = [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 40, 48, 49]


def loops_module() -> Any:
    spec = importlib.util.spec_from_file_location("gl", Path(__file__).with_name("generation_loops.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gl"] = module
    spec.loader.exec_module(module)
    return module


def forward_costs(model: tokensift.Model, repeats: int = 5) -> dict[int, float]:
    res: dict[int, list[float]] = {}
    with torch.inference_mode():
        for _ in range(repeats):
            cache = TokenCache(model, None)
            forward(model, torch.tensor([list(range(1000, 1280))]), cache)
            for k in ROWS:
                t = time.perf_counter()
                forward(model, torch.tensor([list(range(5, 5 + k))]), cache, last_only=k == 1)
                res.setdefault(k, []).append(time.perf_counter() - t)
                cache.crop(-k)
    return {k: min(v) for k, v in res.items()}


def collect() -> None:
    gl = loops_module()
    model = tokensift.load(MODEL)
    report: dict[str, Any] = {
        "model": MODEL,
        "torch_threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    gl.warm_up(model, [], [])
    seconds = forward_costs(model)
    report["forward_seconds"] = seconds
    report["forward_cost"] = {k: v / seconds[1] for k, v in seconds.items()}
    print("forward cost (one-token forwards):", {k: round(v, 2) for k, v in report["forward_cost"].items()})
    items = gl.prompts(model, list(gl.WORKLOADS), 256, 1, 4, seed=0, chat_start=0)
    rows = gl.make_rows(model, items, 48)
    report["prompts"] = []
    for row in rows:
        out = tokensift.generate(model, row.ids, None, max_new_tokens=row.new_tokens)
        report["prompts"].append(
            {
                "group": row.prompt.group,
                "ids": row.ids,
                "greedy": out.token_ids,
                "decode_seconds": out.stats.decode_seconds,
            }
        )
        print(
            row.prompt.group, len(row.ids), len(out.token_ids), round(out.stats.decode_seconds, 2), flush=True
        )
    report["load_after"] = os.getloadavg()
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    OUT.write_text(json.dumps(report, indent=1))
    print(f"wrote {OUT}")


def calibration() -> tuple[dict[str, Any], dict[int, float]]:
    """The collected calibration file and its forward-cost table (rows -> one-token forwards)."""
    report = json.loads(OUT.read_text())
    return report, {int(k): v for k, v in report["forward_cost"].items()}


def measured_cost(table: dict[int, float], rows: int) -> float:
    """A forward over `rows` tokens in one-token forwards, interpolated in the measured table."""
    rows = PAD_ROWS.get(rows, rows)
    keys = sorted(table)
    if rows in table:
        return table[rows]
    lo = max(k for k in keys if k < rows)
    hi = min((k for k in keys if k > rows), default=None)
    if hi is None:
        return table[lo] + (rows - lo) * (table[lo] - table[keys[-2]]) / (lo - keys[-2])
    return table[lo] + (rows - lo) * (table[hi] - table[lo]) / (hi - lo)


def replay(spec: str, ids: list[int], greedy: list[int], table: dict[int, float]) -> dict[str, float]:
    """One generation with `spec` (a suffix_decoding spec), drafts judged against `greedy`."""
    method = Plan.of(spec).loop
    if isinstance(method, PromptLookup):  # our prompt lookup: transformers' rule, for comparison
        drafter: Any = NgramDrafter(method.num_tokens, method.max_ngram, method.min_ngram)
    else:
        assert isinstance(method, SuffixDecoding)
        drafter = method.drafter(SuffixCache(method.max_depth, 0))
    drafter.start(list(ids))
    committed = [greedy[0]]
    drafter.observe([greedy[0]])
    cost, steps, drafted, accepted = 0.0, 0, 0, 0
    while len(committed) < len(greedy):
        room = len(greedy) - len(committed) - 1
        draft, _ = as_tree(drafter.propose(room) if room > 0 else [])
        keep = 0
        for token in draft:
            if len(committed) + keep < len(greedy) and token == greedy[len(committed) + keep]:
                keep += 1
            else:
                break
        drafter.feedback(keep)
        new = greedy[len(committed) : len(committed) + keep + 1]
        cost += measured_cost(table, 1 + len(draft))
        steps += 1
        drafted += len(draft)
        accepted += keep
        committed += new
        drafter.observe(new)
    plain = len(greedy) - 1
    return {
        "speedup": plain / cost if cost else 1.0,
        "steps": steps,
        "drafted": drafted,
        "accepted": accepted,
    }


def simulate(specs: list[str]) -> None:
    report, table = calibration()
    print("forward cost:", {k: round(v, 2) for k, v in table.items()})
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in report["prompts"]:
        groups.setdefault(p["group"], []).append(p)
    head = f"{'spec':60s}" + "".join(f"{g[:12]:>14s}" for g in groups) + f"{'geo rep':>9s}"
    print(head)
    for spec in specs:
        line, reps = f"{spec:60s}", []
        for g, ps in groups.items():
            res = [replay(spec, p["ids"], p["greedy"], table) for p in ps]
            s = statistics.geometric_mean(r["speedup"] for r in res)
            if g != "open-ended":
                reps.append(s)
            drafted = sum(r["drafted"] for r in res)
            accepted = sum(r["accepted"] for r in res)
            line += f"{s:7.2f} {accepted:3d}/{drafted:<3d}"
        line += f"{statistics.geometric_mean(reps):9.2f}"
        print(line, flush=True)


def rank(specs: list[str]) -> None:
    """The replay of every spec on every calibration prompt: the geometric mean speed-up over the
    repetitive workloads and the worst and mean open chat prompt, best first."""
    report, table = calibration()
    rows = []
    for spec in specs:
        chat, rep = [], []
        for p in report["prompts"]:
            speed = replay(spec, p["ids"], p["greedy"], table)["speedup"]
            (chat if p["group"] == "open-ended" else rep).append(speed)
        rows.append((statistics.geometric_mean(rep), min(chat), statistics.geometric_mean(chat), spec))
    print("repetitive geo mean | worst chat | chat geo mean | spec")
    for row in sorted(rows, reverse=True):
        print(f"{row[0]:.2f} | {row[1]:.3f} | {row[2]:.3f} | {row[3]}")


def grid() -> None:
    """The adaptive schedule's priors, weight, offset and min_rate, and the cost model's batch_cost /
    row_cost at them. The defaults are the best repetitive mean whose worst chat prompt stays >= 0.98
    (modelled)."""
    axes = ([0.4, 0.5, 0.7, 1.0], [0.8, 0.9, 1.0], [2, 4, 8], [4, 8, 12], [1.0, 1.1, 1.2])
    specs = [
        f"suffix_decoding:first_prior={a},next_prior={b},prior_weight={w},max_spec_offset={o},min_rate={m}"
        for a, b, w, o, m in itertools.product(*axes)
    ]
    specs += [
        f"suffix_decoding:batch_cost={b},row_cost={r}"
        for b in (0.5, 0.65, 0.8, 1.0)
        for r in (0.03, 0.06, 0.08)
    ]
    rank(specs)


def grid_copy() -> None:
    """The fixed schedule's copy offset, its window and the draft cap, beside the paper's rule (copy
    offset 0, vLLM's cap 16). The defaults (24, 2, 32) sit on the plateau of the best repetitive means
    whose worst chat prompt stays the paper rule's (window 2, offsets 12-32, caps 24-48: 2.98-2.99x
    modelled); a cap of 32 rather than 24 leaves room for copies longer than these 48-token outputs."""
    rank(
        ["suffix_decoding:copy_offset=0,max_spec_tokens=16"]
        + [
            f"suffix_decoding:copy_offset={o},copy_window={w},max_spec_tokens={m}"
            for o, w, m in itertools.product([8, 12, 16, 24, 32], [1, 2, 3], [16, 24, 32, 48])
        ]
    )


def cheapest(greedy: list[int], novel: list[bool], cost: Any, cap: int = 48) -> float:
    """The time of an oracle that drafts exactly the greedy continuation wherever a model-free drafter
    could (never a novel token), with the draft lengths that make the total time least: each step
    verifies j <= `cap` drafts that hold no novel token and commits them plus the model's own token,
    at `cost(1 + j)`. `novel[i]` marks greedy[i + 1]. A dynamic program over positions; with every
    forward costing one, the time is the fewest steps."""
    n = len(greedy)
    best = [0.0] * (n + 1)
    for c in range(n - 1, 0, -1):  # c tokens committed (the prefill wrote greedy[0])
        options, run = [], 0
        while True:
            options.append(cost(1 + run) + best[c + run + 1])
            if run >= cap or c + run >= n - 1 or novel[c + run - 1]:
                break
            run += 1
        best[c] = min(options)
    return best[1]


def oracle() -> None:
    """Per calibration prompt: what the best model-free drafter could do at all (`cheapest`), under
    the measured CPU forward costs and with every forward costing one (a GPU, where verification
    is nearly free), beside the replay of our default and transformers' lookup rule (3/5/10, best)."""
    gl = loops_module()
    report, table = calibration()
    lookups = [f"prompt_lookup:num_tokens={n}" for n in (3, 5, 10)]
    print(
        "workload | novel / decode tokens | oracle vs greedy: CPU, flat | best lookup (n) | ours | "
        "oracle / best lookup: CPU, flat"
    )
    for p in report["prompts"]:
        ids, greedy = p["ids"], p["greedy"]
        novel_at = gl.novel_flags(ids, greedy)
        plain = len(greedy) - 1
        cpu = plain / cheapest(greedy, novel_at, lambda rows: measured_cost(table, rows))
        flat = plain / cheapest(greedy, novel_at, lambda rows: 1.0)
        looks = {n: replay(n, ids, greedy, table) for n in lookups}
        best = max(looks, key=lambda n: looks[n]["speedup"])
        look_flat = plain / min(look["steps"] for look in looks.values())  # flat: the fewest steps
        ours = replay("suffix_decoding", ids, greedy, table)["speedup"]
        print(
            f"{p['group']} | {sum(novel_at)} / {plain} | {cpu:.2f}, {flat:.2f} | "
            f"{looks[best]['speedup']:.2f} ({best.rsplit('=', 1)[1]}) | {ours:.2f} | "
            f"{cpu / looks[best]['speedup']:.2f}, {flat / look_flat:.2f}"
        )


def rates(run: dict[str, Any]) -> list[float]:
    """Decode tokens per second per repeat, as generation_loops.py computes them."""
    return [max(1, run["new_tokens"] - 1) / max(s, 1e-9) for s in run["decode_seconds"]]


def paired(prompts: list[dict[str, Any]], key: Any, base: Any) -> Spread:
    """Rate of `key` over `base` (run names, or functions of the prompt), paired per repeat."""
    values = []
    for p in prompts:
        k = key(p) if callable(key) else key
        b = base(p) if callable(base) else base
        values += [x / y for x, y in zip(rates(p["runs"][k]), rates(p["runs"][b]), strict=True)]
    return Spread.of(values)


def table(path: Path, new: str = "suffix_decoding", old: str = FIXED) -> None:
    """The README's table from a generation_loops.py JSON: decode speed-ups of two of our specs
    (`new`, `old`), median [IQR] over the paired repeats, per workload and pooled over the repetitive
    ones, our `prompt_lookup` where the run has it, the ceiling of any model-free drafter where the
    run computed it, and the issue's targets for `new`."""
    report = json.loads(path.read_text())
    for model, part in report["one_model"].items():
        print(f"{model}: {path}, load {part['loadavg_1min']}, {report['started']} - {report.get('finished')}")
        groups: dict[str, list[dict[str, Any]]] = {}
        for p in part["prompts"]:
            groups.setdefault(p["group"], []).append(p)
        repetitive = [p for g, ps in groups.items() if g != "open-ended" for p in ps]
        ceilings = {e["workload"]: e for e in part["table"] if "novel_tokens" in e}
        ours_lookup = all("prompt_lookup" in p["runs"] for p in part["prompts"])

        def lookup(p: dict[str, Any]) -> str:
            return next(k for k in p["runs"] if k.startswith("hf_lookup_"))

        head = [
            "workload",
            "transformers greedy tok/s",
            "transformers lookup (n) vs its greedy",
            "our greedy vs transformers greedy",
            f"`{new}` vs transformers lookup",
            f"`{new}` vs our greedy",
            f"`{old}` vs transformers lookup",
            f"`{old}` vs our greedy",
            f"`{new}` vs `{old}`",
            *(["our `prompt_lookup` vs transformers lookup"] if ours_lookup else []),
            "tokens per step (new, old)",
            *(["novel tokens", "ceiling vs transformers lookup"] if ceilings else []),
            "identical to transformers greedy (every method and repeat)",
        ]
        print("| " + " | ".join(head) + " |")
        print("|---" * len(head) + "|")
        for g, ps in [*groups.items(), ("repetitive (pooled)", repetitive)]:
            hf = statistics.median(x for p in ps for x in rates(p["runs"]["hf_greedy"]))
            n = "/".join(sorted({lookup(p).rsplit("_", 1)[1] for p in ps}, key=int))
            cells = [
                paired(ps, lookup, "hf_greedy"),
                paired(ps, "greedy", "hf_greedy"),
                paired(ps, new, lookup),
                paired(ps, new, "greedy"),
                paired(ps, old, lookup),
                paired(ps, old, "greedy"),
                paired(ps, new, old),
                *([paired(ps, "prompt_lookup", lookup)] if ours_lookup else []),
            ]
            steps = [
                statistics.mean(p["runs"][k]["counters"].get("loop_tokens_per_step", 1.0) for p in ps)
                for k in (new, old)
            ]
            same = all(r["identical_to_hf_greedy"] for p in ps for r in p["runs"].values())
            stable = all(r["same_tokens_every_repeat"] for p in ps for r in p["runs"].values())
            text = [c.format(2, "x") for c in cells]
            text[0] = f"({n}) {text[0]}"
            text.append(f"{steps[0]:.2f}, {steps[1]:.2f}")
            if ceilings:
                entry = ceilings.get(g, {})
                limit = entry.get("copy_ceiling_vs_hf_best_lookup")
                text.append(", ".join(map(str, entry.get("novel_tokens", []))) or "-")
                text.append(Spread(**limit).format(2, "x") if limit else "-")
            print(f"| {g} | {hf:.1f} | " + " | ".join(text) + f" | {'yes' if same and stable else 'NO'} |")
        for g, ps in [*groups.items(), ("repetitive (pooled)", repetitive)]:
            target = paired(ps, new, "greedy") if g == "open-ended" else paired(ps, new, lookup)
            bar = 0.98 if g == "open-ended" else 2.0
            print(f"target {g}: {target.format(3, 'x')} >= {bar}x at q1: {target.meets(bar)}")
        for g, ps in groups.items():
            c = ps[0]["runs"][new]["counters"]
            keys = ("loop_steps", "loop_empty", "draft_tokens", "accepted_tokens", "suffix_skipped_drafts")
            print(g, f"{new} counters (last repeat):", {k: c.get(k) for k in keys})


def run(specs: list[str]) -> None:
    """Timed runs on the calibration prompts: transformers' greedy and prompt lookup (10 tokens), our
    greedy and `specs`, REPEATS rotated repeats (default 2); decode rate ratios, paired per repeat."""
    gl = loops_module()
    model = tokensift.load(MODEL)
    repeats = int(os.environ.get("REPEATS", "2"))
    print("torch threads", torch.get_num_threads(), "load", os.getloadavg(), time.strftime("%H:%M:%S"))
    gl.warm_up(model, [10], specs)
    print("forward cost:", {k: round(v, 2) for k, v in forward_costs(model).items()}, flush=True)
    items = gl.prompts(model, list(gl.WORKLOADS), 256, 1, 4, seed=0, chat_start=0)
    rows = gl.make_rows(model, items, 48)
    keys = [gl.HF_GREEDY, gl.hf_key(10), gl.OUR_GREEDY, *specs]
    for row in rows:
        gl.measure_keys(model, row, keys, repeats)
        runs = {k: {"new_tokens": len(t.tokens), "decode_seconds": t.decode} for k, t in row.runs.items()}
        p = {"runs": runs}
        same = all(t.tokens == row.runs[gl.HF_GREEDY].tokens for t in row.runs.values())
        cells = [
            f"{k}: {paired([p], k, gl.OUR_GREEDY).median:.2f} / {paired([p], k, gl.hf_key(10)).median:.2f}"
            for k in specs
        ]
        print(
            f"{row.prompt.group:17s} lookup10/greedy {paired([p], gl.hf_key(10), gl.HF_GREEDY).median:.2f}",
            "| vs our greedy / vs hf lookup10:",
            "; ".join(cells),
            "| identical" if same else "| DIFFERENT",
            flush=True,
        )
    print("load", os.getloadavg(), time.strftime("%H:%M:%S"))


def main() -> None:
    if sys.argv[1] == "collect":
        collect()
    elif sys.argv[1] == "grid":
        grid()
    elif sys.argv[1] == "grid-copy":
        grid_copy()
    elif sys.argv[1] == "oracle":
        oracle()
    elif sys.argv[1] == "run":
        run(sys.argv[2:])
    elif sys.argv[1] == "table":
        table(Path(sys.argv[2]), *sys.argv[3:])
    else:
        simulate(sys.argv[2:] or ["suffix_decoding"])


if __name__ == "__main__":
    main()
