"""Every registered method reports whether it changed the computation: `applied` and the counters it
names in `applied_by` are positive where it applies, and where it cannot apply `applied` is false, a
NoOpWarning is raised and a note says why. A method without an entry in CASES fails here: add one
(a run on a tiny model where it must apply, one where it cannot, and the note expected)."""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tokensift
from tokensift import NoOpWarning
from tokensift.calibration import save_artefact
from tokensift.methods import REGISTRY
from tokensift.methods.bild import BiLD
from tokensift.methods.entropy_routing import EntropyRouting

from .conftest import prompt_ids, tiny_model, tiny_smol_model
from .test_crag import fake_embed, passages
from .test_sparse_prefill import _pattern_file, _predictor_file
from .test_speculative import (
    _fresh_state,  # noqa: F401 (autouse: fresh suffix trees, one thread)
    repetitive_prompt,
)

PROMPT, NEW = 96, 8


@dataclass
class Run:
    """One generation: a method (a spec, or a function of the case's files), a prompt, a length."""

    method: str | Callable[[Files], object]
    prompt: list[int] | None = None  # default: PROMPT random tokens
    new: int = NEW
    layers: int = 2
    passages: int = 0  # a context method's prompt: that many passages instead of token ids


@dataclass
class Case:
    applies: Run  # the method must change the computation
    idle: Run | None  # it cannot (None: dense, which has nothing to change)
    note: str  # what the idle run's note says (a regex)


class Files:
    """Calibration files and model pairs the cases need, made on demand for the case's model."""

    def __init__(self, tmp_path: Path, model: tokensift.Model):
        self.tmp_path, self.model = tmp_path, model

    def minference(self, kind: str, a: int, b: int) -> str:
        return _pattern_file(self.tmp_path, self.model, kind, a, b)

    def dhsa(self) -> str:
        return _predictor_file(self.tmp_path, self.model)

    def compresskv(self) -> str:
        layers, heads = self.model.num_layers, int(self.model.config.num_attention_heads)
        payload = {"heads": [list(range(heads))] * layers, "layer_scores": [1.0 / layers] * layers}
        return str(save_artefact("compresskv", self.model, payload, "test", self.tmp_path / "ckv.json"))

    def small(self, noise: float = 0.3) -> tokensift.Model:
        """A 'small' model for a pair: the case's model plus noise, so the two mostly agree."""
        clone = copy.deepcopy(self.model.model)
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in clone.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
        return tokensift.wrap(clone, name="tiny-small")


COVERS = 512  # a budget above every token a run processes
EVICT_IDLE = "evicted nothing"

CASES: dict[str, Case] = {
    "dense": Case(Run("dense"), None, ""),
    # -- eviction: applied when tokens were evicted
    "streaming_llm": Case(Run("streaming_llm:budget=32"), Run(f"streaming_llm:budget={COVERS}"), EVICT_IDLE),
    "h2o": Case(Run("h2o:budget=32"), Run(f"h2o:budget={COVERS}"), EVICT_IDLE),
    "keyformer": Case(Run("keyformer:budget=32"), Run(f"keyformer:budget={COVERS}"), EVICT_IDLE),
    "snapkv": Case(Run("snapkv:budget=48"), Run(f"snapkv:budget={COVERS}"), EVICT_IDLE),
    "pyramidkv": Case(Run("pyramidkv:budget=48"), Run(f"pyramidkv:budget={COVERS}"), EVICT_IDLE),
    "tova": Case(Run("tova:budget=32"), Run(f"tova:budget={COVERS}"), EVICT_IDLE),
    "knorm": Case(Run("knorm:budget=32"), Run(f"knorm:budget={COVERS}"), EVICT_IDLE),
    "keydiff": Case(Run("keydiff:budget=32"), Run(f"keydiff:budget={COVERS}"), EVICT_IDLE),
    "compresskv": Case(
        Run(lambda f: f"compresskv:budget=40,min_budget=16,calibration={f.compresskv()}"),
        Run(lambda f: f"compresskv:budget=1.0,uniform=true,calibration={f.compresskv()}"),
        EVICT_IDLE,
    ),
    "adaptive": Case(Run("adaptive(snapkv:budget=48)"), Run(f"adaptive(snapkv:budget={COVERS})"), EVICT_IDLE),
    "decoding": Case(
        Run("decoding(snapkv:budget=48):every=4", new=12),
        Run(f"decoding(snapkv:budget={COVERS}):every=4"),
        EVICT_IDLE,
    ),
    # -- sparse decoding: applied when a decode step attended to a selected subset
    "quest": Case(
        Run("quest:budget=32,page_size=8,dense_layers=1", layers=4),
        Run(f"quest:budget={COVERS},page_size=8,dense_layers=1", layers=4),
        "covered the whole cache",
    ),
    "tokenselect": Case(
        Run("tokenselect:budget=24", layers=4), Run(f"tokenselect:budget={COVERS}", layers=4), "budget"
    ),
    "tidaldecode": Case(
        Run("tidaldecode:budget=24,sparse_layer_start=1", layers=4),
        Run(f"tidaldecode:budget={COVERS},sparse_layer_start=1", layers=4),
        "budget",
    ),
    # HiP: sparse at prefill and at decode steps (both counters must be positive).
    "hip": Case(
        Run("hip:budget=40,window=8,sinks=2,dense_layers=1,block_size_q=4", layers=4),
        Run(f"hip:budget={COVERS},window=8,sinks=2,dense_layers=1,block_size_q=4", layers=4),
        "fit its budget|covered the whole cache",
    ),
    # -- sparse prefill: applied when some (query, key) pair of dense causal attention was skipped
    "a_shape": Case(
        Run("a_shape:sinks=4,local=16,block_size=8,dense_tail=0"),
        Run(f"a_shape:sinks=4,local={COVERS}"),
        "ran dense",
    ),
    "minference": Case(
        Run(
            lambda f: (
                f"minference:config={f.minference('vertical_slash', 4, 5)},block_size=8,last_q=16,"
                "recent_slashes=4,vertical_sinks=2,dense_tail=0"
            )
        ),
        Run(lambda f: f"minference:config={f.minference('a_shape', 64, 64)},block_size=16"),
        "ran dense",
    ),
    "dhsa": Case(
        Run(lambda f: f"dhsa:predictor={f.dhsa()},budget=40,block_size=8,sinks=4,local=16,dense_tail=0"),
        Run(lambda f: f"dhsa:predictor={f.dhsa()},budget=1.0,block_size=16,sinks=4,local=16"),
        "ran dense",
    ),
    # -- generation loops: applied when a draft token was accepted (or the small model wrote one)
    "suffix_decoding": Case(
        Run("suffix_decoding", repetitive_prompt(1), new=24),
        Run("suffix_decoding:max_spec_factor=0", repetitive_prompt(1), new=24),
        "proposed no draft tokens",
    ),
    "prompt_lookup": Case(
        Run("prompt_lookup", repetitive_prompt(1), new=24),
        Run("prompt_lookup", repetitive_prompt(1), new=1),
        "the prefill wrote the only token",
    ),
    "bild": Case(
        Run(lambda f: BiLD(small_model=f.small(), fallback_threshold=0.0, rollback_threshold=1e3), new=24),
        Run(lambda f: BiLD(small_model=f.small(), fallback_threshold=1.0), new=24),
        "the large model wrote all",
    ),
    "entropy_routing": Case(
        Run(lambda f: EntropyRouting(small_model=f.small(), threshold=100.0), new=24),
        Run(lambda f: EntropyRouting(small_model=f.small(), threshold=0.0), new=24),
        "the large model wrote all",
    ),
    # -- logit bias: applied when a layer forward ran with a non-zero bias
    "zerotuning": Case(Run("zerotuning:gamma=2.5"), Run("zerotuning:gamma=1"), "gamma = 1"),
    # -- context: applied when passages were left out
    "crag": Case(
        Run("crag:clusters=3", passages=9), Run("crag:clusters=3,per_cluster=3", passages=9), "crag"
    ),
}


def generate(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tokensift.Generation:
    if run.passages:  # text passages: a tiny model over a real tokenizer, a stand-in embedder
        monkeypatch.setattr(tokensift.embeddings, "embed", fake_embed)
        model = tiny_smol_model()
        return tokensift.generate(
            model, None, run.method, passages=passages(run.passages), max_new_tokens=run.new, ignore_eos=True
        )  # type: ignore[arg-type]
    model = tiny_model("llama", layers=run.layers)
    method = run.method if isinstance(run.method, str) else run.method(Files(tmp_path, model))
    ids = prompt_ids(PROMPT) if run.prompt is None else run.prompt
    return tokensift.generate(model, ids, method, max_new_tokens=run.new, ignore_eos=True)  # type: ignore[arg-type]


def measures(stats: tokensift.GenerationStats) -> dict[str, float]:
    return {**stats.counters, "tokens_evicted": stats.tokens_evicted}


def test_every_registered_method_has_a_case() -> None:
    missing = sorted(set(REGISTRY) - set(CASES))
    assert not missing, f"add an entry to tests/test_applied.py CASES for: {', '.join(missing)}"
    assert not set(CASES) - set(REGISTRY), "CASES names a method that is not registered"


def test_every_method_names_its_counters() -> None:
    """Only dense has nothing to measure; every other method inherits or names its counters."""
    for name, cls in REGISTRY.items():
        assert bool(cls.applied_by) == bool(cls.hooks), name


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_applies_with_a_positive_counter(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES.get(name)
    if case is None:
        pytest.fail(f"{name} has no entry in CASES")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOpWarning)  # partial notes ("some heads ran dense") are fine
        out = generate(case.applies, tmp_path, monkeypatch)
    stats = out.stats
    assert stats.applied, stats.notes
    found = measures(stats)
    for counter in REGISTRY[name].applied_by:
        assert found.get(counter, 0) > 0, (counter, stats.counters)


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if n != "dense"))
def test_cannot_apply_says_why(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES.get(name)
    if case is None or case.idle is None:
        pytest.fail(f"{name} has no run where it cannot apply in CASES")
    with pytest.warns(NoOpWarning) as caught:
        out = generate(case.idle, tmp_path, monkeypatch)
    stats = out.stats
    assert not stats.applied
    assert any(re.search(case.note, str(w.message)) for w in caught), [str(w.message) for w in caught]
    found = measures(stats)
    assert all(found.get(c, 0) <= 0 for c in REGISTRY[name].applied_by), stats.counters
    assert any(name in note for note in stats.notes), stats.notes


def test_methods_command_names_the_counters(capsys: pytest.CaptureFixture[str]) -> None:
    from tokensift.cli import main

    assert main(["methods", "--json"]) == 0
    listed = {e["name"]: e["applied_by"] for e in json.loads(capsys.readouterr().out)}
    assert listed == {name: list(cls.applied_by) for name, cls in REGISTRY.items()}
