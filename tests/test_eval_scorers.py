"""Every scorer on right and wrong answers, following the rules of each benchmark's own scoring code:
RULER scripts/eval (string_match_all/part, evaluate.py post-processing), InfiniteBench
src/compute_scores.py, LongBench metrics.py (count_score), CharBench evaluation/utils.py and the Needle
Threading README's evaluation loop."""

from __future__ import annotations

import math

import pytest

from tokensift.bench.tasks import RULER_TASKS, get_task
from tokensift.bench.tasks.base import Sample, ruler_postprocess, string_match_all, string_match_part
from tokensift.bench.tasks.charbench import parse_int
from tokensift.bench.tasks.infinitebench import first_int_match, kv_words, math_find_correct
from tokensift.bench.tasks.needle_threading import parse_response
from tokensift.bench.tasks.passage_count import count_score
from tokensift.bench.tasks.ruler_words import zeta


def _sample(answer: object) -> Sample:
    return Sample("t", 100, 0, 0, "", answer, 8)


def test_ruler_string_match_all_and_part() -> None:
    # RULER: per sample, the share of references found as case-insensitive substrings (all) or any (part).
    refs = ["8390101", "2718281", "3141592", "1414213"]
    assert string_match_all(" 8390101, 2718281, 3141592 and 1414213.", refs) == 1.0
    assert string_match_all(" 8390101 and 3141592.", refs) == 0.5
    assert string_match_all(" I do not know.", refs) == 0.0
    assert string_match_all("ABC-Def", ["abc-def"]) == 1.0  # lower-cased on both sides
    assert string_match_part(" 3141592", refs) == 1.0
    assert string_match_part(" 1234567", refs) == 0.0
    # evaluate.py: strip, control characters become newlines, strip again.
    assert ruler_postprocess("  \t 12\x0034\x1f \n") == "12\n34"


@pytest.mark.parametrize("name", RULER_TASKS)
def test_every_ruler_task_scores_with_string_match_all(name: str) -> None:
    task = get_task(name)
    answer = ["WXYZA", "BCDEF"] if name == "vt" else ["alpha", "beta"]
    assert task.score(_sample(answer), f" {answer[0]} {answer[1]}") == 1.0
    assert task.score(_sample(answer), f" {answer[1]}") == 0.5
    assert task.score(_sample(answer), " nothing") == 0.0


def test_infinitebench_passkey_and_number_string() -> None:
    # compute_scores.first_int_match: the first maximal digit run, compared as a string.
    assert first_int_match("The pass key is 01234. Remember it.") == "01234"
    assert first_int_match("no digits") == ""
    for name in ("ib_passkey", "ib_number_string"):
        task = get_task(name)
        assert task.score(_sample("01234"), " 01234.") == 1.0
        assert task.score(_sample("01234"), " 1234.") == 0.0  # a lost leading zero is wrong
        assert task.score(_sample("01234"), " 98765 or 01234") == 0.0  # only the first number counts
    assert get_task("ib_number_string").score(_sample("9755522200"), "9755522200") == 1.0


def test_infinitebench_kv_retrieval() -> None:
    label = "2a8d601d-1d69-4e64-9f90-8ad825a74195"
    task = get_task("ib_kv_retrieval")
    # Punctuation (quotes, colons, dots, braces) is split off; hyphens stay inside the UUID.
    assert kv_words(f'{{"value": "{label}".}}') == ["value", label]
    assert task.score(_sample(label), f'The value is "{label}".') == 1.0
    assert task.score(_sample(label), f"{label}-extra") == 0.0
    assert task.score(_sample(label), label[:-1]) == 0.0


def test_infinitebench_math_find() -> None:
    task = get_task("ib_math_find")
    assert task.score(_sample(97), "97") == 1.0
    assert task.score(_sample(97), "The largest number is 97.") == 1.0
    assert task.score(_sample(97), "96, then 97") == 0.0  # the first number decides
    assert task.score(_sample(97), "none") == 0.0
    assert math_find_correct("48.5", 48.5) and not math_find_correct("48", 48.5)
    assert not math_find_correct("97.0", 97)  # upstream's int("97.0") raises: not a match


def test_longbench_count_score() -> None:
    assert count_score("12", 12) == 1.0
    assert count_score("There are 12 unique paragraphs.", 12) == 1.0
    assert count_score("12 or 13", 12) == 0.5  # matching numbers over all numbers
    assert count_score("twelve", 12) == 0.0
    assert get_task("passage_count").score(_sample(7), "The final answer is 7") == 1.0


def test_charbench_integer_reply_only() -> None:
    assert parse_int(" 3\n") == 3 and parse_int("3.") is None and parse_int("The answer is 3") is None
    task = get_task("charbench_count")
    assert task.score(_sample(3), "3") == 1.0
    assert task.score(_sample(3), "4") == 0.0
    assert task.score(_sample(3), "It appears 3 times.") == 0.0  # invalid counts as wrong


def test_needle_threading_exact_match() -> None:
    value = "f728b4fa-4248-5e3a-0a5d-2f346baa9455"
    task = get_task("nt_single")
    # The README loop: literal_eval the reply, keep its first len(answer) characters, compare.
    assert parse_response(f'"{value}"') == value
    assert task.score(_sample(value), f'"{value}"') == 1.0
    assert task.score(_sample(value), f" {value}\nThat is the value.") == 1.0
    assert task.score(_sample(value), f"The value is {value}") == 0.0
    assert task.score(_sample(value), value.upper()) == 0.0
    values = [value, "e3e70682-c209-4cac-629f-6fbed82c07cd", "964a870c-7c87-9b74-1d87-8f9f9cdf5a86"]
    multi = get_task("nt_multiple")
    assert multi.score(_sample(values), str(values)) == 1.0
    assert multi.score(_sample(values), str(values[:2])) == pytest.approx(2 / 3)
    assert multi.score(_sample(values), "[]") == 0.0


def test_zeta_matches_closed_forms() -> None:
    assert zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-10)
    assert zeta(4.0) == pytest.approx(math.pi**4 / 90, rel=1e-10)
