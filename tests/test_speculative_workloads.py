"""The repetitive workloads: seeded, shaped like every bench task, and really re-using the input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from tests.conftest import tiny_smol_model
from tokensift import NoOpWarning
from tokensift.bench.runner import BenchConfig, run_bench
from tokensift.bench.tasks import LOOP_TASKS, TASKS, get_task
from tokensift.bench.tasks.loop_workloads import OPEN_ENDED_PROMPTS, WORKLOADS, get_workload, reproduced
from tokensift.errors import TokensiftError


def words(prompt: str, answer_prefix: str = "") -> int:
    """A stand-in tokenizer: whitespace words plus a fixed template overhead."""
    return len((prompt + answer_prefix).split()) + 8


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_samples(name: str) -> None:
    task = get_workload(name)
    samples = task.samples(words, 300, 3, seed=4)
    again = task.samples(words, 300, 3, seed=4)
    assert [s.prompt for s in samples] == [s.prompt for s in again]  # seeded
    assert len({s.prompt for s in samples}) == 3
    assert task.samples(words, 300, 1, seed=5)[0].prompt != samples[0].prompt
    for s in samples:
        assert s.task == name and words(s.prompt) <= 300
        assert s.prompt == s.context + "\n\n" + s.question
        assert s.max_new_tokens > 0 and s.answer
        # A perfect answer scores 1, an empty or unrelated one 0.
        assert task.score(s, "\n".join(s.answer)) == 1.0
        assert task.score(s, "") == 0.0
        assert task.score(s, OPEN_ENDED_PROMPTS[0]) == 0.0
        # The output re-uses the input: most expected lines appear in the prompt verbatim.
        assert reproduced(s.answer, s.prompt) >= (0.5 if name != "reformat_records" else 0.0)


def test_workload_specifics() -> None:
    edit = get_workload("edit_code").samples(words, 400, 1, seed=0)[0]
    old = edit.question.split("`")[1]
    new = edit.question.split("`")[3]
    assert f"def {old}(" in edit.context and f"def {new}(" not in edit.context
    assert any(line.startswith(f"def {new}(") for line in edit.answer)
    refine = get_workload("self_refine").samples(words, 400, 1, seed=0)[0]
    assert "version 2" in refine.context and refine.answer != refine.context
    records = get_workload("reformat_records").samples(words, 400, 2, seed=0)
    assert {s.meta["direction"] for s in records} == {"json_to_csv", "csv_to_json"}
    for s in records:
        for line in s.answer:  # every record's values come from the context
            name = json.loads(line)["name"] if line.startswith("{") else line.split(",")[1]
            assert name in s.context
    with pytest.raises(TokensiftError):
        get_workload("nope")
    with pytest.raises(TokensiftError):
        get_workload("self_refine").samples(words, 20, 1)


def test_registered_for_the_bench(tmp_path: Path) -> None:
    """The bench finds the workloads by name and runs them under a loop method, losslessly."""
    assert set(LOOP_TASKS) == set(WORKLOADS) and not set(LOOP_TASKS) & set(TASKS)
    assert type(get_task("edit_code")) is WORKLOADS["edit_code"]
    model = tiny_smol_model()
    bench = BenchConfig(
        tasks=["self_refine", "reformat_records"],
        methods=["dense", "suffix_decoding"],
        lengths=[256],
        samples=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOpWarning)
        rows = run_bench(bench, tmp_path, progress=False, model=model)
    assert len(rows) == 4 and not any(r.get("error") for r in rows)
    by = {(r["task"], r["method"]): r for r in rows}
    for task in bench.tasks:
        dense, drafted = by[task, "dense"], by[task, "suffix_decoding"]
        assert drafted["prediction"] == dense["prediction"] and drafted["score"] == dense["score"]
    assert any(by[t, "suffix_decoding"]["counters"]["accepted_tokens"] > 0 for t in bench.tasks)
