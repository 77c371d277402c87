"""A small model that follows the large one's sequence: loading, the shared-vocabulary check, and a
dense cache that catches up on the tokens it has not seen and truncates on rollback."""

from __future__ import annotations

import torch

from tokensift.errors import TokensiftError
from tokensift.models import Model, load
from tokensift.runtime.cache import TokenCache
from tokensift.runtime.generate import forward


def small_model(small: str | Model, large: Model, method: str) -> Model:
    """The small model of a pair, checked to share the large model's vocabulary."""
    model = small if isinstance(small, Model) else load(small)
    if model is large:
        raise TokensiftError(f"{method}: the small model is the large model itself ({large.name})")
    vs, vl = int(model.config.vocab_size), int(large.config.vocab_size)
    if vs != vl:
        raise TokensiftError(
            f"{method}: {model.name} has {vs} vocabulary entries and {large.name} {vl}; "
            "the two models must share a tokenizer"
        )
    ts, tl = model.tokenizer, large.tokenizer
    if ts is not None and tl is not None and ts.get_vocab() != tl.get_vocab():
        raise TokensiftError(f"{method}: {model.name} and {large.name} have different tokenizers")
    return model


class Follower:
    """The small model's view of the sequence: its own dense cache over a prefix of the tokens."""

    def __init__(self, model: Model):
        self.model = model
        self.cache = TokenCache(model, None)
        self.device = next(model.model.parameters()).device
        self.fed = 0  # tokens of the sequence held in the cache
        self.forwards = 0

    def step(self, seq: list[int]) -> torch.Tensor:
        """Logits (vocab,) for the next token of `seq`, after feeding the tokens not yet cached."""
        if self.fed >= len(seq):
            raise RuntimeError("the small model has already seen the whole sequence")
        ids = torch.tensor([seq[self.fed :]], device=self.device)
        logits = forward(self.model, ids, self.cache, last_only=True)[0, -1]
        self.fed = len(seq)
        self.forwards += 1
        return logits

    def rows(self, seq: list[int]) -> torch.Tensor:
        """Logits (n, vocab) after each of the n tokens of `seq` not yet cached, fed in one forward."""
        if self.fed >= len(seq):
            raise RuntimeError("the small model has already seen the whole sequence")
        ids = torch.tensor([seq[self.fed :]], device=self.device)
        logits = forward(self.model, ids, self.cache, last_only=False)[0]
        self.fed = len(seq)
        self.forwards += 1
        return logits

    def truncate(self, length: int) -> None:
        """Forget every cached token from position `length` on (rollback)."""
        if self.fed > length:
            self.cache.crop(length - self.fed)
            self.fed = length


def entropy(logits: torch.Tensor) -> float:
    """Entropy in nats of softmax(logits)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum())
