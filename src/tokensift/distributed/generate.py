"""Generation with the prompt split across ranks (context parallelism), launched with torchrun.

Every rank runs this with the same arguments. The prefill is split (`ShardCache`); decoding runs on
every rank with the cache still split, or, with `gather_after_prefill`, on a gathered ordinary
TokenCache. Rank 0's sampled token is broadcast each step, so all ranks produce the same text.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tokensift.distributed import cache as shard_cache
from tokensift.distributed.comm import Comm, check_launch, init_group
from tokensift.distributed.eviction import check_plan
from tokensift.distributed.partition import chunk_bounds, owner_of
from tokensift.distributed.schedules import SCHEDULES
from tokensift.errors import TokensiftError
from tokensift.models import Model
from tokensift.runtime import attention as tokensift_attention
from tokensift.runtime.generate import (
    Decoding,
    Generation,
    MethodSpec,
    Prompt,
    _cache_kwarg,
    check_context,
    collect_stats,
    decode_plain,
    encode_split,
    eos_ids,
)
from tokensift.runtime.plan import Plan


@dataclass
class ShardDecoding(Decoding):
    """Decoding over a ShardCache: positions and token ownership per forward; rank 0's token wins."""

    comm: Comm | None = field(default=None, kw_only=True)

    def sample(self, logits: torch.Tensor) -> int:
        token = torch.tensor([super().sample(logits)], dtype=torch.long)
        assert self.comm is not None
        return int(self.comm.broadcast(token, 0).item())

    def forward(self, ids: Sequence[int], last_only: bool = False) -> torch.Tensor:
        cache = self.cache
        if isinstance(cache, shard_cache.ShardCache):
            cache.begin_forward(len(ids))
            logits = super().forward(ids, last_only)
            cache.end_forward(len(ids))
            return logits
        return super().forward(ids, last_only)


def generate_context_parallel(
    model: Model,
    prompt: Prompt,
    method: MethodSpec = None,
    *,
    parallel: int,
    schedule: str = "tokenring",
    gather_after_prefill: bool = False,
    timeout_seconds: float = 120.0,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    raw: bool = False,
    question: str | None = None,
    return_logits: bool = False,
    ignore_eos: bool = False,
) -> Generation:
    """`generate` with the prompt's prefill split over `parallel` ranks (call it on every rank).

    Stats are this rank's: `kv_bytes_peak` is the slice it held (about 1/P of `kv_bytes_dense`);
    counters carry every rank's figures as `cp_rank{i}_{kv_bytes_peak,bytes_sent,...}`.
    """
    plan = Plan.of(method)
    check_plan(plan)
    check_launch(parallel)
    if schedule not in SCHEDULES:
        raise TokensiftError(f"unknown context-parallel schedule {schedule!r}: use {' or '.join(SCHEDULES)}")
    if max_new_tokens < 1:
        raise TokensiftError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids, question_ids = encode_split(model, prompt, question, raw=raw, answer_prefix="")
    check_context(model, len(ids) + len(question_ids), max_new_tokens)
    chunk_bounds(len(ids), parallel)  # a prompt too short to split fails here, on every rank
    init_group(parallel, timeout_seconds)
    comm = Comm()
    hf = model.model
    if torch.cuda.is_available():
        hf.to(torch.device("cuda", torch.cuda.current_device()))
    device = next(hf.parameters()).device

    with torch.inference_mode():
        shard_cache.install(hf)
        try:
            cache = shard_cache.ShardCache(model, plan, prompt_tokens=len(ids), comm=comm, schedule=schedule)
            cache.shared["max_new_tokens"] = max_new_tokens
            comm.barrier()
            t0 = time.perf_counter()
            positions = cache.begin_prefill()
            local = torch.tensor([ids], device=device)[:, positions.to(device)]
            out = hf(
                input_ids=local,
                position_ids=positions.to(device).unsqueeze(0),
                use_cache=True,
                logits_to_keep=1,
                **{_cache_kwarg(hf): cache},
            )
            # This rank's prefill traffic (attention, eviction) before the logits are shared.
            prefill_comm = {
                "kv_bytes_prefill": cache.kv_bytes,
                "bytes_sent": comm.bytes_sent,
                "p2p_bytes": comm.p2p_bytes,
                "wait_seconds": comm.wait_seconds,
                "compute_seconds": comm.compute_seconds,
            }
            logits = out.logits[0, -1].float().contiguous()
            logits = comm.broadcast(logits, owner_of(len(ids) - 1, len(ids), parallel))
            cache.end_prefill()
            decode_cache: Any = cache
            if gather_after_prefill:
                decode_cache = cache.gathered(model)
                tokensift_attention.install(hf)
            decoding = ShardDecoding(
                model=model,
                cache=decode_cache,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                generator=torch.Generator().manual_seed(seed),
                eos=eos_ids(model),
                stops=[s for s in stop if s],
                ignore_eos=ignore_eos,
                return_logits=return_logits,
                prompt=ids + question_ids,
                comm=comm,
            )
            if question_ids:
                decode_cache.evicting = False
                logits = decoding.forward(question_ids, last_only=True)[-1]
                decode_cache.evicting = True
                decode_cache.count("question_tokens", len(question_ids))
            prefill_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            decode_plain(decoding, logits)
            decode_seconds = time.perf_counter() - t1
            figures = _rank_figures(comm, cache, prefill_seconds, prefill_comm)
        finally:
            tokensift_attention.install(hf)

    new, text = decoding.tokens, ""
    if model.tokenizer is not None:
        text = model.tokenizer.decode(new, skip_special_tokens=True)
        if decoding.stop_reason == "stop":
            text = text[: min(text.index(s) for s in decoding.stops if s in text)]
    decode_cache.counters.update(figures)
    decode_cache.counters.update(
        {"cp_ranks": parallel, "cp_gathered": float(gather_after_prefill), "cp_rank": comm.rank}
    )
    stats = collect_stats(
        model,
        plan,
        decode_cache,
        len(ids) + len(question_ids),
        len(new),
        prefill_seconds,
        decode_seconds,
        decoding.stop_reason,
    )
    stats.method = f"{stats.method} [context-parallel {parallel}, {schedule}]"
    return Generation(
        text=text, token_ids=new, stats=stats, logits=decoding.step_logits if return_logits else None
    )


def _rank_figures(
    comm: Comm, cache: shard_cache.ShardCache, prefill_seconds: float, prefill_comm: dict[str, float]
) -> dict[str, float]:
    """Every rank's prefill figures and the global eviction count, gathered (identical on all ranks)."""
    mine = {
        "kv_bytes_peak": cache.kv_bytes_peak,
        **prefill_comm,
        "prefill_seconds": prefill_seconds,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "evicted": sum(layer.evicted for layer in cache.layers),
    }
    every = comm.all_gather(torch.tensor(list(mine.values()), dtype=torch.float64))
    cache.global_evicted = round(sum(float(t[-1]) for t in every))
    return {
        f"cp_rank{r}_{name}": value
        for r, t in enumerate(every)
        for name, value in zip(mine, t.tolist(), strict=True)
    }


def runner_from_args(args: Any) -> Callable[..., Generation | None]:
    """`generate` for the CLI's `--context-parallel P` (checked before the model loads); it returns
    None on ranks other than 0, which print nothing."""
    check_launch(args.context_parallel)

    def run(model: Model, prompt: Prompt, method: MethodSpec = None, **kwargs: Any) -> Generation | None:
        result = generate_context_parallel(
            model,
            prompt,
            method,
            parallel=args.context_parallel,
            schedule=args.cp_schedule,
            gather_after_prefill=args.gather_after_prefill,
            timeout_seconds=args.cp_timeout,
            **kwargs,
        )
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()  # the command is done with the group
        return result if rank == 0 else None

    return run
