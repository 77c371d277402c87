"""What one decode step must read, and the end-to-end speed-up sparse decoding can give at most.

At batch 1 a decode step streams every weight the step multiplies by (all parameters but the input
embedding, of which it reads one row; a tied embedding counts once, as the LM head) whatever the
attention does, while dense attention streams the whole KV cache. Where decode runs at a fixed memory
bandwidth, a sparse decoder that makes attention `r` times cheaper gives at most
(W + b*K*n) / (W + b*K*n/r) end to end (W weights, K cached values per token, n tokens, b sequences
decoded together). The counts come from the loaded model, so an untied LM head or a GQA cache is
counted as it is. `--measured` adds, from `benchmarks/long_context.py` results, the dense decode
step, its attention, the bandwidth each part achieved and the free-attention bound of that run.

    python benchmarks/decode_bytes.py [--model qwen2.5-coder-0.5b] [--lengths 8192 16384 32768]
        [--batch 1] [--target 2.5] [--attention-speedup 8] [--measured RESULTS.json ...]
        [--out benchmarks/results/decode_bytes.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch


def counts(model: Any) -> dict[str, int]:
    """Values one decode step reads from the weights, and cached K+V values per token (one sequence)."""
    hf = model.model
    total = sum(p.numel() for p in hf.parameters())
    embedding = hf.get_input_embeddings().weight
    head = hf.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    weights = total if tied else total - embedding.numel() + embedding.shape[1]  # one embedding row
    return {
        "parameters": total,
        "weights_read_per_step": weights,
        "tied_embeddings": tied,
        "layers": model.num_layers,
        "kv_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "kv_values_per_token": model.kv_bytes_per_token // torch.empty((), dtype=model.dtype).element_size(),
    }


def bound(weights: float, kv: float, speedup: float) -> float:
    """End-to-end speed-up when attention (streaming `kv` values) gets `speedup` times cheaper and the
    weights' `weights` values are read as before, at one bandwidth; `math.inf` speedup: free attention."""
    return (weights + kv) / (weights + kv / speedup)


def needed(weights: float, kv_per_unit: float, target: float, speedup: float) -> float:
    """Units (tokens, or sequences of a given length) of cache for `bound` to reach `target`."""
    if target >= speedup:
        return math.inf
    return (target - 1) * weights / (kv_per_unit * (1 - target / speedup))


def _whole(x: float) -> int | None:
    return None if math.isinf(x) else math.ceil(x)


def rows(
    c: dict[str, int], lengths: list[int], batch: int, target: float, speedup: float
) -> list[dict[str, Any]]:
    w, k = c["weights_read_per_step"], c["kv_values_per_token"]
    out = []
    for n in lengths:
        kv = batch * k * n
        out.append(
            {
                "length": n,
                "batch": batch,
                "kv_values": kv,
                "kv_over_weights": kv / w,
                "bound_free_attention": bound(w, kv, math.inf),
                f"bound_attention_{speedup:g}x": bound(w, kv, speedup),
                "batch_for_target": _whole(needed(w, k * n, target, speedup)),
            }
        )
    return out


def measured(c: dict[str, int], doc: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """Dense decode rows of a long_context.py results file: step and attention ms, the rest, the
    bandwidth each part achieved (GB/s of the values it must read) and that run's free-attention bound."""
    out = []
    for r in doc.get("rows", []):
        if r.get("part") != "decode" or r.get("spec") != "dense":
            continue
        size = torch.empty(0, dtype=getattr(torch, r["dtype"])).element_size()
        step = 1e3 / r["decode_tps"]["median"]
        attention = r["attention_ms_per_token"]["median"]
        rest = step - attention
        out.append(
            {
                "source": source,
                "dtype": r["dtype"],
                "length": r["length"],
                "step_ms": step,
                "attention_ms": attention,
                "rest_ms": rest,
                "weights_gb_per_s": c["weights_read_per_step"] * size / rest / 1e6,
                "kv_gb_per_s": c["kv_values_per_token"] * r["length"] * size / attention / 1e6,
                "bound_free_attention": step / rest,
            }
        )
    return out


def render(doc: dict[str, Any]) -> str:
    c, speedup, target = doc["counts"], doc["attention_speedup"], doc["target"]
    lines = [
        f"{doc['model']}: {c['weights_read_per_step'] / 1e6:.1f}M weight values read per decode step "
        f"({c['parameters'] / 1e6:.1f}M parameters, tied embeddings: {c['tied_embeddings']}), "
        f"{c['kv_values_per_token']} cached values per token "
        f"({c['layers']} layers x K,V x {c['kv_heads']} KV heads x {c['head_dim']})",
        "",
        f"| context | batch | cache / weights | bound, free attention | bound, {speedup:g}x attention "
        f"| batch for {target:g}x at {speedup:g}x |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        batch = "never" if r["batch_for_target"] is None else r["batch_for_target"]
        lines.append(
            f"| {r['length']} | {r['batch']} | {r['kv_over_weights']:.2f} | {r['bound_free_attention']:.2f}x "
            f"| {r[f'bound_attention_{speedup:g}x']:.2f}x | {batch} |"
        )
    tokens = doc["tokens_for_target"]
    reach = "never" if tokens is None else f"from {tokens:,} tokens of context"
    lines += ["", f"batch 1 reaches {target:g}x end to end at {speedup:g}x attention {reach}"]
    if doc["measured"]:
        lines += [
            "",
            "| run | dtype | context | dense step ms | attention ms | rest ms | weights GB/s | cache GB/s "
            "| free-attention bound |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in doc["measured"]:
            lines.append(
                f"| {Path(m['source']).name} | {m['dtype']} | {m['length']} | {m['step_ms']:.1f} "
                f"| {m['attention_ms']:.1f} | {m['rest_ms']:.1f} | {m['weights_gb_per_s']:.1f} "
                f"| {m['kv_gb_per_s']:.1f} | {m['bound_free_attention']:.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="embedded name, HF directory or id")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--target", type=float, default=2.5, help="end-to-end speed-up asked for")
    parser.add_argument("--attention-speedup", type=float, default=8.0, help="attention speed-up assumed")
    parser.add_argument("--measured", type=Path, nargs="*", default=[], help="long_context.py results JSON")
    parser.add_argument("--out", type=Path, help="results JSON")
    args = parser.parse_args()
    import tokensift
    from tokensift.bench.runner import environment
    from tokensift.errors import TokensiftError, fail

    if args.batch < 1 or min(args.lengths) < 1 or args.target <= 1 or args.attention_speedup <= 1:
        fail("--batch and --lengths must be >= 1, --target and --attention-speedup > 1")
    docs = {}
    for path in args.measured:
        try:
            docs[str(path)] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            fail(f"--measured {path}: not JSON ({exc}); pass a benchmarks/long_context.py --out file")
    try:
        model = tokensift.load(args.model, dtype="float32")  # counts only; bytes follow each row's dtype
    except TokensiftError as exc:
        fail(str(exc))
    c = counts(model)
    doc = {
        "benchmark": "decode_bytes",
        "model": args.model,
        **environment(),
        "command": " ".join(["python", *sys.argv]),
        "counts": c,
        "target": args.target,
        "attention_speedup": args.attention_speedup,
        "rows": rows(c, args.lengths, args.batch, args.target, args.attention_speedup),
        "tokens_for_target": _whole(
            needed(c["weights_read_per_step"], c["kv_values_per_token"], args.target, args.attention_speedup)
        ),
        "measured": [],
    }
    for source, d in docs.items():
        try:
            doc["measured"] += measured(c, d, source)
        except (KeyError, TypeError, AttributeError) as exc:
            fail(f"--measured {source}: not rows as benchmarks/long_context.py writes them (missing {exc})")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(render(doc))


if __name__ == "__main__":
    main()
