"""A path-compressed suffix tree over token sequences, with occurrence counts, for model-free drafts.

The tree holds every suffix of every stored sequence, truncated to `max_depth` tokens. A node's
`count` is the number of those suffixes that pass through or end at it, which is the number of
occurrences of the node's path in the stored sequences. Chains without branching are one node
(`tokens` is the edge label), so memory stays linear in the stored tokens. Sequences grow one token
at a time (each append extends the at most `max_depth` suffixes still shorter than the depth limit)
and can be removed again, which is how the global tree evicts old responses.

Children are ranked by count; among equal counts a child whose count changed more recently ranks
first and a newly created child ranks last, as in the reference implementation. `head` is the top
child, kept up to date incrementally so path speculation is one pointer chase per node.

Speculation follows SuffixDecoding (Oliaro et al., NeurIPS 2025, Algorithm 1 and the ArcticInference
reference): match the last p context tokens for p = 1, 2, ... (stopping at the first p without a
match), draft at most `floor(factor * p + offset)` tokens by walking down from the match, where a
token's probability is the product of count(child) / count(node) over the node boundaries crossed,
stop below `min_token_prob`, and keep the draft with the highest score (its expected number of
accepted tokens: the sum of its token probabilities; ties go to the longer match).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tokensift.errors import TokensiftError


@dataclass
class Draft:
    """Speculated tokens. `parents[i]` is the index of token i's parent in the draft, -1 for a child
    of the context (a path draft has parents -1, 0, 1, ...)."""

    token_ids: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    score: float = 0.0
    match_len: int = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    def add(self, token: int, parent: int, prob: float) -> None:
        self.token_ids.append(token)
        self.parents.append(parent)
        self.probs.append(prob)
        self.score += prob


class Node:
    __slots__ = ("children", "count", "head", "parent", "stamp", "tokens")

    def __init__(self, tokens: tuple[int, ...], count: int, parent: Node | None, stamp: int = 0):
        self.tokens = tokens  # edge label from the parent; () for the root
        self.count = count
        self.parent = parent
        self.children: dict[int, Node] = {}
        self.head: Node | None = None  # highest-ranked child
        self.stamp = stamp  # rank among equal counts: higher first

    def rank(self) -> tuple[int, int]:
        return self.count, self.stamp

    def ranked_children(self) -> list[Node]:
        return sorted(self.children.values(), key=Node.rank, reverse=True)


class SuffixTree:
    """All suffixes (up to `max_depth` tokens) of a set of token sequences, with occurrence counts."""

    def __init__(self, max_depth: int = 64):
        if max_depth < 1:
            raise TokensiftError(f"suffix tree max_depth must be >= 1, got {max_depth}")
        self.max_depth = max_depth
        self.root = Node((), 0, None)
        self._seqs: dict[int, list[int]] = {}
        self._active: dict[int, deque[Node]] = {}  # where each still-growing suffix ends
        self._clock = 0  # stamps: positive for count changes (newest first), negative for creations

    # -- building -------------------------------------------------------------------------------------
    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    @property
    def num_seqs(self) -> int:
        return len(self._seqs)

    @property
    def num_tokens(self) -> int:
        return self.root.count

    def sequence(self, seq_id: int) -> list[int]:
        return self._seqs[seq_id]

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.append(seq_id, int(token))

    def append(self, seq_id: int, token: int) -> None:
        """Append one token to sequence `seq_id` (created when new)."""
        seq = self._seqs.setdefault(seq_id, [])
        active = self._active.setdefault(seq_id, deque())
        seq.append(token)
        self.root.count += 1
        active.append(self.root)  # the suffix starting at this token, empty so far
        for i, node in enumerate(active):
            active[i] = self._extend(node, token)
        if len(active) == self.max_depth:
            active.popleft()  # that suffix reached the depth limit and stops growing

    def _extend(self, node: Node, token: int) -> Node:
        """One suffix ends at the end of `node`; extend it by `token` and return where it ends now."""
        child = node.children.get(token)
        if child is None:
            if node.count == 1 and node is not self.root:
                # Only this suffix reaches `node`, so it is a leaf: lengthen its edge.
                node.tokens += (token,)
                return node
            self._clock += 1
            leaf = Node((token,), 1, node, stamp=-self._clock)
            node.children[token] = leaf
            if node.head is None:
                node.head = leaf
            return leaf
        if len(child.tokens) > 1:
            child = self._split(child)
        child.count += 1
        self._raised(node, child)
        if node is not self.root and node.count == child.count:
            # No suffix ends at `node` any more and `child` is its only child: fuse them.
            return self._fuse(node, child)
        return child

    def _split(self, child: Node) -> Node:
        """Cut `child`'s edge after its first token; returns the new upper node (the object `child`
        stays the lower part, so suffixes ending at it stay valid)."""
        parent = child.parent
        assert parent is not None
        upper = Node(child.tokens[:1], child.count, parent, child.stamp)
        child.tokens = child.tokens[1:]
        child.parent = upper
        upper.children[child.tokens[0]] = child
        upper.head = child
        parent.children[upper.tokens[0]] = upper
        if parent.head is child:
            parent.head = upper
        return upper

    def _fuse(self, node: Node, child: Node) -> Node:
        """Merge `node` into its only child, which takes its place (and its rank) under the parent."""
        parent = node.parent
        assert parent is not None and len(node.children) == 1
        child.tokens = node.tokens + child.tokens
        child.parent = parent
        child.stamp = node.stamp
        parent.children[child.tokens[0]] = child
        if parent.head is node:
            parent.head = child
        return child

    def _raised(self, parent: Node, child: Node) -> None:
        self._clock += 1
        child.stamp = self._clock
        head = parent.head
        if head is None or head is child or child.count >= head.count:
            parent.head = child

    def _lowered(self, parent: Node, child: Node) -> None:
        self._clock += 1
        child.stamp = self._clock
        if parent.head is child:
            parent.head = max(parent.children.values(), key=Node.rank)

    def remove(self, seq_id: int) -> None:
        """Forget a sequence: every suffix of it leaves the counts, empty branches are dropped."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise TokensiftError(f"suffix tree has no sequence {seq_id}")
        del self._active[seq_id]
        for start in range(len(seq)):
            end = min(len(seq), start + self.max_depth)
            self.root.count -= 1
            node, i = self.root, start
            while i < end:
                child = node.children[seq[i]]
                i += len(child.tokens)
                if child.count == 1:  # the branch held only this suffix
                    del node.children[child.tokens[0]]
                    if node.head is child:
                        node.head = max(node.children.values(), key=Node.rank, default=None)
                    break
                child.count -= 1
                self._lowered(node, child)
                node = child
            if node is not self.root and len(node.children) == 1:
                (only,) = node.children.values()
                if only.count == node.count:
                    self._fuse(node, only)

    # -- queries --------------------------------------------------------------------------------------
    def locate(self, pattern: Sequence[int]) -> tuple[Node, int] | None:
        """The node where `pattern` ends and how many of its edge tokens it uses; None if absent."""
        node, used = self.root, 0
        for token in pattern:
            if used == len(node.tokens):
                child = node.children.get(token)
                if child is None:
                    return None
                node, used = child, 0
            if node.tokens[used] != token:
                return None
            used += 1
        return node, used

    def count(self, pattern: Sequence[int]) -> int:
        """Occurrences of `pattern` (0 when longer than max_depth)."""
        found = self.locate(pattern)
        return 0 if found is None else found[0].count

    def continuation(
        self,
        pattern: Sequence[int],
        max_tokens: int,
        min_token_prob: float = 0.1,
        tree: bool = False,
        max_branches: int = 0,
    ) -> Draft | None:
        """The draft that follows `pattern` (None when the pattern does not occur); a token tree with
        at most `max_branches` children per node (0: no limit) when `tree`."""
        found = self.locate(pattern)
        if found is None:
            return None
        if tree:
            return _walk_tree(found[0], found[1], max_tokens, min_token_prob, max_branches)
        return _walk_path(found[0], found[1], max_tokens, min_token_prob)

    def speculate(
        self,
        context: Sequence[int],
        max_spec_tokens: int,
        max_spec_factor: float = 1.0,
        max_spec_offset: float = 0.0,
        min_token_prob: float = 0.1,
        tree: bool = False,
        max_branches: int = 0,
    ) -> Draft:
        """The best-scoring draft over all match lengths p < len(context) (context cut to max_depth)."""
        best = Draft()
        args = (max_spec_tokens, max_spec_factor, max_spec_offset, min_token_prob, tree, max_branches)
        for draft in self.candidates(context, *args):
            if draft.score >= best.score:
                best = draft
        return best

    def candidates(
        self,
        context: Sequence[int],
        max_spec_tokens: int,
        max_spec_factor: float = 1.0,
        max_spec_offset: float = 0.0,
        min_token_prob: float = 0.1,
        tree: bool = False,
        max_branches: int = 0,
    ) -> Iterator[Draft]:
        """The draft for every match length p = 1, 2, ... < len(context) (context cut to max_depth),
        stopping at the first p whose last p tokens do not occur; each at most
        `min(max_spec_tokens, floor(max_spec_factor * p + max_spec_offset))` tokens, `match_len` = p."""
        context = list(context[-self.max_depth :])
        for p in range(1, len(context)):
            budget = max(0, min(max_spec_tokens, int(p * max_spec_factor + max_spec_offset + 1e-6)))
            draft = self.continuation(context[-p:], budget, min_token_prob, tree, max_branches)
            if draft is None:
                return
            draft.match_len = p
            yield draft

    # -- inspection (tests) ---------------------------------------------------------------------------
    def nodes(self) -> Iterator[tuple[tuple[int, ...], Node]]:
        """Every node with its full path, depth first."""
        stack: list[tuple[tuple[int, ...], Node]] = [((), self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            stack.extend((path + c.tokens, c) for c in node.children.values())


def _walk_path(node: Node, used: int, max_tokens: int, min_prob: float) -> Draft:
    """Follow the most frequent child; the probability drops only where a node boundary is crossed."""
    draft, prob = Draft(), 1.0
    while len(draft) < max_tokens and prob >= min_prob:
        if used < len(node.tokens):
            draft.add(node.tokens[used], len(draft) - 1, prob)
            used += 1
            continue
        child = node.head
        if child is None:
            break
        prob *= child.count / node.count
        node, used = child, 0
    return draft


def _walk_tree(node: Node, used: int, max_tokens: int, min_prob: float, max_branches: int = 0) -> Draft:
    """Best-first expansion by probability: the `max_tokens` likeliest continuations as a token tree
    (parents before children), at most `max_branches` children per node (0: no limit)."""
    draft = Draft()
    order = 0  # FIFO among equal probabilities, for determinism
    heap: list[tuple[float, int, Node, int, int]] = [(-1.0, order, node, used, -1)]
    while heap and len(draft) < max_tokens:
        neg, _, node, used, parent = heapq.heappop(heap)
        prob = -neg
        if used < len(node.tokens):
            draft.add(node.tokens[used], parent, prob)
            order += 1
            heapq.heappush(heap, (neg, order, node, used + 1, len(draft) - 1))
            continue
        for child in node.ranked_children()[: max_branches or None]:
            p = prob * child.count / node.count
            if p < min_prob:
                break  # children are ranked by count, so the rest are less likely still
            order += 1
            heapq.heappush(heap, (-p, order, child, 0, parent))
    return draft
