"""tokensift's own dense decode loop against transformers' `model.generate` on the same model, prompt
and dtype, in one process: decode tokens/s, prefill time and whether the tokens are the same.

    python benchmarks/decode_vs_generate.py [--model qwen2.5-coder-0.5b] [--lengths 512 4096 16384]
        [--new-tokens 256] [--repeats 5] [--dtype float32] [--device cpu]
        [--random-weights CONFIG_JSON] [--warmup-tokens 8] [--out benchmarks/results/decode_vs_generate.json]

What is compared: `tokensift.generate(model, ids, "dense", max_new_tokens=N, ignore_eos=True)` (our
TokenCache and registered attention function, `attn_implementation="tokensift"`) against
`model.generate(input_ids, do_sample=False, max_new_tokens=N)` with EOS switched off, transformers'
default DynamicCache and its SDPA attention (`attn_implementation="sdpa"`, what a user of
transformers gets). Both run on the same weights (the attention implementation is switched through
transformers' public `set_attn_implementation` between runs), greedy, on the same prompt ids.

Timing: each call is timed end to end; the end of the prefill is the moment the first generated
token is committed (our `on_token` callback; a no-op `StoppingCriteria` for transformers, which
transformers calls after every token), so both "prefill" figures include the first token's sampling
and the decode figure is (N - 1) tokens over the rest. On CUDA the clock synchronises there.
Repeats are paired and alternate the order (ours first in even repeats, transformers first in odd
ones); the speed ratio is ours / generate decode tokens/s per repeat, and the target (>= 1.0x) counts
as met only when the lower quartile of those paired ratios meets it (tokensift.bench.timing).
Threads: torch's default (what a user gets); the count is recorded. One untimed warm-up of both
paths (`--warmup-tokens` tokens at the shortest length) precedes the timed repeats.

Prompts: the passkey prompt (depth 0.5) of each length for a real model; with `--random-weights`
(a Hugging Face config.json: the model is built from it with seeded random weights, no tokenizer)
seeded random token ids. `--shared-prefill-from N` starts both paths, at contexts of N tokens or more,
from one prefill of the prompt (a 16k prefill takes minutes on a CPU): decode only there, the prefill
columns then time the first token. Lengths beyond the model's context (minus the new tokens) are skipped and
say so. The JSON is rewritten after every repeat, so a killed run keeps what it measured; a
Markdown table of it is written beside it (same name, .md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import long_context
import tokensift
from tokensift.bench.timing import Spread, add_repeats_argument, check_repeats, speedup

TARGET = 1.0  # ours / generate decode tokens/s, at the lower quartile of the paired ratios


def build_random(
    config_path: str, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> tokensift.Model:
    """A model built from a Hugging Face config.json (a file, or a directory holding one) with seeded
    random weights; no tokenizer. The one loader of the benchmarks (`long_context.build_random`)."""
    return long_context.build_random(config_path, dtype, torch.device(device), seed)


def prompt_ids(model: tokensift.Model, length: int, seed: int = 0) -> list[int]:
    if model.tokenizer is None:
        vocab = int(model.config.vocab_size)
        g = torch.Generator().manual_seed(seed + length)
        return [int(t) for t in torch.randint(3, vocab, (length,), generator=g)]
    from tokensift.bench.runner import token_counter
    from tokensift.bench.tasks import get_task
    from tokensift.runtime.generate import encode

    sample = get_task("passkey").samples(token_counter(model), length, 1, seed=seed, depths=[0.5])[0]
    return encode(model, sample.prompt)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One timed generation: its tokens, prefill (to the first committed token) and decode seconds."""

    def __init__(self, tokens: list[int], start: float, first: float, end: float):
        self.tokens = tokens
        self.prefill_seconds = first - start
        self.decode_seconds = end - first

    def decode_tps(self) -> float:
        return (len(self.tokens) - 1) / self.decode_seconds


def run_ours(
    model: tokensift.Model, ids: list[int], new_tokens: int, device: torch.device, shared: Any = None
) -> Run:
    marks: list[float] = []

    def on_token(decoding: Any, token: int, logits: Any) -> None:
        if not marks:
            _sync(device)
            marks.append(time.perf_counter())

    _sync(device)
    start = time.perf_counter()
    out = tokensift.generate(
        model, ids, "dense", max_new_tokens=new_tokens, ignore_eos=True, on_token=on_token, shared=shared
    )
    _sync(device)
    end = time.perf_counter()
    return Run(out.token_ids, start, marks[0], end)


def hf_cache(model: tokensift.Model, shared: Any) -> Any:
    """transformers' DynamicCache holding a copy of the shared prefill's keys and values for every
    prompt token but the last, so `generate` computes the first token from the last prompt token."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.model.config)
    for index, (k, v) in enumerate(zip(shared.keys, shared.values, strict=True)):
        cache.update(k[:, :, :-1].clone(), v[:, :, :-1].clone(), index)
    return cache


def run_generate(
    model: tokensift.Model, ids: list[int], new_tokens: int, device: torch.device, shared: Any = None
) -> Run:
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    marks: list[float] = []

    class FirstToken(StoppingCriteria):
        """Never stops; notes when the first generated token exists (the end of the prefill)."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if not marks:
                _sync(device)
                marks.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        eos_token_id=[],  # no EOS (None would mean the model's): fixed length, as our ignore_eos
        pad_token_id=0,
    )
    hf = model.model
    with torch.inference_mode():
        input_ids = torch.tensor([ids], device=device)
        past = {} if shared is None else {"cache": hf_cache(model, shared)}  # copied untimed
        _sync(device)
        start = time.perf_counter()
        out = hf.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([FirstToken()]),
            **past,
        )
        _sync(device)
        end = time.perf_counter()
    return Run([int(t) for t in out[0, len(ids) :].tolist()], start, marks[0], end)


class Switch:
    """The attention implementation each path runs with, switched through transformers' public setter."""

    def __init__(self, model: tokensift.Model, reference: str):
        self.model = model
        self.reference = reference

    def ours(self) -> None:
        from tokensift.runtime.attention import install

        install(self.model.model)

    def generate(self) -> None:
        self.model.model.set_attn_implementation(self.reference)
        if self.model.model.config._attn_implementation != self.reference:
            raise SystemExit(f"could not switch the model to {self.reference} attention")


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def summarise(length: int, prompt: int, ours: list[Run], gen: list[Run]) -> dict[str, Any]:
    ours_tps = [r.decode_tps() for r in ours]
    gen_tps = [r.decode_tps() for r in gen]
    # ratio of rates = generate decode time / our decode time, paired per repeat (same tokens decoded)
    ratio = speedup([r.decode_seconds for r in gen], [r.decode_seconds for r in ours])
    prefill_ratio = speedup([r.prefill_seconds for r in gen], [r.prefill_seconds for r in ours])
    diff = first_difference(ours[0].tokens, gen[0].tokens)
    return {
        "length": length,
        "prompt_tokens": prompt,
        "repeats": len(ours),
        "ours_decode_tps": Spread.of(ours_tps).as_dict(),
        "generate_decode_tps": Spread.of(gen_tps).as_dict(),
        "decode_ratio": ratio.as_dict(),  # ours / generate tokens/s
        "meets_target": ratio.meets(TARGET),
        "ours_prefill_seconds": Spread.of(r.prefill_seconds for r in ours).as_dict(),
        "generate_prefill_seconds": Spread.of(r.prefill_seconds for r in gen).as_dict(),
        "prefill_ratio": prefill_ratio.as_dict(),  # generate prefill time / ours
        "same_tokens": diff is None,
        "first_difference": diff,
        "ours_tokens_stable": all(r.tokens == ours[0].tokens for r in ours),
        "generate_tokens_stable": all(r.tokens == gen[0].tokens for r in gen),
        "raw": {
            "ours_decode_seconds": [r.decode_seconds for r in ours],
            "generate_decode_seconds": [r.decode_seconds for r in gen],
            "ours_prefill_seconds": [r.prefill_seconds for r in ours],
            "generate_prefill_seconds": [r.prefill_seconds for r in gen],
            "order": ["ours-first" if i % 2 == 0 else "generate-first" for i in range(len(ours))],
        },
        "load_average": os.getloadavg()[0],
    }


def _fmt(s: dict[str, Any], digits: int = 2) -> str:
    return Spread(s["median"], s["q1"], s["q3"], s["n"]).format(digits)


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# tokensift decode loop vs transformers generate: {result['model']['name']}",
        "",
        f"`{env['command']}`",
        "",
        f"{env['device_name']}, {env['dtype']}, torch {env['torch']} threads {env['threads']}, "
        f"transformers {env['transformers']}, generate attention `{result['reference_attention']}`; "
        f"{result['new_tokens']} new tokens, greedy, EOS ignored; load average at start "
        f"{env['load_average_start']:.2f}, {env['started']}.",
        "",
        "Decode tokens/s and prefill seconds: median [IQR]. Ratio: ours / generate decode tokens/s, "
        f"paired per repeat; target >= {TARGET:.1f}x at the lower quartile.",
        "",
        "| context | repeats | ours tok/s | generate tok/s | ratio | target met | ours prefill s "
        "| generate prefill s | same tokens | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        same = "yes" if row["same_tokens"] else f"no (from token {row['first_difference']})"
        lines.append(
            f"| {row['prompt_tokens']} | {row['repeats']} | {_fmt(row['ours_decode_tps'])} "
            f"| {_fmt(row['generate_decode_tps'])} | {_fmt(row['decode_ratio'], 3)} "
            f"| {'yes' if row['meets_target'] else 'no'} | {_fmt(row['ours_prefill_seconds'])} "
            f"| {_fmt(row['generate_prefill_seconds'])} | {same} | {row['load_average']:.2f} |"
        )
    for note in result["notes"]:
        lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: str | None) -> None:
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    path.with_suffix(".md").write_text(markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="embedded name, HF directory or id")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--new-tokens", type=int, default=256)
    add_repeats_argument(parser)
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 (or auto)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--random-weights",
        default=None,
        metavar="CONFIG_JSON",
        help="build the model from this Hugging Face config.json with seeded random weights (no tokenizer)",
    )
    parser.add_argument("--reference-attention", default="sdpa", help="generate's attention (default sdpa)")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="untimed warm-up of both paths; 0: none")
    parser.add_argument(
        "--shared-prefill-from",
        type=int,
        default=0,
        metavar="TOKENS",
        help="at contexts of at least TOKENS, prefill the prompt once (tokensift's SharedPrefill) and "
        "start every repeat of both paths from it (generate gets a DynamicCache copy of it, the last "
        "prompt token left to its first forward): decode only, for contexts whose prefill takes minutes",
    )
    parser.add_argument("--out", default=None, help="results JSON (rewritten after every repeat; .md beside)")
    args = parser.parse_args()
    check_repeats(args.repeats)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (the first token comes from the prefill)")
    device = torch.device(args.device)
    from tokensift.models import _dtype

    dtype = _dtype(args.dtype)
    if args.random_weights:
        model = build_random(args.random_weights, dtype)
    else:
        model = tokensift.load(args.model, dtype=dtype)
    model.model.to(device)
    switch = Switch(model, args.reference_attention)

    import transformers

    from tokensift.bench.runner import _git_commit

    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    )
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    result: dict[str, Any] = {
        "benchmark": "decode_vs_generate",
        "model": model.describe(),
        "new_tokens": args.new_tokens,
        "reference_attention": args.reference_attention,
        "target": TARGET,
        "environment": {
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "commit": _git_commit(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "device_name": device_name,
            "dtype": str(dtype).removeprefix("torch."),
            "cpu_count": os.cpu_count(),
            "load_average_start": os.getloadavg()[0],
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "rows": [],
        "notes": [],
    }
    limit = model.context_length
    lengths = []
    for n in args.lengths:
        if limit and n + args.new_tokens > limit:
            note = f"context {n} skipped: {n} + {args.new_tokens} new tokens exceed {model.name}'s {limit}"
            print(note, flush=True)
            result["notes"].append(note)
        else:
            lengths.append(n)
    print(
        f"{model.name} {result['environment']['dtype']} on {device_name}, threads {torch.get_num_threads()}, "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    if lengths and args.warmup_tokens > 0:
        ids = prompt_ids(model, min(lengths))
        switch.ours()
        run_ours(model, ids, max(2, args.warmup_tokens), device)
        switch.generate()
        run_generate(model, ids, max(2, args.warmup_tokens), device)
    for length in lengths:
        ids = prompt_ids(model, length)
        shared = None
        if args.shared_prefill_from and length >= args.shared_prefill_from:
            from tokensift.runtime.shared_prefill import SharedPrefill

            switch.ours()
            with torch.inference_mode():
                shared = SharedPrefill.run(model, ids)
            note = (
                f"context {len(ids)}: prefilled once ({shared.seconds:.1f} s, tokensift dense); every repeat "
                "of both paths decodes from a copy of it (generate: a DynamicCache of all prompt tokens but "
                "the last, passed as generate's `cache`), so the prefill columns are the first token only"
            )
            print(note, flush=True)
            result["notes"].append(note)
        ours: list[Run] = []
        gen: list[Run] = []
        for r in range(args.repeats):
            order = ["ours", "generate"] if r % 2 == 0 else ["generate", "ours"]
            for which in order:
                if which == "ours":
                    switch.ours()
                    ours.append(run_ours(model, ids, args.new_tokens, device, shared))
                else:
                    switch.generate()
                    gen.append(run_generate(model, ids, args.new_tokens, device, shared))
            print(
                f"context {len(ids)} repeat {r + 1}: ours {ours[-1].decode_tps():.2f} tok/s "
                f"(prefill {ours[-1].prefill_seconds:.2f} s), generate {gen[-1].decode_tps():.2f} tok/s "
                f"(prefill {gen[-1].prefill_seconds:.2f} s), load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
            row = summarise(length, len(ids), ours, gen)
            row["shared_prefill_seconds"] = shared.seconds if shared is not None else None
            result["rows"] = [x for x in result["rows"] if x["length"] != length] + [row]
            result["environment"]["load_average_end"] = os.getloadavg()[0]
            write(result, args.out)
        print(
            f"context {len(ids)}: ratio {_fmt(row['decode_ratio'], 3)} "
            f"(target {TARGET} {'met' if row['meets_target'] else 'NOT met'} at the lower quartile), "
            f"same tokens: {row['same_tokens']}",
            flush=True,
        )
    switch.ours()  # leave the model as tokensift loaded it
    print(markdown(result))


if __name__ == "__main__":
    main()
