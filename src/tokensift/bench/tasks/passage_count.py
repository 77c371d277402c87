"""LongBench-style passage counting: how many distinct paragraphs hide among repeated ones.

Based on Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding"
(ACL 2024), THUDM/LongBench: the PassageCount recipe of `task.md` (sample passages, repeat each a
random number of times, shuffle; the answer is the number of distinct passages), the prompt of
`config/dataset2prompt.json`, max_new_tokens 32 from `dataset2maxlen.json` and `count_score` from
`metrics.py` (the share of the numbers in the reply that equal the answer).

Substitute: the passages are paragraphs of our shipped Austen novels instead of English Wikipedia, and
the prompt says "sourced from novels" where LongBench says "sourced from Wikipedia"; scores are not
comparable with published ones. The sequence is drawn one slot at a time (a repeat of an earlier
passage with probability 1/2, else a new one), so every prefix is itself a shuffled instance and the
length search can cut it anywhere; the last slot is then filled with the passage that fits best.
"""

from __future__ import annotations

import random
import re

from tokensift.bench.corpora import austen_paragraphs
from tokensift.bench.tasks.base import Sample, Task, TokenCounter, fit_units, split_prompt

INTRO = (
    "There are some paragraphs below sourced from novels. Some of them may be duplicates. Please carefully "
    "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. "
    "In other words, how many non-repeating paragraphs are there in total?"
)
QUESTION = (
    "Please enter the final count of unique paragraphs after removing duplicates. The output format should "
    "only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: "
)
MIN_WORDS, MAX_WORDS = 15, 150


def count_score(prediction: str, answer: int) -> float:
    """LongBench's count_score: matching numbers over all numbers found in the reply (0 if none)."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(answer) for n in numbers) / len(numbers) if numbers else 0.0


class PassageCount(Task):
    """LongBench PassageCount over Austen paragraphs, at a given prompt length in tokens."""

    name = "passage_count"
    description = "LongBench PassageCount: the number of distinct paragraphs among repeated ones"
    source = "LongBench passage_count, substitute: Austen paragraphs instead of Wikipedia passages"

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        pool = [p for p in austen_paragraphs() if MIN_WORDS <= len(p.split()) <= MAX_WORDS]
        fresh = iter(rng.sample(pool, min(len(pool), length // 8 + 32)))
        slots: list[str] = []
        while len(slots) < length // 8:  # a passage has >= 15 words: more than any prompt can hold
            slots.append(rng.choice(slots) if slots and rng.random() < 0.5 else next(fresh))

        def render(passages: list[str]) -> str:
            body = "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(passages))
            return f"{INTRO}\n\n{body}\n\n{QUESTION}"

        units = fit_units(count_tokens, lambda n: render(slots[:n]), length, len(slots))
        passages = slots[:units]
        # Top up the gap left by the last whole passage with the candidate (a repeat or a fresh passage)
        # that fills it best: coarse units otherwise miss the length by up to a passage.
        candidates = list(dict.fromkeys(passages)) + [next(fresh) for _ in range(24)]
        for _ in range(3):
            used = count_tokens(render(passages), "")
            if length - used <= 0.01 * length:
                break
            fits = [(count_tokens(render([*passages, c]), ""), c) for c in candidates]
            best = max(((n, c) for n, c in fits if n <= length), default=None, key=lambda nc: nc[0])
            if best is None:
                break
            passages = [*passages, best[1]]
        prompt = render(passages)
        context, question = split_prompt(prompt, QUESTION)
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=prompt,
            answer=len(set(passages)),
            max_new_tokens=32,
            context=context,
            question=question,
            meta={"passages": len(passages)},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return count_score(prediction, sample.answer)
