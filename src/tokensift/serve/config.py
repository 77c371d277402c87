"""Every `tokensift serve` option as one plain dataclass (what `create_app` takes)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields

from tokensift.errors import TokensiftError
from tokensift.models import DEFAULT_MODEL


@dataclass
class ServeConfig:
    """Server settings. Sizes are MiB or bytes as named; times are seconds.

    `allow_methods` names the methods a request may choose (None: all registered ones). The
    repetition fields are the server default of vLLM's `repetition_detection`; the `eos_guard_*`
    fields configure the end-of-sequence delay guard (see `tokensift.serve.guards`).
    """

    model: str = DEFAULT_MODEL
    method: str = "dense"
    allow_methods: list[str] | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "float32"
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (tokensift.models.resolve_device)
    served_model_name: str | None = None  # the `model` name the API reports (default: `model`)
    replica_id: str | None = None  # echoed in every response (default hostname:pid)
    # KV memory pool and admission
    kv_pool_mib: float = 512.0
    max_queue: int = 32
    max_running: int = 8  # generations running at once (worker threads)
    max_batch: int = 8  # requests sharing a plan decoded in one forward per step (1: each alone)
    # limits
    max_new_tokens_cap: int = 1024
    default_max_tokens: int = 128
    max_body_bytes: int = 1_000_000
    max_stop_sequences: int = 4
    max_logprobs: int = 0  # logprobs are not produced: any request for them is refused
    request_timeout: float = 120.0
    # repetition detection (vLLM's schema), the server default
    repetition_min_pattern_size: int = 16
    repetition_max_pattern_size: int = 256
    repetition_min_count: int = 4
    # end-of-sequence delay guard
    eos_guard: bool = True
    eos_guard_after: int = 128  # generated tokens before the guard may act
    eos_guard_window: int = 64  # steps the EOS probability must stay below the floor
    eos_guard_floor: float = 1e-4  # EOS probability floor
    eos_guard_entropy: float = 0.0  # mean entropy (nats) below which output is low-entropy; 0: off
    eos_guard_distinct: float = 0.25  # distinct-token share in the window at or below which it repeats
    malloc_tuning: str = "arena_max,trim"  # glibc: off, all, or a comma list of runtime.memory.NAMES
    extra: dict[str, str] = field(default_factory=dict)  # free-form labels (e.g. a deployment name)

    def __post_init__(self) -> None:
        positive = (
            "kv_pool_mib",
            "max_queue",
            "max_running",
            "max_batch",
            "max_new_tokens_cap",
            "default_max_tokens",
            "max_body_bytes",
            "request_timeout",
            "repetition_min_pattern_size",
            "repetition_max_pattern_size",
            "eos_guard_window",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise TokensiftError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_queue < 0 or self.max_logprobs < 0 or self.eos_guard_after < 0:
            raise TokensiftError("max_queue, max_logprobs and eos_guard_after must be >= 0")
        if self.repetition_min_count < 2:
            raise TokensiftError(f"repetition_min_count must be >= 2, got {self.repetition_min_count}")
        if self.repetition_min_pattern_size > self.repetition_max_pattern_size:
            raise TokensiftError("repetition_min_pattern_size exceeds repetition_max_pattern_size")
        if not 0 < self.eos_guard_floor < 1 or not 0 < self.eos_guard_distinct <= 1:
            raise TokensiftError("eos_guard_floor must lie in (0, 1) and eos_guard_distinct in (0, 1]")
        if self.eos_guard_entropy < 0:
            raise TokensiftError(f"eos_guard_entropy must be >= 0 (0: off), got {self.eos_guard_entropy}")
        self.malloc_settings  # noqa: B018 -- validates the setting names
        if self.default_max_tokens > self.max_new_tokens_cap:
            self.default_max_tokens = self.max_new_tokens_cap

    @property
    def replica(self) -> str:
        return self.replica_id or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def malloc_settings(self) -> tuple[str, ...]:
        from tokensift.runtime.memory import parse_tuning

        return parse_tuning(self.malloc_tuning)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def kv_pool_bytes(self) -> int:
        return int(self.kv_pool_mib * 2**20)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
