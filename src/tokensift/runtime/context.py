"""The context hook: a many-passage context is reduced before tokenization, then joined."""

from __future__ import annotations

import time
from collections.abc import Sequence

from tokensift.errors import TokensiftError
from tokensift.runtime.plan import Plan

SEPARATOR = "\n\n"


def build_context(
    plan: Plan, passages: Sequence[str], prompt: str | None, question: str | None, seed: int
) -> tuple[str, dict[str, float]]:
    """The prompt text for `passages` under the plan's context method (all of them without one):
    `prompt` (an instruction, optional), then the kept passages in their original order, separated
    by blank lines. Returns the text and counters (passages in, kept, dropped; the method's own)."""
    if isinstance(passages, str) or not all(isinstance(p, str) for p in passages):
        raise TokensiftError("passages must be a list of strings")
    passages = [p.strip() for p in passages]
    if not passages or not all(passages):
        raise TokensiftError("passages must be a non-empty list of non-empty strings")
    counters: dict[str, float] = {"passages_in": len(passages)}
    method = plan.context
    kept = list(enumerate(passages))
    if method is not None:
        start = time.perf_counter()
        kept, extra = method.select_passages(list(passages), question, seed)
        counters["context_seconds"] = time.perf_counter() - start
        counters.update(extra)
        index = [i for i, _ in kept]
        if not kept or index != sorted(set(index)) or not 0 <= index[0] <= index[-1] < len(passages):
            raise RuntimeError(f"{method.name} returned bad passage indices {index}")
    counters["passages_kept"] = len(kept)
    counters["passages_dropped"] = len(passages) - len(kept)
    body = SEPARATOR.join(text for _, text in kept)
    text = f"{prompt.rstrip()}{SEPARATOR}{body}" if prompt and prompt.strip() else body
    return text, counters
