"""What a bench run covers: tasks x methods x lengths x depths x samples, validated before any work."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokensift.errors import TokensiftError
from tokensift.models import DEFAULT_MODEL, _dtype, resolve_device

DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
# query-aware: methods compress the whole prompt; query-agnostic: the context alone, question after.
PROTOCOLS = ("query-aware", "query-agnostic")


def protocols_of(protocol: str) -> tuple[str, ...]:
    """The protocols a run covers: "both" is the two, sample by sample (kvpress's leaderboard runs both)."""
    return PROTOCOLS if protocol == "both" else (protocol,)


@dataclass
class BenchConfig:
    """A bench grid. `samples` per (task, length), per depth for depth-swept tasks unless
    `depth_samples` is set (then depth-swept tasks get that many per depth instead)."""

    tasks: list[str]
    methods: list[str]
    lengths: list[int]
    model: str = DEFAULT_MODEL
    samples: int = 3
    seed: int = 0
    depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    depth_samples: int | None = None
    suite: str | None = None
    protocol: str = "query-aware"
    share_prefill: bool = True
    # Decode a cell's plans in one batch (one forward per step for all; each over its own cache, as
    # alone): much faster for a grid of many plans, but per-row decode times are the batch's.
    batch_decode: bool = False
    dtype: str = "float32"
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (tokensift.models.resolve_device)
    prefill_chunk: int | None = None  # chunked prefill (then no shared prefill: it is one forward)
    prefill_lookahead: int = 0  # prompt tail appended to each earlier chunk (see prefill_chunked)

    def validate(self) -> None:
        from tokensift.bench.tasks import get_task
        from tokensift.runtime.generate import check_prefill_chunk
        from tokensift.runtime.plan import Plan

        if not self.tasks or not self.methods or not self.lengths:
            raise TokensiftError("bench needs at least one task, one method and one length")
        if self.samples < 1:
            raise TokensiftError(f"--samples must be >= 1, got {self.samples}")
        if self.depth_samples is not None and self.depth_samples < 1:
            raise TokensiftError(f"depth_samples must be >= 1, got {self.depth_samples}")
        if self.protocol not in (*PROTOCOLS, "both"):
            raise TokensiftError(f"unknown protocol {self.protocol!r}: use {', '.join(PROTOCOLS)} or both")
        if self.dtype != "auto":  # auto is resolved (probed) when the model loads
            _dtype(self.dtype)
        resolve_device(self.device)
        check_prefill_chunk(self.prefill_chunk, lookahead=self.prefill_lookahead)
        bad = [d for d in self.depths if not 0.0 <= d <= 1.0]
        if bad:
            raise TokensiftError(f"depths must lie in [0, 1], got {bad}")
        for task in self.tasks:
            get_task(task)
        for method in self.methods:
            Plan.of(method)

    def samples_for(self, uses_depth: bool) -> int:
        if uses_depth and self.depths and self.depth_samples is not None:
            return self.depth_samples
        return self.samples
