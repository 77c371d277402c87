"""The attention call of the sparse decoders at qwen2.5-coder-0.5b's decode shape (2 KV heads, 14
query heads, head_dim 64), gathered keys of a 32k cache: fused SDPA against what
`runtime.sparse_decode.attend` runs, per KV head (G=2: Quest, HiP, TokenSelect) and per query head
(G=14: TidalDecode), in float32 and bfloat16, at 512, 1024 and 2048 keys. One thread, as the methods
run it; median [Q1-Q3] milliseconds of `--repeats` calls after 5 warm-ups, both in one process.

    python benchmarks/sparse_decode_attend.py [--repeats 50]
        [--out benchmarks/results/sparse_decode_attend.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokensift.bench.runner import environment
from tokensift.bench.timing import Spread, call_ms, check_repeats
from tokensift.runtime.sparse_decode import attend, gather_kv, single_thread


def timed(fn: Any, repeats: int) -> Spread:
    return Spread.of(call_ms(fn, repeats, warmups=5))


def case(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, repeats: int) -> dict[str, Any]:
    """SDPA over the packed queries (the path `attend` used to take for every shape) against `attend`,
    on one set of gathered keys/values (1, G, m, D)."""
    b, heads, _, d = query.shape
    packed = query.reshape(b, keys.shape[1], heads // keys.shape[1], d)
    scale = d**-0.5
    with torch.inference_mode(), single_thread():
        sdpa = timed(lambda: F.scaled_dot_product_attention(packed, keys, values, scale=scale), repeats)
        ours = timed(lambda: attend(query, keys, values, scale), repeats)
        reference = F.scaled_dot_product_attention(packed, keys, values, scale=scale).reshape(query.shape)
        diff = (attend(query, keys, values, scale).float() - reference.float()).abs().max()
    return {"sdpa_ms": sdpa.as_dict(), "attend_ms": ours.as_dict(), "max_abs_diff": float(diff)}


def measure(
    repeats: int, n: int = 32768, kv: int = 2, heads: int = 14, d: int = 64, budgets=(512, 1024, 2048)
) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        k, v = (torch.randn(1, kv, n, d, generator=g).to(dtype) for _ in range(2))
        query = torch.randn(1, heads, 1, d, generator=g).to(dtype)
        for m in budgets:
            for groups in (kv, heads):
                index = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(groups)]).unsqueeze(0)
                keys, values = gather_kv(k, v, index)
                row = {"dtype": str(dtype).removeprefix("torch."), "keys": m, "index_rows": groups}
                rows.append({**row, **case(query, keys, values, repeats)})
    return rows


def render(doc: dict[str, Any]) -> str:
    lines = ["| dtype | keys | index rows | SDPA ms | attend ms |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        cell = [f"{s['median']:.3f} [{s['q1']:.3f}-{s['q3']:.3f}]" for s in (r["sdpa_ms"], r["attend_ms"])]
        lines.append(f"| {r['dtype']} | {r['keys']} | {r['index_rows']} | {cell[0]} | {cell[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    check_repeats(args.repeats)
    doc = {**environment(), "command": " ".join(["python", *sys.argv]), "rows": measure(args.repeats)}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(render(doc))


if __name__ == "__main__":
    main()
