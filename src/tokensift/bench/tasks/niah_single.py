"""RULER niah_single_1: a word key with a 7-digit value hidden in the repeated noise haystack."""

from __future__ import annotations

import random
from typing import ClassVar

from tokensift.bench.corpora import word_key
from tokensift.bench.tasks.base import Sample, Task, TokenCounter, fit_units, string_match_all

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SENTENCES = [s if s.endswith(".") else s + "." for s in NOISE.split(". ")]
# RULER's niah template in its single-needle, single-value form.
TEMPLATE = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n{context}\n"
    "What is the special magic number for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic number for {query} mentioned in the provided text is"


class NiahSingle(Task):
    """RULER's niah_single_1: noise haystack, word key, 7-digit number value, string_match_all.

    RULER draws the needle position at random; we place it at the requested depth (random when none
    is given) so the bench can sweep depth x length. RULER generates 128 tokens; the answer comes
    first, so 32 are enough to score it.
    """

    name = "niah_single"
    description = "RULER niah_single_1: recall the 7-digit number stored under a word key in noise"
    uses_depth: ClassVar[bool] = True
    source = "RULER niah_single_1 with one-sentence haystack units (synthetic)"

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        key = word_key(rng)
        value = str(rng.randint(10**6, 10**7 - 1))
        depth = rng.random() if depth is None else depth
        needle = f"One of the special magic numbers for {key} is: {value}."
        prefix = ANSWER_PREFIX.format(query=key)

        def render(units: int) -> str:
            # Units are single sentences so lengths land within 2%; whole lines match RULER's haystack.
            hay = [NOISE] * (units // len(SENTENCES))
            if units % len(SENTENCES):
                hay.append(" ".join(SENTENCES[: units % len(SENTENCES)]))
            at = round(depth * len(hay))
            context = "\n".join([*hay[:at], needle, *hay[at:]])
            return TEMPLATE.format(context=context, query=key)

        units = fit_units(count_tokens, render, length, length, prefix)
        prompt = render(units)
        question = prompt[prompt.rindex("\n") + 1 :]
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=prompt,
            answer=[value],
            max_new_tokens=32,
            answer_prefix=prefix,
            depth=depth,
            context=prompt[: prompt.rindex("\n")],
            question=question,
            meta={"key": key, "units": units},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return string_match_all(prediction, sample.answer)
