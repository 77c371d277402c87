"""One bench grid locally and on Ray with 1 and 2 workers: speed, Ray's cost per cell, faults.

    flock /tmp/tokensift-heavy.lock .venv/bin/python benchmarks/ray_scaling.py \\
        [--model smollm2-135m] [--length 512] [--samples 4] [--out runs/ray_scaling]

Every run computes the same grid into a fresh results directory (passkey at `--length` tokens,
3 depths x `--samples`, four methods: three share one exact prefill, H2O runs its own):

- local: `run_bench` in this process, torch on all cores (the baseline);
- ray 1x1, ray 2x1: one and two workers of 1 CPU (1 torch thread) each;
- ray 1x2: one worker of 2 CPUs, against local at equal threads: what Ray itself costs;
- faults: ray 2x1 while one worker is ended with ray.kill and another with SIGKILL, each while it
  runs a cell; then rows expected = rows written, no key twice, rows equal to local.

The same three-way split (local, 1x1, 2x1) also runs on a tiny random model whose cells take
milliseconds, where Ray's per-cell cost dominates. One local Ray instance (2 CPUs) serves all Ray
runs; its start is reported once. Per run: wall seconds (model load, samples and cells), worker
start (until the first worker holds its model), the cell phase, and Ray's overhead per cell
(driver round trip minus the cell's own time). Rows are compared with the local run's, timings and
the executor stamp aside. Timings are noisy when other jobs share the machine: the load average is
recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers: tiny model, faults
from tests.conftest import tiny_smol_model
from tests.ray_faults import kill_busy_workers

from tokensift.bench.config import BenchConfig
from tokensift.bench.ray_executor import RayOptions, run_bench_ray
from tokensift.bench.results import read_rows, row_key
from tokensift.bench.runner import run_bench

TIMING = {"wall_seconds", "prefill_seconds", "decode_seconds", "decode_tokens_per_second", "executor"}
RESULTS = Path(__file__).parent / "results" / "ray_scaling.json"


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    counters = {k: v for k, v in row.get("counters", {}).items() if not k.endswith("_seconds")}
    return {**{k: v for k, v in row.items() if k not in TIMING}, "counters": counters}


def config(model: str, length: int, samples: int) -> BenchConfig:
    b = max(16, length // 4)
    return BenchConfig(
        tasks=["passkey"],
        methods=["dense", f"snapkv:budget={b}", f"streaming_llm:budget={b}", f"h2o:budget={b}"],
        lengths=[length],
        samples=samples,
        depths=[0.1, 0.5, 0.9],
        model=model,
    )


def compare(rows: list[dict[str, Any]], local: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [row_key(r) for r in rows]
    mine = {row_key(r): comparable(r) for r in rows}
    theirs = {row_key(r): comparable(r) for r in local}
    return {
        "rows": len(rows),
        "expected": len(local),
        "duplicate_keys": len(keys) - len(set(keys)),
        "missing": len(set(theirs) - set(mine)),
        "differing": sum(mine[k] != v for k, v in theirs.items() if k in mine),
        "same_order": [comparable(r) for r in rows] == [comparable(r) for r in local],
    }


def run_local(cfg: BenchConfig, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rows = run_bench(cfg, out, progress=False)
    wall = time.perf_counter() - t0
    cells = sum(r["wall_seconds"] for r in rows)
    return {"wall_seconds": wall, "cell_seconds": cells, "threads": torch.get_num_threads()}, rows


def run_ray(
    cfg: BenchConfig, out: Path, workers: int, cpus: float, local: list[dict[str, Any]], kill: bool = False
) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    finished, killed = threading.Event(), []
    killer = threading.Thread(target=kill_busy_workers, args=(finished, killed, 600)) if kill else None
    if killer:
        killer.start()
    t0 = time.perf_counter()
    try:
        run_bench_ray(cfg, out, RayOptions(workers=workers, cpus_per_worker=cpus), progress=False)
    finally:
        finished.set()
        if killer:
            killer.join()
    wall = time.perf_counter() - t0
    outcome = json.loads((out / "meta.json").read_text())["runs"][-1]["outcome"]
    start = min(outcome["worker_ready_seconds"])
    cells = outcome["cells"]
    result = {
        "workers": workers,
        "cpus_per_worker": cpus,
        "wall_seconds": wall,
        "worker_start_seconds": start,
        "cell_phase_seconds": outcome["seconds"] - start,
        "overhead_per_cell_seconds": (outcome["cell_round_trip_seconds"] - outcome["cell_compute_seconds"])
        / cells,
        "compute_per_cell_seconds": outcome["cell_compute_seconds"] / cells,
        "cells": cells,
        "retries": outcome["retries"],
        "failed_cells": outcome["failed_cells"],
        "workers_started": outcome["workers_started"],
        "check": compare(read_rows(out / "results.jsonl"), local),
    }
    if kill:
        result["killed"] = [{"how": k["how"], "pid": k["pid"], "cell": k["cell"]} for k in killed]
    return result


def break_even(local: dict[str, Any], ray2: dict[str, Any]) -> dict[str, Any]:
    """Cells per run above which 2 Ray workers beat the local run, from this run's measurements:
    local costs c_local per cell; Ray costs its worker start S once, then (c + o) / 2 per cell."""
    cells = ray2["cells"]
    per_local = local["cell_seconds"] / cells
    per_ray = ray2["cell_phase_seconds"] / cells
    gain = per_local - per_ray
    return {
        "local_seconds_per_cell": per_local,
        "ray2_seconds_per_cell": per_ray,
        "worker_start_seconds": ray2["worker_start_seconds"],
        "cells_to_pay_back_start": ray2["worker_start_seconds"] / gain if gain > 0 else None,
    }


def grid(name: str, cfg: BenchConfig, out: Path, faults: bool) -> dict[str, Any]:
    print(f"[{name}] local", flush=True)
    local, local_rows = run_local(cfg, out / "local")
    runs: dict[str, Any] = {"local": local}
    for label, workers, cpus in (("ray_1x1", 1, 1.0), ("ray_2x1", 2, 1.0), ("ray_1x2", 1, 2.0)):
        print(f"[{name}] {label}", flush=True)
        runs[label] = run_ray(cfg, out / label, workers, cpus, local_rows)
    if faults:
        print(f"[{name}] faults", flush=True)
        runs["faults"] = run_ray(cfg, out / "faults", 2, 1.0, local_rows, kill=True)
    return {
        "config": {"model": cfg.model, "tasks": cfg.tasks, "methods": cfg.methods, "lengths": cfg.lengths},
        "rows": len(local_rows),
        "runs": runs,
        "speedup_cells_2x1_vs_1x1": runs["ray_1x1"]["cell_phase_seconds"]
        / runs["ray_2x1"]["cell_phase_seconds"],
        "speedup_cells_2x1_vs_local": local["cell_seconds"] / runs["ray_2x1"]["cell_phase_seconds"],
        "speedup_wall_2x1_vs_local": local["wall_seconds"] / runs["ray_2x1"]["wall_seconds"],
        "break_even": break_even(local, runs["ray_2x1"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/ray_scaling"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    load_before = os.getloadavg()
    tiny_dir = args.out / "tiny-model"
    if not tiny_dir.exists():
        tiny = tiny_smol_model()
        tiny.model.save_pretrained(tiny_dir)
        tiny.tokenizer.save_pretrained(tiny_dir)

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    ray_init = time.perf_counter() - t0
    try:
        real = grid("real", config(args.model, args.length, args.samples), args.out / "real", faults=True)
        tiny = grid("tiny", config(str(tiny_dir), 256, args.samples), args.out / "tiny", faults=False)
    finally:
        ray.shutdown()
    result = {
        "command": "flock /tmp/tokensift-heavy.lock .venv/bin/python benchmarks/ray_scaling.py "
        f"--model {args.model} --length {args.length} --samples {args.samples}",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "ray_init_seconds": ray_init,
        "real_model": real,
        "tiny_model": tiny,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("real_model", "tiny_model")}, indent=1))
    for name in ("real_model", "tiny_model"):
        r = result[name]
        print(name, {k: v for k, v in r.items() if k.startswith("speedup") or k == "break_even"})
        for label, run in r["runs"].items():
            print(f"  {label}: " + ", ".join(f"{k}={v}" for k, v in run.items() if k not in ("retries",)))


if __name__ == "__main__":
    main()
