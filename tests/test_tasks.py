"""Task generators are deterministic and hit their length; scorers accept right and reject wrong answers."""

from __future__ import annotations

import pytest

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks import get_task
from tokensift.bench.tasks.base import Sample, first_int, string_match_all
from tokensift.models import load_tokenizer


@pytest.fixture(scope="module")
def counter():
    tok = load_tokenizer("smollm2-135m")
    return token_counter(tokensift.Model("smollm2-135m", None, tok, source="tokenizer only"))


@pytest.mark.parametrize("name", ["passkey", "passkey_classic", "niah_single"])
@pytest.mark.parametrize("length", [512, 2048])
def test_generators_hit_length_and_are_deterministic(counter, name: str, length: int) -> None:
    task = get_task(name)
    first = task.samples(counter, length, 2, seed=7, depths=[0.0, 0.5, 1.0])
    again = task.samples(counter, length, 2, seed=7, depths=[0.0, 0.5, 1.0])
    other = task.samples(counter, length, 2, seed=8, depths=[0.0, 0.5, 1.0])
    assert [s.to_dict() for s in first] == [s.to_dict() for s in again]
    assert [s.answer for s in first] != [s.answer for s in other]
    assert len(first) == 6
    for s in first:
        tokens = counter(s.prompt, s.answer_prefix)
        assert length * 0.98 <= tokens <= length, (name, tokens)
        needle_answer = s.answer if isinstance(s.answer, str) else s.answer[0]
        assert needle_answer in s.prompt


def test_passkey_depth_places_the_needle(counter) -> None:
    task = get_task("passkey")
    early, late = task.samples(counter, 1024, 1, seed=0, depths=[0.0, 1.0])
    assert early.prompt.index(early.answer) < len(early.prompt) * 0.2
    assert late.prompt.index(late.answer) > len(late.prompt) * 0.8


def _sample(answer: object) -> Sample:
    return Sample("t", 100, 0, 0, "", answer, 8)


def test_passkey_scorer() -> None:
    task = get_task("passkey")
    assert task.score(_sample("48213"), "The pass key is 48213.") == 1.0
    assert task.score(_sample("48213"), "48213") == 1.0
    assert task.score(_sample("48213"), "The pass key is 48231.") == 0.0
    assert task.score(_sample("48213"), "I don't know, maybe 1 or 48213") == 0.0  # first integer counts
    assert task.score(_sample("48213"), "no number") == 0.0


def test_niah_scorer_is_ruler_string_match_all() -> None:
    task = get_task("niah_single")
    assert task.score(_sample(["1234567"]), " 1234567.") == 1.0
    assert task.score(_sample(["1234567"]), "The number is 123456.") == 0.0
    assert string_match_all("a 7 B", ["a", "b", "c", "d"]) == 0.5  # case-insensitive, fraction found
    assert first_int("x 12 y 3") == 12


def test_perplexity_sample_is_real_prose(counter) -> None:
    task = get_task("perplexity")
    s = task.samples(counter, 256, 1, seed=3)[0]
    assert s.meta["book"] in {
        "Emma",
        "Pride and Prejudice",
        "Persuasion",
        "Mansfield Park",
        "Northanger Abbey",
        "Sense and Sensibility",
    }
    assert len(s.prompt) > 256 * 3 and " the " in s.prompt


def test_unknown_task() -> None:
    with pytest.raises(tokensift.TokensiftError, match="unknown task"):
        get_task("nope")
