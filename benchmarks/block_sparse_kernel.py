"""The Triton block-sparse kernel against the PyTorch block-sparse engine on the same GPU: max abs error
and milliseconds at a few lengths, with dense causal SDPA beside them.

    python benchmarks/block_sparse_kernel.py [--lengths 8192 16384 32768] [--dtype bfloat16]
        [--heads 14 --kv-heads 2 --head-dim 64] [--budget 1024] [--out FILE.json]

Both paths run `tokensift.runtime.block_sparse`: `sparse_attention` (the PyTorch engine: gathered
keys, batched SDPA) and `triton_sparse_attention` (one kernel launch; what `TOKENSIFT_TRITON=1`
switches on), on random q/k/v of qwen2.5-coder-0.5b's attention shape (14 query heads, 2 KV heads,
head dim 64) for two patterns: A-shape (128 sinks + an 896-token window, shared by all heads) and a
scattered pattern (per query head `--budget` random earlier keys per 64-row block, the gather-heavy
case). The error is the max abs difference between the two outputs over the sparse rows; times are
medians of 10 CUDA-event-timed calls after a warm-up (benchmarks/sparse_prefill.py's `_cuda_ms`).
Dense SDPA is timed with the KV heads repeated (what flash attention takes). `--device cpu` (with
TRITON_INTERPRET=1, tiny lengths) is a smoke run of this script through Triton's interpreter: its
times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sparse_prefill import _cuda_ms
from tokensift.bench.timing import call_ms
from tokensift.runtime import block_sparse as bsa

BLOCK = 64


def patterns(length: int, hq: int, hkv: int, budget: int, device: torch.device) -> list[tuple]:
    """(name, start_row, past, groups, row_mask, window) of A-shape and a scattered pattern."""
    sinks, local = 128, 896
    out = []
    start = min(length, sinks + local)
    firsts = bsa.block_starts(length, length, start, BLOCK).to(device)
    past = bsa.a_shape_past(firsts, sinks, local, length)[None, None]
    shared = bsa.Groups.per_kv_head(hkv, hq // hkv, device)
    out.append(("a_shape", start, past, shared, bsa.a_shape_row_mask(sinks, local, BLOCK), (sinks, local)))
    start = bsa.first_sparse_row(length, length, budget, BLOCK)
    firsts = bsa.block_starts(length, length, start, BLOCK).to(device)
    g = torch.Generator(device=device).manual_seed(length)
    rand = torch.rand(hq, len(firsts), budget, generator=g, device=device)
    # Distinct sorted keys per block would be the methods' case; random ones (repeats weighted twice,
    # alike in both paths) are the gather-heavy worst case.
    scattered = (rand * firsts[None, :, None]).long().sort(dim=-1).values[None]
    heads = bsa.Groups.per_query_head(torch.arange(hq, device=device), hq // hkv)
    out.append(("scattered", start, scattered, heads, None, None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--budget", type=int, default=1024, help="scattered keys per query block")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.pop("TOKENSIFT_TRITON", None)  # sparse_attention must run the PyTorch engine
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("block_sparse_kernel.py: torch sees no CUDA GPU")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("block_sparse_kernel.py on the CPU needs TRITON_INTERPRET=1 (a smoke run)")
    timed = _cuda_ms if device.type == "cuda" else _wall_ms
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    doc = {
        "setup": f"{gpu}, torch {torch.__version__}, {args.dtype}, {hq} query / "
        f"{hkv} KV heads, head dim {d}, block {BLOCK}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "command": " ".join(["python", *sys.argv]),
        "rows": [],
    }
    print(doc["setup"], flush=True)
    print("| length | pattern | dense SDPA ms | engine ms | Triton ms | Triton vs engine | max abs error |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        q = torch.randn(1, hq, length, d, device=device, dtype=dtype)
        k, v = (torch.randn(1, hkv, length, d, device=device, dtype=dtype) for _ in range(2))
        kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        dense_ms = timed(lambda q=q, kr=kr, vr=vr: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
        for name, start, past, groups, mask, window in patterns(length, hq, hkv, args.budget, device):
            engine_out, kernel_out = torch.zeros_like(q), torch.zeros_like(q)
            sinks, local = window if window else (None, None)

            def engine(
                q=q, k=k, v=v, out=engine_out, start=start, past=past, groups=groups, mask=mask
            ) -> None:
                bsa.sparse_attention(
                    q, k, v, d**-0.5, past, groups, out, block_size=BLOCK, start_row=start, row_mask=mask
                )

            def kernel(
                q=q, k=k, v=v, out=kernel_out, start=start, past=past, groups=groups, s=sinks, w=local
            ) -> None:
                bsa.triton_sparse_attention(
                    q, k, v, d**-0.5, past, groups, out, block_size=BLOCK, start_row=start, sinks=s, window=w
                )

            engine_ms, kernel_ms = timed(engine), timed(kernel)
            err = (engine_out[:, :, start:].float() - kernel_out[:, :, start:].float()).abs().max().item()
            row = {
                "length": length,
                "pattern": name,
                "dense_sdpa_ms": dense_ms,
                "engine_ms": engine_ms,
                "triton_ms": kernel_ms,
                "triton_vs_engine": engine_ms / kernel_ms,
                "max_abs_error": err,
                "sparse_rows_from": start,
            }
            doc["rows"].append(row)
            if args.out:
                args.out.write_text(json.dumps(doc, indent=1) + "\n")
            print(
                f"| {length} | {name} | {dense_ms:.2f} | {engine_ms:.2f} | {kernel_ms:.2f} "
                f"| {engine_ms / kernel_ms:.2f}x | {err:.2e} |",
                flush=True,
            )
        del q, k, v, kr, vr
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _wall_ms(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    return statistics.median(call_ms(fn, repeats))


if __name__ == "__main__":
    main()
