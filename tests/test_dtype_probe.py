"""`dtype="auto"`: a short measured probe chooses bfloat16 or float32 per machine, cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tokensift import dtype_probe
from tokensift.bench.config import BenchConfig
from tokensift.bench.suites import get_suite
from tokensift.models import _dtype


def test_probe_measures_both_dtypes_and_chooses_by_the_margin() -> None:
    result = dtype_probe.probe(repeats=3, tokens=16, hidden=64, inner=128)
    wins = []
    for shape in ("seconds", "decode_seconds"):  # a prefill chunk and one decode token
        timed = result[shape]
        assert timed["float32"] > 0 and timed["bfloat16"] > 0 and timed["ratio"] > 0
        assert timed["rounds"] in (0, 3)  # 0: an emulated bf16 ended the probe after its warm-up
        wins.append(timed["ratio"] <= dtype_probe.MARGIN)
    assert result["dtype"] == ("bfloat16" if all(wins) else "float32")
    assert (
        result["version"] == dtype_probe.VERSION
        and f"probe {dtype_probe.VERSION}|" in dtype_probe.machine_key()
    )


def fake_timers(monkeypatch: pytest.MonkeyPatch, seconds, busy: range = range(0)) -> list[str]:
    """Replaces the block timer: `seconds(dtype, tokens)` per run, 4x during the `busy` calls (a
    busy spell on the machine, counted over all timed runs in order). Returns the calls' dtypes."""
    calls: list[str] = []

    def block_timer(dtype: torch.dtype, tokens: int, *args: object):
        def run() -> float:
            calls.append(str(dtype).removeprefix("torch."))
            return seconds(dtype, tokens) * (4.0 if len(calls) - 1 in busy else 1.0)

        return run

    monkeypatch.setattr(dtype_probe, "_block_timer", block_timer)
    return calls


@pytest.mark.parametrize(
    ("prefill_bf16", "decode_bf16", "choice"),
    [(0.4, 0.5, "bfloat16"), (0.4, 3.0, "float32"), (1.2, 0.5, "float32"), (0.79, 0.81, "float32")],
)
def test_bf16_must_win_both_the_prefill_and_the_decode_shape(
    monkeypatch: pytest.MonkeyPatch, prefill_bf16: float, decode_bf16: float, choice: str
) -> None:
    # An AMD EPYC with avx512_bf16 measured bf16 at 0.4x fp32 over 128 tokens and 3-6x over one token.
    def seconds(dtype: torch.dtype, tokens: int) -> float:
        if dtype == torch.float32:
            return 1.0
        return prefill_bf16 if tokens > 1 else decode_bf16

    fake_timers(monkeypatch, seconds)
    assert dtype_probe.probe()["dtype"] == choice


@pytest.mark.parametrize("bf16", [0.5, 1.5])
def test_a_busy_spell_does_not_tip_the_choice(monkeypatch: pytest.MonkeyPatch, bf16: float) -> None:
    # Version 2 timed all fp32 runs, then all bf16 runs, so a short busy spell could fall on one
    # dtype's runs only. Rounds interleave both dtypes and alternate which goes first, so a spell
    # that slows every run by the same factor over 4 consecutive runs spoils at most 2 of 5 ratios.
    def seconds(dtype: torch.dtype, tokens: int) -> float:
        return 1.0 if dtype == torch.float32 else bf16

    runs = 2 * (2 + 2 * 5)  # two shapes: warm-ups of both dtypes, then 5 rounds of both
    for start in range(runs - 3):
        calls = fake_timers(monkeypatch, seconds, busy=range(start, start + 4))
        result = dtype_probe.probe(repeats=5)
        assert result["dtype"] == ("bfloat16" if bf16 < 1 else "float32"), start
        assert len(calls) == runs and calls[2:6] == ["float32", "bfloat16", "bfloat16", "float32"]


def test_an_emulated_bf16_ends_the_probe_after_its_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_timers(monkeypatch, lambda dtype, tokens: 1.0 if dtype == torch.float32 else 40.0)
    result = dtype_probe.probe(repeats=5)
    assert result["dtype"] == "float32" and result["seconds"]["rounds"] == 0
    assert result["seconds"]["ratio"] == 40.0 and len(calls) == 4  # two warm-ups per shape


def fake_probe(choice: str, calls: list[int]):
    def run() -> dict:
        calls.append(1)
        return {
            "seconds": {"float32": 1.0, "bfloat16": 0.5 if choice == "bfloat16" else 2.0},
            "dtype": choice,
        }

    return run


def test_result_is_cached_per_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, calls = tmp_path / "probe.json", []
    monkeypatch.setattr(dtype_probe, "probe", fake_probe("bfloat16", calls))
    assert dtype_probe.cpu_default_dtype(cache) == "bfloat16"
    assert dtype_probe.cpu_default_dtype(cache) == "bfloat16"
    assert len(calls) == 1  # the second call reads the cache
    assert json.loads(cache.read_text())[dtype_probe.machine_key()]["dtype"] == "bfloat16"
    # Another machine configuration (threads are part of the key) probes again.
    monkeypatch.setattr(dtype_probe, "machine_key", lambda: "other cpu")
    monkeypatch.setattr(dtype_probe, "probe", fake_probe("float32", calls))
    assert dtype_probe.cpu_default_dtype(cache) == "float32" and len(calls) == 2
    assert len(json.loads(cache.read_text())) == 2


def test_corrupt_cache_is_probed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, calls = tmp_path / "probe.json", []
    cache.write_text("{not json")
    monkeypatch.setattr(dtype_probe, "probe", fake_probe("float32", calls))
    assert dtype_probe.cpu_default_dtype(cache) == "float32" and calls == [1]
    cache.write_text(json.dumps({dtype_probe.machine_key(): {"dtype": "int8"}}))
    assert dtype_probe.cpu_default_dtype(cache) == "float32" and calls == [1, 1]


def test_auto_resolves_when_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENSIFT_CACHE", str(tmp_path))
    calls: list[int] = []
    monkeypatch.setattr(dtype_probe, "probe", fake_probe("bfloat16", calls))
    assert _dtype("auto") is torch.bfloat16
    assert (tmp_path / "dtype_probe.json").exists()
    # Validating a config does not probe; the suites that used to force bf16 now measure.
    BenchConfig(tasks=["passkey"], methods=["dense"], lengths=[256], dtype="auto").validate()
    assert calls == [1]
    assert get_suite("ruler-lite").dtype == "auto"
