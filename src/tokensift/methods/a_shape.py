"""A-shape: prefill attention restricted to the attention sinks and a local window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import SparsePrefillMethod, register
from tokensift.runtime import block_sparse as bsa
from tokensift.runtime.block_sparse import a_shape_past, a_shape_row_mask

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


def a_shape_mask(length: int, sinks: int, local: int) -> torch.Tensor:
    """The token-level A-shape mask (length, length), True where row i may attend to key j: the first
    `sinks` keys and the last `local` keys up to i (causal). For tests and pattern search."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return (j <= i) & ((j < sinks) | (i - j < local))


def a_shape_dense_rows(length: int, n: int, sinks: int, local: int) -> int:
    """Rows computed exactly: every row before absolute position sinks + local sees all its keys (so
    sparse blocks start past the sinks and the shared in-block mask never has to show one)."""
    return max(0, min(length, sinks + local - (n - length)))


@register
@dataclass
class AShape(SparsePrefillMethod):
    """Sparse prefill in which every prompt token attends only to the sinks and a local window.

    During multi-token forwards, query i attends to key j <= i only when j is one of the first
    `sinks` tokens or lies within the last `local` tokens (i - j < local): the static A-shaped mask.
    Query blocks of `block_size` rows are processed against their gathered sinks and window with
    fused attention calls, so work grows as L x (sinks + local), not L^2. Rows whose whole causal
    prefix fits in sinks + local are exact anyway and run dense. Decoding is left dense (or to a
    decode-time method). Applies to all heads alike.

    Based on the A-shape pattern of Jiang et al., "MInference 1.0: Accelerating Pre-filling for
    Long-Context LLMs via Dynamic Sparse Attention", NeurIPS 2024 (StreamingLLM's sink + window mask,
    Xiao et al., ICLR 2024, applied to prefill).

    Parameters
    ----------
    sinks:
        Initial tokens every query attends to (MInference: n_init 128).
    local:
        Most recent tokens every query attends to, itself included (MInference: n_local 3968 for
        100K+ prompts; 896 here so sinks + local = 1024 suits 4K-16K prompts).
    block_size:
        Query rows processed together (MInference: 64).
    dense_tail:
        Last queries of each multi-token forward that attend densely to every key. 0 (default, as
        in the paper) is the pattern alone; 64 lets a question at the end of the prompt see all of
        it (MInference's later Tri-shape). Same parameter and default in every sparse-prefill method.
    """

    name = "a_shape"
    paper = "Jiang et al., MInference 1.0 (A-shape pattern), NeurIPS 2024"

    sinks: int = 128
    local: int = 896
    block_size: int = 64
    dense_tail: int = 0

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise TokensiftError(f"a_shape sinks must be >= 0, got {self.sinks}")
        if self.local < 1:
            raise TokensiftError(f"a_shape local must be >= 1 (each token sees itself), got {self.local}")
        if self.block_size < 1 or self.dense_tail < 0:
            raise TokensiftError(
                "a_shape block_size must be >= 1 and dense_tail >= 0, "
                f"got {self.block_size}, {self.dense_tail}"
            )

    def prefill_attention(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        length, n = query.shape[2], keys.shape[2]
        start = a_shape_dense_rows(length, n, self.sinks, self.local)
        calls = []
        if start < bsa.tail_start(length, self.dense_tail):
            firsts = bsa.block_starts(length, n, start, self.block_size)
            with bsa.one_thread():
                past = a_shape_past(firsts.to(query.device), self.sinks, self.local, n)[None, None]
            kv_heads = keys.shape[1]
            groups = bsa.Groups.per_kv_head(kv_heads, query.shape[1] // kv_heads, query.device)
            mask = a_shape_row_mask(self.sinks, self.local, self.block_size)
            calls.append(bsa.SparseCall(start, past, groups, row_mask=mask, window=(self.sinks, self.local)))
        return bsa.run_plan(
            layer.cache, self.name, query, keys, values, scale, calls, self.block_size, self.dense_tail
        )
