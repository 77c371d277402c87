"""`tokensift audit ...` end to end through the real command-line entry point."""

from __future__ import annotations

import csv
import lzma
from pathlib import Path

import pytest

from tokensift import cli
from tokensift.audit.vocab import load_bible


@pytest.fixture(autouse=True)
def audit_command(monkeypatch: pytest.MonkeyPatch) -> None:
    if "tokensift.audit.cli" not in cli.EXTRA_COMMANDS:
        monkeypatch.setattr(cli, "EXTRA_COMMANDS", [*cli.EXTRA_COMMANDS, "tokensift.audit.cli"])


def test_audit_tokenizers_writes_tables_plots_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    args = ["audit", "tokenizers", "--tokenizers", "smollm2-135m", "--languages", "eng,tur,cmn_hans,hin"]
    assert cli.main([*args, "--purity", "none", "--no-progress", "--out", str(out)]) == 0
    with (out / "premiums.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {"tokenizer", "language", "script", "premium", "chars_per_token"} <= set(rows[0])
    assert [r["language"] for r in rows] == ["eng", "tur", "cmn_hans", "hin"]
    assert float(rows[0]["premium"]) == 1.0
    summary = (out / "summary.md").read_text()
    assert "most favoured" in summary and "least favoured" in summary and "Hindi `hin`" in summary
    for name in ("premiums_by_script.png", "premiums_by_language.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokenizers", "smollm2-135m", "--languages", "eng,xx_nope"], "unknown language code 'xx_nope'"),
        (["--tokenizers", "no-such-tokenizer"], "unknown tokenizer 'no-such-tokenizer'"),
        (["--tokenizers", "smollm2-135m", "--purity", "qq"], "unknown language code 'qq'"),
    ],
)
def test_audit_errors_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["audit", "tokenizers", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokensift: error: ") and message in err and err.count("\n") == 1


def test_audit_vocab_on_a_small_bible(tmp_path: Path) -> None:
    bible = load_bible()
    lines = ["# tiny", "ref\teng\tspa"]
    lines += [
        f"{r}\t{e}\t{s}" for r, e, s in list(zip(bible.refs, *bible.verses.values(), strict=True))[:300]
    ]
    corpus = tmp_path / "bible.tsv.xz"
    corpus.write_bytes(lzma.compress("\n".join(lines).encode()))
    out = tmp_path / "vocab"
    args = ["audit", "vocab", "--corpus", str(corpus), "--sizes", "150,300", "--algorithms", "bpe"]
    assert cli.main([*args, "--no-progress", "--out", str(out)]) == 0
    with (out / "vocab.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 2 * 2 * 2
    assert "Vocabulary-size experiment" in (out / "vocab.md").read_text()
    assert (out / "vocab_premiums.png").is_file()


def test_audit_vocab_rejects_bad_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["audit", "vocab", "--algorithms", "wordpiece", "--out", str(tmp_path)]) == 2
    assert "--algorithms takes bpe and/or unigram" in capsys.readouterr().err
    assert cli.main(["audit", "vocab", "--languages", "deu", "--out", str(tmp_path)]) == 2
    assert "unknown language code 'deu'" in capsys.readouterr().err


def test_audit_languages_lists_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["audit", "languages"]) == 0
    out = capsys.readouterr().out
    assert "tur" in out and "Turkish" in out and "Cyrillic" in out


@pytest.mark.slow
def test_full_audit_of_the_embedded_tokenizers_and_cl100k(tmp_path: Path) -> None:
    """The issue's acceptance command (all languages), where the embedded packages are installed."""
    from tokensift.audit.tokenizer import load_audit_tokenizer
    from tokensift.errors import TokensiftError

    names = ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m", "cl100k"]
    for name in names:
        try:
            load_audit_tokenizer(name)
        except TokensiftError as exc:
            pytest.skip(str(exc))
    out = tmp_path / "audit"
    args = ["audit", "tokenizers", "--tokenizers", ",".join(names), "--purity", "tur", "--no-progress"]
    assert cli.main([*args, "--out", str(out)]) == 0
    with (out / "premiums.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 126
    eng = [r for r in rows if r["language"] == "eng"]
    assert [float(r["premium"]) for r in eng] == [1.0] * 4
    summary = (out / "summary.md").read_text()
    assert summary.count("- least favoured") == 4
