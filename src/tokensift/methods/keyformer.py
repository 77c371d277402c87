"""Keyformer: key tokens chosen by Gumbel-noised attention logits, plus a recent window."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import Budget, register
from tokensift.methods.h2o import H2O

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer

DEFAULT_STEPS = 128  # temperature schedule length when the generation length is unknown
# Rows of one chunk of logits are noised this many elements at a time, so that the dozen passes of
# hashing run on cached data (noising a whole 16 MiB chunk of the scoring path at once ran about 2x
# slower on one core here).
NOISE_BLOCK_ELEMENTS = 1 << 18
_MASK32 = 0xFFFFFFFF
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B  # lowbias32 (C. Wellons, hash-prospector)


def mix32(x: int) -> int:
    """lowbias32 on a Python int: the reference for `_mix` (a bijection of 32-bit words)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MIX1) & _MASK32
    x ^= x >> 15
    x = (x * _MIX2) & _MASK32
    return x ^ (x >> 16)


def _signed(c: int) -> int:
    return c - (1 << 32) if c >= 1 << 31 else c


def _mix(x: torch.Tensor, final: bool = True) -> torch.Tensor:
    """`mix32` on an int32 tensor, in place (int32 products wrap; shifts are made logical by masks).

    Without `final` the last xorshift is skipped: it only folds the high bits into the low ones, and
    the uniforms below read the high bits."""
    x ^= (x >> 16) & 0xFFFF
    x *= _signed(_MIX1)
    x ^= (x >> 15) & 0x1FFFF
    x *= _signed(_MIX2)
    if final:
        x ^= (x >> 16) & 0xFFFF
    return x


@dataclass(frozen=True)
class CounterNoise:
    """Gumbel noise as a hash of its coordinates: no generator state, the same draw for the same cell.

    The Exp(1) draw of logit (batch b, query head h, query slot i, key slot j) in forward `step` of
    layer `layer` is -log(u), u the top 23 bits of lowbias32(row(seed, layer, step, b, h, i) xor
    column(j)) mapped into (0, 1): two independently mixed 32-bit words, mixed again per cell. Query
    slots follow from a chunk's shape (its rows are the last queries of its visible keys), so the
    draws do not depend on how the scoring path chunks the rows, and cost a dozen vectorised integer
    passes instead of a serial generator."""

    seed: int
    layer: int = 0
    step: int = 0

    def row_keys(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """int32 keys of the flattened rows of logits (B, ..., rows, visible): heads x query slots."""
        *lead, rows, visible = shape
        heads = math.prod(lead)
        base = mix32(mix32(mix32(self.seed) ^ self.layer) + self.step)
        h = _mix(torch.arange(heads, dtype=torch.int32, device=device) ^ _signed(base))
        q = torch.arange(visible - rows, visible, dtype=torch.int32, device=device)
        return _mix((h[:, None] ^ _signed(mix32(base + 1))) + _mix(q ^ _signed(mix32(base + 2)))[None, :])

    def column_keys(self, visible: int, device: torch.device) -> torch.Tensor:
        return _mix(torch.arange(visible, dtype=torch.int32, device=device) ^ _signed(mix32(self.seed + 3)))

    @staticmethod
    def cell_words(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The high 23 bits of every (row key, column key) cell's hash, signed: -2^22 .. 2^22 - 1."""
        return _mix(rows[:, None] ^ columns[None, :], final=False) >> 9

    @staticmethod
    def log_uniform(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """log u, u in [2^-24, 1 - 2^-24] uniform on a 2^-23 grid, for every (row key, column key)."""
        u = CounterNoise.cell_words(rows, columns).float()
        return u.mul_(2.0**-23).add_(0.5 + 2.0**-24).log_()

    def exponential(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Exp(1) draws for every cell of logits of this shape (tests and small shapes)."""
        rows = self.row_keys(shape, device).reshape(-1)
        return self.log_uniform(rows, self.column_keys(shape[-1], device)).neg_().reshape(shape)


def gumbel_softmax_scores(logits: torch.Tensor, tau: float, noise: CounterNoise | None) -> torch.Tensor:
    """softmax((x + zeta) / tau) with zeta ~ Gumbel(0, 1) (no noise when `noise` is None).

    Gumbel noise is -log(E) with E ~ Exp(1) = -log(u), so exp((x + zeta) / tau) = exp(x / tau) *
    E^(-1/tau): at tau = 1, the prompt's temperature, the weights are softmax(x) / log(u) up to the
    sign, which the row normalisation cancels. This runs on every prompt logit, so it goes through
    the rows a cache-sized block at a time. Masked logits (-inf) stay masked."""
    if noise is None:
        return torch.softmax(logits / tau, dim=-1)
    visible = logits.shape[-1]
    flat = logits.reshape(-1, visible)
    out = torch.empty_like(flat)
    rows = noise.row_keys(logits.shape, logits.device).reshape(-1)
    columns = noise.column_keys(visible, logits.device)
    step = max(1, NOISE_BLOCK_ELEMENTS // visible)
    for s in range(0, flat.shape[0], step):
        e = min(flat.shape[0], s + step)
        log_u = CounterNoise.log_uniform(rows[s:e], columns)
        block = out[s:e]
        if tau == 1.0:
            torch.div(torch.softmax(flat[s:e], dim=-1), log_u, out=block)  # -softmax / E
        else:
            torch.mul(torch.softmax(flat[s:e] / tau, dim=-1), log_u.neg_().pow_(-1.0 / tau), out=block)
        block.div_(block.sum(dim=-1, keepdim=True))
    return out.reshape(logits.shape)


@register
@dataclass
class Keyformer(H2O):
    """Keep the recent window plus "key tokens" ranked by accumulated Gumbel-softmax logit scores.

    Every query's masked, scaled logits get Gumbel noise and a temperature (rising linearly from
    `tau_init` to `tau_end` over the generation); the resulting softmax scores are summed per key
    over every query, the prompt's included (chunked, never the full matrix). The attention output
    itself uses the plain softmax. Whenever a layer holds more than the budget fixed from the prompt,
    it keeps the last `recent_fraction` of the budget plus the top-scoring rest: H2O's machinery with
    Gumbel-softmax scores, so with `noise=false` and tau 1 the selection is exactly H2O's. GQA:
    scores are averaged over each KV head's group.
    The noise is a hash of (seed, layer, forward, head, query slot, key slot) (`CounterNoise`), so
    runs repeat exactly, whatever the chunking, and it costs vectorised integer passes, not a serial
    generator.

    Based on Adnan et al., "Keyformer: KV Cache Reduction through Key Tokens Selection for
    Efficient Generative Inference", MLSys 2024.

    Parameters
    ----------
    budget:
        Tokens kept per KV head: an int count or a fraction of the prompt (paper: 0.5-0.6).
    recent_fraction:
        Share of the budget for the recent window (paper: 0.3).
    tau_init, tau_end:
        Gumbel-softmax temperature at the prompt and after the last generated token (paper: 1, 2).
    noise:
        Add Gumbel noise (paper: true).
    seed:
        Seed of the noise.
    steps:
        Length of the temperature schedule; 0 means the generation's max_new_tokens.
    """

    name = "keyformer"
    paper = "Adnan et al., Keyformer: KV Cache Reduction through Key Tokens Selection, MLSys 2024"
    needs_colsums = True

    budget: Budget = 0.5
    recent_fraction: float = 0.3
    tau_init: float = 1.0
    tau_end: float = 2.0
    noise: bool = True
    seed: int = 0
    steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau_init <= 0 or self.tau_end <= 0:
            raise TokensiftError(
                f"keyformer temperatures must be > 0, got {self.tau_init} and {self.tau_end}"
            )
        if self.steps < 0:
            raise TokensiftError(f"keyformer steps must be >= 0, got {self.steps}")

    def temperature(self, t: int, steps: int) -> float:
        """tau_t = tau_init + t * (tau_end - tau_init) / steps, t counting forwards after the prompt."""
        return self.tau_init + t * (self.tau_end - self.tau_init) / steps

    def column_scores(self, layer: TokenLayer) -> Callable[[torch.Tensor], torch.Tensor]:
        cache = layer.cache
        steps = self.steps or cache.shared.get("max_new_tokens") or 0
        if not steps:
            cache.note(
                f"keyformer: generation length unknown, temperature schedule spans {DEFAULT_STEPS} steps"
            )
            steps = DEFAULT_STEPS
        tau = self.temperature(layer.extra.get("keyformer_step", 0), steps)
        noise = None
        if self.noise:
            noise = CounterNoise(self.seed, layer.index, layer.extra.get("keyformer_step", 0))
        return lambda logits: gumbel_softmax_scores(logits, tau, noise)

    def observe(
        self, layer: TokenLayer, query: torch.Tensor, colsum: torch.Tensor | None, scale: float
    ) -> None:
        super().observe(layer, query, colsum, scale)
        layer.extra["keyformer_step"] = layer.extra.get("keyformer_step", 0) + 1
