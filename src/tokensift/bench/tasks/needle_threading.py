"""Needle Threading: retrieve values, and follow threads of values, through a JSON haystack of UUID pairs.

Based on Roberts, Han and Albanie, "Needle Threading: Can LLMs Follow Threads through Near-Million-Scale
Haystacks?" (ICLR 2025), repository jonathan-roberts1/needle-threading. The published data is a hub
download, so the five tasks are regenerated: a haystack `{"<uuid>": "<uuid>", ...}` of random 128-bit
UUID pairs (no version bits, as in the published rows), the prompt `haystack + "\\n" + question`, and
exact-match scoring (the response, parsed with `ast.literal_eval` when it is a literal, must start with
the expected value; lists score the fraction of expected values present).

- single: one key's value, the pair at the requested depth (the repository's question, verbatim);
- multiple: the values of `needles` keys, clustered at the depth (`placement=depthwise`) or scattered;
- conditional: the values of every key containing `char`, a character no other key has;
- threading: a value that is itself a key, followed `hops` times, `direction` forward (each next pair
  later in the haystack), backward or random; the answer is the thread's last value;
- multithreading: `threads` independent threads at once; the answer is each thread's last value.

`unit=chars` sets the length in haystack characters, the paper's model-agnostic unit (token counts of
UUID text differ greatly between tokenizers); by default the length counts prompt tokens like every
other task. Both counts are recorded in each sample's meta. The questions other than single-needle's
are our wording: the paper's prompts for them are not in the repository. max_new_tokens is 16 + 40 per
expected UUID, not the paper's 100 (CPU concession; a UUID is about 25 SmolLM2 tokens).
"""

from __future__ import annotations

import ast
import itertools
import json
import random
from typing import Any, ClassVar, Literal

from tokensift.bench.corpora import random_uuid
from tokensift.bench.tasks.base import Sample, Task, TokenCounter, fit_units, split_prompt
from tokensift.errors import TokensiftError

Kind = Literal["single", "multiple", "conditional", "threading", "multithreading"]
QUESTIONS: dict[str, str] = {
    "single": 'Extract the value corresponding to the specified key in the JSON object. Key: "{key}"\n'
    " Corresponding value: ",
    "multiple": "Extract the values corresponding to the specified keys in the JSON object. Return them as "
    "a Python list of strings in the order of the keys. Keys: {keys}\n Corresponding values: ",
    "conditional": "Extract the values corresponding to every key in the JSON object that contains the "
    'character "{char}". Return them as a Python list of strings.\n Corresponding values: ',
    "threading": "The value of a key in the JSON object may itself be a key in the JSON object. Starting "
    "from the specified key, look up its value, use that value as the next key, and repeat until the "
    'value is not a key in the object. Return that final value. Key: "{key}"\n Final value: ',
    "multithreading": "The value of a key in the JSON object may itself be a key in the JSON object. For "
    "each specified key, look up its value, use that value as the next key, and repeat until the value is "
    "not a key in the object. Return the final values as a Python list of strings in the order of the "
    "keys. Keys: {keys}\n Final values: ",
}
CONDITION_CHARS = "*&@#"


def parse_response(prediction: str) -> Any:
    """The repository parses responses with `ast.literal_eval`; a bare value is kept as stripped text."""
    text = prediction.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text.strip("\"'")


def exact_prefix_match(prediction: str, answer: str) -> float:
    """The repository's check: `str(response)[: len(answer)] == answer`."""
    return float(str(parse_response(prediction))[: len(answer)] == answer)


class NeedleThreading(Task):
    """One of the five Needle Threading tasks over a seeded UUID key-value haystack."""

    kind: ClassVar[Kind]
    source = "Needle Threading (regenerated: the published data is a hub download)"

    def __init__(
        self,
        unit: Literal["tokens", "chars"] = "tokens",
        needles: int = 4,
        placement: Literal["depthwise", "random"] = "depthwise",
        char: str = "*",
        hops: int = 3,
        direction: Literal["forward", "backward", "random"] = "forward",
        threads: int = 3,
    ):
        if unit not in ("tokens", "chars"):
            raise TokensiftError(f"{self.name}: unit must be tokens or chars, got {unit!r}")
        if placement not in ("depthwise", "random"):
            raise TokensiftError(f"{self.name}: placement must be depthwise or random, got {placement!r}")
        if direction not in ("forward", "backward", "random"):
            raise TokensiftError(f"{self.name}: direction must be forward, backward or random")
        if char not in CONDITION_CHARS:
            raise TokensiftError(f"{self.name}: char must be one of {CONDITION_CHARS!r}, got {char!r}")
        if min(needles, hops, threads) < 1:
            raise TokensiftError(f"{self.name}: needles, hops and threads must be >= 1")
        self.unit, self.needles, self.placement, self.char = unit, needles, placement, char
        self.hops, self.direction, self.threads = hops, direction, threads

    def _needle_pairs(
        self, rng: random.Random, depth: float | None
    ) -> tuple[list[tuple[str, str]], list[float], str, Any]:
        """(needle pairs, their depth fractions, question, answer)."""
        fresh = lambda: random_uuid(rng, None)  # noqa: E731
        at = rng.random() if depth is None else depth
        if self.kind == "single":
            key, value = fresh(), fresh()
            return [(key, value)], [at], QUESTIONS["single"].format(key=key), value
        if self.kind in ("multiple", "conditional"):
            pairs = [(fresh(), fresh()) for _ in range(self.needles)]
            if self.kind == "conditional":
                pairs = [(self._mark(rng, k), v) for k, v in pairs]
            # depthwise: adjacent pairs, in order, at one depth; random: scattered.
            depthwise = self.placement == "depthwise"
            fractions = [at] * len(pairs) if depthwise else [rng.random() for _ in pairs]
            if self.kind == "multiple":
                question = QUESTIONS["multiple"].format(keys=json.dumps([k for k, _ in pairs]))
            else:
                question = QUESTIONS["conditional"].format(char=self.char)
            return pairs, fractions, question, [v for _, v in pairs]
        pairs, fractions, starts, ends = [], [], [], []
        for _ in range(1 if self.kind == "threading" else self.threads):
            chain = [fresh() for _ in range(self.hops + 1)]
            spots = sorted(rng.random() for _ in range(self.hops))
            if self.direction == "backward":
                spots.reverse()
            elif self.direction == "random":
                rng.shuffle(spots)
            pairs += list(itertools.pairwise(chain))
            fractions += spots
            starts.append(chain[0])
            ends.append(chain[-1])
        if self.kind == "threading":
            return pairs, fractions, QUESTIONS["threading"].format(key=starts[0]), ends[0]
        return pairs, fractions, QUESTIONS["multithreading"].format(keys=json.dumps(starts)), ends

    def _mark(self, rng: random.Random, key: str) -> str:
        spot = rng.choice([i for i, ch in enumerate(key) if ch != "-"])
        return key[:spot] + self.char + key[spot + 1 :]

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        needles, fractions, question, answer = self._needle_pairs(rng, depth if self.uses_depth else None)
        # Distractors: more than any length can hold (a pair is >= 80 characters and >= 1 token).
        most = length // 80 + 2 if self.unit == "chars" else length
        distractors = [(random_uuid(rng, None), random_uuid(rng, None)) for _ in range(most)]
        order = sorted(range(len(needles)), key=lambda i: fractions[i])  # stable: clusters keep order

        def haystack(units: int) -> str:
            pairs = distractors[:units]
            for shift, i in enumerate(order):
                pairs.insert(round(fractions[i] * units) + shift, needles[i])
            return json.dumps(dict(pairs))

        def render(units: int) -> str:
            return haystack(units) + "\n" + question

        if self.unit == "chars":
            lo, hi = 0, most
            if len(haystack(0)) > length:
                raise TokensiftError(f"{self.name}: {length} characters cannot hold the needles")
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if len(haystack(mid)) <= length else (lo, mid - 1)
            units = lo
        else:
            units = fit_units(count_tokens, render, length, most)
        prompt = render(units)
        context, question = split_prompt(prompt, question)
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=prompt,
            answer=answer,
            max_new_tokens=16 + 40 * (len(answer) if isinstance(answer, list) else 1),
            depth=depth if self.uses_depth else None,
            context=context,
            question=question,
            meta={
                "unit": self.unit,
                "kv_pairs": units + len(needles),
                "haystack_chars": len(context),
                "prompt_chars": len(prompt),
                "prompt_tokens": count_tokens(prompt, ""),
            },
        )

    def score(self, sample: Sample, prediction: str) -> float:
        if isinstance(sample.answer, str):
            return exact_prefix_match(prediction, sample.answer)
        return sum(value in prediction for value in sample.answer) / len(sample.answer)

    def evaluate(self, model: Any, plan: Any, sample: Sample, *args: Any, **kwargs: Any) -> dict[str, Any]:
        result = super().evaluate(model, plan, sample, *args, **kwargs)
        result["all_correct"] = result["score"] == 1.0  # the paper reports lists both ways
        return result


class NtSingle(NeedleThreading):
    name = "nt_single"
    description = "Needle Threading single needle: one UUID key's value at a given depth"
    kind = "single"
    uses_depth = True


class NtMultiple(NeedleThreading):
    name = "nt_multiple"
    description = "Needle Threading multiple needles: the values of several keys at once"
    kind = "multiple"
    uses_depth = True


class NtConditional(NeedleThreading):
    name = "nt_conditional"
    description = "Needle Threading conditional needles: values of all keys containing a marker character"
    kind = "conditional"
    uses_depth = True


class NtThreading(NeedleThreading):
    name = "nt_threading"
    description = "Needle Threading threading: follow a value-is-next-key thread to its end"
    kind = "threading"


class NtMultithreading(NeedleThreading):
    name = "nt_multithreading"
    description = "Needle Threading multi-threading: follow several threads at once"
    kind = "multithreading"


NEEDLE_THREADING: tuple[type[NeedleThreading], ...] = (
    NtSingle,
    NtMultiple,
    NtConditional,
    NtThreading,
    NtMultithreading,
)
