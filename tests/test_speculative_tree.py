"""Tree verification for SuffixDecoding on tiny random models: one tree-masked forward gives every
node the logits of its own branch, the rollback keeps exactly the accepted path, greedy output is
plain greedy, and the multi-branch rejection rule keeps the target distribution."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator

import pytest
import torch

import tokensift
from tokensift.errors import TokensiftError
from tokensift.methods.suffix_decoding import SuffixDecoding
from tokensift.runtime.generate import Decoding
from tokensift.runtime.plan import Plan
from tokensift.speculative import clear_global_caches
from tokensift.speculative.drafting import first_path
from tokensift.speculative.verify import Verifier, accept_tree, tree_visibility

from .conftest import fresh_speculative_state, prompt_ids, tiny_model

NEW = 48
TREE = "suffix_decoding:tree=true,verify_cost=0,max_spec_offset=4,min_token_prob=0.05"


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    with fresh_speculative_state():
        yield


def branching_prompt(seed: int) -> list[int]:
    """A block seen three times with three different continuations, then the block again: the
    suffix tree holds several likely continuations, so drafts branch."""
    common = prompt_ids(6, seed=100 + seed)
    ids: list[int] = []
    for k in range(3):
        ids += common + prompt_ids(6, seed=200 + 10 * seed + k)
    return ids + common


PROMPTS = [branching_prompt(s) for s in range(4)]
# A tree over 7 draft nodes (parents before children), rows 0..7 of the forward.
TOKENS = [11, 12, 13, 14, 15, 16, 17]
PARENTS = [-1, -1, 0, 0, 1, 2, 4]  # node index of each node's parent, -1: the last committed token


def _greedy(model: tokensift.Model, ids: list[int], method: object = None) -> tokensift.Generation:
    return tokensift.generate(model, ids, method, max_new_tokens=NEW, ignore_eos=True)  # type: ignore[arg-type]


def _branch(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def test_tree_visibility() -> None:
    visible = tree_visibility([-1, *(p + 1 for p in PARENTS)])
    assert visible.sum(-1).tolist() == [1, 2, 2, 3, 3, 3, 4, 4]  # depth + 1: the node's position offset
    assert visible[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    with pytest.raises(ValueError):
        tree_visibility([-1, 2, 0])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tree_mask_gives_each_branch_its_own_logits(kind: str) -> None:
    """One tree-masked forward = each root-to-node branch run on its own (fp32, 1e-5)."""
    model = tiny_model(kind)
    ids = prompt_ids(30, seed=4)
    last = ids[-1]
    with torch.inference_mode():
        cache = tokensift.TokenCache(model.model, None, prompt_tokens=len(ids) - 1)
        decoding = Decoding(model, cache, NEW, ignore_eos=True)
        decoding.forward(ids[:-1], last_only=True)
        rows = decoding.forward([last, *TOKENS], visible=tree_visibility([-1, *(p + 1 for p in PARENTS)]))
        for node in range(len(TOKENS)):
            branch = [TOKENS[i] for i in _branch(PARENTS, node)]
            ref = tokensift.TokenCache(model.model, None, prompt_tokens=len(ids) - 1)
            ref_decoding = Decoding(model, ref, NEW, ignore_eos=True)
            ref_decoding.forward(ids[:-1], last_only=True)
            ref_rows = ref_decoding.forward([last, *branch])
            torch.testing.assert_close(rows[node + 1], ref_rows[-1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rows[0], ref_rows[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("evictor", [None, "h2o:budget=24"])
def test_rollback_keeps_only_the_accepted_path(evictor: str | None) -> None:
    """After a tree forward and the rollback to one branch, the cache equals a run that fed only that
    branch (keys, values, positions, eviction state)."""
    model = tiny_model("llama", layers=3)
    ids = prompt_ids(30, seed=5)
    plan = Plan.of(evictor + "+suffix_decoding" if evictor else "suffix_decoding")
    path_nodes = _branch(PARENTS, 6)  # nodes 1, 4, 6: not a prefix of the rows
    with torch.inference_mode():
        cache = tokensift.TokenCache(model.model, plan, prompt_tokens=len(ids))
        decoding = Decoding(model, cache, NEW, ignore_eos=True)
        decoding.forward(ids, last_only=True)
        verifier = Verifier(decoding)
        verifier.forward([ids[-1], *TOKENS], [-1, *(p + 1 for p in PARENTS)])
        verifier.keep([0, *(n + 1 for n in path_nodes)])

        ref = tokensift.TokenCache(model.model, Plan.of(evictor), prompt_tokens=len(ids))
        ref_decoding = Decoding(model, ref, NEW, ignore_eos=True)
        ref_decoding.forward(ids, last_only=True)
        ref_decoding.forward([ids[-1], *(TOKENS[n] for n in path_nodes)])
    assert cache.next_position == ref.next_position == len(ids) + 1 + len(path_nodes)
    for mine, theirs in zip(cache.layers, ref.layers, strict=True):
        assert mine.n == theirs.n and mine.seen == theirs.seen
        assert torch.equal(mine.positions, theirs.positions)
        torch.testing.assert_close(mine.k, theirs.k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.v, theirs.v, atol=1e-5, rtol=1e-5)
        for name, state in theirs.states.items():
            torch.testing.assert_close(mine.state(name), state[..., : theirs.n], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tree_drafting_is_plain_greedy(kind: str) -> None:
    model = tiny_model(kind)
    tree_steps = accepted = rejected = 0
    for ids in PROMPTS:
        clear_global_caches()
        plain = _greedy(model, ids)
        clear_global_caches()
        path = _greedy(model, ids, TREE.replace("tree=true", "tree=false"))
        clear_global_caches()
        tree = _greedy(model, ids, TREE)
        assert tree.token_ids == path.token_ids == plain.token_ids
        c = tree.stats.counters
        assert tree.stats.applied
        assert c["loop_committed"] == NEW - 1
        assert c["loop_steps"] + c["accepted_tokens"] == NEW - 1
        assert c["rolled_back_tokens"] == c["draft_tokens"] - c["accepted_tokens"]
        assert c["forwards_saved"] == c["accepted_tokens"]
        tree_steps += c["loop_tree_steps"]
        accepted += c["accepted_tokens"]
        rejected += c["rolled_back_tokens"]
    assert tree_steps >= 4 and accepted > 20 and rejected > 0  # branching drafts ran, both outcomes


def test_tree_falls_back_to_paths_where_the_kernel_takes_no_tree() -> None:
    """Sparse decode verifies per query (no tree mask): the likeliest path is verified, with a note,
    and the output is the sparse method's own."""
    model = tiny_model("llama", layers=4)
    spec = "quest:budget=32,page_size=8,dense_layers=1"
    ids = PROMPTS[1]
    alone = _greedy(model, ids, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = _greedy(model, ids, spec + "+" + TREE)
    assert both.token_ids == alone.token_ids
    assert any("takes no tree mask" in n for n in both.stats.notes)
    assert both.stats.counters.get("loop_tree_steps", 0) == 0


def test_first_path() -> None:
    assert first_path(TOKENS, PARENTS) == [11, 13, 16]


def _chain_decoding(temperature: float, seed: int) -> Decoding:
    return Decoding(
        model=None,  # type: ignore[arg-type]
        cache=None,  # type: ignore[arg-type]
        max_new_tokens=4,
        temperature=temperature,
        generator=torch.Generator().manual_seed(seed),
    )


def test_multi_branch_rejection_keeps_the_distribution() -> None:
    """A Markov chain target and a fixed 2-level token tree (two children at the root, two under the
    first): the committed tokens follow the target's distribution."""
    v, n = 4, 12000
    transition = torch.tensor(
        [[2.0, 0.5, -1.0, 0.0], [0.0, 1.5, 1.0, -0.5], [1.0, -1.0, 0.3, 0.8], [-0.5, 0.2, 0.9, 1.1]]
    )
    probs = torch.softmax(transition, -1)
    decoding = _chain_decoding(1.0, 0)
    draft, parents = [1, 3, 1, 2], [-1, -1, 0, 0]
    seen: Counter[tuple[int, ...]] = Counter()
    for _ in range(n):
        seq = [0]
        while len(seq) < 3:
            rows = transition[[seq[-1], *draft]]
            committed, path = accept_tree(decoding, rows, draft, parents)
            assert len(path) == len(committed)
            seq += [t for t, _ in committed]
        seen[tuple(seq[1:3])] += 1
    expected = {(a, b): float(probs[0][a] * probs[a][b]) for a in range(v) for b in range(v)}
    tv = 0.5 * sum(abs(seen[k] / n - p) for k, p in expected.items())
    assert tv < 0.03, tv


def test_tree_sampling_is_seeded() -> None:
    model = tiny_model("llama")
    runs = []
    for _ in range(2):
        clear_global_caches()
        runs.append(
            tokensift.generate(
                model, PROMPTS[0], TREE, max_new_tokens=NEW, temperature=0.3, seed=3, ignore_eos=True
            )
        )
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == NEW
    c = runs[0].stats.counters
    assert c["loop_tree_steps"] > 0 and c["accepted_tokens"] > 0


def test_tree_parameters() -> None:
    assert SuffixDecoding().tree is False
    with pytest.raises(TokensiftError):
        SuffixDecoding(max_branches=-1)
    assert Plan.of("suffix_decoding:tree=true,max_branches=2").loop.max_branches == 2  # type: ignore[union-attr]


def test_a_kernel_without_tree_mask_is_refused() -> None:
    """A tree forward must never run as a causal one: a sparse-prefill kernel takes no tree mask."""
    model = tiny_model("llama")
    ids = prompt_ids(30, seed=6)
    with torch.inference_mode():
        cache = tokensift.TokenCache(model.model, "a_shape:sinks=4,local=8,block_size=4", prompt_tokens=30)
        decoding = Decoding(model, cache, NEW, ignore_eos=True)
        decoding.forward(ids, last_only=True)
        with pytest.raises(TokensiftError, match="tree mask"):
            decoding.forward([3, 4, 5], visible=tree_visibility([-1, 0, 0]))
