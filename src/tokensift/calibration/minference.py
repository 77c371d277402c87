"""`tokensift calibrate minference`: MInference's offline, kernel-aware per-head pattern search.

The model reads one long prompt with exact attention. In every layer, each candidate pattern is
built by the same index code the runtime kernel uses (so what is scored is what will run) at one
matched cost, `budget` keys per query row, and scored by recall: the share of each head's exact
attention mass that falls on the keys the pattern lets a row see, averaged over rows from
`min_row` on. Each head keeps its best candidate. As in the reference search, the prompt is an
InfiniteBench-style KV-retrieval example (generated here with seeded random UUIDs), and the
candidates are A-shape, vertical-slash at several slash counts, and block-sparse.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tokensift.calibration import Calibrator
from tokensift.errors import TokensiftError
from tokensift.methods.a_shape import a_shape_dense_rows
from tokensift.methods.base import SparsePrefillMethod
from tokensift.methods.minference import (
    block_sparse_past,
    last_query_probs,
    slash_bands,
    vertical_slash_past,
)
from tokensift.models import Model
from tokensift.runtime import block_sparse as bsa
from tokensift.runtime.block_sparse import a_shape_past, a_shape_row_mask
from tokensift.runtime.scores import dense_attention

SINKS = 128  # A-shape candidate sinks (MInference default n_init)
SLASHES = (100, 200, 400, 800)  # vertical-slash candidates: slash counts; verticals fill the budget
ROW_CHUNK = 128  # query rows per exact-attention chunk in the search


@dataclass(frozen=True)
class Candidate:
    """One pattern to score. For vertical-slash `a` (verticals) is set per head to fill the budget."""

    kind: str
    a: int
    b: int

    @property
    def label(self) -> str:
        return (
            f"{self.kind}({self.a},{self.b})"
            if self.kind != "vertical_slash"
            else f"vertical_slash(*,{self.b})"
        )


def candidates(budget: int, block_size: int) -> list[Candidate]:
    """Candidates at the same cost: `budget` keys per query row (own block included)."""
    out = [Candidate("a_shape", SINKS, budget - SINKS)] if budget > SINKS + block_size else []
    out += [Candidate("vertical_slash", 0, s) for s in SLASHES if s < budget]
    out.append(Candidate("block_sparse", max(1, budget // block_size), 0))
    return out


def pattern_recall(
    probs_rows: torch.Tensor,
    row_start: int,
    past: torch.Tensor,
    first_row: int,
    block_size: int,
    row_mask: torch.Tensor | None,
    n: int,
) -> torch.Tensor:
    """Attention mass each row keeps under a pattern: (H, rows). probs_rows: exact softmax rows
    (H, rows, n) of forward rows row_start.., a multiple of block_size past `first_row`; past: (H or 1,
    nq, m) past keys of the blocks from `first_row`. Rows before `first_row` run dense: recall 1."""
    h, rows, _ = probs_rows.shape
    device = probs_rows.device
    out = torch.ones(h, rows, dtype=probs_rows.dtype, device=device)
    skip = max(0, first_row - row_start)
    if skip >= rows:
        return out
    j0 = (row_start + skip - first_row) // block_size
    blocks = -(-(rows - skip) // block_size)
    m = past.shape[-1]
    firsts = first_row + (j0 + torch.arange(blocks, device=device)) * block_size  # the prompt has no offset
    return_rows = blocks * block_size
    p = torch.nn.functional.pad(probs_rows[:, skip:], (0, 0, 0, return_rows - (rows - skip)))
    p = p.view(h, blocks, block_size, n)
    chunk_past = past[..., j0 : j0 + blocks, :].to(device).expand(h, blocks, m)
    own = firsts[:, None] + torch.arange(block_size, device=device)
    ids = torch.cat([chunk_past, own.expand(h, blocks, block_size)], dim=-1)
    visible = (ids < n)[:, :, None, :].expand(h, blocks, block_size, m + block_size).clone()
    if row_mask is None:
        row_mask = torch.cat([torch.zeros(block_size, m), bsa.diagonal_mask(block_size)], dim=1)
    visible &= (row_mask.to(device) == 0)[None, None]
    gathered = p.gather(-1, ids.clamp(max=n - 1)[:, :, None, :].expand(h, blocks, block_size, m + block_size))
    kept = (gathered * visible).sum(-1).view(h, return_rows)[:, : rows - skip]
    out[:, skip:] = kept
    return out


def search_layer(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    *,
    budget: int,
    block_size: int = 64,
    min_row: int = 0,
    last_q: int = 64,
    vertical_sinks: int = 30,
    recent_slashes: int = 100,
) -> tuple[list[Candidate], torch.Tensor, list[tuple[str, int, int]]]:
    """Score every candidate on every head of one layer (batch of one prompt, queries = all keys).

    Returns the candidates, their recall (H_q, candidates; -1 where a candidate cannot meet the
    budget) and each head's best pattern as (kind, a, b) with the verticals resolved.
    """
    _, hq, length, _ = query.shape
    n = keys.shape[2]
    if length != n:
        raise TokensiftError("the pattern search needs the whole prompt in one forward")
    cands = candidates(budget, block_size)
    probs = last_query_probs(query, keys, scale, min(last_q, length))
    built: list[tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []  # first, past, mask, ok
    verticals: dict[int, torch.Tensor] = {}
    for ci, cand in enumerate(cands):
        ok = torch.ones(hq, dtype=torch.bool, device=query.device)
        if cand.kind == "a_shape":
            first = a_shape_dense_rows(length, n, cand.a, cand.b)
            firsts = bsa.block_starts(length, n, first, block_size).to(query.device)
            past = a_shape_past(firsts, cand.a, cand.b, n)[None]
            mask = a_shape_row_mask(cand.a, cand.b, block_size)
        elif cand.kind == "block_sparse":
            first = bsa.first_sparse_row(length, n, (cand.a - 1) * block_size, block_size)
            past = block_sparse_past(query, keys, first, cand.a, block_size)[0]
            mask = None
        else:
            slash = torch.full((hq,), cand.b, device=query.device)
            bands = slash_bands(probs, slash, block_size=block_size, recent_slashes=recent_slashes)[0].sum(-1)
            vert = budget - block_size - bands
            ok = vert >= vertical_sinks
            verticals[ci] = vert.clamp(min=vertical_sinks)
            first = bsa.first_sparse_row(length, n, 0, block_size)
            past = vertical_slash_past(
                probs,
                bsa.block_starts(length, n, first, block_size),
                verticals[ci],
                slash,
                block_size=block_size,
                vertical_sinks=vertical_sinks,
                recent_slashes=recent_slashes,
            )[0]
            mask = None
        built.append((first, past, mask, ok))

    # Exact attention rows, chunk by chunk, scored against every candidate.
    b, hkv, d = query.shape[0], keys.shape[1], query.shape[-1]
    total = torch.zeros(hq, len(cands), dtype=torch.float64, device=query.device)
    start = min_row // block_size * block_size
    kt = keys.unsqueeze(2).transpose(-1, -2)
    for r0 in range(start, length, ROW_CHUNK):
        r1 = min(length, r0 + ROW_CHUNK)
        qg = query[:, :, r0:r1].reshape(b, hkv, hq // hkv, r1 - r0, d)
        logits = torch.matmul(qg, kt).float().mul_(scale).reshape(hq, r1 - r0, n)
        future = (
            torch.arange(n, device=query.device)[None, :] > torch.arange(r0, r1, device=query.device)[:, None]
        )
        probs_rows = torch.softmax(logits.masked_fill_(future, float("-inf")), dim=-1)
        for ci, (first, past, mask, _) in enumerate(built):
            kept = pattern_recall(probs_rows, r0, past, first, block_size, mask, n)
            lo = max(0, min_row - r0)
            total[:, ci] += kept[:, lo:].double().sum(-1)
    recall = (total / max(1, length - min_row)).float()
    for ci, (_, _, _, ok) in enumerate(built):
        recall[~ok, ci] = -1.0

    best = recall.argmax(dim=-1)
    chosen = []
    for head in range(hq):
        cand = cands[int(best[head])]
        a = int(verticals[int(best[head])][head]) if cand.kind == "vertical_slash" else cand.a
        chosen.append((cand.kind, a, cand.b))
    return cands, recall.cpu(), chosen


@dataclass
class PatternSearch(SparsePrefillMethod):
    """Runs the search in every layer while the forward itself uses exact attention (not registered:
    it is the calibration, not a method)."""

    name: ClassVar[str] = "minference_search"

    budget: int = 1024
    block_size: int = 64
    min_row: int = 0
    results: dict[int, tuple[list[Candidate], torch.Tensor, list[tuple[str, int, int]]]] = field(
        default_factory=dict, repr=False
    )

    def prefill_attention(self, layer: Any, query: Any, keys: Any, values: Any, scale: float) -> torch.Tensor:
        self.results[layer.index] = search_layer(
            query, keys, scale, budget=self.budget, block_size=self.block_size, min_row=self.min_row
        )
        return dense_attention(query, keys, values, scale)


def kv_retrieval_prompt(model: Model, length: int, seed: int) -> list[int]:
    """An InfiniteBench kv_retrieval-style prompt of about `length` tokens (chat template included):
    a JSON object of random UUID pairs and the question for one key's value."""
    from tokensift.runtime.generate import encode

    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []

    def render(count: int) -> str:
        while len(pairs) < count:
            pairs.append((str(uuid.UUID(int=rng.getrandbits(128))), str(uuid.UUID(int=rng.getrandbits(128)))))
        chosen = pairs[count // 2]
        body = json.dumps(dict(pairs[:count]), indent=0)
        return (
            "Extract the value corresponding to the specified key in the JSON object below.\n\n"
            f'JSON data:\n{body}\n\nKey: "{chosen[0]}"\nThe value associated with the specified key is: '
        )

    lo, hi = 1, max(2, length // 20)
    while len(encode(model, render(hi))) < length:
        hi *= 2
    while lo < hi:  # the most pairs that fit
        mid = (lo + hi + 1) // 2
        if len(encode(model, render(mid))) <= length:
            lo = mid
        else:
            hi = mid - 1
    return encode(model, render(lo))


def austen_prompt(model: Model, length: int, seed: int) -> list[int]:
    from tokensift.bench.corpora import austen_text

    assert model.tokenizer is not None
    text = austen_text()
    start = random.Random(seed).randrange(len(text) // 2)
    return list(
        model.tokenizer(text[start : start + length * 8], add_special_tokens=False)["input_ids"][:length]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--length", type=int, default=0, help="prompt tokens (default: min(8192, context))")
    parser.add_argument("--budget", type=int, default=1024, help="keys per query row every candidate gets")
    parser.add_argument("--text", choices=["kv_retrieval", "austen"], default="kv_retrieval")
    parser.add_argument("--min-row", type=int, default=-1, help="first row scored (default: length / 4)")
    parser.add_argument("--seed", type=int, default=0)


def run(model: Model, args: argparse.Namespace) -> dict[str, Any]:
    from tokensift.runtime.cache import TokenCache
    from tokensift.runtime.generate import forward

    if args.length < 0 or args.length > (model.context_length or args.length):
        raise TokensiftError(
            f"--length must lie in [1, {model.context_length}] ({model.name}'s context; 0 picks "
            f"min(8192, context)), got {args.length}"
        )
    length = args.length or min(8192, model.context_length or 8192)
    if args.budget < 128:
        raise TokensiftError(f"--budget must be at least 128 keys, got {args.budget}")
    make = kv_retrieval_prompt if args.text == "kv_retrieval" else austen_prompt
    ids = make(model, length, args.seed)
    min_row = args.min_row if args.min_row >= 0 else len(ids) // 4
    search = PatternSearch(budget=args.budget, min_row=min_row)
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = TokenCache(model, search)
        forward(model, torch.tensor([ids], device=model.device), cache)
    seconds = time.perf_counter() - t0
    layers = [search.results[i] for i in range(model.num_layers)]
    cands = layers[0][0]
    patterns = [
        [[kind, a, b, round(float(recall[h].max()), 4)] for h, (kind, a, b) in enumerate(chosen)]
        for _, recall, chosen in layers
    ]
    counts: dict[str, int] = {}
    for row in patterns:
        for entry in row:
            counts[entry[0]] = counts.get(entry[0], 0) + 1
    mean = torch.stack([recall.max(dim=-1).values for _, recall, _ in layers]).mean()
    print(f"minference search: {len(ids)} tokens, {seconds:.0f} s, patterns {counts}, mean recall {mean:.3f}")
    return {
        "patterns": patterns,
        "budget": args.budget,
        "block_size": 64,
        "length": len(ids),
        "text": args.text,
        "seed": args.seed,
        "min_row": min_row,
        "candidates": [c.label for c in cands],
        "candidate_recall": [
            [[round(float(x), 4) for x in row] for row in recall] for _, recall, _ in layers
        ],
        "pattern_counts": counts,
        "mean_recall": round(float(mean), 4),
        "search_seconds": round(seconds, 1),
    }


CALIBRATOR = Calibrator(
    name="minference",
    help="per-head sparse pattern search (attention recall at matched cost) for minference",
    add_arguments=add_arguments,
    run=run,
    keys=("patterns",),
)
