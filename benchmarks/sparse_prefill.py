"""Sparse prefill (A-shape, MInference, DHSA): prefill time and quality against dense, same run.

    python benchmarks/sparse_prefill.py speed --model smollm2-135m --lengths 2048 4096 8192
    python benchmarks/sparse_prefill.py quality --model smollm2-135m --length 8192 --samples 2
    python benchmarks/sparse_prefill.py kernel --lengths 16384 65536   # GPU: the Triton kernel

`speed` times the prefill (one forward of a passkey prompt of each length, chat template included)
for dense SDPA and every method, interleaved in each of `--repeats` (>= 5 for a claim) so load
drifts hit all alike, and prints medians with the interquartile range, the speed-up (dense time /
method time, paired per repeat, its median and IQR), the share of (row, key) attention pairs
computed, and the seconds spent inside the attention function (so the rest of the model, the Amdahl
bound, is visible), then the crossover: the shortest measured length from which a method's lower
quartile beats dense at every longer one, and which methods meet `--target` at the longest length
(lower quartile of the speed-up, tokensift.bench.timing). Every method runs with `dense_tail` 0 (its
paper's pattern alone) and 64 (the last 64 queries attend densely).
`quality` runs passkey and niah_single (depths 10/50/90%) and perplexity on Austen windows (scored in
2048-token forwards, so the prefill patterns apply) through the same methods and prints each score
next to dense's. Every row, the summaries and the command lines go to `--out` (one JSON document);
quality rows already there are reused, so a long grid can be resumed. `kernel` (CUDA and Triton)
checks the Triton block-sparse kernel against the PyTorch engine, then times it against dense flash
attention (SDPA) on random tensors at long lengths; it loads only the runtime's attention files, so
it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

METHODS = [
    "dense",
    "a_shape",
    "a_shape:dense_tail=64",
    "minference",
    "minference:dense_tail=64",
    "dhsa",
    "dhsa:dense_tail=64",
]
TARGET = 1.5  # prefill speed-up at the longest length (lower quartile)


class AttentionClock:
    """Seconds spent in the attention function (all layers), by wrapping the runtime's dispatcher."""

    def __init__(self) -> None:
        from tokensift.runtime import attention

        self.attention = attention
        self.seconds = 0.0
        self._inner = attention.run_layer

    def __enter__(self) -> AttentionClock:
        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                return self._inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        self.attention.run_layer = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.attention.run_layer = self._inner


def prefill(model: Any, prompt: Any, method: str, sample: Any = None) -> dict[str, Any]:
    """One `generate` of `prompt` (text or token ids) under `method`: prefill seconds, seconds in the
    attention function, share of causal pairs computed. Without a task `sample` one token is
    generated; with one (its prompt, tokensift.bench.tasks.Sample) its answer is decoded and scored
    too (`score`, `prediction`): prefill seconds stay the prefill's own, attention seconds then
    include the answer's few one-query steps."""
    import tokensift
    from tokensift.bench.tasks import get_task
    from tokensift.errors import NoOpWarning

    new, prefix = (sample.max_new_tokens, sample.answer_prefix) if sample is not None else (1, "")
    with AttentionClock() as clock, warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOpWarning)
        result = tokensift.generate(model, prompt, method, max_new_tokens=new, answer_prefix=prefix)
    stats = result.stats
    pairs = stats.counters.get("prefill_attention_pairs")
    dense_pairs = stats.counters.get("prefill_attention_pairs_dense")
    out = {
        "tokens": stats.prompt_tokens,
        "prefill": stats.prefill_seconds,
        "attention": clock.seconds,
        "density": pairs / dense_pairs if pairs and dense_pairs else 1.0,
    }
    if sample is not None:
        out["score"] = get_task(sample.task).score(sample, result.text)
        out["prediction"] = result.text
    return out


def speed(args: argparse.Namespace, model: Any) -> None:
    import tokensift
    from tokensift.bench.runner import token_counter
    from tokensift.bench.tasks import get_task
    from tokensift.bench.timing import Spread, speedup

    task = get_task("passkey")
    count = token_counter(model)
    print(
        f"model {model.name}, torch threads {torch.get_num_threads()}, repeats {args.repeats} "
        f"(medians [IQR]), load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(
        "\n| length | method | prefill s | speed-up (dense/method) | attention s | rest s | pairs computed |"
    )
    print("|---|---|---|---|---|---|---|")
    speedups: dict[str, list[tuple[int, Spread]]] = {}
    for length in args.lengths:
        prompt = task.samples(count, length, 1, seed=0, depths=[0.5])[0].prompt
        tokensift.generate(model, prompt[: len(prompt) // 4], "dense", max_new_tokens=1)  # warm-up
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in args.methods}
        for _ in range(args.repeats):
            for method in args.methods:  # interleaved: drift in machine load hits every method
                runs[method].append(prefill(model, prompt, method))
        base = [r["prefill"] for r in runs[args.methods[0]]]
        for method, rs in runs.items():
            p = Spread.of(r["prefill"] for r in rs)
            a = Spread.of(r["attention"] for r in rs)
            ratio = speedup(base, [r["prefill"] for r in rs])
            row = {
                "kind": "speed",
                "model": model.name,
                "length": length,
                "tokens": rs[0]["tokens"],
                "method": method,
                "prefill_seconds": p.median,
                "attention_seconds": a.median,
                "speedup_vs_dense": ratio.median,
                "spread": {"prefill_seconds": p.as_dict(), "speedup_vs_dense": ratio.as_dict()},
                "density": rs[0]["density"],
                "runs": rs,
            }
            _append(args.out, row)
            speedups.setdefault(method, []).append((length, ratio))
            print(
                f"| {rs[0]['tokens']} | {method} | {p.format()} | {ratio.format(2, 'x')} | {a.median:.2f} | "
                f"{p.median - a.median:.2f} | {rs[0]['density']:.3f} |",
                flush=True,
            )
    summary = {}
    longest = max(args.lengths)
    for method, points in speedups.items():
        if method == args.methods[0]:
            continue
        # Faster only where the lower quartile of the paired speed-up exceeds 1.
        faster = [n for n, _ in points if all(r.q1 > 1.0 for m, r in points if m >= n)]
        last = dict(points)[longest]
        summary[method] = {
            "speedups": {n: r.as_dict() for n, r in points},
            "crossover": min(faster) if faster else None,
            "target": TARGET,
            "target_met": last.meets(TARGET),
        }
        where = f"from {min(faster)} tokens on" if faster else "at none of the measured lengths"
        verdict = "meets" if last.meets(TARGET) else "misses"
        print(
            f"{method}: faster than {args.methods[0]} {where}; at {longest} {verdict} {TARGET}x "
            f"(lower quartile {last.q1:.2f}x)"
        )
    _append(args.out, {"kind": "speed_summary", "model": model.name, "summary": summary})


def quality(args: argparse.Namespace, model: Any) -> None:
    from tokensift.bench.runner import token_counter
    from tokensift.bench.tasks import get_task
    from tokensift.bench.tasks.perplexity import Perplexity
    from tokensift.errors import NoOpWarning
    from tokensift.runtime.plan import Plan

    count = token_counter(model)
    done = {json.dumps(r["key"]): r for r in _rows(args.out) if r.get("kind") == "quality"}
    scores: dict[tuple[str, str], list[float]] = {}
    for name in args.tasks:
        task = Perplexity(chunk=args.ppl_chunk) if name == "perplexity" else get_task(name)
        depths = [0.1, 0.5, 0.9] if task.uses_depth else None
        samples = task.samples(count, args.length, args.samples, seed=args.seed, depths=depths)
        for sample in samples:
            for method in args.methods:
                key = [model.name, name, args.length, sample.index, sample.depth, method]
                row = done.get(json.dumps(key))
                if row is None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", NoOpWarning)
                        result = task.evaluate(model, Plan.of(method), sample)
                    row = {
                        "kind": "quality",
                        "key": key,
                        "score": result["score"],
                        "prediction": result.get("prediction", ""),
                        "prefill_seconds": result.get("prefill_seconds"),
                    }
                    _append(args.out, row)
                scores.setdefault((name, method), []).append(float(row["score"]))
    print(f"\nmodel {model.name}, {args.length} tokens, {args.samples} sample(s) per depth, seed {args.seed}")
    header = " | ".join(args.methods)
    print(f"\n| task | metric | {header} |")
    print("|---|---|" + "---|" * len(args.methods))
    for name in args.tasks:
        metric = get_task(name).metric
        cells = []
        for method in args.methods:
            values = scores.get((name, method), [])
            mean = sum(values) / len(values) if values else float("nan")
            cells.append(f"{mean:.2f}" if metric == "perplexity" else f"{100 * mean:.0f}% ({len(values)})")
        print(f"| {name} | {metric} | {' | '.join(cells)} |")
    _append(
        args.out,
        {
            "kind": "quality_summary",
            "model": model.name,
            "length": args.length,
            "means": {f"{name}/{method}": sum(v) / len(v) for (name, method), v in scores.items() if v},
            "samples": {f"{name}/{method}": len(v) for (name, method), v in scores.items()},
        },
    )


def table(args: argparse.Namespace) -> None:
    """The README table from a results file: speed (last run per model and length) and quality."""
    rows = _rows(args.out)
    speed_rows = {(r["model"], r["length"], r["method"]): r for r in rows if r["kind"] == "speed"}
    methods = list(dict.fromkeys(k[2] for k in speed_rows))
    methods = ["dense", *(m for m in methods if m != "dense")]
    print(
        "| model | tokens | dense prefill s | "
        + " | ".join(f"{m} (speed-up [IQR])" for m in methods[1:])
        + " |"
    )
    print("|---|---|---|" + "---|" * (len(methods) - 1))
    for model, length in sorted({k[:2] for k in speed_rows}, key=lambda k: (k[0] != "smollm2-135m", k)):
        base = speed_rows.get((model, length, methods[0]))
        if base is None:
            continue
        cells = []
        for m in methods[1:]:
            r = speed_rows.get((model, length, m))
            cells.append(f"{_ratio(r)} (density {r['density']:.2f})" if r is not None else "-")
        print(f"| {model} | {base['tokens']} | {base['prefill_seconds']:.1f} | " + " | ".join(cells) + " |")
    quality_rows = [r for r in rows if r["kind"] == "quality"]
    if not quality_rows:
        return
    scores: dict[tuple[str, str], list[float]] = {}
    for r in quality_rows:
        _, task, _, _, _, method = r["key"]
        scores.setdefault((task, method), []).append(float(r["score"]))
    qmethods = list(dict.fromkeys(k[1] for k in scores))
    qmethods = ["dense", *(m for m in qmethods if m != "dense")]
    print("\n| task (samples) | " + " | ".join(qmethods) + " |")
    print("|---|" + "---|" * len(qmethods))
    for task in dict.fromkeys(k[0] for k in scores):
        cells = []
        for m in qmethods:
            v = scores.get((task, m), [])
            mean = sum(v) / len(v) if v else float("nan")
            cells.append(f"{mean:.2f}" if task == "perplexity" else f"{100 * mean:.0f}%")
        count = len(scores.get((task, qmethods[0]), []))
        print(f"| {task} ({count}) | " + " | ".join(cells) + " |")


def _ratio(row: dict[str, Any]) -> str:
    """A row's speed-up with its IQR (rows from before the repeats were kept show the median)."""
    from tokensift.bench.timing import Spread

    spread = row.get("spread", {}).get("speedup_vs_dense")
    if spread is None:
        return f"{row['speedup_vs_dense']:.2f}x (1 repeat)"
    return Spread(spread["median"], spread["q1"], spread["q3"], spread["n"]).format(2, "x")


def load_engine() -> Any:
    """The runtime's block-sparse module, loaded by path with only torch (and Triton) behind it."""
    import importlib.util
    import sys
    import types

    src = Path(__file__).resolve().parents[1] / "src" / "tokensift" / "runtime"
    for name in ("tokensift", "tokensift.runtime"):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = []
            sys.modules[name] = package
    for name in ("scores", "block_sparse"):
        spec = importlib.util.spec_from_file_location(f"tokensift.runtime.{name}", src / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["tokensift.runtime.block_sparse"]


def kernel(args: argparse.Namespace) -> None:
    bsa = load_engine()
    device = torch.device(args.device)
    hq, hkv, d, bs = args.heads, args.kv_heads, args.head_dim, 64
    sinks, local = 128, args.budget - 128

    def patterns(length: int, seed: int) -> list[tuple[str, Any, Any, int, dict[str, int]]]:
        """A-shape (shared by all heads), and per query head `budget` random earlier keys per block
        (the gather-heavy case; a repeated key is simply weighted twice, alike in both paths)."""
        first = min(length, sinks + local)
        firsts = bsa.block_starts(length, length, first, bs).to(device)
        shared = bsa.Groups.per_kv_head(hkv, hq // hkv, device)
        past = bsa.a_shape_past(firsts, sinks, local, length)[None, None]
        shape = ("A-shape", past, shared, first, {"sinks": sinks, "window": local})
        first = bsa.first_sparse_row(length, length, args.budget, bs)
        firsts = bsa.block_starts(length, length, first, bs).to(device)
        g = torch.Generator(device=device).manual_seed(seed)
        rand = torch.rand(hq, len(firsts), args.budget, generator=g, device=device)
        heads = bsa.Groups.per_query_head(torch.arange(hq, device=device), hq // hkv)
        return [shape, ("scattered", (rand * firsts[None, :, None]).long()[None], heads, first, {})]

    # Correctness: the kernel against the PyTorch engine (float32, on the CPU) at a small length.
    small = args.check_length
    q, k, v = (torch.randn(1, h, small, d, device=device) for h in (hq, hkv, hkv))
    for name, past, groups, first, window in patterns(small, 0):
        got = torch.zeros_like(q)
        bsa.triton_sparse_attention(
            q, k, v, d**-0.5, past, groups, got, block_size=bs, start_row=first, **window
        )
        ref = torch.zeros(q.shape)
        mask = bsa.a_shape_row_mask(sinks, local, bs) if window else None
        cpu = bsa.Groups(groups.heads.cpu(), groups.kv.cpu())
        bsa.sparse_attention(
            q.cpu(),
            k.cpu(),
            v.cpu(),
            d**-0.5,
            past.cpu(),
            cpu,
            ref,
            block_size=bs,
            start_row=first,
            row_mask=mask,
        )
        err = (got.cpu()[:, :, first:] - ref[:, :, first:]).abs().max().item()
        print(f"kernel vs engine at {small} tokens ({name}): max abs error {err:.2e}")
        assert err < 1e-2, err
    if device.type != "cuda":
        return  # timing needs CUDA events; off CUDA the kernel runs only in Triton's interpreter

    print(
        f"\n{torch.cuda.get_device_name()}, {args.dtype}, {hq} query / {hkv} KV heads, head dim {d}, "
        f"budget {args.budget} keys per query block"
    )
    print("\n| length | dense SDPA ms | A-shape ms | vs dense | scattered ms | vs dense |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        times = _kernel_times(bsa, length, hq, hkv, d, getattr(torch, args.dtype), patterns(length, 1))
        print(
            f"| {length} | {times[0]:.2f} | {times[1]:.2f} | {times[0] / times[1]:.2f}x | {times[2]:.2f} | "
            f"{times[0] / times[2]:.2f}x |",
            flush=True,
        )


def _kernel_times(bsa: Any, length: int, hq: int, hkv: int, d: int, dtype: torch.dtype, cases: list) -> list:
    """Milliseconds of dense flash attention, then of each pattern (its dense prefix rows included)."""
    q, k, v = (torch.randn(1, h, length, d, device="cuda", dtype=dtype) for h in (hq, hkv, hkv))
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)  # flash wants H_q heads
    out = torch.empty_like(q)
    times = [_cuda_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True))]
    for _, past, groups, first, window in cases:

        def call(past: Any = past, groups: Any = groups, first: int = first, window: dict = window) -> None:
            bsa.dense_rows(q, k, v, d**-0.5, out, first)
            bsa.triton_sparse_attention(
                q, k, v, d**-0.5, past, groups, out, block_size=64, start_row=first, **window
            )

        times.append(_cuda_ms(call))
    return times


def _cuda_ms(fn: Any, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(stop))
    return statistics.median(samples)


def _document(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {"commands": [], "rows": []}
    return json.loads(path.read_text())


def _rows(path: Path | None) -> list[dict[str, Any]]:
    return _document(path)["rows"]


def _append(path: Path | None, row: dict[str, Any]) -> None:
    """Add a row to the JSON document at `path` (rewritten whole: it stays one valid JSON file)."""
    if path is None:
        return
    document = _document(path)
    document["rows"].append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def _record_command(path: Path | None) -> None:
    import shlex
    import sys

    if path is None:
        return
    document = _document(path)
    document["commands"].append(
        {"command": shlex.join(["python", *sys.argv]), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("speed", "quality"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--methods", nargs="+", default=METHODS, help="the first is the baseline")
        p.add_argument("--out", type=Path, help="JSON file to add rows to (and resume from)")
    sub.choices["speed"].add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    sub.choices["speed"].add_argument(
        "--repeats", type=int, default=5, help="timed repeats, methods interleaved (claims need >= 5)"
    )
    sub.choices["quality"].add_argument("--length", type=int, default=8192)
    sub.choices["quality"].add_argument("--samples", type=int, default=2, help="per depth for depth tasks")
    sub.choices["quality"].add_argument(
        "--tasks", nargs="+", default=["passkey", "niah_single", "perplexity"]
    )
    sub.choices["quality"].add_argument("--seed", type=int, default=0)
    sub.choices["quality"].add_argument(
        "--ppl-chunk", type=int, default=2048, help="tokens per forward when scoring perplexity"
    )
    t = sub.add_parser("table", help="print the README tables from a results file")
    t.add_argument("--out", type=Path, default=Path("benchmarks/results/sparse_prefill.json"))
    k = sub.add_parser("kernel")
    k.add_argument("--lengths", nargs="+", type=int, default=[16384, 32768, 65536, 131072])
    k.add_argument("--heads", type=int, default=32)
    k.add_argument("--kv-heads", type=int, default=8)
    k.add_argument("--head-dim", type=int, default=128)
    k.add_argument("--budget", type=int, default=2048, help="keys per query block (own block aside)")
    k.add_argument("--dtype", default="bfloat16")
    k.add_argument("--device", default="cuda")
    k.add_argument("--check-length", type=int, default=4096, help="length of the correctness check")
    args = parser.parse_args()
    if args.command == "kernel":
        kernel(args)
        return
    if args.command == "table":
        table(args)
        return
    import tokensift

    if args.command == "speed":
        from tokensift.bench.timing import check_repeats

        check_repeats(args.repeats)
    model = tokensift.load(args.model)
    _record_command(args.out)
    (speed if args.command == "speed" else quality)(args, model)


if __name__ == "__main__":
    main()
