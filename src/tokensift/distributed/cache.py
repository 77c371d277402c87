"""`ShardCache`: a TokenCache that holds only this rank's slice of the sequence, and the attention
function registered for it.

Prefill: every rank runs the model on its zigzag slice (RoPE at the slice's true positions), and
each layer's attention runs one of the `schedules` across ranks; the layer keeps only the slice's
keys and values. Later forwards (decode steps, an appended question) run on every rank with the same
tokens; the new keys are kept by one rank only (the one holding the fewest tokens), and each query
attends to every rank's slice, the partials merged by log-sum-exp. Eviction composes: see
`eviction`.

The attention function is registered with transformers' `AttentionInterface` next to tokensift's
own, and reads the cache layer the same way (the `PENDING` layer set by the layer's `update`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from tokensift.distributed.blocks import PAD_POSITION
from tokensift.distributed.comm import Comm
from tokensift.distributed.eviction import evict_prompt
from tokensift.distributed.partition import rank_positions
from tokensift.distributed.schedules import SCHEDULES, replicated_attention
from tokensift.errors import TokensiftError
from tokensift.runtime.attention import tokensift_mask
from tokensift.runtime.cache import PENDING, TokenCache, TokenLayer

NAME = "tokensift_context_parallel"


class ShardLayer(TokenLayer):
    """A TokenLayer that stores a forward's tokens only when this rank owns them, at true positions."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache = self.cache
        assert isinstance(cache, ShardCache)
        if cache.keep_new:
            self._append(key_states, value_states)
            assert self.pos is not None
            self.pos[..., self.n - key_states.shape[-2] : self.n] = cache.forward_positions
        PENDING.set(self)
        return self.k, self.v

    def get_seq_length(self) -> int:
        cache = self.cache
        assert isinstance(cache, ShardCache)
        return cache.next_pos


class ShardCache(TokenCache):
    """This rank's slice of every layer's K/V for an n-token prompt split over `comm.world` ranks."""

    def __init__(self, model: Any, plan: Any, *, prompt_tokens: int, comm: Comm, schedule: str):
        super().__init__(model, plan, prompt_tokens=prompt_tokens)
        if schedule not in SCHEDULES:
            raise TokensiftError(
                f"unknown context-parallel schedule {schedule!r}: use {' or '.join(SCHEDULES)}"
            )
        self.layers = [ShardLayer(self, i) for i in range(self.num_layers)]
        self.comm, self.schedule = comm, schedule
        self.prompt_len = prompt_tokens
        self.next_pos = 0  # the absolute position the next token takes (global)
        self.prefilling = False
        self.keep_new = True
        self.forward_positions = torch.empty(0, dtype=torch.long)
        self.held = [0] * comm.world  # tokens each rank holds (summed over layers, padding included)
        self.global_evicted: int | None = None

    @property
    def seen_tokens(self) -> int:
        return self.next_pos

    @property
    def evicted(self) -> int:
        local = sum(layer.evicted for layer in self.layers)
        return local if self.global_evicted is None else self.global_evicted

    # -- the driver calls these around each forward -----------------------------------------------
    def begin_prefill(self) -> torch.Tensor:
        """This rank's prompt positions; the next forward is the split prefill."""
        self.prefilling, self.keep_new = True, True
        self.forward_positions = rank_positions(self.prompt_len, self.comm.world, self.comm.rank)
        return self.forward_positions

    def end_prefill(self) -> None:
        self.prefilling = False
        self.next_pos = self.prompt_len
        local = torch.tensor([float(sum(layer.n for layer in self.layers))])
        self.held = [int(t.item()) for t in self.comm.all_gather(local)]

    def begin_forward(self, length: int) -> None:
        """A forward replicated on every rank; its tokens go to the rank holding fewest."""
        owner = min(range(self.comm.world), key=lambda r: (self.held[r], r))
        self.held[owner] += length * self.num_layers
        self.keep_new = owner == self.comm.rank
        self.forward_positions = torch.arange(self.next_pos, self.next_pos + length)

    def end_forward(self, length: int) -> None:
        self.next_pos += length

    # -- attention ------------------------------------------------------------------------------------
    def attend(self, layer: ShardLayer, query: torch.Tensor, scale: float) -> torch.Tensor:
        if self.prefilling:
            run = SCHEDULES[self.schedule]
            out, lse = run(self.comm, query, layer.k, layer.v, self.prompt_len, scale)
            if self.plan.evict is not None and self.evicting:
                evict_prompt(self, layer, query, lse, scale)
            return out
        if layer.n == 0:
            k_pos = torch.empty(query.shape[0], layer.k.shape[1], 0, dtype=torch.long, device=query.device)
        else:
            k_pos = layer.positions
        return replicated_attention(self.comm, query, layer.k, layer.v, self.forward_positions, k_pos, scale)

    def gathered(self, model: Any) -> TokenCache:
        """Every rank's slice gathered into one ordinary TokenCache (same on every rank)."""
        full = TokenCache(model, self.plan, prompt_tokens=self.prompt_len)
        for shard, layer in zip(self.layers, full.layers, strict=True):
            lengths = [int(t.item()) for t in self.comm.all_gather(torch.tensor([float(shard.n)]))]
            d = shard.k.shape[-1]
            kv = torch.cat(
                self.comm.all_gather_padded(torch.cat([shard.k, shard.v], dim=-1), 2, lengths), dim=2
            )
            positions = torch.cat(self.comm.all_gather_padded(shard.positions, 2, lengths), dim=2)
            keys, values = kv[..., :d], kv[..., d:]
            real = positions < PAD_POSITION
            counts = real.sum(-1)
            if bool((counts != counts.flatten()[0]).any()):
                raise RuntimeError("gathered heads hold different numbers of tokens")
            order = torch.where(real, positions, torch.full_like(positions, PAD_POSITION)).argsort(dim=-1)
            order = order[..., : int(counts.flatten()[0])]
            pick = order.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            layer.update(keys.gather(2, pick), values.gather(2, pick))
            PENDING.set(None)
            assert layer.pos is not None
            layer.pos[..., : layer.n] = positions.gather(2, order)
            layer.seen = self.next_pos
            layer.evicted = self.next_pos - layer.n
            full._account(layer)
        full.notes.extend(self.notes)
        full.counters.update(self.counters)
        return full


def context_parallel_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    layer = PENDING.get()
    PENDING.set(None)
    if not isinstance(layer, ShardLayer):
        raise TokensiftError("context-parallel attention runs only with a ShardCache (tokensift.distributed)")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise TokensiftError("context-parallel attention does not support soft-capping or sink logits")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    assert isinstance(layer.cache, ShardCache)
    out = layer.cache.attend(layer, query, scale)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def install(model: torch.nn.Module) -> None:
    """Switch a transformers model to the context-parallel attention function."""
    AttentionInterface.register(NAME, context_parallel_attention)
    AttentionMaskInterface.register(NAME, tokensift_mask)
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
