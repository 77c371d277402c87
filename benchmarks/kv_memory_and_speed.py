"""KV memory and prefill/decode speed per method, as ratios to dense measured in the same run.

    python benchmarks/kv_memory_and_speed.py [--model smollm2-135m] [--length 4096] [--new-tokens 64]

The prompt is a passkey haystack of `--length` tokens (chat template included). Each method runs
`--repeats` times after one warm-up generation; times are medians. KV bytes are the peak bytes of
K/V tensors the cache actually held (storage, not views).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks import get_task

METHODS = ["dense", "streaming_llm:budget=0.25", "snapkv:budget=0.25", "h2o:budget=0.25"]


def measure(
    model: tokensift.Model, prompt: str, method: str, new_tokens: int, repeats: int
) -> dict[str, float]:
    runs = [
        tokensift.generate(model, prompt, method, max_new_tokens=new_tokens, ignore_eos=True).stats
        for _ in range(repeats)
    ]
    s = runs[0]
    return {
        "kv_bytes": s.kv_bytes_peak,
        "kv_dense": s.kv_bytes_dense,
        "prefill_tps": s.prompt_tokens / statistics.median(r.prefill_seconds for r in runs),
        "decode_tps": statistics.median(r.decode_tokens_per_second for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=tokensift.DEFAULT_MODEL)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    args = parser.parse_args()

    model = tokensift.load(args.model)
    task = get_task("passkey")
    prompt = task.samples(token_counter(model), args.length, 1, seed=0, depths=[0.5])[0].prompt
    tokensift.generate(model, prompt, "dense", max_new_tokens=4)  # warm-up: allocator and kernels
    print(
        f"model {model.name}, prompt {args.length} tokens, {args.new_tokens} new tokens, "
        f"torch threads {torch.get_num_threads()}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    results = {m: measure(model, prompt, m, args.new_tokens, args.repeats) for m in args.methods}
    base = results[args.methods[0]]
    print(
        f"\n| method | KV MiB | KV / dense | prefill tok/s | prefill vs {args.methods[0]} "
        f"| decode tok/s | decode vs {args.methods[0]} |"
    )
    print("|---|---|---|---|---|---|---|")
    for method, r in results.items():
        print(
            f"| {method} | {r['kv_bytes'] / 2**20:.1f} | {r['kv_bytes'] / base['kv_bytes']:.3f} | "
            f"{r['prefill_tps']:.0f} | {r['prefill_tps'] / base['prefill_tps']:.2f}x | "
            f"{r['decode_tps']:.1f} | {r['decode_tps'] / base['decode_tps']:.2f}x |"
        )


if __name__ == "__main__":
    main()
