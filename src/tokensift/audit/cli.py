"""`tokensift audit tokenizers | vocab | languages`: the tokenizer audit from the command line."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tokensift.errors import TokensiftError, check_out_dir


def _codes(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _sizes(value: str) -> list[int]:
    try:
        return [int(part.replace("_", "")) for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise TokensiftError(f"--sizes takes comma-separated integers, not {value!r}") from exc


def add_parser(subparsers: Any) -> None:
    from tokensift.audit.audit import DEFAULT_PURITY, DEFAULT_TOKENIZERS
    from tokensift.audit.vocab import DEFAULT_SIZES

    audit = subparsers.add_parser(
        "audit", help="audit tokenizers across languages (token premiums, purity, vocabulary size)"
    )
    sub = audit.add_subparsers(dest="audit_command", metavar="WHAT", required=True)

    tok = sub.add_parser(
        "tokenizers",
        help="token premiums vs English on the UDHR, characters/bytes per token, %%TR / %%Pure",
        description="Token premiums (Arnett et al., arXiv 2510.21909) and %TR / %Pure purity "
        "(Bayram et al., arXiv 2502.07057) on the shipped UDHR parallel corpus, fully offline.",
    )
    tok.add_argument(
        "--tokenizers",
        default=",".join(DEFAULT_TOKENIZERS),
        help="comma-separated: cl100k, embedded model names, tokenizer directories or tokenizer.json files "
        "(default: %(default)s)",
    )
    tok.add_argument("--languages", help="comma-separated corpus codes (default: all; see `audit languages`)")
    tok.add_argument(
        "--purity",
        help=f"languages for %%TR / %%Pure, or 'none' (default: {','.join(DEFAULT_PURITY)} if audited)",
    )
    tok.add_argument(
        "--reference", default="eng", help="the language premiums are relative to (default: eng)"
    )
    tok.add_argument(
        "--corpus", help="a UDHR corpus file from scripts/build_udhr_corpus.py (default: shipped)"
    )
    tok.add_argument("--out", type=Path, help="write premiums.csv, purity.csv, plots and summary.md here")
    tok.add_argument("--no-progress", action="store_true", help="no progress bars")
    tok.set_defaults(func=run_tokenizers)

    voc = sub.add_parser(
        "vocab",
        help="train BPE/Unigram per language at several vocabulary sizes and plot premium vs size",
        description="The vocabulary-size experiment of Arnett et al. (arXiv 2510.21909) on the shipped "
        "verse-aligned Bible (English WEB / Spanish Reina-Valera 1909, New Testament).",
    )
    voc.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="default: %(default)s")
    voc.add_argument("--algorithms", default="bpe,unigram", help="bpe and/or unigram (default: %(default)s)")
    voc.add_argument(
        "--pretokenization", default="whitespace,none", help="whitespace and/or none (default: %(default)s)"
    )
    voc.add_argument("--languages", help="Bible corpus languages (default: all)")
    voc.add_argument("--corpus", help="a Bible file from scripts/build_bible_corpus.py (default: shipped NT)")
    voc.add_argument("--out", type=Path, required=True, help="write vocab.csv, the plot and vocab.md here")
    voc.add_argument("--no-progress", action="store_true", help="no progress bar")
    voc.set_defaults(func=run_vocab)

    langs = sub.add_parser("languages", help="list the UDHR corpus languages and scripts")
    langs.add_argument("--corpus", help="a UDHR corpus file (default: shipped)")
    langs.set_defaults(func=run_languages)


def run_tokenizers(args: argparse.Namespace) -> int:
    from tokensift.audit import plots, report
    from tokensift.audit.audit import audit_tokenizers
    from tokensift.audit.corpus import load_udhr

    if args.out is not None:
        check_out_dir(args.out)
    corpus = load_udhr(args.corpus)
    purity = _codes(args.purity)
    if purity == ["none"]:
        purity = []
    tokenizers = _codes(args.tokenizers) or []
    result = audit_tokenizers(
        tokenizers,
        languages=_codes(args.languages),
        purity_languages=purity,
        reference=args.reference,
        corpus=corpus,
        progress=not args.no_progress,
    )
    print("\n".join(report.headline(result)))
    if args.out is None:
        return 0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report.write_csv(result.premiums, out / "premiums.csv")
    report.write_csv(result.purity, out / "purity.csv")
    figures = [
        plots.premiums_by_script(result.premiums, out / "premiums_by_script.png").name,
        plots.premiums_by_language(result.premiums, out / "premiums_by_language.png").name,
    ]
    result.seconds["plots"] = time.perf_counter() - t0
    report.write_summary(result, out / "summary.md", figures)
    print(f"wrote {out}/premiums.csv, purity.csv, summary.md, {', '.join(figures)}")
    return 0


def run_vocab(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from tokensift.audit import plots, report
    from tokensift.audit.corpus import load_udhr
    from tokensift.audit.vocab import ALGORITHMS, PRETOKENIZATIONS, load_bible, vocab_experiment

    check_out_dir(args.out)
    algorithms = _codes(args.algorithms) or []
    pretoks = _codes(args.pretokenization) or []
    for value, allowed, flag in (
        (algorithms, ALGORITHMS, "--algorithms"),
        (pretoks, PRETOKENIZATIONS, "--pretokenization"),
    ):
        bad = [v for v in value if v not in allowed]
        if bad or not value:
            raise TokensiftError(f"{flag} takes {' and/or '.join(allowed)}, not {','.join(bad) or 'nothing'}")
    sizes = _sizes(args.sizes)
    corpus = load_bible(args.corpus)
    languages = _codes(args.languages) or list(corpus.languages)
    for code in languages:
        corpus.split(code)  # unknown codes fail here, before any training
    udhr = load_udhr()
    udhr_texts = {
        code: list(udhr.languages[code].units.values()) for code in languages if code in udhr.languages
    }
    total = len(set(languages) | {"eng"}) * len(algorithms) * len(pretoks) * len(sizes)
    with tqdm(total=total, desc="training tokenizers", disable=args.no_progress) as bar:
        rows = vocab_experiment(
            corpus, sizes, algorithms, pretoks, languages, udhr=udhr_texts, progress=bar.update
        )  # fmt: skip
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, out / "vocab.csv")
    figure = plots.vocab_premiums(rows, "eng", out / "vocab_premiums.png").name
    report.write_vocab_summary(rows, "eng", corpus.source, out / "vocab.md", [figure])
    print("\n".join(report.vocab_findings(rows, "eng")))
    print(f"wrote {out}/vocab.csv, vocab.md, {figure}")
    return 0


def run_languages(args: argparse.Namespace) -> int:
    from tokensift.audit.corpus import load_udhr
    from tokensift.audit.scripts import script_name

    corpus = load_udhr(args.corpus)
    for lang in corpus.languages.values():
        print(f"{lang.code:<14} {script_name(lang.script):<12} {lang.name}")
    return 0
