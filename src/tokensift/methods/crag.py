"""CRAG: cluster the passages of a many-passage context and keep a few representatives of each."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import ContextMethod, register


def kmeans(x: torch.Tensor, k: int, seed: int, restarts: int = 4, iterations: int = 100) -> torch.Tensor:
    """Cluster labels (n,) of the rows of x (n, d): k-means++ seeding, Lloyd iterations, the best of
    `restarts` runs by inertia. Deterministic for a seed."""
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centres = x[torch.randint(n, (1,), generator=gen)]
        for _ in range(1, k):
            d2 = torch.cdist(x, centres).min(dim=1).values.pow(2)
            pick = (
                torch.multinomial(d2, 1, generator=gen)
                if d2.sum() > 0
                else torch.randint(n, (1,), generator=gen)
            )
            centres = torch.cat([centres, x[pick]])
        labels = torch.cdist(x, centres).argmin(dim=1)
        for _ in range(iterations):
            for c in range(k):
                members = x[labels == c]
                if len(members):
                    centres[c] = members.mean(dim=0)
            new = torch.cdist(x, centres).argmin(dim=1)
            if torch.equal(new, labels):
                break
            labels = new
        inertia = float((x - centres[labels]).pow(2).sum())
        if inertia < best_inertia - 1e-9:
            best, best_inertia = labels, inertia
    assert best is not None
    return best


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette of a clustering under cosine distance (rows of x are unit vectors); points
    alone in their cluster count 0, as in scikit-learn."""
    dist = (1 - x @ x.T).clamp(min=0)
    clusters = labels.unique()
    if len(clusters) < 2:
        return -1.0
    member = torch.stack([labels == c for c in clusters]).float()  # (k, n)
    sizes = member.sum(dim=1)
    mean_to = dist @ member.T / sizes  # (n, k): mean distance to every cluster (self included)
    own = (labels[:, None] == clusters[None, :]).float()
    own_size = (own * sizes).sum(dim=1)
    a = (mean_to * own).sum(dim=1) * own_size / (own_size - 1).clamp(min=1)  # exclude self
    b = mean_to.masked_fill(own.bool(), float("inf")).min(dim=1).values
    s = (b - a) / torch.maximum(a, b).clamp(min=1e-12)
    return float(torch.where(own_size > 1, s, torch.zeros_like(s)).mean())


@register
@dataclass
class CRAG(ContextMethod):
    """Cluster the passages by their embeddings and keep the ones nearest each cluster centre.

    When the context is many short items (reviews, retrieved passages), their sentence embeddings
    (MiniLM, shipped in a package: `tokensift[crag]`) are clustered with k-means, k fixed or chosen
    by the best cosine silhouette over 2..max_clusters, and the `per_cluster` passages nearest each
    centre are kept, in their original order. The prompt then grows with the number of distinct
    opinions, not with the number of items. Runs before tokenization, so it composes with every
    token-level method (CRAG shrinks the prompt, SnapKV then the cache).

    Difference from the paper, stated: CRAG summarises each cluster with an LLM and sends the
    summaries; here each cluster is represented by its most central passages (no extra model calls,
    the kept text is verbatim). Deterministic for a seed (the generation's seed).

    Based on Akesson and Santos, "Clustered Retrieved Augmented Generation (CRAG)", arXiv 2406.00029,
    2024.

    Parameters
    ----------
    clusters:
        "auto" (silhouette) or a fixed number of clusters.
    per_cluster:
        Passages kept per cluster (the nearest to its centre).
    max_clusters:
        Largest k tried by "auto".
    counts:
        Prefix each kept passage with the size of its cluster, `[12 similar] ...` (our addition: the
        paper's cluster summaries convey how common an opinion is; bare representatives do not).
    """

    name = "crag"
    paper = "Akesson and Santos, Clustered Retrieved Augmented Generation (CRAG), arXiv 2406.00029, 2024"

    clusters: int | str = "auto"
    per_cluster: int = 1
    max_clusters: int = 10
    counts: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.clusters, bool) or (isinstance(self.clusters, str) and self.clusters != "auto"):
            raise TokensiftError(f"crag clusters must be auto or a number >= 1, got {self.clusters!r}")
        if isinstance(self.clusters, int) and self.clusters < 1:
            raise TokensiftError(f"crag clusters must be auto or a number >= 1, got {self.clusters}")
        if self.per_cluster < 1:
            raise TokensiftError(f"crag per_cluster must be >= 1, got {self.per_cluster}")
        if self.max_clusters < 2:
            raise TokensiftError(f"crag max_clusters must be >= 2, got {self.max_clusters}")

    def select_passages(
        self, passages: list[str], question: str | None, seed: int
    ) -> tuple[list[tuple[int, str]], dict[str, float]]:
        from tokensift import embeddings

        n = len(passages)
        if n <= 2 or (isinstance(self.clusters, int) and self.clusters * self.per_cluster >= n):
            return list(enumerate(passages)), {}  # nothing to reduce: every passage would be kept
        x = embeddings.embed(passages)
        info: dict[str, float] = {}
        if isinstance(self.clusters, int):
            k = self.clusters
            labels = kmeans(x, k, seed)
        else:
            best = None
            for k in range(2, min(self.max_clusters, n - 1) + 1):
                labels = kmeans(x, k, seed)
                score = silhouette(x, labels)
                if best is None or score > best[0] + 1e-9:
                    best = (score, k, labels)
            assert best is not None
            info["crag_silhouette"], k, labels = best
        keep: dict[int, int] = {}  # passage -> size of its cluster
        for c in range(k):
            members = (labels == c).nonzero().flatten()
            if len(members) == 0:
                continue
            centre = torch.nn.functional.normalize(x[members].mean(dim=0), dim=0)
            closest = (x[members] @ centre).argsort(descending=True)[: self.per_cluster]
            keep.update((int(members[i]), len(members)) for i in closest)
        info["crag_clusters"] = k
        return [(i, self.text(passages[i], keep[i])) for i in sorted(keep)], info

    def text(self, passage: str, cluster_size: int) -> str:
        return f"[{cluster_size} similar] {passage}" if self.counts else passage
