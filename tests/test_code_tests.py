"""The code workload scored by its generated tests (issue 16, part 4): a seeded generator whose
reference passes its tests and whose unedited or mutated code fails them, and a sandboxed runner
that scores crashing or looping programs 0 within its timeout, failures one line each."""

from __future__ import annotations

import ast
import importlib.util
import random
import re
import sys
import time
from pathlib import Path

import pytest

from tokensift.bench.tasks.code_tests import (
    CODE_WORKLOADS,
    TEMPLATES,
    ChangeFunction,
    extract_code,
    run_tests,
)
from tokensift.bench.tasks.loop_workloads import reproduced

ROOT = Path(__file__).resolve().parents[1]


def words(prompt: str, answer_prefix: str = "") -> int:
    """A stand-in tokenizer: whitespace words plus a fixed template overhead."""
    return len((prompt + answer_prefix).split()) + 8


def fenced(lines: list[str]) -> str:
    return "Here is the updated file:\n```python\n" + "\n".join(lines) + "\n```\n"


def calls_pass(source: tuple[str, ...], cases: tuple[tuple[str, str], ...]) -> list[bool]:
    """Each case run in this process against the source (our own generated code, not model output)."""
    namespace: dict[str, object] = {}
    exec(compile("\n".join(source), "generated", "exec"), namespace)
    return [eval(call, namespace) == ast.literal_eval(expected) for call, expected in cases]


def test_every_template_and_change_agrees_with_its_native_implementation() -> None:
    """Over many seeds, every template's two variants: the changed source passes its change tests,
    the original passes its keep tests, and the original fails at least three change tests."""
    seen: set[tuple[int, str]] = set()
    for seed in range(60):
        for t, template in enumerate(TEMPLATES):
            f = template(random.Random(f"{seed}|{t}"), "target_fn", "widget")
            seen.add((t, re.sub(r"\d+", "N", f.request)))
            assert len(f.keep) == 2 and len(f.change) == 4
            assert all(calls_pass(f.after, f.change))
            assert all(calls_pass(f.before, f.keep))
            assert sum(not ok for ok in calls_pass(f.before, f.change)) >= 3
            assert f.before != f.after and f.before[0].startswith("def target_fn(")
    assert len(seen) == 2 * len(TEMPLATES)  # both changes of every template were drawn


def test_samples_are_seeded_and_shaped_like_the_workloads() -> None:
    task = CODE_WORKLOADS["change_function"]()
    samples = task.samples(words, 250, 3, seed=2026)
    again = task.samples(words, 250, 3, seed=2026)
    assert [s.prompt for s in samples] == [s.prompt for s in again]
    assert [s.answer for s in samples] == [s.answer for s in again]
    assert len({s.prompt for s in samples}) == 3
    calibration = task.samples(words, 250, 3, seed=0)
    assert not {s.prompt for s in samples} & {s.prompt for s in calibration}
    for s in samples:
        assert s.task == "change_function" and words(s.prompt) <= 250
        assert s.prompt == s.context + "\n\n" + s.question
        assert s.answer["target"] in s.question and f"def {s.answer['target']}(" in s.context
        assert s.meta["units"] >= 2 and len(s.answer["tests"]) == 2 * (s.meta["units"] - 1) + 4
        # The output re-uses the input: all but a line or two of the reference are in the prompt.
        assert reproduced(s.answer["code"], s.prompt) >= 0.8
        assert s.max_new_tokens >= words("\n".join(s.answer["code"])) - 8


def test_reference_passes_unedited_and_mutated_code_fail() -> None:
    task = ChangeFunction()
    for s in task.samples(words, 250, 2, seed=2026):
        reference = s.answer["code"]
        run = task.check(s, fenced(reference))
        assert run.ok and run.share == 1.0 and not run.failures
        assert task.score(s, fenced(reference)) == 1.0 and task.exact(s, fenced(reference))
        # The file as it was (the edit not made) fails the change tests, one line per failure.
        unedited = task.check(s, s.context)
        assert not unedited.ok and unedited.total - unedited.passed >= 3
        assert all(s.answer["target"] in line and "\n" not in line for line in unedited.failures)
        # A copied function broken (its first return mutated): its tests fail, the edit's pass.
        other = next(
            i
            for i, line in enumerate(reference)
            if line.startswith("def ") and s.answer["target"] not in line
        )
        body = next(i for i in range(other, len(reference)) if "return" in reference[i])
        mutated = list(reference)
        mutated[body] = mutated[body].replace("return", "return None and", 1)
        broken = task.check(s, fenced(mutated))
        assert not broken.ok and 0 < broken.share < 1
        # Code cut off before its end (an output budget too small): the missing functions fail.
        cut = task.check(s, fenced(reference[: len(reference) // 2]))
        assert not cut.ok


def test_extract_code() -> None:
    assert extract_code("```python\nx = 1\n```\ntext") == "x = 1\n"
    assert extract_code("intro\n```\nshort\n```\n```py\nlonger = 2\n```") == "longer = 2\n"
    usage = "```python\ndef f():\n    return 1\n```\nUsage:\n```python\nfrom tools import f\n"
    usage += "print(f(), f(), f(), f(), f())\n```"
    assert extract_code(usage) == "def f():\n    return 1\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("def f(:\n    pass", "SyntaxError"),
        ("raise RuntimeError('boom')\ndef f():\n    return 1", "RuntimeError"),
        ("while True:\n    pass", "no result within"),  # a Python-level loop at import
        ("x = [0] * (10**10)", "MemoryError"),  # the address-space limit
    ],
)
def test_programs_that_do_not_load_score_zero(code: str, why: str) -> None:
    start = time.perf_counter()
    run = run_tests(code, [["f()", "1"], ["f() + 1", "2"]], timeout=5.0, per_call=0.5)
    assert run.passed == 0 and run.share == 0.0 and not run.ok
    assert len(run.failures) == 1 and why in run.failures[0] and "\n" not in run.failures[0]
    assert time.perf_counter() - start < 5.0


def test_loops_and_crashes_inside_calls() -> None:
    code = "\n".join(
        [
            "import os, socket",
            "def good():",
            "    return 2",
            "def spin():",
            "    while True:",
            "        pass",
            "def noisy():",
            "    print('not a result ' * 1000)",
            "    return 3",
            "def net():",
            "    return socket.create_connection(('127.0.0.1', 9))",
            "def leave():",
            "    os._exit(7)",
        ]
    )
    start = time.perf_counter()
    cases = [["good()", "2"], ["spin()", "1"], ["noisy()", "3"], ["net()", "None"], ["good()", "3"]]
    run = run_tests(code, [*cases, ["leave()", "1"], ["good()", "2"]], timeout=5.0, per_call=0.5)
    assert time.perf_counter() - start < 3.0  # the looping call was stopped after 0.5 s
    assert (run.passed, run.total) == (2, 7)
    assert any(line.startswith("spin(): CallTimeout") for line in run.failures)
    assert any(line.startswith("net(): OSError") for line in run.failures)
    assert "good(): returned 2, expected 3" in run.failures
    assert run.failures[-1] == "leave() and 1 later calls: no result (exit code 7)"


def test_a_loop_that_ignores_signals_is_killed_at_the_timeout() -> None:
    # sum() over an endless iterator never returns to the interpreter, so the per-call timer cannot
    # stop it; the process group is killed at `timeout`.
    start = time.perf_counter()
    run = run_tests(
        "import itertools\ndef f():\n    return sum(itertools.count())", [["1", "1"], ["f()", "1"]], 1.5, 5.0
    )
    assert 1.5 <= time.perf_counter() - start < 4.0
    assert run.timed_out and (run.passed, run.total) == (1, 2)
    assert run.failures == ("f(): killed after 1.5 s",)


def _bench():
    name = "generation_loops"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_pair_table_reports_tests_per_method() -> None:
    """The benchmark scores a code prompt's outputs by running the tests and tables the pass rates."""
    bench = _bench()
    task = ChangeFunction()
    sample = task.samples(words, 250, 1, seed=2026)[0]
    prompt = bench.Prompt("change_function", sample.prompt, task, sample)
    row = bench.Row(prompt, 8, [1, 2, 3])
    outputs = {bench.HF_GREEDY: fenced(sample.answer["code"]), "bild:small=s": sample.context}
    for key, text in outputs.items():
        timed = bench.Timed()
        timed.add([5, 6, 7], 2.0, 1.0)
        run = task.check(sample, text)
        timed.score, timed.tests, timed.exact = run.share, run.as_dict(), task.exact(sample, text)
        row.runs[key] = timed
    table, markdown = bench.pair_table([row], list(outputs), "s")
    by = {e["method"]: e for e in table}
    assert by[bench.HF_GREEDY]["tests_all_passed"] == 1 and by[bench.HF_GREEDY]["test_calls_passed"] == 1.0
    assert by["bild:small=s"]["tests_all_passed"] == 0 and by["bild:small=s"]["test_calls_passed"] < 1.0
    assert "| tests passed (all) | test calls passed |" in markdown
    assert "| 1/1 | 1.00 |" in markdown and "| 0/1 |" in markdown
