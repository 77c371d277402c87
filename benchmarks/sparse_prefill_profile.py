"""Where a sparse-prefill method's attention time goes: one prefill per spec of the same passkey prompt,
its attention time split into the engine's parts. A profile (one run per spec), not a speed claim:
the speed-ups with repeats are benchmarks/long_context.py's.

    python benchmarks/sparse_prefill_profile.py [--model qwen2.5-coder-0.5b] [--dtype float32]
        [--length 16384] [--specs dense a_shape:dense_tail=64 minference:dense_tail=64 dhsa:dense_tail=64]
        [--out benchmarks/results/sparse_prefill_profile_16k.json]

Parts of the attention time (seconds in the runtime's attention function, all layers):

- sparse, stacked: block-sparse engine calls whose groups stack several query heads on one KV head
  (A-shape's window, DHSA's selection per KV head, MInference's A-shape heads): each gathered key
  serves all the group's query heads;
- sparse, per head: calls with one query head per group (MInference's vertical-slash and
  block-sparse heads, whose indices differ per query head), each gathering its own keys;
- dense rows (the first rows of a call, whose causal prefix is shorter than a sparse block's keys)
  and the dense tail (`dense_tail`);
- the rest: everything else in the attention function: for a method chiefly building its indices
  (its plan), for the dense spec the whole dense attention.

Pairs are the (row, key) pairs each kind of call computed, padding included; ns/pair is its time
per pair. The wall and attention seconds come from one run and carry the machine's noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import long_context
import sparse_prefill

SPECS = ["dense", "a_shape:dense_tail=64", "minference:dense_tail=64", "dhsa:dense_tail=64"]


class Parts:
    """Seconds and pairs of the block-sparse engine's calls while installed (wraps
    runtime.block_sparse's sparse_attention, dense_rows and dense_tail_rows, which run_plan looks up
    at call time)."""

    NAMES = ("sparse_attention", "dense_rows", "dense_tail_rows")

    def __init__(self) -> None:
        from tokensift.runtime import block_sparse

        self.module = block_sparse
        self.inner = {name: getattr(block_sparse, name) for name in self.NAMES}
        self.seconds: dict[str, float] = defaultdict(float)
        self.pairs: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def _timed(self, name: str) -> Any:
        inner = self.inner[name]

        def timed(*args: Any, **kwargs: Any) -> Any:
            if name == "sparse_attention":
                kind = "sparse, stacked" if args[5].heads.shape[1] > 1 else "sparse, per head"
            else:
                kind = {"dense_rows": "dense rows", "dense_tail_rows": "dense tail"}[name]
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds[kind] += time.perf_counter() - t
            self.calls[kind] += 1
            if name == "sparse_attention":
                self.pairs[kind] += int(out)
            return out

        return timed

    def __enter__(self) -> Parts:
        for name in self.NAMES:
            setattr(self.module, name, self._timed(name))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, inner in self.inner.items():
            setattr(self.module, name, inner)


def profile(model: Any, prompt: str, spec: str) -> dict[str, Any]:
    """One prefill of `prompt` under `spec` (sparse_prefill.prefill): wall, attention and its parts."""
    with Parts() as parts:
        run = sparse_prefill.prefill(model, prompt, spec)
    known = sum(parts.seconds.values())
    row: dict[str, Any] = {
        "spec": spec,
        "prefill_seconds": run["prefill"],
        "attention_seconds": run["attention"],
        "pairs_computed": run["density"],
        "parts": {
            kind: {
                "seconds": parts.seconds[kind],
                "calls": parts.calls[kind],
                **(
                    {"pairs": parts.pairs[kind], "ns_per_pair": 1e9 * parts.seconds[kind] / parts.pairs[kind]}
                    if parts.pairs.get(kind)
                    else {}
                ),
            }
            for kind in sorted(parts.seconds)
        },
        "rest_seconds": run["attention"] - known,
    }
    return row


def sparse_cell(parts: dict[str, Any], kind: str) -> str:
    """Seconds (ns per pair) of one kind of sparse call, '-' when the spec made none."""
    part = parts.get(kind)
    return f"{part['seconds']:.1f} ({part['ns_per_pair']:.1f})" if part and "ns_per_pair" in part else "-"


def render(doc: dict[str, Any]) -> str:
    lines = [
        "| spec | prefill s | attention s | sparse, stacked s (ns/pair) | sparse, per head s (ns/pair) "
        "| dense rows + tail s | rest s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        parts = row["parts"]
        dense = sum(parts.get(k, {}).get("seconds", 0.0) for k in ("dense rows", "dense tail"))
        lines.append(
            f"| `{row['spec']}` | {row['prefill_seconds']:.1f} | {row['attention_seconds']:.1f} "
            f"| {sparse_cell(parts, 'sparse, stacked')} | {sparse_cell(parts, 'sparse, per head')} "
            f"| {dense:.1f} | {row['rest_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--depth", type=float, default=0.5, help="passkey depth of the prompt")
    parser.add_argument("--specs", nargs="+", default=SPECS)
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--render", type=Path, help="print the table of a saved JSON and exit")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    import tokensift
    from tokensift.bench.runner import environment
    from tokensift.errors import TokensiftError, fail

    try:
        model = tokensift.load(args.model, dtype=args.dtype)
        sample = long_context.passkey_samples(model, args.length, 40, [args.depth])[0]
    except TokensiftError as exc:
        fail(str(exc))
    doc: dict[str, Any] = {
        "benchmark": "sparse_prefill_profile",
        "model": args.model,
        "dtype": str(model.dtype).removeprefix("torch."),
        "length": args.length,
        "depth": args.depth,
        **environment(),  # versions, threads, commit
        "cpu": platform.processor() or platform.machine(),
        "command": " ".join(["python", *sys.argv]),
        "rows": [],
    }
    sparse_prefill.prefill(model, sample.prompt[: len(sample.prompt) // 8], "dense")  # warm-up
    for spec in args.specs:
        try:
            row = profile(model, sample.prompt, spec)
        except TokensiftError as exc:
            fail(f"{spec}: {exc}")
        doc["rows"].append(row)
        print(f"{spec}: prefill {row['prefill_seconds']:.1f} s, attention {row['attention_seconds']:.1f} s")
        if args.out:
            args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(render(doc))


if __name__ == "__main__":
    main()
