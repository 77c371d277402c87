"""The gathered sparse-attention path shared by the dynamic selection methods (Quest, TokenSelect,
TidalDecode, HiP).

A method picks the cache slots a decode query attends to, per KV head (one index row shared by the
query heads of a GQA group) or per query head. `sparse_attention` gathers exactly those K/V rows with
one `index_select` over the flattened cache buffer and runs one attention call over them (fused SDPA,
or two matmuls where SDPA is slow: see `attend`): the work skipped is real, never a mask over the
full cache. `Stopwatch` splits each layer-step's time into
selection and attention, and `record` writes what happened to the cache counters that land in
`GenerationStats.counters`:

    decode_layer_steps      layer-steps handled by the method (dense ones included)
    sparse_layer_steps      of those, the ones that attended a subset
    tokens_attended         tokens attended per query head, summed over layer-steps
    tokens_cached           tokens cached, summed over the same layer-steps
    selection_seconds       choosing tokens: bounds, scores, top-k, tree search, index building
    attention_seconds       the attention itself (gathered sparse, or dense where the method ran dense)
    selection_state_bytes   peak bytes of the method's own per-layer state (page summaries, key copies)

Mean tokens attended per layer-step is tokens_attended / decode_layer_steps.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tokensift.runtime.block_sparse import one_thread
from tokensift.runtime.rope import find_inv_freq
from tokensift.runtime.scores import active_bias, dense_attention

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer


# -- gathering ------------------------------------------------------------------------------------------
def _row_view(x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """x (B, H, n, D) as a (rows, D) view of its buffer, and the rows between consecutive heads.

    Cache layers hold K/V in (B, H, capacity, D) buffers and hand out the first n slots, so rows of one
    head are contiguous and heads sit `capacity` rows apart. None when the layout is anything else.
    """
    b, h, _, d = x.shape
    s0, s1, s2, s3 = x.stride()
    if s3 != 1 or s2 != d or s1 % d or (b > 1 and s0 != h * s1):
        return None
    per_head = s1 // d
    rows = b * h * per_head
    if x.storage_offset() + rows * d > x.untyped_storage().nbytes() // x.element_size():
        return None
    return x.as_strided((rows, d), (d, 1)), per_head


_BASES: dict[tuple[int, int, int, int, torch.device], torch.Tensor] = {}


def _base(b: int, g: int, h: int, per_head: int, device: torch.device) -> torch.Tensor:
    """First buffer row of the KV head read by each of the (B, G) index rows: (B, G, 1), cached."""
    key = (b, g, h, per_head, device)
    base = _BASES.get(key)
    if base is None:
        if len(_BASES) > 256:
            _BASES.clear()
        rows = torch.arange(b * g, device=device).view(b, g, 1)
        base = _BASES[key] = (rows // g * h + rows % g // (g // h)) * per_head
    return base


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x (B, H, n, D) at `index` (B, G, m): (B, G, m, D).

    G == H gathers per KV head; G == H * rep gathers per query head (query head g reads KV head
    g // rep, as transformers' repeat_kv does). One index_select over the flattened buffer, which on CPU
    is several times faster than torch.gather with an expanded index.
    """
    return gather_kv(x, None, index)[0]


def gather_kv(
    keys: torch.Tensor, values: torch.Tensor | None, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`gather` of keys and (optionally) values at the same slots, sharing one flat index."""
    b, h, n, d = keys.shape
    g, m = index.shape[1], index.shape[2]
    view = _row_view(keys)
    other = None if values is None else _row_view(values)
    if view is None or (values is not None and (other is None or other[1] != view[1])):
        # Unusual layout: gather from a (B, H, rep, n, D) expanded view, copying nothing.
        rep = g // h
        idx = index.reshape(b, h, rep, m, 1).expand(b, h, rep, m, d)

        def take(x: torch.Tensor) -> torch.Tensor:
            return x.unsqueeze(2).expand(b, h, rep, n, d).gather(3, idx).reshape(b, g, m, d)

        return take(keys), None if values is None else take(values)
    rows, per_head = view
    flat = (index + _base(b, g, h, per_head, keys.device)).view(-1)
    k = rows.index_select(0, flat).view(b, g, m, d)
    return k, None if other is None else other[0].index_select(0, flat).view(b, g, m, d)


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    valid: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One attention call of decode queries (B, H_q, 1, D) over gathered keys/values (B, G, m, D).

    With G KV heads the query heads of each group are packed as rows against their shared keys; with
    G == H_q every head has its own. `valid` (B, G, m) masks padding slots; `bias` (B, G, H_q/G, m)
    is added to the logits. Returns (B, H_q, 1, D).
    """
    b, hq, _, d = query.shape
    g = keys.shape[1]
    q = query.reshape(b, g, hq // g, d)
    mask = None if valid is None else valid.unsqueeze(2)
    if bias is not None:
        bias = bias.to(q.dtype)
        mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
    if g == hq and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        out = _one_row_attention(q, keys, values, scale, mask)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, 1, d)


def _one_row_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one query row per head (B, G, 1, D) as two batched matmuls around a float32
    softmax (logits in the tensors' dtype, as transformers' eager attention computes them). On CPU in
    bf16 this is the shape SDPA is slow at: qwen2.5-0.5b's 14 per-query-head rows over 1024 gathered
    keys took 1.6-2.1 ms per layer through SDPA against 0.2 ms this way (fp32 SDPA: 0.2 ms); calls
    that pack a GQA group's 7 query rows against shared keys are as fast either way and keep SDPA."""
    logits = (q @ keys.transpose(-1, -2)).float() * scale
    if mask is not None and mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        logits = logits + mask.float()
    return torch.softmax(logits, dim=-1).to(values.dtype) @ values


def sparse_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    scale: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one decode query over the slots `index` (B, G, m) only: gather, then one SDPA.

    An active key bias (`scores.key_bias`) is gathered at the same slots.
    """
    k, v = gather_kv(keys, values, index)
    assert v is not None
    columns = active_bias(keys.shape[2], query.shape[1])
    bias = None
    if columns is not None:
        b, hq, n = columns.shape
        g, m = index.shape[1], index.shape[2]
        if g == hq:
            bias = columns.gather(2, index).unsqueeze(2)
        else:
            rep = hq // g
            bias = columns.reshape(b, g, rep, n).gather(3, index.unsqueeze(2).expand(b, g, rep, m))
    return attend(query, k, v, scale, valid, bias)


def grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Decode queries (B, H_q, 1, D) as (B, H_kv, rep, D): the query heads of each GQA group as rows."""
    b, hq, _, d = query.shape
    return query.reshape(b, kv_heads, hq // kv_heads, d)


def expand_heads(index: torch.Tensor, heads: int) -> torch.Tensor:
    """One shared index row (B, m) as per-head rows (B, heads, m) without copying."""
    return index.unsqueeze(1).expand(index.shape[0], heads, index.shape[-1])


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dim (unordered: attention does not care)."""
    return scores.topk(k, dim=-1, sorted=False).indices


# Small ops on one thread (see block_sparse.one_thread): a sparse step is a few hundred gathered rows
# and one short attention, so a second thread saves little and, on a busy CPU, costs a lot.
single_thread = one_thread


# -- bookkeeping ----------------------------------------------------------------------------------------
class Stopwatch:
    """Wall time of a layer-step split into selection and attention (synchronising on accelerators)."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.selection = 0.0
        self.attention = 0.0
        self._t = self._now()

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def selected(self) -> None:
        now = self._now()
        self.selection += now - self._t
        self._t = now

    def attended(self) -> None:
        now = self._now()
        self.attention += now - self._t
        self._t = now


def record(layer: TokenLayer, watch: Stopwatch, attended: float, sparse: bool) -> None:
    """Counters of one decode layer-step (see the module docstring)."""
    count = layer.cache.count
    count("decode_layer_steps")
    count("tokens_attended", attended)
    count("tokens_cached", layer.n)
    count("selection_seconds", watch.selection)
    count("attention_seconds", watch.attention)
    if sparse:
        count("sparse_layer_steps")


def dense_step(
    layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Exact attention over the whole cache (the kernel dense decoding uses), counted as a dense step."""
    watch = Stopwatch(query.device)
    out = dense_attention(query, keys, values, scale)
    watch.attended()
    record(layer, watch, keys.shape[2], sparse=False)
    return out


def track_state_bytes(layer: TokenLayer, key: str, tensors: list[torch.Tensor | None]) -> None:
    """Report the bytes of a method's per-layer state as the gauge `selection_state_bytes` (peak)."""
    cache = layer.cache
    sizes: dict[tuple[str, int], int] = cache.shared.setdefault("selection_state_bytes", {})
    sizes[(key, layer.index)] = sum(t.untyped_storage().nbytes() for t in tensors if t is not None)
    total = sum(sizes.values())
    cache.counters["selection_state_bytes"] = max(cache.counters.get("selection_state_bytes", 0), total)


class GrowingRows:
    """A (B, H, capacity, D) buffer that gains rows at the end, growing geometrically (no per-step cat)."""

    def __init__(self, like: torch.Tensor, dtype: torch.dtype | None = None):
        b, h, _, d = like.shape
        self.data = like.new_empty((b, h, 0, d), dtype=dtype or like.dtype)
        self.n = 0

    def append(self, rows: torch.Tensor) -> None:
        need = self.n + rows.shape[2]
        if need > self.data.shape[2]:
            b, h, _, d = self.data.shape
            bigger = self.data.new_empty((b, h, need + max(16, need // 4), d))
            bigger[:, :, : self.n] = self.data[:, :, : self.n]
            self.data = bigger
        self.data[:, :, self.n : need] = rows
        self.n = need

    @property
    def live(self) -> torch.Tensor:
        return self.data[:, :, : self.n]


def rotary_frequencies(layer: TokenLayer) -> torch.Tensor | None:
    """The model's RoPE inverse frequencies (looked up once per cache), None if it has none usable."""
    cache = layer.cache
    if cache.rope is not None:
        return cache.rope.inv_freq
    if "inv_freq" not in cache.shared:
        try:
            cache.shared["inv_freq"] = find_inv_freq(cache.handle.model)
        except ValueError:
            cache.shared["inv_freq"] = None
    return cache.shared["inv_freq"]


def fresh_state(layer: TokenLayer, key: str, **identity: Any) -> dict[str, Any] | None:
    """The method state stored under `key` in layer.extra if it is still valid for the current slots.

    State derived from slots must be rebuilt whenever the cache moves them (eviction, crop, reset),
    which bumps `layer.version`; `identity` holds any other parameters the state depends on.
    """
    state = layer.extra.get(key)
    if state is None or state["version"] != layer.version or state["identity"] != identity:
        return None
    return state


def new_state(layer: TokenLayer, key: str, **identity: Any) -> dict[str, Any]:
    state: dict[str, Any] = {"version": layer.version, "identity": identity}
    layer.extra[key] = state
    return state


# -- pages (Quest) -----------------------------------------------------------------------------------
class PageSummary:
    """Per-channel max and min of the keys of every complete page of one layer, per KV head.

    Pages are consecutive runs of `page_size` cache slots. A page is summarised once, when it fills;
    the page still filling is never summarised (methods attend to it whole). `update` brings the
    summary up to date with the cache in O(new pages) work. Max and min sit side by side in one
    (B, H, pages, 2D) buffer so that one matmul scores every page (`page_scores`).
    """

    def __init__(self, keys: torch.Tensor, page_size: int):
        self.page_size = page_size
        b, h, _, d = keys.shape
        self.bounds = GrowingRows(keys.new_empty((b, h, 0, 2 * d)))

    @property
    def pages(self) -> int:
        return self.bounds.n

    @property
    def kmax(self) -> torch.Tensor:
        return self.bounds.live[..., : self.bounds.data.shape[-1] // 2]

    @property
    def kmin(self) -> torch.Tensor:
        return self.bounds.live[..., self.bounds.data.shape[-1] // 2 :]

    def update(self, keys: torch.Tensor, complete_pages: int) -> None:
        """Summarise pages [pages, complete_pages) of keys (B, H, n, D)."""
        first = self.pages
        if complete_pages <= first:
            return
        p = self.page_size
        block = keys[:, :, first * p : complete_pages * p].unflatten(2, (complete_pages - first, p))
        self.bounds.append(torch.cat([block.amax(dim=3), block.amin(dim=3)], dim=-1))

    def page_scores(self, query: torch.Tensor, pages: int) -> torch.Tensor:
        """`page_upper_bound` of query (B, H, r, D) for the first `pages` pages: (B, H, r, pages)."""
        signed = torch.cat([query.clamp(min=0), query.clamp(max=0)], dim=-1)
        return signed @ self.bounds.live[:, :, :pages].transpose(-1, -2)


def page_upper_bound(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest's bound U = sum_c max(q_c * max_c, q_c * min_c) >= q . k for every key k of the page.

    query (B, H, r, D), kmin/kmax (B, H, P, D) -> (B, H, r, P). Because max_c >= min_c, the larger
    product takes max_c where q_c >= 0 and min_c where q_c < 0, so U = q+ . max + q- . min: matmuls
    instead of a (r, P, D) elementwise tensor.
    """
    return query.clamp(min=0) @ kmax.transpose(-1, -2) + query.clamp(max=0) @ kmin.transpose(-1, -2)
