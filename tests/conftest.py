"""Tiny randomly initialised Llama- and Qwen2-shaped models with GQA, built in code."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import tokensift

VOCAB = 128
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the module runs
    spec.loader.exec_module(module)
    return module


def tiny_model(kind: str = "llama", seed: int = 0, layers: int = 2, context: int = 512) -> tokensift.Model:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    # Random init gives near-uniform logits; scale up so greedy choices are decisive, not ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return tokensift.wrap(model, name=f"tiny-{kind}")


@pytest.fixture(params=["llama", "qwen2"])
def tiny(request: pytest.FixtureRequest) -> tokensift.Model:
    return tiny_model(request.param)


def prompt_ids(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    # Avoid the EOS id so greedy runs are not cut short by the prompt itself.
    return [int(t) for t in torch.randint(3, VOCAB, (n,), generator=g)]


def tiny_smol_model(seed: int = 0, context: int = 2048) -> tokensift.Model:
    """A tiny random Llama over SmolLM2's tokenizer: real text prompts and chat template, fast forwards."""
    from tokensift.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        eos_token_id=2,
        bos_token_id=1,
    )
    return tokensift.wrap(LlamaForCausalLM(config), tok, name="tiny-smol")


@contextlib.contextmanager
def fresh_speculative_state() -> Iterator[None]:
    """Fresh global suffix trees and one torch thread (tiny models run ~30x slower on busy shared
    cores with more); the thread count is restored afterwards."""
    from tokensift.speculative import clear_global_caches

    clear_global_caches()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def noisy_pair(noise: float) -> tuple[tokensift.Model, tokensift.Model]:
    """A large tiny model and a 'small' one: its weights plus `noise` x each tensor's std of noise."""
    large = tiny_model("qwen2", seed=0, layers=2)
    clone = copy.deepcopy(large.model)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    return large, tokensift.wrap(clone, name="tiny-small")


def loop_row(
    bench: ModuleType,
    group: str,
    runs: dict[str, tuple[list[int], list[float]]],
    ids: Sequence[int] = (1, 2, 3),
) -> Any:
    """A generation-loops benchmark row with given tokens and decode seconds per method (one repeat
    per entry; end-to-end = decode + 1 s)."""
    row = bench.Row(bench.Prompt(group, "p"), 4, list(ids))
    for key, (tokens, decode) in runs.items():
        t = bench.Timed()
        for d in decode:
            t.add(tokens, d + 1.0, d)
        row.runs[key] = t
    return row
