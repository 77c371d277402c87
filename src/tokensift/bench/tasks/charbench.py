"""CharBench: character counting and indexing inside single words, next to how the model tokenises them.

Based on Uzan and Pinter, "CharBench: Evaluating the Role of Tokenization in Character-Level Tasks"
(AAAI 2026), repository omriuz/CharBench: `benchmark/benchmark.py` (the four question templates, words
of 4 to 10 letters matched by `\\b[a-zA-Z]+\\b`, case kept, one bucket per word length, the queried
character drawn from the word), `evaluation/utils.py` (the evaluation prompt, its indentation dropped;
the reply is parsed with `int(reply.strip())`, anything else is wrong) and
`evaluation/tokenize_results.py` (the features).

Difference: the words come from our shipped Austen novels instead of MiniPile (a hub download), so
accuracies are comparable in method, not in number; the system message "You are a helpful assistant
that answers questions." is replaced by the model's own chat template default. The prompts are a few
dozen tokens, so the task ignores the bench's lengths (`length_free`). Each result row records the
word's tokenisation under the evaluated model's tokenizer: number of tokens, characters per token and,
for the index tasks, the length of the token holding the queried position.
"""

from __future__ import annotations

import random
import re
from functools import cache
from typing import Any, ClassVar, Literal

from tokensift.bench.corpora import austen_text
from tokensift.bench.tasks.base import Sample, Task, TokenCounter, split_prompt

MIN_WORD, MAX_WORD = 4, 10
INSTRUCTION = (
    "Answer this question only with the final number, without any other text. Lower case and upper "
    "case letters are considered different characters."
)
TEMPLATES = {
    "count": "How many times does the character '{character}' appear in the string '{word}'?",
    "unique": "How many unique characters appear in the string '{word}'?",
    "first_index": "What is the index of the first occurrence of the character '{character}' in the string "
    "'{word}'?\nStart counting from 0.",
    "last_index": "What is the index of the last occurrence of the character '{character}' in the string "
    "'{word}'?\nStart counting from 0.",
}
Kind = Literal["count", "unique", "first_index", "last_index"]


@cache
def word_buckets() -> dict[int, tuple[str, ...]]:
    """Distinct words of the Austen novels by length (4..10 letters, case kept), in first-seen order."""
    words = dict.fromkeys(re.findall(r"\b[a-zA-Z]+\b", austen_text()))
    return {n: tuple(w for w in words if len(w) == n) for n in range(MIN_WORD, MAX_WORD + 1)}


def word_features(tokenizer: Any, word: str, position: int | None) -> dict[str, Any]:
    """CharBench's tokenisation features of `word` alone (no special tokens): token count, characters
    per token, and the length of the token covering `position` (index tasks)."""
    enc = tokenizer(word, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(a, b) for a, b in enc["offset_mapping"] if b > a]
    out: dict[str, Any] = {
        "n_tokens": len(enc["input_ids"]),
        "tokens": [word[a:b] for a, b in spans],
        "word_length": len(word),
        "chars_per_token": len(word) / max(1, len(enc["input_ids"])),
    }
    if position is not None:
        out["target_token_length"] = next((b - a for a, b in spans if a <= position < b), None)
    return out


def parse_int(prediction: str) -> int | None:
    """CharBench's parser: the whole stripped reply must be an integer."""
    try:
        return int(prediction.strip())
    except ValueError:
        return None


class CharBench(Task):
    """One CharBench task; sample i asks about a word of length 4 + i mod 7 (the paper's buckets)."""

    kind: ClassVar[Kind]
    length_free = True
    source = "CharBench (words from Austen instead of MiniPile)"

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        word = rng.choice(word_buckets()[MIN_WORD + index % (MAX_WORD - MIN_WORD + 1)])
        character = rng.choice(word)
        answer, position = {
            "count": (word.count(character), None),
            "unique": (len(set(word)), None),
            "first_index": (word.index(character), word.index(character)),
            "last_index": (word.rindex(character), word.rindex(character)),
        }[self.kind]
        question = "Question: " + TEMPLATES[self.kind].format(character=character, word=word)
        prompt = f"{INSTRUCTION}\n\n\n{question}"
        context, question = split_prompt(prompt, question)
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=prompt,
            answer=answer,
            max_new_tokens=8,
            context=context,
            question=question,
            meta={
                "word": word,
                "character": character if self.kind != "unique" else None,
                "position": position,
            },
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return float(parse_int(prediction) == sample.answer)

    def evaluate(self, model: Any, plan: Any, sample: Sample, *args: Any, **kwargs: Any) -> dict[str, Any]:
        result = super().evaluate(model, plan, sample, *args, **kwargs)
        result["features"] = word_features(model.tokenizer, sample.meta["word"], sample.meta["position"])
        return result


class CharCount(CharBench):
    name = "charbench_count"
    description = "CharBench: how often a character occurs in a word"
    kind = "count"


class CharUnique(CharBench):
    name = "charbench_unique"
    description = "CharBench: how many distinct characters a word has"
    kind = "unique"


class CharFirstIndex(CharBench):
    name = "charbench_first_index"
    description = "CharBench: the index of a character's first occurrence in a word"
    kind = "first_index"


class CharLastIndex(CharBench):
    name = "charbench_last_index"
    description = "CharBench: the index of a character's last occurrence in a word"
    kind = "last_index"


CHARBENCH: tuple[type[CharBench], ...] = (CharCount, CharUnique, CharFirstIndex, CharLastIndex)
