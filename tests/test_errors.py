"""Bad input gets a one-line error naming the problem; the CLI exits non-zero."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tokensift
from tokensift import TokensiftError
from tokensift.cli import main
from tokensift.methods import parse_methods
from tokensift.runtime.plan import Plan

from .conftest import prompt_ids, tiny_model


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("budget", [0, -1, 1.5, -0.5, "x", None, True])
@pytest.mark.parametrize("cls", [tokensift.SnapKV, tokensift.H2O, tokensift.StreamingLLM])
def test_bad_budgets_api(cls: type, budget: object) -> None:
    with pytest.raises(TokensiftError) as exc:
        cls(budget=budget)
    assert "budget" in _one_line(exc)


@pytest.mark.parametrize(
    "spec", ["snapkv:budget=0", "snapkv:budget=-1", "snapkv:budget=1.5", "snapkv:budget=x"]
)
def test_bad_budgets_spec(spec: str) -> None:
    with pytest.raises(TokensiftError) as exc:
        parse_methods(spec)
    assert "budget" in _one_line(exc)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nope", "unknown method 'nope'"),
        ("snapkv:windw=3", "no parameter 'windw'"),
        ("snapkv:budget", "expected key=value"),
        ("snapkv:pooling=median", "must be one of"),
        ("snapkv+h2o", "both claim the evict hook"),
        ("snapkv+", "malformed method spec"),
        ("snapkv:window_size=2.5", "must be int"),
    ],
)
def test_bad_specs(spec: str, needle: str) -> None:
    with pytest.raises(TokensiftError) as exc:
        Plan.of(spec)
    assert needle in _one_line(exc)


def test_budget_smaller_than_window_is_rejected_when_resolved() -> None:
    model = tiny_model()
    with pytest.raises(TokensiftError, match="does not exceed window_size"):
        tokensift.generate(model, prompt_ids(100), "snapkv:budget=0.1", max_new_tokens=2)


def test_prompt_beyond_context() -> None:
    model = tiny_model(context=128)
    with pytest.raises(TokensiftError) as exc:
        tokensift.generate(model, prompt_ids(120), "dense", max_new_tokens=16)
    assert "exceeds" in _one_line(exc) and "128" in str(exc.value)


def test_unknown_model() -> None:
    with pytest.raises(TokensiftError) as exc:
        tokensift.load("no-such-model")
    text = _one_line(exc)
    assert "smollm2-135m" in text and "qwen2.5-coder-0.5b" in text


def test_spec_round_trip() -> None:
    for method in [
        tokensift.SnapKV(budget=128, pooling="avg"),
        tokensift.H2O(budget=0.2),
        tokensift.StreamingLLM(),
    ]:
        assert Plan.of(method.spec()).methods[0] == method


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--method", "snapkv:budget=0", "hi"],
        ["generate", "--method", "bogus", "hi"],
        ["generate", "--model", "nope", "hi"],
        ["generate"],
        ["bench", "--tasks", "passkey", "--methods", "dense", "--lengths", "2x", "--out", "x"],
        ["bench", "--tasks", "nope", "--methods", "dense", "--lengths", "1k", "--out", "x"],
        ["bench", "--preset", "nope", "--out", "x"],
        ["report", "/nonexistent"],
    ],
)
def test_cli_errors_exit_nonzero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokensift: error: ")


def test_cli_process_exit_code() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tokensift.cli", "generate", "--method", "snapkv:budget=1.5", "hi"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "tokensift: error: budget as a fraction of the prompt must lie in (0, 1], got 1.5"
    )
