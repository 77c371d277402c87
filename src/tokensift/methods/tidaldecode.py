"""TidalDecode: a few token-selection layers choose the positions every other layer attends to."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import Budget, SparseDecodeMethod, check_budget, register, resolve_budget
from tokensift.runtime.sparse_decode import (
    Stopwatch,
    dense_step,
    expand_heads,
    grouped,
    record,
    single_thread,
    sparse_attention,
    topk_indices,
)

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenLayer

# The reference re-selects at layer 13 of Llama-3-8B's 32: the same relative depth on other models.
REFERENCE_CORRECTION, REFERENCE_LAYERS = 13, 32


def default_correction_layer(num_layers: int) -> int:
    """The re-selection layer for a model depth: 13 of 32 scaled (smollm2's 30 -> 12, qwen 24 -> 10)."""
    return round(num_layers * REFERENCE_CORRECTION / REFERENCE_LAYERS)


def full_attention_logits(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact attention of decode queries (B, H_q, 1, D), its logits and probabilities (B, H_kv, rep, n).

    One explicit Q.K pass serves both the output and the top-k (SDPA would hide the logits).
    """
    b, hq, _, d = query.shape
    q = grouped(query, keys.shape[1])
    logits = (q @ keys.transpose(-1, -2)).float() * scale
    probs = torch.softmax(logits, dim=-1)
    out = probs.to(values.dtype) @ values
    return out.reshape(b, hq, 1, d), logits, probs


def select_slots(score: torch.Tensor, k: int, sinks: int, recent: int) -> torch.Tensor:
    """Top-k slots of score (..., n), the first `sinks` and the last `recent` slots always among them.

    The always-attended slots are given an infinite score (in place), so they fill the first places of
    the k and the rest go to the highest scores; k >= sinks + recent is checked by the caller.
    """
    n = score.shape[-1]
    if sinks:
        score[..., : min(sinks, n)] = float("inf")
    if recent:
        score[..., max(0, n - recent) :] = float("inf")
    return topk_indices(score, k)


def positions_to_slots(
    layer: TokenLayer, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Slots of this layer holding `positions` (B, G, k), G KV or query heads; and which exist.

    When nothing was ever evicted, slot == position. After eviction layers hold different tokens, so
    positions are looked up through an inverse map; positions this layer evicted come back invalid.
    """
    if layer.evicted == 0:
        return positions, None
    pos = layer.positions
    b, h, n = pos.shape
    inverse = torch.full((b, h, layer.seen), -1, dtype=torch.long, device=pos.device)
    inverse.scatter_(-1, pos, torch.arange(n, device=pos.device).expand(b, h, n))
    g = positions.shape[1]
    if g != h:
        inverse = inverse.repeat_interleave(g // h, dim=1)
    slots = inverse.gather(-1, positions)
    valid = slots >= 0
    return slots.clamp(min=0), (None if bool(valid.all()) else valid)


@register
@dataclass
class TidalDecode(SparseDecodeMethod):
    """Select tokens with full attention in two layers; every other layer reuses their positions.

    Decoding runs the first `sparse_layer_start` layers densely. Layer `sparse_layer_start` and the
    re-selection layer `correction_layer` are token-selection layers: they compute exact attention
    over the whole cache from explicit logits and record the top-`budget` token positions per query
    head. Every later layer is sparse: it gathers only the recorded positions and attends to them in
    one fused call, so the selection of one layer persists through the following ones ("position
    persistence"). Prefill is dense, nothing is evicted and keys keep their positions. If an eviction
    method runs in the same plan, positions are mapped to each layer's own slots (positions a layer
    evicted are skipped there).

    Defaults follow the reference (`DerrickYLJ/TidalDecode`): dense layers 0-1, selection at layer 2,
    re-selection at 13 of Llama-3-8B's 32 (`correction_layer=None` scales 13/32 to the depth: 30-layer
    SmolLM2 12, 24-layer Qwen2.5-0.5B 10, 28-layer Qwen2.5-1.5B 11); top-k per query head on the
    pre-softmax logits, under GQA query head h reading KV head h // rep (the HF reference repeats
    K/V); the current token always attended and the top-(budget - 1) taken from the rest, as the
    reference kernel does (its last page). The reference attends no fixed sinks or recent window:
    `sinks` and `recent` add them. Cache correction (re-prefilling sparsely decoded tokens) is not
    implemented.

    Measured on SmolLM2-135M (benchmarks/results/tidaldecode_diagnosis.md; 4k open continuations,
    five held-out prompts): the reference selection is lossy, not broken. The reused per-head top-k
    keeps 0.76 / 0.82 / 0.88 of dense attention mass (mean over sparse layers) at budget 256 / 512 /
    1024, against 0.94-0.99 for a fresh top-k in every layer; it misses the first token (the sink) in
    a third to a half of the heads. Greedy prefix agreement with dense over 64 tokens is 0.24 / 0.27 /
    0.36 (Quest: 0.04 / 0.26 / 0.28), measured with `recent=0`, the former default; rerun with the
    current default at 1024 on the same prompts: 0.36 vs Quest's 0.28
    (benchmarks/results/tidaldecode_agreement.md). `head_selection=shared` (one top-k of the summed
    probabilities for every head, plus 4 sinks and 64 recent tokens) keeps more mass (0.84 / 0.89 /
    0.93) but did not agree longer (0.23 / 0.26 / 0.26). Passkey on Qwen2.5-Coder-0.5B at 8k, budget 1024, ten
    held-out prompts (seed 1212, depths 0.1-0.9; benchmarks/results/tidaldecode_passkey_qwen.md):
    10 / 10, as dense (10 / 10) and Quest at 1024 (10 / 10), so that target is met; dense missed
    none, so these prompts do not separate the methods.

    Based on Yang et al., "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent
    Sparse Attention", ICLR 2025.

    Parameters
    ----------
    budget:
        Tokens (top-k positions) each query head of a sparse layer attends to, the always-attended
        ones included: an int count or a fraction of the prompt (reference: 128 for needle tests, 256
        in the demo, 4096 LongBench).
    sparse_layer_start:
        First token-selection layer; the layers before it are dense (reference: 2).
    correction_layer:
        The re-selection layer; None picks it from the model depth as above.
    head_selection:
        "query": top-k per query head, as the reference; "kv": one top-k per KV head from the
        group's maximum logit (gathers rep times fewer rows under GQA); "shared": one top-k for all
        heads from their summed attention probabilities (TokenSelect-style pooling; not the paper's).
    sinks:
        First cache slots always attended (reference: 0).
    recent:
        Last cache slots always attended, the current token being the last (reference kernel: 1;
        0 lets the current token compete, as the reference's HF code does).
    """

    name = "tidaldecode"
    paper = (
        "Yang et al., TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse "
        "Attention, ICLR 2025"
    )

    budget: Budget = 256
    sparse_layer_start: int = 2
    correction_layer: int | None = None
    head_selection: Literal["query", "kv", "shared"] = "query"
    sinks: int = 0
    recent: int = 1
    budget_tokens: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if self.sparse_layer_start < 0:
            raise TokensiftError(
                f"tidaldecode sparse_layer_start must be >= 0, got {self.sparse_layer_start}"
            )
        if self.correction_layer is not None and self.correction_layer <= self.sparse_layer_start:
            raise TokensiftError(
                f"tidaldecode correction_layer {self.correction_layer} must come after sparse_layer_start "
                f"{self.sparse_layer_start}"
            )
        if self.head_selection not in ("query", "kv", "shared"):
            raise TokensiftError(
                f"tidaldecode head_selection must be query, kv or shared, got {self.head_selection!r}"
            )
        for what, value in (("sinks", self.sinks), ("recent", self.recent)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TokensiftError(f"tidaldecode {what} must be an int >= 0, got {value!r}")

    def resolve(self, prompt_tokens: int) -> Self:
        new = dataclasses.replace(self)
        new.budget_tokens = resolve_budget(self.budget, prompt_tokens)
        if new.budget_tokens <= self.sinks + self.recent:
            raise TokensiftError(
                f"tidaldecode budget {new.budget_tokens} leaves no top-k after {self.sinks} sinks and "
                f"{self.recent} recent tokens: raise the budget or lower sinks/recent"
            )
        return new

    def resolved_params(self) -> dict[str, Any]:
        return {**self.params(), "budget_tokens": self.budget_tokens}

    @property
    def tokens(self) -> int:
        if self.budget_tokens is None:
            raise RuntimeError("tidaldecode: budget used before it was resolved against a prompt")
        return self.budget_tokens

    def layer_roles(self, num_layers: int) -> tuple[int, int]:
        """(selection layer, re-selection layer) for a model depth; a clear error if they do not fit."""
        correction = self.correction_layer
        if correction is None:
            correction = max(self.sparse_layer_start + 1, default_correction_layer(num_layers))
        if correction >= num_layers or self.sparse_layer_start >= num_layers:
            raise TokensiftError(
                f"tidaldecode layers {self.sparse_layer_start} and {correction} do not both exist in a "
                f"{num_layers}-layer model"
            )
        return self.sparse_layer_start, correction

    def decode_attention(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        start, correction = self.layer_roles(layer.cache.num_layers)
        n, i = keys.shape[2], layer.index
        if correction == layer.cache.num_layers - 1 and start == correction - 1:
            layer.cache.note(
                f"tidaldecode: in a {layer.cache.num_layers}-layer model with selection layers {start} and "
                f"{correction} no layer is sparse; decoding is dense"
            )
        if i < start:
            return dense_step(layer, query, keys, values, scale)
        if self.tokens >= n:
            layer.cache.note(
                f"tidaldecode: its budget of {self.tokens} tokens covered the whole cache at some decode "
                "steps; those steps attended densely"
            )
            return dense_step(layer, query, keys, values, scale)
        if i in (start, correction):
            return self.select(layer, query, keys, values, scale)
        chosen = layer.cache.shared.get("tidaldecode")
        if chosen is None or chosen[0] != layer.seen:
            # No selection made in this step (e.g. the selection layer held fewer tokens than the
            # budget while this one holds more): attend densely rather than to a stale selection.
            layer.cache.note(
                "tidaldecode: a sparse layer found no selection from this step; it attended densely"
            )
            return dense_step(layer, query, keys, values, scale)
        with single_thread():
            watch = Stopwatch(query.device)
            slots, valid = positions_to_slots(layer, chosen[1])
            watch.selected()
            out = sparse_attention(query, keys, values, slots, scale, valid)
            watch.attended()
            attended = slots.shape[-1] if valid is None else float(valid.float().sum(-1).mean())
            layer.extra["tidaldecode_support"] = chosen[1]
            record(layer, watch, attended, sparse=True)
            return out

    def select(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """A token-selection layer: exact attention, and the top-k positions for the layers after it."""
        watch = Stopwatch(query.device)
        out, logits, probs = full_attention_logits(query, keys, values, scale)
        watch.attended()
        b, kv, rep, n = logits.shape
        k, sinks, recent = self.tokens, self.sinks, self.recent
        if self.head_selection == "shared":
            # One selection for the layer: the query heads' attention probabilities summed.
            top = expand_heads(select_slots(probs.sum(dim=(1, 2)), k, sinks, recent), kv)  # (B, H_kv, k)
            pos = layer.positions.gather(-1, top) if layer.evicted else top
        elif self.head_selection == "kv":
            top = select_slots(logits.amax(dim=2), k, sinks, recent)  # (B, H_kv, k)
            pos = layer.positions.gather(-1, top) if layer.evicted else top
        else:
            top = select_slots(logits.reshape(b, kv * rep, n), k, sinks, recent)  # (B, H_q, k)
            pos = layer.positions.repeat_interleave(rep, dim=1).gather(-1, top) if layer.evicted else top
        # Stamped with the step (tokens seen) so layers of a later step never reuse it.
        layer.cache.shared["tidaldecode"] = (layer.seen, pos)
        layer.extra["tidaldecode_support"] = None
        watch.selected()
        layer.cache.count("selections_computed")
        record(layer, watch, n, sparse=False)
        return out
