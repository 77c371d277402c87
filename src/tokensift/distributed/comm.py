"""torch.distributed plumbing: the process group, non-blocking point-to-point messages, counters.

Every byte this rank sends and every second it spends blocked on a message or a collective is
counted, so benchmarks report measured communication, not estimates. A lost peer (its process
exited, or the group timeout ran out) becomes one `TokensiftError` naming this rank and the
operation, so the surviving ranks end with a clear message instead of hanging.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tokensift.errors import TokensiftError

T = TypeVar("T")

# Message tags: which stream a point-to-point message belongs to (gloo matches on source and tag).
TAG_KEYS, TAG_VALUES, TAG_QUERIES, TAG_OUT, TAG_LSE = 1, 2, 3, 4, 5


def check_launch(parallel: int) -> None:
    """Fail fast, before loading a model, unless this process is one of `parallel` ranks."""
    if parallel < 1:
        raise TokensiftError(f"--context-parallel must be >= 1, got {parallel}")
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        env = os.environ.get("WORLD_SIZE")
        if env is None:
            raise TokensiftError(
                f"--context-parallel {parallel} needs one process per rank: launch with "
                f"`torchrun --nproc-per-node {parallel} -m tokensift generate --context-parallel {parallel}`"
            )
        world = int(env)
    if world != parallel:
        raise TokensiftError(f"--context-parallel {parallel} but {world} processes were started")


def init_group(parallel: int, timeout_seconds: float) -> None:
    """Join the process group torchrun (or a test) describes in the environment, if not yet joined."""
    check_launch(parallel)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
        except (RuntimeError, ValueError) as exc:
            raise TokensiftError(f"could not join the process group: {exc}") from None


@dataclass
class Comm:
    """This rank's view of the group, with counters of what it sent and how long it waited."""

    rank: int = field(default_factory=lambda: dist.get_rank())
    world: int = field(default_factory=lambda: dist.get_world_size())
    bytes_sent: int = 0  # everything: point-to-point messages and this rank's share of collectives
    p2p_bytes: int = 0  # point-to-point messages only (the schedules' traffic)
    messages: int = 0
    wait_seconds: float = 0.0
    compute_seconds: float = 0.0
    # Where collectives run: NCCL needs CUDA tensors, gloo takes CPU ones (callers' tensors are moved).
    device: torch.device = field(
        default_factory=lambda: (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
    )

    def reset(self) -> None:
        self.bytes_sent = self.p2p_bytes = self.messages = 0
        self.wait_seconds = self.compute_seconds = 0.0

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as exc:  # gloo/NCCL errors and timeouts (DistBackendError is one)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TokensiftError(
                f"context parallel rank {self.rank}/{self.world}: {what} failed, a peer rank has exited "
                f"or timed out ({first})"
            ) from None

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> Any:
        tensor = tensor.contiguous()
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.p2p_bytes += tensor.numel() * tensor.element_size()
        self.messages += 1
        return self._guard("send", lambda: dist.isend(tensor, dst, tag=tag))

    def irecv(self, buffer: torch.Tensor, src: int, tag: int) -> Any:
        return self._guard("receive", lambda: dist.irecv(buffer, src, tag=tag))

    def wait(self, requests: Sequence[Any]) -> None:
        t0 = time.perf_counter()
        for req in requests:
            self._guard("waiting for a peer", req.wait)
        self.wait_seconds += time.perf_counter() - t0

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (same shape everywhere), in rank order, on the tensor's device."""
        home = tensor.device
        tensor = tensor.to(self.device).contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        self.bytes_sent += tensor.numel() * tensor.element_size() * (self.world - 1)
        t0 = time.perf_counter()
        self._guard("all_gather", lambda: dist.all_gather(out, tensor))
        self.wait_seconds += time.perf_counter() - t0
        return [t.to(home) for t in out]

    def all_gather_padded(self, tensor: torch.Tensor, dim: int, lengths: Sequence[int]) -> list[torch.Tensor]:
        """All ranks' tensors that differ only in size along `dim` (sizes known to every rank)."""
        longest = max(lengths)
        pad = list(tensor.shape)
        pad[dim] = longest - tensor.shape[dim]
        padded = torch.cat([tensor, tensor.new_zeros(pad)], dim=dim) if pad[dim] else tensor
        return [t.narrow(dim, 0, n) for t, n in zip(self.all_gather(padded), lengths, strict=True)]

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """`src`'s tensor on every rank (returned on the tensor's device)."""
        if self.rank == src:
            self.bytes_sent += tensor.numel() * tensor.element_size() * (self.world - 1)
        buffer = tensor.to(self.device).contiguous()
        t0 = time.perf_counter()
        self._guard("broadcast", lambda: dist.broadcast(buffer, src))
        self.wait_seconds += time.perf_counter() - t0
        return buffer.to(tensor.device)

    def barrier(self) -> None:
        self._guard("barrier", dist.barrier)
