"""HiP attention: a hierarchical top-k tree search over key blocks, for decode and prefill."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch
import torch.nn.functional as F

from tokensift.errors import TokensiftError
from tokensift.methods.base import (
    Budget,
    Hook,
    SparseDecodeMethod,
    SparsePrefillMethod,
    check_budget,
    register,
    resolve_budget,
)
from tokensift.runtime import block_sparse as bsa
from tokensift.runtime.scores import dense_attention
from tokensift.runtime.sparse_decode import (
    Stopwatch,
    dense_step,
    fresh_state,
    gather,
    grouped,
    new_state,
    record,
    single_thread,
    sparse_attention,
)

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer

# Elements of scores or gathered keys per chunk of query blocks at prefill (16 MiB in float32).
CHUNK_ELEMENTS = 1 << 22


def tree_search(
    queries: torch.Tensor, keys: torch.Tensor, first: int, blocks: torch.Tensor, k: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """HiP's hierarchical top-k over key blocks, for every row of queries.

    queries (B, H_kv, R, Q, D): R rows (query blocks) of Q queries each (a GQA group's heads times
    the block's tokens); keys (B, H_kv, n, D). Row r searches blocks [0, blocks[r]) of `block_size`
    keys starting at slot `first`. Start from k nodes splitting the range evenly; at every iteration
    split each node in two, score each half by its centre block (the max over the row's queries and
    the block's keys of q.k), keep the best k halves; stop when every node is one block wide.
    Returns (block index (B, H_kv, R, k), valid (B, H_kv, R, k), iterations), which is
    ceil(log2(max blocks / k)) for ranges longer than k blocks and 0 otherwise; rows with fewer than
    k blocks select all of them and mark the rest invalid.
    """
    b, h, r, _, _ = queries.shape
    device = queries.device
    j = torch.arange(k + 1, device=device)
    bounds = (j * blocks.view(r, 1)) // k  # even split of each row's range into k nodes
    start = bounds[:, :-1].expand(b, h, r, k).clone()
    end = bounds[:, 1:].expand(b, h, r, k).clone()
    offsets = torch.arange(block_size, device=device)
    last = keys.shape[2] - 1
    iterations = 0
    while True:
        active = ((end - start) > 1).any(dim=-1).flatten(0, 1).any(dim=0).nonzero().squeeze(1)
        if active.numel() == 0:
            return start, (end - start) == 1, iterations
        iterations += 1
        s, e = start[:, :, active], end[:, :, active]
        mid = s + (e - s + 1) // 2
        cs, ce = torch.cat([s, mid], dim=-1), torch.cat([mid, e], dim=-1)
        centre = cs + (ce - cs - 1).clamp(min=0) // 2
        slots = (first + centre.unsqueeze(-1) * block_size + offsets).clamp(max=last)
        rep_keys = gather(keys, slots.flatten(2)).unflatten(2, (active.numel(), -1))
        scores = (queries[:, :, active] @ rep_keys.transpose(-1, -2)).amax(dim=3)
        scores = scores.unflatten(-1, (2 * k, block_size)).amax(dim=-1).float()
        scores = scores.masked_fill(ce <= cs, float("-inf"))
        best = scores.topk(k, dim=-1).indices
        start[:, :, active] = cs.gather(-1, best)
        end[:, :, active] = ce.gather(-1, best)


def block_slots(blocks: torch.Tensor, first: int, block_size: int) -> torch.Tensor:
    """Slots of blocks (..., k) that start at `first`: (..., k * block_size)."""
    offsets = torch.arange(block_size, device=blocks.device)
    return (first + blocks.unsqueeze(-1) * block_size + offsets).flatten(-2)


@register
@dataclass
class HiP(SparseDecodeMethod, SparsePrefillMethod):
    """Estimate each query block's top-k key blocks with a tree search; attend to those only.

    Keys are grouped in blocks of `block_size_k`, queries (at prefill) in blocks of `block_size_q`.
    For a query block, the causal range between the sinks and the sliding window is split into k
    nodes; every iteration halves each node, scores each half by its centre key block (the maximum
    of q.k over the query block's queries, the GQA group's heads, and the block's keys) and keeps the
    best k halves, until nodes are single blocks: about log2(T / k) iterations instead of scoring all
    T keys, relying on "attention locality" (neighbouring keys score alike). The selected blocks plus
    `sinks` initial tokens and a `window` of recent tokens are gathered and attended in one fused call
    per chunk of blocks (causal inside the window). The mask is shared by the query heads of each
    KV head. Decoding re-runs the search only every `refresh_interval` steps; in between the window
    also keeps the tokens that arrived since the last search, so a step attends to up to
    `refresh_interval + block_size_k - 2` more tokens than the budget. The first `dense_layers`
    layers stay dense. Nothing is evicted and keys keep their positions.

    The budget counts every token a query attends to: the reference's mask_k = 512 with a 128-token
    window and 4 sinks is budget=644.

    Based on Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework with
    Hierarchically Pruned Attention" (HiP), ICLR 2025.

    Parameters
    ----------
    budget:
        Tokens attended per query (sinks + window + tree-selected blocks): an int count or a fraction
        of the prompt.
    sinks:
        Initial tokens always attended (reference: 4).
    window:
        Most recent tokens always attended (reference: 128).
    block_size_q:
        Queries sharing one mask at prefill (reference: 32).
    block_size_k:
        Keys per mask unit (reference: 2).
    refresh_interval:
        Decode steps between tree searches (reference demo: 8).
    dense_layers:
        Leading layers that attend densely (reference demo: 4 of Llama-3.1-8B's 32; here 3).
    sparse_prefill:
        Also make prefill (and any multi-token forward) block-sparse; False leaves it dense.
    dense_tail:
        Last queries of each multi-token forward that attend densely to every key. 0 (default, as
        in the paper) is the HiP mask alone; 64 lets a question at the end of the prompt see all of
        it. Same parameter and default in every sparse-prefill method.
    """

    name = "hip"
    hooks: ClassVar[frozenset[Hook]] = frozenset({Hook.SELECT, Hook.PREFILL})
    applied_by: ClassVar[tuple[str, ...]] = ("sparse_layer_steps", "prefill_attention_pairs_skipped")
    paper = (
        "Lee et al., A Training-Free Sub-quadratic Cost Transformer Model Serving Framework with "
        "Hierarchically Pruned Attention, ICLR 2025"
    )

    budget: Budget = 1024
    sinks: int = 4
    window: int = 128
    block_size_q: int = 32
    block_size_k: int = 2
    refresh_interval: int = 8
    dense_layers: int = 3
    sparse_prefill: bool = True
    dense_tail: int = 0
    budget_tokens: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def changes_prefill(self) -> bool:
        return self.sparse_prefill

    def __post_init__(self) -> None:
        check_budget(self.budget)
        for what in ("sinks", "window", "dense_layers", "dense_tail"):
            if getattr(self, what) < 0:
                raise TokensiftError(f"hip {what} must be >= 0, got {getattr(self, what)}")
        for what in ("block_size_q", "block_size_k", "refresh_interval"):
            if getattr(self, what) < 1:
                raise TokensiftError(f"hip {what} must be >= 1, got {getattr(self, what)}")

    def resolve(self, prompt_tokens: int) -> Self:
        new = dataclasses.replace(self)
        new.budget_tokens = resolve_budget(self.budget, prompt_tokens)
        if new.k < 1:
            raise TokensiftError(
                f"hip budget of {new.budget_tokens} tokens leaves no key block for the tree search after "
                f"{self.sinks} sinks and a {self.window}-token window"
            )
        return new

    @property
    def k(self) -> int:
        """Key blocks the tree search selects."""
        if self.budget_tokens is None:
            raise RuntimeError("hip: budget used before it was resolved against a prompt")
        return (self.budget_tokens - self.sinks - self.window) // self.block_size_k

    def resolved_params(self) -> dict[str, Any]:
        return {**self.params(), "budget_tokens": self.budget_tokens, "mask_blocks": self.k}

    def search_end(self, before: int) -> int:
        """End of the searched range for queries from position `before` on: the range between the
        sinks and the window, shortened to whole key blocks (the window absorbs the remainder)."""
        span = max(0, before - self.window - self.sinks)
        return self.sinks + span // self.block_size_k * self.block_size_k

    # -- decode -----------------------------------------------------------------------------------
    def decode_attention(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        n = keys.shape[2]
        if layer.index < self.dense_layers:
            if self.dense_layers >= layer.cache.num_layers:
                layer.cache.note(
                    f"hip: dense_layers={self.dense_layers} covers all {layer.cache.num_layers} layers of "
                    "this model; decoding is dense"
                )
            return dense_step(layer, query, keys, values, scale)
        if n <= self.budget_tokens:  # type: ignore[operator]
            layer.cache.note(
                f"hip: its budget of {self.budget_tokens} tokens covered the whole cache at some decode "
                "steps; those steps attended densely"
            )
            return dense_step(layer, query, keys, values, scale)
        with single_thread():
            watch = Stopwatch(query.device)
            state = fresh_state(layer, "hip")
            if state is None or state["age"] >= self.refresh_interval or state["end"] > n - 1:
                state = new_state(layer, "hip")
                end = self.search_end(n - 1)
                blocks, _, iterations = tree_search(
                    grouped(query, keys.shape[1]).unsqueeze(2),
                    keys,
                    self.sinks,
                    torch.tensor([(end - self.sinks) // self.block_size_k], device=keys.device),
                    self.k,
                    self.block_size_k,
                )
                tree = block_slots(blocks[:, :, 0], self.sinks, self.block_size_k)
                sinks = torch.arange(self.sinks, device=tree.device).expand(*tree.shape[:2], self.sinks)
                state["fixed"], state["end"], state["age"] = torch.cat([sinks, tree], dim=-1), end, 0
                layer.cache.count("hip_mask_refreshes")
                layer.cache.count("hip_tree_iterations", iterations)
            state["age"] += 1
            fixed, end = state["fixed"], state["end"]
            window = torch.arange(end, n, device=fixed.device).expand(*fixed.shape[:2], n - end)
            index = torch.cat([fixed, window], dim=-1)
            watch.selected()
            out = sparse_attention(query, keys, values, index, scale)
            watch.attended()
            record(layer, watch, index.shape[-1], sparse=True)
            return out

    # -- prefill ----------------------------------------------------------------------------------
    def prefill_attention(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        n = keys.shape[2]
        dense = not self.sparse_prefill or layer.index < self.dense_layers
        if not dense and n <= self.budget_tokens:  # type: ignore[operator]
            layer.cache.note(
                f"hip: a {query.shape[2]}-token forward fit its budget of {self.budget_tokens} tokens; it "
                "attended densely"
            )
            dense = True
        if dense:
            bsa.count_pairs(query.shape[0] * query.shape[1] * bsa.causal_pairs(query.shape[2], n))
            return dense_attention(query, keys, values, scale)
        watch = Stopwatch(query.device)
        length = query.shape[2]
        stop = bsa.tail_start(length, self.dense_tail)
        if stop == length:
            out, iterations = self.block_sparse(query, keys, values, scale)
        else:  # the rows before the tail are the first `stop` queries over the first n - tail keys
            out, cut = query.new_empty(query.shape), n - (length - stop)
            iterations = 0
            if stop > 0:
                sparse, iterations = self.block_sparse(
                    query[:, :, :stop], keys[:, :, :cut], values[:, :, :cut], scale
                )
                out[:, :, :stop] = sparse
            bsa.dense_tail_rows(query, keys, values, scale, out, length - stop)
        watch.attended()
        layer.cache.count("hip_prefill_seconds", watch.attention)
        layer.cache.count("hip_tree_iterations", iterations)
        return out

    def block_sparse(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, int]:
        """Causal block-sparse attention of L queries (the last L of n keys) under HiP masks.

        Every block of `block_size_q` queries attends to the sinks, its tree-searched key blocks and
        a window from the end of its searched range to its last query (at least `window` keys before
        its first query), in one SDPA call per chunk of blocks with a causal/validity mask.
        Returns the output (B, H_q, L, D) and the most tree iterations any chunk needed.
        """
        b, hq, length, d = query.shape
        kv, n = keys.shape[1], keys.shape[2]
        rep, bq, bk = hq // kv, self.block_size_q, self.block_size_k
        device = query.device
        nblocks = -(-length // bq)
        # Rows padded to whole blocks by repeating the last query (max-reduction ignores duplicates).
        rows = torch.arange(nblocks * bq, device=device).clamp(max=length - 1)
        q = query.index_select(2, rows).view(b, kv, rep, nblocks, bq, d).transpose(2, 3)
        q = q.reshape(b, kv, nblocks, rep * bq, d)
        qpos = (n - length + rows).view(nblocks, 1, bq).expand(nblocks, rep, bq).reshape(nblocks, rep * bq)
        first = n - length + torch.arange(nblocks, device=device) * bq
        span = (first - self.window - self.sinks).clamp(min=0) // bk
        ends = self.sinks + span * bk
        wide = self.window + bk - 1 + bq  # the longest window any block needs
        width = self.sinks + self.k * bk + wide
        step = max(1, CHUNK_ELEMENTS // max(1, kv * rep * bq * max(width, 2 * self.k * bk)))
        out = q.new_empty(q.shape)
        most = 0
        for s in range(0, nblocks, step):
            e = min(nblocks, s + step)
            blocks, valid, iterations = tree_search(q[:, :, s:e], keys, self.sinks, span[s:e], self.k, bk)
            most = max(most, iterations)
            tree = block_slots(blocks, self.sinks, bk)  # (B, H_kv, r, k * bk)
            tree_valid = valid.repeat_interleave(bk, dim=-1)
            r = e - s
            sinks = torch.arange(self.sinks, device=device).expand(b, kv, r, self.sinks)
            window = (ends[s:e].view(r, 1) + torch.arange(wide, device=device)).expand(b, kv, r, wide)
            index = torch.cat([sinks, tree, window], dim=-1)
            ok = torch.cat(
                [
                    torch.ones(b, kv, r, self.sinks, dtype=torch.bool, device=device),
                    tree_valid,
                    torch.ones(b, kv, r, wide, dtype=torch.bool, device=device),
                ],
                dim=-1,
            )
            mask = ok.unsqueeze(3) & (index.unsqueeze(3) <= qpos[s:e].view(1, 1, r, rep * bq, 1))
            flat = index.clamp(max=n - 1).flatten(2)
            k_sel = gather(keys, flat).unflatten(2, (r, width))
            v_sel = gather(values, flat).unflatten(2, (r, width))
            out[:, :, s:e] = F.scaled_dot_product_attention(
                q[:, :, s:e], k_sel, v_sel, attn_mask=mask, scale=scale
            )
            # Padded rows repeat the last query: only real rows count.
            real = (torch.arange(s * bq, e * bq, device=device) < length).view(1, 1, r, 1, bq)
            shown = int((mask.view(b, kv, r, rep, bq, width) & real[..., None]).sum())
            causal = b * hq * bsa.causal_pairs(length, n, s * bq, min(length, e * bq))
            bsa.count_pairs(b * kv * r * rep * bq * width, causal - shown)
        out = out.view(b, kv, nblocks, rep, bq, d).transpose(2, 3).reshape(b, hq, nblocks * bq, d)
        return out[:, :, :length], most
