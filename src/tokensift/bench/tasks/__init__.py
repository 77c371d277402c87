"""Evaluation tasks, one per file: each a seeded generator, a scorer and a one-line description."""

from __future__ import annotations

from collections.abc import Callable

from tokensift.bench.tasks.base import Sample, Task, TokenCounter
from tokensift.bench.tasks.niah_single import NiahSingle
from tokensift.bench.tasks.passkey import Passkey
from tokensift.bench.tasks.perplexity import Perplexity
from tokensift.errors import TokensiftError

TASKS: dict[str, Callable[[], Task]] = {
    "passkey": Passkey,
    "passkey_classic": lambda: Passkey(filler="classic"),
    "niah_single": NiahSingle,
    "perplexity": Perplexity,
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise TokensiftError(f"unknown task {name!r}: known tasks are {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Sample", "Task", "TokenCounter", "get_task"]
