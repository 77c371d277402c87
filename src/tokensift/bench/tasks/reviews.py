"""Many short product reviews with a known distribution of complaints (for context reduction, CRAG).

A sample is `items` one-sentence reviews of one product. Most complain about one aspect (battery,
screen, sound, price or delivery); the shares are drawn so that one aspect leads clearly (40-55% of
the complaints) over the others, and about a quarter of the reviews praise a random aspect instead
(same vocabulary, opposite opinion). The question asks which aspect most reviews complain about,
scored by exact label match. The passages are in `meta["passages"]`; `prompt` holds all of them.
Sentences are generated from phrases written for this package (Apache-2.0); no data set is used.
"""

from __future__ import annotations

import random

from tokensift.bench.tasks.base import Sample, Task, TokenCounter
from tokensift.bench.tasks.classification import first_word
from tokensift.errors import TokensiftError

ASPECTS = ("battery", "screen", "sound", "price", "delivery")
COMPLAINTS = {
    "battery": (
        "The battery barely lasts half a day.", "Battery life is a real letdown.",
        "It needs charging twice a day, the battery is weak.", "The battery drains overnight for no reason.",
        "Battery went from full to empty during one film.", "Poor battery, I carry a charger everywhere.",
    ),
    "screen": (
        "The screen is dim and hard to read outside.", "Colours on the display look washed out.",
        "The screen scratched within a week.", "Dead pixels on the display from day one.",
        "The display flickers at low brightness.", "Screen is too reflective to use in daylight.",
    ),
    "sound": (
        "The speaker sounds tinny and thin.", "Audio crackles at any volume.",
        "Sound quality is muffled on calls.", "The speakers distort when music gets loud.",
        "Volume is far too quiet even at maximum.", "Tinny sound, no bass at all.",
    ),
    "price": (
        "Far too expensive for what you get.", "The price is outrageous for this quality.",
        "Overpriced, cheaper rivals do the same.", "Not worth the money they charge.",
        "I paid way too much for it.", "The cost is hard to justify.",
    ),
    "delivery": (
        "Delivery took three weeks instead of three days.", "The parcel arrived late and damaged.",
        "Shipping was slow and the box was crushed.", "The courier lost my order twice.",
        "It arrived a fortnight after the promised date.", "Terrible delivery, no tracking updates.",
    ),
}  # fmt: skip
PRAISE = {
    "battery": ("The battery easily lasts two days.", "Battery life is superb."),
    "screen": ("The screen is bright and sharp.", "Lovely vivid display."),
    "sound": ("The speakers sound rich and clear.", "Great sound for its size."),
    "price": ("Excellent value for the price.", "Very fairly priced."),
    "delivery": ("Delivery was fast and well packed.", "Arrived a day early."),
}
OPENERS = ("", "", "Honestly, ", "Overall, ", "Sadly, ", "To be fair, ", "In short, ")
INTRO = "Here are customer reviews of a tablet."
ANSWER_PREFIX = "Most of the complaints are about the"
QUESTION = (
    "Which aspect do most of the reviews complain about? "
    "Answer with one word: battery, screen, sound, price or delivery."
)


def opened(rng: random.Random, sentence: str) -> str:
    opener = rng.choice(OPENERS)
    return opener + sentence[0].lower() + sentence[1:] if opener else sentence


def complaint_shares(rng: random.Random) -> dict[str, float]:
    """Shares of the complaints per aspect: one leader with 40-55%, the rest split unevenly below it."""
    leader = rng.choice(ASPECTS)
    top = rng.uniform(0.40, 0.55)
    others = [a for a in ASPECTS if a != leader]
    weights = [rng.uniform(0.5, 1.0) for _ in others]
    rest = [(1 - top) * w / sum(weights) for w in weights]
    shares = {leader: top, **dict(zip(others, rest, strict=True))}
    return shares


class Reviews(Task):
    """Which aspect most of `items` short reviews complain about (4 to 100 reviews)."""

    name = "reviews"
    description = "many short generated reviews; which aspect do most of them complain about"
    source = "generated; phrases written for tokensift, Apache-2.0"
    length_free = True

    def __init__(self, items: int = 25, praise: float = 0.25):
        if not 4 <= items <= 100:
            raise TokensiftError(f"reviews: items must be 4 to 100, got {items}")
        if not 0 <= praise < 1:
            raise TokensiftError(f"reviews: praise must be a share in [0, 1), got {praise}")
        self.items = items
        self.praise = praise

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        rng = random.Random(f"reviews|{self.items}|{self.praise}|{index}|{seed}")
        shares = complaint_shares(rng)
        answer = max(shares, key=shares.__getitem__)
        praised = round(self.items * self.praise)
        complaints = self.items - praised
        # Largest-remainder counts, so the realised shares keep the leader strictly first.
        raw = {a: shares[a] * complaints for a in ASPECTS}
        counts = {a: int(v) for a, v in raw.items()}
        by_remainder = sorted(ASPECTS, key=lambda a: raw[a] - counts[a], reverse=True)
        for a in by_remainder[: complaints - sum(counts.values())]:
            counts[a] += 1
        while any(counts[a] >= counts[answer] for a in ASPECTS if a != answer):
            # Small samples: move complaints to the leader until it leads strictly.
            other = max((a for a in ASPECTS if a != answer), key=counts.__getitem__)
            counts[other] -= 1
            counts[answer] += 1
        passages = [opened(rng, rng.choice(COMPLAINTS[a])) for a in ASPECTS for _ in range(counts[a])]
        passages += [rng.choice(PRAISE[rng.choice(ASPECTS)]) for _ in range(self.items - len(passages))]
        rng.shuffle(passages)
        context = INTRO + "\n\n" + "\n\n".join(passages)
        return Sample(
            task=self.name,
            length=0,
            index=index,
            seed=seed,
            prompt=f"{context}\n\n{QUESTION}",
            answer=answer,
            max_new_tokens=4,
            answer_prefix=ANSWER_PREFIX,
            context=context,
            question=QUESTION,
            meta={"passages": passages, "intro": INTRO, "complaints": counts, "items": self.items},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return float(first_word(prediction) == sample.answer)
