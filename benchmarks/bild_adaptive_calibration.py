"""Calibration of bild's adaptive schedule (issue 16, part 4), on calibration prompts only.

    python benchmarks/bild_adaptive_calibration.py costs
    WORK="edit_records edit_code" CHATS=0 REPEATS=1 python benchmarks/bild_adaptive_calibration.py run \\
        hf_greedy hf_assisted bild:lossless=true bild:lossless=true,lookup=32 ...

`costs`: seconds of our cached forward over 1-32 new tokens after a 200-token prefix, for
qwen2.5-coder-0.5b and -1.5b (fp32, best of 3): what the cost model's small_cost, batch_cost and
row_cost come from. `run`: transformers' greedy and assisted generation and the given bild specs on
the generation-loop workloads at the calibration seed 0 (the held-out benchmark uses seed 2026) and
the first open chat prompt (CHATS=1), one line per run: decode tokens per second, identity with
transformers' greedy, bild's counters. Single runs on shared cores: indicative; the held-out
comparison is benchmarks/generation_loops.py --pair.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

import tokensift
from tokensift.runtime.cache import TokenCache
from tokensift.runtime.generate import forward

COUNTERS = (
    "bild_large_forwards",
    "bild_small_steps",
    "bild_staged_forwards",
    "bild_staged_rows",
    "bild_small_tokens",
    "bild_lookup_tokens",
    "bild_mean_draft",
    "bild_max_draft",
    "bild_skipped_drafts",
    "bild_small_seconds",
    "bild_large_seconds",
    "rolled_back_tokens",
    "bild_final_rate",
)


def loops_module():
    spec = importlib.util.spec_from_file_location("gl", Path(__file__).with_name("generation_loops.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gl"] = module
    spec.loader.exec_module(module)
    return module


def costs(models: list[tokensift.Model]) -> None:
    for m in models:
        res: dict[int, list[float]] = {}
        with torch.inference_mode():
            for _ in range(3):
                cache = TokenCache(m, None)
                forward(m, torch.tensor([list(range(1000, 1200))]), cache)
                for k in [1, 2, 4, 8, 16, 32]:
                    t = time.perf_counter()
                    forward(m, torch.tensor([list(range(5, 5 + k))]), cache, last_only=k == 1)
                    res.setdefault(k, []).append(time.perf_counter() - t)
                    cache.crop(-k)
        best = {k: min(v) for k, v in res.items()}
        share = {k: round((best[k] / best[1] - 1) / (k - 1), 3) for k in best if k > 1}
        print(m.name, {k: round(v, 3) for k, v in best.items()}, "extra per row", share, flush=True)


def run(large: tokensift.Model, small: tokensift.Model, variants: list[str]) -> None:
    gl = loops_module()
    work = os.environ.get("WORK", "edit_records edit_code").split()
    items = gl.prompts(large, work, 200, 1, int(os.environ.get("CHATS", "0")), seed=0, chat_start=0)
    rows = gl.make_rows(large, items, 48)
    gl.warm_pair(large, small, [gl.with_small(v, small.name) for v in variants if not v.startswith("hf")])
    for row in rows:
        ref = None
        for _ in range(int(os.environ.get("REPEATS", "1"))):
            pre = gl.hf_generate(large, row.ids, 1, None)[1]
            for v in variants:
                counters: dict[str, float] = {}
                if v.startswith("hf_"):
                    helper = small if v == "hf_assisted" else None
                    tokens, seconds = gl.hf_generate(large, row.ids, row.new_tokens, None, helper)
                    decode = seconds - pre
                    ref = tokens if v == "hf_greedy" else ref
                else:
                    spec = gl.with_small(v, small.name) if v != "greedy" else None
                    out, _ = gl.our_generate(large, row.ids, spec, row.new_tokens)
                    tokens, decode, counters = out.token_ids, out.stats.decode_seconds, out.stats.counters
                shown = {k.removeprefix("bild_"): round(counters[k], 2) for k in COUNTERS if k in counters}
                same = "?" if ref is None else tokens == ref
                rate = (len(tokens) - 1) / decode
                print(f"{row.prompt.group:13s} {v:45s} tok/s {rate:5.2f} n {len(tokens)} same {same}", shown)


def main() -> None:
    large, small = tokensift.load("qwen2.5-coder-1.5b"), tokensift.load("qwen2.5-coder-0.5b")
    print(
        "torch threads",
        torch.get_num_threads(),
        "load",
        os.getloadavg(),
        time.strftime("%H:%M:%S"),
        flush=True,
    )
    if sys.argv[1] == "costs":
        costs([small, large])
    else:
        run(large, small, sys.argv[2:])
    print("load", os.getloadavg(), time.strftime("%H:%M:%S"))


if __name__ == "__main__":
    main()
