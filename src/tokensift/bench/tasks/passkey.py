"""Passkey retrieval: a 5-digit key hidden at a chosen depth in filler text."""

from __future__ import annotations

import random
from typing import ClassVar, Literal

from tokensift.bench.tasks.base import Sample, Task, TokenCounter, first_int, fit_units

DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
QUESTION = "What is the pass key? Answer with the 5-digit number only."
CLASSIC = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# Plain, varied sentences: the endlessly repeated classic filler confuses small models (models.md:
# SmolLM2-135M answers "The pass key is a special type of pass" on it), varied filler does not.
VARIED = (
    "The river flows past the old mill.",
    "A dog sleeps on the porch.",
    "Children play in the park after school.",
    "The baker opens his shop at dawn.",
    "Rain fell softly on the roof.",
    "The train leaves the station at noon.",
    "Leaves turn red and gold in autumn.",
    "A cat watches birds from the window.",
    "The market is busy on Saturday.",
    "Waves crash against the rocky shore.",
    "The library closes at eight.",
    "Snow covers the mountain peaks.",
    "The farmer feeds his chickens every morning.",
    "A small boat drifts across the lake.",
    "The clock in the hall strikes nine.",
    "Fresh bread cools on the kitchen table.",
)


class Passkey(Task):
    """Landmark/LongLoRA passkey retrieval with a depth sweep; scored by the first integer in the answer.

    filler="varied" (default) draws plain sentences in seeded random order; filler="classic" repeats
    the LongLoRA garbage line. The question follows the haystack.
    """

    name = "passkey"
    description = "find a 5-digit pass key hidden at a given depth in filler text"
    uses_depth: ClassVar[bool] = True
    source = "Landmark Attention / LongLoRA passkey (synthetic; varied filler unless filler=classic)"

    def __init__(self, filler: Literal["varied", "classic"] = "varied"):
        self.filler = filler

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        key = rng.randint(10000, 99999)
        depth = rng.random() if depth is None else depth
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        pool = [CLASSIC] if self.filler == "classic" else list(VARIED)
        filler: list[str] = []
        while len(filler) < length:  # a unit is at least one token, so this many always suffice
            filler += rng.sample(pool, len(pool))

        def render(units: int) -> str:
            hay = filler[:units]
            hay = [*hay[: round(depth * units)], needle, *hay[round(depth * units) :]]
            return f"{DESCRIPTION}\n\n{' '.join(hay)}\n\n{QUESTION}"

        units = fit_units(count_tokens, render, length, len(filler))
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=render(units),
            answer=str(key),
            max_new_tokens=12,
            depth=depth,
            context=render(units).removesuffix(QUESTION).rstrip(),
            question=QUESTION,
            meta={"filler": self.filler, "units": units},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return float(first_int(prediction) == int(sample.answer))
