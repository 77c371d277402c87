"""Batched decoding over independent caches: one model forward for several generations' next tokens.

Every generation keeps its own `TokenCache` (its method prefilled, compressed and keeps compressing
it on its own), so caches of different lengths never need padding. A decode step stacks the
generations' last tokens into a (B, 1) batch and runs one forward through a `RowsCache`: the
embeddings, projections, MLPs and LM head run batched; in each layer `RowsLayer.update` appends row
b's key/value to generation b's own cache layer, and the registered attention function then attends
each row over its own cache with the same code as an unbatched forward (`attention.attend`), so
eviction, sparse selection and biases behave exactly as they do alone.

`DecodeBatcher` lets generations running on their own threads meet in lock-step rounds: each
thread hands its token to `step` and gets its logits back; the round's forward runs once every
member has handed in its token (a member that stops `leave`s and no longer holds the others back).
A round's rows are in the order their members joined, so a batch is the same from run to run.

`run_lockstep` batches a list of generations from one caller without threads (greenlets): their
prefills one at a time, in order, then every decode step batched (the bench decodes all the plans
of a cell together).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tokensift.runtime.cache import PENDING, TokenCache

if TYPE_CHECKING:
    from tokensift.runtime.generate import Decoding

T = TypeVar("T")
# What `generate(decode_step=...)` takes: the next-token logits for a committed token fed back.
DecodeStep = Callable[["Decoding", int], torch.Tensor]

# Set by RowsLayer.update and read by the registered attention function in the same layer's
# forward: per batch row, (its cache layer, the keys and values that layer returned).
PENDING_ROWS: ContextVar[list[tuple[Any, torch.Tensor, torch.Tensor]] | None] = ContextVar(
    "tokensift_pending_rows", default=None
)


class RowsLayer(CacheLayerMixin):
    """Layer `index` of a batch whose row b lives in `caches[b]`."""

    is_sliding = False

    def __init__(self, caches: list[TokenCache], index: int):
        super().__init__()
        self.caches = caches
        self.index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        rows = []
        for b, cache in enumerate(self.caches):
            layer = cache.layers[self.index]
            keys, values = layer.update(key_states[b : b + 1], value_states[b : b + 1])
            rows.append((layer, keys, values))
        PENDING.set(None)
        PENDING_ROWS.set(rows)
        # The attention function reads every row's own keys from PENDING_ROWS; these are not used.
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return max(c.layers[self.index].get_mask_sizes(query_length)[0] for c in self.caches), 0

    def get_seq_length(self) -> int:
        return max(c.layers[self.index].get_seq_length() for c in self.caches)

    def get_max_length(self) -> int:
        return -1


class RowsCache(Cache):
    """A transformers Cache over one `TokenCache` per batch row (no padding, no copies)."""

    def __init__(self, caches: list[TokenCache]):
        if not caches or len({c.num_layers for c in caches}) != 1:
            raise ValueError("a batch needs one or more caches of the same model")
        super().__init__(layers=[RowsLayer(caches, i) for i in range(caches[0].num_layers)])
        self.caches = caches


def decode_batch(model: Any, caches: list[TokenCache], tokens: list[int]) -> torch.Tensor:
    """Next-token logits (B, vocab) for `tokens[b]` appended to `caches[b]`, in one forward."""
    from tokensift.runtime.generate import _cache_kwarg

    hf, device = model.model, model.device
    ids = torch.tensor([[t] for t in tokens], device=device)
    positions = torch.tensor([[c.next_position] for c in caches], device=device)
    cache = RowsCache(caches)
    with torch.inference_mode():
        out = hf(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{_cache_kwarg(hf): cache},
        )
    for c in caches:
        c.count("batched_decode_steps")
    return out.logits[:, -1]


class DecodeBatcher:
    """Lock-step decode rounds for generations on their own threads (at most `max_batch` at once).

    A thread calls `step(key, cache, token)` for each token it feeds back and `leave(key)` when its
    generation ends, whatever the reason. A round runs when every member has handed in its token;
    the thread that completes it runs the forward for all (its wait is its own step anyway).
    `batch_size_max[key]` and `steps[key]` record what each member saw.
    """

    def __init__(self, model: Any, max_batch: int):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.model = model
        self.max_batch = max_batch
        self.cond = threading.Condition()
        self.members: dict[Hashable, None] = {}  # in join order: a round's rows are in this order
        self.pending: dict[Hashable, tuple[TokenCache, int]] = {}
        self.results: dict[Hashable, torch.Tensor | BaseException] = {}
        self.running = False
        self.batch_size_max: dict[Hashable, int] = {}
        self.steps: dict[Hashable, int] = {}
        self.forwards = 0

    def _ready(self) -> bool:
        return not self.running and bool(self.pending) and len(self.pending) == len(self.members)

    def step(self, key: Hashable, cache: TokenCache, token: int) -> torch.Tensor:
        """The logits (vocab,) after `token` is appended to `cache`, from a batched forward."""
        with self.cond:
            self._admit(key)
            self.pending[key] = (cache, token)
            while True:
                if key in self.results:
                    return self._take(key)
                if self._ready():
                    batch, self.pending, self.running = self.pending, {}, True
                    keys = [k for k in self.members if k in batch]
                    break
                self.cond.wait()
        try:
            logits = decode_batch(self.model, [batch[k][0] for k in keys], [batch[k][1] for k in keys])
            outcome: dict[Hashable, torch.Tensor | BaseException] = {k: logits[i] for i, k in enumerate(keys)}
        except BaseException as exc:  # every row of the round fails with the forward's error
            outcome = dict.fromkeys(keys, exc)
        with self.cond:
            self.forwards += 1
            for k in keys:
                self.batch_size_max[k] = max(self.batch_size_max.get(k, 0), len(keys))
                self.steps[k] = self.steps.get(k, 0) + 1
            self.results.update(outcome)
            self.running = False
            self.cond.notify_all()
            return self._take(key)

    def join(self, key: Hashable) -> None:
        """Make `key` a member before its first step, so rounds wait for its token from then on."""
        with self.cond:
            self._admit(key)

    def _admit(self, key: Hashable) -> None:
        """With the lock held: wait for a free seat unless `key` has one, then take it (join order)."""
        while key not in self.members and len(self.members) >= self.max_batch:
            self.cond.wait()
        self.members.setdefault(key)

    def _take(self, key: Hashable) -> torch.Tensor:
        result = self.results.pop(key)
        if isinstance(result, BaseException):
            raise result
        return result

    def leave(self, key: Hashable) -> tuple[int, int]:
        """Remove a finished member; returns (largest batch it decoded in, batched steps it took)."""
        with self.cond:
            self.members.pop(key, None)
            self.pending.pop(key, None)
            self.results.pop(key, None)
            self.cond.notify_all()
            return self.batch_size_max.pop(key, 0), self.steps.pop(key, 0)

    @property
    def size(self) -> int:
        with self.cond:
            return len(self.members)


def run_lockstep(
    model: Any, jobs: Sequence[Callable[[DecodeStep], T]]
) -> tuple[list[T | BaseException], list[tuple[int, int]]]:
    """Run generations whose prefills go one at a time, in order, and whose decodes go in one batch.

    Job i is called with a `DecodeStep` to hand to `generate(decode_step=...)`. It runs until it
    feeds back its first token (or ends); then job i+1 runs; once every job has prefilled, each round
    is one forward (`decode_batch`) serving every job still decoding, in job order. The jobs are
    greenlets on the caller's thread, not threads: torch runs every op here exactly as on the calling
    thread (an OpenMP region started from a second OS thread costs several times more to launch,
    which made a thread's 4k prefill up to 1.6x slower), and nothing runs concurrently. Returns each
    job's result, or the exception (an `Exception`) it raised, and (largest batch, batched steps) per
    job. KeyboardInterrupt and other non-`Exception`s propagate at once.
    """
    import contextvars

    from greenlet import getcurrent, greenlet

    n = len(jobs)
    scheduler = getcurrent()
    results: list[Any] = [None] * n
    size_max, steps = [0] * n, [0] * n
    waiting: dict[int, tuple[TokenCache, int]] = {}

    def start(i: int) -> greenlet:
        def step(decoding: Decoding, token: int) -> torch.Tensor:
            waiting[i] = (decoding.cache, token)
            return scheduler.switch()  # back with this job's logits from the next round

        def body() -> None:
            try:
                results[i] = jobs[i](step)
            except Exception as exc:  # handed back to the caller, which decides
                results[i] = exc

        job = greenlet(body, parent=scheduler)
        job.gr_context = contextvars.copy_context()  # the caller's context variables, as a thread call
        return job

    # Grad mode is per thread, so it is shared by all jobs here: hold inference mode across them all
    # (each generate's own inference_mode then always restores it as it found it).
    with torch.inference_mode():
        greenlets = [start(i) for i in range(n)]
        for job in greenlets:
            job.switch()  # its prefill, up to its first decode step or its end
        while waiting:
            keys = sorted(waiting)
            batch = [waiting.pop(k) for k in keys]
            try:
                logits: torch.Tensor | Exception = decode_batch(
                    model, [c for c, _ in batch], [t for _, t in batch]
                )
            except Exception as exc:  # every job of the round fails with the forward's error
                logits = exc
            for row, k in enumerate(keys):
                steps[k] += 1
                size_max[k] = max(size_max[k], len(keys))
                if isinstance(logits, Exception):
                    greenlets[k].throw(logits)
                else:
                    greenlets[k].switch(logits[row])  # runs job k to its next step or its end
    return results, list(zip(size_max, steps, strict=True))
