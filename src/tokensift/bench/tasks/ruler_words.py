"""RULER's aggregation tasks: common-words extraction (cwe) and frequent-words extraction (fwe).

Based on Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?"
(COLM 2024), NVIDIA/RULER `scripts/data/synthetic/common_words_extraction.py` and
`freq_words_extraction.py` with synthetic.yaml's `cwe` (freq_cw=30, freq_ucw=3, num_cw=10, one
few-shot example) and `fwe` (alpha=2.0, 6-letter coded words, vocabulary max_seq_length // 50).
Templates, answer prefixes and `string_match_all` scoring are RULER's.

Differences: `length` counts prompt tokens as the model sees them (chat template and answer prefix
included); fwe finds its word count by binary search (RULER steps by max_len // 32, too coarse to land
within 2% of the length); cwe never needs RULER's 8.5 MB english_words.json (a Git LFS file) because
the wonderwords pool suffices up to about 64k tokens, and a longer list is refused; max_new_tokens: cwe
80 (RULER 120), fwe 50 (RULER's): the words come first after the answer prefix (CPU concession).
"""

from __future__ import annotations

import random
import string
from functools import cache

from tokensift.bench.corpora import wonderwords
from tokensift.bench.tasks.base import (
    Sample,
    Task,
    TokenCounter,
    fit_units,
    ruler_postprocess,
    split_prompt,
    string_match_all,
)
from tokensift.errors import TokensiftError

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
    "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


@cache
def cwe_pool() -> tuple[str, ...]:
    """RULER's cwe word pool: wonderwords nouns + adjectives + verbs, sorted and deduplicated."""
    return tuple(sorted({*wonderwords("noun"), *wonderwords("adjective"), *wonderwords("verb")}))


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


class CommonWords(Task):
    """RULER cwe: the 10 words repeated most often in a long numbered word list."""

    name = "cwe"
    description = "RULER common-words extraction: the 10 most frequent words of a numbered list"
    source = "RULER cwe (synthetic, as published)"
    num_cw = 10

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        # RULER: short prompts (< 4096) use a lighter example (20 words, 3x / 1x) and main list (6x / 1x).
        small = length < 4096
        shot_words, shot_cw, shot_ucw = (20, 3, 1) if small else (40, 10, 3)
        freq_cw, freq_ucw = (6, 1) if small else (30, 3)
        pool = cwe_pool()

        def example(words: list[str], cw: int, ucw: int) -> tuple[str, list[str]]:
            common, uncommon = words[: self.num_cw], words[self.num_cw :]
            listed = common * cw + uncommon * ucw
            random.Random(rng.random()).shuffle(listed)
            return numbered(listed), common

        shot_context, shot_answer = example(rng.sample(pool, shot_words), shot_cw, shot_ucw)
        shot = CWE_TEMPLATE.format(context=shot_context) + CWE_PREFIX + " " + numbered(shot_answer)
        # Draw the words and their shuffle once; a longer list appends uncommon words (units).
        words = rng.sample(pool, len(pool))
        shuffle_seed = rng.random()

        def render(units: int) -> str:
            listed = words[: self.num_cw] * freq_cw + words[self.num_cw : self.num_cw + units] * freq_ucw
            random.Random(shuffle_seed).shuffle(listed)
            return shot + "\n" + CWE_TEMPLATE.format(context=numbered(listed))

        most = len(pool) - self.num_cw
        units = fit_units(count_tokens, render, length, most, CWE_PREFIX)
        if units == most:
            raise TokensiftError(f"cwe: {length} tokens need more distinct words than wonderwords has")
        prompt = render(units)
        context, question = split_prompt(prompt, prompt[prompt.rindex("\n") + 1 :])
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=prompt,
            answer=words[: self.num_cw],
            max_new_tokens=80,
            answer_prefix=CWE_PREFIX,
            context=context,
            question=question,
            meta={"units": units, "freq_cw": freq_cw, "freq_ucw": freq_ucw},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return string_match_all(ruler_postprocess(prediction), sample.answer)


def zeta(alpha: float) -> float:
    """Riemann zeta for alpha > 1 (scipy.special.zeta in RULER): a partial sum plus the Euler-Maclaurin
    tail, accurate to ~1e-12 for alpha >= 1.5."""
    n = 1000
    head = sum(k**-alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12


class FrequentWords(Task):
    """RULER fwe: the 3 most frequent coded words in Zipf-distributed text (the top one is noise)."""

    name = "fwe"
    description = "RULER frequent-words extraction: the 3 most frequent coded words (Zipf, alpha 2)"
    source = "RULER fwe (synthetic, as published)"
    alpha = 2.0
    word_length = 6

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        vocab_size = max(10, length // 50)
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=self.word_length)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."  # RULER: the top-ranked word is noise, and the question says to ignore it
        z = zeta(self.alpha)
        shuffle_seed = rng.random()

        def render(num_words: int) -> str:
            counts = [int(num_words * k**-self.alpha / z) for k in range(1, len(ranked) + 1)]
            text = [w for w, c in zip(ranked, counts, strict=True) for _ in range(c)]
            random.Random(shuffle_seed).shuffle(text)
            return FWE_TEMPLATE.format(context=" ".join(text))

        units = fit_units(count_tokens, render, length, 4 * length, FWE_PREFIX)
        prompt = render(units)
        context, question = split_prompt(prompt, prompt[prompt.rindex("\n") + 1 :])
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=prompt,
            answer=ranked[1:4],
            max_new_tokens=50,
            answer_prefix=FWE_PREFIX,
            context=context,
            question=question,
            meta={"units": units, "vocab_size": vocab_size},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return string_match_all(ruler_postprocess(prediction), sample.answer)
