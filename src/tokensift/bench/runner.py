"""The bench: model x method x task x length x depth x sample, resumable, one JSONL row per run."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokensift.bench.config import DEFAULT_DEPTHS, BenchConfig, protocols_of
from tokensift.bench.results import append_row, chunk_label, read_meta, read_rows, row_key
from tokensift.bench.suites import SUITES
from tokensift.bench.tasks import Sample, Task, get_task
from tokensift.errors import TokensiftError, check_out_dir
from tokensift.models import Model, load
from tokensift.runtime import memory
from tokensift.runtime.batch import DecodeStep, run_lockstep
from tokensift.runtime.generate import encode, encode_split
from tokensift.runtime.plan import Plan
from tokensift.runtime.shared_prefill import SharedPrefill, prefill_key

PRESETS: dict[str, BenchConfig] = SUITES  # the older name of the suites
LOCAL: dict[str, Any] = {"name": "local"}  # the executor stamp of rows computed in this process
__all__ = [
    "DEFAULT_DEPTHS",
    "PRESETS",
    "BenchConfig",
    "BenchRun",
    "Cell",
    "environment",
    "prepare_run",
    "run_bench",
    "run_cell",
    "token_counter",
]


def token_counter(model: Model):
    """Prompt tokens exactly as generate() will build them (chat template and answer prefix included)."""

    def count(prompt: str, answer_prefix: str = "") -> int:
        return len(encode(model, prompt, answer_prefix=answer_prefix))

    return count


def environment() -> dict[str, Any]:
    import transformers

    from tokensift import __version__

    return {
        "tokensift": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "command": shlex.join(["tokensift", *sys.argv[1:]]) if sys.argv else "",
        "commit": _git_commit(),
    }


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


@dataclass
class Cell:
    """One sample and the plans still to run on it: the unit of work of every executor.

    A cell's plans whose prefill is exact share one prefill (see `run_cell`), so handing whole cells
    to workers keeps the shared-prefill saving when the grid is distributed.
    """

    order: int  # position in the grid's round-robin order
    task: Task
    sample: Sample
    labels: list[str]
    protocol: str = "query-aware"  # one of PROTOCOLS: a run with protocol "both" has cells of each

    def describe(self) -> str:
        depth = "" if self.sample.depth is None else f" depth {self.sample.depth}"
        agnostic = "" if self.protocol == "query-aware" else " q-agnostic"
        return f"{self.task.name} {self.sample.length}{depth} #{self.sample.index}{agnostic}"


@dataclass
class BenchRun:
    """A prepared run: the rows already in `out/results.jsonl`, the cells still missing, and the one
    writer that appends (fsynced, never twice for a key) whatever executor computes them."""

    config: BenchConfig
    out: Path
    model: Model
    plans: dict[str, Plan]
    rows: list[dict[str, Any]]
    done: set[tuple[Any, ...]]
    cells: list[Cell]

    @property
    def results(self) -> Path:
        return self.out / "results.jsonl"

    @property
    def pending(self) -> int:
        return sum(len(cell.labels) for cell in self.cells)

    def key(self, cell: Cell, label: str) -> tuple[Any, ...]:
        """The results key (`row_key`) of the row that `label` on this cell writes."""
        return row_key(_row(self.model, cell, label, self.plans[label], {}, 0.0, self.config))

    def record(self, row: dict[str, Any], executor: dict[str, Any]) -> bool:
        """Append one row stamped with its executor; False (and nothing written) if its key is done."""
        key = row_key(row)
        if key in self.done:
            return False
        row = {**row, "executor": executor}
        append_row(self.results, row)
        self.rows.append(row)
        self.done.add(key)
        if row.get("error"):
            tqdm.write(f"{row['task']} {row['length']} {row['method']}: {row['error']}")
        return True

    def error_rows(self, cell: Cell, message: str) -> list[dict[str, Any]]:
        """The rows of a cell that could not run (what run_cell records for a refused sample)."""
        result = {"prediction": "", "score": None, "error": message}
        return [
            _row(self.model, cell, label, self.plans[label], result, 0.0, self.config)
            for label in cell.labels
        ]


def prepare_run(
    config: BenchConfig,
    out: Path,
    model: Model | None = None,
    executor: dict[str, Any] = LOCAL,
    progress: bool = True,
) -> BenchRun:
    """Validate, read what `out` already holds, load the model and build the missing cells."""
    config.validate()
    check_out_dir(out)
    rows = read_rows(out / "results.jsonl")  # checked before anything is written: corrupt files stay
    read_meta(out / "meta.json")
    done = {row_key(r) for r in rows}
    model = model or load(config.model, dtype=config.dtype, device=config.device)
    tasks = [get_task(name) for name in config.tasks]
    for task in tasks:
        for length in _lengths(task, config):
            if _in_tokens(task) and length >= model.context_length > 0:
                raise TokensiftError(
                    f"length {length} does not fit {model.name}'s context of {model.context_length}"
                )
    out.mkdir(parents=True, exist_ok=True)
    read_rows(out / "results.jsonl", repair=True)  # a truncated last line (a killed run) goes first
    _write_meta(out, config, model, executor)
    run = BenchRun(config, out, model, {m: Plan.of(m) for m in config.methods}, rows, done, [])
    count = token_counter(model)
    grid = [(task, length) for task in tasks for length in _lengths(task, config)]
    ranked: list[tuple[int, Cell]] = []
    building = tqdm(grid, desc="build", unit="cell", disable=not progress, dynamic_ncols=True)
    for task, length in building:
        building.set_postfix_str(f"{task.name} {length}", refresh=False)
        n = config.samples_for(task.uses_depth)
        for rank, sample in enumerate(task.samples(count, length, n, config.seed, config.depths)):
            for protocol in protocols_of(config.protocol):
                cell = Cell(0, task, sample, [], protocol)
                cell.labels = [label for label in run.plans if run.key(cell, label) not in done]
                if cell.labels:
                    ranked.append((rank, cell))
    # Round-robin over the grid: a run stopped early still covers every task, length, protocol and
    # method. The samples of a task run in spread order (0, 8, 4, 2, 6, 1, ...), so a partial run of a
    # depth sweep already spans the depths instead of holding only the shallowest needles; with
    # protocol "both" each sample runs under both protocols before the next sample starts.
    run.cells = [cell for _, cell in sorted(ranked, key=lambda item: spread_rank(item[0]))]
    for order, cell in enumerate(run.cells):
        cell.order = order
    return run


def spread_rank(rank: int, bits: int = 16) -> int:
    """The sort key that visits ranks 0..n-1 in bit-reversed order (van der Corput): every prefix of
    the order spreads over the whole range, whatever n is."""
    return int(format(rank, f"0{bits}b")[::-1], 2)


def run_cell(
    model: Model, config: BenchConfig, cell: Cell, plans: dict[str, Plan]
) -> Iterator[dict[str, Any]]:
    """Run one cell's plans on its sample, yielding one row per plan (without an executor stamp).

    The cell's plans that one prefill can serve share it when more than one of them runs: those
    whose prefill is exact, and the column-sum evictors (H2O, Keyformer) at any budget and scoring
    rule (see shared_prefill.prefill_key). A shared prefill is dropped after its last plan has run. A method
    that refuses the sample (a TokensiftError, e.g. a budget below its window on a short prompt)
    fails that row only: recorded as an error row, never retried.

    With `config.batch_decode` the plans still prefill one after another, but decode together: one
    forward per step serves every plan's next token, each over its own cache as alone
    (`runtime.batch.run_lockstep`; loop methods, which verify several tokens per forward, run alone
    first). The cell's rows are then yielded when all have finished, each with an equal share of the
    cell's wall time; their `decode_seconds` include waiting for the batch.
    """
    task, sample = cell.task, cell.sample
    # A shared prefill is one unchunked forward: chunked runs prefill every plan on its own.
    sharing = config.share_prefill and task.generative and not config.prefill_chunk
    keys = {label: prefill_key(plans[label]) if sharing else None for label in cell.labels}
    left = Counter(key for key in keys.values() if key is not None)
    groups = {key for key, n in left.items() if n > 1}
    prefills: dict[tuple[Any, ...], SharedPrefill] = {}

    def evaluate(label: str, decode_step: DecodeStep | None = None) -> dict[str, Any]:
        key = keys[label]
        try:
            if key in groups and key not in prefills:
                text, question = task.protocol_prompt(sample, cell.protocol)
                ids = encode_split(model, text, question, answer_prefix=sample.answer_prefix)[0]
                group = [plans[other] for other in cell.labels if keys[other] == key]
                prefills[key] = SharedPrefill.run(model, ids, plans[label], also=group[1:])
            use = prefills.get(key) if key in groups else None
            if key in groups:
                left[key] -= 1
                if not left[key]:
                    prefills.pop(key)  # its last plan: free the prompt's tensors after this row
            return task.evaluate(
                model,
                plans[label],
                sample,
                cell.protocol,
                use,
                prefill_chunk=config.prefill_chunk,
                prefill_lookahead=config.prefill_lookahead,
                decode_step=decode_step,
            )
        except TokensiftError as exc:
            return {"prediction": "", "score": None, "error": str(exc)}

    batched = [label for label in cell.labels if plans[label].loop is None]
    if not (config.batch_decode and task.generative and len(batched) > 1):
        batched = []
    for label in cell.labels:
        if label not in batched:
            t0 = time.perf_counter()
            result = evaluate(label)
            yield _row(model, cell, label, plans[label], result, time.perf_counter() - t0, config)
    if not batched:
        return
    t0 = time.perf_counter()
    results, info = run_lockstep(model, [partial(evaluate, label) for label in batched])
    seconds = time.perf_counter() - t0
    for label, result, (size, steps) in zip(batched, results, info, strict=True):
        if isinstance(result, BaseException):
            raise result
        result["decode_batch"] = {
            "rows": len(batched),
            "size_max": size,
            "steps": steps,
            "cell_seconds": seconds,
        }
        yield _row(model, cell, label, plans[label], result, seconds / len(batched), config)


def _row(
    model: Model,
    cell: Cell,
    label: str,
    plan: Plan,
    result: dict[str, Any],
    seconds: float,
    config: BenchConfig,
) -> dict[str, Any]:
    sample = cell.sample
    return {
        "model": model.name,
        "task": cell.task.name,
        "metric": cell.task.metric,
        # Reports group by this label, so the protocol shows wherever the method does.
        "method": label
        + ("" if cell.protocol == "query-aware" else " [query-agnostic]")
        + chunk_label(config.prefill_chunk or 0, config.prefill_lookahead),
        "prefill_chunk": config.prefill_chunk or 0,
        "prefill_lookahead": config.prefill_lookahead,
        "method_spec": plan.spec,
        "protocol": cell.protocol,
        "dtype": str(model.dtype).removeprefix("torch."),
        "length": sample.length,
        "depth": sample.depth,
        "index": sample.index,
        "seed": config.seed,
        "answer": sample.answer,
        "meta": sample.meta,
        **{k: v for k, v in result.items() if k != "method"},
        "method_resolved": result.get("method"),
        "wall_seconds": seconds,
    }


def run_bench(
    config: BenchConfig, out: Path, progress: bool = True, model: Model | None = None
) -> list[dict[str, Any]]:
    """Run every missing row of the grid in this process, appending to out/results.jsonl; returns all
    rows. `model` overrides loading `config.model` (e.g. an in-memory model wrapped with
    `tokensift.wrap`). After every cell the cyclic collector runs and free heap pages go back to the
    system (`runtime.memory`), so a run of hours holds what one cell needs, not what all of them left.
    `tokensift.bench.ray_executor.run_bench_ray` runs the same cells on Ray.
    """
    run = prepare_run(config, out, model, LOCAL, progress)
    bar = tqdm(total=run.pending, desc="bench", unit="run", disable=not progress, dynamic_ncols=True)
    for cell in run.cells:
        bar.set_postfix_str(cell.describe(), refresh=False)
        for row in run_cell(run.model, config, cell, run.plans):
            run.record(row, LOCAL)
            bar.update()
        memory.release()  # collect what a cell left in reference cycles, hand free heap pages back
    bar.close()
    return run.rows


def _lengths(task: Task, config: BenchConfig) -> list[int]:
    return [0] if task.length_free else list(config.lengths)


def _in_tokens(task: Task) -> bool:
    """Whether a task's lengths are prompt tokens (Needle Threading may count characters instead)."""
    return not task.length_free and getattr(task, "unit", "tokens") == "tokens"


def _write_meta(out: Path, config: BenchConfig, model: Model, executor: dict[str, Any]) -> None:
    path = out / "meta.json"
    meta = read_meta(path)
    meta.setdefault("runs", [])
    meta["model"] = model.describe()
    meta["runs"].append(
        {"config": asdict(config), "environment": environment(), "executor": executor, "started": time.time()}
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)
