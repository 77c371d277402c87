"""The task interface: a seeded sample generator, a scorer and a one-line description."""

from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tokensift.errors import TokensiftError

if TYPE_CHECKING:
    from tokensift.models import Model
    from tokensift.runtime.plan import Plan

# Prompt tokens as the model will see them: (user message, answer prefix) -> count.
TokenCounter = Callable[[str, str], int]


@dataclass
class Sample:
    """One generated test item. `prompt` is the whole user message; `length` the target token count."""

    task: str
    length: int
    index: int
    seed: int
    prompt: str
    answer: Any
    max_new_tokens: int
    answer_prefix: str = ""
    depth: float | None = None
    context: str = ""  # the part a query-agnostic protocol may compress
    question: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_rng(task: str, length: int, depth: float | None, index: int, seed: int) -> random.Random:
    """Independent, reproducible randomness per sample (string seeds hash deterministically)."""
    return random.Random(f"{task}|{length}|{depth}|{index}|{seed}")


class Task(ABC):
    """A task family. Subclasses set `name`, `description` and implement `build` and `score`."""

    name: ClassVar[str]
    description: ClassVar[str]
    metric: ClassVar[str] = "accuracy"  # "accuracy" in [0, 1] (higher is better) or "perplexity"
    uses_depth: ClassVar[bool] = False

    def samples(
        self,
        count_tokens: TokenCounter,
        length: int,
        n: int,
        seed: int = 0,
        depths: Sequence[float] | None = None,
    ) -> list[Sample]:
        """n samples per depth (or n in all for depth-free tasks) of about `length` prompt tokens."""
        if length < 64:
            raise TokensiftError(f"{self.name}: length {length} is too short (at least 64 tokens)")
        grid = list(depths) if (self.uses_depth and depths) else [None]
        out = []
        for depth in grid:
            for index in range(n):
                rng = sample_rng(self.name, length, depth, index, seed)
                out.append(self.build(count_tokens, length, rng, depth, index, seed))
        return out

    @abstractmethod
    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample: ...

    @abstractmethod
    def score(self, sample: Sample, prediction: str) -> float: ...

    def evaluate(self, model: Model, plan: Plan, sample: Sample) -> dict[str, Any]:
        """Run one sample under a plan: generate and score by default. Returns the result row fields."""
        from tokensift.runtime.generate import generate

        result = generate(
            model,
            sample.prompt,
            plan,
            max_new_tokens=sample.max_new_tokens,
            answer_prefix=sample.answer_prefix,
        )
        return {
            "prediction": result.text,
            "score": self.score(sample, result.text),
            **result.stats.to_dict(),
        }


def fit_units(
    count_tokens: TokenCounter, render: Callable[[int], str], target: int, most: int, answer_prefix: str = ""
) -> int:
    """The largest unit count (sentences, lines, words) whose rendering fits in `target` tokens.

    Binary search, as RULER does, over the number of haystack units.
    """
    lo, hi = 0, most
    if count_tokens(render(0), answer_prefix) > target:
        raise TokensiftError(f"target length {target} is shorter than the task's fixed text")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(render(mid), answer_prefix) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def first_int(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's metric for one sample: the fraction of references found (case-insensitive substring)."""
    low = prediction.lower()
    return sum(r.lower() in low for r in references) / len(references)
