"""Four-way topic of a short news item (an AG-News-like task, generated).

A news item is a headline plus one sentence, built from a subject, an event and a detail of its
topic, written around neutral connective text shared by all topics. The phrases are written for
this package (Apache-2.0, like the code); no data set is used.
"""

from __future__ import annotations

import random

from tokensift.bench.tasks.classification import LabelTask

SUBJECTS = {
    "sports": (
        "the national football team", "a veteran goalkeeper", "the league champions", "the tennis star",
        "the cycling squad", "the rookie striker", "the basketball coach", "the marathon winner",
        "the hockey club", "the swimming federation", "the cricket captain", "the rugby side",
    ),
    "business": (
        "the retail giant", "a struggling airline", "the central bank", "the car maker",
        "shareholders of the bank", "the software company", "the oil producer", "a fashion chain",
        "the insurance group", "the shipping firm", "the supermarket chain", "the steel maker",
    ),
    "science": (
        "a team of astronomers", "marine biologists", "the physics laboratory", "geologists",
        "a group of chemists", "the space agency", "climate researchers", "neuroscientists",
        "the genetics institute", "botanists", "a robotics lab", "the particle collider team",
    ),
    "politics": (
        "the prime minister", "opposition lawmakers", "the foreign minister", "the senate",
        "the governing coalition", "the mayor", "parliament", "the president",
        "the election commission", "the defence ministry", "a group of senators", "the cabinet",
    ),
}  # fmt: skip
EVENTS = {
    "sports": (
        "won the cup final", "signed a new contract", "lost in the semi-finals", "broke the world record",
        "was knocked out of the tournament", "clinched the title", "scored twice in the derby",
        "returned from injury", "qualified for the championship", "drew with their rivals",
    ),
    "business": (
        "reported record quarterly profits", "announced a merger", "cut two thousand jobs",
        "raised interest rates", "filed for bankruptcy", "launched a share buyback",
        "missed its revenue forecast", "opened a new factory", "agreed a takeover deal", "lowered prices",
    ),
    "science": (
        "discovered a new exoplanet", "sequenced an ancient genome", "observed a distant supernova",
        "published results from the experiment", "identified a new species of frog",
        "measured the particle's mass", "mapped the ocean floor", "launched a research satellite",
        "detected gravitational waves", "grew crystals in orbit",
    ),
    "politics": (
        "passed the budget bill", "called an early election", "resigned after the scandal",
        "signed a trade treaty", "vetoed the reform", "won the confidence vote", "opened peace talks",
        "announced new sanctions", "formed a coalition government", "proposed a constitutional amendment",
    ),
}  # fmt: skip
DETAILS = {
    "sports": (
        "in front of a sold-out stadium", "after extra time", "before the transfer deadline",
        "with a late penalty", "at the season opener", "despite a red card",
    ),
    "business": (
        "as markets fell sharply", "ahead of the earnings call", "amid weak consumer demand",
        "after investors pushed for change", "as its stock price jumped", "to cut operating costs",
    ),
    "science": (
        "using a new telescope", "in a peer-reviewed journal", "after years of lab work",
        "with data from the probe", "in samples from the glacier", "at the research station",
    ),
    "politics": (
        "after a heated debate", "ahead of the summit", "amid street protests",
        "following the vote in the chamber", "despite objections from the opposition", "at the capital",
    ),
}  # fmt: skip
FRAMES = (
    "{S} {e} {d}.", "Reports say {s} {e} {d}.", "On Monday, {s} {e} {d}.", "{S} {e} {d}, officials said.",
    "Late on Friday, {s} {e} {d}.", "According to local media, {s} {e} {d}.",
)  # fmt: skip


class Topic(LabelTask):
    """Sports, business, science or politics: the topic of a generated news item."""

    name = "topic"
    description = "four-way topic of a short generated news item (exact label match)"
    source = "generated (AG-News-like format); phrases written for tokensift, Apache-2.0"
    labels = ("sports", "business", "science", "politics")

    def instruction(self) -> str:
        return "Classify the news item into one topic: sports, business, science or politics."

    def question(self) -> str:
        return "Topic (answer with one word: sports, business, science or politics):"

    def text(self, label: str, rng: random.Random) -> str:
        subject = rng.choice(self.part(SUBJECTS[label]))
        event = rng.choice(self.part(EVENTS[label]))
        detail = rng.choice(self.part(DETAILS[label]))
        frame = rng.choice(self.part(FRAMES))
        return "News: " + frame.format(S=subject[0].upper() + subject[1:], s=subject, e=event, d=detail)
