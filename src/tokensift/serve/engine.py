"""The serving engine: the KV memory pool, request plans with their reservations, and the worker
that runs one generation on a thread with guards, streaming and cancellation.

Admission runs on the event loop; generations run on worker threads (`max_running` of them), so
the loop never blocks on a forward. A request reserves the KV bytes its plan will hold at peak
before it runs and releases them when its thread ends, whatever the reason.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokensift.errors import TokensiftError
from tokensift.methods import parse_methods
from tokensift.methods.base import Method
from tokensift.models import Model
from tokensift.runtime.batch import DecodeBatcher
from tokensift.runtime.generate import Decoding, Generation, eos_ids, generate
from tokensift.runtime.plan import Plan
from tokensift.serve.guards import EosGuard, RepetitionGuard
from tokensift.serve.schema import BadRequest


def method_names(method: Method) -> list[str]:
    """The method's name and those of the methods it wraps."""
    inner = getattr(method, "method", None)
    return [method.name, *(method_names(inner) if isinstance(inner, Method) else [])]


def parse_plan(spec: str, allowed: list[str] | None) -> Plan:
    """A request's method spec, parsed by the CLI's parser and checked against the allow-list."""
    try:
        plan = Plan(tuple(parse_methods(spec)))
    except TokensiftError as exc:
        raise BadRequest(f"tokensift.method: {exc}", param="tokensift.method") from exc
    if allowed is not None:
        for method in plan.methods:
            refused = [n for n in method_names(method) if n not in allowed]
            if refused:
                raise BadRequest(
                    f"tokensift.method: {refused[0]!r} is not allowed on this server "
                    f"(allowed: {', '.join(allowed) or 'dense only'})",
                    param="tokensift.method",
                )
    return plan


def reservation_bytes(
    model: Model, plan: Plan, context_tokens: int, extra_tokens: int, max_tokens: int
) -> int:
    """KV bytes a plan holds at peak for a prompt: kept context + uncompressed question + output.

    Kept context is the eviction budget resolved against the context (all of it when dense); an
    evicting plan also holds one layer's full prompt while that layer compresses. The cache's
    buffers carry a headroom of n/32 + 16 tokens per layer, counted too.
    """
    bpt = model.kv_bytes_per_token
    kept, transient = context_tokens, 0
    evict = plan.resolve(context_tokens).evict if plan.methods else None
    if evict is not None:
        kept = min(context_tokens, evict.tokens)
        transient = math.ceil(context_tokens * bpt / max(1, model.num_layers))
    tokens = kept + extra_tokens + max_tokens
    return int((tokens + max(16, tokens // 32)) * bpt) + transient


class KVPool:
    """Reservations against a fixed byte budget, with a bounded FIFO queue; event-loop only."""

    def __init__(self, capacity: int, max_queue: int, max_running: int, on_change: Callable[[], None]):
        self.capacity = capacity
        self.max_queue = max_queue
        self.max_running = max_running
        self.reserved = 0
        self.running = 0
        self.admitted_peak = 0
        self.held: dict[str, int] = {}  # request id -> bytes its cache holds now (written by workers)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._on_change = on_change

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def held_bytes(self) -> int:
        return sum(list(self.held.values()))

    def _fits(self, nbytes: int) -> bool:
        return self.running < self.max_running and self.reserved + nbytes <= self.capacity

    def _take(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.running += 1
        self.admitted_peak = max(self.admitted_peak, self.running)
        self._on_change()

    def check_fits_ever(self, nbytes: int, what: str) -> None:
        if nbytes > self.capacity:
            raise BadRequest(
                f"{what} needs {nbytes / 2**20:.2f} MiB of KV cache but the server's pool holds "
                f"{self.capacity / 2**20:.2f} MiB: shorten the prompt, lower max_tokens or choose a "
                "compressing tokensift.method",
                param="tokensift.method",
            )

    async def acquire(self, nbytes: int, timeout: float, retry_after: int) -> None:
        """Reserve `nbytes`, waiting in the queue; 429 when the queue is full or the wait times out."""
        if not self._waiters and self._fits(nbytes):
            self._take(nbytes)
            return
        if len(self._waiters) >= self.max_queue:
            raise BadRequest(
                f"server busy: {self.running} running, {len(self._waiters)} waiting (queue limit "
                f"{self.max_queue}); retry later",
                status=429,
                **{"Retry-After": str(retry_after)},
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, future)
        self._waiters.append(entry)
        self._on_change()
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except BaseException as exc:
            if future.done() and not future.cancelled():
                self.release(nbytes)  # granted just as the caller gave up
            else:
                future.cancel()
                if entry in self._waiters:
                    self._waiters.remove(entry)
                self._grant()
            self._on_change()
            if isinstance(exc, TimeoutError):
                raise BadRequest(
                    f"waited {timeout:.0f} s for {nbytes / 2**20:.1f} MiB of the KV pool; retry later",
                    status=429,
                    **{"Retry-After": str(retry_after)},
                ) from None
            raise

    def release(self, nbytes: int) -> None:
        self.reserved -= nbytes
        self.running -= 1
        self._grant()
        self._on_change()

    def _grant(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            nbytes, future = self._waiters.popleft()
            if future.done():
                continue
            self._take(nbytes)
            future.set_result(None)


@dataclass
class Job:
    """One admitted request, as the worker thread sees it."""

    prompt: str | list[int]
    plan: Plan
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stops: list[str]
    repetition: RepetitionGuard
    eos_guard: EosGuard | None
    deadline: float  # time.monotonic()
    arrival: float  # time.monotonic()
    reserved: int
    question: str | None = None
    answer_prefix: str = ""
    raw: bool = True
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    cancelled: threading.Event = field(default_factory=threading.Event)
    emit: Callable[[tuple[str, Any]], None] | None = None  # stream events, called from the worker
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    stop: str = ""
    batcher: DecodeBatcher | None = None  # decodes in lock-step batches with its plan's other requests
    unbatched: str | None = None  # why it decodes alone, when it does
    batch_size_max: int = 0  # the most requests in one of its decode forwards (0: it took none)
    batched_steps: int = 0  # its decode forwards that ran through the batcher


class Batchers:
    """One `DecodeBatcher` per plan spec with requests in flight; event-loop only.

    Requests that share a plan decode together: each keeps its own cache (its method prefilled and
    compressed it alone), and every decode step of the batch is one forward. Loop methods (drafting,
    routing) verify several tokens per forward per request, so they decode alone.
    """

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.active: dict[str, tuple[DecodeBatcher, int]] = {}

    def acquire(self, plan: Plan, model: Model) -> tuple[DecodeBatcher | None, str | None]:
        if self.max_batch <= 1:
            return None, "batching is off (--max-batch 1)"
        if plan.loop is not None:
            return None, f"{plan.loop.name} is a loop method: it verifies several tokens per forward"
        batcher, users = self.active.get(plan.spec, (None, 0))
        if batcher is None:
            batcher = DecodeBatcher(model, self.max_batch)
        self.active[plan.spec] = (batcher, users + 1)
        return batcher, None

    def release(self, plan: Plan) -> None:
        entry = self.active.get(plan.spec)
        if entry is None:
            return
        batcher, users = entry
        if users <= 1:
            del self.active[plan.spec]
        else:
            self.active[plan.spec] = (batcher, users - 1)


class Detokenizer:
    """Incremental text: holds back a partial UTF-8 character and any possible stop-string prefix."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer = tokenizer
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.sent = ""

    def delta(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        safe = text[: len(text) - self.holdback] if self.holdback else text
        if not safe.startswith(self.sent) or len(safe) <= len(self.sent):
            return ""
        out, self.sent = safe[len(self.sent) :], safe
        return out

    def final(self, text: str) -> str:
        out = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent = text
        return out


def run_job(model: Model, job: Job, held: dict[str, int], observe_itl: Callable[[float], None]) -> Generation:
    """Run one generation on this thread; the on_token hook applies guards, deadline and cancel."""
    detok = Detokenizer(model.tokenizer, job.stops) if job.emit and model.tokenizer is not None else None

    def on_token(decoding: Decoding, token: int, logits: torch.Tensor | None) -> str | None:
        now = time.monotonic()
        if job.first_token_at is None:
            job.first_token_at = now
        elif job.last_token_at is not None:
            observe_itl(now - job.last_token_at)
        job.last_token_at = now
        held[job.id] = decoding.cache.kv_bytes
        reason = None
        if job.cancelled.is_set():
            reason = "cancelled"
        elif job.repetition.check(decoding.tokens):
            reason = "repetition_detected"
        elif job.eos_guard is not None and job.eos_guard.step(decoding.tokens, logits):
            reason = "eos_suppressed"
        elif now > job.deadline:
            reason = "timeout"
        if detok is not None and job.emit is not None and not decoding.stop_reason and reason is None:
            text = detok.delta(decoding.tokens)
            if text:
                job.emit(("delta", text))
        return reason

    batcher = job.batcher
    step = None
    if batcher is not None:

        def step(decoding: Decoding, token: int) -> torch.Tensor:
            return batcher.step(job.id, decoding.cache, token)

    try:
        with torch.inference_mode():
            gen = generate(
                model,
                job.prompt,
                job.plan,
                max_new_tokens=job.max_tokens,
                temperature=job.temperature,
                top_p=job.top_p,
                seed=job.seed,
                stop=job.stops,
                raw=job.raw,
                question=job.question,
                answer_prefix=job.answer_prefix,
                on_token=on_token,
                decode_step=step,
            )
    finally:
        held.pop(job.id, None)
        if job.batcher is not None:
            job.batch_size_max, job.batched_steps = job.batcher.leave(job.id)
    job.stop = gen.stats.stop_reason
    if detok is not None and job.emit is not None:
        tail = detok.final(gen.text)
        if tail:
            job.emit(("delta", tail))
    return gen


def make_eos_guard(model: Model, config: Any) -> EosGuard | None:
    if not config.eos_guard:
        return None
    eos = sorted(eos_ids(model))
    if not eos:
        return None
    return EosGuard(
        eos,
        after=config.eos_guard_after,
        window=config.eos_guard_window,
        floor=config.eos_guard_floor,
        entropy=config.eos_guard_entropy,
        distinct=config.eos_guard_distinct,
    )


FINISH = {
    "eos": "stop",
    "stop": "stop",
    "max_new_tokens": "length",
    "timeout": "length",
    "repetition_detected": "stop",
    "eos_suppressed": "stop",
    "cancelled": "stop",
}


def finish_reason(stop: str) -> str:
    return FINISH.get(stop, "stop")


def stop_reason_field(stop: str) -> str | None:
    """The OpenAI/vLLM choice `stop_reason`: set for guard stops, None otherwise."""
    return stop if stop in ("timeout", "repetition_detected", "eos_suppressed") else None


def jsonable(value: Any) -> Any:
    """Stats as strict JSON: NaN and infinities become null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | bool) or value is None:
        return value
    return str(value)
