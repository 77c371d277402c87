"""Chunked prefill with on-the-fly eviction: peak memory and accuracy against one-shot compression.

On one long retrieval prompt set (chat-templated token ids, the format of kvpress_side_by_side.py):

  peak: process peak RSS above the loaded model for dense, one-shot SnapKV, chunked SnapKV and
        (in its own venv) kvpress 0.5.5's SnapKVPress at the same ratio. Each runs in a fresh
        subprocess on prompt 0: the model is loaded, VmHWM is reset to the current RSS through
        /proc/self/clear_refs, one generation runs, and VmHWM minus the loaded RSS is the figure.
  accuracy: one-shot vs chunked SnapKV on every prompt (RULER string match), in one process.

SnapKV uses kvpress's defaults (window 64, kernel 5, avg pooling) on both sides, query-aware (the
question is part of the compressed prompt). Chunked SnapKV scores each chunk with that chunk's own
last-window queries: a different method from one-shot SnapKV, which is what the accuracy column
measures.

  .venv/bin/python benchmarks/chunked_prefill.py --length 8192 --samples 5 \\
      --out benchmarks/results/chunked_prefill.json

A mode `chunked@N+W` is chunked prefill with chunks of N tokens and the prompt's last W tokens as
every chunk's lookahead (`--prefill-lookahead W`): the chunks are then scored by the question's
window, as one-shot SnapKV is.

`--repeats N` runs each mode's peak measurement in N fresh processes (one after another, modes
interleaved) and adds per-mode medians and quartiles (`summary`) of the peak RSS above the model
and of the RSS still held above it when the generation ends: allocator retention makes one
process's peak vary by tens of MiB between identical runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SNAPKV = "snapkv:window_size=64,kernel_size=5,pooling=avg,budget={b}"
KVPRESS_VENV = HERE.parent / ".venv-kvpress" / "bin" / "python"


def side_by_side() -> Any:
    """benchmarks/kvpress_side_by_side.py as a module (stdlib-only at import: both venvs load it)."""
    spec = importlib.util.spec_from_file_location("kvpress_side_by_side", HERE / "kvpress_side_by_side.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tokensift(
    prompt: dict[str, Any], mode: str, budget: float, chunk: int, lookahead: int, dtype: str
) -> dict:
    import tokensift
    from tokensift.models import load

    sbs = side_by_side()
    model = load(prompt["model"], dtype=dtype)
    tokensift.generate(model, prompt["context_ids"][:8], "dense", max_new_tokens=1)  # warm, as kvpress's
    baseline = sbs.reset_peak_rss()
    out = tokensift.generate(
        model,
        prompt["context_ids"] + prompt["question_ids"],
        "dense" if mode == "dense" else SNAPKV.format(b=budget),
        max_new_tokens=prompt["max_new_tokens"],
        prefill_chunk=chunk if mode == "chunked" else None,
        prefill_lookahead=lookahead if mode == "chunked" else 0,
    )
    s = out.stats
    return {
        "loaded_rss_mib": baseline["rss_before_mib"],
        "heap_trimmed": baseline["heap_trimmed"],
        "peak_rss_mib": sbs.rss_mib("VmHWM"),
        "rss_after_mib": sbs.rss_mib("VmRSS"),
        "prediction": out.text,
        "score": sbs.score(out.text, prompt["answers"]),
        "prefill_seconds": s.prefill_seconds,
        "kv_bytes_peak": s.kv_bytes_peak,
        "kv_bytes_final": s.kv_bytes_final,
        "kv_bytes_dense": s.kv_bytes_dense,
        "prefill_chunks": s.counters.get("prefill_chunks", 0),
        "prefill_lookahead_tokens": s.counters.get("prefill_lookahead_tokens", 0),
        "method": s.method,
    }


def run_kvpress(prompt: dict[str, Any], budget: float, dtype: str) -> dict:
    """kvpress's SnapKVPress measured as the side-by-side's fresh-process rows are."""
    sbs = side_by_side()
    result = sbs.from_loaded_model("kvpress", prompt, "snapkv", round(1 - budget, 6), "query-aware", dtype)
    return {
        "loaded_rss_mib": result.pop("rss_before_mib"),
        "rss_after_mib": sbs.rss_mib("VmRSS"),
        "score": sbs.score(result["prediction"], prompt["answers"]),
        **result,
    }


def child(args: argparse.Namespace) -> None:
    prompt = side_by_side().read_prompts(args.prompts)[args.index]
    if args.mode == "kvpress":
        row = run_kvpress(prompt, args.budget, args.dtype)
    else:
        row = run_tokensift(prompt, args.mode, args.budget, args.chunk, args.lookahead, args.dtype)
    print("ROW " + json.dumps(row))


def spawn(python: Path | str, label: str, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh process for one mode; `chunked@N` is chunked prefill with chunks of N tokens,
    `chunked@N+W` the same with the prompt's last W tokens as every chunk's lookahead."""
    mode, _, spec = label.partition("@")
    chunk, _, lookahead = spec.partition("+")
    chunk = chunk or str(args.chunk)
    lookahead = lookahead or "0"
    cmd = [
        str(python),
        __file__,
        "child",
        "--mode",
        mode,
        "--prompts",
        str(args.prompts_file),
        "--budget",
        str(args.budget),
        "--chunk",
        chunk,
        "--lookahead",
        lookahead,
        "--dtype",
        args.dtype,
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rows = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode or not rows:
        return {"mode": label, "error": (done.stderr or done.stdout).strip().splitlines()[-3:]}
    row = json.loads(rows[-1])
    row["mode"] = label
    row["chunk"] = int(chunk) if mode == "chunked" else 0
    row["lookahead"] = int(lookahead) if mode == "chunked" else 0
    row["above_model_mib"] = row["peak_rss_mib"] - row["loaded_rss_mib"]
    row["held_after_mib"] = row["rss_after_mib"] - row["loaded_rss_mib"]  # resident when generation ends
    row["wall_seconds"] = time.perf_counter() - t0
    print(
        f"{label}: peak above model {row['above_model_mib']:.0f} MiB, held after "
        f"{row['held_after_mib']:.0f} MiB, score {row['score']}",
        flush=True,
    )
    return row


def accuracy(args: argparse.Namespace, rows: list[dict[str, Any]], save: Any) -> None:
    """One-shot and chunked SnapKV on each prompt in turn, saved after each prompt."""
    import tokensift
    from tokensift.models import load

    sbs = side_by_side()
    prompts = sbs.read_prompts(args.prompts_file)[: args.accuracy_prompts]
    model = load(prompts[0]["model"], dtype=args.dtype)
    start = time.perf_counter()
    for prompt in prompts:
        if time.perf_counter() - start > args.accuracy_seconds:
            print(f"accuracy: stopped after {len(rows) // 2} prompts (--accuracy-seconds)", flush=True)
            break
        for mode in ("oneshot", "chunked"):
            out = tokensift.generate(
                model,
                prompt["context_ids"] + prompt["question_ids"],
                SNAPKV.format(b=args.budget),
                max_new_tokens=prompt["max_new_tokens"],
                prefill_chunk=args.chunk if mode == "chunked" else None,
            )
            rows.append(
                {
                    "prompt": prompt["prompt"],
                    "task": prompt["task"],
                    "mode": mode,
                    "tokens": len(prompt["context_ids"]) + len(prompt["question_ids"]),
                    "score": sbs.score(out.text, prompt["answers"]),
                    "prediction": out.text,
                    "answers": prompt["answers"],
                    "prefill_seconds": out.stats.prefill_seconds,
                }
            )
            print(f"#{prompt['prompt']} {mode}: {rows[-1]['score']}", flush=True)
        save()


def git_commit() -> str:
    """HEAD of this checkout, with `+dirty` when tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")


def tokensift_file() -> str:
    """Where the children import tokensift from (PYTHONPATH can point at another source tree)."""
    spec = importlib.util.find_spec("tokensift")
    return str(spec.origin if spec else "")


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode: the peak RSS above the model of every run, its median and quartiles (MiB)."""
    out: dict[str, dict[str, Any]] = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        done = [r for r in rows if r["mode"] == mode and "above_model_mib" in r]
        if not done:
            continue
        out[mode] = {"runs": len(done)}
        for field in ("above_model_mib", "held_after_mib"):
            values = [r[field] for r in done]
            q1, median, q3 = side_by_side().quartiles(values)
            out[mode][field] = {"runs": values, "median": median, "q1": q1, "q3": q3}
    return out


def check_fits(path: Path) -> None:
    """Refuse, before any child runs, a prompt that with its new tokens exceeds the model's context."""
    for prompt in side_by_side().read_prompts(path):
        config = json.loads((Path(prompt["model_dir"]) / "config.json").read_text())
        limit = int(config.get("max_position_embeddings") or 0)
        need = len(prompt["context_ids"]) + len(prompt["question_ids"]) + prompt["max_new_tokens"]
        if 0 < limit < need:
            print(
                f"error: prompt {prompt['prompt']} of {path} needs {need} tokens with its answer, over "
                f"{prompt['model']}'s context of {limit}: make the prompts with a smaller --length "
                f"(e.g. {limit - 64}) and a new --prompts-file",
                file=sys.stderr,
            )
            sys.exit(2)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    sub = p.add_subparsers(dest="step")
    c = sub.add_parser("child")
    c.add_argument("--mode", choices=["dense", "oneshot", "chunked", "kvpress"], required=True)
    c.add_argument("--prompts", type=Path, required=True)
    c.add_argument("--index", type=int, default=0)
    c.add_argument("--budget", type=float, required=True)
    c.add_argument("--chunk", type=int, required=True)
    c.add_argument("--lookahead", type=int, default=0)
    c.add_argument("--dtype", default="float32")
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--tasks", default="niah_single_1,niah_single_2")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--samples", type=int, default=5, help="per task")
    p.add_argument("--accuracy-prompts", type=int, default=10)
    p.add_argument("--accuracy-seconds", type=float, default=600, help="start no prompt after this")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--modes", default="dense,oneshot,chunked,kvpress")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per mode for the peak")
    p.add_argument("--prompts-file", type=Path, default=Path("runs/chunked_prefill/prompts.jsonl"))
    p.add_argument("--out", type=Path, default=HERE / "results" / "chunked_prefill.json")
    args = p.parse_args()
    if args.step == "child":
        child(args)
        return
    if not args.prompts_file.exists():
        sbs = side_by_side()
        sbs.make_prompts(
            argparse.Namespace(
                model=args.model,
                tasks=args.tasks,
                length=args.length,
                samples=args.samples,
                seed=2026,
                out=args.prompts_file,
            )
        )
    check_fits(args.prompts_file)
    ratio = round(1 - args.budget, 6)
    result: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "tokensift": str(Path(tokensift_file()).parent),
        "commit": git_commit(),
        "model": args.model,
        "length": args.length,
        "budget": args.budget,
        "chunk": args.chunk,
        "dtype": args.dtype,
        "snapkv": SNAPKV.format(b=args.budget),
        "kvpress": f"SnapKVPress(compression_ratio={ratio}, window_size=64, kernel_size=5)",
        "peak": [],
        "accuracy": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    for repeat in range(args.repeats):
        for mode in args.modes.split(","):
            python = KVPRESS_VENV if mode == "kvpress" else sys.executable
            row = spawn(python, mode, args)
            row["repeat"] = repeat
            row["load_average"] = os.getloadavg()
            result["peak"].append(row)
            result["summary"] = summarize(result["peak"])
            save()
    if args.accuracy_prompts > 0:

        def save_accuracy() -> None:
            for mode in ("oneshot", "chunked"):
                scores = [r["score"] for r in result["accuracy"] if r["mode"] == mode]
                result[f"accuracy_{mode}"] = {"n": len(scores), "mean": sum(scores) / max(1, len(scores))}
            save()

        accuracy(args, result["accuracy"], save_accuracy)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
