"""Ragged layers: KV heads that hold different numbers of tokens, with no padding anywhere.

Head-adaptive budgets (AdaKV) keep a different number of tokens per KV head. Masking the dropped
keys, as kvpress does, saves no memory; here the kept tokens of every head are stored flattened in
one buffer with per-head offsets, so the bytes held equal the tokens kept (plus a small append
headroom once decoding starts), and attention runs per KV head over exactly its own keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import CacheLayerMixin

from tokensift.errors import TokensiftError
from tokensift.runtime.cache import PENDING, CacheLink
from tokensift.runtime.scores import dense_attention

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenCache, TokenLayer


def _headroom(n: int) -> int:
    return max(8, n // 32)


class RaggedLayer(CacheLink, CacheLayerMixin):
    """A layer whose head h holds `lengths[h]` tokens in keys[starts[h] : starts[h] + lengths[h]]."""

    is_sliding = False
    is_croppable = True
    ragged = True

    def __init__(
        self,
        cache: TokenCache,
        index: int,
        seen: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.link(cache)
        self.head_dim, self.dtype, self.device = head_dim, dtype, device
        self.index = index
        self.seen = seen
        self.evicted = 0.0
        self.extra: dict[str, Any] = {}
        self.version = 0
        self.is_initialized = True
        self.starts = self.lengths = self.capacities = torch.zeros(0, dtype=torch.long)
        self.pos = torch.zeros(0, dtype=torch.long)

    @classmethod
    def from_selection(cls, layer: TokenLayer, index: list[torch.Tensor]) -> RaggedLayer:
        """Keep slots `index[h]` (sorted) of each KV head of a uniform layer (batch size 1)."""
        if layer.k.shape[0] != 1:
            raise TokensiftError("head-adaptive budgets support batch size 1")
        new = cls(layer.cache, layer.index, layer.seen, layer.k.shape[-1], layer.k.dtype, layer.device)
        lengths = torch.tensor([len(i) for i in index], dtype=torch.long)
        new._allocate(lengths, lengths)  # exact: the bytes held are the tokens kept
        flat = torch.cat([new.starts[h] + torch.arange(len(i)) for h, i in enumerate(index)])
        new.keys[flat] = torch.cat([layer.k[0, h, i] for h, i in enumerate(index)])
        new.values[flat] = torch.cat([layer.v[0, h, i] for h, i in enumerate(index)])
        new.pos[flat] = torch.cat([layer.positions[0, h, i] for h, i in enumerate(index)])
        new.evicted = layer.evicted + (layer.n * len(index) - int(lengths.sum())) / len(index)
        return new

    def _allocate(self, lengths: torch.Tensor, capacities: torch.Tensor) -> None:
        old = (self.keys, self.values, self.pos, self.starts, self.lengths) if self.keys is not None else None
        total = int(capacities.sum())
        self.keys = torch.empty(total, self.head_dim, dtype=self.dtype, device=self.device)
        self.values = torch.empty(total, self.head_dim, dtype=self.dtype, device=self.device)
        self.pos = torch.empty(total, dtype=torch.long, device=self.device)
        starts = torch.zeros_like(capacities)
        starts[1:] = capacities.cumsum(0)[:-1]
        if old is not None:
            keys, values, pos, old_starts, old_lengths = old
            for h in range(len(lengths)):
                n = int(old_lengths[h])
                src = slice(int(old_starts[h]), int(old_starts[h]) + n)
                dst = slice(int(starts[h]), int(starts[h]) + n)
                self.keys[dst], self.values[dst], self.pos[dst] = keys[src], values[src], pos[src]
        self.starts, self.lengths, self.capacities = starts, lengths.clone(), capacities.clone()
        self.cache._account(self)

    # -- transformers' CacheLayerMixin interface -----------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if key_states.shape[0] != 1:
            raise TokensiftError("head-adaptive budgets support batch size 1")
        q = key_states.shape[-2]
        needed = self.lengths + q
        if bool((needed > self.capacities).any()):
            self._allocate(self.lengths, needed + torch.tensor([_headroom(int(n)) for n in needed]))
        heads = len(self.lengths)
        flat = (self.starts + self.lengths).unsqueeze(1) + torch.arange(q)  # (H, q)
        self.keys[flat.flatten()] = key_states[0].reshape(heads * q, -1)
        self.values[flat.flatten()] = value_states[0].reshape(heads * q, -1)
        self.pos[flat.flatten()] = torch.arange(self.seen, self.seen + q, device=self.device).repeat(heads)
        self.lengths = needed
        self.seen += q
        self.version += 1
        PENDING.set(self)  # type: ignore[arg-type]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return int(self.lengths.max()) + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise TokensiftError("a ragged cache layer cannot be reset; build a new TokenCache")

    def crop(self, tokens_to_remove: int) -> None:
        drop = -tokens_to_remove
        if drop < 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if drop:
            if bool((self.lengths < drop).any()):
                raise ValueError(f"cannot remove {drop} tokens from a head holding fewer")
            self.lengths = self.lengths - drop
            self.seen -= drop
            self.version += 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise TokensiftError("beam search is not supported with a TokenCache; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise TokensiftError("head-adaptive budgets support batch size 1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise TokensiftError("head-adaptive budgets support batch size 1")

    # -- what the runtime and stats read ------------------------------------------------------------
    @property
    def n(self) -> float:
        """Mean tokens held per KV head."""
        return float(self.lengths.float().mean())

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of KV head h: views of the flat buffers, no copy."""
        span = slice(int(self.starts[h]), int(self.starts[h] + self.lengths[h]))
        return self.keys[span], self.values[span], self.pos[span]

    def nbytes(self) -> tuple[int, int]:
        kv = self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()
        return kv, self.pos.untyped_storage().nbytes()

    def attention(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Exact causal attention of query (1, H_q, L, D) over each KV head's own keys."""
        heads = len(self.lengths)
        rep = query.shape[1] // heads
        outs = []
        for h in range(heads):
            k, v, _ = self.head(h)
            q = query[:, h * rep : (h + 1) * rep]
            outs.append(dense_attention(q, k[None, None], v[None, None], scale))
        return torch.cat(outs, dim=1)
