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
    from tokensift.runtime.batch import DecodeStep
    from tokensift.runtime.plan import Plan
    from tokensift.runtime.shared_prefill import SharedPrefill

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

    @property
    def separator(self) -> str:
        """The whitespace between `context` and `question` in `prompt` (a query-agnostic protocol
        compresses `context` first, then appends `separator + question`)."""
        return self.prompt[len(self.context) : len(self.prompt) - len(self.question)]


def sample_rng(task: str, length: int, depth: float | None, index: int, seed: int) -> random.Random:
    """Independent, reproducible randomness per sample (string seeds hash deterministically)."""
    return random.Random(f"{task}|{length}|{depth}|{index}|{seed}")


class Task(ABC):
    """A task family. Subclasses set `name`, `description` and implement `build` and `score`.

    Every generated Sample satisfies `prompt == context + <whitespace> + question`: `context` is what
    a query-agnostic protocol may compress before it sees the question, `question` names what to find.
    """

    name: str  # a class default; a parameterised instance gets its full spec, e.g. "nt_single:unit=chars"
    description: ClassVar[str]
    metric: ClassVar[str] = "accuracy"  # "accuracy" in [0, 1] (higher is better) or "perplexity"
    uses_depth: ClassVar[bool] = False
    # Short fixed-size prompts (CharBench): generated once, whatever lengths the bench sweeps.
    length_free: ClassVar[bool] = False
    # Where the task comes from, and what differs from the original (shown in reports).
    source: ClassVar[str] = ""

    def samples(
        self,
        count_tokens: TokenCounter,
        length: int,
        n: int,
        seed: int = 0,
        depths: Sequence[float] | None = None,
    ) -> list[Sample]:
        """n samples per depth (or n in all for depth-free tasks) of about `length` prompt tokens."""
        if self.length_free:
            length = 0
        elif length < 64:
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

    def evaluate(
        self,
        model: Model,
        plan: Plan,
        sample: Sample,
        protocol: str = "query-aware",
        shared: SharedPrefill | None = None,
        prefill_chunk: int | None = None,
        prefill_lookahead: int = 0,
        decode_step: DecodeStep | None = None,
    ) -> dict[str, Any]:
        """Run one sample under a plan: generate and score by default. Returns the result row fields.

        query-aware: the method compresses the whole prompt, question included. query-agnostic: it
        compresses `context` alone; the question is appended afterwards without eviction (kvpress's
        protocol), so a method that needs to see the question shows it here. `decode_step`: a
        batched decode step (`runtime.batch.run_lockstep`), passed to `generate`.
        """
        from tokensift.runtime.generate import generate

        text, question = self.protocol_prompt(sample, protocol)
        result = generate(
            model,
            text,
            plan,
            max_new_tokens=sample.max_new_tokens,
            answer_prefix=sample.answer_prefix,
            question=question,
            shared=shared,
            prefill_chunk=prefill_chunk,
            prefill_lookahead=prefill_lookahead,
            decode_step=decode_step,
        )
        return {
            "prediction": result.text,
            "score": self.score(sample, result.text),
            **result.stats.to_dict(),
        }

    @staticmethod
    def protocol_prompt(sample: Sample, protocol: str) -> tuple[str, str | None]:
        """(prompt, question) to generate with: the question split off for the query-agnostic protocol."""
        if protocol == "query-aware" or not sample.question:
            return sample.prompt, None
        # context + separator ends in whitespace, so the joined message is exactly `sample.prompt`.
        return sample.context + sample.separator, sample.question

    #: Whether `evaluate` is the generate-and-score default (a shared prefill can serve it).
    generative: ClassVar[bool] = True


def fit_units(
    count_tokens: TokenCounter, render: Callable[[int], str], target: int, most: int, answer_prefix: str = ""
) -> int:
    """The largest unit count (sentences, lines, words) whose rendering fits in `target` tokens.

    Binary search over the number of haystack units, as RULER does. Rendering and tokenizing a long
    prompt is the expensive step, so the search starts from a bracket around a linear estimate (two
    probes) instead of [0, most]: about 6 tokenizations instead of 15 for a 4k prompt.
    """

    def fits(n: int) -> bool:
        return count_tokens(render(n), answer_prefix) <= target

    base = count_tokens(render(0), answer_prefix)
    if base > target:
        raise TokensiftError(f"target length {target} is shorter than the task's fixed text")
    if most <= 0:
        return 0
    probe = min(most, 64)
    per_unit = max((count_tokens(render(probe), answer_prefix) - base) / probe, 1e-6)
    guess = min(most, int((target - base) / per_unit))
    lo, hi = 0, most  # invariant: fits(lo); everything above hi does not fit
    step = max(1, guess // 50)
    low_guess, high_guess = max(0, guess - step), min(most, guess + step)
    if fits(low_guess):
        lo = low_guess
        if high_guess > lo:
            if fits(high_guess):
                lo = high_guess
            else:
                hi = high_guess - 1
    else:
        hi = low_guess - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def first_int(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def ruler_postprocess(prediction: str) -> str:
    """RULER's evaluate.py clean-up: strip, control characters to newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's metric for one sample: the fraction of references found (case-insensitive substring)."""
    low = prediction.lower()
    return sum(r.lower() in low for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER's QA metric for one sample: 1 if any reference is found (case-insensitive substring)."""
    low = prediction.lower()
    return float(any(r.lower() in low for r in references))


def split_prompt(prompt: str, question: str) -> tuple[str, str]:
    """(context, question) for a prompt that ends with `question`: the context is everything before it,
    without the separating whitespace, so `prompt == context + separator + question`."""
    if not prompt.endswith(question):
        raise TokensiftError("internal: the prompt does not end with its question")
    return prompt[: len(prompt) - len(question)].rstrip(), question
