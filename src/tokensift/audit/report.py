"""Tables and Markdown summaries of the audit and of the vocabulary-size experiment."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from tokensift.audit.audit import AuditResult
from tokensift.audit.premiums import PremiumRow
from tokensift.audit.scripts import script_name
from tokensift.audit.vocab import VocabRow, parity_size

FAVOURED = 5  # languages listed at each end per tokenizer


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def write_csv(rows: Sequence[Any], path: Path) -> Path:
    """Dataclass rows as CSV, columns in field order; None is an empty cell."""
    if not rows:
        path.write_text("")
        return path
    names = [f.name for f in fields(rows[0])]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for row in rows:
            writer.writerow([_cell(v) for v in asdict(row).values()])
    return path


def _fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in body),
    ]


def headline(result: AuditResult) -> list[str]:
    """Per tokenizer: vocabulary, English chars/token, premiums, most/least favoured languages.

    "corr. with byte premium" is the Pearson correlation of log premium with log byte premium over the
    languages: near 1 when the tokenizer pays per UTF-8 byte whatever the language (Arnett et al.).
    """
    body = []
    for info in result.tokenizers:
        rows = [r for r in result.premiums if r.tokenizer == info.name]
        others = sorted((r for r in rows if r.language != result.reference), key=lambda r: r.premium)
        eng = next(r for r in rows if r.language == result.reference)
        premiums = [r.premium for r in others]
        logs = [(math.log(r.byte_premium), math.log(r.premium)) for r in others if r.byte_premium > 0]
        corr = statistics.correlation(*zip(*logs, strict=True)) if len(logs) > 2 else None
        body.append(
            [
                f"`{info.name}`",
                f"{info.vocab_size:,}",
                _fmt(eng.chars_per_token),
                _fmt(statistics.median(premiums)),
                f"{sum(p > 2 for p in premiums)}/{len(premiums)}",
                _fmt(corr),
                f"{others[0].name} `{others[0].language}` {others[0].premium:.2f}",
                f"{others[-1].name} `{others[-1].language}` {others[-1].premium:.2f}",
            ]
        )
    header = [
        "tokenizer",
        "vocab",
        "eng chars/token",
        "median premium",
        "premium > 2",
        "corr. with byte premium",
        "most favoured",
        "least favoured",
    ]
    return _table(header, body)


def _favoured(rows: Sequence[PremiumRow], reference: str) -> list[str]:
    others = sorted((r for r in rows if r.language != reference), key=lambda r: r.premium)

    def show(rs: Sequence[PremiumRow]) -> str:
        return ", ".join(f"{r.name} `{r.language}` {r.premium:.2f}" for r in rs)

    return [
        f"- most favoured (lowest premium): {show(others[:FAVOURED])}",
        f"- least favoured (highest premium): {show(others[::-1][:FAVOURED])}",
    ]


def by_script(result: AuditResult) -> list[str]:
    names = [t.name for t in result.tokenizers]
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in result.premiums:
        cells[(r.script, r.tokenizer)].append(r.premium)
    scripts = sorted({s for s, _ in cells}, key=lambda s: statistics.median(cells[(s, names[0])]))
    body = [
        [
            script_name(s),
            str(len(cells[(s, names[0])])),
            *(_fmt(statistics.median(cells[(s, n)])) for n in names),
        ]
        for s in scripts
    ]
    return _table(["script", "languages", *(f"`{n}`" for n in names)], body)


def purity_table(result: AuditResult) -> list[str]:
    names = [t.name for t in result.tokenizers]
    grouped: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    for r in result.purity:
        grouped[(r.language, r.method)][r.tokenizer] = r
    body = []
    for (language, method), per_tok in grouped.items():
        cells = [
            f"{100 * r.valid_share:.1f} / {100 * r.pure_share:.1f} / {r.chars_per_word_token:.1f}"
            for r in (per_tok[n] for n in names)
        ]
        body.append([f"`{language}`", method, *cells])
    return _table(["language", "lexicon", *(f"`{n}` %TR / %Pure / chars" for n in names)], body)


def write_summary(result: AuditResult, path: Path, plots: Sequence[str] = ()) -> Path:
    corpus = result.corpus
    languages = {r.language for r in result.premiums}
    scripts = {r.script for r in result.premiums}
    lines = [
        "# Tokenizer audit",
        "",
        f"Corpus: {corpus.name} ({corpus.source}; {corpus.licence}). {len(languages)} languages in "
        f"{len(scripts)} scripts; premiums are CTC(language) / CTC({result.reference}) on the articles both "
        "have (Arnett et al., arXiv 2510.21909, with the UDHR standing in for FLORES-200).",
        "",
        "## Token premium vs English",
        "",
        *headline(result),
        "",
        "Tokenizers: "
        + "; ".join(f"`{t.name}` {t.kind}, {t.vocab_size:,} tokens" for t in result.tokenizers)
        + ".",
        "",
        "## Most and least favoured languages",
        "",
    ]
    for info in result.tokenizers:
        rows = [r for r in result.premiums if r.tokenizer == info.name]
        lines += [f"### `{info.name}`", "", *_favoured(rows, result.reference), ""]
    lines += ["## Median premium by script", "", *by_script(result), ""]
    if result.purity or result.notes:
        lines += [
            "## Linguistic purity",
            "",
            "%TR = tokens that are words or morphemes of the language / word tokens; %Pure = unique tokens "
            "that are a root or affix / unique word tokens (Bayram et al., arXiv 2502.07057); chars = mean "
            "characters per word token. Tokens of "
            "only spaces, digits or punctuation are left out; byte pieces count as invalid. The zeyrek rows "
            "use a morphological analyser like the paper; hunspell rows are an approximation (stems and "
            "affix strings stand in for roots and morphemes). Corpus: the UDHR text of each language, not "
            "the paper's TR-MMLU, so numbers are not comparable to the paper's.",
            "",
        ]
        if result.purity:
            lines += [*purity_table(result), ""]
        lines += [f"- skipped {note}" for note in result.notes]
        lines += [""] if result.notes else []
    if plots:
        lines += ["## Figures", "", *(f"![{name}]({name})" for name in plots), ""]
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    lines += ["## Notes", "", f"- time: {timing}.", *_approximations(), ""]
    path.write_text("\n".join(lines))
    return path


def _approximations() -> list[str]:
    return [
        "- Approximations of the papers' set-ups: the UDHR (31 units, ~2k English tokens) replaces "
        "FLORES-200, so premiums have more variance; tokens per word is reported only where spaces "
        "delimit words; "
        "`byte_fallback_share` counts `<0xNN>` pieces and byte-level pieces that are not whole UTF-8 "
        "characters.",
    ]


# --- vocabulary experiment ---------------------------------------------------------------------------


def vocab_findings(rows: Sequence[VocabRow], reference: str) -> list[str]:
    """Whether the paper's claims hold here, computed from the rows (not written by hand)."""
    out = []
    languages = [lang for lang in dict.fromkeys(r.language for r in rows) if lang != reference]
    for lang in languages:
        own = [r for r in rows if r.language == lang and r.premium is not None]
        ok = [r for r in own if not r.saturated and not _ref(rows, r, reference).saturated]
        if not ok:
            continue
        recipes = sorted({(r.algorithm, r.pretokenization) for r in ok})
        spans = []
        for algorithm, pretok in recipes:
            ps = [r.premium for r in ok if (r.algorithm, r.pretokenization) == (algorithm, pretok)]
            spans.append(f"{algorithm}/{pretok} {min(ps):.3f}–{max(ps):.3f}")
        out.append(
            f"- **Vocabulary size changes premiums** ({lang} vs {reference}, held-out verses, unsaturated "
            f"sizes): {'; '.join(spans)}."
        )
        deltas = []
        for algorithm in sorted({r.algorithm for r in ok}):
            for size in sorted({r.vocab_size for r in ok}):
                pair = {r.pretokenization: r for r in ok if (r.algorithm, r.vocab_size) == (algorithm, size)}
                if {"whitespace", "none"} <= pair.keys():
                    deltas.append((algorithm, size, pair["none"].premium - pair["whitespace"].premium))
        if deltas:
            lower = sum(d < 0 for *_, d in deltas)
            detail = ", ".join(f"{a} {s}: {d:+.3f}" for a, s, d in deltas)
            out.append(
                f"- **Superword tokenizers vs whitespace pre-tokenisation** ({lang}): the premium is lower "
                f"without pre-tokenisation in {lower} of {len(deltas)} (algorithm, size) pairs "
                f"(difference none − whitespace: {detail})."
            )
        parities = []
        for algorithm, pretok in recipes:
            recipe = [r for r in rows if (r.algorithm, r.pretokenization) == (algorithm, pretok)]
            mine = [r for r in recipe if r.language == lang]
            for base in (r for r in recipe if r.language == reference and not r.saturated):
                size = parity_size(mine, base.test_tokens)
                if size is not None and base.vocab_size in (4000, 8000, 16000):
                    parities.append(f"{algorithm}/{pretok} {base.vocab_size} → {size:,.0f}")
        if parities:
            out.append(
                f"- **Per-language 'optimal' size** (the {lang} vocabulary that matches {reference}'s "
                f"token count at a given {reference} size, log-interpolated): {'; '.join(parities)}."
            )
    return out


def _ref(rows: Sequence[VocabRow], row: VocabRow, reference: str) -> VocabRow:
    return next(
        r
        for r in rows
        if (r.language, r.algorithm, r.pretokenization, r.vocab_size)
        == (reference, row.algorithm, row.pretokenization, row.vocab_size)
    )


def write_vocab_summary(
    rows: Sequence[VocabRow], reference: str, source: str, path: Path, plots: Sequence[str] = ()
) -> Path:
    body = [
        [
            r.language,
            r.algorithm,
            r.pretokenization,
            f"{r.vocab_size:,}",
            f"{r.actual_vocab_size:,}",
            f"{r.test_tokens:,}",
            _fmt(r.premium, 3),
            _fmt(r.udhr_premium, 3),
        ]
        for r in rows
        if r.language != reference
    ]
    lines = [
        "# Vocabulary-size experiment",
        "",
        f"Monolingual tokenizers trained per language on {source}; every 10th verse held out. Premium = "
        f"tokens on the held-out verses / {reference}'s with the same recipe and size (Arnett et al., "
        "arXiv 2510.21909); the UDHR premium repeats it out of domain.",
        "",
        "## Findings",
        "",
        *vocab_findings(rows, reference),
        "",
        "## Premiums",
        "",
        *_table(
            ["language", "algorithm", "pre-tok.", "size", "actual", "tokens", "premium", "UDHR premium"], body
        ),
        "",
        *(f"![{name}]({name})" for name in plots),
        "",
    ]
    path.write_text("\n".join(lines))
    return path
