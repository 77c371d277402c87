"""RULER variable tracking (vt): follow a chain of variable assignments hidden in noise.

Based on Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?"
(COLM 2024), NVIDIA/RULER `scripts/data/synthetic/variable_tracking.py` with synthetic.yaml's `vt`
(noise haystack, 1 chain, 4 hops): a 5-digit value is assigned to a variable of 5 random capital
letters, and each hop assigns the previous variable to a new one; the answer is every variable of the
chain. As in RULER, a one-shot example (3-letter variables, built at 500 tokens with value 12345, then
re-randomised) precedes the task, and the score is `string_match_all`.

Differences: `length` counts prompt tokens as the model sees them (chat template and answer prefix
included), where RULER counts input plus tokens_to_generate; max_new_tokens is RULER's 30.
"""

from __future__ import annotations

import random
import string

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
TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)
HOPS = 4


def _variables(rng: random.Random, count: int, letters: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in out:
            out.append(name)
    return out


def _chain(names: list[str], value: int) -> list[str]:
    # RULER's lines, trailing space after the hop lines included.
    return [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(HOPS)]


def _context(chain: list[str], fractions: list[float], noises: int) -> str:
    lines = [NOISE] * noises
    positions = sorted(min(noises, int(f * (noises + 1))) for f in fractions)
    for j, (at, line) in enumerate(zip(positions, chain, strict=True)):
        lines.insert(at + j, line)
    return "\n".join(lines).replace(". \n", ".\n")


class VariableTracking(Task):
    """RULER vt: name all 5 variables that end up holding a given 5-digit value (noise haystack)."""

    name = "vt"
    description = "RULER variable tracking: all variables a 4-hop assignment chain gives one value"
    source = "RULER vt (synthetic, as published; one-shot example as in RULER)"

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        # One-shot example: RULER builds it once at 500 tokens with value 12345 and 3-letter variables,
        # answers it, and re-randomises its names and value for every sample.
        icl_names = _variables(rng, HOPS + 1, 3)
        icl_value = rng.randint(10000, 99999)
        icl_chain = _chain(icl_names, icl_value)
        icl_fractions = [rng.random() for _ in icl_chain]
        icl_prefix = ANSWER_PREFIX.format(num_v=HOPS + 1, query=icl_value)

        def icl(noises: int) -> str:
            body = TEMPLATE.format(context=_context(icl_chain, icl_fractions, noises), query=icl_value)
            return body + icl_prefix + " " + " ".join(icl_names) + "\n"

        icl_noises = fit_units(count_tokens, lambda n: icl(n), 500, 500)
        example = icl(icl_noises)

        names = _variables(rng, HOPS + 1, 5)
        value = rng.randint(10000, 99999)
        chain = _chain(names, value)
        fractions = [rng.random() for _ in chain]
        prefix = ANSWER_PREFIX.format(num_v=HOPS + 1, query=value)

        def render(noises: int) -> str:
            return example + "\n" + TEMPLATE.format(context=_context(chain, fractions, noises), query=value)

        noises = fit_units(count_tokens, render, length, length, prefix)
        prompt = render(noises)
        context, question = split_prompt(prompt, prompt[prompt.rindex("\n") + 1 :])
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=prompt,
            answer=names,
            max_new_tokens=30,
            answer_prefix=prefix,
            context=context,
            question=question,
            meta={"value": value, "units": noises, "icl_noises": icl_noises},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return string_match_all(ruler_postprocess(prediction), sample.answer)
