"""A plan: the methods a generation runs, at most one per hook point."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokensift.errors import TokensiftError
from tokensift.methods.base import (
    BiasMethod,
    ContextMethod,
    EvictionMethod,
    Hook,
    LoopMethod,
    Method,
    SparseDecodeMethod,
    SparsePrefillMethod,
)


@dataclass(frozen=True)
class Plan:
    methods: tuple[Method, ...] = ()
    prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        owner: dict[Hook, Method] = {}
        for method in self.methods:
            for hook in method.hooks:
                if hook in owner:
                    raise TokensiftError(
                        f"{owner[hook].name} and {method.name} both claim the {hook.value} hook; "
                        "compose methods that use different hooks"
                    )
                owner[hook] = method
        # The runtime asks for each hook's method in every layer of every forward: look them up once.
        object.__setattr__(self, "_owner", owner)
        evict = owner.get(Hook.EVICT)
        sparse = [owner[h] for h in (Hook.SELECT, Hook.PREFILL) if h in owner and owner[h] is not evict]
        if isinstance(evict, EvictionMethod) and evict.needs_colsums and sparse:
            raise TokensiftError(
                f"{evict.name} scores tokens with exact attention probabilities, so it cannot run with "
                f"sparse attention ({sparse[0].name})"
            )

    @classmethod
    def of(cls, spec: Plan | str | Method | Sequence[Method] | None) -> Plan:
        from tokensift.methods import parse_methods

        if spec is None:
            return cls()
        if isinstance(spec, Plan):
            return spec
        if isinstance(spec, str):
            return cls(tuple(parse_methods(spec)))
        if isinstance(spec, Method):
            return cls((spec,))
        if all(isinstance(m, Method) for m in spec):
            return cls(tuple(spec))
        raise TokensiftError(f"not a method or method spec: {spec!r}")

    @property
    def resolved(self) -> bool:
        return self.prompt_tokens is not None

    def resolve(self, prompt_tokens: int) -> Plan:
        return Plan(tuple(m.resolve(prompt_tokens) for m in self.methods), prompt_tokens)

    def by_hook(self, hook: Hook) -> Method | None:
        return self._owner.get(hook)  # type: ignore[attr-defined, no-any-return]

    @property
    def evict(self) -> EvictionMethod | None:
        method = self.by_hook(Hook.EVICT)
        assert method is None or isinstance(method, EvictionMethod)
        return method

    @property
    def select(self) -> SparseDecodeMethod | None:
        method = self.by_hook(Hook.SELECT)
        assert method is None or isinstance(method, SparseDecodeMethod)
        return method

    @property
    def prefill(self) -> SparsePrefillMethod | None:
        method = self.by_hook(Hook.PREFILL)
        assert method is None or isinstance(method, SparsePrefillMethod)
        return method

    @property
    def loop(self) -> LoopMethod | None:
        method = self.by_hook(Hook.LOOP)
        assert method is None or isinstance(method, LoopMethod)
        return method

    @property
    def bias(self) -> BiasMethod | None:
        method = self.by_hook(Hook.BIAS)
        assert method is None or isinstance(method, BiasMethod)
        return method

    @property
    def context(self) -> ContextMethod | None:
        method = self.by_hook(Hook.CONTEXT)
        assert method is None or isinstance(method, ContextMethod)
        return method

    @property
    def repositions(self) -> bool:
        return any(m.repositions for m in self.methods)

    @property
    def is_dense(self) -> bool:
        return not any(m.hooks for m in self.methods)

    @property
    def spec(self) -> str:
        return "+".join(m.spec() for m in self.methods) or "dense"

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": m.name, **m.resolved_params()} for m in self.methods] or [{"name": "dense"}]
