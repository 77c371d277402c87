"""Where one decode step goes: tokensift's dense decode loop and transformers' `model.generate` on the
same model and prompt, profiled over the decode steps only (the prefill is not profiled).

    python benchmarks/decode_step_profile.py [--model smollm2-135m] [--length 4096] [--steps 32]
        [--random-weights CONFIG_JSON] [--dtype float32] [--out PATH.json]

For each path: the wall time per decode step without a profiler (median of `--steps` steps after the
first token), then one cProfile of the same steps (time per step by where it is spent: torch's C++
ops, Python in tokensift, in transformers, in torch.nn and elsewhere; the top Python functions by
own time), then one torch.profiler run (top ops by self CPU time). The profilers start when the first
generated token is committed (our `on_token`, a never-stopping `StoppingCriteria` for transformers)
and stop when generation returns. Profilers add their own overhead to Python calls; compare the two
paths under the same profiler, and use the unprofiled wall times for speed.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import tokensift
from decode_vs_generate import Switch, build_random, prompt_ids


def _generate_call(model: tokensift.Model, ids: list[int], steps: int, hook: Any) -> Any:
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class Hook(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            hook()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    config = GenerationConfig(do_sample=False, max_new_tokens=steps + 1, eos_token_id=[], pad_token_id=0)
    with torch.inference_mode():
        x = torch.tensor([ids])
        return model.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([Hook()]),
        )


def _ours_call(model: tokensift.Model, ids: list[int], steps: int, hook: Any) -> Any:
    def on_token(decoding: Any, token: int, logits: Any) -> None:
        hook()

    return tokensift.generate(
        model, ids, "dense", max_new_tokens=steps + 1, ignore_eos=True, on_token=on_token
    )


CALLS = {"ours": _ours_call, "generate": _generate_call}


def step_times(model: tokensift.Model, which: str, ids: list[int], steps: int) -> list[float]:
    marks: list[float] = []
    CALLS[which](model, ids, steps, lambda: marks.append(time.perf_counter()))
    return [b - a for a, b in itertools.pairwise(marks)]


def where(filename: str) -> str:
    if filename.startswith("~") or filename == "<built-in>":
        return "C++ ops and builtins"
    if "/tokensift/" in filename:
        return "Python: tokensift"
    if "/transformers/" in filename:
        return "Python: transformers"
    if "/torch/" in filename:
        return "Python: torch (nn.Module calls, wrappers)"
    return "Python: other (stdlib)"


def cprofile(model: tokensift.Model, which: str, ids: list[int], steps: int) -> dict[str, Any]:
    prof = cProfile.Profile()
    state = {"on": False}

    def hook() -> None:
        if not state["on"]:
            state["on"] = True
            prof.enable()

    CALLS[which](model, ids, steps, hook)
    prof.disable()
    stats = pstats.Stats(prof)
    groups: dict[str, float] = {}
    rows = []
    for (filename, line, name), (_cc, ncalls, tottime, _cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        groups[where(filename)] = groups.get(where(filename), 0.0) + tottime
        rows.append((tottime, ncalls, f"{Path(filename).name}:{line}({name})" if line else name, filename))
    rows.sort(reverse=True)
    total = sum(groups.values())
    python = [r for r in rows if where(r[3]) != "C++ ops and builtins"][:15]
    ops = [r for r in rows if where(r[3]) == "C++ ops and builtins"][:10]
    return {
        "ms_per_step_profiled": 1e3 * total / steps,
        "ms_per_step_by_where": {
            k: 1e3 * v / steps for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
        },
        "top_python": [
            {"function": f, "ms_per_step": 1e3 * t / steps, "calls_per_step": n / steps}
            for t, n, f, _ in python
        ],
        "top_builtins": [
            {"function": f, "ms_per_step": 1e3 * t / steps, "calls_per_step": n / steps} for t, n, f, _ in ops
        ],
    }


def torch_profile(model: tokensift.Model, which: str, ids: list[int], steps: int) -> dict[str, Any]:
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    state = {"on": False}

    def hook() -> None:
        if not state["on"]:
            state["on"] = True
            prof.start()

    CALLS[which](model, ids, steps, hook)
    prof.stop()
    events = prof.key_averages()
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "self_cpu_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1e3 / steps,
        "op_calls_per_step": sum(e.count for e in events) / steps,
        "top_ops": [
            {
                "op": e.key,
                "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "calls_per_step": e.count / steps,
            }
            for e in ops
        ],
    }


def report(name: str, r: dict[str, Any]) -> str:
    wall = r.get("wall_ms_per_step")
    lines = [
        f"== {name}: " + (f"{wall:.2f} ms/step unprofiled (median of {r['steps']} steps)" if wall else "")
    ]
    if "cprofile" in r:
        lines += _report_cprofile(r["cprofile"])
    if "torch_profiler" in r:
        lines += _report_torch(r["torch_profiler"])
    return "\n".join(lines)


def _report_cprofile(c: dict[str, Any]) -> list[str]:
    lines = []
    lines.append(f"  cProfile: {c['ms_per_step_profiled']:.2f} ms/step; by where:")
    lines += [f"    {k:45s} {v:7.3f} ms" for k, v in c["ms_per_step_by_where"].items()]
    lines.append("  top Python functions (own time):")
    lines += [
        f"    {x['function'][:70]:70s} {x['ms_per_step']:7.3f} ms  {x['calls_per_step']:6.1f}/step"
        for x in c["top_python"]
    ]
    lines.append("  top builtins (own time):")
    lines += [
        f"    {x['function'][:70]:70s} {x['ms_per_step']:7.3f} ms  {x['calls_per_step']:6.1f}/step"
        for x in c["top_builtins"]
    ]
    return lines


def _report_torch(t: dict[str, Any]) -> list[str]:
    lines = []
    lines.append(
        f"  torch.profiler: {t['self_cpu_ms_per_step']:.2f} ms self CPU/step, "
        f"{t['op_calls_per_step']:.0f} op calls/step"
    )
    lines += [
        f"    {x['op'][:50]:50s} {x['self_ms_per_step']:7.3f} ms  {x['calls_per_step']:6.1f}/step"
        for x in t["top_ops"]
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random-weights", default=None, metavar="CONFIG_JSON")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--paths", nargs="+", default=["ours", "generate"], choices=list(CALLS))
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["wall", "cprofile", "torch"],
        choices=["wall", "cprofile", "torch"],
        help="what to run per path (each is one generation, i.e. one prefill)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from tokensift.models import _dtype

    dtype = _dtype(args.dtype)
    model = (
        build_random(args.random_weights, dtype)
        if args.random_weights
        else tokensift.load(args.model, dtype=dtype)
    )
    switch = Switch(model, "sdpa")
    ids = prompt_ids(model, args.length)
    result: dict[str, Any] = {
        "model": model.describe(),
        "prompt_tokens": len(ids),
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0],
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "paths": {},
    }
    for which in args.paths:
        getattr(switch, which)()
        step_times(model, which, ids[:64], 4)  # warm-up
        r: dict[str, Any] = {"steps": args.steps}
        if "wall" in args.parts:
            r["wall_ms_per_step"] = 1e3 * statistics.median(step_times(model, which, ids, args.steps))
        if "cprofile" in args.parts:
            r["cprofile"] = cprofile(model, which, ids, args.steps)
        if "torch" in args.parts:
            r["torch_profiler"] = torch_profile(model, which, ids, args.steps)
        result["paths"][which] = r
        print(report(which, r), flush=True)
    switch.ours()
    result["load_average_end"] = os.getloadavg()[0]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
