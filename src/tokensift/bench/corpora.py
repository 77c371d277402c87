"""Shipped public-domain text and word pools (all offline)."""

from __future__ import annotations

import json
import lzma
import random
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
