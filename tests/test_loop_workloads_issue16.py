"""The issue-16 workloads: record edits, a rename through a file, an agent loop (tokenizer-free checks)."""

from __future__ import annotations

import json

import pytest

from tokensift.bench.tasks.loop_workloads import WORKLOADS, get_workload, reproduced


def words(prompt: str, answer_prefix: str = "") -> int:
    """A stand-in tokenizer: whitespace words plus a fixed template overhead."""
    return len((prompt + answer_prefix).split()) + 8


@pytest.mark.parametrize("name", ["edit_records", "rename_identifier", "agent_loop"])
def test_new_workloads_are_seeded_and_copy_their_input(name: str) -> None:
    assert name in WORKLOADS
    task = get_workload(name)
    samples = task.samples(words, 400, 4, seed=16)
    assert [s.prompt for s in samples] == [s.prompt for s in task.samples(words, 400, 4, seed=16)]
    for s in samples:
        assert words(s.prompt) <= 400 and s.meta["units"] >= 2
        # Most of the output is copied from the prompt, but not all of it: something is edited.
        assert 0.5 <= reproduced(s.answer, s.prompt) < 1.0
        assert task.score(s, "\n".join(s.answer)) == 1.0
        assert task.score(s, s.context) < 1.0  # echoing the input unchanged misses the edits


def test_edit_records_applies_three_edits_to_distinct_records() -> None:
    for s in get_workload("edit_records").samples(words, 400, 4, seed=16):
        rows = [line for line in s.answer if line != "id,name,city,amount,date,status"]
        ids = [json.loads(r)["id"] if r.startswith("{") else int(r.split(",")[0]) for r in rows]
        assert ids == sorted(ids) and len(ids) == s.meta["units"]
        edited = [r for r in rows if r not in s.context]
        named = {int(part.split("record id ")[1].split(":")[0]) for part in s.question.split("; ")}
        assert len(named) == 3  # three different records named in the instruction
        assert len(edited) <= 3 and all(
            (json.loads(r)["id"] if r.startswith("{") else int(r.split(",")[0])) in named for r in edited
        )


def test_rename_identifier_renames_definition_and_calls() -> None:
    s = get_workload("rename_identifier").samples(words, 400, 1, seed=16)[0]
    old, new = s.meta["old"], s.meta["new"]
    assert old != new and f"def {old}(" in s.context and new not in s.context
    text = "\n".join(s.answer)
    assert old not in text and f"def {new}(" in text
    assert text.count(f"{new}(") == s.context.count(f"{old}(") >= 3  # definition plus calls


def test_agent_loop_repeats_the_list_with_one_more_task_checked() -> None:
    s = get_workload("agent_loop").samples(words, 400, 1, seed=16)[0]
    checked = [line for line in s.answer if line.startswith("- [x]")]
    assert len(checked) == 3 and len(s.answer) == s.meta["units"]
    assert s.context.count(s.answer[0].split("] ", 1)[1]) == 3  # each task is listed three times before
