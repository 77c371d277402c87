"""Block-sparse prefill attention: each query block attends only to the keys gathered for it.

Shared by the sparse-prefill methods (A-shape, MInference, DHSA). A method picks, for every query
block of `block_size` rows and every *group* of query heads, the keys the block sees before its own
first row (`past`); the block's own keys (the diagonal block, under the causal mask) are always
added here. Then, with no per-token Python loop:

- the selected K/V rows of a chunk of blocks are gathered into one preallocated buffer (one
  `index_select` moves K and V together),
- one fused SDPA call computes the chunk: the blocks are SDPA's batch, the group's query heads its
  heads (views of q, no copy, GQA broadcasting the shared keys to them),
- blocks whose past list is full share one additive mask (causal inside the own block, plus the
  token-exact window for A-shape) broadcast without being materialised; only blocks with padding
  (too few distinct past keys) pay for a mask of their own.

Work is rows x selected keys, never rows x n, and no n x n score matrix is formed. Causality is by
shape as everywhere in the runtime: the L queries of a forward are the last L of the n keys. On CUDA
with Triton installed, one Triton kernel does the same without the gather buffer (end of file).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tokensift.runtime.scores import dense_attention

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenCache

# Elements of gathered K + V + scores per chunk of units (~96 MiB in float32): few, large fused calls
# (each call costs a thread wake-up on a busy CPU), in buffers reused across chunks.
CHUNK_ELEMENTS = 24 << 20


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed index computations on one thread. They are many small tensor ops, and on a
    busy CPU each multi-threaded op waits for its second thread to be scheduled: measured on the
    project's 2-core machine, the pattern indices of one 8K layer took 13-40 ms on one thread and
    0.1-0.6 s on two. The attention itself (few large ops) keeps every thread."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


@dataclass(frozen=True)
class Groups:
    """Query heads that share a selection: group g holds query heads `heads[g]`, all reading KV head
    `kv[g]`; a selection indexed by group applies to every head of the group."""

    heads: torch.Tensor  # (G, rep) long
    kv: torch.Tensor  # (G,) long

    @staticmethod
    def per_query_head(q_heads: torch.Tensor, n_rep: int) -> Groups:
        """One group per query head (MInference's per-head patterns)."""
        q_heads = q_heads.long()
        return Groups(q_heads[:, None], q_heads // n_rep)

    @staticmethod
    def per_kv_head(kv_heads: int, n_rep: int, device: torch.device | None = None) -> Groups:
        """One group per KV head holding all its query heads (a selection shared by all heads)."""
        heads = torch.arange(kv_heads * n_rep, device=device).view(kv_heads, n_rep)
        return Groups(heads, torch.arange(kv_heads, device=device))


def block_starts(length: int, n: int, start_row: int, block_size: int) -> torch.Tensor:
    """Absolute position of the first row of every query block from `start_row` on: (nq,)."""
    nq = -(-(length - start_row) // block_size)
    return n - length + start_row + torch.arange(nq) * block_size


def first_sparse_row(length: int, n: int, past_keys: int, block_size: int) -> int:
    """The first row whose query block starts at a multiple of `block_size` (blocks line up with the
    key blocks) with at least `past_keys` keys before it. Rows before it run dense: their causal
    prefix costs no more than a sparse block would."""
    offset = n - length
    first = -(-max(past_keys, offset) // block_size) * block_size
    return min(length, first - offset)


def diagonal_mask(block_size: int, window: int | None = None) -> torch.Tensor:
    """Additive mask (block_size, block_size) of a block's own keys: causal, optionally a window."""
    r = torch.arange(block_size)
    visible = r[None, :] <= r[:, None]
    if window is not None:
        visible &= r[:, None] - r[None, :] < window
    return torch.zeros(block_size, block_size).masked_fill_(~visible, float("-inf"))


def a_shape_past(firsts: torch.Tensor, sinks: int, local: int, n: int) -> torch.Tensor:
    """Past keys of each query block: sinks, then the window before the block; (nq, sinks + local - 1).

    Window slots holding a sink (or lying before key 0) and sink slots inside the block itself are
    padding (n), so no key appears twice and sinks stay visible to every row.
    """
    sink = torch.arange(sinks, device=firsts.device).expand(len(firsts), sinks)
    sink = sink.masked_fill(sink >= firsts[:, None], n)
    window = firsts[:, None] - local + 1 + torch.arange(local - 1, device=firsts.device)
    return torch.cat([sink, window.masked_fill(window < sinks, n)], dim=1)


@functools.cache
def a_shape_row_mask(sinks: int, local: int, block_size: int) -> torch.Tensor:
    """Additive mask by row within a block over [sinks | window | own block]: sinks always visible,
    window slot t (key first - local + 1 + t) visible to row r when t >= r, own keys causal in-window."""
    r = torch.arange(block_size)[:, None]
    window = torch.arange(local - 1)[None, :] >= r
    past = torch.cat([torch.ones(block_size, sinks, dtype=torch.bool), window], dim=1)
    mask = torch.zeros(block_size, sinks + local - 1).masked_fill_(~past, float("-inf"))
    return torch.cat([mask, diagonal_mask(block_size, local)], dim=1)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    past: torch.Tensor,
    groups: Groups,
    out: torch.Tensor,
    *,
    block_size: int,
    start_row: int,
    row_mask: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    kv: torch.Tensor | None = None,
) -> int:
    """Attention of rows `start_row..L` of the groups' query heads, written into `out` (B, H_q, L, D).

    q: (B, H_q, L, D); k, v: (B, H_kv, n, D). past: (B or 1, G or 1, nq, m) key indices per query
    block, each before the block's first row and distinct within a block, padded with n. The block's
    own keys are appended. row_mask: optional additive mask (block_size, m + block_size) by row within
    the block, shared by all blocks (default: past keys visible, own keys causal). Every row sees at
    least itself. Returns the (row, key) pairs computed, padding included. On CUDA with Triton
    installed and TOKENSIFT_TRITON=1 the Triton kernel runs instead; it takes the A-shape mask as
    `window` (sinks, local). `kv`: `key_values(k, v)` when several calls share a layer's keys.
    Under `metered`, adds the pairs computed and the causal pairs left out.
    """
    if METER.get() is not None:
        shown = row_mask if row_mask is not None else _plain_mask(block_size, past.shape[-1])
        skipped = skipped_rows(past, shown, k.shape[2], q.shape[2], start_row, block_size)
        g, rep = groups.heads.shape
        skipped = skipped.expand(q.shape[0], g, -1).repeat_interleave(rep, dim=1)
        mark_rows(q, groups.heads.flatten(), slice(start_row, start_row + skipped.shape[-1]), skipped)
    # The kernel is opt-in: it matches the engine in Triton's CPU interpreter (tests) but has not run
    # on a real GPU yet, and it knows no custom row mask other than the A-shape window.
    opted_in = os.environ.get("TOKENSIFT_TRITON") == "1" and (row_mask is None or window is not None)
    if q.is_cuda and opted_in and triton_usable(q, block_size):
        sinks, local = window if window is not None else (None, None)
        computed = triton_sparse_attention(
            q,
            k,
            v,
            scale,
            past,
            groups,
            out,
            block_size=block_size,
            start_row=start_row,
            sinks=sinks,
            window=local,
        )
        return count_pairs(computed)
    b, _, length, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g, rep = groups.heads.shape
    nq, m = past.shape[-2:]
    width = m + block_size
    device, dtype = q.device, q.dtype
    if row_mask is None:
        row_mask = _plain_mask(block_size, m)
    shared_mask = row_mask.to(device=device, dtype=dtype)

    span = nq * block_size
    stop_row = min(length, start_row + span)
    firsts = block_starts(length, n, start_row, block_size)[:nq].to(device)
    own = firsts[:, None] + torch.arange(block_size, device=device)
    # Row indices into K and V side by side (one gather moves both), for every (batch, group, block)
    # at once: few large ops, since every small parallel op costs a thread wake-up on a busy CPU.
    kv = key_values(k, v) if kv is None else kv
    base = (torch.arange(b, device=device)[:, None] * hkv + groups.kv[None, :].to(device)) * n
    rows_of = torch.cat([past.expand(b, g, nq, m), own.expand(b, g, nq, block_size)], dim=-1)
    rows_of = rows_of.clamp_(max=n - 1).add_(base[:, :, None, None]).view(b * g * nq, width)
    pad = (past >= n).expand(b, g, nq, m).reshape(b * g * nq, m)
    ragged = pad.any(dim=-1).tolist()
    chunk = max(1, CHUNK_ELEMENTS // (width * (2 * d + rep * block_size)))
    kvbuf = k.new_empty(min(chunk, b * g * nq), width, 2 * d)
    mask_buf = q.new_empty(kvbuf.shape[0], 1, block_size, width)

    def attend(units: slice, queries: torch.Tensor) -> torch.Tensor:
        """Attention of consecutive units (batch, group, block) on their gathered keys."""
        c = units.stop - units.start
        torch.index_select(kv, 0, rows_of[units].reshape(-1), out=kvbuf[:c].view(-1, 2 * d))
        if any(ragged[units]):
            # Blocks with too few distinct past keys: mask their padding slots.
            mask = mask_buf[:c]
            mask.copy_(shared_mask.expand(c, 1, block_size, width))
            mask[:, 0, :, :m].masked_fill_(pad[units][:, None, :], float("-inf"))
        else:
            mask = shared_mask.expand(c, 1, block_size, width)
        return F.scaled_dot_product_attention(
            queries,
            kvbuf[:c, None, :, :d],
            kvbuf[:c, None, :, d:],
            attn_mask=mask,
            scale=scale,
            enable_gqa=rep > 1,
        )  # (c, rep, block_size, D)

    heads = groups.heads.flatten()
    h0 = int(heads[0])
    consecutive = bool((heads == torch.arange(h0, h0 + len(heads), device=heads.device)).all())
    if rep == 1:
        # One query head per group: every (batch, head, block) is a unit of one flat batch.
        qs = q[:, h0 : h0 + g] if consecutive else q[:, heads]
        qs = qs[:, :, start_row:stop_row]
        if stop_row - start_row < span:
            qs = F.pad(qs, (0, 0, 0, span - (stop_row - start_row)))
        queries = qs.reshape(b * g * nq, 1, block_size, d)
        result = q.new_empty(b * g * nq, 1, block_size, d)
        for u0 in range(0, b * g * nq, chunk):
            units = slice(u0, min(b * g * nq, u0 + chunk))
            result[units] = attend(units, queries[units])
        rows = result.view(b, g, span, d)[:, :, : stop_row - start_row]
        if consecutive:
            out[:, h0 : h0 + g, start_row:stop_row] = rows
        else:
            out[:, heads, start_row:stop_row] = rows
        return count_pairs(b * g * nq * block_size * width)

    full_blocks = (stop_row - start_row) // block_size  # a partial last block is padded on its own
    for bi in range(b):
        for gi in range(g):
            group = groups.heads[gi]
            g0 = int(group[0])
            together = bool((group == torch.arange(g0, g0 + rep, device=group.device)).all())
            # The group's queries as (block, head, row, D): a view of q, no copy.
            qh = q[bi, g0 : g0 + rep] if together else q[bi, group]
            qg = qh[:, start_row : start_row + full_blocks * block_size]
            qg = qg.view(rep, full_blocks, block_size, d).transpose(0, 1)
            first_unit = (bi * g + gi) * nq
            spans = [
                (j0, min(full_blocks, j0 + chunk), qg[j0 : j0 + chunk]) for j0 in range(0, full_blocks, chunk)
            ]
            if full_blocks < nq:
                tail = F.pad(qh[:, start_row + full_blocks * block_size : stop_row], (0, 0, 0, block_size))
                spans.append((full_blocks, nq, tail[:, None, :block_size].transpose(0, 1)))
            for j0, j1, queries in spans:
                res = attend(slice(first_unit + j0, first_unit + j1), queries)
                r0 = start_row + j0 * block_size
                r1 = min(stop_row, start_row + j1 * block_size)
                if together and r1 - r0 == (j1 - j0) * block_size:
                    out[bi, g0 : g0 + rep, r0:r1].view(rep, j1 - j0, block_size, d).copy_(res.transpose(0, 1))
                else:
                    out[bi, group, r0:r1] = res.transpose(0, 1).reshape(rep, -1, d)[:, : r1 - r0]
    return count_pairs(b * g * nq * rep * block_size * width)


def key_values(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Keys and values side by side, one row per (batch, KV head, token): one gather moves both."""
    return torch.cat([k, v], dim=-1).view(-1, 2 * k.shape[-1])


@functools.cache
def _plain_mask(block_size: int, past: int) -> torch.Tensor:
    """Past keys visible, own keys causal: the mask of every pattern but A-shape."""
    return torch.cat([torch.zeros(block_size, past), diagonal_mask(block_size)], dim=1)


def causal_pairs(length: int, n: int, start: int = 0, stop: int | None = None) -> int:
    """(row, key) pairs dense causal attention evaluates for rows [start, stop) of an L-query forward."""
    stop = length if stop is None else stop
    offset = n - length
    # Row i sees offset + i + 1 keys.
    return (stop - start) * (offset + 1) + (start + stop - 1) * (stop - start) // 2


def dense_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    stop: int,
    heads: torch.Tensor | None = None,
) -> int:
    """Exact attention of rows [0, stop) of the forward into `out`, for all query heads or a subset;
    returns the (row, key) pairs computed."""
    if stop <= 0:
        return 0
    length, n = q.shape[2], k.shape[2]
    visible = n - length + stop
    if heads is None:
        out[:, :, :stop] = dense_attention(q[:, :, :stop], k[:, :, :visible], v[:, :, :visible], scale)
        count = q.shape[1]
    else:
        kv = heads // (q.shape[1] // k.shape[1])
        out[:, heads, :stop] = dense_attention(
            q[:, heads, :stop], k[:, kv, :visible], v[:, kv, :visible], scale
        )
        count = len(heads)
    mark_rows(q, heads, slice(0, stop))
    return count_pairs(q.shape[0] * count * causal_pairs(length, n, 0, stop))


def dense_tail_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    rows: int,
    heads: torch.Tensor | None = None,
) -> int:
    """Exact attention for the last `rows` queries of the forward (the instruction or question, which
    then sees every key), for all query heads or a subset, written into `out`; returns the pairs
    computed."""
    length, n = q.shape[2], k.shape[2]
    rows = min(rows, length)
    if rows <= 0:
        return 0
    if heads is None:
        out[:, :, length - rows :] = dense_attention(q[:, :, length - rows :], k, v, scale)
        count = q.shape[1]
    else:
        kv = heads // (q.shape[1] // k.shape[1])
        tail = q[:, heads, length - rows :]
        out[:, heads, length - rows :] = dense_attention(tail, k[:, kv], v[:, kv], scale)
        count = len(heads)
    mark_rows(q, heads, slice(length - rows, length))
    return count_pairs(q.shape[0] * count * causal_pairs(length, n, length - rows, length))


def blocks_before(stop: int, start_row: int, block_size: int) -> int:
    """Query blocks from `start_row` that hold a row before `stop` (the rows a dense tail leaves)."""
    return max(0, -(-(stop - start_row) // block_size))


# --- one layer's sparse prefill from its plan ------------------------------------------------------
# Every block-sparse prefill method builds the calls of a layer (which rows of which heads see which
# past keys) and hands them to `run_plan`, so rows before a call, heads no call serves and the dense
# tail are handled once, alike for all.


def tail_start(length: int, dense_tail: int) -> int:
    """First row of the dense tail: the last `dense_tail` queries of a forward attend to every key."""
    return length - min(max(0, dense_tail), length)


@dataclass(frozen=True)
class SparseCall:
    """One engine call of a layer's plan: rows from `start_row` (a block boundary) of the query heads
    `heads` (None: all) attend to their block's `past` keys and their own block, with `groups`,
    `row_mask` and `window` as in `sparse_attention`. Rows before `start_row` of those heads run
    dense (their causal prefix is no longer than a sparse block's keys)."""

    start_row: int
    past: torch.Tensor
    groups: Groups
    heads: torch.Tensor | None = None
    row_mask: torch.Tensor | None = None
    window: tuple[int, int] | None = None


def run_plan(
    cache: TokenCache,
    name: str,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    calls: list[SparseCall],
    block_size: int,
    dense_tail: int,
) -> torch.Tensor:
    """Attention output (B, H_q, L, D) of a sparse-prefill layer from its calls.

    The last `dense_tail` rows attend densely; calls are cut to the blocks holding a row before the
    tail, and a call with none left is dropped. Heads no remaining call serves run dense (noted),
    and with no call left the whole layer runs dense (noted: the method changed nothing here).
    """
    length, n, hq = query.shape[2], keys.shape[2], query.shape[1]
    out = query.new_empty(query.shape)
    stop = tail_start(length, dense_tail)
    calls = [c for c in calls if c.start_row < stop]
    if not calls:
        cache.note(
            f"{name}: every row of a {length}-token forward over {n} keys is covered by its dense "
            f"rows or the dense tail ({dense_tail}); attention ran dense"
        )
        dense_rows(query, keys, values, scale, out, length)
        return out
    if any(c.heads is None for c in calls):
        served = list(range(hq))
    else:
        served = sorted({h for c in calls for h in c.heads.tolist()})  # type: ignore[union-attr]
    dense_heads = [h for h in range(hq) if h not in served]
    if dense_heads:
        cache.note(
            f"{name}: {len(dense_heads)} of {hq} heads have no sparse row in a {length}-token forward "
            f"over {n} keys; those heads ran dense"
        )
        # Their tail rows come with everyone's below: one dense call over all heads gathers no keys.
        dense_rows(query, keys, values, scale, out, stop, torch.tensor(dense_heads, device=query.device))
    kv = key_values(keys, values) if len(calls) > 1 else None
    for c in calls:
        dense_rows(query, keys, values, scale, out, c.start_row, c.heads)
        sparse_attention(
            query,
            keys,
            values,
            scale,
            c.past[..., : blocks_before(stop, c.start_row, block_size), :],
            c.groups,
            out,
            block_size=block_size,
            start_row=c.start_row,
            row_mask=c.row_mask,
            window=c.window,
            kv=kv,
        )
    dense_tail_rows(query, keys, values, scale, out, length - stop)
    return out


# --- what a prefill forward computed ---------------------------------------------------------------
# The runtime meters each layer's sparse-prefill forward (`metered`); the functions of this module
# add what they compute, so every method built on them reports its work without counting it itself.


@dataclass
class PairMeter:
    """(row, key) pairs of one layer's prefill forward."""

    computed: int = 0  # pairs evaluated, padding slots included
    reported: int = 0  # skipped pairs reported through `count_pairs` (methods attending on their own)
    rows: torch.Tensor | None = None  # (B, H_q, L): causal pairs each row left out, as last written

    @property
    def skipped(self) -> int:
        """Pairs dense causal attention evaluates that no query attended to."""
        return self.reported + (0 if self.rows is None else int(self.rows.sum()))

    def mark(
        self, q: torch.Tensor, heads: torch.Tensor | None, rows: slice, skipped: torch.Tensor | int
    ) -> None:
        """Rows `rows` of `heads` (None: all) of the forward were (re)computed, leaving out `skipped`
        pairs each: a row written twice (a sparse block the dense tail overwrites) counts once."""
        if self.rows is None:
            self.rows = torch.zeros(q.shape[:3], dtype=torch.long, device=q.device)
        self.rows[:, slice(None) if heads is None else heads, rows] = skipped


METER: ContextVar[PairMeter | None] = ContextVar("tokensift_prefill_pairs", default=None)


def count_pairs(computed: int, skipped: int = 0) -> int:
    """Add to the pairs of the forward being metered (nothing when none is); returns `computed`.
    Methods that attend without this module's functions report their pairs here."""
    meter = METER.get()
    if meter is not None:
        meter.computed += computed
        meter.reported += skipped
    return computed


def mark_rows(
    q: torch.Tensor, heads: torch.Tensor | None, rows: slice, skipped: torch.Tensor | int = 0
) -> None:
    """`PairMeter.mark` on the forward being metered, if any."""
    meter = METER.get()
    if meter is not None:
        meter.mark(q, heads, rows, skipped)


@contextmanager
def counting() -> Iterator[PairMeter]:
    """Collect the pairs this module's functions compute inside the block."""
    meter = PairMeter()
    token = METER.set(meter)
    try:
        yield meter
    finally:
        METER.reset(token)


@contextmanager
def metered(cache: TokenCache, q: torch.Tensor, n: int) -> Iterator[PairMeter]:
    """Meter one layer's sparse-prefill forward of the L queries in `q` over `n` keys. Afterwards the
    cache counts `prefill_attention_pairs` (computed), `prefill_attention_pairs_dense` (what dense
    causal attention computes) and `prefill_attention_pairs_skipped`, and holds `prefill_density`
    (computed / dense over the generation so far)."""
    with counting() as meter:
        yield meter
    cache.count("prefill_attention_pairs", meter.computed)
    cache.count("prefill_attention_pairs_dense", q.shape[0] * q.shape[1] * causal_pairs(q.shape[2], n))
    cache.count("prefill_attention_pairs_skipped", meter.skipped)
    c = cache.counters
    c["prefill_density"] = c["prefill_attention_pairs"] / max(1, c["prefill_attention_pairs_dense"])


def skipped_rows(
    past: torch.Tensor, row_mask: torch.Tensor, n: int, length: int, start_row: int, block_size: int
) -> torch.Tensor:
    """Causal pairs each row of `sparse_attention`'s blocks leaves out: (B or 1, G or 1, rows) for rows
    [start_row, start_row + nq * block_size) of the forward, cut at its end. Past keys are distinct
    and before their block, so every (row, real key) pair the masks show is a causal pair."""
    nq, m = past.shape[-2:]
    stop_row = min(length, start_row + nq * block_size)
    shown = torch.isfinite(row_mask).to(device=past.device, dtype=torch.float32)
    real = (past < n).float()
    attended = real @ shown[:, :m].T + shown[:, m:].sum(-1)  # (B, G, nq, block_size)
    attended = attended.flatten(-2)[..., : stop_row - start_row].round().long()
    causal = n - length + 1 + torch.arange(start_row, stop_row, device=past.device)
    return causal - attended


# --- Triton kernel (GPUs; optional) -----------------------------------------------------------------
# The same computation as `sparse_attention` in one kernel: a program per (query block, query head)
# walks its block's key list (past keys, then its own block) in tiles, gathering K/V rows by index,
# with an online softmax, so nothing is gathered into memory first. Used for CUDA tensors when Triton
# is installed; tested on CPU in Triton's interpreter mode (TRITON_INTERPRET=1).


@functools.cache
def _triton_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        Q, K, V, Out, Idx, Heads, Groups_, scale,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
        sib, sig, siq, sim,
        n_keys, q_len, offset, start_row, width, n_rep, sinks, window,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, WINDOW: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        block = tl.program_id(0)
        h = tl.load(Heads + tl.program_id(1))
        g = tl.load(Groups_ + tl.program_id(1))
        b = tl.program_id(2)
        rows = start_row + block * BLOCK_M + tl.arange(0, BLOCK_M)
        pos = offset + rows
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(
            Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :] * sqd,
            mask=rows[:, None] < q_len,
            other=0.0,
        )
        kv_head = h // n_rep
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(0, width, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            ids = tl.load(Idx + b * sib + g * sig + block * siq + cols * sim, mask=cols < width, other=n_keys)
            real = ids < n_keys
            safe = tl.where(real, ids, 0)
            k = tl.load(
                K + b * skb + kv_head * skh + safe[:, None] * skn + dims[None, :] * skd,
                mask=real[:, None],
                other=0.0,
            )
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            seen = real[None, :] & (ids[None, :] <= pos[:, None])
            if WINDOW:
                seen = seen & ((ids[None, :] < sinks) | (pos[:, None] - ids[None, :] < window))
            qk = tl.where(seen, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(qk - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            v = tl.load(
                V + b * svb + kv_head * svh + safe[:, None] * svn + dims[None, :] * svd,
                mask=real[:, None],
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            Out + b * sob + h * soh + rows[:, None] * som + dims[None, :] * sod,
            out.to(Out.dtype.element_ty),
            mask=rows[:, None] < q_len,
        )

    return kernel


def triton_usable(q: torch.Tensor, block_size: int) -> bool:
    """Whether the Triton kernel can run these shapes here (CUDA, or Triton's interpreter)."""
    d = q.shape[-1]
    power = block_size >= 16 and block_size & (block_size - 1) == 0 and d in (16, 32, 64, 128)
    if not power:
        return False
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    past: torch.Tensor,
    groups: Groups,
    out: torch.Tensor,
    *,
    block_size: int,
    start_row: int,
    sinks: int | None = None,
    window: int | None = None,
) -> int:
    """`sparse_attention` as one Triton kernel launch (same arguments; a sink + window mask replaces
    `row_mask`). Returns the (row, key) pairs computed."""
    b, hq, length, d = q.shape
    n = k.shape[2]
    g, rep = groups.heads.shape
    nq, m = past.shape[-2:]
    firsts = block_starts(length, n, start_row, block_size)[:nq].to(q.device)
    own = firsts[:, None] + torch.arange(block_size, device=q.device)
    index = torch.cat([past, own.expand(*past.shape[:2], nq, block_size)], dim=-1).contiguous()
    heads = groups.heads.flatten().to(device=q.device, dtype=torch.int32)
    group_of = torch.arange(g, device=q.device, dtype=torch.int32).repeat_interleave(rep)
    if past.shape[1] == 1:
        group_of = torch.zeros_like(group_of)
    istr = list(index.stride())
    if index.shape[0] == 1:
        istr[0] = 0
    kernel = _triton_kernel()
    kernel[(nq, len(heads), b)](
        q, k, v, out, index, heads, group_of, scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *istr,
        n, length, n - length, start_row, m + block_size, hq // k.shape[1],
        sinks or 0, window or 0,
        BLOCK_M=block_size, BLOCK_N=32, HEAD_DIM=d, WINDOW=window is not None,
        # float32 products in full precision: Triton's default (TF32 on Ampere and later) measured
        # 2.7e-3 max abs error against the engine on an H200; half types ignore the setting.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return b * g * nq * rep * block_size * (m + block_size)
