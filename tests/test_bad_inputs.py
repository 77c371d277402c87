"""The bad-input catalogue: every case is refused with exit status 2 (CLI) or a TokensiftError (API),
one line on stderr that names the problem and the fix, no traceback, and nothing half-written.

CLI cases call `tokensift.cli.main` in-process; a few run the installed console script. Where a model
is needed it is a tiny random Llama saved to disk with a character-level tokenizer and a chat
template, so `--model DIR` goes through the real loading path (and is loaded once per session).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

import tokensift
from tokensift import TokensiftError
from tokensift.bench.config import BenchConfig
from tokensift.bench.results import read_meta, read_rows
from tokensift.bench.runner import run_bench
from tokensift.bench.suites import get_suite
from tokensift.calibration import load_artefact, save_artefact
from tokensift.cli import main
from tokensift.methods import parse_methods
from tokensift.models import load, load_tokenizer

from .conftest import prompt_ids, tiny_model

TEMPLATE = (
    "{% for m in messages %}U: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
)
# A template that keeps only the first 40 characters of the message: the question falls off.
TRIMMING = (
    "{% for m in messages %}U: {{ m['content'][:40] }}\n{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def char_tokenizer(template: str) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (ids below the tiny models' vocabulary of 128)."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = template
    return fast


def _saved_model(directory: Path, template: str) -> str:
    """A tiny model (context 1024) saved with its tokenizer, then loaded once so the CLI reuses it."""
    tiny_model(context=1024).model.save_pretrained(directory)
    char_tokenizer(template).save_pretrained(directory)
    load(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _saved_model(tmp_path_factory.mktemp("tiny-chat"), TEMPLATE)


@pytest.fixture(scope="session")
def trimming_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _saved_model(tmp_path_factory.mktemp("tiny-trimming"), TRIMMING)


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: str) -> Path:
    """A real (tiny) bench output: results.jsonl with 2 rows and meta.json."""
    out = tmp_path_factory.mktemp("bench") / "out"
    argv = ["bench", "--model", model_dir, "--tasks", "passkey", "--methods", "dense,snapkv:budget=0.5"]
    argv += ["--lengths", "640", "--samples", "1", "--depths", "0.5", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert len(read_rows(out / "results.jsonl")) == 2
    for extra in out.iterdir():  # keep only what a bench writes: the report's files come and go
        if extra.name not in ("results.jsonl", "meta.json"):
            extra.unlink()
    return out


@pytest.fixture
def results(tmp_path: Path, bench_dir: Path) -> Path:
    """A private copy of the bench output to corrupt."""
    return Path(shutil.copytree(bench_dir, tmp_path / "results"))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """Run the CLI in-process: exit status 2 and exactly one stderr line holding every needle."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("tokensift: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def api_error(call: Callable[[], Any], *needles: str) -> str:
    with pytest.raises(TokensiftError) as exc:
        call()
    text = str(exc.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text
    return text


def _corrupt_middle(path: Path) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:40], *lines[1:]]) + "\n")


# -- generate: method specs -------------------------------------------------------------------------

SPEC_CASES = [
    ("suffix_decoding:max_spec_factor=nan", ["suffix_decoding max_spec_factor", "finite number", "nan"]),
    ("keyformer:tau_init=nan", ["keyformer tau_init must be a finite number"]),
    ("keyformer:tau_end=inf", ["keyformer tau_end must be a finite number"]),
    ("h2o:recent_fraction=-inf", ["recent_fraction must be a finite number"]),
    ("snapkv:budget=nan", ["budget", "finite"]),
    ("bogus", ["unknown method 'bogus'", "known methods are", "snapkv"]),
    ("snapkv:windw=3", ["snapkv has no parameter 'windw'", "its parameters are", "window_size"]),
    ("snapkv:window_size=2.5", ["snapkv.window_size must be int", "'2.5'"]),
    ("snapkv:pooling=median", ["must be one of", "max"]),
    ("snapkv:budget=0", ["budget must be a positive number of tokens"]),
    ("snapkv:budget=-1", ["budget must be a positive number of tokens"]),
    ("snapkv:budget=1.5", ["fraction of the prompt must lie in (0, 1]"]),
    ("snapkv+h2o", ["both claim the evict hook"]),
    ("snapkv+", ["malformed method spec", "NAME[:key=value"]),
]


@pytest.mark.parametrize(("spec", "needles"), SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_generate_bad_method(spec: str, needles: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before any model is loaded (the default model is not touched).
    cli_error(capsys, ["generate", "--method", spec, "hello"], *needles)


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("suffix_decoding:max_spec_factor=nan", ["max_spec_factor must be a finite number"]),
        ("keyformer:tau_init=nan", ["tau_init must be a finite number"]),
        ("snapkv:budget=inf", ["finite number"]),
        ("", ["malformed method spec"]),
        ("snapkv:budget", ["expected key=value"]),
    ],
)
def test_parse_methods_api(spec: str, needles: list[str]) -> None:
    api_error(lambda: parse_methods(spec), *needles)


def test_non_finite_parameters_rejected_on_construction() -> None:
    """Every float parameter of every method, set directly in Python, refuses NaN and inf."""
    from tokensift.methods import REGISTRY
    from tokensift.methods.keyformer import Keyformer
    from tokensift.methods.suffix_decoding import SuffixDecoding

    api_error(lambda: Keyformer(tau_init=float("nan")), "keyformer tau_init must be a finite number")
    api_error(lambda: SuffixDecoding(max_spec_factor=float("inf")), "max_spec_factor", "finite")
    checked = 0
    for cls in REGISTRY.values():
        if getattr(cls, "wraps", False):
            continue
        for name, default in cls().params().items():
            if isinstance(default, float) and not isinstance(default, bool):
                for bad in (float("nan"), float("inf"), float("-inf")):
                    api_error(lambda cls=cls, name=name, bad=bad: cls(**{name: bad}), name, "finite")
                checked += 1
    assert checked >= 8  # budgets, thresholds, fractions, temperatures across the registry


# -- generate: sampling, prompts, lengths -----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "needles"),
    [
        (["--max-new-tokens", "0"], ["max_new_tokens must be >= 1, got 0"]),
        (["--max-new-tokens", "-3"], ["max_new_tokens must be >= 1"]),
        (["--temperature", "-1"], ["temperature must be a finite number >= 0", "-1.0"]),
        (["--temperature", "nan"], ["temperature must be a finite number >= 0", "nan"]),
        (["--top-p", "0"], ["top_p in (0, 1]", "0.0"]),
        (["--top-p", "1.5"], ["top_p in (0, 1]", "1.5"]),
        (["--max-new-tokens", "1100"], ["plus max_new_tokens 1100 exceeds", "context of 1024 tokens"]),
    ],
    ids=["max_new_tokens=0", "max_new_tokens<0", "temperature<0", "temperature=nan", "top_p=0",
         "top_p>1", "beyond-context"],
)  # fmt: skip
def test_generate_bad_options(
    options: list[str], needles: list[str], model_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_error(capsys, ["generate", "--model", model_dir, *options, "hello"], *needles)


def test_generate_prompt_beyond_context(model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    cli_error(capsys, ["generate", "--model", model_dir, "x" * 1100], "exceeds", "context of 1024 tokens")


@pytest.mark.parametrize("prompt", ["", "   \n "])
def test_generate_empty_prompt(prompt: str, capsys: pytest.CaptureFixture[str]) -> None:
    cli_error(capsys, ["generate", prompt], "empty prompt", "--prompt-file")


def test_generate_no_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    cli_error(capsys, ["generate"], "no prompt", "--prompt-file FILE")


def test_generate_prompt_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.txt").write_text("hi")
    cli_error(capsys, ["generate", "--prompt-file", str(tmp_path / "p.txt"), "hi"], "not both")


def test_generate_missing_prompt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.txt"
    cli_error(capsys, ["generate", "--prompt-file", str(missing)], f"prompt file {missing} does not exist")


def test_generate_prompt_file_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("Caf\u00e9 cr\u00e8me".encode("latin-1"))
    cli_error(capsys, ["generate", "--prompt-file", str(path)], "is not UTF-8 text (byte 3)", "iconv")


def test_generate_stdin_not_utf8(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\xffcd"), encoding="utf-8"))
    cli_error(capsys, ["generate", "-"], "standard input is not UTF-8 text (byte 2)")


def test_generate_empty_prompt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_text("\n")
    cli_error(capsys, ["generate", "--prompt-file", str(tmp_path / "empty.txt")], "empty prompt")


def test_generate_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    cli_error(capsys, ["generate", "--model", "no-such-model", "hi"], "unknown model", "smollm2-135m")


def test_generate_empty_question(model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    cli_error(capsys, ["generate", "--model", model_dir, "--question", "  ", "context"], "question is empty")


def test_chat_template_that_trims_the_question(trimming_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--model", trimming_dir, "--question", "What is the secret word?", "y" * 60]
    cli_error(capsys, argv, "does not keep the question", "--raw")
    # With --raw the template is not applied and the same request runs.
    capsys.readouterr()
    assert main([*argv[:3], "--raw", "--max-new-tokens", "2", *argv[3:]]) == 0


def test_chat_template_trim_api(trimming_dir: str) -> None:
    model = load(trimming_dir)
    api_error(
        lambda: tokensift.generate(model, "z" * 60, question="Where is it?", max_new_tokens=2),
        "does not keep the question",
    )


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"max_new_tokens": 0}, ["max_new_tokens must be >= 1"]),
        ({"temperature": float("nan")}, ["temperature must be a finite number"]),
        ({"temperature": float("inf")}, ["temperature must be a finite number"]),
        ({"top_p": float("nan")}, ["top_p in (0, 1]"]),
        ({"method": "suffix_decoding:max_spec_factor=nan"}, ["max_spec_factor must be a finite number"]),
        ({"max_new_tokens": 200}, ["exceeds", "context of 128 tokens"]),
    ],
    ids=["max_new_tokens", "temperature-nan", "temperature-inf", "top_p-nan", "nan-param", "context"],
)
def test_generate_api(kwargs: dict[str, Any], needles: list[str]) -> None:
    model = tiny_model(context=128)
    api_error(lambda: tokensift.generate(model, prompt_ids(20), **kwargs), *needles)


def test_generate_api_empty_prompts(model_dir: str) -> None:
    api_error(lambda: tokensift.generate(tiny_model(), [], max_new_tokens=2), "empty prompt")
    api_error(lambda: tokensift.generate(load(model_dir), " ", max_new_tokens=2), "empty prompt")


# -- bench -----------------------------------------------------------------------------------------


def _bench(out: Path, *options: str, tasks: str = "passkey", lengths: str = "256") -> list[str]:
    return ["bench", "--tasks", tasks, "--methods", "dense", "--lengths", lengths, "--out", str(out),
            "--no-progress", *options]  # fmt: skip


@pytest.mark.parametrize(
    ("options", "needles"),
    [
        ({"tasks": "no_such_task"}, ["unknown task 'no_such_task'", "known tasks are"]),
        ({"lengths": "2x"}, ["bad length '2x'", "1k, 2k or 4096"]),
        ({"lengths": "0"}, ["bad length '0'"]),
        ({"lengths": ","}, ["--lengths is empty"]),
        ({"extra": ["--samples", "0"]}, ["--samples must be >= 1, got 0"]),
        ({"extra": ["--depths", "1.5"]}, ["depths must lie in [0, 1]"]),
        ({"extra": ["--depths", "a,b"]}, ["bad depths 'a,b'", "comma-separated numbers"]),
        ({"extra": ["--methods", "snapkv:budget=nan"]}, ["finite number"]),
        ({"extra": ["--methods", "snapkv+h2o"]}, ["both claim the evict hook"]),
        ({"extra": ["--suite", "nope"]}, ["unknown suite 'nope'", "demo"]),
    ],
    ids=["unknown-task", "length-2x", "length-0", "lengths-empty", "samples-0", "depth>1", "depth-text",
         "nan-budget", "two-evictors", "unknown-suite"],
)  # fmt: skip
def test_bench_bad_grid(
    options: dict[str, Any], needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = _bench(out, *options.get("extra", []), tasks=options.get("tasks", "passkey"),
                  lengths=options.get("lengths", "256"))  # fmt: skip
    cli_error(capsys, argv, *needles)
    assert not out.exists()  # refused before anything was created


def test_bench_needs_out_and_grid(capsys: pytest.CaptureFixture[str]) -> None:
    cli_error(capsys, ["bench", "--tasks", "passkey", "--methods", "dense", "--lengths", "1k"], "needs --out")
    cli_error(capsys, ["bench", "--methods", "dense", "--out", "x"], "bench needs --tasks, --lengths")


def test_bench_length_beyond_context(
    tmp_path: Path, model_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new"
    cli_error(capsys, _bench(out, "--model", model_dir, lengths="2k"), "length 2048 does not fit", "1024")
    assert not out.exists()  # no half-made output directory


def test_bench_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    cli_error(capsys, _bench(target), f"--out {target} is a file", "give a directory")
    cli_error(capsys, _bench(target / "sub"), "which is a file")
    assert target.read_text() == "keep me\n" and sorted(tmp_path.iterdir()) == [target]


def test_bench_resume_refuses_a_corrupt_middle_line(
    results: Path, model_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _corrupt_middle(results / "results.jsonl")
    before = snapshot(results)
    argv = _bench(results, "--model", model_dir, "--methods", "dense,snapkv:budget=0.5", "--depths", "0.5",
                  "--samples", "1", lengths="640")  # fmt: skip
    cli_error(capsys, argv, "results.jsonl:2 is not a results row", "fix or delete that line")
    assert snapshot(results) == before


def test_bench_resume_refuses_a_corrupt_meta(
    results: Path, model_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = results / "meta.json"
    meta.write_text(meta.read_text()[:30])  # truncated
    # And a truncated last row, which alone would be repaired: nothing may be rewritten.
    (results / "results.jsonl").write_bytes((results / "results.jsonl").read_bytes()[:-20])
    before = snapshot(results)
    cli_error(
        capsys,
        _bench(results, "--model", model_dir, lengths="640"),
        "meta.json is corrupt",
        "restore it, or delete it",
    )
    assert snapshot(results) == before


def test_bench_resume_after_a_killed_run_repairs_the_last_line(
    results: Path, model_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The one damage resume fixes itself: a truncated last line (no final newline) is dropped and rerun."""
    path = results / "results.jsonl"
    full = path.read_text()
    path.write_text(full[:-30])
    argv = _bench(results, "--model", model_dir, "--methods", "dense,snapkv:budget=0.5", "--depths", "0.5",
                  "--samples", "1", lengths="640")  # fmt: skip
    assert main(argv) == 0
    assert len(read_rows(path)) == 2 and path.read_text().endswith("\n")


def test_run_bench_api(tmp_path: Path) -> None:
    model = tiny_model(context=512)
    config = BenchConfig(tasks=["passkey"], methods=["dense"], lengths=[1024], samples=1, depths=[0.5])
    (tmp_path / "file").write_text("")
    api_error(lambda: run_bench(config, tmp_path / "file", progress=False, model=model), "is a file")
    api_error(lambda: run_bench(config, tmp_path / "new", progress=False, model=model), "does not fit")
    assert not (tmp_path / "new").exists()
    bad = BenchConfig(tasks=["nope"], methods=["dense"], lengths=[256])
    api_error(lambda: run_bench(bad, tmp_path / "new", progress=False, model=model), "unknown task 'nope'")
    api_error(lambda: get_suite("nope"), "unknown suite 'nope'", "ruler-lite")


# -- results files ---------------------------------------------------------------------------------


def test_read_rows_policy(results: Path) -> None:
    path = results / "results.jsonl"
    lines = path.read_text().splitlines()
    # A truncated last line (a killed writer) is dropped, and rewritten away only with repair.
    path.write_text(lines[0] + "\n" + lines[1][:50])
    assert len(read_rows(path)) == 1 and not path.read_text().endswith("\n")
    assert len(read_rows(path, repair=True)) == 1 and path.read_text() == lines[0] + "\n"
    # A corrupt line anywhere else, or a complete last line that is not a row, is an error naming it.
    path.write_text(lines[0][:50] + "\n" + lines[1] + "\n")
    api_error(lambda: read_rows(path, repair=True), f"{path}:1 is not a results row", "not JSON")
    path.write_text(lines[0] + "\n[1, 2]\n")
    api_error(lambda: read_rows(path), f"{path}:2", "a JSON list, not an object")
    path.write_bytes(b"\xff\xfe" + lines[0].encode())
    api_error(lambda: read_rows(path), "is not UTF-8")
    (results / "meta.json").write_text('{"runs": {}}')
    api_error(lambda: read_meta(results / "meta.json"), "meta.json is corrupt (no run list)")


# -- report ----------------------------------------------------------------------------------------


def test_report_missing_and_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_error(capsys, ["report", str(tmp_path / "nope")], "has no results.jsonl", "tokensift bench --out")
    cli_error(capsys, ["report", str(tmp_path)], "has no results.jsonl")
    (tmp_path / "results.jsonl").write_text("")
    cli_error(capsys, ["report", str(tmp_path)], "no scored results", "it is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_report_on_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("x")
    cli_error(capsys, ["report", str(tmp_path / "f")], "has no results.jsonl")


def test_report_all_runs_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results.jsonl").write_text(json.dumps({"task": "passkey", "error": "refused"}) + "\n")
    cli_error(capsys, ["report", str(tmp_path)], "no scored results", "all 1 runs failed")


def test_report_corrupt_middle_line(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _corrupt_middle(results / "results.jsonl")
    before = snapshot(results)
    cli_error(capsys, ["report", str(results)], "results.jsonl:2 is not a results row")
    assert snapshot(results) == before  # no summary.md, report.html or plots


def test_report_corrupt_meta(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (results / "meta.json").write_text("{not json")
    before = snapshot(results)
    cli_error(capsys, ["report", str(results)], "meta.json is corrupt (not JSON", "delete it")
    assert snapshot(results) == before


def test_report_works_on_the_intact_copy(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The control for the corruption cases above: the same files, unharmed, report fine."""
    assert main(["report", str(results)]) == 0
    assert (results / "summary.md").is_file()


# -- calibration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["minference", "--length", "100000"], ["--length must lie in [1, 1024]", "got 100000"]),
        (["minference", "--length", "-5"], ["--length must lie in [1, 1024]", "got -5"]),
        (["minference", "--budget", "10"], ["--budget must be at least 128 keys"]),
        (["dhsa", "--windows", "0"], ["--windows must be at least 1, got 0"]),
        (["dhsa", "--val-windows", "0"], ["--val-windows must be at least 1"]),
        (["dhsa", "--epochs", "0"], ["--epochs must be at least 1"]),
        (["dhsa", "--length", "4096"], ["--length 4096 exceeds", "context of 1024"]),
        (["dhsa", "--length", "256", "--lr", "nan"], ["--lr must be a positive finite number"]),
        (["dhsa", "--length", "256", "--heads", "3"], ["--heads 3 must divide the key width 32"]),
        (["compresskv", "--depths", "0.5,1.5"], ["--depths in [0, 1]"]),
        (["compresskv", "--lengths", "1k"], ["comma-separated numbers"]),
        (["compresskv", "--lengths", "4096"], ["--lengths exceed", "context of 1024"]),
        (["compresskv", "--profile-samples", "0"], ["--profile-samples must be at least 1"]),
    ],
    ids=["minference-length-big", "minference-length-negative", "minference-budget", "dhsa-windows-0",
         "dhsa-val-windows-0", "dhsa-epochs-0", "dhsa-length", "dhsa-lr-nan", "dhsa-heads",
         "compresskv-depths", "compresskv-lengths-text", "compresskv-lengths-big", "compresskv-samples-0"],
)  # fmt: skip
def test_calibrate_bad_options(
    argv: list[str], needles: list[str], model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "artefact.json"
    cli_error(capsys, ["calibrate", argv[0], "--model", model_dir, "--out", str(out), *argv[1:]], *needles)
    assert list(tmp_path.iterdir()) == []


def test_calibrate_out_and_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_error(
        capsys, ["calibrate", "dhsa", "--model", "nope", "--out", str(tmp_path / "a.json")], "unknown model"
    )
    cli_error(capsys, ["calibrate", "dhsa", "--model", "nope", "--out", str(tmp_path)], "is a directory")
    (tmp_path / "f").write_text("")
    cli_error(capsys, ["calibrate", "dhsa", "--model", "nope", "--out", str(tmp_path / "f" / "a.json")],
              "f is a file")  # fmt: skip


DHSA = "dhsa:budget=64,block_size=16,sinks=8,local=16,predictor="  # sparse on a 300-token prompt


@pytest.fixture
def artefacts(tmp_path: Path) -> tuple[tokensift.Model, Path]:
    model = tiny_model(context=512)
    for method, payload in {
        "minference": {"patterns": []},
        "dhsa": {"predictor": {}, "weights": {}},
        "compresskv": {"heads": [], "layer_scores": []},
    }.items():
        save_artefact(method, model, payload, "test", tmp_path / f"{method}.json")
    return model, tmp_path


def test_calibration_file_checks(artefacts: tuple[tokensift.Model, Path]) -> None:
    model, d = artefacts
    assert load_artefact("minference", model, d / "minference.json")["patterns"] == []  # control
    text = (d / "minference.json").read_text()
    (d / "minference.json").write_text(text[: len(text) // 2])  # truncated
    api_error(lambda: load_artefact("minference", model, d / "minference.json"), "is not valid JSON",
              "tokensift calibrate minference --model tiny-llama")  # fmt: skip
    (d / "list.json").write_text("[]")
    api_error(lambda: load_artefact("dhsa", model, d / "list.json"), "is not a JSON object")
    api_error(lambda: load_artefact("minference", model, d / "dhsa.json"), "is a dhsa calibration")
    document = json.loads((d / "compresskv.json").read_text())
    del document["layer_scores"]
    (d / "compresskv.json").write_text(json.dumps(document))
    api_error(lambda: load_artefact("compresskv", model, d / "compresskv.json"), "lacks layer_scores")
    (d / "bin.json").write_bytes(b"\x89PNG\xff")
    api_error(lambda: load_artefact("dhsa", model, d / "bin.json"), "not valid JSON (not UTF-8)")
    api_error(lambda: load_artefact("dhsa", model, d / "missing.json"), "does not exist")


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("minference:config={d}/minference.json", ["minference calibration", "not valid JSON"]),
        (DHSA + "{d}/dhsa.json", ["dhsa calibration", "not valid JSON"]),
        (
            "compresskv:budget=64,calibration={d}/compresskv.json",
            ["compresskv calibration", "not valid JSON"],
        ),
        (DHSA + "{d}/nope.json", ["does not exist"]),
    ],
    ids=["minference", "dhsa", "compresskv", "missing"],
)
def test_truncated_calibration_through_a_method(
    spec: str, needles: list[str], artefacts: tuple[tokensift.Model, Path]
) -> None:
    model, d = artefacts
    for path in d.glob("*.json"):
        path.write_text(path.read_text()[:25])
    spec = spec.format(d=d)
    api_error(lambda: tokensift.generate(model, prompt_ids(300), spec, max_new_tokens=2), *needles)


# -- audit -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["tokenizers", "--tokenizers", "no-such-tokenizer", "--purity", "none"], ["no-such-tokenizer"]),
        (["tokenizers", "--languages", "xxx", "--purity", "none"], ["xxx"]),
        (["tokenizers", "--corpus", "/nonexistent/udhr.json"], ["/nonexistent/udhr.json"]),
        (["vocab", "--sizes", "1k", "--out", "{tmp}/v"], ["--sizes takes comma-separated integers"]),
        (["vocab", "--algorithms", "wordpiece", "--out", "{tmp}/v"], ["--algorithms takes bpe"]),
        (["vocab", "--languages", "deu", "--out", "{tmp}/v"], ["deu"]),
        (["tokenizers", "--out", "{tmp}/file"], ["is a file", "give a directory"]),
        (["vocab", "--out", "{tmp}/file"], ["is a file"]),
    ],
    ids=["unknown-tokenizer", "unknown-language", "missing-corpus", "sizes", "algorithms", "vocab-language",
         "tokenizers-out-file", "vocab-out-file"],
)  # fmt: skip
def test_audit_bad_inputs(
    argv: list[str], needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("keep\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    cli_error(capsys, ["audit", *argv, "--no-progress"] if argv[0] != "languages" else argv, *needles)
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "keep\n"
    )


def test_unknown_tokenizer_api() -> None:
    api_error(
        lambda: load_tokenizer("no-such-tokenizer"), "unknown model 'no-such-tokenizer'", "smollm2-135m"
    )


# -- methods, internal errors and the real console script -----------------------------------------


def test_methods_lists_without_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """`tokensift methods` takes no user input to get wrong; it must list every method cleanly."""
    from tokensift.methods import REGISTRY

    assert main(["methods", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and {e["name"] for e in json.loads(captured.out)} == set(REGISTRY)


def test_internal_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalogue is about user input: a bug is not dressed up as a one-line error."""
    import tokensift.commands

    def broken(args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(tokensift.commands, "cmd_methods", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["methods"])


def _console(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("tokensift")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tokensift.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


def _assert_one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokensift: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and all(n in lines[0] for n in needles), lines[0]


def test_console_script_nan_parameter() -> None:
    proc = _console("generate", "--method", "suffix_decoding:max_spec_factor=nan", "hi")
    _assert_one_line(proc, "max_spec_factor must be a finite number")


def test_console_script_corrupt_results(results: Path) -> None:
    _corrupt_middle(results / "results.jsonl")
    before = snapshot(results)
    _assert_one_line(_console("report", str(results)), "results.jsonl:2 is not a results row")
    assert snapshot(results) == before


def test_console_script_non_utf8_prompt(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe\x00h\x00i")
    _assert_one_line(_console("generate", "--prompt-file", str(tmp_path / "p.txt")), "is not UTF-8 text")
