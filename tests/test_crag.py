"""CRAG: k-means and silhouette, representative selection, the context hook, the CLI file."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import tokensift
from tokensift import NoOpWarning, embeddings
from tokensift.bench.tasks import get_task
from tokensift.errors import TokensiftError
from tokensift.methods import REGISTRY, Hook, parse_method
from tokensift.methods.crag import CRAG, kmeans, silhouette
from tokensift.runtime.context import build_context
from tokensift.runtime.plan import Plan

from .conftest import tiny_model

TOPICS = ("battery", "screen", "price")


def blobs(per: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated groups of unit vectors, interleaved: (3 * per, 8) and their groups."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:3] * 5
    groups = torch.arange(3 * per) % 3
    x = centres[groups] + 0.3 * torch.randn(3 * per, 8, generator=g)
    return torch.nn.functional.normalize(x, dim=-1), groups


def fake_embed(texts):
    """A stand-in embedder: passages about the same topic get nearby vectors."""
    out = []
    for i, text in enumerate(texts):
        topic = next(t for t in TOPICS if t in text)
        v = torch.zeros(8)
        v[TOPICS.index(topic)] = 5
        v[3 + i % 5] = 0.5 + 0.1 * (i % 3)
        out.append(v)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def passages(n: int = 12) -> list[str]:
    return [f"review {i}: the {TOPICS[i % 3]} is bad" for i in range(n)]


def test_kmeans_recovers_groups_and_is_deterministic() -> None:
    x, groups = blobs()
    labels = kmeans(x, 3, seed=0)
    assert torch.equal(labels, kmeans(x, 3, seed=0))
    # Same partition as the groups, up to renaming.
    pairs = {(int(a), int(b)) for a, b in zip(labels, groups, strict=True)}
    assert len(pairs) == 3


def test_silhouette_prefers_the_true_k() -> None:
    x, groups = blobs()
    assert silhouette(x, groups) > 0.8
    assert silhouette(x, torch.arange(len(x)) % 2) < silhouette(x, groups)
    scores = {k: silhouette(x, kmeans(x, k, 0)) for k in range(2, 7)}
    assert max(scores, key=scores.__getitem__) == 3


def test_crag_keeps_one_representative_per_cluster_in_order(monkeypatch) -> None:
    monkeypatch.setattr(embeddings, "embed", fake_embed)
    texts = passages(12)
    kept, info = parse_method("crag").select_passages(texts, "which?", seed=0)
    index = [i for i, _ in kept]
    assert info["crag_clusters"] == 3
    assert index == sorted(index) and len(index) == 3
    assert {TOPICS.index(next(t for t in TOPICS if t in texts[i])) for i in index} == {0, 1, 2}
    two, _ = CRAG(clusters=3, per_cluster=2).select_passages(texts, None, seed=0)
    assert len(two) == 6
    counted, _ = CRAG(clusters=3, counts=True).select_passages(texts, None, seed=0)
    assert all(text.startswith("[4 similar] ") for _, text in counted)
    again = CRAG(clusters=3).select_passages(texts, None, 0)
    assert again == CRAG(clusters=3).select_passages(texts, None, 0)


def test_context_hook_builds_the_prompt(monkeypatch) -> None:
    monkeypatch.setattr(embeddings, "embed", fake_embed)
    texts = passages(9)
    text, counters = build_context(Plan.of("crag:clusters=3"), texts, "Reviews:", "which?", 0)
    assert counters["passages_in"] == 9 and counters["passages_kept"] == 3
    assert counters["passages_dropped"] == 6
    assert text.startswith("Reviews:\n\n") and text.count("\n\n") == 3
    everything, counters = build_context(Plan.of(None), texts, None, None, 0)
    assert everything == "\n\n".join(texts) and counters["passages_dropped"] == 0


@pytest.mark.parametrize(
    "spec, message",
    [("crag:clusters=0", "auto or a number"), ("crag:clusters=many", "auto or a number"),
     ("crag:per_cluster=0", "per_cluster"), ("crag:max_clusters=1", "max_clusters")],
)  # fmt: skip
def test_bad_parameters(spec: str, message: str) -> None:
    with pytest.raises(TokensiftError, match=message):
        parse_method(spec)


def test_bad_passages() -> None:
    with pytest.raises(TokensiftError, match="non-empty"):
        build_context(Plan.of(None), ["a", " "], None, None, 0)
    with pytest.raises(TokensiftError, match="list of strings"):
        build_context(Plan.of(None), "just one string", None, None, 0)  # type: ignore[arg-type]


def test_generate_needs_passages_for_a_context_method(tiny) -> None:
    with pytest.raises(TokensiftError, match="pass passages"):
        tokensift.generate(tiny, [5, 6, 7], "crag", max_new_tokens=1)
    with pytest.raises(TokensiftError, match="no prompt"):
        tokensift.generate(tiny, None, "dense", max_new_tokens=1)


def test_passages_file_errors(tmp_path) -> None:
    from tokensift.commands import read_passages

    good = tmp_path / "p.jsonl"
    good.write_text('"first"\n{"text": "second"}\n\n')
    assert read_passages(good) == ["first", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "x"}\n')
    with pytest.raises(TokensiftError, match=r"bad\.jsonl:1"):
        read_passages(bad)
    with pytest.raises(TokensiftError, match="does not exist"):
        read_passages(tmp_path / "missing.jsonl")


def test_reviews_task_distribution() -> None:
    for items in (4, 25, 100):
        for sample in get_task(f"reviews:items={items}").samples(lambda a, b: 0, 0, 5, 0):
            counts = sample.meta["complaints"]
            assert len(sample.meta["passages"]) == items
            assert max(counts, key=counts.__getitem__) == sample.answer
            assert sorted(counts.values())[-1] > sorted(counts.values())[-2]
    with pytest.raises(TokensiftError, match="4 to 100"):
        get_task("reviews:items=101")


@pytest.mark.slow
def test_crag_on_the_real_model_and_embeddings(tmp_path, capsys) -> None:
    """Real MiniLM embeddings, smollm2: CRAG sends fewer tokens and composes with SnapKV; CLI file."""
    from tokensift.cli import main

    sample = get_task("reviews:items=40").samples(lambda a, b: 0, 0, 1, 0)[0]
    kwargs = dict(passages=sample.meta["passages"], question=sample.question, max_new_tokens=3)
    full = tokensift.generate("smollm2-135m", sample.meta["intro"], "dense", **kwargs)
    crag = tokensift.generate("smollm2-135m", sample.meta["intro"], "crag+snapkv:budget=0.5", **kwargs)
    assert crag.stats.counters["passages_kept"] < 40
    assert crag.stats.prompt_tokens < full.stats.prompt_tokens / 2
    assert crag.stats.applied and crag.stats.tokens_evicted > 0
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"text": p}) for p in sample.meta["passages"]))
    code = main(
        ["generate", "--passages-file", str(path), "--method", "crag:clusters=4", "--question",
         sample.question, "--max-new-tokens", "2", "--json"]
    )  # fmt: skip
    assert code == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["counters"]["passages_kept"] == 4


# -- composition matrix: CRAG before every token-level method ------------------------------------------
SPECS = {
    "adaptive": "adaptive(snapkv:budget=40,window_size=8)",
    "decoding": "decoding(h2o:budget=40)",
    "snapkv": "snapkv:budget=40,window_size=8",
    "pyramidkv": "pyramidkv:budget=40,window_size=8",
    "zerotuning": "zerotuning:gamma=2",
}
OTHERS = sorted(name for name, cls in REGISTRY.items() if cls.hooks and Hook.CONTEXT not in cls.hooks)


def char_model() -> tokensift.Model:
    """The tiny Llama with a character-level tokenizer (ids = ASCII codes), so text prompts work."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "\n": 10, **{chr(i): i for i in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    return tokensift.wrap(tiny_model("llama", layers=4).model, tokenizer=fast, name="tiny-chars")


@pytest.mark.parametrize("name", OTHERS)
def test_crag_composes_with_every_method(name: str, monkeypatch) -> None:
    """CRAG then any method = that method on the prompt CRAG built: identical tokens and logits."""
    monkeypatch.setattr(embeddings, "embed", fake_embed)
    model, texts, spec = char_model(), passages(9), SPECS.get(name, name)
    reduced, _ = build_context(Plan.of("crag:clusters=3"), texts, "Reviews:", None, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOpWarning)
        try:
            alone = tokensift.generate(model, reduced, spec, max_new_tokens=4, raw=True, return_logits=True)
        except TokensiftError as exc:
            pytest.skip(f"{name} does not run on the tiny model alone: {exc}")
        both = tokensift.generate(
            model, "Reviews:", f"crag:clusters=3+{spec}", passages=texts, max_new_tokens=4, raw=True,
            return_logits=True,
        )  # fmt: skip
    assert both.stats.counters["passages_kept"] == 3 and both.stats.counters["passages_dropped"] == 6
    assert both.stats.prompt_tokens == alone.stats.prompt_tokens
    assert both.token_ids == alone.token_ids
    for a, b in zip(both.logits or [], alone.logits or [], strict=True):
        assert torch.equal(a, b)
