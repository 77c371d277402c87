"""The bench: model x method x task x length x depth x sample, resumable, one JSONL row per run."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokensift.bench.results import append_row, read_rows, row_key
from tokensift.bench.tasks import Task, get_task
from tokensift.errors import TokensiftError
from tokensift.models import DEFAULT_MODEL, Model, load
from tokensift.runtime.generate import encode
from tokensift.runtime.plan import Plan

DEFAULT_DEPTHS = (0.1, 0.5, 0.9)


@dataclass
class BenchConfig:
    tasks: list[str]
    methods: list[str]
    lengths: list[int]
    model: str = DEFAULT_MODEL
    samples: int = 3
    seed: int = 0
    depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))

    def validate(self) -> None:
        if not self.tasks or not self.methods or not self.lengths:
            raise TokensiftError("bench needs at least one task, one method and one length")
        if self.samples < 1:
            raise TokensiftError(f"--samples must be >= 1, got {self.samples}")
        bad = [d for d in self.depths if not 0.0 <= d <= 1.0]
        if bad:
            raise TokensiftError(f"depths must lie in [0, 1], got {bad}")
        for task in self.tasks:
            get_task(task)
        for method in self.methods:
            Plan.of(method)


PRESETS: dict[str, BenchConfig] = {
    "demo": BenchConfig(
        tasks=["passkey"],
        methods=["dense", "streaming_llm:budget=0.25", "snapkv:budget=0.25", "h2o:budget=0.25"],
        lengths=[2048, 4096],
        samples=3,
        depths=[0.1, 0.5, 0.9],
    ),
}


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
    model = model or load(config.model)
    for length in config.lengths:
        if length >= model.context_length > 0:
            raise TokensiftError(
                f"length {length} does not fit {model.name}'s context of {model.context_length}"
            )
    _write_meta(out, config, model)

    plans = {m: Plan.of(m) for m in config.methods}
    count = token_counter(model)
    jobs: list[tuple[Task, Any, str]] = []
    for task_name in config.tasks:
        task = get_task(task_name)
        for length in config.lengths:
            for sample in task.samples(count, length, config.samples, config.seed, config.depths):
                for label, plan in plans.items():
                    key = (model.name, task.name, plan.spec, length, sample.depth, sample.index, config.seed)
                    if key not in done:
                        jobs.append((task, sample, label))
    bar = tqdm(jobs, desc="bench", unit="run", disable=not progress, dynamic_ncols=True)
    for task, sample, label in bar:
        bar.set_postfix_str(f"{task.name} {sample.length} {label}", refresh=False)
        t0 = time.perf_counter()
        result = task.evaluate(model, plans[label], sample)
        row = {
            "model": model.name,
            "task": task.name,
            "metric": task.metric,
            "method": label,
            "method_spec": plans[label].spec,
            "length": sample.length,
            "depth": sample.depth,
            "index": sample.index,
            "seed": config.seed,
            "answer": sample.answer,
            **{k: v for k, v in result.items() if k != "method"},
            "method_resolved": result.get("method"),
            "wall_seconds": time.perf_counter() - t0,
        }
        append_row(results, row)
        rows.append(row)
    return rows


def _write_meta(out: Path, config: BenchConfig, model: Model) -> None:
    path = out / "meta.json"
    meta = json.loads(path.read_text()) if path.exists() else {"runs": []}
    meta["model"] = model.describe()
    meta["runs"].append({"config": asdict(config), "environment": environment(), "started": time.time()})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)
