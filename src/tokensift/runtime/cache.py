"""`TokenCache`: a transformers `Cache` whose layers physically hold only the tokens a method keeps.

Each layer stores keys/values in preallocated buffers (batch, kv_heads, capacity, head_dim) with the
original absolute position of every kept token, per head. Eviction gathers the kept tokens into a
buffer sized for them, so the bytes reported are the bytes of the tensors actually held.

`get_seq_length()` reports the position the next token must take: the number of tokens seen for
methods that keep original positions (G3-i), the physical length for methods that re-position keys
inside the cache (G3-ii, StreamingLLM). Both our decode loop and transformers' `generate` derive the
next position from it, so neither sees the compressed length by mistake.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tokensift.errors import TokensiftError
from tokensift.runtime.rope import RopeTable, find_inv_freq

if TYPE_CHECKING:
    from tokensift.runtime.plan import Plan

# Set by TokenLayer.update and read by the registered attention function in the same layer's forward.
PENDING: ContextVar[TokenLayer | None] = ContextVar("tokensift_pending_layer", default=None)


def _capacity(n: int) -> int:
    """Buffer size for n tokens: a little headroom so appends rarely reallocate."""
    return n + max(16, n // 32)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.untyped_storage().nbytes()


class CacheLink:
    """A layer's link back to the cache that owns it, held weakly. The cache holds its layers, so a
    strong link back would make every cache a reference cycle, freed only when Python's cyclic
    collector next runs a full pass: a bench at 4k kept gigabytes of finished caches alive that way."""

    _cache: weakref.ref[TokenCache]

    def link(self, cache: TokenCache) -> None:
        self._cache = weakref.ref(cache)

    @property
    def cache(self) -> TokenCache:
        cache = self._cache()
        if cache is None:
            raise TokensiftError("this layer's TokenCache is gone: keep the cache while you use its layers")
        return cache


class TokenLayer(CacheLink, CacheLayerMixin):
    """One layer's physical K/V plus per-token state (positions, method scores)."""

    is_sliding = False
    is_croppable = True

    def __init__(self, cache: TokenCache, index: int):
        super().__init__()
        self.link(cache)
        self.index = index
        self.n = 0  # physical tokens held (per head)
        self.seen = 0  # tokens ever appended: the next true position
        self.evicted = 0
        self.pos: torch.Tensor | None = None  # (B, H, cap) original absolute positions
        self.states: dict[str, torch.Tensor] = {}  # (B, H, cap) float state aligned with tokens
        self.extra: dict[str, Any] = {}  # any other per-layer method state (page metadata, selections)
        self.version = 0  # bumped whenever slots move (keep, crop, reset): derived state must be rebuilt
        self.last_query_len = 0

    # -- transformers' CacheLayerMixin interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cache._before_update(self, key_states.shape[-2])
        self._append(key_states, value_states)
        PENDING.set(self)
        return self.attention_keys(), self.v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n + query_length, 0

    def get_seq_length(self) -> int:
        return self.n if self.cache.plan.repositions else self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.pos = None
        self.states = {}
        self.extra = {}
        self.version += 1
        self.n = self.seen = self.evicted = 0
        self.is_initialized = False
        self.cache._account(self)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the most recent tokens (speculative rollback); a negative count, as transformers passes it."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        drop = -tokens_to_remove
        if drop == 0 or not self.is_initialized:
            return
        if drop > self.n:
            raise ValueError(f"cannot remove {drop} tokens from a layer holding {self.n}")
        self.n -= drop
        self.seen -= drop
        self.version += 1

    def keep_recent(self, rows: list[int], added: int) -> None:
        """Of the last `added` appended tokens keep only `rows` (increasing), moved down to follow the
        older tokens in order, as if only they had been appended (tree verification's rollback: the
        accepted path). Positions stay those of the first len(rows) appended slots."""
        if not self.is_initialized or added == 0:
            return
        base = self.n - added
        if rows != list(range(len(rows))):
            assert self.keys is not None and self.values is not None
            src = torch.tensor(rows, device=self.keys.device) + base
            dst = slice(base, base + len(rows))
            self.keys[:, :, dst] = self.keys[:, :, src]
            self.values[:, :, dst] = self.values[:, :, src]
            for t in self.states.values():
                t[:, :, dst] = t[:, :, src]
        self.crop(-(added - len(rows)))
        self.version += 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise TokensiftError("beam search is not supported with a TokenCache; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is None:
            return
        for name in ("keys", "values", "pos"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))
        self.states = {k: t.repeat_interleave(repeats, dim=0) for k, t in self.states.items()}
        self.cache._account(self)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise TokensiftError("selecting batch rows of a TokenCache is not supported")

    # -- views ---------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def k(self) -> torch.Tensor:
        assert self.keys is not None
        return self.keys[..., : self.n, :]

    @property
    def v(self) -> torch.Tensor:
        assert self.values is not None
        return self.values[..., : self.n, :]

    @property
    def positions(self) -> torch.Tensor:
        assert self.pos is not None
        return self.pos[..., : self.n]

    def attention_keys(self) -> torch.Tensor:
        """Keys as attention must see them. Re-positioning methods store keys before RoPE and rotate
        them here to their cache index (G3-ii), so eviction never accumulates rotation error."""
        if self.cache.rope is None:
            return self.k
        return self.cache.rope.rotate(self.k)

    def state(self, name: str) -> torch.Tensor:
        """Per-token float state of a method (e.g. H2O's accumulated attention), zero for new tokens."""
        if name not in self.states:
            assert self.keys is not None
            b, h, cap = self.keys.shape[:3]
            self.states[name] = torch.zeros(b, h, cap, dtype=torch.float32, device=self.device)
            self.cache._account(self)
        return self.states[name][..., : self.n]

    def bias_columns(self, targets: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Additive logit columns (B, H_q, n) that put bias[h, p] on the slot holding original position
        targets[p] in query head h's KV head, wherever eviction left it; and whether every KV head
        still holds every target (an evicted target simply gets no bias). `bias` may also be
        (B, H_q, P): one bias per batch row."""
        pos = self.positions
        b, g, n = pos.shape
        hq, p = bias.shape[-2:]
        hit = pos.unsqueeze(-1) == targets.to(pos.device)  # (B, H_kv, n, P)
        complete = bool(hit.any(dim=2).all())
        grouped = bias.to(device=pos.device, dtype=torch.float32).expand(b, hq, p).reshape(b, g, hq // g, p)
        columns = torch.einsum("bgnp,bgrp->bgrn", hit.float(), grouped)
        return columns.reshape(b, hq, n), complete

    def nbytes(self) -> tuple[int, int]:
        """(bytes of K/V storage held, bytes of positions and method state held)."""
        kv = _nbytes(self.keys) + _nbytes(self.values)
        aux = _nbytes(self.pos) + sum(_nbytes(t) for t in self.states.values())
        return kv, aux

    # -- mutation ------------------------------------------------------------------------------------
    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        q = key_states.shape[-2]
        if self.cache.rope is not None:
            # Callers rotate new keys to position `next_position`, which is n for these methods.
            key_states = self.cache.rope.unrotate(key_states, self.n)
        if self.n == 0 and not self.states:
            # First fill (prefill): adopt the projected tensors, no copy and no headroom.
            b, h = key_states.shape[:2]
            self.keys, self.values = key_states, value_states
            self.pos = (
                torch.arange(self.seen, self.seen + q, device=key_states.device).expand(b, h, q).contiguous()
            )
            self.cache._account(self)
        else:
            # Appends write into the preallocated buffers; only a reallocation (`_reserve`, which
            # accounts for it) changes the bytes held, so a plain append does no bookkeeping.
            self._reserve(self.n + q)
            assert self.keys is not None and self.values is not None and self.pos is not None
            end = self.n + q
            self.keys[..., self.n : end, :] = key_states
            self.values[..., self.n : end, :] = value_states
            if q == 1:  # a decode step: one position, written as a scalar (no index tensor built)
                self.pos[..., self.n] = self.seen
            else:
                self.pos[..., self.n : end] = torch.arange(self.seen, self.seen + q, device=self.pos.device)
            for t in self.states.values():
                t[..., self.n : end] = 0
        self.n += q
        self.seen += q
        self.last_query_len = q

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        self._reallocate(_capacity(needed))

    def _reallocate(self, cap: int) -> None:
        assert self.keys is not None and self.values is not None
        b, h, _, d = self.keys.shape

        def grow(t: torch.Tensor | None, trailing: tuple[int, ...]) -> torch.Tensor | None:
            if t is None:
                return None
            out = torch.empty((b, h, cap, *trailing), dtype=t.dtype, device=t.device)
            out[:, :, : self.n] = t[:, :, : self.n]
            return out

        self.keys = grow(self.keys, (d,))
        self.values = grow(self.values, (d,))
        self.pos = grow(self.pos, ())
        self.states = {k: grow(t, ()) for k, t in self.states.items()}  # type: ignore[misc]
        self.cache._account(self)

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the given token slots, in order. `index` is (m,) for all heads or (B, H, m) per head."""
        assert self.keys is not None and self.values is not None and self.pos is not None
        m = index.shape[-1]
        if m >= self.n:
            return
        per_head = index.dim() == 3

        def take(t: torch.Tensor) -> torch.Tensor:
            live = t[:, :, : self.n]
            if not per_head:
                return live.index_select(2, index)
            if live.dim() == 4:
                return live.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, live.shape[-1]))
            return live.gather(2, index)

        kept = {
            "keys": take(self.keys),
            "values": take(self.values),
            "pos": take(self.pos),
        }
        states = {k: take(t) for k, t in self.states.items()}
        self.evicted += self.n - m
        self.n = m
        self.version += 1
        cap = self.capacity
        if not (m <= cap <= _capacity(m) + max(16, m // 32)):
            # Release memory: the kept tokens get a buffer sized for them.
            cap = _capacity(m)
            b, h, _, d = self.keys.shape
            self.keys = self.keys.new_empty((b, h, cap, d))
            self.values = self.values.new_empty((b, h, cap, d))
            self.pos = self.pos.new_empty((b, h, cap))
            self.states = {k: t.new_empty((b, h, cap)) for k, t in self.states.items()}
        for name, value in kept.items():
            if value is not None:
                getattr(self, name)[:, :, :m] = value
        for name, value in states.items():
            self.states[name][:, :, :m] = value
        self.cache._account(self)


class TokenCache(Cache):
    """A transformers Cache that runs a tokensift plan: pass it as `cache`/`past_key_values`.

    `prompt_tokens` fixes what a fractional budget is a fraction of; by default it is the length of
    the first forward (the prompt).
    """

    def __init__(self, model: Any, plan: Plan | Any = None, *, prompt_tokens: int | None = None):
        from tokensift.runtime.plan import Plan

        hf_model = getattr(model, "model", model) if not isinstance(model, torch.nn.Module) else model
        # The loaded-model handle: methods with calibration artefacts look them up by it.
        if isinstance(model, torch.nn.Module):
            from tokensift.models import Model

            name = getattr(hf_model.config, "_name_or_path", "") or hf_model.config.model_type
            model = Model(name=name, model=hf_model, tokenizer=None, source="in-memory")
        self.handle = model
        config = hf_model.config.get_text_config(decoder=True)
        _check_supported(config)
        self.plan = plan if isinstance(plan, Plan) else Plan.of(plan)
        self.num_layers = int(config.num_hidden_layers)
        self.rope = RopeTable(find_inv_freq(hf_model)) if self.plan.repositions else None
        self.prompt_tokens = prompt_tokens
        if prompt_tokens is not None:
            self.plan = self.plan.resolve(prompt_tokens)
        self._layer_bytes = [(0, 0)] * self.num_layers
        self.kv_bytes = self.aux_bytes = 0
        self.kv_bytes_peak = self.aux_bytes_peak = 0
        self.counters: dict[str, float] = {}
        self.notes: list[str] = []
        self.shared: dict[str, Any] = {}  # state methods share across layers (e.g. TidalDecode's selection)
        self.evicting = True  # False while appending tokens that must not trigger eviction (a question)
        # Called as observer(module, layer, query, keys, values, scale) before each layer's attention:
        # calibration searches use it to read the score slices they need.
        self.observer: Callable[..., None] | None = None
        super().__init__(layers=[TokenLayer(self, i) for i in range(self.num_layers)])

    @property
    def next_position(self) -> int:
        return self.layers[0].get_seq_length()

    @property
    def seen_tokens(self) -> int:
        return max(layer.seen for layer in self.layers)

    @property
    def tokens_held(self) -> list[int]:
        return [layer.n for layer in self.layers]

    @property
    def evicted(self) -> int:
        return sum(layer.evicted for layer in self.layers)

    def keep_recent(self, rows: list[int], added: int) -> None:
        """Keep only `rows` of the last `added` tokens in every layer (see `TokenLayer.keep_recent`)."""
        for layer in self.layers:
            layer.keep_recent(rows, added)

    def replace_layer(self, layer: Any) -> None:
        """Swap in a differently stored layer (e.g. ragged heads) holding the same tokens."""
        self.layers[layer.index] = layer
        self._account(layer)

    def note(self, message: str) -> None:
        """Record (once) that a method could not do what it was asked; generation stats carry it."""
        if message not in self.notes:
            self.notes.append(message)

    def count(self, name: str, value: float = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + value

    def _before_update(self, layer: TokenLayer, query_len: int) -> None:
        if not self.plan.resolved:
            self.prompt_tokens = query_len
            self.plan = self.plan.resolve(query_len)

    def _account(self, layer: TokenLayer) -> None:
        kv, aux = layer.nbytes()
        old_kv, old_aux = self._layer_bytes[layer.index]
        self._layer_bytes[layer.index] = (kv, aux)
        self.kv_bytes += kv - old_kv
        self.aux_bytes += aux - old_aux
        self.kv_bytes_peak = max(self.kv_bytes_peak, self.kv_bytes)
        self.aux_bytes_peak = max(self.aux_bytes_peak, self.aux_bytes)


def _check_supported(config: Any) -> None:
    layer_types = getattr(config, "layer_types", None) or []
    odd = sorted({t for t in layer_types if t != "full_attention"})
    if odd or (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)):
        kind = ", ".join(odd) if odd else "sliding_window"
        raise TokensiftError(
            f"{config.model_type} has {kind} layers, which tokensift's cache does not support yet "
            "(full-attention decoders such as Llama, Qwen2 and Mistral are supported)"
        )
