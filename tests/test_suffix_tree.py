"""The suffix tree against a brute-force reference (hypothesis) and methods.md 10(f)'s worked example."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokensift.errors import TokensiftError
from tokensift.speculative.suffix_tree import Draft, SuffixTree

A, B, C, D, Z = 1, 2, 3, 4, 9


def brute_counts(seqs: list[list[int]], depth: int) -> Counter[tuple[int, ...]]:
    """Occurrences of every substring of at most `depth` tokens."""
    counts: Counter[tuple[int, ...]] = Counter()
    for seq in seqs:
        for i in range(len(seq)):
            for j in range(i + 1, min(len(seq), i + depth) + 1):
                counts[tuple(seq[i:j])] += 1
    return counts


def check_structure(tree: SuffixTree) -> None:
    """Compaction, counts and the ranking of children, node by node."""
    for _, node in tree.nodes():
        kids = list(node.children.values())
        assert sum(k.count for k in kids) <= node.count
        for token, kid in node.children.items():
            assert kid.parent is node and kid.tokens and kid.tokens[0] == token and kid.count > 0
            if node is not tree.root:
                assert kid.count < node.count  # else the two should have been fused
        assert node.head is (max(kids, key=lambda k: (k.count, k.stamp)) if kids else None)


def check_path_draft(
    counts: Counter[tuple[int, ...]], pattern: tuple[int, ...], draft: Draft, budget: int, min_prob: float
) -> None:
    """The draft follows a most frequent continuation with the right probabilities and stops right."""
    path, prob = pattern, 1.0
    for i, (token, p) in enumerate(zip(draft.token_ids, draft.probs, strict=True)):
        options = {key[-1]: c for key, c in _children(counts, path)}
        assert options, "drafted past the end of every occurrence"
        assert options[token] == max(options.values()), "not a most frequent child"
        prob *= options[token] / counts[path]  # exactly 1 inside an edge
        assert p == pytest.approx(prob) and p >= min_prob
        assert draft.parents[i] == i - 1
        path += (token,)
    assert draft.score == pytest.approx(sum(draft.probs))
    if len(draft) < budget:  # stopped early: nothing follows, or the next token is too unlikely
        options = {key[-1]: c for key, c in _children(counts, path)}
        if options:
            assert prob * max(options.values()) / counts[path] < min_prob


def _children(counts: Counter[tuple[int, ...]], path: tuple[int, ...]) -> list[tuple[tuple[int, ...], int]]:
    return [(k, c) for k, c in counts.items() if len(k) == len(path) + 1 and k[:-1] == path]


def brute_tree_scores(
    counts: Counter[tuple[int, ...]], pattern: tuple[int, ...], budget: int, min_prob: float
) -> list[float]:
    """Probabilities of every continuation at least min_prob likely, best first."""
    found, frontier = [], [(pattern, 1.0)]
    while frontier:
        path, prob = frontier.pop()
        for key, c in _children(counts, path):
            p = prob * c / counts[path]
            if p >= min_prob and len(found) < 10_000:
                found.append(p)
                frontier.append((key, p))
    return sorted(found, reverse=True)[:budget]


def test_worked_example_methods_md() -> None:
    # methods.md 10(f)(2): tree over "a b c a b d", context "z a b", alpha 1, min_prob 0.1, path mode.
    tree = SuffixTree(64)
    tree.extend(0, [A, B, C, A, B, D])
    draft = tree.speculate([Z, A, B], max_spec_tokens=16, max_spec_factor=1.0, min_token_prob=0.1)
    assert draft.match_len == 2
    assert draft.score == pytest.approx(1.0)
    assert draft.token_ids[0] in (C, D)
    assert draft.token_ids == [C, A] and draft.probs == [0.5, 0.5]  # inside an edge prob stays 0.5
    # p = 1 ("b") alone drafts one token of probability 0.5.
    one = tree.continuation([B], 1, 0.1)
    assert one is not None and one.score == pytest.approx(0.5)


def test_factor_limits_draft_length() -> None:
    # methods.md 10(f)(3): alpha 0.5 with a match of length 4 gives at most 2 draft tokens.
    tree = SuffixTree(64)
    tree.extend(0, [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4])
    draft = tree.speculate([9, 1, 2, 3, 4], max_spec_tokens=16, max_spec_factor=0.5, min_token_prob=0.1)
    assert draft.match_len == 4 and draft.token_ids == [5, 6]
    wide = tree.speculate([9, 1, 2, 3, 4], max_spec_tokens=16, max_spec_factor=1.0, min_token_prob=0.1)
    assert wide.token_ids == [5, 6, 7, 8]
    offset = tree.speculate([9, 1, 2, 3, 4], 16, max_spec_factor=0.5, max_spec_offset=1.0)
    assert len(offset) == 3
    assert len(tree.speculate([9, 1, 2, 3, 4], 1, max_spec_factor=2.0)) == 1  # max_spec_tokens caps


def test_min_prob_stops_the_walk() -> None:
    tree = SuffixTree(8)
    for seq_id, tail in enumerate([5, 6, 7, 8, 9]):
        tree.extend(seq_id, [1, 2, tail])
    # After "1 2" five continuations are equally likely (0.2 each).
    assert tree.continuation([1, 2], 4, min_token_prob=0.25).token_ids == []
    assert tree.continuation([1, 2], 4, min_token_prob=0.2).probs == [pytest.approx(0.2)]


def test_tree_mode_is_best_first() -> None:
    tree = SuffixTree(8)
    tree.extend(0, [1, 2, 3, 1, 2, 3, 1, 2, 4])
    draft = tree.continuation([1, 2], 3, min_token_prob=0.1, tree=True)
    # "1 2" is followed by 3 twice and by 4 once: children 3 (2/3) and 4 (1/3), then 3's continuation.
    assert draft.token_ids[0] == 3 and draft.probs[0] == pytest.approx(2 / 3)
    assert sorted(draft.probs, reverse=True) == draft.probs
    assert draft.parents[0] == -1
    assert {(t, par) for t, par in zip(draft.token_ids, draft.parents, strict=True)} >= {(3, -1)}
    assert draft.score == pytest.approx(
        sum(brute_tree_scores(brute_counts([tree.sequence(0)], 8), (1, 2), 3, 0.1))
    )


def test_depth_limit_and_counts() -> None:
    tree = SuffixTree(3)
    tree.extend(7, [1, 1, 1, 1, 1])
    assert tree.count([1]) == 5 and tree.count([1, 1]) == 4 and tree.count([1, 1, 1]) == 3
    assert tree.count([1, 1, 1, 1]) == 0  # deeper than the tree
    assert tree.num_tokens == 5 and 7 in tree
    with pytest.raises(TokensiftError):
        tree.remove(3)
    with pytest.raises(TokensiftError):
        SuffixTree(0)


sequences = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=40), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seqs=sequences,
    depth=st.integers(1, 7),
    removals=st.lists(st.integers(0, 3), max_size=3),
    data=st.data(),
)
def test_against_brute_force(
    seqs: list[list[int]], depth: int, removals: list[int], data: st.DataObject
) -> None:
    tree = SuffixTree(depth)
    # Interleave appends across sequences, as requests grow concurrently.
    cursors = [0] * len(seqs)
    while any(c < len(s) for c, s in zip(cursors, seqs, strict=True)):
        i = data.draw(st.sampled_from([k for k, s in enumerate(seqs) if cursors[k] < len(s)]))
        tree.append(i, seqs[i][cursors[i]])
        cursors[i] += 1
    live = dict(enumerate(seqs))
    for r in removals:
        if r in live:
            tree.remove(r)
            del live[r]
    counts = brute_counts(list(live.values()), depth)
    check_structure(tree)
    assert tree.num_tokens == sum(len(s) for s in live.values())
    got = {path: node.count for path, node in tree.nodes() if path}
    # Every path in the tree is a node boundary; inside an edge counts equal the lower node's.
    expanded = {}
    for path, node in tree.nodes():
        for cut in range(len(path) - len(node.tokens) + 1, len(path) + 1):
            if cut:
                expanded[path[:cut]] = node.count
    assert expanded == dict(counts)
    assert all(got[p] == counts[p] for p in got)

    # Speculation: every pattern's continuation, then the choice over match lengths.
    budget = data.draw(st.integers(0, 6))
    min_prob = data.draw(st.sampled_from([0.0, 0.1, 0.3, 0.6]))
    for pattern in list(counts)[:25]:
        draft = tree.continuation(pattern, budget, min_prob)
        assert draft is not None
        check_path_draft(counts, pattern, draft, budget, min_prob)
        tree_draft = tree.continuation(pattern, budget, min_prob, tree=True)
        assert tree_draft is not None
        assert tree_draft.score == pytest.approx(sum(brute_tree_scores(counts, pattern, budget, min_prob)))
        for i, par in enumerate(tree_draft.parents):
            assert -1 <= par < i
    context = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=depth + 3))
    factor = data.draw(st.sampled_from([0.5, 1.0, 2.0]))
    best = tree.speculate(context, budget, factor, 0.0, min_prob)
    window = context[-depth:]
    expected, expected_p = Draft(), 0
    for p in range(1, len(window)):
        if counts[tuple(window[-p:])] == 0:
            break
        cand = tree.continuation(window[-p:], max(0, min(budget, int(p * factor + 1e-6))), min_prob)
        assert cand is not None
        if cand.score >= expected.score:
            expected, expected_p = cand, p
    assert best.match_len == expected_p
    assert best.token_ids == expected.token_ids and best.score == pytest.approx(expected.score)
