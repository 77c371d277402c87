"""Method base classes, hook points, the registry and the Budget contract."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from tokensift.errors import TokensiftError

if TYPE_CHECKING:
    import torch

    from tokensift.runtime.cache import TokenCache, TokenLayer
    from tokensift.runtime.generate import Decoding

Budget = int | float
"""An int is a token count; a float in (0, 1] is a fraction of the prompt."""


class Hook(StrEnum):
    """The questions a method answers for each layer; methods on different hooks compose."""

    EVICT = "evict"  # which cached tokens do we keep?
    SELECT = "select"  # which cached tokens does this decode query attend to?
    PREFILL = "prefill"  # which key blocks does each prompt query block attend to?
    LOOP = "loop"  # which tokens does the big model have to produce at all?
    BIAS = "bias"  # per-head attention logit bias on chosen keys
    CONTEXT = "context"  # which passages enter the prompt at all (before tokenization)


REGISTRY: dict[str, type[Method]] = {}
T = TypeVar("T", bound="type[Method]")


def register(cls: T) -> T:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or taken")
    REGISTRY[cls.name] = cls
    return cls


def check_budget(value: Any, what: str = "budget") -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokensiftError(
            f"{what} must be an int token count or a float fraction in (0, 1], got {value!r}"
        )
    if isinstance(value, int) and value <= 0:
        raise TokensiftError(f"{what} must be a positive number of tokens, got {value}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise TokensiftError(f"{what} as a fraction of the prompt must lie in (0, 1], got {value}")


def check_finite(method: Method) -> None:
    """Every float parameter must be a finite number: NaN or inf would silently poison scores."""
    for f in fields(method):
        value = getattr(method, f.name) if f.init else None
        if isinstance(value, float) and not math.isfinite(value):
            raise TokensiftError(f"{method.name} {f.name} must be a finite number, got {value}")


def resolve_budget(value: Budget, prompt_tokens: int) -> int:
    """Token count for a budget: ints as given, fractions of the prompt rounded (at least 1)."""
    check_budget(value)
    if isinstance(value, int):
        return value
    return max(1, round(value * prompt_tokens))


@dataclass
class Method:
    """Base of every method: a typed, validated dataclass of parameters."""

    name: ClassVar[str] = ""
    hooks: ClassVar[frozenset[Hook]] = frozenset()
    paper: ClassVar[str] = ""
    repositions: ClassVar[bool] = False  # keys re-positioned inside the cache (G3-ii)
    # Stats counters that measure how much the method changed the computation: it applied to a
    # generation when one of them is positive. Each hook's base class names its own; a method whose
    # effect is measured otherwise names its counters (and records them).
    applied_by: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        check_finite(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's own `__post_init__` runs after `check_finite`, so no method can skip it."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "checks_finite", False):

            @functools.wraps(own)
            def post_init(self: Method) -> None:
                check_finite(self)
                own(self)

            post_init.checks_finite = True  # type: ignore[attr-defined]
            cls.__post_init__ = post_init  # type: ignore[method-assign]

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def no_op_reason(self, cache: TokenCache) -> str:
        """The note a generation gets when none of the `applied_by` counters is positive."""
        return f"{self.name} changed nothing: {' and '.join(self.applied_by)} stayed 0"

    def resolved_params(self) -> dict[str, Any]:
        return self.params()

    def resolve(self, prompt_tokens: int) -> Self:
        """A copy with every prompt-relative parameter turned into tokens."""
        return self

    def spec(self) -> str:
        """The method in CLI syntax, with every parameter: `name:key=value,...`."""
        args = ",".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}:{args}" if args else self.name

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


@dataclass
class EvictionMethod(Method):
    """A method that decides which cached tokens each layer keeps (hook: evict)."""

    hooks: ClassVar[frozenset[Hook]] = frozenset({Hook.EVICT})
    applied_by: ClassVar[tuple[str, ...]] = ("tokens_evicted",)
    needs_colsums: ClassVar[bool] = False  # wants attention column sums of every forward's queries
    one_shot: ClassVar[bool] = False  # compresses after the prompt only; decoding appends

    budget: Budget = 0.25
    budget_tokens: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_budget(self.budget)

    def resolve(self, prompt_tokens: int) -> Self:
        new = dataclasses.replace(self)
        new.budget_tokens = resolve_budget(self.budget, prompt_tokens)
        new.check_resolved()
        return new

    def check_resolved(self) -> None:
        """Validate parameters against the resolved token budget (raise TokensiftError)."""

    def resolved_params(self) -> dict[str, Any]:
        return {**self.params(), "budget_tokens": self.budget_tokens}

    def no_op_reason(self, cache: TokenCache) -> str:
        return (
            f"{self.name} evicted nothing: its budget of {self.budget_tokens} tokens covers all "
            f"{cache.seen_tokens} tokens processed"
        )

    @property
    def tokens(self) -> int:
        if self.budget_tokens is None:
            raise RuntimeError(f"{self.name}: budget used before it was resolved against a prompt")
        return self.budget_tokens

    # -- the eviction protocol --------------------------------------------------------------------
    # After each forward's attention in a layer, `compress` lets the method `observe` the forward
    # (accumulate scores), then, if `should_compress`, keeps the `budget` best tokens per KV head by
    # `token_scores`. Wrappers (adaptive budgets, decode-time compression) reuse these pieces.

    def observe(
        self, layer: TokenLayer, query: torch.Tensor, colsum: torch.Tensor | None, scale: float
    ) -> None:
        """Accumulate per-token state from this forward (e.g. H2O's attention sums)."""

    def layer_tokens(self, layer: TokenLayer) -> int:
        """This layer's budget (layer-adaptive methods override it)."""
        return self.tokens

    def should_compress(self, layer: TokenLayer, query: torch.Tensor) -> bool:
        """Continuous eviction by default: whenever the layer holds more than the budget."""
        return layer.n > self.layer_tokens(layer)

    def token_scores(
        self, layer: TokenLayer, query: torch.Tensor, scale: float, budget: int
    ) -> torch.Tensor | None:
        """Scores (B, H_kv, n) of the live tokens, +inf for tokens that must stay; None if the method
        cannot score now (it should `layer.cache.note` why)."""
        raise NotImplementedError

    def compress(
        self, layer: TokenLayer, query: torch.Tensor, colsum: torch.Tensor | None, scale: float
    ) -> None:
        """After this layer's attention: observe, then keep at most the budget."""
        self.observe(layer, query, colsum, scale)
        if self.should_compress(layer, query):
            self.evict_to(layer, query, scale, self.layer_tokens(layer))

    def evict_to(self, layer: TokenLayer, query: torch.Tensor, scale: float, budget: int) -> None:
        if layer.n <= budget:
            return
        scores = self.token_scores(layer, query, scale, budget)
        if scores is not None:
            layer.keep(top_tokens(scores, budget))

    def column_scores(self, layer: TokenLayer) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For `needs_colsums` methods: turn masked logits into the per-query scores whose column sums
        they accumulate. None means the softmax probabilities."""
        return None

    def prefill_scores_key(self) -> tuple[Any, ...] | None:
        """For `needs_colsums` methods: evictors with equal keys get identical column scores from a
        prompt's one-forward prefill, whatever their budgets, so one prefill serves them all
        (`runtime.shared_prefill`); each then evicts from those sums with its own budget. A method
        may return a key only if its `column_scores` of the prompt forward depend on nothing but
        what the key holds (and the layer). None, the default: every plan runs its own prefill."""
        return None


def top_tokens(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """The `budget` best slots per head, in cache order: (B, H, budget)."""
    return scores.topk(budget, dim=-1).indices.sort(dim=-1).values


@dataclass
class SparseDecodeMethod(Method):
    """Keeps the whole cache; each decode query attends to a subset it selects (hook: select)."""

    hooks: ClassVar[frozenset[Hook]] = frozenset({Hook.SELECT})
    applied_by: ClassVar[tuple[str, ...]] = ("sparse_layer_steps",)  # decode layer-steps on a subset

    def decode_attention(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention output (B, H_q, 1, D) of one decode query over a selected subset of `keys`.

        Record `layer.cache.count("selection_seconds", ...)` and `count("tokens_attended", ...)`.
        """
        raise NotImplementedError


@dataclass
class SparsePrefillMethod(Method):
    """Makes the attention of multi-token forwards sparse; decoding is left to others (hook: prefill)."""

    hooks: ClassVar[frozenset[Hook]] = frozenset({Hook.PREFILL})
    # Causal pairs no query attended to; the runtime meters every prefill forward through the
    # block-sparse engine (`runtime.block_sparse.metered`), which counts them.
    applied_by: ClassVar[tuple[str, ...]] = ("prefill_attention_pairs_skipped",)
    metered: ClassVar[bool] = True  # False for stand-ins whose multi-token forwards are not prefills

    @property
    def changes_prefill(self) -> bool:
        """Whether multi-token forwards attend other than densely (a method may be set to leave them
        dense, and then any exact dense prefill can serve it)."""
        return True

    def prefill_attention(
        self, layer: TokenLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention output (B, H_q, L, D) of L > 1 queries (the last L of the keys), causal."""
        raise NotImplementedError


@dataclass
class LoopMethod(Method):
    """Changes which tokens the model produces itself: drafting, routing (hook: loop)."""

    hooks: ClassVar[frozenset[Hook]] = frozenset({Hook.LOOP})
    # Draft tokens the model accepted. Every loop method records `draft_tokens`, `accepted_tokens`,
    # `rolled_back_tokens` and `forwards_saved` (model forwards plain decoding would have run more).
    applied_by: ClassVar[tuple[str, ...]] = ("accepted_tokens",)

    def decode(self, decoding: Decoding, logits: torch.Tensor) -> None:
        """Produce tokens through `decoding.accept(...)` until `decoding.done`; `logits` are the
        prefill's last-position logits (vocab,)."""
        raise NotImplementedError


@dataclass
class BiasMethod(Method):
    """Adds a per-head logit bias to chosen keys before the softmax (hook: bias).

    The runtime finds the cached slots that hold the chosen original positions (wherever eviction
    left them) and passes the bias to the fused attention kernel as an additive mask column.
    """

    hooks: ClassVar[frozenset[Hook]] = frozenset({Hook.BIAS})
    # Layer forwards whose attention ran with a non-zero bias on a key the cache still held.
    applied_by: ClassVar[tuple[str, ...]] = ("biased_layer_forwards",)

    def key_bias(self, layer: TokenLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positions (P,), bias (H_q, P)): the original absolute positions of the biased keys and the
        additive logit bias of every query head on each (or (B, H_q, P), one per batch row); None
        leaves this layer's attention exact."""
        raise NotImplementedError


@dataclass
class ContextMethod(Method):
    """Chooses which passages of a many-passage context enter the prompt (hook: context)."""

    hooks: ClassVar[frozenset[Hook]] = frozenset({Hook.CONTEXT})
    # Passages left out of the prompt (the runtime also records `passages_in` and `passages_kept`).
    applied_by: ClassVar[tuple[str, ...]] = ("passages_dropped",)

    def select_passages(
        self, passages: list[str], question: str | None, seed: int
    ) -> tuple[list[tuple[int, str]], dict[str, float]]:
        """The passages to keep as (index, text to send) in ascending index order (the text may
        annotate the passage), and counters for the stats."""
        raise NotImplementedError
