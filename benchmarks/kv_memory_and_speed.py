"""KV memory and prefill/decode speed per method, as ratios to dense measured in the same run.

    python benchmarks/kv_memory_and_speed.py [--model smollm2-135m] [--length 4096] [--new-tokens 64]

The prompt is a passkey haystack of `--length` tokens (chat template included). Each method runs
`--repeats` times (default 5, methods interleaved in each round) after one warm-up generation; times
are medians with the interquartile range, and speed-ups (dense time / method time) are paired per
round (tokensift.bench.timing). KV bytes are the peak bytes of
K/V tensors the cache actually held (storage, not views).
"""

from __future__ import annotations

import argparse
import time

import torch

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks import get_task
from tokensift.bench.timing import Spread, add_repeats_argument, check_repeats, speedup
from tokensift.runtime.plan import Plan

METHODS = ["dense", "streaming_llm:budget=0.25", "snapkv:budget=0.25", "h2o:budget=0.25"]


def measure(
    model: tokensift.Model,
    prompt: str | list[int],
    methods: list[str],
    new_tokens: int,
    repeats: int,
    share_prefill: bool = False,
) -> dict[str, list]:
    """Every method's generation stats, `repeats` rounds with the methods interleaved in each.

    `share_prefill`: the prompt is prefilled once, densely, and every method that such a prefill
    serves exactly (runtime.shared_prefill: dense, the one-shot evictors, StreamingLLM) fills its cache
    from it, compressing layer by layer as its own forward would (same kept tokens, same KV bytes);
    the others prefill on their own. Decode speed and KV bytes are then what they would be alone, and
    prefill times are not per method (each such run's `prefill_seconds` counts the one shared prefill).
    """
    shared = None
    if share_prefill:
        from tokensift.runtime.generate import encode
        from tokensift.runtime.shared_prefill import SharedPrefill

        ids = prompt if isinstance(prompt, list) else encode(model, prompt)
        shared = SharedPrefill.run(model, ids)
    runs: dict[str, list] = {m: [] for m in methods}
    for _ in range(repeats):
        for method in methods:
            use = shared if shared is not None and shared.serves(Plan.of(method), shared.ids) else None
            out = tokensift.generate(
                model, prompt, method, max_new_tokens=new_tokens, ignore_eos=True, shared=use
            )
            runs[method].append(out.stats)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=tokensift.DEFAULT_MODEL)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    add_repeats_argument(parser)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    args = parser.parse_args()

    check_repeats(args.repeats)
    model = tokensift.load(args.model)
    task = get_task("passkey")
    prompt = task.samples(token_counter(model), args.length, 1, seed=0, depths=[0.5])[0].prompt
    tokensift.generate(model, prompt, "dense", max_new_tokens=4)  # warm-up: allocator and kernels
    print(
        f"model {model.name}, prompt {args.length} tokens, {args.new_tokens} new tokens, "
        f"torch threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    runs = measure(model, prompt, args.methods, args.new_tokens, args.repeats)
    base = runs[args.methods[0]]
    print(f"\nspeed-up = {args.methods[0]} time / method time: median [IQR] of {args.repeats} paired repeats")
    print(
        "\n| method | KV MiB | KV / dense | prefill tok/s | prefill speed-up | decode tok/s "
        "| decode speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for method, rs in runs.items():
        s0 = rs[0]
        prefill = speedup([r.prefill_seconds for r in base], [r.prefill_seconds for r in rs])
        # Fixed new tokens (EOS ignored): the decode time ratio is the tokens/s ratio.
        decode = speedup(
            [1 / r.decode_tokens_per_second for r in base], [1 / r.decode_tokens_per_second for r in rs]
        )
        prefill_tps = Spread.of(s0.prompt_tokens / r.prefill_seconds for r in rs).median
        decode_tps = Spread.of(r.decode_tokens_per_second for r in rs).median
        print(
            f"| {method} | {s0.kv_bytes_peak / 2**20:.1f} | {s0.kv_bytes_peak / base[0].kv_bytes_peak:.3f} | "
            f"{prefill_tps:.0f} | {prefill.format(2, 'x')} | {decode_tps:.1f} | {decode.format(2, 'x')} |"
        )


if __name__ == "__main__":
    main()
