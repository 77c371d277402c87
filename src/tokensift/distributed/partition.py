"""The load-balanced ("zigzag") split of a causal sequence across P ranks.

The sequence is cut into 2P contiguous chunks and rank r holds chunks r and 2P-1-r, so every rank
gets one early and one late chunk: under a causal mask each rank then has the same amount of work
(the partition TokenRing and ring-flash-attention's zigzag schedule use). Lengths that do not divide
by 2P give the first `n mod 2P` chunks one token more. Everything here is a pure function of (n, P):
every rank derives every other rank's positions and message sizes without asking.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from tokensift.errors import TokensiftError


@lru_cache(maxsize=64)
def chunk_bounds(n: int, parts: int) -> tuple[int, ...]:
    """Start offsets of the 2P chunks plus n at the end."""
    chunks = 2 * parts
    if n < chunks:
        raise TokensiftError(
            f"a prompt of {n} tokens cannot be split over {parts} ranks: context parallelism needs at "
            f"least {chunks} tokens (two chunks per rank)"
        )
    base, extra = divmod(n, chunks)
    bounds = [0]
    for c in range(chunks):
        bounds.append(bounds[-1] + base + (1 if c < extra else 0))
    return tuple(bounds)


def rank_positions(n: int, parts: int, rank: int) -> torch.Tensor:
    """The sorted absolute positions rank `rank` holds: chunk r then chunk 2P-1-r."""
    b = chunk_bounds(n, parts)
    front, back = rank, 2 * parts - 1 - rank
    return torch.cat([torch.arange(b[front], b[front + 1]), torch.arange(b[back], b[back + 1])])


def rank_length(n: int, parts: int, rank: int) -> int:
    b = chunk_bounds(n, parts)
    back = 2 * parts - 1 - rank
    return (b[rank + 1] - b[rank]) + (b[back + 1] - b[back])


def first_position(n: int, parts: int, rank: int) -> int:
    """The earliest position a rank holds (the start of its front chunk)."""
    return chunk_bounds(n, parts)[rank]


def visible_rows(n: int, parts: int, source: int, dest: int) -> int:
    """Index of the first of `source`'s query rows that sees any key of `dest` (a suffix of its rows).

    Rows before it would attend to nothing on `dest`, so they are never sent there: with the zigzag
    split this is either 0 (all rows) or the start of the back chunk (half the rows).
    """
    pos = rank_positions(n, parts, source)
    return int(torch.searchsorted(pos, first_position(n, parts, dest)))


def owner_of(position: int, n: int, parts: int) -> int:
    """The rank holding a prompt position."""
    b = chunk_bounds(n, parts)
    chunk = int(torch.searchsorted(torch.tensor(b[1:]), position, right=True))
    return chunk if chunk < parts else 2 * parts - 1 - chunk
