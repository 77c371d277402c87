"""Shipped public-domain text and word pools (all offline)."""

from __future__ import annotations

import json
import lzma
import random
import re
import uuid
from functools import cache
from importlib import resources


@cache
def austen_books() -> dict[str, str]:
    """Jane Austen's six novels (public domain), built by scripts/build_austen.py from Debian."""
    raw = resources.files("tokensift.bench").joinpath("data/austen.json.xz").read_bytes()
    return json.loads(lzma.decompress(raw))["books"]


@cache
def austen_text() -> str:
    return "\n\n".join(austen_books().values())


@cache
def wonderwords(kind: str) -> tuple[str, ...]:
    """RULER's word pools: the wonderwords package's noun, adjective and verb lists."""
    text = resources.files("wonderwords").joinpath(f"assets/{kind}list.txt").read_text()
    return tuple(sorted({w.strip() for w in text.splitlines() if w.strip()}))


def word_key(rng: random.Random) -> str:
    """A RULER word key: a random adjective-noun pair (uniform over the product of the two pools)."""
    return f"{rng.choice(wonderwords('adjective'))}-{rng.choice(wonderwords('noun'))}"


@cache
def austen_paragraphs() -> tuple[str, ...]:
    """Distinct prose paragraphs (blank-line separated, whitespace collapsed) of the six novels."""
    seen: dict[str, None] = {}
    for block in austen_text().split("\n\n"):
        text = " ".join(block.split())
        if text:
            seen.setdefault(text, None)
    return tuple(seen)


@cache
def essay_words() -> tuple[str, ...]:
    """The essay-substitute haystack: all six Austen novels as one whitespace-split word list.

    RULER splits Paul Graham's essays the same way (`re.sub(r"\\s+", " ", essay).split(" ")`); the
    essays are copyrighted and not shipped, so scores on this haystack are labelled essay-substitute.
    """
    return tuple(re.sub(r"\s+", " ", austen_text()).strip().split(" "))


def essay_slice(rng: random.Random, words: int, start: int | None = None) -> list[str]:
    """`words` consecutive essay-substitute words from a seeded start, wrapping around like RULER's
    repetition of a short haystack."""
    pool = essay_words()
    begin = rng.randrange(len(pool)) if start is None else start
    out = list(pool[begin : begin + words])
    while len(out) < words:
        out += pool[: words - len(out)]
    return out


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """A regex stand-in for nltk's sent_tokenize (punkt is a download): split after . ! or ?."""
    return [s for s in SENTENCE_END.split(text.strip()) if s]


def random_uuid(rng: random.Random, version: int | None = 4) -> str:
    """RULER's `uuid.UUID(int=random.getrandbits(128), version=4)`; version=None keeps all 128 random
    bits, as the Needle Threading haystacks do."""
    bits = rng.getrandbits(128)
    return str(uuid.UUID(int=bits, version=version) if version else uuid.UUID(int=bits))
