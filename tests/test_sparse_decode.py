"""Dynamic sparse decoding (Quest, TokenSelect, TidalDecode, HiP): fidelity, worked examples, the
gathered fast path, composition with eviction."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import tokensift
from tokensift import NoOpWarning
from tokensift.errors import TokensiftError
from tokensift.methods.hip import HiP, tree_search
from tokensift.methods.quest import Quest, page_tokens, select_pages
from tokensift.methods.tidaldecode import TidalDecode, default_correction_layer, positions_to_slots
from tokensift.methods.tokenselect import TokenSelect, max_pool, soft_votes
from tokensift.runtime import block_sparse as bsa
from tokensift.runtime.rope import shift_keys
from tokensift.runtime.scores import dense_attention
from tokensift.runtime.sparse_decode import PageSummary, attend, gather, page_upper_bound, sparse_attention

from .conftest import prompt_ids, tiny_model

PROMPT, NEW = 96, 12
# Budgets that cover the whole context (prompt + generated tokens) for every method.
COVERING = [
    "quest:budget=512,dense_layers=0",
    "tokenselect:budget=512",
    "tidaldecode:budget=512,sparse_layer_start=0,correction_layer=1",
    "hip:budget=512,dense_layers=0",
]
# Budgets well under the context, with every layer eligible for sparsity.
SPARSE = [
    "quest:budget=32,page_size=8,dense_layers=0",
    "tokenselect:budget=32,n_init=4,n_local=8",
    "tidaldecode:budget=16,sparse_layer_start=0,correction_layer=1",
    "hip:budget=48,sinks=4,window=16,block_size_q=8,dense_layers=0",
]


def eager_subset(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, slots: torch.Tensor
) -> torch.Tensor:
    """Reference: softmax attention of decode queries (B, H_q, 1, D) over `slots` (B, G, m) only,
    computed as full attention with every other key masked out (GQA by repetition)."""
    hq = q.shape[1]
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    slots = slots.repeat_interleave(hq // slots.shape[1], 1)
    logits = (q @ k.transpose(-1, -2)).float() * scale  # (B, H_q, 1, n)
    allowed = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, slots.unsqueeze(2), True)
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def filled_layer(spec: str, n: int, seed: int = 0, kind: str = "llama"):
    """A real cache layer (layer 0 of a tiny model's TokenCache) holding n random tokens."""
    model = tiny_model(kind)
    cache = tokensift.TokenCache(model.model, spec, prompt_tokens=n)
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g)
    layer = cache.layers[0]
    layer.update(k, v)
    return cache, layer


# -- the gathered fast path ----------------------------------------------------------------------------
@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize("buffer", [True, False])
def test_gather_reads_the_right_rows(per_query_head: bool, buffer: bool) -> None:
    b, h, n, d, rep = 2, 3, 40, 8, 2
    full = torch.randn(b, h, n + 9, d)
    x = full[:, :, :n] if buffer else full[:, :, :n].transpose(0, 1).contiguous().transpose(0, 1)
    g = h * rep if per_query_head else h
    index = torch.randint(0, n, (b, g, 7))
    expected = torch.stack(
        [torch.stack([x[bi, gi * h // g, index[bi, gi]] for gi in range(g)]) for bi in range(b)]
    )
    assert torch.equal(gather(x, index), expected)


def test_sparse_attention_over_everything_is_dense() -> None:
    q, k, v = torch.randn(1, 6, 1, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    everything = torch.stack([torch.randperm(50), torch.randperm(50)]).unsqueeze(0)
    torch.testing.assert_close(
        sparse_attention(q, k, v, everything, 0.3), dense_attention(q, k, v, 0.3), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("per_query_head", [False, True])
def test_sparse_attention_matches_masked_reference(per_query_head: bool) -> None:
    q, k, v = torch.randn(1, 6, 1, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    slots = torch.stack([torch.randperm(50)[:9] for _ in range(6 if per_query_head else 2)]).unsqueeze(0)
    torch.testing.assert_close(
        sparse_attention(q, k, v, slots, 0.3), eager_subset(q, k, v, 0.3, slots), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_one_row_per_head_attention_in_half_precision_is_fp32s(dtype: torch.dtype, masked: bool) -> None:
    # One query row per index row (TidalDecode's per-query-head gathers) in bf16/fp16 on CPU skips
    # SDPA, which is slow there, for two matmuls: the same attention, masks and bias included.
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 6, rows, 8, generator=g) for rows in (1, 40, 40))
    valid = bias = None
    if masked:
        valid = torch.rand(1, 6, 40, generator=g) > 0.3
        valid[..., 0] = True
        v = torch.where(valid.unsqueeze(-1), v, torch.full_like(v, 1e3))  # a masked slot would show
        bias = torch.randn(1, 6, 1, 40, generator=g)
    reference = attend(q, k, v, 0.3, valid, bias)  # float32: SDPA
    out = attend(q.to(dtype), k.to(dtype), v.to(dtype), 0.3, valid, bias)
    assert out.dtype == dtype and out.shape == reference.shape == (1, 6, 1, 8)
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


# -- T1: a budget covering the context reproduces dense, exactly -----------------------------------------
@pytest.mark.parametrize("spec", COVERING)
def test_covering_budget_is_dense(tiny: tokensift.Model, spec: str) -> None:
    ids = prompt_ids(PROMPT)
    dense = tokensift.generate(tiny, ids, "dense", max_new_tokens=NEW, return_logits=True)
    with pytest.warns(NoOpWarning, match="covered the whole cache|fit its budget"):
        out = tokensift.generate(tiny, ids, spec, max_new_tokens=NEW, return_logits=True)
    assert out.token_ids == dense.token_ids
    for a, b in zip(out.logits or [], dense.logits or [], strict=True):
        assert torch.equal(a, b)
    assert "sparse_layer_steps" not in out.stats.counters
    assert out.stats.counters["tokens_attended"] == out.stats.counters["tokens_cached"]
    assert not out.stats.applied  # reported as a no-op


@pytest.mark.parametrize("spec", SPARSE)
def test_small_budget_really_skips_tokens(spec: str) -> None:
    model = tiny_model("qwen2", layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoOpWarning)  # it must apply, silently or not at all
        out = tokensift.generate(model, prompt_ids(PROMPT), spec, max_new_tokens=NEW)
    c = out.stats.counters
    assert c["sparse_layer_steps"] > 0
    # TidalDecode's two selection layers (of three here) attend to everything.
    assert c["tokens_attended"] < (0.75 if "tidal" in spec else 0.6) * c["tokens_cached"]
    assert c["selection_seconds"] > 0 and c["attention_seconds"] > 0
    assert out.stats.tokens_evicted == 0  # the whole cache stays; only attention is sparse
    assert out.stats.applied


# -- Quest ----------------------------------------------------------------------------------------------
def test_quest_two_channel_worked_example() -> None:
    keys = torch.tensor([[1.0, 2.0], [3.0, 0.0]]).view(1, 1, 2, 2)
    summary = PageSummary(keys, page_size=2)
    summary.update(keys, 1)
    assert summary.kmin.flatten().tolist() == [1.0, 0.0]
    assert summary.kmax.flatten().tolist() == [3.0, 2.0]
    q = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
    assert page_upper_bound(q, summary.kmin, summary.kmax).item() == 3.0
    assert summary.page_scores(q, 1).item() == 3.0
    assert (q @ keys.transpose(-1, -2)).max().item() == 3.0  # the bound is tight here


def test_quest_bound_is_an_upper_bound_on_random_pages() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 64 * 16, 32, generator=g) * torch.rand(1, 1, 64 * 16, 1, generator=g) * 4
    q = torch.randn(2, 3, 5, 32, generator=g)
    summary = PageSummary(keys, page_size=16)
    summary.update(keys, 64)
    bound = page_upper_bound(q, summary.kmin, summary.kmax)  # (2, 3, 5, 64)
    torch.testing.assert_close(summary.page_scores(q, 64), bound)
    true_max = (q @ keys.transpose(-1, -2)).unflatten(-1, (64, 16)).amax(-1)
    assert bool((bound >= true_max - 1e-4).all())
    assert bool((bound > true_max + 1e-3).any())  # a bound, not the max itself


def test_quest_summary_kept_up_to_date_as_pages_fill() -> None:
    keys = torch.randn(1, 2, 70, 8)
    summary = PageSummary(keys, page_size=16)
    for n in (20, 33, 47, 64, 70):  # pages complete at 16, 32, 48 and 64 slots
        summary.update(keys[:, :, :n], n // 16)
    assert summary.pages == 4
    blocks = keys[:, :, :64].unflatten(2, (4, 16))
    assert torch.equal(summary.kmin, blocks.amin(3)) and torch.equal(summary.kmax, blocks.amax(3))


def test_quest_picks_the_pages_holding_the_best_keys() -> None:
    cache, layer = filled_layer("quest:budget=12,page_size=4,dense_layers=0", 40)
    keys = layer.k
    keys.mul_(0.01)
    q = torch.zeros(1, 4, 1, 16)
    q[..., 0] = 1.0
    keys[:, :, 9, 0] = 5.0  # page 2
    keys[:, :, 26, 0] = 4.0  # page 6
    method = cache.plan.select
    out = method.decode_attention(layer, q, keys, layer.v, 0.25)
    kmin, kmax = keys[:, :, :36].unflatten(2, (9, 4)).aminmax(dim=3)
    chosen = select_pages(page_upper_bound(q.view(1, 2, 2, 16), kmin, kmax), 2, "max")
    assert sorted(chosen[0, 0].tolist()) == [2, 6]
    slots = torch.tensor([8, 9, 10, 11, 24, 25, 26, 27, 36, 37, 38, 39]).expand(1, 2, 12)
    torch.testing.assert_close(out, eager_subset(q, keys, layer.v, 0.25, slots), atol=1e-6, rtol=1e-5)
    assert cache.counters["tokens_attended"] == 12 and cache.counters["sparse_layer_steps"] == 1


def test_quest_page_tokens_add_the_current_page() -> None:
    assert page_tokens(torch.tensor([[[3, 0]]]), 4, 20, 23).tolist() == [
        [[12, 13, 14, 15, 0, 1, 2, 3, 20, 21, 22]]
    ]


# -- TokenSelect ----------------------------------------------------------------------------------------
def test_tokenselect_soft_voting_worked_example() -> None:
    # methods.md 4(f)(2): two heads, three candidates.
    logits = torch.tensor([[20.0, 10.0, 0.0], [0.0, 0.0, 5.0]]).view(1, 1, 2, 3)
    votes = soft_votes(logits, shared=True)[0]
    torch.testing.assert_close(votes, torch.tensor([1.0066, 0.0067, 0.9867]), atol=1e-3, rtol=0)
    assert sorted(votes.topk(2).indices.tolist()) == [0, 2]
    assert sorted(logits.sum(dim=(1, 2))[0].topk(2).indices.tolist()) == [0, 1]  # raw sums would differ


def test_tokenselect_max_pool_follows_the_reference_padding() -> None:
    votes = torch.tensor([[0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0]])
    assert max_pool(votes, 3).tolist() == [[0.0, 0.0, 9.0, 9.0, 9.0, 0.0, 0.0, 0.0]]
    assert max_pool(votes, 6).shape[-1] == 7  # even kernels lose one position, as in the reference


def test_tokenselect_attends_sinks_top_k_and_local_window() -> None:
    cache, layer = filled_layer("tokenselect:budget=8,n_init=2,n_local=4", 40)
    keys = layer.k
    keys.mul_(0.01)
    keys[:, :, 10, 0] = 6.0
    keys[:, :, 20, 0] = 5.0
    keys[:, :, 37, 0] = 9.0  # inside the local window: not a candidate
    q = torch.zeros(1, 4, 1, 16)
    q[..., 0] = 1.0
    out = cache.plan.select.decode_attention(layer, q, keys, layer.v, 0.25)
    slots = torch.tensor([0, 1, 10, 20, 36, 37, 38, 39]).expand(1, 2, 8)
    torch.testing.assert_close(out, eager_subset(q, keys, layer.v, 0.25, slots), atol=1e-6, rtol=1e-5)


def test_tokenselect_selection_cache_reuses_and_counts() -> None:
    cache, layer = filled_layer("tokenselect:budget=8,n_init=2,n_local=4", 40)
    method = cache.plan.select
    q = torch.randn(1, 4, 1, 16)
    first = method.decode_attention(layer, q, layer.k, layer.v, 0.25)
    second = method.decode_attention(layer, q, layer.k, layer.v, 0.25)
    assert torch.equal(first, second)
    assert cache.counters["selections_computed"] == 1 and cache.counters["selection_reuses"] == 1
    method.decode_attention(layer, -q, layer.k, layer.v, 0.25)  # cosine -1: recompute
    assert cache.counters["selections_computed"] == 2
    off = tokensift.TokenCache(
        tiny_model().model, "tokenselect:budget=8,n_init=2,n_local=4,selection_cache=false"
    )
    off.layers[0].update(layer.k.clone(), layer.v.clone())
    for _ in range(2):
        off.plan.select.decode_attention(off.layers[0], q, off.layers[0].k, off.layers[0].v, 0.25)
    assert off.counters["selections_computed"] == 2 and "selection_reuses" not in off.counters


def test_tokenselect_selection_cache_compares_queries_without_their_position() -> None:
    """The same query one position later is the same query: the selection is reused."""
    cache, layer = filled_layer("tokenselect:budget=8,n_init=2,n_local=4", 40)
    inv_freq = tokensift.runtime.rope.find_inv_freq(cache.handle.model)
    q_raw = torch.randn(1, 4, 1, 16)
    cache.plan.select.decode_attention(
        layer, shift_keys(q_raw, torch.tensor([39]), inv_freq), layer.k, layer.v, 1.0
    )
    layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    cache.plan.select.decode_attention(
        layer, shift_keys(q_raw, torch.tensor([40]), inv_freq), layer.k, layer.v, 1.0
    )
    assert cache.counters["selection_reuses"] == 1


def test_tokenselect_compacted_positions_rerotate_the_selection() -> None:
    """positions=compacted: scoring against un-rotated keys, attention at positions 0..m-1."""
    model = tiny_model("llama")
    cache = tokensift.TokenCache(model.model, "tokenselect:budget=8,n_init=2,n_local=4,positions=compacted")
    assert cache.rope is not None and cache.plan.repositions
    n, inv_freq = 40, cache.rope.inv_freq
    # Channels 7 and 15 rotate slowest (RoPE pairs i, i + 8): a distance of n_local barely turns them.
    raw = torch.randn(1, 2, n, 16) * 0.01
    raw[:, :, 10, 7] = 6.0
    raw[:, :, 20, 7] = 5.0
    values = torch.randn(1, 2, n, 16)
    layer = cache.layers[0]
    layer.update(cache.rope.rotate(raw), values)  # the model hands keys rotated at positions 0..n-1
    assert torch.allclose(layer.k, raw, atol=1e-5)  # stored before RoPE
    q_raw = torch.zeros(1, 4, 1, 16)
    q_raw[..., 7] = 1.0
    q = shift_keys(q_raw, torch.tensor([n - 1]), inv_freq)
    out = cache.plan.select.decode_attention(layer, q, layer.attention_keys(), layer.v, 0.25)
    chosen = torch.tensor([0, 1, 10, 20, 36, 37, 38, 39])
    k_sel = shift_keys(raw[:, :, chosen], torch.arange(8), inv_freq)
    q_sel = shift_keys(q_raw, torch.tensor([7]), inv_freq)
    expected = dense_attention(q_sel, k_sel, values[:, :, chosen], 0.25)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -- TidalDecode ----------------------------------------------------------------------------------------
def test_tidaldecode_defaults_follow_model_depth() -> None:
    assert [default_correction_layer(n) for n in (32, 30, 24, 28)] == [13, 12, 10, 11]
    assert TidalDecode(budget=8).layer_roles(30) == (2, 12)
    with pytest.raises(TokensiftError, match="do not both exist"):
        TidalDecode(budget=8, correction_layer=9).layer_roles(4)


def test_tidaldecode_default_layer_roles_follow_the_paper() -> None:
    """Dense layers 0-1, selection at 2, one re-selection in the middle, every other layer sparse."""
    model = tiny_model("qwen2", layers=8)
    out = tokensift.generate(model, prompt_ids(80), "tidaldecode:budget=16", max_new_tokens=4)
    c = out.stats.counters
    steps = c["decode_layer_steps"] / 8
    assert steps == 3 and TidalDecode(budget=16).layer_roles(8) == (2, 3)
    assert c["selections_computed"] == 2 * steps
    assert c["sparse_layer_steps"] == (8 - 4) * steps  # layers 4-7
    assert c["tokens_attended"] == steps * (4 * (80 + 2) + 4 * 16)  # 4 full layers at the mean length


def test_tidaldecode_layer_to_layer_mask_persistence(monkeypatch: pytest.MonkeyPatch) -> None:
    """methods.md 5(f)(2): 4 layers, selection at layer 1, re-selection at 3."""
    model = tiny_model("llama", layers=4)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    select = TidalDecode.select

    def spy(self, layer, query, keys, values, scale):  # type: ignore[no-untyped-def]
        out = select(self, layer, query, keys, values, scale)
        seen[layer.index] = (query, keys, layer.cache.shared["tidaldecode"][1].clone())
        return out

    monkeypatch.setattr(TidalDecode, "select", spy)
    cache = tokensift.TokenCache(model.model, "tidaldecode:budget=6,sparse_layer_start=1,correction_layer=3")
    with torch.inference_mode():
        model.model(torch.tensor([prompt_ids(60)]), cache=cache, use_cache=True)
        model.model(torch.tensor([[5]]), cache=cache, use_cache=True)
    assert sorted(seen) == [1, 3]
    for index in (1, 3):  # each selection layer records the top-k of its own logits per query head,
        query, keys, recorded = seen[index]  # the current token (recent=1, as the kernel) always in it
        logits = query @ keys.repeat_interleave(2, 1).transpose(-1, -2)
        logits[..., -1] = float("inf")
        expected = logits[:, :, 0].topk(6, dim=-1).indices.sort(-1).values
        assert torch.equal(recorded.sort(-1).values, expected)
    support = cache.layers[2].extra["tidaldecode_support"]
    assert torch.equal(support, seen[1][2])  # layer 2 attends exactly to layer 1's top-k
    assert not torch.equal(seen[3][2].sort(-1).values, seen[1][2].sort(-1).values)  # layer 3 re-selects
    assert cache.counters["sparse_layer_steps"] == 1 and cache.counters["selections_computed"] == 2


def selection_layers(spec: str, n: int = 40, kind: str = "qwen2"):
    """A 3-layer tiny model's cache (selection at layer 0, sparse layers 1 and 2) holding n random
    tokens in every layer, its method, and random decode queries (4 query heads, 2 KV heads)."""
    model = tiny_model(kind, layers=3)
    cache = tokensift.TokenCache(
        model.model, f"{spec},sparse_layer_start=0,correction_layer=2", prompt_tokens=n
    )
    g = torch.Generator().manual_seed(3)
    for layer in cache.layers:
        layer.update(torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g))
    return cache, cache.plan.select, torch.randn(1, 4, 1, 16, generator=g)


@pytest.mark.parametrize("heads", ["query", "kv", "shared"])
def test_tidaldecode_always_attends_sinks_and_recent_tokens(heads: str) -> None:
    n = 40
    cache, method, q = selection_layers(f"tidaldecode:budget=12,sinks=3,recent=5,head_selection={heads}", n)
    first, sparse = cache.layers[0], cache.layers[1]
    method.decode_attention(first, q, first.k, first.v, 0.25)
    method.decode_attention(sparse, q, sparse.k, sparse.v, 0.25)
    support = sparse.extra["tidaldecode_support"]
    assert support.shape == (1, 4 if heads == "query" else 2, 12)  # per query head or per KV head
    for row in support[0].tolist():
        assert {0, 1, 2, n - 5, n - 4, n - 3, n - 2, n - 1} <= set(row) and len(set(row)) == 12
    if heads == "shared":
        assert torch.equal(support[0, 0], support[0, 1])  # one selection for every head


@pytest.mark.parametrize("heads", ["query", "kv", "shared"])
def test_tidaldecode_gqa_mapping_and_scores(heads: str) -> None:
    """Query head h reads KV head h // rep (transformers' repeat_kv); the selection ranks the exact
    logits per query head, by the group's maximum logit per KV head, or by the heads' summed
    probabilities; the sparse layer's output is exact attention over the recorded slots only."""
    cache, method, q = selection_layers(f"tidaldecode:budget=10,recent=0,head_selection={heads}")
    first, sparse = cache.layers[0], cache.layers[1]
    method.decode_attention(first, q, first.k, first.v, 0.25)
    recorded = cache.shared["tidaldecode"][1]
    logits = (q @ first.k.repeat_interleave(2, 1).transpose(-1, -2))[:, :, 0] * 0.25  # (1, 4, n)
    if heads == "query":
        score = logits
    elif heads == "kv":
        score = logits.view(1, 2, 2, -1).amax(2)
    else:
        score = logits.softmax(-1).sum(1, keepdim=True).expand(1, 2, -1)
    assert torch.equal(recorded.sort(-1).values, score.topk(10, dim=-1).indices.sort(-1).values)
    q2 = torch.randn(1, 4, 1, 16)
    out = method.decode_attention(sparse, q2, sparse.k, sparse.v, 0.25)
    torch.testing.assert_close(
        out, eager_subset(q2, sparse.k, sparse.v, 0.25, recorded), atol=1e-6, rtol=1e-5
    )
    assert cache.counters["tokens_attended"] == first.n + 10


def test_tidaldecode_maps_positions_after_eviction() -> None:
    _, layer = filled_layer("snapkv:budget=8,window_size=2", 12)
    layer.keep(torch.tensor([[[0, 3, 5, 11], [1, 2, 3, 4]]]))
    slots, valid = positions_to_slots(layer, torch.tensor([[[11, 3], [4, 11]]]))
    assert slots.tolist() == [[[3, 1], [3, 0]]]
    assert valid is not None and valid.tolist() == [[[True, True], [True, False]]]


# -- HiP ------------------------------------------------------------------------------------------------
def unimodal(n: int, peak: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys whose score q.k_j = -(j - peak)^2 is a smooth, single-peaked function of position."""
    j = torch.arange(n, dtype=torch.float64)
    keys = torch.stack([-(j**2), 2 * j, torch.ones_like(j)], dim=-1).view(1, 1, n, 3)
    query = torch.tensor([1.0, peak, -(peak**2)], dtype=torch.float64).view(1, 1, 1, 1, 3)
    return query, keys


@pytest.mark.parametrize("peak", [3.3, 400.6, 1019.2, 777.5])
def test_hip_finds_the_exact_top_k_under_locality(peak: float) -> None:
    n, k, bk = 1024, 16, 2
    query, keys = unimodal(n, peak)
    blocks, valid, iterations = tree_search(query, keys, 0, torch.tensor([n // bk]), k, bk)
    assert bool(valid.all())
    scores = (query[0, 0, 0] @ keys[0, 0].T).view(n // bk, bk).amax(-1)
    assert sorted(blocks.flatten().tolist()) == sorted(scores.topk(k).indices.tolist())
    assert iterations == math.ceil(math.log2(n / (k * bk))) == 5


def test_hip_iterations_and_short_ranges() -> None:
    keys = torch.randn(1, 1, 300, 4)
    q = torch.randn(1, 1, 2, 3, 4)
    blocks, valid, iterations = tree_search(q, keys, 0, torch.tensor([100, 6]), 8, 3)
    assert iterations == math.ceil(math.log2(100 / 8))
    assert valid[0, 0, 0].all() and valid[0, 0, 1].sum() == 6  # a 6-block range: all six, rest invalid
    assert sorted(blocks[0, 0, 1][valid[0, 0, 1]].tolist()) == [0, 1, 2, 3, 4, 5]


def test_hip_random_keys_recall_beats_random() -> None:
    """Without locality the search is an approximation: better than chance, well below exact."""
    g = torch.Generator().manual_seed(0)
    n, k = 2048, 64
    keys, q = torch.randn(1, 1, n, 16, generator=g), torch.randn(1, 1, 1, 1, 16, generator=g)
    blocks, _, _ = tree_search(q, keys, 0, torch.tensor([n]), k, 1)
    true = set((q[0, 0, 0] @ keys[0, 0].T).flatten().topk(k).indices.tolist())
    recall = len(true & set(blocks.flatten().tolist())) / k
    assert k / n < recall < 1.0


def test_hip_decode_refreshes_every_r_steps() -> None:
    model = tiny_model("llama", layers=2)
    spec = "hip:budget=40,sinks=2,window=8,refresh_interval=4,dense_layers=1"
    out = tokensift.generate(model, prompt_ids(80), spec, max_new_tokens=10, ignore_eos=True)
    c = out.stats.counters
    assert c["hip_mask_refreshes"] == math.ceil(9 / 4)  # 9 decode steps in the one sparse layer
    assert c["sparse_layer_steps"] == 9 and c["decode_layer_steps"] == 18


def test_hip_prefill_covering_everything_is_exact() -> None:
    """Block-sparse prefill with masks covering every key equals dense causal attention."""
    method = HiP(budget=400, sinks=3, window=8, block_size_q=8, block_size_k=2).resolve(100)
    q, k, v = torch.randn(1, 4, 100, 8), torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    with bsa.counting() as meter:
        out, iterations = method.block_sparse(q, k, v, 0.3)
    assert iterations == 0 and meter.skipped == 0 and meter.computed > 0
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.3), atol=1e-5, rtol=1e-5)
    # Queries appended to a cache (a chunk of 37 after 63 cached keys) follow the same masks.
    out, _ = method.block_sparse(q[:, :, -37:], k, v, 0.3)
    torch.testing.assert_close(out, dense_attention(q[:, :, -37:], k, v, 0.3), atol=1e-5, rtol=1e-5)


def test_hip_prefill_attends_to_its_mask_only() -> None:
    """With locality-shaped keys, sparse prefill equals exact attention restricted to sinks + the
    true top blocks + the window, for every query block."""
    n, d = 160, 3
    _, keys = unimodal(n, 40.3)
    keys = keys.float().expand(1, 2, n, d).contiguous() / 1000
    q = torch.tensor([1.0, 40.3, -(40.3**2)]).view(1, 1, 1, 3).expand(1, 4, n, 3).contiguous() / 10
    v = torch.randn(1, 2, n, d)
    method = HiP(budget=4 + 16 + 8, sinks=4, window=16, block_size_q=16, block_size_k=2).resolve(n)
    with bsa.counting() as meter:
        out, _ = method.block_sparse(q, keys, v, 1.0)
    rows, attended = [], 0
    for i in range(n):  # reference mask, row by row (test code only)
        first = i // 16 * 16
        end = method.search_end(first)
        best = (
            (q[0, 0, i] @ keys[0, 0, 4:end].T).view(-1, 2).amax(-1).topk(min(4, (end - 4) // 2)).indices
        ) * 2 + 4
        allowed = (
            set(range(min(4, i + 1))) | set(range(end, i + 1)) | {int(t) + o for t in best for o in (0, 1)}
        )
        logits = torch.einsum("hd,hnd->hn", q[0, :, i], keys[0].repeat_interleave(2, 0))
        mask = torch.full((n,), float("-inf"))
        mask[sorted(allowed)] = 0
        attended += 4 * len(allowed)
        rows.append((logits + mask).softmax(-1).unsqueeze(1) @ v[0].repeat_interleave(2, 0))
    torch.testing.assert_close(out[0], torch.cat(rows, dim=1), atol=1e-4, rtol=1e-4)
    assert meter.skipped == 4 * n * (n + 1) // 2 - attended > 0  # the causal pairs outside the mask


# -- composition, interop, errors -----------------------------------------------------------------------
@pytest.mark.parametrize("evictor", ["snapkv:budget=48,window_size=8", "streaming_llm:budget=56"])
@pytest.mark.parametrize("sparse", SPARSE)
def test_composes_with_eviction(evictor: str, sparse: str) -> None:
    model = tiny_model("llama", layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOpWarning)
        out = tokensift.generate(model, prompt_ids(PROMPT), f"{evictor}+{sparse}", max_new_tokens=NEW)
    s, c = out.stats, out.stats.counters
    assert s.tokens_evicted > 0 and s.kv_bytes_peak < s.kv_bytes_dense  # the evictor ran
    assert c["sparse_layer_steps"] > 0 and c["tokens_attended"] < c["tokens_cached"]  # so did selection
    assert len(out.token_ids) == NEW


def test_sparse_budget_covering_an_evicted_cache_equals_the_evictor_alone() -> None:
    model = tiny_model("qwen2", layers=3)
    ids = prompt_ids(PROMPT)
    alone = tokensift.generate(
        model, ids, "snapkv:budget=48,window_size=8", max_new_tokens=NEW, return_logits=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOpWarning)
        both = tokensift.generate(
            model,
            ids,
            "snapkv:budget=48,window_size=8+tokenselect:budget=256",
            max_new_tokens=NEW,
            return_logits=True,
        )
    assert both.token_ids == alone.token_ids
    for a, b in zip(both.logits or [], alone.logits or [], strict=True):
        assert torch.equal(a, b)


def test_ragged_layers_are_noted_not_silently_dense() -> None:
    """Head-adaptive eviction stores heads of different lengths, which the runtime attends densely:
    the selector must say it did not run there."""
    model = tiny_model("llama", layers=3)
    spec = "adaptive(snapkv:budget=40,window_size=8):alpha=0.2+quest:budget=32,page_size=8,dense_layers=0"
    with pytest.warns(NoOpWarning, match="quest: layers holding per-head budgets"):
        tokensift.generate(model, prompt_ids(PROMPT), spec, max_new_tokens=4)


def test_hf_generate_interop() -> None:
    model = tiny_model("llama", layers=3)
    ids = prompt_ids(PROMPT)
    for spec in SPARSE:
        ours = tokensift.generate(model, ids, spec, max_new_tokens=NEW)
        cache = tokensift.TokenCache(model.model, spec)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            out = model.model.generate(
                torch.tensor([ids]), past_key_values=cache, max_new_tokens=NEW, do_sample=False
            )
        assert out[0, PROMPT:].tolist() == ours.token_ids, spec
        assert cache.counters["sparse_layer_steps"] > 0


@pytest.mark.parametrize(
    "spec, match",
    [
        ("quest+tokenselect", "both claim the select hook"),
        ("hip+quest", "both claim the select hook"),
        ("quest:page_size=0", "page_size must be >= 1"),
        ("quest:budget=1.5", "fraction of the prompt"),
        ("tokenselect:similarity_threshold=2", "cosine"),
        ("tidaldecode:sparse_layer_start=3,correction_layer=2", "must come after"),
        ("tidaldecode:sinks=-1", "sinks must be an int >= 0"),
        ("tidaldecode:head_selection=layer", "must be one of query, kv, shared"),
        ("hip:block_size_k=0", "block_size_k must be >= 1"),
        ("h2o+quest", "cannot run with sparse attention"),
    ],
)
def test_bad_specs_are_one_line_errors(spec: str, match: str) -> None:
    with pytest.raises(TokensiftError, match=match) as err:
        tokensift.Plan.of(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "method, match",
    [
        (Quest(budget=20, page_size=16), "at least two pages"),
        (TokenSelect(budget=10, n_init=4, n_local=6), "leaves no top-k"),
        (HiP(budget=100, sinks=4, window=128), "leaves no key block"),
        (TidalDecode(budget=8, sinks=4, recent=4), "leaves no top-k"),
    ],
)
def test_budgets_too_small_for_the_method(method: tokensift.Method, match: str) -> None:
    with pytest.raises(TokensiftError, match=match):
        method.resolve(1000)


def test_methods_are_registered_with_defaults() -> None:
    for name in ("quest", "tokenselect", "tidaldecode", "hip"):
        method = tokensift.Plan.of(name).methods[0]
        assert method.name == name and method.summary()
        assert "Based on" in (type(method).__doc__ or "")
    ts = tokensift.Plan.of("tokenselect:budget=2688").resolve(10_000).methods[0]
    assert (ts.init_tokens, ts.top_k, ts.local_tokens) == (128, 2048, 512)  # the reference split
