"""InfiniteBench's synthetic retrieval and math tasks: passkey, number_string, kv_retrieval, math_find.

Based on Zhang et al., "∞Bench: Extending Long Context Evaluation Beyond 100K Tokens" (ACL 2024),
OpenBMB/InfiniteBench: generators from `data/construct_synthetic_dataset.py` (noise line, needle lines,
5-digit keys that may start with 0, the 10-digit number string made by doubling 5 random digits, UUID
JSON key-value records, 7 math_find sub-tasks over lists of ints in [0, 99] with the upstream range
skew), prompts from `src/prompt.py` (the chat-model templates) and scorers from `src/compute_scores.py`
(`first_int_match`, the kv word split, math_find's first `\\d+\\.\\d+|\\d+`). max_new_tokens are
upstream's `src/eval_utils.py` values (6, 12, 50, 3).

Differences: lengths are set in prompt tokens (upstream fixes line counts for 8k..256k); the needle
depth, or the kv answer's position, is the bench's depth; passkey and number_string get the answer
prefix of upstream's base-model templates ("The pass key is"), after the chat template; math_find
cycles through its sub-tasks by sample index and its question also precedes the list (upstream order),
so `meta.query_in_context` is true for it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import ClassVar

from tokensift.bench.corpora import random_uuid
from tokensift.bench.tasks.base import Sample, Task, TokenCounter, fit_units, split_prompt

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


def first_int_match(prediction: str) -> str:
    """InfiniteBench: the first maximal run of digits, as a string ('' when there is none)."""
    return next((item for item in re.split("[^0-9]", prediction) if item), "")


def kv_words(prediction: str) -> list[str]:
    """InfiniteBench's kv_retrieval split: punctuation to spaces, then whitespace words."""
    for c in ["\n", ":", '"', "'", ".", ",", "?", "!", "{", "}"]:
        prediction = prediction.replace(c, " ")
    return prediction.split()


def math_find_correct(prediction: str, label: int | float) -> bool:
    """InfiniteBench math_find: the first int or float in the reply equals the label."""
    match = re.search(r"\d+\.\d+|\d+", prediction)
    if match is None:
        return False
    if isinstance(label, int):  # upstream's int("12.5") raises: a float reply to an int label is wrong
        return "." not in match.group(0) and int(match.group(0)) == label
    return float(match.group(0)) == label


class NoiseRetrieval(Task):
    """Shared generator of InfiniteBench passkey and number_string: noise lines around one needle line."""

    intro: ClassVar[str]
    needle: ClassVar[str]
    question: ClassVar[str]
    prefix: ClassVar[str]
    new_tokens: ClassVar[int]
    uses_depth = True

    def key(self, rng: random.Random) -> str:
        return "".join(str(rng.randint(0, 9)) for _ in range(5))

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        key = self.key(rng)
        depth = rng.random() if depth is None else depth
        needle = self.needle.format(key=key)

        def render(lines: int) -> str:
            j = round(depth * lines)
            context = NOISE * j + needle + NOISE * (lines - j)
            return f"{self.intro}\n\n{context}\n\n{self.question}"

        lines = fit_units(count_tokens, render, length, length, self.prefix)
        prompt = render(lines)
        context, question = split_prompt(prompt, self.question)
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=prompt,
            answer=key,
            max_new_tokens=self.new_tokens,
            answer_prefix=self.prefix,
            depth=depth,
            context=context,
            question=question,
            meta={"units": lines},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return float(first_int_match(prediction) == sample.answer)


class IbPasskey(NoiseRetrieval):
    name = "ib_passkey"
    description = "InfiniteBench Retrieve.PassKey: a 5-digit key among noise lines"
    source = "InfiniteBench passkey (synthetic, as published)"
    intro = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there."
    )
    needle = "The pass key is {key}. Remember it. {key} is the pass key.\n"
    question = "What is the pass key?"
    prefix = "The pass key is"
    new_tokens = 6


class IbNumberString(NoiseRetrieval):
    name = "ib_number_string"
    description = "InfiniteBench Retrieve.Number: a 10-digit string with repeated digits among noise lines"
    source = "InfiniteBench number_string (synthetic, as published)"
    intro = (
        "There is an important info hidden inside a lot of irrelevant text. Find it. "
        "I will quiz you about the important information there."
    )
    needle = "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n"
    question = "What is the sequence of digits?"
    prefix = "The sequence of digits is"
    new_tokens = 12

    def key(self, rng: random.Random) -> str:
        digits = [str(rng.randint(0, 9)) for _ in range(5)]
        for k in range(5):  # upstream: duplicate a random digit in place, five times
            pos = rng.randint(0, 5 + k - 1)
            digits.insert(pos, digits[pos])
        return "".join(digits)


class IbKvRetrieval(Task):
    """InfiniteBench Retrieve.KV: the value of one UUID key in a JSON object of UUID pairs."""

    name = "ib_kv_retrieval"
    description = "InfiniteBench Retrieve.KV: one UUID key's value in a large JSON object"
    source = "InfiniteBench kv_retrieval (synthetic, as published)"
    uses_depth = True
    intro = "Extract the value corresponding to the specified key in the JSON object below."

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        depth = rng.random() if depth is None else depth
        records = [(random_uuid(rng), random_uuid(rng)) for _ in range(length)]  # uuid4, as upstream
        key, value = records[0]  # the answer pair; placed at the depth below

        def render(pairs: int) -> str:
            # pairs = distractors; the answer pair sits at index round(depth * pairs).
            kept = records[1 : pairs + 1]
            kept.insert(round(depth * pairs), (key, value))
            text = "JSON data:\n{" + ", ".join(f'"{k}": "{v}"' for k, v in kept) + "}"
            return f"{self.intro}\n\n{text}\n\n{question}"

        question = f'\nKey: "{key}"\nThe value associated with the specified key is: '
        pairs = fit_units(count_tokens, render, length, length - 1)
        prompt = render(pairs)
        context, question_text = split_prompt(prompt, question.lstrip("\n"))
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=prompt,
            answer=value,
            max_new_tokens=50,
            depth=depth,
            context=context,
            question=question_text,
            meta={"units": pairs + 1},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return float(sample.answer in kv_words(prediction))


MATH_TASKS: tuple[tuple[str, Callable[[list[int]], int | float]], ...] = (
    ("largest number", lambda xs: max(xs)),
    ("second largest number", lambda xs: sorted(set(xs))[-2]),
    ("third largest number", lambda xs: sorted(set(xs))[-3]),
    ("smallest number", lambda xs: min(xs)),
    ("second smallest number", lambda xs: sorted(set(xs))[1]),
    ("third smallest number", lambda xs: sorted(set(xs))[2]),
    ("median", lambda xs: _median(xs)),
)


def _median(xs: list[int]) -> int | float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid] + s[mid - 1]) / 2


class IbMathFind(Task):
    """InfiniteBench Math.Find: the largest/smallest/2nd/3rd/median of a long list of ints in [0, 99]."""

    name = "ib_math_find"
    description = "InfiniteBench Math.Find: an order statistic of a long list of small integers"
    source = "InfiniteBench math_find (synthetic, as published)"

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        task, label_of = MATH_TASKS[index % len(MATH_TASKS)]
        low, high = 0, 99
        # Upstream skews the range per task so the extreme values are rare.
        if "largest" in task or (task == "median" and rng.random() <= 0.5):
            high = rng.randint(int(99 * 0.8), 99)
        else:
            low = rng.randint(0, int(99 * 0.2))
        numbers = [rng.randint(low, high) for _ in range(length)]
        subject = "median number" if task == "median" else task
        question = f"You should answer with only one number, no other words. The {subject} of the list is: "
        intro = f"What is the {subject} in the following list?"  # upstream derives it from the question

        def render(count: int) -> str:
            return f"{intro}\n\n{numbers[:count]}\n\n{question}"

        count = fit_units(count_tokens, render, length, length)
        while len(set(numbers[:count])) < 3:  # a 2nd/3rd value must exist (tiny lists only)
            count += 1
        prompt = render(count)
        context, question_text = split_prompt(prompt, question)
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=prompt,
            answer=label_of(numbers[:count]),
            max_new_tokens=3,
            context=context,
            question=question_text,
            meta={"units": count, "subtask": task, "query_in_context": True},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return float(math_find_correct(prediction, sample.answer))
