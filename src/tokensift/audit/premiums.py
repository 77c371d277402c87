"""Token premiums and per-language tokenization statistics on a parallel corpus.

Arnett, Chang, Biderman and Bergen, "Explaining and Mitigating Crosslingual Tokenizer Inequities"
(arXiv 2510.21909): the corpus token count CTC_T(l) is the number of tokens tokenizer T needs for the
parallel text in language l, and the token premium of l is CTC_T(l) / CTC_T(eng) on the same content.
A premium above 1 means the language pays more tokens (context, compute, money) for the same meaning.
We add the byte premium (UTF-8 bytes of l over English, Arnett et al. 2024), characters and bytes per
token, tokens per whitespace-delimited word (fertility) and the share of byte-fallback and unknown
pieces. The content unit is an article of the UDHR instead of a FLORES-200 sentence.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

from tokensift.audit.corpus import REFERENCE, Language, ParallelCorpus
from tokensift.audit.tokenizer import AuditTokenizer


@dataclass(frozen=True)
class Counts:
    """Additive counts for some text under one tokenizer."""

    tokens: int = 0
    chars: int = 0
    bytes: int = 0
    words: int = 0
    byte_pieces: int = 0
    unknown: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def unit_counts(tokenizer: AuditTokenizer, language: Language) -> dict[int, Counts]:
    """Counts per unit (article) of one language, from one batched encode."""
    ids = sorted(language.units)
    texts = [language.units[u] for u in ids]
    out = {}
    for unit, text, tokens in zip(ids, texts, tokenizer.encode(texts), strict=True):
        pieces = [tokenizer.piece(t) for t in tokens]
        out[unit] = Counts(
            tokens=len(tokens),
            chars=len(text),
            bytes=len(text.encode("utf-8")),
            words=len(text.split()),
            byte_pieces=sum(p.byte_fallback for p in pieces),
            unknown=sum(p.unknown for p in pieces),
        )
    return out


def total(counts: dict[int, Counts], units: Iterable[int]) -> Counts:
    out = Counts()
    for unit in units:
        out = out + counts[unit]
    return out


@dataclass(frozen=True)
class PremiumRow:
    """One tokenizer on one language, against the reference language on the units both have."""

    tokenizer: str
    language: str
    name: str
    script: str
    units: int
    tokens: int
    reference_tokens: int
    premium: float
    byte_premium: float
    chars_per_token: float
    bytes_per_token: float
    tokens_per_word: float | None  # None where whitespace does not delimit words
    byte_fallback_share: float
    unk_share: float


def premium_row(
    tokenizer: str,
    language: Language,
    counts: dict[int, Counts],
    reference_counts: dict[int, Counts],
) -> PremiumRow:
    """Token premium = CTC(language) / CTC(reference) over their shared units (Arnett et al.)."""
    shared = sorted(set(counts) & set(reference_counts))
    own, ref = total(counts, shared), total(reference_counts, shared)
    tokens = max(own.tokens, 1)
    return PremiumRow(
        tokenizer=tokenizer,
        language=language.code,
        name=language.name,
        script=language.script,
        units=len(shared),
        tokens=own.tokens,
        reference_tokens=ref.tokens,
        premium=own.tokens / max(ref.tokens, 1),
        byte_premium=own.bytes / max(ref.bytes, 1),
        chars_per_token=own.chars / tokens,
        bytes_per_token=own.bytes / tokens,
        tokens_per_word=own.tokens / own.words if language.word_spaces and own.words else None,
        byte_fallback_share=own.byte_pieces / tokens,
        unk_share=own.unknown / tokens,
    )


def token_premiums(
    tokenizer: AuditTokenizer,
    corpus: ParallelCorpus,
    languages: list[Language],
    reference: str = REFERENCE,
    progress: Iterable[Language] | None = None,
) -> list[PremiumRow]:
    """Premium rows for every language; `progress` may wrap `languages` (a tqdm bar)."""
    ref_counts = unit_counts(tokenizer, corpus.language(reference))
    rows = []
    for language in progress if progress is not None else languages:
        counts = ref_counts if language.code == reference else unit_counts(tokenizer, language)
        rows.append(premium_row(tokenizer.name, language, counts, ref_counts))
    return rows
