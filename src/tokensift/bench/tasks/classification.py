"""Shared shape of the labelled classification tasks: a fixed label set, exact label match, and
disjoint calibration and test splits.

The generators draw their material (names, phrases) from lists split in two by index parity:
the calibration split uses the even items, the test split the odd ones, so no sentence of one split
can occur in the other, and the random streams differ too (the split is part of every sample's seed).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import ClassVar, TypeVar

from tokensift.bench.tasks.base import Sample, Task, TokenCounter
from tokensift.errors import TokensiftError

SPLITS = ("calibration", "test")
T = TypeVar("T")


def first_word(prediction: str) -> str:
    """The first word of a reply, lower-cased, without punctuation or markup."""
    match = re.search(r"[A-Za-z]+", prediction)
    return match.group().lower() if match else ""


class LabelTask(Task):
    """A short classification prompt whose answer is one label out of `labels` (exact label match)."""

    labels: ClassVar[tuple[str, ...]] = ()
    length_free = True
    max_new_tokens: ClassVar[int] = 4

    def __init__(self, split: str = "test"):
        if split not in SPLITS:
            raise TokensiftError(f"{self.name}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.split = split

    def part(self, items: Sequence[T]) -> list[T]:
        """This split's half of a material list (even items for calibration, odd for test)."""
        return list(items[SPLITS.index(self.split) :: 2])

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        rng = random.Random(f"{self.name}|{self.split}|{index}|{seed}")
        label = self.labels[index % len(self.labels)]  # balanced classes
        text = self.text(label, rng)
        question = self.question()
        prompt = f"{self.instruction()}\n\n{text}\n\n{question}"
        return Sample(
            task=self.name,
            length=0,
            index=index,
            seed=seed,
            prompt=prompt,
            answer=label,
            max_new_tokens=self.max_new_tokens,
            context=f"{self.instruction()}\n\n{text}",
            question=question,
            meta={"split": self.split, "labels": list(self.labels)},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return float(first_word(prediction) == sample.answer)

    def instruction(self) -> str:
        raise NotImplementedError

    def question(self) -> str:
        return f"Answer with one word: {', '.join(self.labels[:-1])} or {self.labels[-1]}."

    def text(self, label: str, rng: random.Random) -> str:
        raise NotImplementedError
