"""Generation loops on tiny random models: lossless drafting, the rejection rule, composition with
eviction and sparse decoding, BiLD and entropy routing against their limits."""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

import tokensift
from tokensift import NoOpWarning
from tokensift.errors import TokensiftError
from tokensift.methods.base import REGISTRY, SparseDecodeMethod
from tokensift.methods.bild import BiLD
from tokensift.methods.entropy_routing import EntropyRouting
from tokensift.methods.suffix_decoding import SuffixDecoding
from tokensift.runtime.generate import Decoding
from tokensift.runtime.plan import Plan
from tokensift.runtime.scores import dense_attention
from tokensift.speculative import clear_global_caches
from tokensift.speculative.drafting import NgramDrafter
from tokensift.speculative.pair import entropy
from tokensift.speculative.verify import accept_draft

from .conftest import VOCAB, fresh_speculative_state, noisy_pair, prompt_ids, tiny_model

NEW = 48


def repetitive_prompt(seed: int) -> list[int]:
    """Random tokens then a repeat of their start: tiny random models then echo and loop, so drafts
    get accepted and rejected."""
    ids = prompt_ids(40, seed=seed)
    return ids + ids[:24]


PROMPTS = [repetitive_prompt(s) for s in range(4)] + [prompt_ids(50, seed=9)]


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    with fresh_speculative_state():
        yield


def _greedy(
    model: tokensift.Model, ids: list[int], method: object = None, **kw: object
) -> tokensift.Generation:
    return tokensift.generate(model, ids, method, max_new_tokens=NEW, ignore_eos=True, **kw)  # type: ignore[arg-type]


# -- lossless drafting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["suffix_decoding", "prompt_lookup", "prompt_lookup:num_tokens=4,max_ngram=3"]
)
def test_drafting_is_plain_greedy(tiny: tokensift.Model, spec: str) -> None:
    accepted = rejected = 0
    for ids in PROMPTS:
        clear_global_caches()
        plain = _greedy(tiny, ids, return_logits=True)
        out = _greedy(tiny, ids, spec, return_logits=True)
        assert out.token_ids == plain.token_ids
        for a, b in zip(out.logits or [], plain.logits or [], strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        c = out.stats.counters
        assert c["loop_committed"] == NEW - 1  # the first token comes from the prefill
        assert c["loop_steps"] + c["accepted_tokens"] == NEW - 1
        accepted += c["accepted_tokens"]
        rejected += c["draft_tokens"] - c["accepted_tokens"]
    assert accepted > 20 and rejected > 0  # both branches of verification ran


def test_draft_makes_fewer_forwards_on_repeats() -> None:
    model = tiny_model("llama")
    for spec in ["suffix_decoding:schedule=adaptive", "suffix_decoding"]:
        out = _greedy(model, repetitive_prompt(1), spec)
        c = out.stats.counters
        assert c["loop_tokens_per_step"] > 2 and c["loop_steps"] < NEW / 2
    # The fixed schedule (the default) verifies short drafts only; the adaptive one also longer,
    # cheap-to-verify tails that the model may reject.
    assert c["loop_acceptance_rate"] >= 0.75


def test_stops_inside_an_accepted_draft() -> None:
    """EOS and max_new_tokens end generation at the same token as plain decoding, even mid-draft."""
    model = tiny_model("llama")
    ids = repetitive_prompt(1)
    plain = _greedy(model, ids)
    eos = plain.token_ids[20]
    model.model.generation_config.eos_token_id = eos
    try:
        stop_plain = tokensift.generate(model, ids, None, max_new_tokens=NEW)
        for spec in ["suffix_decoding", "prompt_lookup"]:
            out = tokensift.generate(model, ids, spec, max_new_tokens=NEW)
            assert out.token_ids == stop_plain.token_ids and out.stats.stop_reason == "eos"
            assert out.token_ids[-1] == eos
    finally:
        model.model.generation_config.eos_token_id = 2
    for n in (1, 2, 7, 13):
        assert (
            tokensift.generate(model, ids, "suffix_decoding", max_new_tokens=n, ignore_eos=True).token_ids
            == (plain.token_ids[:n])
        )


def test_no_drafts_is_reported() -> None:
    model = tiny_model("llama")
    with pytest.warns(NoOpWarning, match="proposed no draft tokens"):
        out = _greedy(model, repetitive_prompt(0), "suffix_decoding:max_spec_factor=0")
    assert out.stats.counters["draft_tokens"] == 0
    assert out.stats.counters["loop_steps"] == NEW - 1


def test_global_tree_drafts_from_earlier_responses() -> None:
    model = tiny_model("qwen2")
    ids = prompt_ids(30, seed=5)
    first = _greedy(model, ids, "suffix_decoding")
    again = _greedy(model, ids, "suffix_decoding")
    assert again.token_ids == first.token_ids
    assert again.stats.counters["suffix_cached_responses"] == 1
    assert again.stats.counters["suffix_drafts_from_global"] > 0
    assert again.stats.counters["loop_steps"] < first.stats.counters["loop_steps"]
    for _ in range(3):
        _greedy(model, prompt_ids(20, seed=7), "suffix_decoding:max_cached_requests=2")
    out = _greedy(model, ids, "suffix_decoding:max_cached_requests=2")
    assert out.stats.counters["suffix_cached_responses"] == 2  # FIFO keeps the newest two
    off = _greedy(model, ids, "suffix_decoding:max_cached_requests=0")
    assert off.stats.counters["suffix_cached_responses"] == 0


def test_ngram_drafter_takes_the_earliest_match() -> None:
    drafter = NgramDrafter(num_tokens=3, max_ngram=2, min_ngram=1)
    drafter.start([5, 6, 7, 8, 5, 6, 9, 1, 5, 6])
    assert drafter.propose(10) == [7, 8, 5]  # "5 6" first occurs at 0
    assert drafter.propose(2) == [7, 8]
    drafter.observe([4])
    assert drafter.propose(10) == []  # "6 4" and "4" never occurred before
    drafter.observe([6])
    assert drafter.propose(10) == [7, 8, 5]  # only the unigram "6" matches


# -- sampling ---------------------------------------------------------------------------------------


def _chain_decoding(temperature: float, top_p: float, seed: int) -> Decoding:
    return Decoding(
        model=None,  # type: ignore[arg-type]  # accept_draft only samples
        cache=None,  # type: ignore[arg-type]
        max_new_tokens=3,
        temperature=temperature,
        top_p=top_p,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_rejection_rule_keeps_the_distribution(temperature: float, top_p: float) -> None:
    """A Markov chain target with a fixed (often wrong) draft: the 3-token outputs follow the target."""
    v, n = 4, 12000
    transition = torch.tensor(
        [[2.0, 0.5, -1.0, 0.0], [0.0, 1.5, 1.0, -0.5], [1.0, -1.0, 0.3, 0.8], [-0.5, 0.2, 0.9, 1.1]]
    )
    probs = [torch.softmax(row / temperature, -1) for row in transition]
    for p in probs:  # nucleus filter as generate.sample applies it
        order = p.argsort(descending=True)
        outside = p[order].cumsum(0) - p[order] > top_p
        p[order[outside]] = 0
        p /= p.sum()
    decoding = _chain_decoding(temperature, top_p, 0)
    seen: Counter[tuple[int, ...]] = Counter()
    for _ in range(n):
        seq = [0]
        while len(seq) < 4:
            draft = [1, 1, 3][: 4 - len(seq) - 1]
            rows = transition[[seq[-1], *draft]]
            seq += [t for t, _ in accept_draft(decoding, rows, draft)]
        seen[tuple(seq[1:4])] += 1
    expected = {
        (a, b, c): float(probs[0][a] * probs[a][b] * probs[b][c])
        for a in range(v)
        for b in range(v)
        for c in range(v)
    }
    tv = 0.5 * sum(abs(seen[k] / n - p) for k, p in expected.items())
    assert tv < 0.03, tv


def test_sampling_is_seeded_and_valid(tiny: tokensift.Model) -> None:
    """Same seed, same tokens, given the same global tree (drafts decide how random numbers are used)."""
    ids = repetitive_prompt(2)
    runs = []
    for spec in ["suffix_decoding", "suffix_decoding", "suffix_decoding:max_cached_requests=0"] * 2:
        clear_global_caches()
        runs.append(
            tokensift.generate(tiny, ids, spec, max_new_tokens=NEW, temperature=0.8, seed=3, ignore_eos=True)
        )
    assert runs[0].token_ids == runs[1].token_ids == runs[3].token_ids
    assert runs[2].token_ids == runs[5].token_ids
    assert len(runs[0].token_ids) == NEW and all(0 <= t < VOCAB for t in runs[0].token_ids)


# -- composition --------------------------------------------------------------------------------------


def _run(
    model: tokensift.Model, ids: list[int], plan: Plan, new: int = NEW
) -> tuple[Decoding, tokensift.TokenCache]:
    """generate() without the stats, keeping the cache for inspection."""
    with torch.inference_mode():
        cache = tokensift.TokenCache(model.model, plan, prompt_tokens=len(ids))
        decoding = Decoding(model, cache, new, ignore_eos=True, prompt=list(ids))
        logits = decoding.forward(ids, last_only=True)[-1]
        if cache.plan.loop is None:
            token = decoding.sample(logits)
            while not decoding.accept(token, logits):
                logits = decoding.forward([token], last_only=True)[-1]
                token = decoding.sample(logits)
        else:
            cache.plan.loop.decode(decoding, logits)
    return decoding, cache


def test_snapkv_composition_is_snapkv() -> None:
    """A prompt compressor never acts on decode steps: with drafts, greedy output is SnapKV's own."""
    model = tiny_model("qwen2", layers=3)
    for ids in PROMPTS[:3]:
        spec = "snapkv:budget=40,window_size=8"
        alone = _greedy(model, ids, spec)
        both = _greedy(model, ids, spec + "+suffix_decoding")
        assert both.token_ids == alone.token_ids
        assert both.stats.tokens_evicted == alone.stats.tokens_evicted > 0
        assert both.stats.counters["accepted_tokens"] > 0
        assert not any("shorter than window_size" in n for n in both.stats.notes)


@pytest.mark.parametrize("evictor", ["h2o:budget=40", "streaming_llm:budget=40,sinks=4"])
def test_rollback_respects_eviction(evictor: str) -> None:
    """With a continuous evictor, each verification step evicts once, after the rollback: the cache
    equals that of a run which fed only the accepted tokens, step by step, and never saw a draft."""
    model = tiny_model("llama", layers=3)
    ids = repetitive_prompt(1)
    spec, plain_plan = Plan.of(evictor + "+suffix_decoding"), Plan.of(evictor)
    decoding, cache = _run(model, ids, spec)
    assert (
        cache.counters["accepted_tokens"] > 0
        and cache.counters["draft_tokens"] > cache.counters["accepted_tokens"]
    )
    tokens, per_step = decoding.tokens, cache.shared["loop_step_tokens"]
    assert sum(per_step) == len(tokens) - 1
    with torch.inference_mode():
        ref = tokensift.TokenCache(model.model, plain_plan, prompt_tokens=len(ids))
        ref_decoding = Decoding(model, ref, NEW, ignore_eos=True)
        assert int(ref_decoding.forward(ids, last_only=True)[-1].argmax()) == tokens[0]
        pos = 0
        for n in per_step:  # step: the last token and the drafts accepted after it, as one forward
            rows = ref_decoding.forward(tokens[pos : pos + n])
            assert [int(r.argmax()) for r in rows] == tokens[pos + 1 : pos + 1 + n]
            pos += n
    assert max(cache.tokens_held) == min(cache.tokens_held) == 40
    for mine, theirs in zip(cache.layers, ref.layers, strict=True):
        assert mine.n == theirs.n and mine.seen == theirs.seen
        assert torch.equal(mine.positions, theirs.positions)
        torch.testing.assert_close(mine.k, theirs.k, atol=1e-5, rtol=1e-5)
        for name, state in theirs.states.items():
            torch.testing.assert_close(mine.state(name), state[..., : theirs.n], atol=1e-4, rtol=1e-4)


@dataclass
class TopKeys(SparseDecodeMethod):
    """A minimal sparse-decode method: each query head group attends to its `keep` best keys."""

    name = "test_top_keys"
    keep: int = 24

    def decode_attention(
        self, layer: object, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        b, hq, _, d = query.shape
        hkv, n = keys.shape[1], keys.shape[2]
        if n <= self.keep:
            return dense_attention(query, keys, values, scale)
        scores = (query.reshape(b, hkv, hq // hkv, d) @ keys.transpose(-1, -2)).mean(2)
        index = scores.topk(self.keep, dim=-1).indices.sort(dim=-1).values[..., None].expand(-1, -1, -1, d)
        layer.cache.count("tokens_attended", self.keep)  # type: ignore[attr-defined]
        layer.cache.count("sparse_layer_steps")  # type: ignore[attr-defined]
        return dense_attention(query, keys.gather(2, index), values.gather(2, index), scale)


# Registered sparse-decode methods, configured for a 4-layer tiny model. Exact ones select from the
# current query and the cache alone; the others carry state across decode steps (TokenSelect's
# selection cache, HiP's refresh schedule) that a rollback resets, so they only have to run.
SPARSE = {
    "quest": ("quest:budget=32,page_size=8,dense_layers=1", True),
    "tokenselect": ("tokenselect:budget=24,selection_cache=false", True),
    "tidaldecode": ("tidaldecode:budget=24,sparse_layer_start=1", True),
    "tokenselect+cache": ("tokenselect:budget=24", False),
    "hip": ("hip:budget=40,window=8,sinks=2,dense_layers=1,block_size_q=4,sparse_prefill=false", False),
}


def _sparse_cases() -> list[tuple[str, str, bool]]:
    cases = [("top_keys", "", True)]
    for name, cls in sorted(REGISTRY.items()):
        if issubclass(cls, SparseDecodeMethod):
            known = [(k, spec, exact) for k, (spec, exact) in SPARSE.items() if k.split("+")[0] == name]
            cases += known or [(name, name, False)]
    return cases


@pytest.mark.parametrize(("label", "spec", "exact"), [pytest.param(*c, id=c[0]) for c in _sparse_cases()])
def test_sparse_decode_composition(label: str, spec: str, exact: bool) -> None:
    """Each draft query gets the sparse method's own decode attention over the keys (and the view of
    the cache) it would have had if decoded alone: greedy output equals the sparse method's own."""
    model = tiny_model("llama", layers=4)
    select = Plan((TopKeys(),)) if not spec else Plan.of(spec)  # a spec that no longer parses fails
    accepted, differs = 0, False
    for ids in PROMPTS[:3]:
        clear_global_caches()
        alone = _greedy(model, ids, select)
        both = _greedy(model, ids, Plan((*copy.deepcopy(select.methods), SuffixDecoding())))
        assert len(both.token_ids) == NEW
        # The sparse method attended to a subset, alone and under verification.
        assert (
            alone.stats.counters["sparse_layer_steps"] > 0 and both.stats.counters["sparse_layer_steps"] > 0
        )
        if exact:
            assert both.token_ids == alone.token_ids
        accepted += both.stats.counters["accepted_tokens"]
        differs |= alone.token_ids != _greedy(model, ids).token_ids
    assert accepted > 0
    if exact:
        # Matching the method alone is only a test if the method's output is not dense's.
        assert differs, f"{label} gave dense's tokens on every prompt: the equality above proves nothing"


def test_method_specs_and_errors() -> None:
    plan = Plan.of("snapkv:budget=0.25+suffix_decoding")
    assert [m.name for m in plan.methods] == ["snapkv", "suffix_decoding"] and plan.loop is plan.methods[1]
    with pytest.raises(TokensiftError, match="loop hook"):
        Plan.of("suffix_decoding+prompt_lookup")
    for bad in [
        "suffix_decoding:max_depth=1",
        "suffix_decoding:min_token_prob=2",
        "suffix_decoding:max_spec_tokens=0",
        "suffix_decoding:max_cached_requests=-2",
        "prompt_lookup:num_tokens=0",
        "prompt_lookup:min_ngram=3,max_ngram=2",
        "bild:fallback_threshold=1.5",
        "bild:rollback_threshold=-1",
        "bild:num_small_iters=0",
        "entropy_routing:threshold=-0.1",
    ]:
        with pytest.raises(TokensiftError):
            Plan.of(bad)
    assert BiLD(small_model=tiny_model("llama", seed=1)).spec().startswith("bild:small=tiny-llama,")


# -- BiLD and entropy routing ---------------------------------------------------------------------


def _pair(noise: float = 0.02) -> tuple[tokensift.Model, tokensift.Model]:
    """The two mostly agree at this noise."""
    return noisy_pair(noise)


def test_bild_limits_are_greedy_large() -> None:
    large, small = _pair()
    for ids in PROMPTS:
        target = _greedy(large, ids).token_ids
        agreeing = 0
        for method in [
            BiLD(small_model=small, fallback_threshold=1.0),  # always fall back
            BiLD(small_model=small, fallback_threshold=0.0, rollback_threshold=0.0),  # the paper's rule
            BiLD(small_model=small, fallback_threshold=0.0, rollback_threshold=0.0, skip_agreeing=True),
        ]:
            out = _greedy(large, ids, method)
            assert out.token_ids == target, method.spec()
            c = out.stats.counters
            if method.fallback_threshold == 1.0:
                assert c["bild_small_tokens"] == 0 and c["bild_fallbacks"] == NEW - 1
            elif method.skip_agreeing:
                agreeing += c["bild_small_tokens"]
        assert agreeing > 0  # the small model's agreeing tokens were kept and still matched


def test_bild_forced_handover_count() -> None:
    """fallback 0, rollback 1e9 (never): only the forced handover after num_small_iters small tokens, so
    1 + 10 + 1 + 10 + ... : ceil((n - 1) / 11) large forwards after the prefill."""
    large, small = _pair(noise=0.5)
    for n, iters in [(NEW, 10), (23, 10), (12, 3)]:
        out = tokensift.generate(
            large,
            PROMPTS[0],
            BiLD(small_model=small, fallback_threshold=0.0, rollback_threshold=1e9, num_small_iters=iters),
            max_new_tokens=n,
            ignore_eos=True,
        )
        c = out.stats.counters
        assert c["bild_large_forwards"] == math.ceil((n - 1) / (iters + 1))
        assert c["bild_rollbacks"] == c["bild_fallbacks"] == 0
        assert c["bild_small_tokens"] == n - 1 - (n - 1) // (iters + 1)


def test_bild_defaults_mix_both_models() -> None:
    large, small = _pair(noise=0.3)
    ids = PROMPTS[1]
    out = _greedy(large, ids, BiLD(small_model=small, fallback_threshold=0.3, rollback_threshold=2.0))
    c = out.stats.counters
    assert len(out.token_ids) == NEW
    assert 0 < c["bild_small_tokens"] < NEW and c["bild_large_forwards"] > 0
    with pytest.raises(TokensiftError, match="greedily"):
        tokensift.generate(large, ids, BiLD(small_model=small), temperature=0.5)
    odd = tiny_model("llama")
    odd.model.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(TokensiftError, match="share a tokenizer"):
        _greedy(large, ids, BiLD(small_model=odd))


def test_entropy_routing_limits_and_share() -> None:
    large, small = _pair(noise=0.3)
    for ids in PROMPTS[:3]:
        big = _greedy(large, ids).token_ids
        little = _greedy(small, ids).token_ids
        assert big != little
        assert _greedy(large, ids, EntropyRouting(small_model=small, threshold=0.0)).token_ids == big
        assert _greedy(large, ids, EntropyRouting(small_model=small, threshold=1e9)).token_ids == little
        shares = [
            _greedy(large, ids, EntropyRouting(small_model=small, threshold=t)).stats.counters[
                "routing_share"
            ]
            for t in [0.0, 3.0, 3.9, 4.05, 4.15, 5.0, 1e9]  # tiny-model entropies lie in 3.4-4.2
        ]
        assert shares[0] == 1.0 and shares[-1] == 0.0
        assert all(a >= b for a, b in itertools.pairwise(shares))
        assert any(0 < s < 1 for s in shares)


def test_entropy_unit() -> None:
    assert entropy(torch.zeros(VOCAB)) == pytest.approx(math.log(VOCAB))
    one_hot = torch.full((VOCAB,), -1e4)
    one_hot[3] = 0
    assert entropy(one_hot) == pytest.approx(0.0, abs=1e-6)


def test_routing_composes_with_eviction() -> None:
    large, small = _pair(noise=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoOpWarning)
        out = _greedy(
            large,
            PROMPTS[0],
            Plan((*Plan.of("h2o:budget=40").methods, EntropyRouting(small_model=small, threshold=4.0))),
        )
    assert out.stats.tokens_held == 40 and 0 < out.stats.counters["routing_share"] < 1
