"""RULER's eight needle-in-a-haystack tasks: single, multi-key, multi-value and multi-query needles.

Based on Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?"
(COLM 2024), NVIDIA/RULER `scripts/data/synthetic/niah.py`, `constants.py` and `synthetic.yaml`:
the same template, needle sentence, answer prefix, key/value types, haystacks and `string_match_all`.

Differences, all stated in reports:
- essay haystack: Jane Austen's novels (shipped, public domain) instead of Paul Graham's essays
  (copyrighted, a web download): tasks on it are labelled "essay-substitute";
- sentences are split with a regex, not nltk punkt (a download);
- `length` counts prompt tokens as the model sees them (chat template and answer prefix included),
  where RULER counts input plus `tokens_to_generate`;
- the queried needle of single-needle tasks sits at the requested depth (RULER draws it at random), so
  the bench can sweep depth x length; other needles take RULER's random depths;
- max_new_tokens is 16 + 12 per expected number (40 per UUID) instead of 128: the answer prefix makes
  the values come first, so the cut does not change the score (CPU concession).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar, Literal

from tokensift.bench.corpora import essay_slice, random_uuid, split_sentences, word_key
from tokensift.bench.tasks.base import (
    Sample,
    Task,
    TokenCounter,
    fit_units,
    ruler_postprocess,
    split_prompt,
    string_match_all,
)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
# RULER's needle depths for the essay haystack: round(linspace(0, 100, 40)).
DEPTHS = tuple(round(100 * i / 39) for i in range(40))
ANSWER_TOKENS = {"numbers": 12, "words": 12, "uuids": 40}

Kind = Literal["numbers", "words", "uuids"]


@dataclass(frozen=True)
class NiahConfig:
    """One row of RULER's synthetic.yaml for the niah task."""

    haystack: Literal["noise", "essay", "needle"]
    key: Kind
    value: Kind
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


def random_item(rng: random.Random, kind: Kind) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # RULER: a 7-digit number
    if kind == "words":
        return word_key(rng)
    return random_uuid(rng)


def singular(text: str) -> str:
    """RULER's rewrite of the template and prefix when exactly one value is asked for."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


class RulerNiah(Task):
    """A RULER niah task configured by `config` (see the module docstring for the recipe)."""

    config: ClassVar[NiahConfig]
    metric = "accuracy"

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        c = self.config
        num_k = max(c.num_k, c.num_q)
        keys: list[str] = []
        values: list[list[str]] = []
        needles: list[tuple[int, str]] = []  # (key index, sentence)
        while len(keys) < num_k:
            key = random_item(rng, c.key)
            if key in keys:
                continue
            keys.append(key)
            values.append([random_item(rng, c.value) for _ in range(c.num_v)])
            needles += [
                (len(keys) - 1, NEEDLE.format(type_needle_v=c.value, key=key, value=v)) for v in values[-1]
            ]
        rng.shuffle(needles)
        queried = rng.sample(range(num_k), c.num_q)
        answers = [v for i in queried for v in values[i]]
        query_keys = [keys[i] for i in queried]
        query = (
            query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
        )

        template, prefix, type_v = TEMPLATE, ANSWER_PREFIX, c.value
        if c.num_q * c.num_v == 1:
            template, prefix, type_v = singular(template), singular(prefix), c.value[:-1]
        prefix = prefix.format(type_needle_v=type_v, query=query)

        # Where each needle goes, as a fraction of the haystack: fixed before the length search so a
        # longer haystack only stretches the same layout.
        placed = depth if self.uses_depth else None
        if c.haystack == "essay":
            fractions = [d / 100 for d in rng.sample(DEPTHS, len(needles))]
        else:
            fractions = [rng.random() for _ in needles]
        if placed is not None:
            target = next(i for i, (k, _) in enumerate(needles) if k == queried[0])
            fractions[target] = placed
        order = sorted(range(len(needles)), key=lambda i: fractions[i])

        if c.haystack == "essay":
            words = essay_slice(rng, length)
        elif c.haystack == "needle":
            distractors: list[str] = []
            while len(distractors) < length:  # every line is at least one token: this many suffice
                key = random_item(rng, c.key)
                if key not in keys:
                    distractors.append(
                        NEEDLE.format(type_needle_v=c.value, key=key, value=random_item(rng, c.value))
                    )

        def haystack(units: int) -> str:
            if c.haystack == "essay":
                sentences = split_sentences(" ".join(words[:units]))
                parts, last = [], 0
                for i in order:
                    at = int(len(sentences) * fractions[i])
                    parts += [*sentences[last:at], needles[i][1]]
                    last = max(last, at)
                parts += sentences[last:]
                return " ".join(parts)
            lines = [NOISE] * units if c.haystack == "noise" else distractors[:units]
            for shift, i in enumerate(order):
                lines.insert(round(fractions[i] * units) + shift, needles[i][1])
            return "\n".join(lines)

        def render(units: int) -> str:
            return template.format(type_needle_v=type_v, context=haystack(units), query=query)

        units = fit_units(count_tokens, render, length, length, prefix)
        prompt = render(units)
        context, question = split_prompt(prompt, prompt[prompt.rindex("\n") + 1 :])
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=prompt,
            answer=answers,
            max_new_tokens=min(128, 16 + ANSWER_TOKENS[c.value] * len(answers)),
            answer_prefix=prefix,
            depth=placed,
            context=context,
            question=question,
            meta={"keys": query_keys, "units": units, "haystack": c.haystack},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return string_match_all(ruler_postprocess(prediction), sample.answer)


class NiahSingle1(RulerNiah):
    name = "niah_single_1"
    description = "RULER niah_single_1: a word key's 7-digit number in the repeated noise haystack"
    source = "RULER niah_single_1 (synthetic, as published)"
    config = NiahConfig("noise", "words", "numbers")
    uses_depth = True


class NiahSingle2(RulerNiah):
    name = "niah_single_2"
    description = "RULER niah_single_2: a word key's 7-digit number in prose"
    source = "RULER niah_single_2, essay-substitute: Austen prose instead of Paul Graham essays"
    config = NiahConfig("essay", "words", "numbers")
    uses_depth = True


class NiahSingle3(RulerNiah):
    name = "niah_single_3"
    description = "RULER niah_single_3: a word key's UUID in prose"
    source = "RULER niah_single_3, essay-substitute: Austen prose instead of Paul Graham essays"
    config = NiahConfig("essay", "words", "uuids")
    uses_depth = True


class NiahMultikey1(RulerNiah):
    name = "niah_multikey_1"
    description = "RULER niah_multikey_1: one of 4 word-keyed needles in prose"
    source = "RULER niah_multikey_1, essay-substitute: Austen prose instead of Paul Graham essays"
    config = NiahConfig("essay", "words", "numbers", num_k=4)
    uses_depth = True


class NiahMultikey2(RulerNiah):
    name = "niah_multikey_2"
    description = "RULER niah_multikey_2: a word key's number among lines that are all needles"
    source = "RULER niah_multikey_2 (synthetic, as published)"
    config = NiahConfig("needle", "words", "numbers")
    uses_depth = True


class NiahMultikey3(RulerNiah):
    name = "niah_multikey_3"
    description = "RULER niah_multikey_3: a UUID key's UUID among lines that are all UUID needles"
    source = "RULER niah_multikey_3 (synthetic, as published)"
    config = NiahConfig("needle", "uuids", "uuids")
    uses_depth = True


class NiahMultivalue(RulerNiah):
    name = "niah_multivalue"
    description = "RULER niah_multivalue: all 4 numbers stored under one word key in prose"
    source = "RULER niah_multivalue, essay-substitute: Austen prose instead of Paul Graham essays"
    config = NiahConfig("essay", "words", "numbers", num_v=4)


class NiahMultiquery(RulerNiah):
    name = "niah_multiquery"
    description = "RULER niah_multiquery: the numbers of 4 word keys asked at once, in prose"
    source = "RULER niah_multiquery, essay-substitute: Austen prose instead of Paul Graham essays"
    config = NiahConfig("essay", "words", "numbers", num_q=4)


RULER_NIAH: tuple[type[RulerNiah], ...] = (
    NiahSingle1,
    NiahSingle2,
    NiahSingle3,
    NiahMultikey1,
    NiahMultikey2,
    NiahMultikey3,
    NiahMultivalue,
    NiahMultiquery,
)
