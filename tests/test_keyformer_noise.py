"""Keyformer's counter-based Gumbel noise: Exp(1) marginals, independence, seeding, chunk invariance."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tokensift.methods.keyformer import CounterNoise, _mix, gumbel_softmax_scores, mix32
from tokensift.runtime.scores import attention_with_colsums

SHAPE = torch.Size([1, 2, 3, 64, 512])  # (B, H_kv, n_rep, query rows, visible keys): 196,608 draws


def draws(seed: int = 0, layer: int = 0, step: int = 0, shape: torch.Size = SHAPE) -> torch.Tensor:
    return CounterNoise(seed, layer, step).exponential(shape, torch.device("cpu")).double()


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_int32_mix_matches_the_32_bit_reference() -> None:
    """The tensor hash relies on int32 products wrapping; a platform where they do not fails here."""
    words = [0, 1, 2, 3, 255, 65535, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF, 0x9E3779B9]
    signed = torch.tensor([w - 2**32 if w >= 2**31 else w for w in words], dtype=torch.int32)
    assert [w & 0xFFFFFFFF for w in _mix(signed).tolist()] == [mix32(w) for w in words]


def test_every_key_bit_reaches_every_drawn_bit() -> None:
    """Avalanche of the per-cell hash: flipping any bit of a row or column key flips each of the 23
    bits that make the uniform with probability 1/2 (a weak mix, e.g. one multiply, fails)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(-(2**31), 2**31 - 1, (2000,), dtype=torch.int32, generator=gen)
    columns = torch.randint(-(2**31), 2**31 - 1, (64,), dtype=torch.int32, generator=gen)
    base = CounterNoise.cell_words(rows, columns)
    for bit in range(32):
        flip = torch.tensor(-(2**31) if bit == 31 else 1 << bit, dtype=torch.int32)
        for r, c in ((rows ^ flip, columns), (rows, columns ^ flip)):
            changed = (CounterNoise.cell_words(r, c) ^ base) & 0x7FFFFF
            rate = torch.stack([((changed >> k) & 1).float().mean() for k in range(23)])
            assert (rate - 0.5).abs().max() < 0.05, (bit, rate)


def test_noise_is_exponential_one() -> None:
    """Kolmogorov-Smirnov against Exp(1) at the 0.1% level, plus the first two moments."""
    e = draws().flatten()
    n = e.numel()
    assert e.min() > 0 and torch.isfinite(e).all()
    x = e.sort().values
    cdf = 1 - torch.exp(-x)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    ks = max(float((ranks / n - cdf).max()), float((cdf - (ranks - 1) / n).max()))
    assert ks < 1.95 / math.sqrt(n), ks
    assert abs(float(e.mean()) - 1) < 5 / math.sqrt(n)
    assert abs(float(e.var()) - 1) < 5 * math.sqrt(8 / n)  # Var of the sample variance of Exp(1): 8/n
    # Gumbel = -log E: mean is Euler's gamma, variance pi^2 / 6.
    g = -e.log()
    assert abs(float(g.mean()) - 0.5772156649) < 5 * math.sqrt(math.pi**2 / 6 / n)
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.05


def test_noise_has_no_row_or_column_structure() -> None:
    """Neighbouring keys, queries and heads are uncorrelated; row and column means vary as for iid draws."""
    e = draws()
    bound = 5 / math.sqrt(e.numel() / 2)
    assert abs(corr(e[..., 1:], e[..., :-1])) < bound  # adjacent keys
    assert abs(corr(e[..., 1:, :], e[..., :-1, :])) < bound  # adjacent queries
    assert abs(corr(e[:, :, 1:], e[:, :, :-1])) < bound  # adjacent query heads of a group
    assert abs(corr(e[:, 1:], e[:, :-1])) < bound  # adjacent KV heads
    rows = e.reshape(-1, SHAPE[-1])
    # Means over 512 iid Exp(1) draws have variance 1/512; a chi-square-like ratio near 1.
    for means, count in ((rows.mean(dim=1), rows.shape[1]), (rows.mean(dim=0), rows.shape[0])):
        ratio = float(means.var() * count)
        assert 0.8 < ratio < 1.25, ratio
    # The 2x2 rectangles of a cell grid: xor-structured noise (row key ^ column key) would tie them.
    rect = rows[:-1, :-1] + rows[1:, 1:] - rows[:-1, 1:] - rows[1:, :-1]
    assert abs(float(rect.mean())) < 5 * math.sqrt(4 / rect.numel())
    assert abs(float(rect.var()) - 4) < 0.1


def test_noise_is_seeded_and_fresh_per_layer_and_step() -> None:
    base = draws(seed=7, layer=2, step=3)
    assert torch.equal(base, draws(seed=7, layer=2, step=3))
    bound = 5 / math.sqrt(base.numel())
    for seed, layer, step in ((8, 2, 3), (7, 3, 3), (7, 2, 4)):
        other = draws(seed, layer, step)
        assert abs(corr(base, other)) < bound
        assert (base == other).float().mean() < 1e-3


def test_decode_steps_over_a_full_cache_get_new_noise() -> None:
    """One decode query over the same number of slots at every step: the step keeps the draws fresh."""
    shape = torch.Size([1, 2, 3, 1, 4096])
    first, second = draws(step=1, shape=shape), draws(step=2, shape=shape)
    assert abs(corr(first, second)) < 5 / math.sqrt(first.numel())


def test_scores_do_not_depend_on_the_chunking() -> None:
    """Query slots come from a chunk's shape, so the chunked scoring path sums the same draws."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 96, 8), torch.randn(1, 2, 96, 8), torch.randn(1, 2, 96, 8)
    noise = CounterNoise(3, layer=1)
    _, whole = attention_with_colsums(q, k, v, 0.3, score_fn=lambda x: gumbel_softmax_scores(x, 1.0, noise))
    _, chunked = attention_with_colsums(
        q, k, v, 0.3, max_elements=4 * 96 * 5, score_fn=lambda x: gumbel_softmax_scores(x, 1.0, noise)
    )
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    _, plain = attention_with_colsums(q, k, v, 0.3)
    assert not torch.allclose(whole, plain, atol=1e-3)  # the noise did change the scores
    torch.testing.assert_close(whole.sum(-1), plain.sum(-1))  # each query's scores still sum to 1


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_scores_are_gumbel_softmax_of_the_draws(tau: float) -> None:
    """Blockwise scores equal softmax((x + zeta) / tau) with zeta = -log E from the same draws."""
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 2, 5, 300)
    logits[..., -1] = float("-inf")
    noise = CounterNoise(5, layer=4, step=2)
    zeta = -noise.exponential(logits.shape, logits.device).log()
    expected = torch.softmax((logits + zeta) / tau, dim=-1)
    torch.testing.assert_close(gumbel_softmax_scores(logits, tau, noise), expected, rtol=1e-4, atol=1e-7)


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.sizes.append(t.numel())
        return out


def test_noise_is_made_a_block_at_a_time() -> None:
    """The scores tensor is the only chunk-sized allocation: the draws never exist for a whole chunk."""
    logits = torch.randn(1, 2, 7, 64, 4096)
    with _LargestTensor() as probe:
        gumbel_softmax_scores(logits, 1.0, CounterNoise(0))
    big = [s for s in probe.sizes if s > logits.numel() // 8]
    assert big and max(big) == logits.numel() and len(big) <= 3  # empty output, its views
