"""Run a bench grid on Ray: actors that each load the model once run whole cells; the driver writes.

The grid is split into the local runner's cells (one sample and its pending plans, so the plans that
share an exact prefill still share it). Workers return rows and never touch the results directory:
the driver appends them with the local runner's writer (`BenchRun.record`: fsynced, one row per key),
so a run killed at any point resumes like a local one and both executors produce the same rows,
told apart only by their `executor` stamp. When a worker dies mid-cell (killed, OOM, node lost) the
cell goes back to the queue for another worker and a fresh actor replaces the dead one; a cell whose
worker dies `max_retries + 1` times is recorded as error rows instead of being retried forever.

Imported only for `tokensift bench --ray`: nothing else in tokensift imports Ray.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tokensift.bench.config import BenchConfig
from tokensift.bench.results import read_rows, row_key, write_rows
from tokensift.bench.runner import BenchRun, Cell, prepare_run, run_cell
from tokensift.errors import TokensiftError
from tokensift.models import Model, load
from tokensift.runtime import memory
from tokensift.runtime.plan import Plan

try:
    import ray
    from ray import exceptions as ray_errors
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise TokensiftError("--ray needs Ray: pip install 'tokensift[ray]'") from exc

WORKER_PREFIX = "tokensift-bench-"  # actor names: WORKER_PREFIX + run id + "-" + number
# A worker process or its node went away: the cell is not at fault and is retried elsewhere.
LOST = (
    ray_errors.RayActorError,
    ray_errors.WorkerCrashedError,
    ray_errors.NodeDiedError,
    ray_errors.ObjectLostError,
    ray_errors.OutOfMemoryError,
)


@dataclass
class RayOptions:
    """Where and how wide a bench runs on Ray.

    `address`: None starts a local Ray instance (or uses the one this process already joined),
    "auto" joins the cluster this machine belongs to, "ray://host:port" connects with Ray Client.
    `workers`: actors to start (default: as many as the cluster's CPUs, or GPUs, hold).
    `cpus_per_worker`, `gpus_per_worker`: each actor's reservation; a worker runs torch on that many
    threads. `gpus_per_worker` None asks for one GPU per worker when the cluster has GPUs.
    `max_retries`: resubmissions of a cell after its worker died; then it becomes error rows.
    `max_start_failures`: workers in a row that may fail to start before the run gives up.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    max_retries: int = 2
    max_start_failures: int = 3

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise TokensiftError(f"--ray-workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise TokensiftError(f"--ray-cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise TokensiftError(f"--ray-gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.max_retries < 0 or self.max_start_failures < 1:
            raise TokensiftError("max_retries must be >= 0 and max_start_failures >= 1")


def options_from_args(args: Any) -> RayOptions:
    """RayOptions from `tokensift bench --ray ...` arguments (unset flags keep the defaults)."""
    given = {
        "workers": args.ray_workers,
        "cpus_per_worker": args.ray_cpus_per_worker,
        "gpus_per_worker": args.ray_gpus_per_worker,
        "max_retries": args.ray_max_retries,
    }
    return RayOptions(address=args.ray or None, **{k: v for k, v in given.items() if v is not None})


class BenchWorker:
    """A Ray actor holding one model: runs whole cells and returns their rows (it never writes)."""

    def __init__(
        self, config: BenchConfig, model_factory: Callable[[], Model] | None, threads: int, gpu: bool
    ) -> None:
        import torch

        torch.set_num_threads(threads)
        self.model = (
            model_factory() if model_factory else load(config.model, dtype=config.dtype, device=config.device)
        )
        if gpu and torch.cuda.is_available():
            self.model.model.to("cuda")
        self.config = config
        self.plans = {m: Plan.of(m) for m in config.methods}
        self.cell: int | None = None

    def info(self) -> dict[str, Any]:
        """Who this worker is and which cell it is running (answers while a cell runs)."""
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "cell": self.cell}

    def run(self, cell: Cell) -> list[dict[str, Any]]:
        self.cell = cell.order
        try:
            return list(run_cell(self.model, self.config, cell, self.plans))
        finally:
            self.cell = None
            memory.release()  # as run_bench does after every cell


@dataclass
class _Worker:
    name: str
    handle: Any
    ready: Any  # the info() call that answers once the model is loaded
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.info.get('node', '?')}:{self.info.get('pid', '?')}"


def connect(address: str | None) -> bool:
    """Join Ray, or start a local instance when `address` is None; True when this call started or
    joined it (the caller then shuts it down). An already initialised Ray is used as it is."""
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise TokensiftError(f"cannot join Ray at {address!r}: {exc}") from exc
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
    return True


def run_bench_ray(
    config: BenchConfig,
    out: Path,
    options: RayOptions | None = None,
    progress: bool = True,
    model_factory: Callable[[], Model] | None = None,
) -> list[dict[str, Any]]:
    """`run_bench` with the cells spread over Ray actors; returns all rows in the local run's order.

    `model_factory` (picklable, called once on the driver and once per worker) replaces loading
    `config.model`; the driver's copy only tokenizes and builds the samples.
    """
    options = options or RayOptions()
    config.validate()  # fail on a bad grid before starting anything
    local = not options.address
    started = connect(options.address)
    pool: _Pool | None = None
    try:
        cpus = ray.cluster_resources().get("CPU", 0.0)
        gpus = ray.cluster_resources().get("GPU", 0.0)
        gpu_each = options.gpus_per_worker if options.gpus_per_worker is not None else min(1.0, gpus)
        fit = int(gpus // gpu_each) if gpu_each else int(cpus // options.cpus_per_worker)
        workers = options.workers or max(1, fit)
        if workers > fit:
            need = f"{workers} workers x {options.cpus_per_worker:g} CPU" + (
                f", {gpu_each:g} GPU" if gpu_each else ""
            )
            message = f"{need} do not fit Ray's {cpus:g} CPUs and {gpus:g} GPUs"
            if local:
                raise TokensiftError(message + ": lower --ray-workers or --ray-cpus-per-worker")
            tqdm.write(f"warning: {message}; waiting for the cluster to grow")
        stamp = {
            "name": "ray",
            "address": options.address or "local",
            "workers": workers,
            "cpus_per_worker": options.cpus_per_worker,
            "gpus_per_worker": gpu_each,
        }
        model = model_factory() if model_factory else None
        run = prepare_run(config, out, model, stamp, progress)
        if not run.cells:
            return run.rows
        threads = max(1, int(options.cpus_per_worker))
        pool = _Pool(config, model_factory, min(workers, len(run.cells)), options, threads, gpu_each)
        outcome = _Driver(run, pool, options, progress).drive()
        _finish_meta(out, outcome)
        return run.rows
    finally:
        if pool is not None:
            pool.close()
        if started:
            ray.shutdown()


class _Pool:
    """`size` workers kept alive: a dead or failed one is replaced by a fresh actor."""

    def __init__(
        self,
        config: BenchConfig,
        factory: Callable[[], Model] | None,
        size: int,
        options: RayOptions,
        threads: int,
        gpus: float,
    ) -> None:
        self.actor = ray.remote(BenchWorker)
        self.resources = {
            "num_cpus": options.cpus_per_worker,
            "num_gpus": gpus,
            "max_restarts": 0,
            "max_concurrency": 2,  # info() answers while run() works
        }
        self.args = (config, factory, threads, gpus > 0)
        self.run_id = uuid.uuid4().hex[:8]
        self.started = 0
        self.workers: list[_Worker] = []
        for _ in range(size):
            self.spawn()

    def spawn(self) -> _Worker:
        name = f"{WORKER_PREFIX}{self.run_id}-{self.started}"
        self.started += 1
        handle = self.actor.options(name=name, **self.resources).remote(*self.args)
        worker = _Worker(name, handle, handle.info.remote())
        self.workers.append(worker)
        return worker

    def replace(self, worker: _Worker) -> _Worker:
        self.workers.remove(worker)
        ray.kill(worker.handle)
        return self.spawn()

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker.handle)
        self.workers.clear()


class _Driver:
    """Hands cells to ready workers, writes what comes back, and requeues the cells of dead workers."""

    def __init__(self, run: BenchRun, pool: _Pool, options: RayOptions, progress: bool) -> None:
        self.run, self.pool, self.options = run, pool, options
        self.queue = deque((cell, 1) for cell in run.cells)
        self.starting = {w.ready: w for w in pool.workers}
        self.running: dict[Any, tuple[_Worker, Cell, int, float]] = {}
        self.idle: list[_Worker] = []
        self.retries: list[dict[str, Any]] = []
        self.failed_cells = self.start_failures = self.written = 0
        self.ready_at: list[float] = []  # seconds from the start until each worker could take cells
        self.round_trip = self.compute = 0.0  # per finished cell: submit -> rows back; rows' own time
        self.t0 = time.perf_counter()
        self.bar = tqdm(
            total=len(run.cells), desc="ray bench", unit="cell", disable=not progress, dynamic_ncols=True
        )
        self.shown = ""

    def drive(self) -> dict[str, Any]:
        before = len(self.run.rows)
        while self.queue or self.running:
            while self.idle and self.queue:
                worker = self.idle.pop()
                cell, attempt = self.queue.popleft()
                self.running[worker.handle.run.remote(cell)] = (worker, cell, attempt, time.perf_counter())
            ready, _ = ray.wait([*self.running, *self.starting], num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in self.starting:
                    self.started(ref)
                else:
                    self.finished(ref)
            self.status()
            if not (self.running or self.starting or self.idle) and self.queue:
                raise TokensiftError("no Ray worker is left to run the remaining cells")
        self.bar.close()
        _canonical_order(self.run, before)
        cells = len(self.run.cells)
        return {
            "cells": cells,
            "rows_written": self.written,
            "retries": self.retries,
            "failed_cells": self.failed_cells,
            "workers_started": self.pool.started,
            "worker_ready_seconds": self.ready_at,
            "seconds": time.perf_counter() - self.t0,
            "cell_round_trip_seconds": self.round_trip,
            "cell_compute_seconds": self.compute,
        }

    def started(self, ref: Any) -> None:
        worker = self.starting.pop(ref)
        try:
            worker.info = ray.get(ref)
        except ray_errors.RayError as exc:
            self.start_failures += 1
            if self.start_failures >= self.options.max_start_failures:
                raise TokensiftError(
                    f"{self.start_failures} Ray workers in a row failed to start: {_cause(exc)}"
                ) from None
            self.replace(worker)
            return
        self.start_failures = 0
        self.ready_at.append(time.perf_counter() - self.t0)
        self.idle.append(worker)

    def finished(self, ref: Any) -> None:
        worker, cell, attempt, submitted = self.running.pop(ref)
        try:
            rows = ray.get(ref)
        except LOST as exc:
            # The worker went away (killed, OOM, node lost): the cell is not at fault, run it again.
            event = {"cell": cell.describe(), "order": cell.order, "attempt": attempt, "worker": worker.label}
            self.retries.append({**event, "error": _cause(exc)})
            tqdm.write(
                f"worker {worker.label} lost running {cell.describe()} (attempt {attempt}): {_cause(exc)}"
            )
            self.replace(worker)
            if attempt <= self.options.max_retries:
                self.queue.appendleft((cell, attempt + 1))
                return
            self.failed_cells += 1
            message = f"the Ray worker running this cell died {attempt} times; last: {_cause(exc)}"
            rows = self.run.error_rows(cell, message)
        else:
            self.idle.append(worker)
            self.round_trip += time.perf_counter() - submitted
            self.compute += sum(row["wall_seconds"] for row in rows)
        expected = {self.run.key(cell, label) for label in cell.labels}
        got = {row_key(row) for row in rows}
        if got != expected:
            raise TokensiftError(
                f"a Ray worker returned rows for another grid ({sorted(got - expected)[:1]}): "
                "do the workers load the driver's model and dtype?"
            )
        stamp = {"name": "ray", "attempt": attempt, "worker": worker.label}
        self.written += sum(self.run.record(row, stamp) for row in rows)
        self.bar.update()

    def replace(self, worker: _Worker) -> None:
        fresh = self.pool.replace(worker)
        self.starting[fresh.ready] = fresh

    def status(self) -> None:
        rate = self.written / max(time.perf_counter() - self.t0, 1e-9)
        alive = len(self.idle) + len(self.running)
        extra = f", retries {len(self.retries)}" if self.retries else ""
        text = f"{rate:.2f} rows/s, workers {alive}/{len(self.pool.workers)}{extra}"
        if text != self.shown:
            self.shown = text
            self.bar.set_postfix_str(text)


def _canonical_order(run: BenchRun, before: int) -> None:
    """Rewrite this run's rows (appended as cells finished) in the grid order a local run writes,
    atomically, so a distributed and a local run of the same grid leave the same file."""
    order = {
        run.key(cell, label): (cell.order, i) for cell in run.cells for i, label in enumerate(cell.labels)
    }
    rows = read_rows(run.results)
    head, new = rows[:before], rows[before:]
    new.sort(key=lambda row: order.get(row_key(row), (len(order), 0)))
    write_rows(run.results, head + new)
    run.rows = head + new


def _finish_meta(out: Path, outcome: dict[str, Any]) -> None:
    path = out / "meta.json"
    meta = json.loads(path.read_text())
    meta["runs"][-1]["outcome"] = outcome
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"
