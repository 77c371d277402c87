"""tokensift vs kvpress 0.5.5 on the same weights, the same token ids, the same ratios and protocols.

Three steps, two virtual environments (kvpress pins transformers < 5.3; nothing of kvpress is ever
imported by tokensift, and this script imports tokensift only in the steps that run in its venv):

  .venv/bin/python benchmarks/kvpress_side_by_side.py prompts --out runs/kvpress/prompts.jsonl
  .venv/bin/python benchmarks/kvpress_side_by_side.py run --side tokensift --prompts ... --out ...
  .venv-kvpress/bin/python benchmarks/kvpress_side_by_side.py run --side kvpress --prompts ... --out ...
  .venv/bin/python benchmarks/kvpress_side_by_side.py table <the two --out files> --json results.json

`make bench-kvpress` runs all of it. The prompts file carries the chat-templated token ids, split
where the question starts, so both libraries see identical inputs; the kvpress side drives the model
the way kvpress's own pipeline does (press as a context manager around the prefill forward, explicit
positions afterwards). Per cell (press x ratio x protocol): accuracy (every expected answer string
in the greedy output), prefill + compression seconds, process peak RSS (reset before each prompt
through /proc/self/clear_refs), KV bytes held after the prefill. Hidden prompt sets: write a JSONL
in the same format (see `prompts`) and pass it with --prompts.

A reset peak in a shared process still counts heap the allocator kept from earlier cells, which
differs between the two libraries; `run --fresh-process` runs every row in its own process (model
loaded and warmed on 8 tokens, then the peak reset), so the peak above start is the peak above the
loaded model. `malloc` runs one prompt that way in both venvs, with glibc's default malloc and with a
fixed mmap threshold, to tell memory held from freed heap the allocator keeps resident; `timing`
runs one prompt that way, both venvs interleaved run by run, for prefill times that do not carry the
machine's drift between two sequential halves (`--sides tokensift,transformers,kvpress --presses
dense` adds plain transformers in our venv, to tell our code from our venv's transformers version;
every run records its CPU seconds, user and kernel, and minor page faults); `profile` splits our
prefill into the press's own work and the model's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Press name -> (tokensift spec at a ratio, kvpress constructor source at a ratio). Parameters follow
# kvpress 0.5.5's defaults so the two implement the same thing (window 64, kernel 5, avg pooling).
PRESSES: dict[str, tuple[str, str]] = {
    "dense": ("dense", ""),
    "streaming_llm": ("streaming_llm:sinks=4", "StreamingLLMPress(compression_ratio={r}, n_sink=4)"),
    "snapkv": (
        "snapkv:window_size=64,kernel_size=5,pooling=avg",
        "SnapKVPress(compression_ratio={r}, window_size=64, kernel_size=5)",
    ),
    # Not the same algorithm: ours is the paper's H2O (half the budget for recent tokens, raw attention
    # sums); kvpress's ObservedAttention divides by the queries that saw each token, no recent window.
    "h2o": ("h2o", "ObservedAttentionPress(compression_ratio={r})"),
    "adakv_snapkv": (
        "adaptive(snapkv:window_size=64,kernel_size=5,pooling=avg):alpha=0.2",
        "AdaKVPress(SnapKVPress(compression_ratio={r}, window_size=64, kernel_size=5), alpha_safeguard=0.2)",
    ),
    "tova": ("tova:heads=mean", "TOVAPress(compression_ratio={r})"),
    "knorm": ("knorm", "KnormPress(compression_ratio={r})"),
    "pyramidkv": (
        "pyramidkv:window_size=64,kernel_size=5",
        "PyramidKVPress(compression_ratio={r}, window_size=64, kernel_size=5, beta=20)",
    ),
}
PROTOCOLS = ("query-aware", "query-agnostic")


def fail(message: str) -> None:
    print(f"kvpress_side_by_side: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# -- measurement helpers shared by both sides -------------------------------------------------------


def reset_peak_rss() -> dict[str, Any]:
    """Start a peak measurement: return the heap's free pages to the OS, reset VmHWM to the current RSS
    and return that RSS (MiB), the baseline a peak is measured above, as `rss_before_mib`, with
    whether the trim ran (`heap_trimmed`).

    The trim matters: glibc keeps freed heap resident, and how much depends on what ran before
    (transformers' `from_pretrained` left about 110-120 MiB of it in kvpress's venv, our GGUF loader
    about 25-29 MiB: the loaded RSS of untrimmed and trimmed fresh-process rows at 4k). A run that
    reuses that slack peaks "lower above the loaded model" by as much without using less memory.
    Trimmed, both sides' baselines hold only live memory.
    """
    trimmed = trim_heap()
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM (the peak resident set) to the current RSS
    return {"rss_before_mib": rss_mib("VmRSS"), "heap_trimmed": trimmed}


def trim_heap() -> bool:
    """glibc's malloc_trim(0): give free heap pages back to the OS. False where there is no glibc."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def score(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all: the share of expected strings found in the output (case-insensitive)."""
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def read_prompts(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        fail(f"prompts file {path} does not exist: make it with the `prompts` step")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            assert isinstance(row["context_ids"], list) and isinstance(row["question_ids"], list)
            assert isinstance(row["answers"], list) and row["answers"]
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            fail(f"{path}:{i} is not a prompt row (context_ids, question_ids, answers, max_new_tokens)")
        rows.append(row)
    if not rows:
        fail(f"{path} holds no prompts")
    return rows


def cells(presses: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for press in presses:
        if press not in PRESSES:
            fail(f"unknown press {press!r}: choose from {', '.join(PRESSES)}")
        out += [(press, 0.0)] if press == "dense" else [(press, r) for r in ratios]
    return out


def done_keys(path: Path) -> set[tuple[str, float, str, int]]:
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            row = json.loads(line)
            keys.add((row["press"], row["ratio"], row["protocol"], row["prompt"]))
    return keys


def append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# -- step 1: prompts (tokensift venv) ----------------------------------------------------------------


def make_prompts(args: argparse.Namespace) -> None:
    from tokensift.bench.runner import token_counter
    from tokensift.bench.tasks import get_task
    from tokensift.models import load
    from tokensift.runtime.generate import encode_split

    model = load(args.model)
    count = token_counter(model)
    rows = []
    for name in args.tasks.split(","):
        task = get_task(name)
        for sample in task.samples(count, args.length, args.samples, seed=args.seed):
            answers = sample.answer if isinstance(sample.answer, list) else [sample.answer]
            context, question = task.protocol_prompt(sample, "query-agnostic")
            ctx_ids, q_ids = encode_split(model, context, question, answer_prefix=sample.answer_prefix)
            rows.append(
                {
                    "prompt": len(rows),
                    "task": name,
                    "model": model.name,
                    "model_dir": str(model.source),
                    "context_ids": ctx_ids,
                    "question_ids": q_ids,
                    "answers": [str(a) for a in answers],
                    "max_new_tokens": sample.max_new_tokens,
                }
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(args.out)
    print(f"wrote {len(rows)} prompts to {args.out}")


# -- step 2: one library over every cell ----------------------------------------------------------


def run_tokensift(prompt: dict[str, Any], press: str, ratio: float, protocol: str, dtype: str) -> dict:
    import tokensift
    from tokensift.methods.spec import with_compression_ratio
    from tokensift.models import load

    model = load(prompt.get("model") or prompt["model_dir"], dtype=dtype)
    spec = with_compression_ratio(PRESSES[press][0], ratio) if press != "dense" else "dense"
    ctx, q = prompt["context_ids"], prompt["question_ids"]
    aware = protocol == "query-aware"
    out = tokensift.generate(
        model,
        ctx + q if aware else ctx,
        spec,
        question=None if aware else q,
        max_new_tokens=prompt["max_new_tokens"],
    )
    return {
        "prediction": out.text,
        "prefill_seconds": out.stats.prefill_seconds,
        "kv_bytes": out.stats.kv_bytes_final,
        "tokens_held": out.stats.tokens_held,
        "kv_bytes_dense": out.stats.kv_bytes_dense,
        "method": out.stats.method,
    }


_KV_MODELS: dict[str, Any] = {}


def run_kvpress(prompt: dict[str, Any], press: str, ratio: float, protocol: str, dtype: str) -> dict:
    """kvpress's pipeline as its README runs it: the press as a context manager around the model's
    forward, then greedy decoding on the compressed DynamicCache. Dense runs no press and imports
    nothing of kvpress: plain transformers (what the `transformers` side runs in our venv)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    eager = press == "h2o"  # kvpress's ObservedAttentionPress needs the attention matrices
    key = f"{prompt['model_dir']}|{eager}"
    if key not in _KV_MODELS:
        _KV_MODELS.clear()  # one model in memory at a time
        impl = "eager" if eager else "sdpa"
        model = AutoModelForCausalLM.from_pretrained(
            prompt["model_dir"], dtype=getattr(torch, dtype), attn_implementation=impl
        ).eval()
        _KV_MODELS[key] = (model, AutoTokenizer.from_pretrained(prompt["model_dir"]))
    model, tok = _KV_MODELS[key]
    source = PRESSES[press][1]
    press_obj = eval(source.format(r=ratio), vars(importlib.import_module("kvpress"))) if source else None
    ctx = torch.tensor([prompt["context_ids"]])
    q = torch.tensor([prompt["question_ids"]])
    aware = protocol == "query-aware"
    first = torch.cat([ctx, q], dim=1) if aware else ctx
    cache = DynamicCache()
    with torch.inference_mode():
        t0 = time.perf_counter()
        with press_obj(model) if press_obj is not None else contextlib.nullcontext():
            out = model(input_ids=first, past_key_values=cache, use_cache=True, logits_to_keep=1)
        position = first.shape[1]
        if not aware:
            positions = torch.arange(position, position + q.shape[1]).unsqueeze(0)
            out = model(input_ids=q, past_key_values=cache, position_ids=positions, logits_to_keep=1)
            position += q.shape[1]
        prefill = time.perf_counter() - t0
        eos: set[int] = set()  # as tokensift's eos_ids: generation config, tokenizer, model config
        for holder in (model.generation_config, tok, model.config):
            value = getattr(holder, "eos_token_id", None)
            eos.update([value] if isinstance(value, int) else value or [])
        tokens: list[int] = []
        for step in range(prompt["max_new_tokens"]):
            token = int(out.logits[0, -1].argmax())
            if token in eos:
                break
            tokens.append(token)
            if step + 1 == prompt["max_new_tokens"]:
                break
            out = model(
                input_ids=torch.tensor([[token]]),
                past_key_values=cache,
                position_ids=torch.tensor([[position]]),
            )
            position += 1
    # Held at the end of the generation, as tokensift's kv_bytes_final (masked heads included: AdaKV's
    # head-wise compression in kvpress replaces keys by a fake key and frees nothing).
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    held = cache.get_seq_length()
    return {
        "prediction": tok.decode(tokens, skip_special_tokens=True),
        "prefill_seconds": prefill,
        "kv_bytes": kv_bytes,
        "tokens_held": held,
        "kv_bytes_dense": kv_bytes / max(1, held) * position,  # every token seen, uncompressed
        "method": source.format(r=ratio) if source else "dense",
    }


# "transformers": plain transformers in our venv, kvpress's harness without a press (dense only,
# checked by run_cell). Beside dense in both libraries' venvs it splits a dense gap into ours vs
# transformers (same venv) and our venv's transformers vs the version kvpress pins (same code).
RUNNERS = {"tokensift": run_tokensift, "kvpress": run_kvpress, "transformers": run_kvpress}


def warm_up_prompt(prompt: dict[str, Any]) -> dict[str, Any]:
    """The prompt's first 9 tokens, one new token: loads the model and pays the first forward's
    one-off allocations before anything is measured."""
    ctx = prompt["context_ids"]
    return {**prompt, "context_ids": ctx[:8], "question_ids": ctx[8:9], "max_new_tokens": 1}


def from_loaded_model(side: str, prompt: dict, press: str, ratio: float, protocol: str, dtype: str) -> dict:
    """Load and warm the model on 8 tokens, reset the peak, run one prompt: its result with the RSS of
    the loaded model as `rss_before_mib` and the peak since as `peak_rss_mib` (for a fresh process)."""
    # kvpress's H2O runs on an eager-attention model: warm that one, not an sdpa model it would replace
    eager = press == "h2o" and side == "kvpress"
    RUNNERS[side](warm_up_prompt(prompt), "h2o" if eager else "dense", 0.5, "query-aware", dtype)
    return measured(side, prompt, press, ratio, protocol, dtype)


def measured(side: str, prompt: dict, press: str, ratio: float, protocol: str, dtype: str) -> dict:
    """One prompt on `side` from a reset peak: its result with the baseline (`reset_peak_rss`) and the
    peak RSS since as `peak_rss_mib`."""
    baseline = reset_peak_rss()
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = RUNNERS[side](prompt, press, ratio, protocol, dtype)
    return {**baseline, "peak_rss_mib": rss_mib("VmHWM"), **result, **cpu_since(before)}


def cpu_since(before: resource.struct_rusage) -> dict[str, float]:
    """This process's CPU seconds in user code and in the kernel (page faults are most of it: a 4k
    prefill touches gigabytes of freshly mapped activations) and its minor page faults since `before`:
    what a wall-time gap between two runs of the same computation is made of."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_user_s": round(now.ru_utime - before.ru_utime, 2),
        "cpu_sys_s": round(now.ru_stime - before.ru_stime, 2),
        "minor_faults": now.ru_minflt - before.ru_minflt,
    }


def run_cell(args: argparse.Namespace) -> None:
    """One prompt of one cell in this (fresh) process, printed as a row (`--fresh-process`)."""
    import torch
    import transformers

    if args.side == "transformers" and args.press != "dense":
        fail(f"the transformers side runs dense only, not {args.press}")
    prompt = read_prompts(args.prompts)[args.index]
    row = from_loaded_model(args.side, prompt, args.press, args.ratio, args.protocol, args.dtype)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    print("ROW " + json.dumps({**row, "threads": torch.get_num_threads(), "versions": versions}))


def child_cell(
    python: str,
    side: str,
    prompts: Path,
    index: int,
    press: str,
    ratio: float,
    protocol: str,
    dtype: str,
    env: dict[str, str] | None = None,
) -> dict:
    """run_cell in a child process of `python` (the side's venv), with `env` if given; its row, or a
    one-line error."""
    cmd = [python, __file__, "cell", "--side", side, "--prompts", str(prompts), "--index", str(index)]
    cmd += ["--press", press, "--ratio", str(ratio), "--protocol", protocol, "--dtype", dtype]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    rows = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode or not rows:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        fail(f"the fresh {side} process for {press}@{ratio} {protocol} prompt {index} failed: {tail[0]}")
    return json.loads(rows[-1])


def fresh(args: argparse.Namespace, prompt: dict[str, Any], press: str, ratio: float, protocol: str) -> dict:
    """run_cell for one row of `run --fresh-process`, in a child process of this venv's Python."""
    return child_cell(
        sys.executable, args.side, args.prompts, prompt["index"], press, ratio, protocol, args.dtype
    )


def run_side(args: argparse.Namespace) -> None:
    import torch

    prompts = [{**p, "index": i} for i, p in enumerate(read_prompts(args.prompts))]
    if args.limit:
        prompts = prompts[: args.limit]
    grid = cells(args.presses.split(","), [float(r) for r in args.ratios.split(",")])
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    runner = RUNNERS[args.side]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = done_keys(args.out)
    todo = [
        (protocol, press, ratio, prompt)
        for protocol in protocols
        for press, ratio in grid
        for prompt in prompts
        if (press, ratio, protocol, prompt["prompt"]) not in done
    ]
    if todo and not args.fresh_process:
        # Load and warm up before the first measured row, also when resuming into a file that has
        # rows: the first forward pays one-off allocations, and a baseline taken before the model is
        # loaded would count the whole model in that row's peak.
        runner({**prompts[0], "max_new_tokens": 1}, "dense", 0.0, "query-aware", args.dtype)
    for protocol, press, ratio, prompt in todo:
        if args.fresh_process:
            result = fresh(args, prompt, press, ratio, protocol)
        else:
            result = measured(args.side, prompt, press, ratio, protocol, args.dtype)
        row = {
            "side": args.side,
            "press": press,
            "ratio": ratio,
            "protocol": protocol,
            "prompt": prompt["prompt"],
            "task": prompt["task"],
            "prompt_tokens": len(prompt["context_ids"]) + len(prompt["question_ids"]),
            "score": score(result["prediction"], prompt["answers"]),
            "fresh_process": args.fresh_process,
            "threads": torch.get_num_threads(),
            "dtype": args.dtype,
            **result,
        }
        append(args.out, row)
        print(
            f"{args.side} {protocol} {press}@{ratio} #{prompt['prompt']}: score {row['score']:.2f}, "
            f"prefill {row['prefill_seconds']:.2f}s, peak {row['peak_rss_mib']:.0f} MiB",
            flush=True,
        )


# -- fresh-process pairs: one prompt, both libraries, interleaved; `malloc` also sets glibc's mmap
# threshold, `timing` repeats the default for prefill times free of the drift between two halves -----

MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
DEFAULT_MALLOC = "glibc default (dynamic mmap threshold)"
# label -> the value of MALLOC_MMAP_THRESHOLD_ (None: unset, glibc's dynamic threshold)
MALLOC_SETTINGS: dict[str, str | None] = {
    DEFAULT_MALLOC: None,
    f"{MMAP_THRESHOLD_ENV}=131072": "131072",
}
SIDES = ("tokensift", "kvpress")
# --sides of `malloc` and `timing`: the two libraries, or dense in three arms with plain transformers
# run in our venv (the same computation in both venvs, and ours beside it in the same venv)
ALL_SIDES = ("tokensift", "transformers", "kvpress")
FRESH_PAIRS_WHAT = {
    "malloc": "fresh-process peak RSS above the loaded model, one prompt, both libraries, "
    f"glibc's default malloc against {MMAP_THRESHOLD_ENV}=131072, runs interleaved",
    "timing": "fresh-process prefill+compression time and peak RSS, one prompt, both libraries, "
    "glibc's default malloc, runs interleaved (the first library alternates by repeat)",
}


def run_fresh_pairs(args: argparse.Namespace) -> None:
    """One prompt in fresh processes of both libraries' venvs, interleaved (press, repeat, setting,
    library; the library that goes first alternates by repeat), one process at a time; `--out` is
    rewritten after every run and a rerun skips the runs it holds.

    `malloc`: glibc's default malloc and a fixed 128 KiB mmap threshold (large blocks always mapped,
    so a freed one goes back to the OS at once): does a peak-RSS gap between the libraries come from
    memory held, or from freed heap the allocator keeps resident?
    `timing`: the default allocator only, for prefill times measured side by side, so that a time
    ratio does not carry the machine's drift between a run of one library and a later run of the
    other (what the sequential `run` halves do)."""
    venvs = {"tokensift": "tokensift", "transformers": "tokensift", "kvpress": "kvpress"}
    sides = fresh_sides(args)
    _, presses, data = one_prompt_step(args)
    if "transformers" in sides and presses != ["dense"]:
        fail("--sides with transformers runs dense only: pass --presses dense --ratio 0")
    pythons = {side: getattr(args, f"{venvs[side]}_python") for side in sides}
    for side, python in pythons.items():
        if not Path(python).is_file():
            venv = f"--{venvs[side]}-python"
            fail(f"{venv} {python} does not exist: make that venv (make bench-kvpress) or pass one")
    third = "; a third arm, plain transformers in our venv (dense)" if "transformers" in sides else ""
    data.setdefault("what", FRESH_PAIRS_WHAT[args.step] + third)
    settings = MALLOC_SETTINGS if args.step == "malloc" else {DEFAULT_MALLOC: None}
    done = {run_key(r, MALLOC_FIELDS) for r in data["runs"]}
    base_env = {k: v for k, v in os.environ.items() if k != MMAP_THRESHOLD_ENV}
    order = itertools.product(presses, range(1, args.repeats + 1), settings)
    for press, repeat, label in order:
        first = (repeat - 1) % len(sides)  # two libraries: alternate; three: rotate
        for side in sides[first:] + sides[:first]:
            run = {**step_run(args, press, repeat), "malloc": label, "side": side}
            if run_key(run, MALLOC_FIELDS) in done:
                continue
            threshold = settings[label]
            env = base_env if threshold is None else {**base_env, MMAP_THRESHOLD_ENV: threshold}
            row = child_cell(
                pythons[side],
                side,
                args.prompts,
                args.index,
                press,
                run["ratio"],
                args.protocol,
                args.dtype,
                env,
            )
            run |= {
                "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                "threads": row.get("threads"),
                "versions": row.get("versions"),  # torch and transformers of the side's venv
                "rss_before_mib": round(row["rss_before_mib"]),
                "peak_above_loaded_mib": round(row["peak_rss_mib"] - row["rss_before_mib"]),
                "prefill_seconds": round(row["prefill_seconds"], 2),
                **{k: row[k] for k in CPU_FIELDS if k in row},
                "prediction": row["prediction"],
            }
            data["runs"].append(run)
            data["summary"] = fresh_pairs_summary(data["runs"])
            write_runs(args.out, data)
            print(
                f"{press} #{args.index} {repeat} {label} {side}: {run['peak_above_loaded_mib']} MiB, "
                f"prefill {run['prefill_seconds']:.1f} s",
                flush=True,
            )


def fresh_sides(args: argparse.Namespace) -> list[str]:
    """The libraries of a `malloc` or `timing` step, checked: two or three of ALL_SIDES, each once."""
    sides = args.sides.split(",")
    if len(set(sides)) != len(sides) or len(sides) < 2 or not set(sides) <= set(ALL_SIDES):
        fail(f"--sides {args.sides}: pass two or three of {','.join(ALL_SIDES)}, each once")
    return sides


def one_prompt_step(args: argparse.Namespace) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """What `malloc`, `timing` and `profile` start from, checked: the prompt at --index, the repeats,
    the presses and ratio, and the runs --out already holds."""
    prompts = read_prompts(args.prompts)
    if not 0 <= args.index < len(prompts):
        fail(f"--index {args.index} is outside {args.prompts} ({len(prompts)} prompts)")
    if args.repeats < 1:
        fail(f"--repeats {args.repeats}: pass 1 or more")
    presses = args.presses.split(",")
    cells(presses, [args.ratio])  # names checked
    if not 0 <= args.ratio < 1 or (args.ratio == 0 and presses != ["dense"]):
        fail(f"--ratio {args.ratio} is not a fraction removed: pass one in (0, 1), or 0 with --presses dense")
    return prompts[args.index], presses, read_runs(args.out)


def read_runs(path: Path) -> dict[str, Any]:
    """A results file of the `malloc` or `profile` step ({"runs": [...], ...}), or an empty one."""
    if not path.exists():
        return {"runs": []}
    try:
        data = json.loads(path.read_text())
        assert isinstance(data.get("runs"), list)
    except (json.JSONDecodeError, AssertionError, AttributeError):
        fail(f"{path} is not a results file of this step: pass a new --out or remove it")
    return data


def write_runs(path: Path, data: dict[str, Any]) -> None:
    """Rewrite the results file whole (never half-written), with every distinct command that added
    runs to it (a file written before `commands` existed keeps its one `command` as the first)."""
    command = "python benchmarks/kvpress_side_by_side.py " + " ".join(sys.argv[1:])
    commands = data.setdefault("commands", [data.pop("command")] if "command" in data else [])
    if command not in commands:
        commands.append(command)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


# What names one run of the `malloc`, `timing` and `profile` steps (a rerun skips a run its --out holds).
STEP_FIELDS = ("press", "ratio", "protocol", "index", "repeat")
MALLOC_FIELDS = (*STEP_FIELDS, "malloc", "side")


def step_run(args: argparse.Namespace, press: str, repeat: int) -> dict[str, Any]:
    """The STEP_FIELDS of one run: the press and repeat, at the step's ratio (0 for dense, which
    removes nothing), protocol and prompt."""
    return {
        "press": press,
        "ratio": 0.0 if press == "dense" else args.ratio,
        "protocol": args.protocol,
        "index": args.index,
        "repeat": repeat,
    }


def run_key(run: dict[str, Any], fields: tuple[str, ...]) -> tuple:
    return tuple(run.get(k) for k in fields)


CPU_FIELDS = ("cpu_user_s", "cpu_sys_s", "minor_faults")
# paired prefill ratios a summary gives when both sides ran: key -> (numerator side, denominator side)
PAIRED_RATIOS = {
    "prefill_ratio": ("tokensift", "kvpress"),
    "prefill_ratio_tokensift_vs_transformers": ("tokensift", "transformers"),
    "prefill_ratio_transformers_vs_kvpress": ("transformers", "kvpress"),
}


def fresh_pairs_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per press, ratio, protocol, prompt and malloc setting: each library's median peak above the
    loaded model and ours minus kvpress's; each library's prefill seconds (and CPU seconds, user and
    kernel, and minor faults where the runs record them) and the prefill ratios of PAIRED_RATIOS
    paired by repeat, as [lower quartile, median, upper quartile]."""
    groups: dict[tuple, dict[str, dict[int, dict[str, Any]]]] = {}
    for run in runs:
        key = (run["press"], run["ratio"], run["protocol"], run["index"], run["malloc"])
        groups.setdefault(key, {}).setdefault(run["side"], {})[run["repeat"]] = run
    out = []
    for (press, ratio, protocol, index, label), sides in groups.items():
        peaks = {
            side: statistics.median(r["peak_above_loaded_mib"] for r in v.values())
            for side, v in sides.items()
        }
        entry = {"press": press, "ratio": ratio, "protocol": protocol, "index": index, "malloc": label}
        shown = [side for side in ALL_SIDES if side in SIDES or side in sides]
        entry |= {f"{side}_median_mib": peaks.get(side) for side in shown}
        entry["runs"] = {side: len(sides.get(side, {})) for side in shown}
        both = all(side in peaks for side in SIDES)
        entry["ours_minus_kvpress_mib"] = peaks["tokensift"] - peaks["kvpress"] if both else None
        for side in shown:
            side_runs = sides.get(side, {}).values()
            seconds = [r["prefill_seconds"] for r in side_runs]
            # None, not NaN (invalid JSON), for a library with no run yet
            entry[f"{side}_prefill_s"] = list(quartiles(seconds)) if seconds else None
            for field in CPU_FIELDS:  # only where the runs record them (files from before lack them)
                values = [r[field] for r in side_runs if field in r]
                if values:
                    entry[f"{side}_{field}"] = list(quartiles(values))
        for name, (top, bottom) in PAIRED_RATIOS.items():
            if name != "prefill_ratio" and not (top in sides and bottom in sides):
                continue
            a, b = sides.get(top, {}), sides.get(bottom, {})
            ratios = [a[k]["prefill_seconds"] / b[k]["prefill_seconds"] for k in sorted(a.keys() & b.keys())]
            entry[name] = list(quartiles(ratios)) if ratios else None
        out.append(entry)
    return out


# -- where our prefill time goes: cProfile of one prompt on the tokensift side -----------------------


def run_profile(args: argparse.Namespace) -> None:
    """cProfile our generation of one prompt per press (tokensift venv), presses alternated, after a
    warm-up: how much of it is the press's own work (every `compress` of tokensift's methods, with the
    torch ops it calls) against the model's linear layers and attention. A time gap to kvpress larger
    than the press's own work is not the press. Appends to `--out` (resumable like `malloc`)."""
    import cProfile
    import pstats

    prompt, presses, data = one_prompt_step(args)
    data.setdefault(
        "what",
        "cProfile of tokensift's generation of one prompt per press (tokensift venv, "
        "presses alternated after a warm-up): compress_seconds is the cumulative time of the "
        "methods' `compress` (outermost calls, with the torch ops they call), linear_seconds "
        "and sdpa_seconds the own time of those torch ops, profiled_seconds the whole call "
        "(prefill and the answer's decode steps; cProfile's overhead included)",
    )
    done = {run_key(r, STEP_FIELDS) for r in data["runs"]}
    runs = (step_run(args, press, repeat) for repeat in range(1, args.repeats + 1) for press in presses)
    todo = [run for run in runs if run_key(run, STEP_FIELDS) not in done]
    if todo:
        run_tokensift(warm_up_prompt(prompt), "dense", 0.0, "query-aware", args.dtype)
    for run in todo:
        press, repeat = run["press"], run["repeat"]
        profiler = cProfile.Profile()
        profiler.enable()
        row = run_tokensift(prompt, press, args.ratio, args.protocol, args.dtype)
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        run["utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        run |= {"prefill_seconds": round(row["prefill_seconds"], 2), **profile_split(stats)}
        run["prediction"] = row["prediction"]
        data["runs"].append(run)
        write_runs(args.out, data)
        print(
            f"{press}@{args.ratio} {args.protocol} #{args.index} {repeat}: "
            f"prefill {run['prefill_seconds']} s, "
            f"compress {run['compress_seconds']} s, linear {run['linear_seconds']} s",
            flush=True,
        )


def profile_split(stats: dict[tuple, tuple]) -> dict[str, float]:
    """Seconds in the press's own work (cumulative time of tokensift methods' `compress`, outermost
    calls only), in the model's linear layers and in SDPA (their own time), and in all."""
    methods = f"{os.sep}tokensift{os.sep}methods{os.sep}"

    def ours(func: tuple) -> bool:
        return methods in func[0] and func[2] == "compress"

    compress = sum(
        entry[3] for func, entry in stats.items() if ours(func) and not any(ours(c) for c in entry[4])
    )
    builtin = {func[2]: entry[2] for func, entry in stats.items() if func[0] == "~"}
    return {
        "compress_seconds": round(compress, 6),
        "linear_seconds": round(builtin.get("<built-in method torch._C._nn.linear>", 0.0), 3),
        "sdpa_seconds": round(
            builtin.get("<built-in method torch._C._nn.scaled_dot_product_attention>", 0.0), 3
        ),
        "profiled_seconds": round(max(entry[3] for entry in stats.values()), 3),
    }


# -- step 3: the table -------------------------------------------------------------------------------


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def bootstrap_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    import random

    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(reps))
    return means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (protocol, press, ratio, process, library): accuracy with a bootstrap CI, prefill
    quartiles, peaks and KV held."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["protocol"], row["press"], row["ratio"], process(row), row["side"])
        groups.setdefault(key, []).append(row)
    unloaded = unloaded_baselines(rows)
    summary = []
    for (protocol, press, ratio, proc, side), cell in sorted(groups.items()):
        scores = [r["score"] for r in cell]
        lo, hi = bootstrap_ci(scores)
        summary.append(
            {
                "protocol": protocol,
                "press": press,
                "ratio": ratio,
                "process": proc,
                "side": side,
                "n": len(cell),
                "accuracy": statistics.fmean(scores),
                "ci95": [lo, hi],
                "prefill_seconds_q1_median_q3": quartiles([r["prefill_seconds"] for r in cell]),
                "peak_rss_mib_max": max(r["peak_rss_mib"] for r in cell),
                "peak_over_start_mib_median": quartiles([above(r) for r in cell if id(r) not in unloaded])[1],
                "peak_rows_unloaded": sum(id(r) in unloaded for r in cell),
                "kv_mib_median": statistics.median(r["kv_bytes"] for r in cell) / 2**20,
            }
        )
    return summary


def make_table(args: argparse.Namespace) -> None:
    rows = []
    for path in args.results:
        for i, line in enumerate(Path(path).read_text().splitlines(), 1):
            try:
                row = json.loads(line)
                assert {"side", "press", "ratio", "protocol", "prompt", "score"} <= row.keys()
            except (json.JSONDecodeError, AttributeError, AssertionError):
                fail(f"{path}:{i} is not a result row of the `run` step: pass only its --out files")
            rows.append(row)
    summary = summarise(rows)
    lines = [
        "| protocol | press | ratio | process | library | n | accuracy [95% CI] | prefill s (median, IQR) | "
        "peak RSS MiB | peak above start MiB | KV MiB held |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        q1, med, q3 = s["prefill_seconds_q1_median_q3"]
        lines.append(
            f"| {s['protocol']} | {s['press']} | {s['ratio']} | {s['process']} | {s['side']} | {s['n']} | "
            f"{s['accuracy']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] | {med:.2f} ({q1:.2f}-{q3:.2f}) | "
            f"{s['peak_rss_mib_max']:.0f} | {s['peak_over_start_mib_median']:.0f} | "
            f"{s['kv_mib_median']:.1f} |"
        )
    pairs = paired(rows)
    if pairs:
        lines += [
            "",
            "Paired by prompt (the prompts both libraries ran): tokensift minus kvpress accuracy with a "
            "paired bootstrap 95% CI, and per-prompt ratios tokensift / kvpress, median (IQR).",
            "",
            "| protocol | press | ratio | process | prompts | same score | accuracy Δ [95% CI] | "
            "prefill time ratio | peak-above-start ratio | KV held ratio |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in pairs:
            ratios = [s[k] for k in ("prefill_ratio", "peak_over_start_ratio", "kv_ratio")]
            lines.append(
                f"| {s['protocol']} | {s['press']} | {s['ratio']} | {s['process']} | {s['n']} | "
                f"{s['same_score']} | "
                f"{s['accuracy_delta']:+.2f} [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}] | "
                + " | ".join(f"{med:.2f} ({q1:.2f}-{q3:.2f})" for q1, med, q3 in ratios)
                + " |"
            )
    lines += ["", "README rows (shared-process cells both libraries ran):", "", *readme_rows(summary, pairs)]
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cells": summary, "paired": pairs, "rows": rows}, indent=1))
        args.json.with_suffix(".md").write_text(table + "\n")


# How the README names each press in its side-by-side table.
README_NAMES = {
    "dense": "dense",
    "tova": "TOVA",
    "knorm": "Knorm",
    "snapkv": "SnapKV",
    "streaming_llm": "StreamingLLM",
    "h2o": "H2O (kvpress: ObservedAttention, eager)",
    "adakv_snapkv": "AdaKV(SnapKV)",
    "pyramidkv": "PyramidKV",
}


def readme_rows(summary: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> list[str]:
    """The README's side-by-side rows, one per press, ratio and protocol both libraries ran in a shared
    process: scores, answers that match prompt by prompt, prefill ratio and KV held."""
    kv = {(s["protocol"], s["press"], s["ratio"], s["side"]): s for s in summary if s["process"] == "shared"}
    out = []
    for s in pairs:
        if s["process"] != "shared":
            continue
        key = (s["protocol"], s["press"], s["ratio"])
        ours, theirs = kv[(*key, "tokensift")], kv[(*key, "kvpress")]
        n = s["n"]
        if ours["n"] != n or theirs["n"] != n:
            continue  # a cell one library has not finished
        name = README_NAMES[s["press"]]
        if s["press"] == "dense":
            name += " (ratio 0)"
        elif s["ratio"] != 0.75:
            name += f" at ratio {s['ratio']:g}"
        same = f"{s['same_answer']} of {n}"
        if s["same_answer"] != s["same_score"]:
            same += f" (scores: {s['same_score']} of {n})"
        q1, med, q3 = s["prefill_ratio"]
        out.append(
            f"| {name} | {s['protocol']} | {ours['accuracy'] * n:g}/{n} | {theirs['accuracy'] * n:g}/{n} | "
            f"{same} | {med:.2f} [{q1:.2f}-{q3:.2f}] | "
            f"{ours['kv_mib_median']:.1f} / {theirs['kv_mib_median']:.1f} |"
        )
    return out


def process(row: dict[str, Any]) -> str:
    """ "fresh" for a row run in its own process (`--fresh-process`: peak above the loaded model),
    "shared" for one of a process that ran earlier cells (peak above the cell's start)."""
    return "fresh" if row.get("fresh_process") else "shared"


def above(row: dict[str, Any]) -> float:
    """The cell's peak RSS above the process's RSS when it started (MiB)."""
    return row["peak_rss_mib"] - row["rss_before_mib"]


def unloaded_baselines(rows: list[dict[str, Any]]) -> set[int]:
    """The `id`s of rows whose peak baseline was taken before the model was loaded: their
    `rss_before_mib` is under half the median of that library's rows of the same process kind.

    Before 2026-12-04 `run` warmed the model up only when its --out file was new, so the first prompt
    of a run resumed into a file that had rows (a second press appended to it) reset the peak before
    loading the weights, and its "peak above start" counts the whole model. Their accuracy, time and
    KV held stand; their peak above start is left out of the medians and ratios."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["side"], process(row)), []).append(row)
    out = set()
    for group in groups.values():
        floor = statistics.median(r["rss_before_mib"] for r in group) / 2
        out |= {id(r) for r in group if r["rss_before_mib"] < floor}
    return out


def paired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (protocol, press, ratio, process) both libraries ran: the prompts they share, compared one
    by one (fresh-process rows only with fresh-process rows)."""
    by: dict[tuple, dict[str, dict[int, dict]]] = {}
    for row in rows:
        key = (row["protocol"], row["press"], row["ratio"], process(row))
        by.setdefault(key, {}).setdefault(row["side"], {})[row["prompt"]] = row
    unloaded = unloaded_baselines(rows)
    out = []
    for (protocol, press, ratio, proc), sides in sorted(by.items()):
        ours, theirs = sides.get("tokensift", {}), sides.get("kvpress", {})
        shared = sorted(ours.keys() & theirs.keys())
        if not shared:
            continue
        pairs = [(ours[p], theirs[p]) for p in shared]
        peaks = [(a, b) for a, b in pairs if id(a) not in unloaded and id(b) not in unloaded]
        deltas = [a["score"] - b["score"] for a, b in pairs]
        lo, hi = bootstrap_ci(deltas)
        out.append(
            {
                "protocol": protocol,
                "press": press,
                "ratio": ratio,
                "process": proc,
                "n": len(shared),
                "same_score": sum(a["score"] == b["score"] for a, b in pairs),
                "same_answer": sum(a["prediction"].strip() == b["prediction"].strip() for a, b in pairs),
                "accuracy_delta": statistics.fmean(deltas),
                "ci95": [lo, hi],
                "prefill_ratio": quartiles([a["prefill_seconds"] / b["prefill_seconds"] for a, b in pairs]),
                "peak_over_start_ratio": quartiles([above(a) / max(above(b), 1.0) for a, b in peaks]),
                "peak_pairs": len(peaks),
                "kv_ratio": quartiles([a["kv_bytes"] / b["kv_bytes"] for a, b in pairs]),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prompts", help="make the shared prompt set (tokensift venv)")
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--tasks", default="niah_single_1,niah_single_2,niah_multikey_1")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("run", help="run one library over the grid (resumable)")
    p.add_argument("--side", choices=["tokensift", "kvpress"], required=True)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--presses", default=",".join(PRESSES))
    p.add_argument("--ratios", default="0.25,0.5,0.75,0.875")
    p.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default="both")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument(
        "--fresh-process",
        action="store_true",
        help="each prompt of each cell in its own process: peak RSS above the loaded model, no heap "
        "left over from earlier cells (costs a model load per row)",
    )
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("cell", help="one prompt of one cell (what --fresh-process runs per row)")
    p.add_argument("--side", choices=list(ALL_SIDES), required=True)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--press", choices=list(PRESSES), required=True)
    p.add_argument("--ratio", type=float, required=True)
    p.add_argument("--protocol", choices=PROTOCOLS, required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    for step, repeats, help_text in (
        ("malloc", 2, "one prompt in fresh processes, both sides, glibc's malloc vs a fixed mmap threshold"),
        ("timing", 5, "one prompt in fresh processes, both sides interleaved: prefill times side by side"),
    ):
        p = sub.add_parser(step, help=help_text)
        p.add_argument("--prompts", type=Path, required=True)
        p.add_argument("--index", type=int, default=0)
        p.add_argument("--presses", default="knorm")
        p.add_argument("--ratio", type=float, default=0.25)
        p.add_argument("--protocol", choices=PROTOCOLS, default="query-aware")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        p.add_argument("--repeats", type=int, default=repeats)
        p.add_argument(
            "--sides",
            default="tokensift,kvpress",
            help="the libraries, in first-run order: two or three of tokensift, transformers (plain "
            "transformers in our venv, dense only) and kvpress",
        )
        p.add_argument("--tokensift-python", default=".venv/bin/python")
        p.add_argument("--kvpress-python", default=".venv-kvpress/bin/python")
        p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("profile", help="cProfile one prompt per press on the tokensift side: press vs model")
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--presses", required=True)
    p.add_argument("--ratio", type=float, required=True)
    p.add_argument("--protocol", choices=PROTOCOLS, required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("table", help="merge both sides' rows into one table")
    p.add_argument("results", nargs="+")
    p.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.step == "prompts":
        make_prompts(args)
    elif args.step == "run":
        run_side(args)
    elif args.step == "cell":
        run_cell(args)
    elif args.step in ("malloc", "timing"):
        run_fresh_pairs(args)
    elif args.step == "profile":
        run_profile(args)
    else:
        make_table(args)


if __name__ == "__main__":
    main()
