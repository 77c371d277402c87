"""Every task generator: deterministic per seed, at its advertised length, with a correct answer and an
honest context/question split. Lengths are measured with SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import ast
import json
import re
from collections import Counter

import pytest

import tokensift
from tokensift.bench.runner import token_counter
from tokensift.bench.tasks import TASKS, get_task
from tokensift.bench.tasks.base import Sample
from tokensift.bench.tasks.charbench import MAX_WORD, MIN_WORD, word_buckets, word_features
from tokensift.models import load_tokenizer

# One haystack unit of these tasks is a UUID line or pair of 55-80 SmolLM2 tokens: more than 2% of a 2k
# prompt, so at 2k they land within one unit (80 tokens) of the length; at 4k within 2%.
COARSE = {
    "niah_multikey_3",
    "nt_single",
    "nt_multiple",
    "nt_conditional",
    "nt_threading",
    "nt_multithreading",
    "ib_kv_retrieval",
}
GENERATED = [name for name in TASKS if name != "perplexity"]  # perplexity windows are cut at eval time


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def counter(tokenizer):
    return token_counter(tokensift.Model("smollm2-135m", None, tokenizer, source="tokenizer only"))


def _strings(answer: object) -> list[str]:
    if isinstance(answer, str):
        return [answer]
    if isinstance(answer, list) and all(isinstance(a, str) for a in answer):
        return list(answer)
    return []


@pytest.mark.parametrize("name", GENERATED)
def test_generator_is_deterministic_at_length_and_split(counter, name: str) -> None:
    task = get_task(name)
    depths = [0.0, 1.0]
    first = task.samples(counter, 2048, 2, seed=7, depths=depths)
    again = task.samples(counter, 2048, 2, seed=7, depths=depths)
    other = task.samples(counter, 2048, 2, seed=8, depths=depths)
    assert [s.to_dict() for s in first] == [s.to_dict() for s in again]
    assert [s.prompt for s in first] != [s.prompt for s in other]
    assert len(first) == (4 if task.uses_depth else 2)
    longer = task.samples(counter, 4096, 1, seed=7, depths=[0.5])
    for s in first + longer:
        tokens = counter(s.prompt, s.answer_prefix)
        if task.length_free:  # sized by its own items (CharBench words, reviews), not by the length asked
            assert s.length == 0 and tokens < 1024, (name, tokens)
        elif name in COARSE and s.length == 2048:
            assert s.length - 80 <= tokens <= s.length, (name, tokens)
        else:
            assert s.length * 0.98 <= tokens <= s.length, (name, s.length, tokens)
        # The query-agnostic protocol compresses `context`, then appends `question`.
        assert s.context and s.question
        assert s.prompt.startswith(s.context) and s.prompt.endswith(s.question)
        assert s.separator.strip() == "" and s.context + s.separator + s.question == s.prompt
        assert len(s.context) > len(s.question) or task.length_free
        for value in _strings(s.answer):
            assert value in s.context, (name, value)
        assert s.max_new_tokens >= 3


def test_depth_moves_the_needle(counter) -> None:
    for name in ["niah_single_1", "niah_single_2", "niah_multikey_2", "nt_single", "ib_passkey"]:
        early, late = get_task(name).samples(counter, 1024, 1, seed=0, depths=[0.0, 1.0])
        value = _strings(early.answer)[0]
        assert early.context.index(value) < 0.2 * len(early.context), name
        value = _strings(late.answer)[0]
        assert late.context.index(value) > 0.8 * len(late.context), name


def _niah_type(sample: Sample) -> str:
    return "uuids" if "uuid" in sample.prompt.split("\n")[0] else "numbers"


@pytest.mark.parametrize(
    "name", ["niah_single_1", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"]
)
def test_ruler_niah_needles_and_template(counter, name: str) -> None:
    s = get_task(name).samples(counter, 1024, 1, seed=3, depths=[0.5])[0]
    keys = s.meta["keys"]
    kind = _niah_type(s)
    # Every answer is stated by a needle sentence of a queried key (RULER's needle format).
    for value in s.answer:
        assert any(f"One of the special magic {kind} for {k} is: {value}." in s.context for k in keys)
    single = len(s.answer) == 1
    assert s.prompt.startswith("A special magic" if single else "Some special magic")
    assert s.answer_prefix.endswith(" is" if single else " are")
    if name == "niah_multiquery":
        assert len(keys) == 4 and ", and " in s.question
    if name == "niah_multikey_1":  # three distractor needles with other keys
        assert s.context.count("One of the special magic numbers for") == 4


def test_vt_chain_resolves_to_the_answer(counter) -> None:
    s = get_task("vt").samples(counter, 2048, 1, seed=5)[0]
    main = s.context[s.context.rindex("Memorize and track") :]  # after the one-shot example
    assigned: dict[str, str] = {}
    for left, right in re.findall(r"VAR (\w+) = (VAR \w+|\d+)", main):
        assigned[left] = right
    value = str(s.meta["value"])
    holders, changed = {v for v, r in assigned.items() if r == value}, True
    while changed:
        grown = holders | {v for v, r in assigned.items() if r.startswith("VAR ") and r[4:] in holders}
        changed, holders = grown != holders, grown
    assert holders == set(s.answer) and len(s.answer) == 5
    assert f"value {value} in the text above" in s.question


def test_cwe_answer_is_the_ten_most_common(counter) -> None:
    for length in (2048, 4096):  # RULER's small (6x) and full (30x) settings
        s = get_task("cwe").samples(counter, length, 1, seed=2)[0]
        listing = s.context.split("\n")[-1]
        words = re.findall(r"\d+\. (\S+)", listing)
        top = [w for w, _ in Counter(words).most_common(10)]
        assert sorted(top) == sorted(s.answer)
        counts = Counter(words)
        assert min(counts[w] for w in s.answer) == (6 if length < 4096 else 30)


def test_fwe_answer_is_the_three_most_frequent_coded_words(counter) -> None:
    s = get_task("fwe").samples(counter, 2048, 1, seed=4)[0]
    counts = Counter(s.context.split(". ", 1)[1].split())
    ranked = [w for w, _ in counts.most_common() if w != "..."]
    assert ranked[:3] == s.answer and counts["..."] > counts[ranked[0]]


def _haystack(sample: Sample) -> dict[str, str]:
    return json.loads(sample.context)


def test_needle_threading_answers_follow_from_the_haystack(counter) -> None:
    single = get_task("nt_single").samples(counter, 1024, 1, seed=1, depths=[0.5])[0]
    key = re.search(r'Key: "([^"]+)"', single.question).group(1)
    assert _haystack(single)[key] == single.answer
    multi = get_task("nt_multiple:needles=3,placement=random").samples(counter, 1024, 1, seed=1)[0]
    keys = json.loads(re.search(r"Keys: (\[.*\])", multi.question).group(1))
    assert [_haystack(multi)[k] for k in keys] == multi.answer and len(keys) == 3
    cond = get_task("nt_conditional:char=#").samples(counter, 1024, 1, seed=1, depths=[0.2])[0]
    hay = _haystack(cond)
    assert [v for k, v in hay.items() if "#" in k] == cond.answer
    for spec, direction in [("nt_threading:hops=4", "forward"), ("nt_threading:direction=backward", "back")]:
        thread = get_task(spec).samples(counter, 1024, 1, seed=1)[0]
        hay, order = _haystack(thread), {}
        step = re.search(r'Key: "([^"]+)"', thread.question).group(1)
        order = list(hay)
        positions = []
        while step in hay:
            positions.append(order.index(step))
            step = hay[step]
        assert step == thread.answer
        assert positions == sorted(positions, reverse=direction == "back")
    many = get_task("nt_multithreading:threads=2").samples(counter, 1024, 1, seed=1)[0]
    hay, finals = _haystack(many), []
    for start in json.loads(re.search(r"Keys: (\[.*\])", many.question).group(1)):
        while start in hay:
            start = hay[start]
        finals.append(start)
    assert finals == many.answer


def test_needle_threading_length_in_characters(counter) -> None:
    task = get_task("nt_single:unit=chars")
    assert task.name == "nt_single:unit=chars"
    for s in task.samples(counter, 8000, 2, seed=0, depths=[0.5]):
        assert 0.98 * 8000 <= s.meta["haystack_chars"] <= 8000
        assert s.meta["prompt_tokens"] == counter(s.prompt, "")
        # UUID text is dense in tokens: far fewer characters per token than prose.
        assert s.meta["haystack_chars"] / s.meta["prompt_tokens"] < 2.5
    with pytest.raises(tokensift.TokensiftError, match="unit must be"):
        get_task("nt_single:unit=words")
    with pytest.raises(tokensift.TokensiftError, match="no parameter"):
        get_task("nt_single:colour=blue")


def test_infinitebench_generators(counter) -> None:
    number = get_task("ib_number_string").samples(counter, 1024, 1, seed=0, depths=[0.3])[0]
    assert re.fullmatch(r"\d{10}", number.answer)
    assert f"The sequence of digits is {number.answer}." in number.context
    kv = get_task("ib_kv_retrieval").samples(counter, 1024, 1, seed=0, depths=[0.3])[0]
    key = re.search(r'Key: "([^"]+)"', kv.question).group(1)
    assert json.loads(kv.context.split("JSON data:\n", 1)[1])[key] == kv.answer
    assert kv.question.endswith("The value associated with the specified key is: ")
    for s in get_task("ib_math_find").samples(counter, 1024, 7, seed=0):
        numbers = ast.literal_eval(s.context.split("\n\n", 1)[1])
        distinct = sorted(set(numbers))
        ordered = sorted(numbers)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else (ordered[mid] + ordered[mid - 1]) / 2
        expected = {
            "largest number": distinct[-1],
            "second largest number": distinct[-2],
            "third largest number": distinct[-3],
            "smallest number": distinct[0],
            "second smallest number": distinct[1],
            "third smallest number": distinct[2],
            "median": median,
        }[s.meta["subtask"]]
        assert s.answer == expected and s.meta["subtask"].split()[0] in s.question


def test_passage_count_counts_distinct_paragraphs(counter) -> None:
    for s in get_task("passage_count").samples(counter, 2048, 2, seed=9):
        paragraphs = re.findall(r"^Paragraph \d+: (.*)$", s.context, flags=re.M)
        assert len(set(paragraphs)) == s.answer < len(paragraphs)


def test_charbench_questions_and_features(counter, tokenizer) -> None:
    buckets = word_buckets()
    assert all(len(buckets[n]) >= 300 for n in range(MIN_WORD, MAX_WORD + 1))
    for kind in ("count", "unique", "first_index", "last_index"):
        samples = get_task(f"charbench_{kind}").samples(counter, 4096, 7, seed=0)
        assert sorted(len(s.meta["word"]) for s in samples) == list(range(MIN_WORD, MAX_WORD + 1))
        for s in samples:
            word, char = s.meta["word"], s.meta["character"]
            expected = {
                "count": word.count(char or ""),
                "unique": len(set(word)),
                "first_index": word.find(char or ""),
                "last_index": word.rfind(char or ""),
            }[kind]
            assert s.answer == expected and f"'{word}'" in s.question
            assert s.context.startswith("Answer this question only with the final number")
    features = word_features(tokenizer, "Elizabeth", 5)
    ids = tokenizer("Elizabeth", add_special_tokens=False)["input_ids"]
    assert features["n_tokens"] == len(ids) and "".join(features["tokens"]) == "Elizabeth"
    start = 0
    for piece in features["tokens"]:
        if start <= 5 < start + len(piece):
            assert features["target_token_length"] == len(piece)
        start += len(piece)
    assert word_features(tokenizer, "Elizabeth", None).get("target_token_length") is None


def test_fit_units_finds_the_largest_fitting_count() -> None:
    from tokensift.bench.tasks.base import fit_units

    calls = []

    def count(text: str, prefix: str = "") -> int:
        calls.append(text)
        return len(text.split()) + len(prefix.split())

    # Units of uneven size (1 to 3 words), so the linear estimate is off and the search must correct it.
    sizes = [1 + (i * 7) % 3 for i in range(5000)]

    def render(n: int) -> str:
        return "intro words " + " ".join("w" * 2 for s in sizes[:n] for _ in range(s))

    for target in (5, 50, 777, 4096):
        calls.clear()
        n = fit_units(count, render, target, len(sizes), answer_prefix="a b")
        assert count(render(n), "a b") <= target < count(render(n + 1), "a b")
        assert len(calls) <= 2 * 14  # far fewer than one tokenization per unit
    with pytest.raises(tokensift.TokensiftError, match="shorter than the task's fixed text"):
        fit_units(count, render, 3, 10, answer_prefix="a b c d")
