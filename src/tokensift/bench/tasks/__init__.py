"""Evaluation tasks, one file per family: each a seeded generator, a scorer and a one-line description.

`get_task("name")` or `get_task("name:key=value,...")` for tasks that take parameters (for example
`nt_single:unit=chars` sets a Needle Threading length in characters).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from tokensift.bench.tasks.base import Sample, Task, TokenCounter
from tokensift.bench.tasks.charbench import CHARBENCH
from tokensift.bench.tasks.infinitebench import IbKvRetrieval, IbMathFind, IbNumberString, IbPasskey
from tokensift.bench.tasks.loop_workloads import WORKLOADS
from tokensift.bench.tasks.needle_threading import NEEDLE_THREADING
from tokensift.bench.tasks.niah_single import NiahSingle
from tokensift.bench.tasks.passage_count import PassageCount
from tokensift.bench.tasks.passkey import Passkey
from tokensift.bench.tasks.perplexity import Perplexity
from tokensift.bench.tasks.reviews import Reviews
from tokensift.bench.tasks.ruler_niah import RULER_NIAH
from tokensift.bench.tasks.ruler_vt import VariableTracking
from tokensift.bench.tasks.ruler_words import CommonWords, FrequentWords
from tokensift.bench.tasks.sentiment import Sentiment
from tokensift.bench.tasks.topic import Topic
from tokensift.errors import TokensiftError

TASKS: dict[str, Callable[..., Task]] = {
    "passkey": Passkey,
    "passkey_classic": lambda: Passkey(filler="classic"),
    "niah_single": NiahSingle,
    "perplexity": Perplexity,
    **{cls.name: cls for cls in RULER_NIAH},
    "vt": VariableTracking,
    "cwe": CommonWords,
    "fwe": FrequentWords,
    **{cls.name: cls for cls in NEEDLE_THREADING},
    **{cls.name: cls for cls in CHARBENCH},
    "ib_passkey": IbPasskey,
    "ib_number_string": IbNumberString,
    "ib_kv_retrieval": IbKvRetrieval,
    "ib_math_find": IbMathFind,
    "passage_count": PassageCount,
    "sentiment": Sentiment,
    "topic": Topic,
    "reviews": Reviews,
}
RULER_TASKS = [cls.name for cls in RULER_NIAH] + ["vt", "cwe", "fwe"]
# Repetitive, agent-like workloads whose output re-uses the prompt (for the generation-loop methods:
# suffix_decoding, prompt_lookup). Kept apart from TASKS: they are transformation tasks, not retrieval
# ones, their outputs are long, and the suites of TASKS measure eviction at 1k-4k tokens.
LOOP_TASKS: dict[str, Callable[..., Task]] = dict(WORKLOADS)


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def get_task(spec: str) -> Task:
    """A task by name, optionally with parameters: `name:key=value,key=value`."""
    name, _, params = spec.partition(":")
    known = {**TASKS, **LOOP_TASKS}
    if name not in known:
        raise TokensiftError(f"unknown task {name!r}: known tasks are {', '.join(known)}")
    if not params:
        return known[name]()
    kwargs: dict[str, int | float | str] = {}
    for item in params.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise TokensiftError(f"bad task parameter {item!r} in {spec!r}: use name:key=value")
        kwargs[key.strip()] = _value(value.strip())
    factory = known[name]
    accepted = set(inspect.signature(factory).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        known = ", ".join(sorted(accepted)) or "none"
        raise TokensiftError(f"task {name!r} has no parameter {unknown[0]!r} (parameters: {known})")
    task = factory(**kwargs)
    task.name = f"{name}:" + ",".join(f"{k}={v}" for k, v in kwargs.items())
    return task


__all__ = ["LOOP_TASKS", "RULER_TASKS", "TASKS", "Sample", "Task", "TokenCounter", "get_task"]
