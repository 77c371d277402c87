"""Linguistic purity of tokens: %TR-style validity and %Pure-style purity.

Bayram et al., "Tokenization Standards for Linguistic Integrity: Turkish as a Benchmark"
(arXiv 2502.07057): %TR = valid tokens / all tokens, where a token (beginning-of-word marker removed)
is valid if it is a word or morpheme of the language; %Pure = pure tokens / unique tokens, where a
token is pure if it is a whole root or affix that cannot be decomposed further. The paper asks the
ITU Turkish NLP web service; here a `Lexicon` answers offline (see `lexicons.py`).

Tokens made only of spaces, digits or punctuation are neither words nor non-words and are left out of
both ratios; a token that is not whole UTF-8 characters (a byte piece) is counted and is never valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tokensift.audit.tokenizer import AuditTokenizer


class Lexicon(Protocol):
    """Answers whether a string is a word/morpheme (valid) and whether it is a root or affix (pure)."""

    language: str
    method: str
    approximate: bool  # True where no morphological analyser stands behind the answers

    def is_valid(self, word: str) -> bool: ...

    def is_pure(self, word: str) -> bool: ...


@dataclass(frozen=True)
class PurityRow:
    tokenizer: str
    language: str
    method: str
    approximate: bool
    tokens: int  # all tokens of the text
    word_tokens: int  # tokens with a letter, or byte pieces: the %TR denominator
    valid_share: float  # %TR / 100
    unique_word_tokens: int  # the %Pure denominator
    pure_share: float  # %Pure / 100
    chars_per_word_token: float  # short tokens match short morphemes: read %TR next to this


def surface(tokenizer: AuditTokenizer, token_id: int) -> str | None:
    """The token's text without its beginning-of-word space; None for a byte piece; "" for no letters."""
    text = tokenizer.piece(token_id).text
    if text is None:
        return None
    text = text.strip()
    return text if any(c.isalpha() for c in text) else ""


def purity(tokenizer: AuditTokenizer, texts: Sequence[str], lexicon: Lexicon) -> PurityRow:
    """%TR and %Pure of `tokenizer` on `texts` of the lexicon's language."""
    valid_cache: dict[str, bool] = {}
    all_tokens = word_tokens = valid = chars = 0
    unique: dict[str | int, bool] = {}  # surface (or id for byte pieces) -> pure
    for ids in tokenizer.encode(list(texts)):
        all_tokens += len(ids)
        for token_id in ids:
            word = surface(tokenizer, token_id)
            if word == "":
                continue
            word_tokens += 1
            if word is None:
                unique[token_id] = False
                continue
            chars += len(word)
            if word not in valid_cache:
                valid_cache[word] = lexicon.is_valid(word)
            valid += valid_cache[word]
            if word not in unique:
                unique[word] = lexicon.is_pure(word)
    return PurityRow(
        tokenizer=tokenizer.name,
        language=lexicon.language,
        method=lexicon.method,
        approximate=lexicon.approximate,
        tokens=all_tokens,
        word_tokens=word_tokens,
        valid_share=valid / word_tokens if word_tokens else 0.0,
        unique_word_tokens=len(unique),
        pure_share=sum(unique.values()) / len(unique) if unique else 0.0,
        chars_per_word_token=chars / word_tokens if word_tokens else 0.0,
    )
