"""The bench: model x method x task x length x depth x sample, resumable, one JSONL row per run."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokensift.bench.config import DEFAULT_DEPTHS, BenchConfig
from tokensift.bench.results import append_row, read_rows, row_key
from tokensift.bench.suites import SUITES
from tokensift.bench.tasks import Sample, Task, get_task
from tokensift.errors import TokensiftError
from tokensift.models import Model, load
from tokensift.runtime.generate import encode, encode_split
from tokensift.runtime.plan import Plan
from tokensift.runtime.shared_prefill import SharedPrefill, shareable

PRESETS: dict[str, BenchConfig] = SUITES  # the older name of the suites
__all__ = ["DEFAULT_DEPTHS", "PRESETS", "BenchConfig", "environment", "run_bench", "token_counter"]


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


def run_bench(
    config: BenchConfig, out: Path, progress: bool = True, model: Model | None = None
) -> list[dict[str, Any]]:
    """Run every missing row of the grid, appending to out/results.jsonl; returns all rows.

    `model` overrides loading `config.model` (e.g. an in-memory model wrapped with `tokensift.wrap`).
    """
    config.validate()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = read_rows(results, repair=True)
    done = {row_key(r) for r in rows}
    model = model or load(config.model, dtype=config.dtype)
    dtype = str(model.dtype).removeprefix("torch.")
    tasks = [get_task(name) for name in config.tasks]
    for task in tasks:
        for length in _lengths(task, config):
            if _in_tokens(task) and length >= model.context_length > 0:
                raise TokensiftError(
                    f"length {length} does not fit {model.name}'s context of {model.context_length}"
                )
    _write_meta(out, config, model)

    plans = {m: Plan.of(m) for m in config.methods}
    count = token_counter(model)
    grid = [(task, length) for task in tasks for length in _lengths(task, config)]
    ranked: list[tuple[int, Task, Sample, str]] = []
    building = tqdm(grid, desc="build", unit="cell", disable=not progress, dynamic_ncols=True)
    for task, length in building:
        building.set_postfix_str(f"{task.name} {length}", refresh=False)
        n = config.samples_for(task.uses_depth)
        for rank, sample in enumerate(task.samples(count, length, n, config.seed, config.depths)):
            for label, plan in plans.items():
                key = (
                    model.name,
                    task.name,
                    plan.spec,
                    sample.length,
                    sample.depth,
                    sample.index,
                    config.seed,
                    config.protocol,
                    dtype,
                )
                if key not in done:
                    ranked.append((rank, task, sample, label))
    # Round-robin over the grid: a run stopped early still covers every task, length and method.
    jobs = [(task, sample, label) for _, task, sample, label in sorted(ranked, key=lambda job: job[0])]
    sharing = _SharedPrefills(model, config, plans, jobs)
    bar = tqdm(jobs, desc="bench", unit="run", disable=not progress, dynamic_ncols=True)
    for task, sample, label in bar:
        bar.set_postfix_str(f"{task.name} {sample.length} {label}", refresh=False)
        t0 = time.perf_counter()
        try:
            shared = sharing.get(task, sample, label)
            result = task.evaluate(model, plans[label], sample, config.protocol, shared)
        except TokensiftError as exc:
            # A method that refuses a sample (e.g. a budget below its window on a short CharBench prompt)
            # fails that run only: recorded, reported, never retried, and the grid goes on.
            tqdm.write(f"{task.name} {sample.length} {label}: {exc}")
            result = {"prediction": "", "score": None, "error": str(exc)}
        row = {
            "model": model.name,
            "task": task.name,
            "metric": task.metric,
            # Reports group by this label, so the protocol shows wherever the method does.
            "method": label if config.protocol == "query-aware" else f"{label} [query-agnostic]",
            "method_spec": plans[label].spec,
            "protocol": config.protocol,
            "dtype": dtype,
            "length": sample.length,
            "depth": sample.depth,
            "index": sample.index,
            "seed": config.seed,
            "answer": sample.answer,
            "meta": sample.meta,
            **{k: v for k, v in result.items() if k != "method"},
            "method_resolved": result.get("method"),
            "wall_seconds": time.perf_counter() - t0,
        }
        append_row(results, row)
        rows.append(row)
    return rows


class _SharedPrefills:
    """One prefill per sample for all of its pending plans whose prefill is exact (see shared_prefill).

    Jobs of one sample are adjacent, so only the current sample's prefill is kept.
    """

    def __init__(self, model: Model, config: BenchConfig, plans: dict[str, Plan], jobs: list) -> None:
        self.model, self.protocol = model, config.protocol
        self.enabled = config.share_prefill
        self.shareable = {label: shareable(plan) for label, plan in plans.items()}
        self.users: dict[int, int] = {}
        for task, sample, label in jobs:
            if task.generative and self.shareable[label]:
                self.users[id(sample)] = self.users.get(id(sample), 0) + 1
        self.current: tuple[int, SharedPrefill] | None = None

    def get(self, task: Task, sample: Sample, label: str) -> SharedPrefill | None:
        if not (
            self.enabled and task.generative and self.shareable[label] and self.users.get(id(sample), 0) > 1
        ):
            return None
        if self.current is None or self.current[0] != id(sample):
            text, question = task.protocol_prompt(sample, self.protocol)
            ids = encode_split(self.model, text, question, answer_prefix=sample.answer_prefix)[0]
            self.current = (id(sample), SharedPrefill.run(self.model, ids))
        return self.current[1]


def _lengths(task: Task, config: BenchConfig) -> list[int]:
    return [0] if task.length_free else list(config.lengths)


def _in_tokens(task: Task) -> bool:
    """Whether a task's lengths are prompt tokens (Needle Threading may count characters instead)."""
    return not task.length_free and getattr(task, "unit", "tokens") == "tokens"


def _write_meta(out: Path, config: BenchConfig, model: Model) -> None:
    path = out / "meta.json"
    meta = json.loads(path.read_text()) if path.exists() else {"runs": []}
    meta["model"] = model.describe()
    meta["runs"].append({"config": asdict(config), "environment": environment(), "started": time.time()})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)
