"""Entropy routing: the small model writes, the large model takes the tokens the small one is unsure of."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tokensift.errors import TokensiftError
from tokensift.methods.base import LoopMethod, register
from tokensift.models import Model
from tokensift.speculative.pair import Follower, entropy, small_model
from tokensift.speculative.verify import Verifier, record_loop

if TYPE_CHECKING:
    import torch

    from tokensift.runtime.generate import Decoding


@register
@dataclass
class EntropyRouting(LoopMethod):
    """Route a token to the large model when the small model's next-token entropy is too high.

    The generating model is the large one. At every position the small model (same tokenizer)
    computes its next-token distribution; if its entropy in nats is at least `threshold`, the large
    model catches up on every token since its last call in one forward and produces this token
    instead, otherwise the small model's token is taken. The large model is never speculative, so
    nothing is rolled back. `threshold=0` routes every token (the large model's output),
    `threshold=inf` none (the small model's output). Greedy or sampled from the chosen model.

    This is the training-free entropy baseline shipped with R2R (EntropySwitching), not R2R's
    trained router. Based on Fu et al., "R2R: Efficiently Navigating Divergent Reasoning Paths with
    Small-Large Model Token Routing", NeurIPS 2025 (reference: thu-nics/R2R).

    Parameters
    ----------
    small:
        The small model: an embedded name or path sharing the large model's tokenizer.
    threshold:
        Entropy (nats) at or above which the large model writes the token (R2R default 0.45).
    """

    name = "entropy_routing"
    applied_by: ClassVar[tuple[str, ...]] = ("small_model_tokens",)
    paper = "Fu et al., R2R: Small-Large Model Token Routing, NeurIPS 2025 (entropy baseline)"

    small: str = "qwen2.5-coder-0.5b"
    threshold: float = 0.45
    small_model: Model | None = field(default=None, repr=False, compare=False)  # an in-memory model

    def __post_init__(self) -> None:
        if math.isnan(self.threshold) or self.threshold < 0:
            raise TokensiftError(f"entropy_routing threshold must be >= 0, got {self.threshold}")

    def params(self) -> dict[str, Any]:
        params = super().params()
        small = params.pop("small_model")
        if small is not None:
            params["small"] = small.name
        return params

    def decode(self, decoding: Decoding, logits: torch.Tensor) -> None:
        cache = decoding.cache
        small = Follower(small_model(self.small_model or self.small, decoding.model, self.name))
        large = Verifier(decoding)
        seq = list(decoding.prompt)
        large_seen = len(seq)  # the large model has the prompt; its prefill logits predict the next token
        routed = catch_ups = 0  # tokens the large model wrote; its forwards after the prefill
        try:
            while True:
                chosen = small.step(seq)
                if entropy(chosen) >= self.threshold:
                    if large_seen < len(seq):
                        ids = seq[large_seen:]
                        logits = large.forward(ids)[-1]
                        large.keep(len(ids))
                        catch_ups += 1
                        large_seen = len(seq)
                    chosen = logits
                    routed += 1
                token = decoding.sample(chosen)
                seq.append(token)
                if decoding.accept(token, chosen):
                    return
        finally:
            cache.count("routing_large_tokens", routed)
            cache.count("routing_small_forwards", small.forwards)
            cache.count("routing_share", routed / max(1, len(decoding.tokens)))
            written = len(decoding.tokens)
            record_loop(
                cache,
                drafted=0,
                accepted=0,
                forwards_saved=written - 1 - catch_ups,
                small_model_tokens=written - routed,
            )
            if routed == written:
                cache.note(
                    f"entropy_routing: the large model wrote all {written} tokens (the small model's "
                    f"entropy reached threshold {self.threshold} at every one)"
                )
