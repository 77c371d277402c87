"""`dtype="auto"`: bfloat16 on CPUs where it is measurably faster than float32, else float32.

bf16 halved prefill time on the AMD EPYC where the ruler-lite suite was tuned, but was slower than
fp32 on an Intel Xeon with avx512_bf16 (smollm2-135m, 2 threads: prefill 1k 1.41 s fp32 vs 2.13 s
bf16; decode 22.4 vs 18.5 tok/s). So the choice is measured, not assumed: a short probe times the
matmuls of one transformer MLP block in both dtypes, over a 128-token chunk (prefill) and over one
token (decode: a matrix-vector product, which bf16 kernels can lose while winning the matrix-matrix
one), best of a few runs each (under a second where bf16 is native, a few seconds where it is
emulated: one slow run ends it). bf16 wins only when it takes at most `MARGIN` of fp32's time in both
shapes. The result is cached per probe version, CPU model, bf16-relevant CPU flags, torch version and
thread count in the tokensift cache (`dtype_probe.json`), so the probe runs once per machine
configuration. On a 2-core AMD EPYC VM with avx2 only, bf16 measured about 40x slower than fp32
(emulated); on a 2-core AMD EPYC VM with avx512_bf16, one probe on busy cores measured bf16 at 0.45x
fp32's time over 128 tokens but 6.6x over one token (float32), while a quiet probe on the same probe
key measured 0.40x and 0.36x (bfloat16) and a real 8k decode of qwen2.5-coder-0.5b ran 1.9x faster
in bf16 (README, "bf16 on CPU"): a probe under load can choose wrong, and `--dtype` overrides it.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

MARGIN = 0.8  # bf16 must take at most 80% of fp32's time, in both shapes, to be chosen
SLOW = 10.0  # a bf16 warm-up run this many times fp32's best ends the probe: fp32
VERSION = 2  # part of the cache key: a changed probe measures again (1 timed the prefill shape only)
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


def _block_seconds(
    dtype: torch.dtype, tokens: int, hidden: int, inner: int, repeats: int, times: int, fp32: float | None
) -> float:
    """Best of `repeats` timings of `times` MLP-block passes over `tokens` tokens (after a warm-up;
    a warm-up `SLOW` times `fp32`'s best ends it: an emulated dtype)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    up = torch.randn(hidden, 2 * inner, generator=g).to(dtype) * hidden**-0.5
    down = torch.randn(inner, hidden, generator=g).to(dtype) * inner**-0.5
    best = float("inf")
    with torch.inference_mode():
        for run in range(repeats + 1):  # the first run warms up kernels and is not counted
            t0 = time.perf_counter()
            for _ in range(times):
                gate, value = (x @ up).chunk(2, dim=-1)
                (torch.nn.functional.silu(gate) * value) @ down
            took = time.perf_counter() - t0
            if run == 0 and fp32 is not None and took > SLOW * fp32:
                return took  # no emulated-bf16 CPU is worth timing further (tens of seconds)
            best = min(best, took) if run else best
    return best


def probe(repeats: int = 3, tokens: int = 128, hidden: int = 896, inner: int = 4864) -> dict[str, Any]:
    """Seconds (best of `repeats`) of one MLP block's matmuls in float32 and bfloat16 over `tokens`
    tokens (`seconds`) and over one token (`decode_seconds`, `DECODE_STEPS` passes), and the choice:
    bfloat16 only if it takes at most `MARGIN` of float32's time in both."""
    shapes = {"seconds": (tokens, 1), "decode_seconds": (1, DECODE_STEPS)}
    out: dict[str, Any] = {}
    for name, (rows, times) in shapes.items():
        fp32 = _block_seconds(torch.float32, rows, hidden, inner, repeats, times, None)
        bf16 = _block_seconds(torch.bfloat16, rows, hidden, inner, repeats, times, fp32)
        out[name] = {"float32": fp32, "bfloat16": bf16}
    faster = all(out[name]["bfloat16"] <= MARGIN * out[name]["float32"] for name in shapes)
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
