"""Binary sentiment of a short product review (an SST-2-like task, generated).

Each review names a product, may open with a clause of the opposite polarity ("At first ... but"),
and ends with the clause that carries its label, so a keyword count alone does not always give the
answer. The phrases are written for this package (Apache-2.0, like the code); no data set is used.
"""

from __future__ import annotations

import random

from tokensift.bench.tasks.classification import LabelTask

PRODUCTS = (
    "blender", "desk lamp", "backpack", "coffee grinder", "rain jacket", "office chair", "kettle",
    "bike lock", "phone case", "water bottle", "keyboard", "toaster", "pair of headphones", "tent",
    "frying pan", "alarm clock", "vacuum cleaner", "umbrella", "notebook", "space heater", "drill",
    "yoga mat", "suitcase", "pair of boots", "router", "air fryer", "monitor", "camera bag",
    "garden hose", "rice cooker", "mattress", "standing desk",
)  # fmt: skip
OPENINGS = (
    "I bought this {p} last month.", "We have been using the {p} for a few weeks now.",
    "This {p} arrived on Tuesday.", "My sister recommended this {p}.", "I ordered the {p} on sale.",
    "The {p} was a birthday present.", "I replaced my old {p} with this one.",
    "I picked up this {p} before a long trip.", "Our office switched to this {p}.",
    "I have owned this {p} for half a year.",
)  # fmt: skip
POSITIVE = (
    "it works beautifully", "it is worth every penny", "I could not be happier with it",
    "it exceeded my expectations", "the quality is excellent", "it is a delight to use",
    "I would gladly buy it again", "it has been completely reliable", "it feels sturdy and well made",
    "it does exactly what it promises", "everyone who tried it loved it", "it was a fantastic purchase",
    "it performs wonderfully every day", "I recommend it without hesitation", "it is simply superb",
    "it made my routine so much easier", "the design is clever and pleasant", "it is great value",
)  # fmt: skip
NEGATIVE = (
    "it broke within days", "it is a waste of money", "I regret buying it",
    "it fell far short of my expectations", "the quality is awful", "it is frustrating to use",
    "I would never buy it again", "it stopped working twice", "it feels flimsy and cheap",
    "it does not do what it promises", "everyone who tried it disliked it", "it was a terrible purchase",
    "it performs poorly every day", "I cannot recommend it", "it is simply dreadful",
    "it made my routine harder", "the design is clumsy and annoying", "it is poor value",
)  # fmt: skip


class Sentiment(LabelTask):
    """Positive or negative: the overall opinion of a generated product review."""

    name = "sentiment"
    description = "binary sentiment of a short generated product review (exact label match)"
    source = "generated (SST-2-like format); phrases written for tokensift, Apache-2.0"
    labels = ("positive", "negative")

    def instruction(self) -> str:
        return "Classify the sentiment of the review as positive or negative."

    def question(self) -> str:
        return "Sentiment (answer with one word, positive or negative):"

    def text(self, label: str, rng: random.Random) -> str:
        same, other = (POSITIVE, NEGATIVE) if label == "positive" else (NEGATIVE, POSITIVE)
        product = rng.choice(self.part(PRODUCTS))
        opening = rng.choice(self.part(OPENINGS)).format(p=product)
        main = rng.choice(self.part(same))
        if rng.random() < 0.4:
            contrast = rng.choice(self.part(other))
            return f"Review: {opening} At first I thought {contrast}, but honestly {main}."
        extra = rng.choice([p for p in self.part(same) if p != main])
        return f"Review: {opening} {main.capitalize()}, and {extra}."
