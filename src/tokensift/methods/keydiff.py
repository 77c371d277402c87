"""KeyDiff: keep the keys least similar to the mean key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tokensift.methods.base import Budget, EvictionMethod, register

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


@register
@dataclass
class KeyDiff(EvictionMethod):
    """Compress the prompt once, keeping the keys most different from the layer's mean key.

    Per KV head, the anchor is the mean of the unit-normalised keys held; each key scores minus its
    cosine similarity to the anchor, and the `budget` most distinctive keys stay. Keys that look
    like every other key carry little information; no attention scores are needed, so it works
    with any attention kernel. Compression runs after every multi-token forward; decode steps
    append without evicting.

    Based on Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
    Inference in Resource-Constrained Environments", 2025.

    Parameters
    ----------
    budget:
        Tokens kept per KV head: an int count or a fraction of the prompt.
    """

    name = "keydiff"
    one_shot = True
    paper = (
        "Park et al., KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference, 2025"
    )

    budget: Budget = 0.25

    def should_compress(self, layer: TokenLayer, query: torch.Tensor) -> bool:
        return query.shape[2] > 1 and layer.n > self.layer_tokens(layer)

    def token_scores(self, layer: TokenLayer, query: torch.Tensor, scale: float, budget: int) -> torch.Tensor:
        keys = F.normalize(layer.k.float(), dim=-1)  # (B, H_kv, n, D)
        anchor = F.normalize(keys.mean(dim=2, keepdim=True), dim=-1)
        return -(keys * anchor).sum(dim=-1)
