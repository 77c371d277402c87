"""Sparse prefill (A-shape, MInference, DHSA): fidelity, worked examples, the engine and the search."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import tokensift
from tokensift import NoOpWarning, TokensiftError
from tokensift.calibration import save_artefact
from tokensift.methods.a_shape import AShape, a_shape_mask
from tokensift.methods.dhsa import (
    DHSA,
    BoundaryPredictor,
    chunk_keys,
    nms_1d,
    select_boundaries,
    upsample,
)
from tokensift.methods.minference import (
    MInference,
    block_sparse_past,
    diagonal_sums,
    vertical_slash_past,
)
from tokensift.runtime import block_sparse as bsa
from tokensift.runtime.cache import TokenCache

from .conftest import prompt_ids, tiny_model

PROMPT, NEW = 96, 8


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, allowed: torch.Tensor):
    """Masked softmax attention over an explicit (B, H_q, L, n) boolean mask (tests only)."""
    rep = q.shape[1] // k.shape[1]
    logits = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return probs @ v.repeat_interleave(rep, 1)


def engine_mask(
    past: torch.Tensor, length: int, n: int, start: int, block_size: int, heads: int
) -> torch.Tensor:
    """The (B, H, L, n) mask the engine promises for `past` (own block causal, past keys visible)."""
    b = past.shape[0]
    allowed = torch.zeros(b, heads, length, n, dtype=torch.bool)
    offset = n - length
    for j, first in enumerate(bsa.block_starts(length, n, start, block_size).tolist()):
        for r in range(block_size):
            row = first + r - offset
            if row >= length:
                break
            allowed[:, :, row, first : first + r + 1] = True
            for bi in range(b):
                for h in range(heads):
                    keys = past[bi, h if past.shape[1] > 1 else 0, j]
                    allowed[bi, h, row, keys[keys < n]] = True
    return allowed


def fake_layer(model: tokensift.Model, method: tokensift.methods.Method) -> object:
    cache = TokenCache(model, method)
    layer = cache.layers[0]
    layer.owner = cache  # a layer links to its cache weakly: keep the cache as long as the layer
    return layer


# --- the engine ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("offset", [0, 7])
def test_engine_matches_masked_reference(shared: bool, offset: int) -> None:
    torch.manual_seed(0)
    b, hq, hkv, length, d, bs = 2, 4, 2, 38, 8, 4
    n = length + offset
    q, k, v = torch.randn(b, hq, length, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    start = bsa.first_sparse_row(length, n, 5, bs)
    firsts = bsa.block_starts(length, n, start, bs)
    g = 1 if shared else hq
    past = torch.full((b, g, len(firsts), 5), n)
    rng = random.Random(0)
    for bi in range(b):
        for h in range(g):
            for j, first in enumerate(firsts.tolist()):
                count = 5 if j % 3 else 2  # some blocks ragged (padded)
                past[bi, h, j, :count] = torch.tensor(rng.sample(range(first), count))
    groups = (
        bsa.Groups.per_kv_head(hkv, hq // hkv) if shared else bsa.Groups.per_query_head(torch.arange(hq), 2)
    )
    out = torch.zeros(b, hq, length, d)
    with bsa.counting() as meter:
        pairs = bsa.sparse_attention(q, k, v, 0.3, past, groups, out, block_size=bs, start_row=start)
    allowed = engine_mask(past, length, n, start, bs, hq)
    ref = reference(q, k, v, 0.3, allowed)
    torch.testing.assert_close(out[:, :, start:], ref[:, :, start:], atol=1e-5, rtol=1e-5)
    assert pairs == meter.computed == b * hq * len(firsts) * bs * (5 + bs)
    causal = torch.ones(length, n, dtype=torch.bool).tril(offset)
    assert meter.skipped == int((causal[start:] & ~allowed[:, :, start:]).sum()) > 0


def test_engine_with_every_past_key_is_dense() -> None:
    torch.manual_seed(1)
    hq, hkv, n, d, bs = 4, 2, 40, 8, 8
    q, k, v = torch.randn(1, hq, n, d), torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d)
    firsts = bsa.block_starts(n, n, 0, bs)
    past = torch.where(torch.arange(n) < firsts[:, None], torch.arange(n), n)  # all earlier keys
    past = past.sort(dim=-1).values[None, None]
    out = torch.empty_like(q)
    with bsa.counting() as meter:
        bsa.sparse_attention(
            q, k, v, 0.35, past, bsa.Groups.per_kv_head(hkv, 2), out, block_size=bs, start_row=0
        )
    assert meter.skipped == 0 and meter.computed > 0
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=0.35, enable_gqa=True
    )
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


# --- A-shape -------------------------------------------------------------------------------------


def test_a_shape_mask_worked_example() -> None:
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 1, 1, 0],
            [1, 1, 0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(a_shape_mask(8, 2, 3), expected)


@pytest.mark.parametrize("block_size", [2, 3, 8])
def test_a_shape_attention_is_exactly_the_mask(block_size: int) -> None:
    torch.manual_seed(2)
    model = tiny_model("llama")
    method = AShape(sinks=2, local=3, block_size=block_size)
    layer = fake_layer(model, method)
    q, k, v = torch.randn(1, 4, 30, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    with bsa.metered(layer.cache, q, 30):
        out = method.prefill_attention(layer, q, k, v, 0.25)
    mask = a_shape_mask(30, 2, 3).expand(1, 4, 30, 30)
    torch.testing.assert_close(out, reference(q, k, v, 0.25, mask), atol=1e-5, rtol=1e-5)
    counters = layer.cache.counters
    dense = 4 * 30 * 31 // 2
    assert counters["prefill_attention_pairs_dense"] == dense
    assert counters["prefill_attention_pairs_skipped"] == dense - int(mask.sum())  # exactly the mask's gaps
    assert counters["prefill_attention_pairs"] < dense
    assert counters["prefill_density"] == counters["prefill_attention_pairs"] / dense


def test_a_shape_full_budget_is_dense() -> None:
    model = tiny_model("qwen2")
    dense = _generate(model, "dense")
    with pytest.warns(NoOpWarning, match="ran dense"):
        out = _generate(model, f"a_shape:sinks=4,local={PROMPT + NEW},block_size=16")
    _same(out, dense)


# --- MInference ----------------------------------------------------------------------------------


def test_diagonal_sums_worked_example() -> None:
    # Four queries over four keys (the whole sequence): offset o sums key = query - o.
    probs = torch.tensor([[1.0, 0, 0, 0], [2.0, 3.0, 0, 0], [4.0, 5.0, 6.0, 0], [7.0, 8.0, 9.0, 10.0]])
    assert diagonal_sums(probs).tolist() == [1 + 3 + 6 + 10, 2 + 5 + 9, 4 + 8, 7]


def test_vertical_slash_bands_and_verticals() -> None:
    # One head, 16 keys, last 4 queries. Slash offsets {0, 5} with 2 recent forced; vertical 3 wins.
    n, bs = 16, 4
    probs = torch.zeros(1, 1, 4, n)
    for i in range(4):  # rows at positions 12..15
        probs[0, 0, i, 12 + i - 5] = 1.0  # diagonal offset 5
    probs[0, 0, :, 3] += 2.0  # a strong vertical
    past = vertical_slash_past(
        probs,
        torch.tensor([8, 12]),
        vertical=torch.tensor([2]),  # key 0 forced + key 3
        slash=torch.tensor([2]),  # offset 0 forced (the block itself) + offset 5
        block_size=bs,
        vertical_sinks=1,
        recent_slashes=1,
    )
    # Offset 5 makes a block starting at f read the band [f - 5, f - 1); verticals inside it are
    # skipped. Width = band 4 + verticals 2; block 8 loses vertical 3 to its band and is topped up
    # with the next-ranked vertical before it (key 7).
    blocks = [sorted(int(x) for x in row if x < n) for row in past[0, 0]]
    assert blocks == [[0, 3, 4, 5, 6, 7], [0, 3, 7, 8, 9, 10]]


def test_block_sparse_picks_top_pooled_blocks() -> None:
    bs, n, d = 4, 16, 4
    keys = torch.zeros(1, 1, n, d)
    keys[0, 0, 4:8, 0] = 1.0  # block 1 aligns with the queries
    keys[0, 0, 0:4, 1] = 1.0
    query = torch.zeros(1, 1, n, d)
    query[0, 0, :, 0] = 1.0
    past = block_sparse_past(query, keys, 8, top_k=2, block_size=bs)  # blocks at 8 and 12
    assert past[0, 0, 0].tolist() == [4, 5, 6, 7]
    assert past[0, 0, 1].tolist() == [4, 5, 6, 7]


def _pattern_file(tmp_path, model: tokensift.Model, kind: str, a: int, b: int) -> str:
    heads = int(model.config.num_attention_heads)
    payload = {"patterns": [[[kind, a, b, 1.0]] * heads for _ in range(model.num_layers)]}
    return str(save_artefact("minference", model, payload, "test", tmp_path / f"{kind}.json"))


def _generate(model: tokensift.Model, spec: str) -> tokensift.Generation:
    return tokensift.generate(model, prompt_ids(PROMPT), spec, max_new_tokens=NEW, return_logits=True)


def _same(a: tokensift.Generation, b: tokensift.Generation) -> None:
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logits or [], b.logits or [], strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind,a,b", [("vertical_slash", 64, 64), ("block_sparse", 7, 0), ("a_shape", 64, 64)]
)
def test_minference_full_budget_is_dense(tmp_path, kind: str, a: int, b: int) -> None:
    model = tiny_model("qwen2")
    config = _pattern_file(tmp_path, model, kind, a, b)
    dense = _generate(model, "dense")
    with pytest.warns(NoOpWarning, match="ran dense"):
        out = _generate(model, f"minference:config={config},block_size=16")
    _same(out, dense)


@pytest.mark.parametrize("kind,a,b", [("vertical_slash", 4, 5), ("block_sparse", 2, 0), ("a_shape", 4, 12)])
def test_minference_sparse_patterns_apply(tmp_path, kind: str, a: int, b: int) -> None:
    model = tiny_model("llama")
    config = _pattern_file(tmp_path, model, kind, a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoOpWarning)
        out = _generate(
            model,
            f"minference:config={config},block_size=8,last_q=16,recent_slashes=4,vertical_sinks=2,"
            "dense_tail=8",
        )
    c = out.stats.counters
    assert c["prefill_attention_pairs"] < c["prefill_attention_pairs_dense"]


def test_minference_missing_calibration_names_the_command() -> None:
    model = tiny_model("llama")
    with pytest.raises(TokensiftError, match="tokensift calibrate minference --model"):
        _generate(model, "minference")


# --- DHSA ----------------------------------------------------------------------------------------


def test_dhsa_upsampling_worked_example() -> None:
    assert upsample(torch.tensor([[3.0, 7.0]]), torch.tensor([0, 2, 5]), 5).tolist() == [[3, 3, 7, 7, 7]]


def test_dhsa_sqrt_normalised_chunk_mean() -> None:
    v = torch.tensor([1.0, -2.0, 0.5])
    keys = v.expand(1, 4, 3)
    torch.testing.assert_close(chunk_keys(keys, torch.tensor([0, 4])), (2 * v)[None, None])
    # Size-1 chunks are the keys themselves: chunk scores are exact token scores.
    keys = torch.randn(1, 6, 3)
    torch.testing.assert_close(chunk_keys(keys, torch.arange(7)), keys)


def test_nms_is_greedy() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        scores = torch.rand(200, generator=g)
        cand = torch.rand(200, generator=g) < 0.5
        kept: list[int] = []
        for i in sorted(torch.nonzero(cand).flatten().tolist(), key=lambda i: -float(scores[i])):
            if all(abs(i - j) > 8 for j in kept):
                kept.append(i)
        assert sorted(kept) == torch.nonzero(nms_1d(scores, cand, 8)).flatten().tolist()


def test_select_boundaries_forces_the_instruction_chunk() -> None:
    logits = torch.full((100,), -5.0)
    logits[[20, 24, 50]] = torch.tensor([3.0, 2.0, 4.0])
    bounds = select_boundaries(logits, chunks=10, window=4, threshold=1.1, nms_window=8, tail=16)
    assert bounds.tolist() == [0, 21, 51, 84, 100]


def test_select_boundaries_without_threshold_takes_the_best_peaks() -> None:
    logits = torch.full((100,), -5.0)
    logits[[30, 60, 62, 80]] = torch.tensor([2.0, 1.0, 0.5, -1.0])  # 62 is suppressed by 60
    bounds = select_boundaries(logits, chunks=3, window=4, threshold=None, nms_window=8, tail=0)
    assert bounds.tolist() == [0, 31, 61, 81, 100]
    # With the paper's threshold only one gap qualifies.
    bounds = select_boundaries(logits, chunks=3, window=4, threshold=1.1, nms_window=8, tail=0)
    assert bounds.tolist() == [0, 31, 100]


def _predictor_file(tmp_path, model: tokensift.Model, threshold: float | None = 0.0) -> str:
    torch.manual_seed(0)
    channels = model.num_kv_heads * model.head_dim
    predictor = BoundaryPredictor(channels, window=4, hidden=16, heads=2)
    config = {"channels": channels, "window": 4, "hidden": 16, "heads": 2}
    payload = {"predictor": config, "weights": predictor.state(), "threshold": {"logit": threshold}}
    return str(save_artefact("dhsa", model, payload, "test", tmp_path / "dhsa.json"))


def test_dhsa_full_budget_is_dense(tmp_path) -> None:
    model = tiny_model("llama")
    path = _predictor_file(tmp_path, model)
    dense = _generate(model, "dense")
    with pytest.warns(NoOpWarning, match="ran dense"):
        out = _generate(model, f"dhsa:predictor={path},budget=1.0,block_size=16,sinks=4,local=16")
    _same(out, dense)


def test_dhsa_sparse_applies_and_matches_its_mask(tmp_path) -> None:
    model = tiny_model("qwen2")
    path = _predictor_file(tmp_path, model)
    spec = f"dhsa:predictor={path},budget=40,block_size=8,sinks=4,local=16,dense_tail=8"
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoOpWarning)
        out = _generate(model, spec)
    c = out.stats.counters
    assert c["prefill_attention_pairs"] < c["prefill_attention_pairs_dense"]
    assert c["dhsa_chunks"] > 1


def test_dhsa_predictor_round_trips_through_json(tmp_path) -> None:
    predictor = BoundaryPredictor(8, window=4, hidden=16, heads=2)
    again = BoundaryPredictor.from_state(
        {"channels": 8, "window": 4, "hidden": 16, "heads": 2}, predictor.state()
    )
    x = torch.randn(1, 30, 8)
    torch.testing.assert_close(again(x), predictor(x), atol=2e-2, rtol=2e-2)  # float16 storage


def test_dhsa_missing_calibration_names_the_command() -> None:
    with pytest.raises(TokensiftError, match="tokensift calibrate dhsa --model"):
        _generate(tiny_model("llama"), "dhsa:budget=32,block_size=8,sinks=4,local=8")


def test_bad_parameters_are_one_line_errors() -> None:
    with pytest.raises(TokensiftError, match="local"):
        AShape(local=0)
    with pytest.raises(TokensiftError, match="last_q"):
        MInference(last_q=0)
    with pytest.raises(TokensiftError, match="local"):
        DHSA(local=8, block_size=64)


# --- the MInference pattern search ---------------------------------------------------------------


def test_search_picks_the_pattern_with_the_highest_recall() -> None:
    from tokensift.calibration.minference import search_layer

    torch.manual_seed(4)
    n, d, bs = 512, 32, 16
    q, k = torch.zeros(1, 2, n, d), torch.randn(1, 2, n, d) * 0.1
    # Head 0 attends to 40 scattered "vertical" keys from everywhere: more blocks than block-sparse
    # can hold, mostly outside A-shape's sinks and window.
    cols = torch.randperm(n - 64)[:40] + 32
    k[0, 0, cols, 0] = 1.0
    q[0, 0, :, 0] = 12.0
    # Head 1: every query block attends to one earlier key block of its own: blocks are found by
    # pooled scores, but the last queries' verticals only see the last blocks' targets.
    dirs = torch.nn.functional.normalize(torch.randn(n // bs, d), dim=-1)
    k[0, 1] = dirs.repeat_interleave(bs, 0) * 4
    for j in range(1, n // bs):
        q[0, 1, j * bs : (j + 1) * bs] = dirs[torch.randint(0, j, ())] * 4
    cands, recall, chosen = search_layer(q, k, 1.0, budget=256, block_size=bs, min_row=128)
    labels = [c.kind for c in cands]
    assert set(labels) == {"a_shape", "vertical_slash", "block_sparse"}
    assert chosen[0][0] == "vertical_slash"
    assert chosen[1][0] == "block_sparse"
    for head in range(2):  # the choice is the argmax, and it beats every other kind
        best = recall[head].max()
        others = [float(r) for r, c in zip(recall[head], labels, strict=True) if c != chosen[head][0]]
        assert float(best) > max(others)
    # Vertical-slash verticals were resolved to fill the budget.
    assert chosen[0][1] > 40


def test_dhsa_selection_is_top_k_of_upsampled_token_scores() -> None:
    from tokensift.methods.dhsa import block_queries, dhsa_past

    torch.manual_seed(5)
    n, bs, sinks, local, budget = 200, 8, 4, 16, 64
    q, k = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8)
    bounds = torch.tensor([0, 3, 10, 11, 30, 47, 80, 81, 120, 150, 190, 200])
    start = bsa.first_sparse_row(n, n, budget - bs, bs)
    past = dhsa_past(q, k, bounds, start, budget=budget, block_size=bs, sinks=sinks, local=local)[0, 0]
    token_scores = upsample(
        block_queries(q, start, bs) @ chunk_keys(k.mean(1), bounds).transpose(1, 2), bounds, n
    )[0]
    for j, first in enumerate(bsa.block_starts(n, n, start, bs).tolist()):
        recent = set(range(first - (local - bs), first))
        open_ = torch.arange(sinks, first - (local - bs))
        best = token_scores[j, open_].topk(budget - bs - sinks - len(recent)).values
        keys = past[j].tolist()
        assert len(set(keys)) == len(keys) == budget - bs  # distinct, exactly the budget
        assert set(range(sinks)) | recent <= set(keys)
        chosen = torch.tensor(sorted(set(keys) - set(range(sinks)) - recent))
        assert bool(((chosen >= sinks) & (chosen < first - (local - bs))).all())
        # Scores are constant within a chunk, so ties only: the chosen scores are the top-k scores.
        torch.testing.assert_close(token_scores[j, chosen].sort().values, best.sort().values)


def test_boundary_labels_match_the_reference_integral_image() -> None:
    from tokensift.calibration.dhsa import boundary_ratios

    torch.manual_seed(6)
    n, w = 64, 4
    q, k = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8)
    ratios = boundary_ratios(q, k, 0.5, window=w)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = torch.softmax(
        (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.5).masked_fill(~causal, float("-inf")), -1
    )
    integral = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    integral[1:, 1:] = probs.mean(1)[0].double().cumsum(0).cumsum(1)

    def rect(r1: int, c1: int, r2: int, c2: int) -> float:  # 1-based inclusive, as the reference
        return float(
            integral[r2, c2] - integral[r1 - 1, c2] - integral[r2, c1 - 1] + integral[r1 - 1, c1 - 1]
        )

    for t in range(n):
        if not 2 * w - 1 <= t < n - 2 * w:
            assert ratios[t] == 0
            continue
        past, future = rect(t + w + 1, t - w + 2, n, t + 1), rect(t + w + 1, t + 2, n, t + w + 1)
        expected = (max(past, future) + 1e-6) / (min(past, future) + 1e-6)
        assert abs(float(ratios[t]) - expected) < 1e-4 * expected


def test_minference_heads_follow_their_patterns(tmp_path) -> None:
    """Mixed patterns per head: every head's output equals attention under its own pattern's mask."""
    from tokensift.calibration import save_artefact as save

    model = tiny_model("llama")  # 4 query heads, 2 KV heads
    table = [
        ["vertical_slash", 4, 6, 1.0],
        ["block_sparse", 3, 0, 1.0],
        ["a_shape", 4, 12, 1.0],
        ["vertical_slash", 6, 4, 1.0],
    ]
    path = save(
        "minference", model, {"patterns": [table] * model.num_layers}, "test", tmp_path / "mixed.json"
    )
    method = MInference(
        config=str(path), block_size=8, last_q=16, vertical_sinks=2, recent_slashes=2, dense_tail=12
    )
    layer = fake_layer(model, method)
    torch.manual_seed(7)
    n = 120
    q, k, v = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
    with bsa.counting() as meter:
        out = method.prefill_attention(layer, q, k, v, 0.25)
    plans = method.layer_plan(q, k, 0.25, method.patterns(layer))
    allowed = torch.ones(1, 4, n, n, dtype=torch.bool).tril()  # rows before a plan's start: dense
    covered = set()
    for first, heads, past, window in plans:
        for i, h in enumerate(heads.tolist()):
            covered.add(h)
            if window is not None:  # A-shape: exactly the token mask
                allowed[0, h] = a_shape_mask(n, 4, 12)
                continue
            mask = engine_mask(past[:, i : i + 1], n, n, first, 8, 1)[0, 0]
            allowed[0, h, first:] = mask[first:]
    assert covered == {0, 1, 2, 3}
    allowed[:, :, n - 12 :] = torch.ones(12, n, dtype=torch.bool).tril(n - 12)  # the dense tail
    torch.testing.assert_close(out, reference(q, k, v, 0.25, allowed), atol=1e-5, rtol=1e-5)
    assert meter.skipped == int((~allowed).sum()) - 4 * n * (n - 1) // 2  # the gaps below the diagonal


def test_predictor_is_the_reference_window_attention() -> None:
    """The per-token projection shortcut equals nn.MultiheadAttention run on each 2w-token window."""
    torch.manual_seed(8)
    predictor = BoundaryPredictor(16, window=4, hidden=8, heads=2).eval()
    x = torch.randn(2, 25, 16)
    w = 4
    windows = (
        torch.nn.functional.pad(x, (0, 0, w - 1, w))
        .unfold(1, 2 * w, 1)
        .permute(0, 1, 3, 2)
        .reshape(-1, 2 * w, 16)
    )
    enc = predictor.norm(predictor.attn(windows, windows, windows, need_weights=False)[0])
    left, right = enc[:, :w].mean(1).view(2, 25, 16), enc[:, w:].mean(1).view(2, 25, 16)
    sim = torch.nn.functional.cosine_similarity(left, right, dim=-1, eps=1e-6)[..., None]
    feats = torch.cat([left, right, (left - right).abs(), left * right, sim], dim=-1)
    torch.testing.assert_close(predictor(x), predictor.mlp(feats).squeeze(-1), atol=1e-5, rtol=1e-5)


TRITON_CHECK = """
import random, torch
from tokensift.runtime import block_sparse as bsa
from tokensift.methods.a_shape import a_shape_dense_rows
from tokensift.runtime.block_sparse import a_shape_past, a_shape_row_mask
torch.manual_seed(0)
b, hq, hkv, length, d, bs = 2, 4, 2, 70, 16, 16
n = length + 5
q, k, v = torch.randn(b, hq, length, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
assert bsa.triton_usable(q, bs)
start = bsa.first_sparse_row(length, n, 20, bs)
firsts = bsa.block_starts(length, n, start, bs)
past = torch.full((b, hq, len(firsts), 20), n)
rng = random.Random(0)
for bi in range(b):
    for h in range(hq):
        for j, f in enumerate(firsts.tolist()):
            c = 20 if j % 2 else 7
            past[bi, h, j, :c] = torch.tensor(rng.sample(range(f), c))
cases = [
    (past, bsa.Groups.per_query_head(torch.arange(hq), 2)),
    (past[:1, :1], bsa.Groups.per_kv_head(hkv, 2)),
]
for p, g in cases:
    ref, got = torch.zeros(b, hq, length, d), torch.zeros(b, hq, length, d)
    bsa.sparse_attention(q, k, v, 0.3, p, g, ref, block_size=bs, start_row=start)
    bsa.triton_sparse_attention(q, k, v, 0.3, p, g, got, block_size=bs, start_row=start)
    torch.testing.assert_close(got[:, :, start:], ref[:, :, start:], atol=1e-5, rtol=1e-5)
sinks, local = 3, 20
start = a_shape_dense_rows(length, n, sinks, local)
firsts = bsa.block_starts(length, n, start, bs)
p, g = a_shape_past(firsts, sinks, local, n)[None, None], bsa.Groups.per_kv_head(hkv, 2)
ref, got = torch.zeros(b, hq, length, d), torch.zeros(b, hq, length, d)
mask = a_shape_row_mask(sinks, local, bs)
bsa.sparse_attention(q, k, v, 0.3, p, g, ref, block_size=bs, start_row=start, row_mask=mask)
bsa.triton_sparse_attention(
    q, k, v, 0.3, p, g, got, block_size=bs, start_row=start, sinks=sinks, window=local
)
torch.testing.assert_close(got[:, :, start:], ref[:, :, start:], atol=1e-5, rtol=1e-5)
print("ok")
"""


def test_triton_kernel_matches_the_engine_in_interpreter_mode() -> None:
    """The optional GPU kernel, run by Triton's CPU interpreter (skipped where Triton is absent)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_dhsa_logits_of_a_chunked_prefill_equal_one_pass(tmp_path) -> None:
    model = tiny_model("llama")
    method = DHSA(predictor=_predictor_file(tmp_path, model), budget=32, block_size=8, sinks=4, local=8)
    torch.manual_seed(9)
    keys = torch.randn(1, 2, 90, 16)
    layer = fake_layer(model, method)
    whole = method.boundary_logits(layer, keys)
    layer = fake_layer(model, method)
    for end in (30, 31, 70, 90):  # forwards of 30, 1, 39 and 20 tokens
        parts = method.boundary_logits(layer, keys[:, :, :end])
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)


# --- one dense tail for every prefill method; DHSA's threshold and its fixed-chunk ablation -------


def test_every_prefill_method_takes_the_same_dense_tail() -> None:
    from dataclasses import fields

    from tokensift.methods import REGISTRY
    from tokensift.methods.base import SparsePrefillMethod

    prefill = [cls for cls in REGISTRY.values() if issubclass(cls, SparsePrefillMethod)]
    assert {cls.name for cls in prefill} >= {"a_shape", "minference", "dhsa", "hip"}
    for cls in prefill:
        default = {f.name: f.default for f in fields(cls)}
        assert default.get("dense_tail") == 0, cls.name
        assert "dense_tail:" in (cls.__doc__ or ""), cls.name


@pytest.mark.parametrize("tail", [0, 13])
def test_dense_tail_rows_are_dense_and_the_rest_is_not(tmp_path, tail: int) -> None:
    """With a tail, the last `tail` rows equal dense attention; without one, the last rows differ."""
    from tokensift.methods.hip import HiP

    model = tiny_model("llama")
    torch.manual_seed(10)
    n = 160
    q, k, v = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=0.25, enable_gqa=True
    )
    methods = [
        AShape(sinks=4, local=16, block_size=8, dense_tail=tail),
        DHSA(
            predictor=_predictor_file(tmp_path, model),
            budget=48,
            block_size=8,
            sinks=4,
            local=16,
            dense_tail=tail,
        ),
        HiP(budget=40, sinks=4, window=8, block_size_q=8, dense_layers=0, dense_tail=tail).resolve(n),
    ]
    for method in methods:
        out = method.prefill_attention(fake_layer(model, method), q, k, v, 0.25)
        last = slice(n - 13, n)
        if tail:
            torch.testing.assert_close(out[:, :, last], dense[:, :, last], atol=1e-5, rtol=1e-5)
        else:
            assert not torch.allclose(out[:, :, last], dense[:, :, last], atol=1e-3), method.name


def test_even_boundaries_worked_example() -> None:
    from tokensift.methods.dhsa import even_boundaries

    assert even_boundaries(100, 4).tolist() == [0, 25, 50, 75, 100]
    # With a tail the instruction is its own chunk, as with learned boundaries.
    assert even_boundaries(100, 4, tail=16).tolist() == [0, 28, 56, 84, 100]


def test_dhsa_threshold_comes_from_the_calibration(tmp_path) -> None:
    model = tiny_model("llama")
    path = _predictor_file(tmp_path, model, threshold=0.25)
    method = DHSA(predictor=path, budget=32, block_size=8, sinks=4, local=8)
    assert method.logit_threshold(fake_layer(model, method)) == 0.25
    explicit = DHSA(predictor=path, budget=32, block_size=8, sinks=4, local=8, threshold=-1.5)
    assert explicit.logit_threshold(fake_layer(model, explicit)) == -1.5
    old = _predictor_file(tmp_path, model, threshold=None)
    bare = DHSA(predictor=old, budget=32, block_size=8, sinks=4, local=8)
    layer = fake_layer(model, bare)
    assert bare.logit_threshold(layer) is None  # every gap a candidate, and said so
    assert any("tokensift calibrate dhsa" in note for note in layer.cache.notes)


def test_dhsa_fixed_chunking_keeps_the_chunk_count(tmp_path) -> None:
    """The ablation: the same number of chunks as the predictor makes, evenly spaced."""
    model = tiny_model("llama")
    path = _predictor_file(tmp_path, model, threshold=-0.05)
    torch.manual_seed(11)
    keys = torch.randn(1, 2, 300, 16)
    spec = {"predictor": path, "budget": 64, "block_size": 8, "sinks": 4, "local": 8, "dense_tail": 16}
    learned = DHSA(**spec)
    fixed = DHSA(**spec, chunking="fixed")
    a = learned.boundaries(fake_layer(model, learned), keys)
    b = fixed.boundaries(fake_layer(model, fixed), keys)
    assert len(a) == len(b) > 3 and not torch.equal(a, b)
    assert int(b[-2]) == int(a[-2]) == 300 - 16  # the instruction chunk is kept
    widths = (b[1:-1] - b[:-2]).tolist()
    assert max(widths) - min(widths) <= 1
    with pytest.raises(TokensiftError, match="chunking"):
        DHSA(chunking="random")
