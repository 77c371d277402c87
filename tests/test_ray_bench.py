"""`tokensift bench --ray`: the same rows as a local run, no row lost or doubled when a worker or the
driver dies, and no Ray import unless asked for. One local Ray instance (2 CPUs) for the module."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_smol_model
from tokensift.bench.results import read_rows, row_key
from tokensift.bench.runner import BenchConfig, run_bench

ray = pytest.importorskip("ray")
from tests.ray_faults import kill_busy_workers  # noqa: E402
from tokensift.bench.ray_executor import RayOptions, run_bench_ray  # noqa: E402

# Fields that measure time (and the executor stamp): everything else must match exactly.
VARYING = {"wall_seconds", "prefill_seconds", "decode_seconds", "decode_tokens_per_second", "executor"}
METHODS = [
    "dense",
    "snapkv:budget=0.5,window_size=8",
    "streaming_llm:budget=0.5",
    "snapkv:budget=8,window_size=32",  # refuses every sample: a deterministic error row
]
ARGS = ["--tasks", "passkey,perplexity", "--methods", ",".join(METHODS), "--lengths", "256"]
ARGS += ["--samples", "3", "--depths", "0.1,0.5,0.9"]


def _config(model: Path) -> BenchConfig:
    return BenchConfig(
        tasks=["passkey", "perplexity"],
        methods=list(METHODS),
        lengths=[256],
        samples=3,
        depths=[0.1, 0.5, 0.9],
        model=str(model),
    )


def _same(row: dict[str, Any]) -> dict[str, Any]:
    counters = {k: v for k, v in row.get("counters", {}).items() if not k.endswith("_seconds")}
    return {**{k: v for k, v in row.items() if k not in VARYING}, "counters": counters}


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama over SmolLM2's tokenizer, saved so that every Ray worker loads it."""
    path = tmp_path_factory.mktemp("tiny-smol")
    tiny = tiny_smol_model()
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def local_rows(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_bench(_config(model_dir), tmp_path_factory.mktemp("local"), progress=False)


def test_ray_rows_equal_local_rows(ray_instance, model_dir: Path, local_rows, tmp_path: Path) -> None:
    rows = run_bench_ray(_config(model_dir), tmp_path, RayOptions(workers=2), progress=False)
    written = read_rows(tmp_path / "results.jsonl")
    assert len(local_rows) == 12 * len(METHODS)
    # Same rows in the same order (the driver rewrites them in grid order at the end).
    assert [_same(r) for r in written] == [_same(r) for r in local_rows]
    assert [_same(r) for r in rows] == [_same(r) for r in local_rows]
    assert {r["executor"]["name"] for r in local_rows} == {"local"}
    assert {r["executor"]["name"] for r in written} == {"ray"}
    # The refused method is one error row per sample, computed once, never retried.
    errors = [r for r in written if r.get("error")]
    assert len(errors) == 12 and all(r["method"] == METHODS[-1] for r in errors)
    assert {r["executor"]["attempt"] for r in written} == {1}
    # Shared prefill survives distribution: the exact-prefill plans of a cell share one prefill.
    shared = [r for r in written if "shared_prefill_seconds" in r.get("counters", {})]
    assert len(shared) == sum("shared_prefill_seconds" in r.get("counters", {}) for r in local_rows) > 0
    # Rerunning adds nothing and starts no cell.
    again = run_bench_ray(_config(model_dir), tmp_path, RayOptions(workers=1), progress=False)
    assert len(again) == len(rows) and len(read_rows(tmp_path / "results.jsonl")) == len(rows)
    assert "outcome" not in json.loads((tmp_path / "meta.json").read_text())["runs"][-1]


def test_workers_killed_mid_cell(ray_instance, model_dir: Path, local_rows, tmp_path: Path) -> None:
    """One worker ends by ray.kill, another by SIGKILL, each while running a cell: their cells run
    again on fresh workers, and the results hold every row exactly once, as a local run has them."""
    finished, killed = threading.Event(), []
    killer = threading.Thread(target=kill_busy_workers, args=(finished, killed))
    killer.start()
    try:
        run_bench_ray(_config(model_dir), tmp_path, RayOptions(workers=2), progress=False)
    finally:
        finished.set()
        killer.join()
    assert len(killed) == 2, f"only {len(killed)} worker(s) were seen running a cell"
    written = read_rows(tmp_path / "results.jsonl")
    assert max(Counter(row_key(r) for r in written).values()) == 1, "a row was written twice"
    assert [_same(r) for r in written] == [_same(r) for r in local_rows]  # none lost, none changed
    outcome = json.loads((tmp_path / "meta.json").read_text())["runs"][-1]["outcome"]
    lost = {event["worker"] for event in outcome["retries"]}
    assert {f"{k['node']}:{k['pid']}" for k in killed} <= lost
    assert outcome["failed_cells"] == 0 and outcome["workers_started"] == 2 + len(outcome["retries"])
    assert any(r["executor"]["attempt"] > 1 for r in written)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from tokensift.cli import main; sys.exit(main())", *args]


def test_driver_killed_then_rerun_resumes(ray_instance, model_dir: Path, local_rows, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = _cli("bench", *ARGS, "--model", str(model_dir), "--out", str(out), "--no-progress")
    # The driver joins this module's Ray instance by address, as it would join a cluster.
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [*command, "--ray", address, "--ray-workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    results = out / "results.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    first = read_rows(results, repair=False)
    assert 2 <= len(first) < len(local_rows)
    # The same command again (here through the API, on this module's Ray) finishes the grid.
    run_bench_ray(_config(model_dir), out, RayOptions(workers=1), progress=False)
    written = read_rows(results)
    assert max(Counter(row_key(r) for r in written).values()) == 1
    by_key = {row_key(r): _same(r) for r in written}
    assert by_key == {row_key(r): _same(r) for r in local_rows}
    assert [_same(r) for r in written[: len(first)]] == [_same(r) for r in first]  # kept, not redone


def test_local_bench_never_imports_ray(model_dir: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from tokensift.cli import main; "
        f"rc = main({['bench', *ARGS[:4], '--lengths', '256', '--samples', '1', '--depths', '0.5']!r} + "
        f"['--model', {str(model_dir)!r}, '--out', {str(tmp_path)!r}, '--no-progress']); "
        "assert rc == 0, rc; assert 'ray' not in sys.modules, 'ray was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_ray_flags_need_ray(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from tokensift.cli import main

    assert main(["bench", *ARGS, "--out", str(tmp_path), "--ray-workers", "2"]) == 2
    assert "only apply with --ray" in capsys.readouterr().err
    with pytest.raises(Exception, match="ray-workers must be"):
        RayOptions(workers=0)
