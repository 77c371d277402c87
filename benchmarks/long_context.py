"""Long-context speed where the methods matter: sparse decoding, sparse prefill and eviction against
dense on qwen2.5-coder-0.5b at 8k, 16k and 32k tokens, every figure a same-run ratio to dense.

    python benchmarks/long_context.py [--model qwen2.5-coder-0.5b | --random-weights CONFIG_JSON]
        [--device cpu] [--dtype float32 bfloat16] [--lengths 8192 16384 32768] [--repeats 5]
        [--parts decode prefill eviction] [--budgets 512 1024 2048] [--eviction-budgets 0.1 0.25]
        [--new-tokens 32] [--prefill-tail 0] [--prefill-depths 0.1 0.5 0.9] [--resume]
        [--threads N] [--out benchmarks/results/long_context.json]
    python benchmarks/long_context.py --render benchmarks/results/long_context.json

Parts (issue 15, part 1), each timed `--repeats` times (>= 5 for a claim) with the specs in rotated
order inside every repeat, medians with the interquartile range, speed-ups paired per repeat
(dense / method, tokensift.bench.timing), the same torch threads for every spec:

- decode: quest, hip, tokenselect and tidaldecode at `--budgets` tokens. The prompt is prefilled
  once, densely, and replayed into a fresh cache per spec (benchmarks/sparse_decode.py's `decode`):
  decode tokens/s and per-token attention time (the runtime's attention call for one-query
  forwards, selection included) against dense.
- prefill: a_shape, minference and dhsa with dense_tail `--prefill-tail` (0, the default: the
  pattern alone; 64: the last 64 queries, a question at the end, attend densely): prefill seconds
  (one `generate`, benchmarks/sparse_prefill.py's `prefill`) and the attention share, against dense,
  and the share of causal (row, key) pairs computed. With `--prefill-depths` (a real model) repeat r
  prefills the passkey prompt at depth r mod those depths and decodes its answer, so each spec's
  passkey accuracy stands beside its speed (every spec of a repeat on the same prompt); without, one
  token of the depth-0.5 prompt. Every timed run is written to the JSON's `runs` as it finishes and
  `--resume` keeps those (same dtype, length, spec and repeat) instead of rerunning them.
- eviction: snapkv, compresskv and adaptive(snapkv) at `--eviction-budgets` (fractions of the prompt):
  whole generations (benchmarks/kv_memory_and_speed.py's `measure`), decode tokens/s against dense
  and the KV bytes held after the prefill's compression (final) and at the peak. With
  `--share-prefill` the prompt is prefilled once and each method fills its cache from it, compressing
  layer by layer as its own forward would (runtime.shared_prefill: the same kept tokens and bytes), so
  a 32k row costs one 11-minute CPU prefill instead of one per method and repeat; prefill times are
  then not per method (rows say `prefill_shared`).

On CUDA every timer synchronises the GPU and attention time comes from CUDA events around each call.

`--random-weights CONFIG_JSON` builds the model from a Hugging Face config.json with seeded random
weights and no tokenizer (benchmarks/configs/qwen2.5-coder-0.5b.json is qwen2.5-coder-0.5b's own
config, so a GPU box needs no GGUF): prompts are seeded random token ids, MInference gets a synthetic
vertical-slash pattern of its calibration's cost (1024 keys per row), DHSA a random boundary
predictor and CompressKV the shipped qwen2.5-coder-0.5b calibration re-stamped for these weights.
Such a run measures speed only: accuracy is not measured and selections are not a trained model's.
With a real model the prompt is the passkey prompt (depth 0.5) of each length, and MInference and DHSA
use the model's calibration files (`tokensift calibrate minference|dhsa --model ...`; a part whose
file is missing is skipped with a note). The JSON (`--out`) is rewritten after every cell, so a
killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kv_memory_and_speed
import sparse_decode
import sparse_prefill
import tokensift
import tokensift.runtime.attention as attention
from tokensift.bench.timing import Spread, add_repeats_argument, check_repeats, speedup
from tokensift.errors import NoOpWarning, TokensiftError, fail
from tokensift.runtime.cache import TokenCache
from tokensift.runtime.generate import forward

DECODE_METHODS = sparse_decode.METHODS  # quest, tokenselect, tidaldecode, hip
PREFILL_METHODS = ["a_shape", "minference", "dhsa"]
EVICTION_METHODS = ["snapkv", "compresskv", "adaptive(snapkv)"]
RANDOM_NOTE = "random weights, qwen2.5-coder-0.5b architecture; accuracy not measured"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock(sparse_decode.AttentionClock):
    """Seconds in the runtime's attention call, one-query (decode) and multi-query (prefill) forwards
    apart. On CUDA the time comes from events recorded around each call, read after a synchronise."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: dict[bool, list[tuple[Any, Any]]] = {True: [], False: []}
        self._seconds = {True: 0.0, False: 0.0}
        super().__init__()

    @property
    def seconds(self) -> float:  # decode-query attention (sparse_decode.decode reads and resets it)
        return self._read(True)

    @seconds.setter
    def seconds(self, value: float) -> None:
        self._seconds[True], self._events[True] = value, []

    @property
    def prefill_seconds(self) -> float:
        return self._read(False)

    def reset_prefill(self) -> None:
        self._seconds[False], self._events[False] = 0.0, []

    def _read(self, decode: bool) -> float:
        if self._events[decode]:
            torch.cuda.synchronize()
            self._seconds[decode] += sum(a.elapsed_time(b) for a, b in self._events[decode]) / 1e3
            self._events[decode] = []
        return self._seconds[decode]

    def __call__(self, layer: Any, query: torch.Tensor, *args: Any) -> torch.Tensor:
        decode = query.shape[2] == 1
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.inner(layer, query, *args)
            stop.record()
            self._events[decode].append((start, stop))
            return out
        t = time.perf_counter()
        out = self.inner(layer, query, *args)
        self._seconds[decode] += time.perf_counter() - t
        return out


def random_config(config_path: str) -> tuple[Path, str, dict[str, Any]]:
    """(file, model_type, the other fields) of a Hugging Face config.json, or a one-line exit 2."""
    path = Path(config_path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        fail(f"--random-weights: no config file at {config_path}: give a Hugging Face config.json")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        fail(f"--random-weights: {path} is not JSON ({exc}): give a Hugging Face config.json")
    if not isinstance(data, dict) or data.get("model_type") is None:
        fail(f"--random-weights: {path} has no model_type: give a Hugging Face config.json")
    model_type = data.pop("model_type")
    return path, model_type, data


def build_random(
    config_path: str, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tokensift.Model:
    """A model from a Hugging Face config.json with seeded random weights (no tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, model_type, data = random_config(config_path)
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "quantization_config"):
        data.pop(key, None)
    config = AutoConfig.for_model(model_type, **data)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return tokensift.wrap(model, None, name=f"random:{path.stem}")


def fitted(model: tokensift.Model, length: int, room: int) -> int:
    """`length`, at most the model's context minus `room` (the tokens generated after it)."""
    return min(length, model.context_length - room) if model.context_length else length


def passkey_samples(model: tokensift.Model, length: int, room: int, depths: list[float]) -> list[Any]:
    """One passkey sample (seed 0) of `length` tokens, chat template included, per depth."""
    from tokensift.bench.runner import token_counter
    from tokensift.bench.tasks import get_task

    count = token_counter(model)
    return [
        get_task("passkey").samples(count, fitted(model, length, room), 1, seed=0, depths=[d])[0]
        for d in depths
    ]


def prompt_ids(model: tokensift.Model, length: int, room: int) -> list[int]:
    """`length` tokens (at most the context minus `room`): the passkey prompt (depth 0.5) of a real
    model, seeded random ids for one without a tokenizer."""
    length = fitted(model, length, room)
    if model.tokenizer is None:
        g = torch.Generator().manual_seed(length)
        return [int(t) for t in torch.randint(3, int(model.config.vocab_size), (length,), generator=g)]
    from tokensift.runtime.generate import encode

    return encode(model, passkey_samples(model, length, room, [0.5])[0].prompt)


def calibrations(model: tokensift.Model, random: bool, work: Path) -> dict[str, str]:
    """Spec suffixes naming calibration files: synthetic ones for random weights, else the model's own
    (resolved by the methods; an empty dict entry means the method's default lookup)."""
    if not random:
        return {"minference": "", "dhsa": "", "compresskv": ""}
    from tokensift.calibration import read_artefact, save_artefact, shipped_path
    from tokensift.methods.dhsa import BoundaryPredictor

    heads = int(model.config.num_attention_heads)
    # Vertical-slash at the calibration's cost (1024 keys per row: 400 diagonals, the rest verticals).
    patterns = {"patterns": [[["vertical_slash", 560, 400, 1.0]] * heads] * model.num_layers}
    out = {"minference": str(save_artefact("minference", model, patterns, "synthetic", work / "mi.json"))}
    torch.manual_seed(0)
    channels = model.num_kv_heads * model.head_dim
    config = {"channels": channels, "window": 4, "hidden": 256, "heads": 4}
    predictor = BoundaryPredictor(**config)
    payload = {"predictor": config, "weights": predictor.state(), "threshold": {"logit": 0.0}}
    out["dhsa"] = str(save_artefact("dhsa", model, payload, "synthetic", work / "dhsa.json"))
    shipped = shipped_path("compresskv", "qwen2.5-coder-0.5b")
    document = read_artefact("compresskv", shipped, "qwen2.5-coder-0.5b")
    if document["fingerprint"]["layers"] == model.num_layers:
        keep = {k: v for k, v in document.items() if k not in ("format", "method", "fingerprint", "command")}
        keep.pop("created", None)
        keep.pop("versions", None)
        out["compresskv"] = str(
            save_artefact("compresskv", model, keep, "re-stamped shipped", work / "ckv.json")
        )
    return out


def with_file(spec: str, key: str, path: str) -> str:
    if not path:
        return spec
    return f"{spec}{',' if ':' in spec else ':'}{key}={path}"


class Results:
    """The JSON document, rewritten whole after every cell. `runs` holds the prefill part's timed runs
    one by one as they finish; with `resume` those of the file at `path` are kept (and not rerun)."""

    def __init__(self, path: Path | None, header: dict[str, Any], resume: bool = False):
        runs: list[dict[str, Any]] = []
        if resume and path is not None and path.exists():
            try:
                runs = json.loads(path.read_text())["runs"]
            except (ValueError, KeyError, TypeError) as exc:
                fail(f"cannot resume from {path} ({exc}): rerun without --resume, or with another --out")
        self.path, self.doc = path, {**header, "rows": [], "runs": runs}
        self.write()

    def run(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The recorded timed run with these fields (model, dtype, length, spec, repeat, depth), if any."""
        return next((r for r in self.doc["runs"] if all(r.get(k) == v for k, v in key.items())), None)

    def add_run(self, run: dict[str, Any]) -> None:
        self.doc["runs"].append(run)
        self.write()

    def add(self, row: dict[str, Any]) -> None:
        self.doc["rows"].append(row)
        self.write()

    def write(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.doc, indent=1) + "\n")
            os.replace(tmp, self.path)


def prefilled(model: tokensift.Model, ids: list[int]) -> sparse_decode.Prefilled:
    """A dense prefill whose K/V every decode spec replays (sparse_decode.Prefilled), on the device."""
    sync(model.device)
    t = time.perf_counter()
    with torch.inference_mode():
        cache = TokenCache(model, "dense", prompt_tokens=len(ids))
        logits = forward(model, torch.tensor([ids], device=model.device), cache)[0, -1]
    sync(model.device)
    return sparse_decode.Prefilled(
        ids, [(lay.k, lay.v) for lay in cache.layers], logits, time.perf_counter() - t
    )


def label(spec: str) -> str:
    """A prefill spec without the calibration file it was given (a temporary path for random weights)."""
    return spec.split(",config=")[0].split(",predictor=")[0]


def rotated(specs: list[str], r: int) -> list[str]:
    return specs[r % len(specs) :] + specs[: r % len(specs)]


def decode_part(model, ids, args, clock, base_row, results) -> None:  # type: ignore[no-untyped-def]
    specs = sparse_decode.specs(args.decode_methods, args.budgets)
    pre = prefilled(model, ids)
    print(f"  decode: dense prefill {len(ids)} tokens {pre.seconds:.2f} s", flush=True)
    usable = []
    for spec in specs:  # warm-up: kernels, allocator, lazily built state; a spec that cannot run is skipped
        try:
            sparse_decode.decode(model, spec, pre, 3, clock, True)
            usable.append(spec)
        except Exception as exc:  # TokensiftError: cannot apply here; anything else: a bug, recorded
            results.add(
                {
                    **base_row,
                    "error": not isinstance(exc, TokensiftError),
                    "part": "decode",
                    "spec": spec,
                    "skipped": f"{type(exc).__name__}: {exc}",
                }
            )
            print(f"  {spec}: skipped ({exc})", flush=True)
    specs = usable
    runs: dict[str, list[sparse_decode.Run]] = {s: [] for s in specs}
    for r in range(args.repeats):
        for spec in rotated(specs, r):
            runs[spec].append(sparse_decode.decode(model, spec, pre, args.new_tokens, clock, True))
    steps, base = args.new_tokens - 1, runs["dense"]
    for spec, rs in runs.items():
        tps = Spread.of(steps / r.decode_seconds for r in rs)
        att = Spread.of(r.attention_seconds / steps for r in rs)
        c = rs[0].counters
        row = {
            **base_row,
            "part": "decode",
            "spec": spec,
            "method": spec.split(":")[0],
            "budget": None if spec == "dense" else int(spec.split("budget=")[1].split(",")[0]),
            "new_tokens": args.new_tokens,
            "decode_tps": tps.as_dict(),
            "decode_vs_dense": speedup(
                [r.decode_seconds for r in base], [r.decode_seconds for r in rs]
            ).as_dict(),
            "attention_ms_per_token": {k: v * 1e3 if k != "n" else v for k, v in att.as_dict().items()},
            "attention_vs_dense": speedup(
                [r.attention_seconds for r in base], [r.attention_seconds for r in rs]
            ).as_dict(),
            "tokens_attended": c["tokens_attended"] / c["decode_layer_steps"]
            if c.get("decode_layer_steps")
            else None,
            "same_tokens_as_dense": rs[0].tokens == base[0].tokens,
            "decode_seconds": [r.decode_seconds for r in rs],
            "attention_seconds": [r.attention_seconds for r in rs],
        }
        results.add(row)
        print(
            f"  {spec}: {fmt(row['decode_tps'])} tok/s, vs dense {fmt(row['decode_vs_dense'], 'x')}, "
            f"attention vs dense {fmt(row['attention_vs_dense'], 'x')}",
            flush=True,
        )


def prefill_part(model, ids, length, args, clock, files, base_row, results) -> None:  # type: ignore[no-untyped-def]
    tail = args.prefill_tail
    specs = ["dense"] + [
        with_file(f"{m}:dense_tail={tail}", FILE_KEY.get(m, ""), files.get(m, ""))
        for m in args.prefill_methods
    ]
    # With --prefill-depths (a real model) repeat r prefills the passkey prompt at depth r mod the
    # depths and decodes its answer: every spec's accuracy on those prompts stands beside its speed,
    # and the paired speed-up compares the specs on the same prompt in each repeat.
    samples = (
        passkey_samples(model, length, args.new_tokens + 8, args.prefill_depths)
        if args.prefill_depths
        else []
    )
    usable = []
    for spec in specs:  # warm-up at a quarter length; a method without its calibration is skipped
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoOpWarning)
                tokensift.generate(model, ids[: len(ids) // 4], spec, max_new_tokens=1)
            usable.append(spec)
        except Exception as exc:  # TokensiftError: cannot apply here; anything else: a bug, recorded
            results.add(
                {
                    **base_row,
                    "error": not isinstance(exc, TokensiftError),
                    "part": "prefill",
                    "spec": spec,
                    "skipped": f"{type(exc).__name__}: {exc}",
                }
            )
            print(f"  {spec}: skipped ({exc})", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in usable}
    for r in range(args.repeats):
        sample = samples[r % len(samples)] if samples else None
        for spec in rotated(usable, r):
            key = {
                **{k: base_row[k] for k in ("model", "dtype", "length")},
                "spec": label(spec),
                "repeat": r,
                "depth": sample.depth if sample else None,  # None: one token of the depth-0.5 prompt
            }
            one = results.run(key)
            if one is None:
                clock.reset_prefill()
                sync(model.device)
                t = time.perf_counter()
                # stats.prefill_seconds synchronises on CUDA
                one = sparse_prefill.prefill(model, sample.prompt if sample else ids, spec, sample)
                one["wall"] = time.perf_counter() - t
                one["attention"] = clock.prefill_seconds
                one.update(key, answer=sample.answer if sample else None)
                results.add_run(one)
                answer = f", score {one['score']:.0f} ({one['prediction']!r})" if sample else ""
                print(
                    f"  repeat {r} {spec.split(',')[0]}: prefill {one['prefill']:.1f} s{answer}", flush=True
                )
            runs[spec].append(one)
    base = runs.get("dense")
    for spec, rs in runs.items():
        if base is None:
            break
        row = {
            **base_row,
            "part": "prefill",
            "spec": label(spec),
            "method": spec.split(":")[0],
            "prefill_seconds": Spread.of(r["prefill"] for r in rs).as_dict(),
            "prefill_vs_dense": speedup([r["prefill"] for r in base], [r["prefill"] for r in rs]).as_dict(),
            "attention_seconds": Spread.of(r["attention"] for r in rs).as_dict(),
            "attention_vs_dense": speedup(
                [r["attention"] for r in base], [r["attention"] for r in rs]
            ).as_dict(),
            "pairs_computed": rs[0]["density"],
            "prefill_runs": [r["prefill"] for r in rs],
        }
        if samples:
            row["depths"] = [r["depth"] for r in rs]
            row["scores"] = [r["score"] for r in rs]
            row["tokens"] = [r["tokens"] for r in rs]
        results.add(row)
        print(
            f"  {row['spec']}: prefill {fmt(row['prefill_seconds'])} s, vs dense "
            f"{fmt(row['prefill_vs_dense'], 'x')}, attention vs dense {fmt(row['attention_vs_dense'], 'x')}, "
            f"pairs {row['pairs_computed']:.3f}, passkey found {found(row)}",
            flush=True,
        )


def eviction_part(model, ids, args, files, base_row, results) -> None:  # type: ignore[no-untyped-def]
    specs = ["dense"]
    for b in args.eviction_budgets:
        for m in args.eviction_methods:
            if m.startswith("adaptive(") and m.endswith(")"):
                specs.append(f"adaptive({m[9:-1]}:budget={b})")
            else:
                specs.append(with_file(f"{m}:budget={b}", FILE_KEY.get(m, ""), files.get(m, "")))
    usable = []
    for spec in specs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NoOpWarning)
                # A shared prefill times no method's prefill: a short warm-up checks the spec runs.
                warm = min(len(ids) // 4, 2048) if args.share_prefill else len(ids) // 4
                tokensift.generate(model, ids[:warm], spec, max_new_tokens=2, ignore_eos=True)
            usable.append(spec)
        except Exception as exc:  # TokensiftError: cannot apply here; anything else: a bug, recorded
            results.add(
                {
                    **base_row,
                    "error": not isinstance(exc, TokensiftError),
                    "part": "eviction",
                    "spec": spec,
                    "skipped": f"{type(exc).__name__}: {exc}",
                }
            )
            print(f"  {spec}: skipped ({exc})", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOpWarning)
        runs = kv_memory_and_speed.measure(
            model, ids, usable, args.new_tokens, args.repeats, share_prefill=args.share_prefill
        )
    base = runs["dense"]
    for spec, rs in runs.items():
        s0 = rs[0]
        row = {
            **base_row,
            "part": "eviction",
            "spec": spec.split(",calibration=")[0],
            "method": spec.split(":")[0],
            "decode_tps": Spread.of(r.decode_tokens_per_second for r in rs).as_dict(),
            "decode_vs_dense": speedup(
                [r.decode_seconds for r in base], [r.decode_seconds for r in rs]
            ).as_dict(),
            "prefill_seconds": Spread.of(r.prefill_seconds for r in rs).as_dict(),
            "prefill_shared": bool(s0.counters.get("shared_prefill_seconds")),
            "kv_mib_final": s0.kv_bytes_final / 2**20,
            "kv_mib_peak": s0.kv_bytes_peak / 2**20,
            "kv_final_vs_dense": s0.kv_bytes_final / base[0].kv_bytes_final,
            "kv_peak_vs_dense": s0.kv_bytes_peak / base[0].kv_bytes_peak,
            "tokens_held": s0.tokens_held,
            "applied": s0.applied,
        }
        results.add(row)
        print(
            f"  {row['spec']}: {fmt(row['decode_tps'])} tok/s, vs dense {fmt(row['decode_vs_dense'], 'x')}, "
            f"KV held {row['kv_mib_final']:.0f} MiB ({row['kv_final_vs_dense']:.2f} of dense)",
            flush=True,
        )


FILE_KEY = {"minference": "config", "dhsa": "predictor", "compresskv": "calibration"}


def fmt(spread: dict[str, Any], suffix: str = "", digits: int = 2) -> str:
    return Spread(spread["median"], spread["q1"], spread["q3"], spread["n"]).format(digits, suffix)


def found(row: dict[str, Any]) -> str:
    """`k/n` passkeys a prefill row's repeats found, or "not run" (one prompt, one token)."""
    return f"{sum(row['scores']):.0f}/{len(row['scores'])}" if "scores" in row else "not run"


def render(doc: dict[str, Any]) -> str:
    """Markdown tables of a results document."""
    rows = [r for r in doc["rows"] if "skipped" not in r]
    out = [f"{doc['setup']}\n"]
    dec = [r for r in rows if r["part"] == "decode"]
    if dec:
        out += [
            "| dtype | context | spec | decode tok/s | vs dense | attention ms/token | attention vs dense |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['dtype']} | {r['length']} | `{r['spec'].replace(',sparse_prefill=false', '')}` "
            f"| {fmt(r['decode_tps'], digits=1)} | {fmt(r['decode_vs_dense'], 'x')} "
            f"| {r['attention_ms_per_token']['median']:.2f} | {fmt(r['attention_vs_dense'], 'x', 1)} |"
            for r in dec
        ]
    pre = [r for r in rows if r["part"] == "prefill"]
    if pre:
        out += [
            "\n| dtype | context | spec | prefill s | vs dense | attention s | attention vs dense "
            "| pairs computed | passkey found |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['dtype']} | {r['length']} | `{r['spec']}` | {fmt(r['prefill_seconds'], digits=3)} "
            f"| {fmt(r['prefill_vs_dense'], 'x')} | {r['attention_seconds']['median']:.3f} "
            f"| {fmt(r['attention_vs_dense'], 'x')} | {r['pairs_computed']:.3f} "
            f"| {found(r)} |"
            for r in pre
        ]
    ev = [r for r in rows if r["part"] == "eviction"]
    if ev:
        out += [
            "\n| dtype | context | spec | decode tok/s | vs dense | KV held MiB (of dense) | KV peak MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['dtype']} | {r['length']} | `{r['spec']}` | {fmt(r['decode_tps'], digits=1)} "
            f"| {fmt(r['decode_vs_dense'], 'x')} | {r['kv_mib_final']:.1f} ({r['kv_final_vs_dense']:.2f}) "
            f"| {r['kv_mib_peak']:.1f} |"
            for r in ev
        ]
    skipped = [r for r in doc["rows"] if "skipped" in r]
    out += [f"\nskipped: {r['part']} {r['spec']}: {r['skipped']}" for r in skipped]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--random-weights", metavar="CONFIG_JSON", help="random weights from this config")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["decode", "prefill", "eviction"],
        default=["decode", "prefill", "eviction"],
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048], help="sparse decode")
    parser.add_argument("--decode-methods", nargs="+", default=DECODE_METHODS)
    parser.add_argument("--prefill-methods", nargs="+", default=PREFILL_METHODS)
    parser.add_argument("--eviction-methods", nargs="+", default=EVICTION_METHODS)
    parser.add_argument("--eviction-budgets", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--share-prefill",
        action="store_true",
        help="eviction part: one dense prefill fills every method it serves exactly (decode speed and KV "
        "held as alone; prefill time then not per method)",
    )
    parser.add_argument(
        "--prefill-tail",
        type=int,
        default=0,
        help="prefill part: every method's dense_tail (0: the pattern alone; 64: a question at the end "
        "attends to the whole prompt)",
    )
    parser.add_argument(
        "--prefill-depths",
        type=float,
        nargs="+",
        help="prefill part, real model: repeat r prefills the passkey prompt at depth r mod these and "
        "decodes its answer, so each spec's passkey accuracy stands beside its speed (default: the "
        "depth-0.5 prompt, one token)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the prefill part's timed runs already in --out (same dtype, length, spec, repeat) and "
        "run only the missing ones; every other part reruns",
    )
    add_repeats_argument(parser)
    parser.add_argument("--threads", type=int, help="torch threads for everything (default: torch's)")
    parser.add_argument("--out", type=Path, help="results JSON, rewritten after every cell")
    parser.add_argument("--render", type=Path, help="print the tables of a saved JSON and exit")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    check_repeats(args.repeats)
    if args.new_tokens < 2:
        fail(f"--new-tokens must be >= 2 (the first token comes from the prefill), got {args.new_tokens}")
    if args.prefill_tail < 0:
        fail(f"--prefill-tail must be >= 0, got {args.prefill_tail}")
    if args.prefill_depths and (args.random_weights or not all(0 <= d <= 1 for d in args.prefill_depths)):
        fail(
            "--prefill-depths takes depths in [0, 1] and a real model (random weights have no tokenizer "
            "for a passkey prompt)"
        )
    if args.resume and not args.out:
        fail("--resume needs --out (the results file to resume)")
    if args.random_weights:
        random_config(args.random_weights)  # checked before --out is written
    from tokensift.models import _dtype, resolve_device

    try:
        device = resolve_device(args.device)
    except TokensiftError as exc:
        fail(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = Clock(device)
    attention.run_layer = clock  # the attention function looks run_layer up at call time
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    setup = (
        f"{'random weights (' + args.random_weights + ')' if args.random_weights else args.model}, "
        f"device {device}{' (' + gpu + ')' if gpu else ''}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(setup, flush=True)
    results = Results(
        args.out,
        {
            "setup": setup,
            "command": " ".join(["python", *sys.argv]),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "note": RANDOM_NOTE if args.random_weights else "",
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "gpu": gpu},
        },
        resume=args.resume,
    )
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="long-context-"))
    for dtype_name in args.dtype:
        dtype = _dtype(dtype_name, device)
        if args.random_weights:
            model = build_random(args.random_weights, dtype, device)
        else:
            model = tokensift.load(args.model, dtype=dtype, device=device)
        files = calibrations(model, bool(args.random_weights), work)
        room = args.new_tokens + 8
        for length in args.lengths:
            ids = prompt_ids(model, length, room)
            base_row = {"dtype": dtype_name, "length": len(ids), "device": str(device), "model": model.name}
            print(f"{dtype_name}, {len(ids)} tokens:", flush=True)
            parts = {
                "decode": (decode_part, (model, ids, args, clock, base_row, results)),
                "prefill": (prefill_part, (model, ids, length, args, clock, files, base_row, results)),
                "eviction": (eviction_part, (model, ids, args, files, base_row, results)),
            }
            for name, (run, run_args) in parts.items():
                if name not in args.parts:
                    continue
                try:
                    run(*run_args)
                except Exception as exc:  # one broken part must not cost the others their figures
                    traceback.print_exc()
                    message = f"{type(exc).__name__}: {exc}"
                    results.add({**base_row, "part": name, "spec": "*", "skipped": message, "error": True})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results.doc["seconds"] = time.time() - start
    results.doc["load_average_end"] = os.getloadavg()[0]
    results.write()
    print("\n" + render(results.doc))
    print(f"\ntotal {results.doc['seconds']:.0f} s")


if __name__ == "__main__":
    main()
