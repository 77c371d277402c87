"""Prefill -> compress -> decode with explicit positions; greedy or seeded sampling; stop strings."""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tokensift.errors import NoOpWarning, TokensiftError
from tokensift.methods.base import Method
from tokensift.models import Model, load
from tokensift.runtime.cache import TokenCache
from tokensift.runtime.plan import Plan

Prompt = str | Sequence[int]
MethodSpec = Plan | str | Method | Sequence[Method] | None


@dataclass
class GenerationStats:
    """What a generation cost and what the method did. Bytes are measured from the tensors held."""

    model: str
    method: str
    params: list[dict[str, Any]]
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    kv_bytes_peak: int
    kv_bytes_dense: int
    kv_bytes_final: int
    aux_bytes_peak: int
    tokens_held: float  # mean over layers at the end
    tokens_evicted: int  # summed over layers
    applied: bool
    stop_reason: str
    notes: list[str] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes_peak / self.kv_bytes_dense if self.kv_bytes_dense else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(0, self.new_tokens - 1)  # the first token comes from the prefill logits
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "kv_ratio": self.kv_ratio,
            "decode_tokens_per_second": self.decode_tokens_per_second,
        }


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: GenerationStats
    logits: list[torch.Tensor] | None = None  # per generated token, when asked for

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.to_dict()}


def encode(model: Model, prompt: Prompt, *, raw: bool = False, answer_prefix: str = "") -> list[int]:
    """Token ids for a prompt: the chat template for instruct models unless raw, then the answer prefix."""
    if not isinstance(prompt, str):
        if answer_prefix:
            raise TokensiftError("answer_prefix needs a text prompt")
        return [int(t) for t in prompt]
    tok = model.tokenizer
    if tok is None:
        raise TokensiftError(f"model {model.name!r} has no tokenizer: pass token ids")
    if not raw and getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    else:
        ids = list(tok(prompt)["input_ids"])
    if answer_prefix:
        ids += list(tok(answer_prefix, add_special_tokens=False)["input_ids"])
    return [int(t) for t in ids]


def eos_ids(model: Model) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.model, "generation_config", None), model.tokenizer, model.model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _cache_kwarg(hf_model: Any) -> str:
    params = inspect.signature(hf_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(model: Model, ids: torch.Tensor, cache: TokenCache, last_only: bool = True) -> torch.Tensor:
    """One forward of `ids` (1, L) appended to the cache at the positions the cache says come next."""
    start = cache.next_position
    positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    kwargs = {_cache_kwarg(model.model): cache}
    out = model.model(
        input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1 if last_only else 0, **kwargs
    )
    return out.logits


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy when temperature is 0; otherwise temperature and nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(logits.argmax(dim=-1).item())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator).item())


def check_context(model: Model, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = model.context_length
    if limit and prompt_tokens + max_new_tokens > limit:
        raise TokensiftError(
            f"prompt of {prompt_tokens} tokens plus max_new_tokens {max_new_tokens} exceeds "
            f"{model.name}'s context of {limit} tokens"
        )


def generate(
    model: Model | str,
    prompt: Prompt,
    method: MethodSpec = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    raw: bool = False,
    answer_prefix: str = "",
    return_logits: bool = False,
) -> Generation:
    """Generate with a method (or `+`-composed methods) switched on; see `Generation.stats`."""
    if isinstance(model, str):
        model = load(model)
    if max_new_tokens < 1:
        raise TokensiftError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise TokensiftError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
    plan = Plan.of(method)
    ids = encode(model, prompt, raw=raw, answer_prefix=answer_prefix)
    if not ids:
        raise TokensiftError("empty prompt")
    check_context(model, len(ids), max_new_tokens)
    stops = [s for s in stop if s]
    eos = eos_ids(model)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.model.parameters()).device

    with torch.inference_mode():
        cache = TokenCache(model.model, plan, prompt_tokens=len(ids))
        t0 = time.perf_counter()
        logits = forward(model, torch.tensor([ids], device=device), cache)[:, -1]
        prefill_seconds = time.perf_counter() - t0
        new: list[int] = []
        step_logits: list[torch.Tensor] = []
        stop_reason, text = "max_new_tokens", ""
        t1 = time.perf_counter()
        while True:
            if return_logits:
                step_logits.append(logits[0].float().clone())
            token = sample(logits[0], temperature, top_p, generator)
            new.append(token)
            if token in eos:
                stop_reason = "eos"
                break
            if stops and model.tokenizer is not None:
                text = model.tokenizer.decode(new, skip_special_tokens=True)
                if any(s in text for s in stops):
                    stop_reason = "stop"
                    break
            if len(new) >= max_new_tokens:
                break
            logits = forward(model, torch.tensor([[token]], device=device), cache)[:, -1]
        decode_seconds = time.perf_counter() - t1

    if model.tokenizer is not None:
        text = model.tokenizer.decode(new, skip_special_tokens=True)
        if stop_reason == "stop":
            text = text[: min(text.index(s) for s in stops if s in text)]
    stats = collect_stats(
        model, plan, cache, len(ids), len(new), prefill_seconds, decode_seconds, stop_reason
    )
    return Generation(text=text, token_ids=new, stats=stats, logits=step_logits if return_logits else None)


def collect_stats(
    model: Model,
    plan: Plan,
    cache: TokenCache,
    prompt_tokens: int,
    new_tokens: int,
    prefill_seconds: float,
    decode_seconds: float,
    stop_reason: str,
) -> GenerationStats:
    notes = list(cache.notes)
    evict = cache.plan.evict
    applied = plan.is_dense or cache.evicted > 0
    if evict is not None and cache.evicted == 0:
        notes.append(
            f"{evict.name} evicted nothing: its budget of {evict.budget_tokens} tokens covers all "
            f"{cache.seen_tokens} tokens processed"
        )
    for note in notes:
        warnings.warn(note, NoOpWarning, stacklevel=3)
    held = cache.tokens_held
    return GenerationStats(
        model=model.name,
        method=cache.plan.spec,
        params=cache.plan.describe(),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        kv_bytes_peak=cache.kv_bytes_peak,
        kv_bytes_dense=cache.seen_tokens * model.kv_bytes_per_token,
        kv_bytes_final=cache.kv_bytes,
        aux_bytes_peak=cache.aux_bytes_peak,
        tokens_held=sum(held) / len(held),
        tokens_evicted=cache.evicted,
        applied=applied,
        stop_reason=stop_reason,
        notes=notes,
        counters=dict(cache.counters),
    )
