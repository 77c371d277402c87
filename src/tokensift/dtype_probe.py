"""`dtype="auto"`: bfloat16 on CPUs where it is measurably faster than float32, else float32.

bf16 halved prefill time on the AMD EPYC where the ruler-lite suite was tuned, but was slower than
fp32 on an Intel Xeon with avx512_bf16 (smollm2-135m, 2 threads: prefill 1k 1.41 s fp32 vs 2.13 s
bf16; decode 22.4 vs 18.5 tok/s). So the choice is measured, not assumed: a short probe times the
matmuls of one transformer MLP block in both dtypes, over a 128-token chunk (prefill) and over one
token (decode: a matrix-vector product, which bf16 kernels can lose while winning the matrix-matrix
one), in interleaved rounds that alternate which dtype goes first, so that load on the machine hits
both alike (under a second where bf16 is native; where it is emulated one slow warm-up ends it).
bf16 wins only when the median of the rounds' bf16/fp32 time ratios is at most `MARGIN` in both
shapes. The result is cached per probe version, CPU model, bf16-relevant CPU flags, torch version and
thread count in the tokensift cache (`dtype_probe.json`), so the probe runs once per machine
configuration. On a 2-core AMD EPYC VM with avx2 only, bf16 measured about 40x slower than fp32
(emulated); on a 2-core AMD EPYC VM with avx512_bf16, one probe on busy cores measured bf16 at 0.45x
fp32's time over 128 tokens but 6.6x over one token (float32), while a quiet probe on the same probe
key measured 0.40x and 0.36x (bfloat16) and a real 8k decode of qwen2.5-coder-0.5b ran 1.9x faster
in bf16 (README, "bf16 on CPU"). Version 3 interleaves the dtypes and still measured bf16 over one
token at 0.54x fp32's time quiet but 3.96x beside a 2-thread matmul job: bf16's matrix-vector
products lose on shared cores, so the answer holds for the load it was probed under; `--dtype`
overrides it.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MARGIN = 0.8  # bf16 must take at most 80% of fp32's time (median paired ratio), in both shapes
SLOW = 10.0  # a bf16 warm-up run this many times fp32's warm-up ends the probe: fp32
VERSION = 3  # part of the cache key: a changed probe measures again (1: prefill shape only; 2: fp32
# then bf16, best of 3 each, so a busy spell could fall on one dtype's runs only)
DECODE_STEPS = 8  # one-token products timed together (a single one is too short to time)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")


def machine_key() -> str:
    """What the probe's answer depends on: CPU model and flags, torch version, threads."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = ",".join(f for f in _BF16_FLAGS if f in flags)
    return f"probe {VERSION}|{model}|{have}|torch {torch.__version__}|{torch.get_num_threads()} threads"


def _block_timer(dtype: torch.dtype, tokens: int, hidden: int, inner: int, times: int) -> Callable[[], float]:
    """A function timing `times` passes of one MLP block's matmuls over `tokens` tokens in `dtype`
    (seconds; the operands are made once, outside the timing)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    up = torch.randn(hidden, 2 * inner, generator=g).to(dtype) * hidden**-0.5
    down = torch.randn(inner, hidden, generator=g).to(dtype) * inner**-0.5

    def run() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(times):
                gate, value = (x @ up).chunk(2, dim=-1)
                (torch.nn.functional.silu(gate) * value) @ down
            return time.perf_counter() - t0

    return run


def _compare(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """float32 against bfloat16, interleaved: one warm-up each (not counted; a bf16 warm-up `SLOW`
    times fp32's ends it, an emulated dtype), then `repeats` rounds that time both, alternating which
    goes first, so load on the machine hits both alike. Best seconds per dtype and the median of
    the rounds' bf16/fp32 ratios, which decides."""
    warm = {name: timer() for name, timer in timers.items()}
    if warm["bfloat16"] > SLOW * warm["float32"]:  # no emulated-bf16 CPU is worth timing further
        return {**warm, "ratio": warm["bfloat16"] / warm["float32"], "rounds": 0}
    taken: dict[str, list[float]] = {name: [] for name in timers}
    for r in range(repeats):
        for name in ("float32", "bfloat16")[:: 1 if r % 2 == 0 else -1]:
            taken[name].append(timers[name]())
    ratios = [b / f for f, b in zip(taken["float32"], taken["bfloat16"], strict=True)]
    best = {name: min(t) for name, t in taken.items()}
    return {**best, "ratio": statistics.median(ratios), "rounds": repeats}


def probe(repeats: int = 5, tokens: int = 128, hidden: int = 896, inner: int = 4864) -> dict[str, Any]:
    """float32 against bfloat16 on one MLP block's matmuls over `tokens` tokens (`seconds`) and over
    one token (`decode_seconds`, `DECODE_STEPS` passes), `repeats` interleaved rounds each (best
    seconds per dtype, median bf16/fp32 ratio), and the choice: bfloat16 only if its median ratio is
    at most `MARGIN` in both shapes."""
    shapes = {"seconds": (tokens, 1), "decode_seconds": (1, DECODE_STEPS)}
    out: dict[str, Any] = {}
    for name, (rows, times) in shapes.items():
        timers = {
            "float32": _block_timer(torch.float32, rows, hidden, inner, times),
            "bfloat16": _block_timer(torch.bfloat16, rows, hidden, inner, times),
        }
        out[name] = _compare(timers, repeats)
    faster = all(out[name]["ratio"] <= MARGIN for name in shapes)
    return {**out, "margin": MARGIN, "version": VERSION, "dtype": "bfloat16" if faster else "float32"}


def cpu_default_dtype(cache: Path | None = None) -> str:
    """The dtype `auto` means on this machine: the cached probe result, probing once if needed."""
    if cache is None:
        from tokensift.models import cache_dir

        cache = cache_dir() / "dtype_probe.json"
    key = machine_key()
    try:
        known = json.loads(cache.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if not isinstance(entry, dict) or entry.get("dtype") not in ("float32", "bfloat16"):
        entry = known[key] = probe()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(known, indent=1) + "\n")
            tmp.replace(cache)
        except OSError:
            pass  # an unwritable cache only means probing again next time
    return entry["dtype"]


if __name__ == "__main__":  # python -m tokensift.dtype_probe: this machine's probe, as JSON
    print(json.dumps({"machine": machine_key(), **probe()}, indent=1))
