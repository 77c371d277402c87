"""`dtype="auto"`: bfloat16 on CPUs where it is measurably faster than float32, else float32.

bf16 halved prefill time on the AMD EPYC where the ruler-lite suite was tuned, but was slower than
fp32 on an Intel Xeon with avx512_bf16 (smollm2-135m, 2 threads: prefill 1k 1.41 s fp32 vs 2.13 s
bf16; decode 22.4 vs 18.5 tok/s). So the choice is measured, not assumed: a short probe times the
matmuls of one transformer MLP block over a 128-token chunk in both dtypes (best of a few runs;
under a second where bf16 is native, a few seconds where it is emulated: one slow run ends it),
and bf16 wins only when it is at least `MARGIN` faster. The result is cached per CPU model,
bf16-relevant CPU flags, torch version and thread count in the tokensift cache (`dtype_probe.json`),
so the probe runs once per machine configuration. On this project's 2-core AMD EPYC VM (avx2, no
avx512_bf16) the probe measured bf16 about 40x slower than fp32 (emulated), so auto is float32 there.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

MARGIN = 0.8  # bf16 must take at most 80% of fp32's time to be chosen
SLOW = 10.0  # a bf16 warm-up run this many times fp32's best ends the probe: fp32
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
    return f"{model}|{have}|torch {torch.__version__}|{torch.get_num_threads()} threads"


def probe(repeats: int = 3, tokens: int = 128, hidden: int = 896, inner: int = 4864) -> dict[str, Any]:
    """Seconds (best of `repeats`) of one MLP block's matmuls in float32 and bfloat16, and the choice."""
    seconds: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(tokens, hidden, generator=g).to(dtype)
        up = torch.randn(hidden, 2 * inner, generator=g).to(dtype) * hidden**-0.5
        down = torch.randn(inner, hidden, generator=g).to(dtype) * inner**-0.5
        best = float("inf")
        with torch.inference_mode():
            for run in range(repeats + 1):  # the first run warms up kernels and is not counted
                t0 = time.perf_counter()
                gate, value = (x @ up).chunk(2, dim=-1)
                (torch.nn.functional.silu(gate) * value) @ down
                took = time.perf_counter() - t0
                best = min(best, took) if run else best
                if run == 0 and seconds and took > SLOW * seconds["float32"]:
                    best = took  # no emulated-bf16 CPU is worth timing further (tens of seconds)
                    break
        seconds[str(dtype).removeprefix("torch.")] = best
    choice = "bfloat16" if seconds["bfloat16"] <= MARGIN * seconds["float32"] else "float32"
    return {"seconds": seconds, "margin": MARGIN, "dtype": choice}


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
