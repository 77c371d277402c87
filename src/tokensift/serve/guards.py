"""Per-token guards against outputs that never end: repetition detection and the EOS delay guard.

Repetition detection follows vLLM's `repetition_detection` request schema. The EOS delay guard is
new: energy-latency attacks (Engorgio, arXiv 2412.19394; Verbose Images, arXiv 2404.16557) craft
inputs so that the model never emits end-of-sequence and runs to the output cap. The guard tracks
the EOS probability at every step; once the output is past `after` tokens, if that probability has
stayed below `floor` for a whole window *and* the output in that window is repetitive (few
distinct tokens) or, when `entropy` > 0, low-entropy, it ends the request with stop reason
"eos_suppressed". The floor alone never suffices: inside any long answer the EOS probability is tiny.

The low-entropy criterion is off by default (`entropy=0`): copying outputs (rewriting records,
editing code) are as confident as an attack while they legitimately postpone the end, and it
stopped such ordinary outputs in benchmarks/serve_eos_guard.py's calibration split, while the
distinct-token criterion stopped only outputs that had already fallen into a verbatim loop.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class RepetitionGuard:
    """True once the last `min_count` blocks of `k` tokens are identical, for some k in the range."""

    min_pattern_size: int = 16
    max_pattern_size: int = 256
    min_count: int = 4

    def check(self, tokens: Sequence[int]) -> bool:
        n = len(tokens)
        top = min(self.max_pattern_size, n // self.min_count)
        for k in range(self.min_pattern_size, top + 1):
            if tokens[-1] != tokens[-1 - k]:
                continue
            pattern = list(tokens[n - k :])
            if all(list(tokens[n - (i + 1) * k : n - i * k]) == pattern for i in range(1, self.min_count)):
                return True
        return False


@dataclass
class EosGuard:
    """The end-of-sequence delay guard; `step` returns True when the request should stop."""

    eos: Sequence[int]
    after: int = 128
    window: int = 64
    floor: float = 1e-4
    entropy: float = 0.0  # nats; 0 turns the low-entropy criterion off
    distinct: float = 0.25
    eos_probs: deque[float] = field(init=False)
    entropies: deque[float] = field(init=False)
    steps_seen: int = 0

    def __post_init__(self) -> None:
        self.eos_probs = deque(maxlen=self.window)
        self.entropies = deque(maxlen=self.window)
        self._eos_index = torch.tensor(sorted(set(self.eos)), dtype=torch.long)

    def observe(self, logits: torch.Tensor) -> tuple[float, float]:
        """(EOS probability, entropy in nats) of one step's next-token distribution."""
        logp = torch.log_softmax(logits.float().reshape(-1), dim=-1)
        p_eos = float(logp[self._eos_index].exp().sum()) if len(self._eos_index) else 0.0
        return p_eos, float(-(logp.exp() * logp).sum())

    def step(self, tokens: Sequence[int], logits: torch.Tensor | None) -> bool:
        if logits is None:  # a loop method committed a drafted token: nothing to observe
            return False
        return self.push(tokens, *self.observe(logits))

    def push(self, tokens: Sequence[int], p_eos: float, entropy: float) -> bool:
        """Record one step (also used to replay recorded traces) and decide."""
        self.eos_probs.append(p_eos)
        self.entropies.append(entropy)
        self.steps_seen += 1
        if len(tokens) < self.after or len(self.eos_probs) < self.window:
            return False
        if max(self.eos_probs) >= self.floor:
            return False
        return self.low_entropy(tokens) or self.repetitive(tokens)

    def mean_entropy(self) -> float:
        return sum(self.entropies) / len(self.entropies) if self.entropies else math.nan

    def low_entropy(self, tokens: Sequence[int]) -> bool:
        return self.entropy > 0 and self.mean_entropy() < self.entropy

    def repetitive(self, tokens: Sequence[int]) -> bool:
        recent = tokens[-self.window :]
        return len(set(recent)) / max(1, len(recent)) <= self.distinct

    def summary(self) -> dict[str, float | None]:
        """The window's state, echoed in the response (what the guard saw at the end)."""
        return {
            "steps": self.steps_seen,
            "eos_prob_max_window": max(self.eos_probs) if self.eos_probs else None,
            "entropy_mean_window": self.mean_entropy() if self.entropies else None,
        }
