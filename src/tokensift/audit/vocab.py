"""The vocabulary-size experiment of Arnett et al. (arXiv 2510.21909), at small scale.

"Explaining and Mitigating Crosslingual Tokenizer Inequities" trains monolingual tokenizers per
language while varying the algorithm (BPE, Unigram, SuperBPE), the vocabulary size and the
pre-tokenisation, and finds that vocabulary size and whitespace pre-tokenisation drive token
premiums, that each language has its own "optimal" vocabulary size, and that superword tokenizers
(merges across spaces) reduce premiums. Here: BPE and Unigram from the `tokenizers` library, trained
per language on the verse-aligned Bible (shipped: English WEB and Spanish Reina-Valera 1909, New
Testament; every 10th verse held out), with a Metaspace pre-tokenizer that either splits on
whitespace or not (superword tokenizers; a one-stage stand-in for SuperBPE's two-stage curriculum).
Premiums are measured on the held-out verses and, out of domain, on the UDHR.
"""

from __future__ import annotations

import itertools
import json
import lzma
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from tokensift.errors import TokensiftError

Algorithm = Literal["bpe", "unigram"]
Pretokenization = Literal["whitespace", "none"]
ALGORITHMS: tuple[Algorithm, ...] = ("bpe", "unigram")
PRETOKENIZATIONS: tuple[Pretokenization, ...] = ("whitespace", "none")
DEFAULT_SIZES = (500, 1000, 2000, 4000, 8000, 16000, 32000)
UNK = "<unk>"
HELD_OUT_EVERY = 10  # verse i is held out for evaluation when i % 10 == 0


@dataclass(frozen=True)
class BibleCorpus:
    """Verse-aligned texts: `verses[lang][i]` translates `verses[other][i]`."""

    languages: tuple[str, ...]
    refs: tuple[str, ...]
    verses: dict[str, tuple[str, ...]]
    source: str

    def split(self, language: str) -> tuple[list[str], list[str]]:
        """(train, held-out) verses of one language; the held-out verses are parallel across languages."""
        if language not in self.verses:
            raise TokensiftError(
                f"unknown language code {language!r} for the Bible corpus; known: {', '.join(self.languages)}"
            )
        verses = self.verses[language]
        train = [v for i, v in enumerate(verses) if i % HELD_OUT_EVERY]
        test = [v for i, v in enumerate(verses) if not i % HELD_OUT_EVERY]
        return train, test


def load_bible(path: str | Path | None = None) -> BibleCorpus:
    """The shipped New Testament (or a file from `scripts/build_bible_corpus.py --out PATH`)."""
    file = Path(path) if path else Path(str(resources.files("tokensift.audit") / "data" / "bible_nt.tsv.xz"))
    if not file.is_file():
        raise TokensiftError(f"Bible corpus {file} is missing; build it with scripts/build_bible_corpus.py")
    lines = lzma.decompress(file.read_bytes()).decode("utf-8").splitlines()
    source = lines[0].lstrip("# ") if lines and lines[0].startswith("#") else str(file)
    body = [line for line in lines if not line.startswith("#")]
    header, rows = body[0].split("\t"), [line.split("\t") for line in body[1:] if line]
    languages = tuple(header[1:])
    verses = {lang: tuple(row[i + 1] for row in rows) for i, lang in enumerate(languages)}
    return BibleCorpus(languages, tuple(row[0] for row in rows), verses, source)


def _tokenizer(algorithm: Algorithm, pretokenization: Pretokenization) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    model = models.BPE(unk_token=UNK) if algorithm == "bpe" else models.Unigram()
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFC()
    # Same pre-tokenizer for both variants, so whitespace splitting is the only difference.
    split = pretokenization == "whitespace"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=split)
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="always", split=split)
    return tokenizer


def train(
    texts: Sequence[str], algorithm: Algorithm, pretokenization: Pretokenization, vocab_size: int
) -> Any:
    """A `tokenizers.Tokenizer` trained on `texts` (deterministic: no sampling in either trainer)."""
    from tokenizers import trainers

    if algorithm not in ALGORITHMS or pretokenization not in PRETOKENIZATIONS:
        raise TokensiftError(f"unknown tokenizer recipe {algorithm!r}/{pretokenization!r}")
    tokenizer = _tokenizer(algorithm, pretokenization)
    if algorithm == "bpe":
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK], show_progress=False)
    else:
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=[UNK], unk_token=UNK, show_progress=False
        )
    tokenizer.train_from_iterator(list(texts), trainer)
    return tokenizer


def truncate_bpe(tokenizer: Any, vocab_size: int) -> Any:
    """The BPE tokenizer that training with a smaller `vocab_size` would give.

    BPE training is greedy: merges are learned in order and never revised, so the first k merges of
    a large run are exactly the merges of a run stopped at k. One training serves every size.
    """
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges = spec["model"]["merges"]
    base = len(vocab) - len(merges)  # special tokens + alphabet come first
    keep = max(vocab_size, base)
    spec["model"]["vocab"] = {tok: i for tok, i in vocab.items() if i < keep}
    spec["model"]["merges"] = merges[: keep - base]
    return Tokenizer.from_str(json.dumps(spec))


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> int:
    return sum(len(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False))


@dataclass(frozen=True)
class VocabRow:
    """One trained tokenizer: corpus token counts on held-out Bible verses and on the UDHR."""

    language: str
    algorithm: str
    pretokenization: str
    vocab_size: int  # requested
    actual_vocab_size: int  # smaller when the trainer runs out of candidates
    train_chars: int
    test_tokens: int
    test_chars: int
    udhr_tokens: int | None
    premium: float | None = None  # test_tokens / reference language's, same recipe and size
    udhr_premium: float | None = None

    @property
    def saturated(self) -> bool:
        return self.actual_vocab_size < 0.95 * self.vocab_size


def vocab_experiment(
    corpus: BibleCorpus,
    sizes: Sequence[int] = DEFAULT_SIZES,
    algorithms: Sequence[Algorithm] = ALGORITHMS,
    pretokenizations: Sequence[Pretokenization] = PRETOKENIZATIONS,
    languages: Sequence[str] | None = None,
    reference: str = "eng",
    udhr: dict[str, list[str]] | None = None,
    progress: Callable[[int], Any] | None = None,
) -> list[VocabRow]:
    """Train every (language, algorithm, pre-tokenisation, size) and return rows with premiums.

    `udhr` maps a language to its UDHR articles for the out-of-domain count; `progress(n)` is called
    with the number of tokenizers just finished (a tqdm bar's `update`).
    """
    languages = list(languages or corpus.languages)
    if reference not in languages:
        languages.insert(0, reference)
    if not sizes or min(sizes) < 100:
        raise TokensiftError("vocabulary sizes must be at least 100")
    rows: list[VocabRow] = []
    for language in languages:
        train_texts, test_texts = corpus.split(language)
        train_chars, test_chars = sum(map(len, train_texts)), sum(map(len, test_texts))
        for algorithm in algorithms:
            for pretokenization in pretokenizations:
                largest = (
                    train(train_texts, algorithm, pretokenization, max(sizes)) if algorithm == "bpe" else None
                )
                for size in sorted(sizes):
                    if largest is not None:
                        tokenizer = truncate_bpe(largest, size)
                    else:
                        tokenizer = train(train_texts, algorithm, pretokenization, size)
                    udhr_texts = (udhr or {}).get(language)
                    rows.append(
                        VocabRow(
                            language=language,
                            algorithm=algorithm,
                            pretokenization=pretokenization,
                            vocab_size=size,
                            actual_vocab_size=tokenizer.get_vocab_size(),
                            train_chars=train_chars,
                            test_tokens=count_tokens(tokenizer, test_texts),
                            test_chars=test_chars,
                            udhr_tokens=count_tokens(tokenizer, udhr_texts) if udhr_texts else None,
                        )
                    )
                    if progress:
                        progress(1)
    return with_premiums(rows, reference)


def with_premiums(rows: list[VocabRow], reference: str) -> list[VocabRow]:
    """Fill `premium` and `udhr_premium` against the reference language's row of the same recipe."""
    ref = {(r.algorithm, r.pretokenization, r.vocab_size): r for r in rows if r.language == reference}
    out = []
    for row in rows:
        base = ref.get((row.algorithm, row.pretokenization, row.vocab_size))
        premium = row.test_tokens / base.test_tokens if base and base.test_tokens else None
        udhr_premium = (
            row.udhr_tokens / base.udhr_tokens if base and base.udhr_tokens and row.udhr_tokens else None
        )
        out.append(VocabRow(**{**row.__dict__, "premium": premium, "udhr_premium": udhr_premium}))
    return out


def parity_size(rows: Sequence[VocabRow], target_tokens: int) -> float | None:
    """Vocabulary size at which a language's token count falls to `target_tokens`.

    Log-linear interpolation between the trained sizes of one language and recipe; None when even the
    largest trained size needs more tokens. This is the per-language "optimal" size of Arnett et al.:
    the vocabulary that gives the language the token count English gets at a given size.
    """
    points = sorted((r.actual_vocab_size, r.test_tokens) for r in rows)
    for (v0, t0), (v1, t1) in itertools.pairwise(points):
        if t0 >= target_tokens >= t1 and t0 != t1:
            frac = (t0 - target_tokens) / (t0 - t1)
            return math.exp(math.log(v0) + frac * (math.log(v1) - math.log(v0)))
    if points and points[0][1] <= target_tokens:
        return float(points[0][0])
    return None
