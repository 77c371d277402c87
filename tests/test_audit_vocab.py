"""The vocabulary-size experiment on a small slice of the shipped Bible."""

from __future__ import annotations

import pytest

from tokensift.audit.vocab import (
    BibleCorpus,
    VocabRow,
    count_tokens,
    load_bible,
    parity_size,
    train,
    truncate_bpe,
    vocab_experiment,
)
from tokensift.errors import TokensiftError


def small_bible(verses: int = 400) -> BibleCorpus:
    full = load_bible()
    return BibleCorpus(
        full.languages,
        full.refs[:verses],
        {lang: v[:verses] for lang, v in full.verses.items()},
        full.source,
    )


@pytest.mark.parametrize("pretokenization", ["whitespace", "none"])
def test_truncated_bpe_equals_a_smaller_training(pretokenization: str) -> None:
    train_texts, test_texts = small_bible().split("spa")
    large = train(train_texts, "bpe", pretokenization, 600)
    for size in (150, 300):
        small = train(train_texts, "bpe", pretokenization, size)
        cut = truncate_bpe(large, size)
        assert cut.get_vocab_size() == small.get_vocab_size() == size
        assert [e.ids for e in cut.encode_batch(test_texts)] == [
            e.ids for e in small.encode_batch(test_texts)
        ]


def test_superword_tokens_cross_spaces() -> None:
    train_texts, _ = small_bible().split("eng")
    words = train(train_texts, "bpe", "whitespace", 600)
    superwords = train(train_texts, "bpe", "none", 600)
    assert not any("▁" in tok[1:] for tok in words.get_vocab())
    assert any("▁" in tok[1:] for tok in superwords.get_vocab())


def test_experiment_rows_and_premiums() -> None:
    bible = small_bible()
    udhr = {"eng": ["All human beings are born free."], "spa": ["Todos los seres humanos nacen libres."]}
    rows = vocab_experiment(bible, sizes=(200, 400), udhr=udhr)
    assert len(rows) == 2 * 2 * 2 * 2  # languages x algorithms x pre-tokenisations x sizes
    for row in rows:
        assert row.test_tokens > 0 and row.actual_vocab_size <= row.vocab_size
        if row.language == "eng":
            assert row.premium == 1.0 and row.udhr_premium == 1.0
        else:
            assert row.premium is not None and 0.5 < row.premium < 2.0
    spa = [r for r in rows if (r.language, r.algorithm, r.pretokenization) == ("spa", "bpe", "whitespace")]
    assert spa[0].test_tokens > spa[1].test_tokens  # a larger vocabulary needs fewer tokens
    assert rows == vocab_experiment(bible, sizes=(200, 400), udhr=udhr)  # deterministic


def test_parity_size_interpolates_in_log_space() -> None:
    def row(size: int, tokens: int) -> VocabRow:
        return VocabRow("spa", "bpe", "whitespace", size, size, 1, tokens, 1, None)

    rows = [row(1000, 200), row(4000, 100)]
    assert parity_size(rows, 150) == pytest.approx(2000.0)
    assert parity_size(rows, 50) is None
    assert parity_size(rows, 300) == 1000.0


def test_bad_inputs() -> None:
    with pytest.raises(TokensiftError, match="at least 100"):
        vocab_experiment(small_bible(50), sizes=(10,))
    with pytest.raises(TokensiftError, match="unknown tokenizer recipe"):
        train(["a b"], "wordpiece", "whitespace", 100)  # type: ignore[arg-type]


def test_count_tokens_matches_encode() -> None:
    train_texts, test_texts = small_bible().split("eng")
    tok = train(train_texts, "unigram", "whitespace", 300)
    assert count_tokens(tok, test_texts[:5]) == sum(len(tok.encode(t).ids) for t in test_texts[:5])
