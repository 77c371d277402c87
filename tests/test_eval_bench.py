"""Suites, task specs and the runner on the new task families: length-free tasks, refused runs,
round-robin order, per-sample features; one integration test on the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tokensift
from tests.conftest import tiny_smol_model
from tokensift.bench.report import write_report
from tokensift.bench.results import read_rows
from tokensift.bench.runner import PRESETS, BenchConfig, run_bench, spread_rank, token_counter
from tokensift.bench.suites import SUITES, get_suite
from tokensift.bench.tasks import RULER_TASKS, get_task
from tokensift.cli import main
from tokensift.commands import split_tasks


@pytest.fixture(scope="module")
def tiny_smol() -> tokensift.Model:
    """A tiny random Llama over SmolLM2's tokenizer: real prompts and chat template, fast forwards."""
    return tiny_smol_model()


def test_suites() -> None:
    assert {"demo", "ruler-lite", "full"} <= set(SUITES) and PRESETS is SUITES
    lite = get_suite("ruler-lite")
    assert lite.tasks == RULER_TASKS and len(RULER_TASKS) == 11
    assert lite.lengths == [2048, 4096] and lite.methods == ["dense", "snapkv:budget=0.25"]
    # Ten samples per task and length: depth-swept tasks spread them over ten depths.
    assert lite.samples == 10 and lite.depth_samples == 1 and len(lite.depths) == 10
    assert lite.samples_for(True) * len(lite.depths) == lite.samples_for(False) == 10
    lite.tasks.append("passkey")  # a copy: the suite itself is unchanged
    assert "passkey" not in SUITES["ruler-lite"].tasks
    for suite in SUITES.values():
        suite.validate()
    with pytest.raises(tokensift.TokensiftError, match="unknown suite"):
        get_suite("nope")


def test_bench_help_names_every_suite(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps to the terminal, hyphens included
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for name in SUITES:
        assert f" {name}," in text or f" {name} " in text, name


def test_task_specs_on_the_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert split_tasks("vt,nt_multiple:needles=2,placement=random,cwe") == [
        "vt",
        "nt_multiple:needles=2,placement=random",
        "cwe",
    ]
    assert main(["bench", "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
    assert main(["bench", "--tasks", "nt_single:unit=miles", "--methods", "dense", "--lengths", "1k",
                 "--out", str(tmp_path)]) == 2  # fmt: skip
    assert "unit must be tokens or chars" in capsys.readouterr().err
    assert main(["bench", "--list-tasks"]) == 0
    listing = capsys.readouterr().out
    assert "niah_multikey_3" in listing and "essay-substitute" in listing and "suite ruler-lite" in listing


def test_runner_with_new_tasks(tmp_path: Path, tiny_smol: tokensift.Model) -> None:
    config = BenchConfig(
        tasks=["niah_single_2", "charbench_first_index", "nt_single:unit=chars"],
        methods=["dense", "snapkv:budget=0.25"],
        lengths=[512],
        samples=2,
        depths=[0.2, 0.8],
        depth_samples=1,
    )
    rows = run_bench(config, tmp_path, progress=False, model=tiny_smol)
    # depth tasks: 2 depths x 1; others: 2 samples; x 2 methods each.
    assert len(rows) == (2 + 2 + 2) * 2
    char = [r for r in rows if r["task"] == "charbench_first_index"]
    assert {r["length"] for r in char} == {0}
    dense_char = [r for r in char if r["method"] == "dense"]
    assert all(r["features"]["n_tokens"] >= 1 and "target_token_length" in r["features"] for r in dense_char)
    # SnapKV refuses an 80-token prompt (budget below its window): recorded, not fatal.
    refused = [r for r in char if r["method"] != "dense"]
    assert all(r["score"] is None and "window_size" in r["error"] for r in refused)
    nt = [r for r in rows if r["task"] == "nt_single:unit=chars"]
    assert all(512 - 80 < r["meta"]["haystack_chars"] <= 512 for r in nt)  # a pair is 80 characters
    # Round-robin: every task's first sample runs before any task's second.
    first_of_each = {r["task"] for r in rows[: 3 * 2]}
    assert len(first_of_each) == 3
    # Resuming adds nothing, refused runs included.
    before = (tmp_path / "results.jsonl").read_text()
    run_bench(config, tmp_path, progress=False, model=tiny_smol)
    assert (tmp_path / "results.jsonl").read_text() == before
    summary = write_report(tmp_path).read_text()
    assert "charbench_first_index under snapkv:budget=0.25: 2 run(s) failed" in summary
    assert (tmp_path / "report.html").stat().st_size > 20000
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["runs"][-1]["config"]["depth_samples"] == 1
    assert len(read_rows(tmp_path / "results.jsonl")) == len(rows)


def test_spread_order(tmp_path: Path, tiny_smol: tokensift.Model) -> None:
    """A run stopped early spans the depth sweep: samples run in bit-reversed order."""
    assert sorted(range(10), key=spread_rank) == [0, 8, 4, 2, 6, 1, 9, 5, 3, 7]
    assert sorted(range(3), key=spread_rank) == [0, 2, 1]
    config = BenchConfig(
        tasks=["niah_single_2"],
        methods=["dense"],
        lengths=[256],
        depths=[0.1, 0.3, 0.5, 0.7],
        depth_samples=1,
    )
    rows = run_bench(config, tmp_path, progress=False, model=tiny_smol)
    assert [r["depth"] for r in rows] == [0.1, 0.5, 0.3, 0.7]


@pytest.mark.slow
def test_ruler_on_smollm2(tmp_path: Path) -> None:
    """The real model, chat template and answer prefix: prompts land on the length and dense finds the
    needle of niah_single_2 (greedy, so the same on every run)."""
    config = BenchConfig(
        tasks=["niah_single_2", "charbench_count"], methods=["dense"], lengths=[1024], samples=1, depths=[0.5]
    )
    rows = run_bench(config, tmp_path, progress=False)
    niah = next(r for r in rows if r["task"] == "niah_single_2")
    assert 0.98 * 1024 <= niah["prompt_tokens"] <= 1024
    assert niah["score"] == 1.0, niah["prediction"]
    sample = get_task("niah_single_2").samples(token_counter(tokensift.load()), 1024, 1, 0, [0.5])[0]
    assert niah["answer"] == sample.answer
    char = next(r for r in rows if r["task"] == "charbench_count")
    assert char["prompt_tokens"] < 120 and char["features"]["n_tokens"] >= 1
