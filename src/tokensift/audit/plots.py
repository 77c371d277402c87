"""Figures of the tokenizer audit (matplotlib, Agg backend; nothing is shown on screen)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokensift.audit.premiums import PremiumRow
from tokensift.audit.scripts import script_name
from tokensift.audit.vocab import VocabRow

_MARKERS = "os^DvP*Xph"
_TICKS = (0.5, 1, 1.5, 2, 3, 5, 10, 20, 40)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_premium_axis(axis: Any, values: Sequence[float], which: str = "x") -> None:
    lo, hi = min(min(values), 0.9), max(max(values), 1.1)
    ticks = [t for t in _TICKS if lo / 1.2 <= t <= hi * 1.2]
    if which == "x":
        axis.set_xscale("log")
        axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
        axis.set_xlim(lo / 1.1, hi * 1.1)
        axis.axvline(1.0, color="0.3", lw=0.8, zorder=0)
    else:
        axis.set_yscale("log")
        axis.set_yticks(ticks, [f"{t:g}" for t in ticks])
        axis.axhline(1.0, color="0.3", lw=0.8, zorder=0)


def _top_legend(fig: Any, ax: Any, columns: int) -> None:
    """Legend in a strip above the axes, where it cannot hide points."""
    height = fig.get_figheight()
    fig.legend(*ax.get_legend_handles_labels(), loc="upper center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))


def premiums_by_language(rows: Sequence[PremiumRow], path: Path) -> Path:
    """One row per language, grouped by script; one marker per tokenizer; log premium axis."""
    plt = _pyplot()
    tokenizers = list(dict.fromkeys(r.tokenizer for r in rows))
    by_lang: dict[str, dict[str, PremiumRow]] = defaultdict(dict)
    for r in rows:
        by_lang[r.language][r.tokenizer] = r
    scripts: dict[str, list[str]] = defaultdict(list)
    for lang, per_tok in by_lang.items():
        scripts[next(iter(per_tok.values())).script].append(lang)

    def mean_premium(lang: str) -> float:
        return statistics.fmean(r.premium for r in by_lang[lang].values())

    order = sorted(scripts, key=lambda s: statistics.median(mean_premium(lang) for lang in scripts[s]))
    labels, positions, group_marks = [], {}, []
    for script in order:
        start = len(labels)
        for lang in sorted(scripts[script], key=mean_premium):
            positions[lang] = len(labels)
            labels.append(f"{by_lang[lang][tokenizers[0]].name[:28]} ({lang})")
        group_marks.append((start, len(labels) - 1, script_name(script)))
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.16 * len(labels)))
    for i, tok in enumerate(tokenizers):
        ys = [positions[r.language] for r in rows if r.tokenizer == tok]
        xs = [r.premium for r in rows if r.tokenizer == tok]
        ax.scatter(xs, ys, s=16, marker=_MARKERS[i % len(_MARKERS)], label=tok, alpha=0.85, zorder=3)
    for k, (start, end, name) in enumerate(group_marks):
        if k % 2 == 0:
            ax.axhspan(start - 0.5, end + 0.5, color="0.93", zorder=0)
        ax.text(1.01, (start + end) / 2, name, transform=ax.get_yaxis_transform(), va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    _log_premium_axis(ax, [r.premium for r in rows])
    ax.set_xlabel("token premium vs English (tokens for the same UDHR articles; log scale)")
    _top_legend(fig, ax, len(tokenizers))
    ax.grid(axis="x", color="0.85", lw=0.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def premiums_by_script(rows: Sequence[PremiumRow], path: Path) -> Path:
    """Median premium per script and tokenizer (the compact figure for the README)."""
    plt = _pyplot()
    tokenizers = list(dict.fromkeys(r.tokenizer for r in rows))
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        cells[(r.script, r.tokenizer)].append(r.premium)
    scripts = sorted(
        {s for s, _ in cells},
        key=lambda s: statistics.median(p for (sc, _), ps in cells.items() if sc == s for p in ps),
    )
    counts = {s: len(cells[(s, tokenizers[0])]) for s in scripts}
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.26 * len(scripts)))
    offset = 0.6 / max(len(tokenizers), 1)
    for i, tok in enumerate(tokenizers):
        ys = [k + (i - (len(tokenizers) - 1) / 2) * offset for k in range(len(scripts))]
        xs = [statistics.median(cells[(s, tok)]) for s in scripts]
        ax.scatter(xs, ys, s=22, marker=_MARKERS[i % len(_MARKERS)], label=tok, zorder=3)
    for k in range(0, len(scripts), 2):
        ax.axhspan(k - 0.5, k + 0.5, color="0.94", zorder=0)
    ax.set_yticks(range(len(scripts)), [f"{script_name(s)} ({counts[s]})" for s in scripts], fontsize=8)
    ax.set_ylim(len(scripts) - 0.5, -0.5)
    _log_premium_axis(ax, [statistics.median(v) for v in cells.values()])
    ax.set_xlabel("median token premium vs English over the script's languages (UDHR; log scale)")
    _top_legend(fig, ax, len(tokenizers))
    ax.grid(axis="x", color="0.85", lw=0.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def vocab_premiums(rows: Sequence[VocabRow], reference: str, path: Path) -> Path:
    """Premium vs vocabulary size per recipe (left) and token counts vs size per language (right)."""
    plt = _pyplot()
    languages = [lang for lang in dict.fromkeys(r.language for r in rows) if lang != reference]
    recipes = list(dict.fromkeys((r.algorithm, r.pretokenization) for r in rows))
    fig, axes = plt.subplots(len(languages), 2, figsize=(11, 5.6 * len(languages)), squeeze=False)
    for row_axes, lang in zip(axes, languages, strict=True):
        left, right = row_axes
        for i, (algorithm, pretok) in enumerate(recipes):
            label = f"{algorithm.upper() if algorithm == 'bpe' else 'Unigram'}, " + (
                "whitespace pre-tok." if pretok == "whitespace" else "superword (no pre-tok.)"
            )
            color = f"C{i}"
            own = sorted(
                (
                    r
                    for r in rows
                    if (r.algorithm, r.pretokenization) == (algorithm, pretok) and r.language == lang
                ),
                key=lambda r: r.vocab_size,
            )
            xs = [r.vocab_size for r in own]
            left.plot(xs, [r.premium for r in own], "o-", color=color, label=label + " (Bible, held out)")
            if any(r.udhr_premium for r in own):
                left.plot(
                    xs, [r.udhr_premium for r in own], "x--", color=color, alpha=0.7, label=label + " (UDHR)"
                )
            sat = [r for r in own if r.saturated]
            left.scatter([r.vocab_size for r in sat], [r.premium for r in sat], s=90, facecolors="none",
                         edgecolors=color)  # fmt: skip
            for language, style in ((lang, "-"), (reference, ":")):
                pts = sorted(
                    (r.actual_vocab_size, r.test_tokens)
                    for r in rows
                    if (r.algorithm, r.pretokenization, r.language) == (algorithm, pretok, language)
                )
                right.plot(*zip(*pts, strict=True), style, color=color, marker=".",
                           label=f"{label}: {language}")  # fmt: skip
        left.set_xscale("log")
        left.axhline(1.0, color="0.3", lw=0.8)
        left.set_xlabel("vocabulary size (requested; circled: trainer ran out of candidates)")
        left.set_ylabel(f"token premium {lang} vs {reference}")
        left.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        left.grid(color="0.9", lw=0.5)
        right.set_xscale("log")
        right.set_xlabel("vocabulary size (actual)")
        right.set_ylabel("tokens on the held-out verses")
        right.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        right.grid(color="0.9", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
