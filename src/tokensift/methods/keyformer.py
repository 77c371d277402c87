"""Keyformer: key tokens chosen by Gumbel-noised attention logits, plus a recent window."""

from __future__ import annotations

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


def gumbel_softmax_scores(
    logits: torch.Tensor, tau: float, generator: torch.Generator | None
) -> torch.Tensor:
    """softmax((x + zeta) / tau) with zeta ~ Gumbel(0, 1) (no noise when generator is None).

    Gumbel noise is -log(E) with E ~ Exp(1), so exp((x + zeta) / tau) = exp(x / tau) * E^(-1/tau):
    one exponential draw and no logarithms (none at all at tau = 1, the prompt's temperature). This
    runs on every prompt logit, so it matters. Masked logits (-inf) stay masked."""
    probs = torch.softmax(logits / tau, dim=-1)
    if generator is None:
        return probs
    noise = torch.empty_like(probs).exponential_(generator=generator)
    weights = probs.div_(noise) if tau == 1.0 else probs.mul_(noise.pow_(-1.0 / tau))
    return weights.div_(weights.sum(dim=-1, keepdim=True))


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
    Noise is seeded per generation, so runs repeat exactly.

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
        generator = None
        if self.noise:
            generator = cache.shared.get("keyformer_rng")
            if generator is None:
                generator = cache.shared["keyformer_rng"] = torch.Generator(layer.device).manual_seed(
                    self.seed
                )
        return lambda logits: gumbel_softmax_scores(logits, tau, generator)

    def observe(
        self, layer: TokenLayer, query: torch.Tensor, colsum: torch.Tensor | None, scale: float
    ) -> None:
        super().observe(layer, query, colsum, scale)
        layer.extra["keyformer_step"] = layer.extra.get("keyformer_step", 0) + 1
