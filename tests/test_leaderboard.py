"""The kvpress-protocol leaderboard suite: ratios as kvpress writes them, both protocols in one file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tokensift.bench.config import PROTOCOLS, BenchConfig, protocols_of
from tokensift.bench.runner import prepare_run, run_bench
from tokensift.bench.suites import LEADERBOARD_EVICTORS, LEADERBOARD_RATIOS, get_suite
from tokensift.bench.tasks import RULER_TASKS
from tokensift.runtime.plan import Plan

from .conftest import tiny_smol_model


def test_leaderboard_suite_is_kvpress_protocol() -> None:
    config = get_suite("leaderboard")
    config.validate()
    assert config.model == "qwen2.5-coder-0.5b" and config.lengths == [4096]
    assert config.tasks == RULER_TASKS and config.samples_for(False) >= 10
    assert protocols_of(config.protocol) == PROTOCOLS
    assert config.methods[0] == "dense"
    assert len(config.methods) == 1 + len(LEADERBOARD_EVICTORS) * len(LEADERBOARD_RATIOS)
    for name in ("tova", "knorm", "pyramidkv", "keydiff", "adaptive"):
        assert any(m.startswith(name) for m in config.methods)
    kept = set()
    for spec in config.methods[1:]:
        method = Plan.of(spec).evict
        assert method is not None, spec
        kept.add(method.budget)
    assert kept == {1 - r for r in LEADERBOARD_RATIOS}


def test_sparse_table_attends_the_same_fractions() -> None:
    config = get_suite("leaderboard-sparse")
    config.validate()
    fractions = {Plan.of(m).select.budget for m in config.methods[1:]}  # type: ignore[union-attr]
    assert fractions == {1 - r for r in LEADERBOARD_RATIOS}
    assert {m.split(":")[0] for m in config.methods[1:]} == {"quest", "tokenselect", "tidaldecode", "hip"}


def test_both_protocols_share_one_results_file(tmp_path: Path) -> None:
    model = tiny_smol_model()
    config = BenchConfig(
        tasks=["niah_single_1"],
        methods=["dense", "knorm:budget=0.5"],
        lengths=[256],
        samples=1,
        depths=[0.5],
        protocol="both",
    )
    config.validate()
    rows = run_bench(config, tmp_path, progress=False, model=model)
    assert sorted((r["protocol"], r["method_spec"].split(":")[0]) for r in rows) == sorted(
        (p, m) for p in PROTOCOLS for m in ("dense", "knorm")
    )
    agnostic = [r for r in rows if r["protocol"] == "query-agnostic"]
    assert all(r["method"].endswith(" [query-agnostic]") for r in agnostic)
    before = (tmp_path / "results.jsonl").read_bytes()
    run_bench(dataclasses.replace(config, protocol="query-agnostic"), tmp_path, progress=False, model=model)
    assert (tmp_path / "results.jsonl").read_bytes() == before  # resumes: nothing to add


def test_both_protocols_alternate_sample_by_sample(tmp_path: Path) -> None:
    """A run stopped early holds both protocols: each sample runs under both before the next one,
    and a protocol already done for a sample (an earlier single-protocol run) is not redone."""
    model = tiny_smol_model()
    config = BenchConfig(
        tasks=["niah_single_1"], methods=["dense"], lengths=[256], samples=3, depths=[0.5], protocol="both"
    )
    run_bench(
        dataclasses.replace(config, protocol="query-aware", samples=1), tmp_path, progress=False, model=model
    )
    run = prepare_run(config, tmp_path, model, progress=False)
    order = [(cell.sample.index, cell.protocol) for cell in run.cells]
    assert order[0] == (0, "query-agnostic")  # sample 0's query-aware row is already there
    assert len(order) == 5 and len(set(order)) == 5
    for i in range(1, 5, 2):  # then each further sample under both protocols, one after the other
        assert order[i][0] == order[i + 1][0] and {order[i][1], order[i + 1][1]} == set(PROTOCOLS)
