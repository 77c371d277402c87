"""Prefill -> compress -> decode with explicit positions; greedy or seeded sampling; stop strings."""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tokensift.errors import NoOpWarning, TokensiftError
from tokensift.methods.base import Method
from tokensift.models import Model, load
from tokensift.runtime.cache import TokenCache
from tokensift.runtime.plan import Plan
from tokensift.runtime.scores import tree_mask
from tokensift.runtime.shared_prefill import SharedPrefill

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
    applied: bool  # every method changed the computation (its `applied_by` counters); notes say why not
    stop_reason: str
    notes: list[str] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    prefill_chunk: int = 0  # tokens per prefill chunk; 0: the prompt in one forward
    prefill_lookahead: int = 0  # prompt tail tokens appended to each earlier chunk's forward

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


def join_question(context: str, question: str) -> str:
    """The user message for a context and a question asked after it (blank line between them)."""
    return context + ("" if context[-1:].isspace() else "\n\n") + question


def encode(model: Model, prompt: Prompt, *, raw: bool = False, answer_prefix: str = "") -> list[int]:
    """Token ids for a prompt: the chat template for instruct models unless raw, then the answer prefix."""
    return encode_split(model, prompt, None, raw=raw, answer_prefix=answer_prefix)[0]


def encode_split(
    model: Model, prompt: Prompt, question: Prompt | None, *, raw: bool = False, answer_prefix: str = ""
) -> tuple[list[int], list[int]]:
    """(context ids, question ids) of `join_question(prompt, question)`, split where the question starts.

    The whole text is tokenized once and split by character offsets, so the two parts concatenate
    to exactly the ids of the joined prompt. Without a question everything is context.
    """
    if not isinstance(prompt, str):
        if answer_prefix or isinstance(question, str):
            raise TokensiftError(
                "answer_prefix and a text question need a text prompt (with token ids, pass the "
                "question's token ids too)"
            )
        return [int(t) for t in prompt], [int(t) for t in question or ()]
    if question is not None and not isinstance(question, str):
        raise TokensiftError("a question given as token ids needs a prompt given as token ids")
    tok = model.tokenizer
    if tok is None:
        raise TokensiftError(f"model {model.name!r} has no tokenizer: pass token ids")
    message = prompt if question is None else join_question(prompt, question)
    templated = not raw and bool(getattr(tok, "chat_template", None))
    if templated:
        text = tok.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = message
    text += answer_prefix
    enc = tok(text, add_special_tokens=not templated, return_offsets_mapping=True)
    ids = [int(t) for t in enc["input_ids"]]
    if question is None:
        return ids, []
    boundary = text.rfind(question, 0, len(text) - len(answer_prefix))
    if boundary < 0:
        raise TokensiftError(
            f"the chat template of {model.name!r} does not keep the question in the prompt it builds "
            "(it trims or rewrites the message): use raw=True (--raw) or a template that keeps it whole"
        )
    split = next(i for i, (start, end) in enumerate(enc["offset_mapping"]) if end > boundary and end > start)
    return ids[:split], ids[split:]


def eos_ids(model: Model) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.model, "generation_config", None), model.tokenizer, model.model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


_CACHE_KWARG: dict[type, str] = {}


def _cache_kwarg(hf_model: Any) -> str:
    """The name the model's forward takes its cache by, read once per model class (every decode step
    asks; `inspect.signature` on a bound method is not free)."""
    kind = type(hf_model)
    if kind not in _CACHE_KWARG:
        params = inspect.signature(hf_model.forward).parameters
        _CACHE_KWARG[kind] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[kind]


def forward(
    model: Model,
    ids: torch.Tensor,
    cache: TokenCache,
    last_only: bool = True,
    visible: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """One forward of `ids` (1, L) appended to the cache at the positions the cache says come next.

    `visible` (L, L) bool makes it a tree forward: token i sees the new tokens j with visible[i, j]
    (its ancestors and itself) and takes the position after its ancestors (next + depth). `positions`
    (1, L) overrides the RoPE positions (the tokens still attend causally in order of appending).
    """
    start = cache.next_position
    if positions is not None:
        positions = positions.to(ids.device)
    elif visible is None:
        positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    else:
        visible = visible.to(device=ids.device, dtype=torch.bool)
        positions = (start - 1 + visible.sum(-1)).unsqueeze(0)
    kwargs = {_cache_kwarg(model.model): cache}
    with tree_mask(visible):
        out = model.model(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
            **kwargs,
        )
    return out.logits


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy when temperature is 0; otherwise temperature and nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(logits.argmax(dim=-1).item())
    probs = sampling_probs(logits, temperature, top_p)
    if probs.device != generator.device:  # the seeded CPU generator: same draws on every device
        probs = probs.cpu()
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution `sample` draws from (temperature, then nucleus), as probabilities."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs / probs.sum()


def synchronize(tensor: torch.Tensor) -> None:
    """Wait for the GPU's queued work on the tensor's device (a no-op on the CPU): timers that read
    the clock after it see the work done, not only its launch."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def check_context(model: Model, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = model.context_length
    if limit and prompt_tokens + max_new_tokens > limit:
        raise TokensiftError(
            f"prompt of {prompt_tokens} tokens plus max_new_tokens {max_new_tokens} exceeds "
            f"{model.name}'s context of {limit} tokens"
        )


@dataclass
class Decoding:
    """The state of one generation's decode phase, shared by the default loop and loop methods.

    A loop method calls `accept(token)` for every token it commits (in order) and stops when `done`;
    `forward(ids)` runs tokens through the cache at the next positions and returns their logits.
    """

    model: Model
    cache: TokenCache
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator = field(default_factory=torch.Generator)
    eos: set[int] = field(default_factory=set)
    stops: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    return_logits: bool = False
    tokens: list[int] = field(default_factory=list)
    step_logits: list[torch.Tensor] = field(default_factory=list)
    stop_reason: str = ""
    prompt: list[int] = field(default_factory=list)  # prompt token ids: loop methods draft from them
    # Called after every committed token with (decoding, token, logits or None); a non-empty return
    # value ends the generation with that stop reason (streaming, cancellation, guards).
    on_token: Callable[[Decoding, int, torch.Tensor | None], str | None] | None = None
    # Plain decoding's next-token logits (vocab,) for a committed token fed back (a batched decode
    # step, see runtime.batch); None: `forward([token])`. Loop methods call `forward` themselves.
    step: Callable[[Decoding, int], torch.Tensor] | None = None

    @property
    def done(self) -> bool:
        return bool(self.stop_reason)

    @property
    def device(self) -> torch.device:
        return next(self.model.model.parameters()).device

    def sample(self, logits: torch.Tensor) -> int:
        return sample(logits, self.temperature, self.top_p, self.generator)

    def forward(
        self,
        ids: Sequence[int],
        last_only: bool = False,
        visible: torch.Tensor | None = None,
        positions: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Logits (len(ids), vocab) or (1, vocab) for tokens appended to the cache (a tree of them
        with `visible`, at explicit `positions` if given; see `forward`)."""
        ids_t = torch.tensor([list(ids)], device=self.device)
        pos_t = None if positions is None else torch.tensor([list(positions)], device=self.device)
        return forward(self.model, ids_t, self.cache, last_only, visible, pos_t)[0]

    def accept(self, token: int, logits: torch.Tensor | None = None) -> bool:
        """Commit one generated token; returns True when generation must stop after it."""
        if self.return_logits and logits is not None:
            self.step_logits.append(logits.float().clone())
        self.tokens.append(token)
        if token in self.eos and not self.ignore_eos:
            self.stop_reason = "eos"
        elif (
            self.stops
            and self.model.tokenizer is not None
            and any(
                s in self.model.tokenizer.decode(self.tokens, skip_special_tokens=True) for s in self.stops
            )
        ):
            self.stop_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.stop_reason = "max_new_tokens"
        if self.on_token is not None:
            reason = self.on_token(self, token, logits)
            if reason and not self.stop_reason:
                self.stop_reason = reason
        return self.done


def decode_plain(decoding: Decoding, logits: torch.Tensor) -> None:
    """One token per forward: sample, commit, feed it back."""
    while True:
        token = decoding.sample(logits)
        if decoding.accept(token, logits):
            return
        if decoding.step is not None:
            logits = decoding.step(decoding, token)
        else:
            logits = decoding.forward([token], last_only=True)[-1]


def check_prefill_chunk(chunk: int | None, shared: SharedPrefill | None = None, lookahead: int = 0) -> None:
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
        raise TokensiftError(f"prefill_lookahead must be a number of tokens >= 0, got {lookahead!r}")
    if lookahead and chunk is None:
        raise TokensiftError("prefill_lookahead needs prefill_chunk: it looks ahead from each chunk")
    if chunk is None:
        return
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise TokensiftError(f"prefill_chunk must be a positive number of tokens, got {chunk!r}")
    if lookahead > chunk:
        raise TokensiftError(
            f"prefill_lookahead {lookahead} exceeds prefill_chunk {chunk}: use at most the chunk size"
        )
    if shared is not None:
        raise TokensiftError("a shared prefill is one unchunked forward: it cannot serve prefill_chunk")


def prefill_chunked(decoding: Decoding, ids: Sequence[int], chunk: int, lookahead: int = 0) -> torch.Tensor:
    """Prefill `ids` in forwards of at most `chunk` tokens; the last token's logits.

    Each forward appends its chunk at its true positions and attends to what the cache holds (the
    past as the method left it, compressed) plus itself; the eviction method then compresses as after
    any multi-token forward, so the cache peaks near budget + chunk instead of the whole prompt.
    One-shot window scorers (SnapKV, CompressKV, PyramidKV) thus score every chunk with that chunk's
    own last-window queries, a different method from one-shot compression of the whole prompt (as
    kvpress's chunk wrappers are); accumulating scorers (H2O, Keyformer) accumulate across chunks.
    The first chunk takes the remainder, so the last chunk, whose window scores the final
    compression, is a full `chunk` tokens. Budgets stay fractions of the whole prompt.

    With `lookahead` W, every chunk but the last is followed in its forward by the prompt's last W
    tokens at their true (final) positions, and their keys and values are dropped after it. They see
    the compressed past and the chunk, as the prompt's end will, and a window scorer's last queries
    are then theirs: each chunk is scored by the window one-shot compression uses (the question, in
    the query-aware protocol) instead of its own, for W more tokens per forward. Accumulating scorers
    count those queries' attention too. Keys of re-positioning methods follow slots, not true
    positions, so they refuse a lookahead.
    """
    cache = decoding.cache
    if lookahead and cache.plan.repositions:
        raise TokensiftError(
            "prefill_lookahead places the prompt's tail at its true positions; this plan re-positions "
            "kept keys by slot: drop prefill_lookahead"
        )
    if len(ids) <= chunk:
        cache.note(
            f"prefill_chunk {chunk} covers the whole prompt ({len(ids)} tokens): it was prefilled in one "
            "forward, as without prefill_chunk"
            + (f", and prefill_lookahead {lookahead} had no earlier chunk to follow" if lookahead else "")
        )
    tail = list(ids[len(ids) - lookahead :])  # empty without a lookahead
    first = len(ids) % chunk or chunk
    for start in [0, *range(first, len(ids), chunk)]:
        end = first if start == 0 else start + chunk
        if tail and end < len(ids):
            positions = [*range(start, end), *range(len(ids) - len(tail), len(ids))]
            logits = decoding.forward([*ids[start:end], *tail], last_only=True, positions=positions)[-1]
            cache.crop(-len(tail))
            cache.count("prefill_lookahead_tokens", len(tail))
        else:
            logits = decoding.forward(ids[start:end], last_only=True)[-1]
        cache.count("prefill_chunks")
    return logits


def generate(
    model: Model | str,
    prompt: Prompt | None = None,
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
    ignore_eos: bool = False,
    question: Prompt | None = None,
    shared: SharedPrefill | None = None,
    on_token: Callable[[Decoding, int, torch.Tensor | None], str | None] | None = None,
    passages: Sequence[str] | None = None,
    prefill_chunk: int | None = None,
    decode_step: Callable[[Decoding, int], torch.Tensor] | None = None,
    prefill_lookahead: int = 0,
) -> Generation:
    """Generate with a method (or `+`-composed methods) switched on; see `Generation.stats`.

    With `question`, `prompt` is a context that is prefilled and compressed on its own; the question
    (and answer prefix) is appended afterwards without eviction, so window-based scorers cannot see
    it (the query-agnostic protocol). Fractional budgets are then fractions of the context. A prompt
    given as token ids takes its question as token ids (already templated by the caller).
    `ignore_eos` keeps decoding to `max_new_tokens` (for speed measurements). `shared` is a prefill
    of the same prompt run once for several plans (see `shared_prefill`); its time is counted in
    `prefill_seconds`, plus this plan's own compression. `on_token` sees every committed token
    and may end the generation by returning a stop reason (see `Decoding.on_token`). `passages`
    (many short texts) make the context: the plan's context method (CRAG) keeps some of them before
    tokenization, and `prompt`, if given, is an instruction put before them. `prefill_chunk` prefills
    the prompt (the context, with `question`) in chunks of that many tokens, the eviction method
    compressing after each (see `prefill_chunked`); `prefill_lookahead` appends the prompt's last that
    many tokens to every earlier chunk's forward so window scorers score it as one-shot would.
    `decode_step` computes plain decoding's
    next-token logits (a batched step, see `runtime.batch.DecodeBatcher`); plans with a loop method
    refuse it.
    """
    if isinstance(model, str):
        model = load(model)
    if max_new_tokens < 1:
        raise TokensiftError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0 or not 0 < top_p <= 1 or math.isinf(temperature):
        raise TokensiftError(
            f"temperature must be a finite number >= 0 (0 is greedy) and top_p in (0, 1], "
            f"got {temperature} and {top_p}"
        )
    plan = Plan.of(method)
    prompt, context_counters = _context(plan, prompt, passages, question, seed)
    if isinstance(prompt, str) and not prompt.strip():
        raise TokensiftError("empty prompt: give some text (or token ids)")
    if question is not None and not (question.strip() if isinstance(question, str) else len(question)):
        raise TokensiftError("question is empty")
    ids, question_ids = encode_split(model, prompt, question, raw=raw, answer_prefix=answer_prefix)
    if not ids:
        raise TokensiftError("empty prompt")
    check_context(model, len(ids) + len(question_ids), max_new_tokens)
    check_prefill_chunk(prefill_chunk, shared, prefill_lookahead)
    if decode_step is not None and plan.loop is not None:
        raise TokensiftError(
            f"{plan.loop.name} decodes several tokens per forward: it cannot take a decode_step"
        )

    with torch.inference_mode():
        cache = TokenCache(model, plan, prompt_tokens=len(ids))
        cache.shared["max_new_tokens"] = max_new_tokens
        for name, value in context_counters.items():
            cache.count(name, value)
        decoding = Decoding(
            model,
            cache,
            max_new_tokens,
            temperature,
            top_p,
            torch.Generator().manual_seed(seed),
            eos_ids(model),
            [s for s in stop if s],
            ignore_eos,
            return_logits,
            prompt=ids + question_ids,
            on_token=on_token,
            step=decode_step,
        )
        t0 = time.perf_counter()
        if shared is not None:
            if not shared.serves(cache.plan, ids):
                raise TokensiftError(f"a shared prefill cannot serve {cache.plan.spec} on this prompt")
            logits = shared.fill(cache)
            t0 -= shared.seconds
        elif prefill_chunk:
            logits = prefill_chunked(decoding, ids, prefill_chunk, prefill_lookahead)
        else:
            logits = decoding.forward(ids, last_only=True)[-1]
        if question_ids:
            cache.evicting = False
            logits = decoding.forward(question_ids, last_only=True)[-1]
            cache.evicting = True
            cache.count("question_tokens", len(question_ids))
        synchronize(logits)
        prefill_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        loop = cache.plan.loop
        if loop is None:
            decode_plain(decoding, logits)
        else:
            loop.decode(decoding, logits)
        synchronize(logits)
        decode_seconds = time.perf_counter() - t1

    new, text = decoding.tokens, ""
    if model.tokenizer is not None:
        text = model.tokenizer.decode(new, skip_special_tokens=True)
        if decoding.stop_reason == "stop":
            text = text[: min(text.index(s) for s in decoding.stops if s in text)]
    stats = collect_stats(
        model,
        plan,
        cache,
        len(ids) + len(question_ids),
        len(new),
        prefill_seconds,
        decode_seconds,
        decoding.stop_reason,
    )
    stats.prefill_chunk = prefill_chunk or 0
    stats.prefill_lookahead = prefill_lookahead
    return Generation(
        text=text, token_ids=new, stats=stats, logits=decoding.step_logits if return_logits else None
    )


def _context(
    plan: Plan, prompt: Prompt | None, passages: Sequence[str] | None, question: Any, seed: int
) -> tuple[Prompt, dict[str, float]]:
    """The prompt, built from `passages` by the plan's context method when passages are given."""
    if passages is None:
        if prompt is None:
            raise TokensiftError("no prompt: give a prompt or passages")
        if plan.context is not None:
            raise TokensiftError(f"{plan.context.name} selects passages: pass passages (--passages-file)")
        return prompt, {}
    if prompt is not None and not isinstance(prompt, str):
        raise TokensiftError("with passages, the prompt is an optional text instruction put before them")
    from tokensift.runtime.context import build_context

    return build_context(plan, passages, prompt, question if isinstance(question, str) else None, seed)


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
    # Each method names the counters that measure what it changed (its hook's, by default); a plan
    # applied when every method's measure is positive. Dense has none to measure.
    measures = {**cache.counters, "tokens_evicted": cache.evicted}
    idle = [
        m for m in cache.plan.methods if m.applied_by and max(measures.get(c, 0) for c in m.applied_by) <= 0
    ]
    notes += [m.no_op_reason(cache) for m in idle]
    applied = not idle
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
