"""The method syntax used everywhere: `name[:key=value,...]`, composed with `+`."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Literal, get_args, get_origin

from tokensift.errors import TokensiftError
from tokensift.methods.base import REGISTRY, Method

WRAPPER = re.compile(r"(\w+)\((.*)\)(?::(.*))?", re.S)


def parse_method(text: str) -> Method:
    """One method from `name[:key=value,...]`, or a wrapper `name(inner)[:key=value,...]`."""
    text = text.strip()
    wrapped = WRAPPER.fullmatch(text)
    if wrapped:
        name, inner, args = wrapped.group(1), wrapped.group(2), wrapped.group(3) or ""
    else:
        name, _, args = text.partition(":")
        name, inner = name.strip(), None
    if name not in REGISTRY:
        raise TokensiftError(f"unknown method {name!r}: known methods are {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    wraps = getattr(cls, "wraps", False)
    if wraps and inner is None:
        raise TokensiftError(f"{name} wraps a method: write {name}(snapkv:budget=0.25)")
    if inner is not None and not wraps:
        raise TokensiftError(f"{name} does not wrap another method")
    hints = typing.get_type_hints(cls)
    params = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name not in ("method",)}
    if wraps:
        params.pop("budget", None)  # a wrapper takes its budget from the method it wraps
    values: dict[str, Any] = {} if inner is None else {"method": parse_method(inner)}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise TokensiftError(f"malformed parameter {item!r} in {text!r}: expected key=value")
        if key not in params:
            known = ", ".join(params) or "none"
            raise TokensiftError(f"{name} has no parameter {key!r}: its parameters are {known}")
        values[key] = convert(raw.strip(), params[key], f"{name}.{key}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise TokensiftError(f"bad parameters for {name}: {exc}") from exc


def split_top_level(text: str, separator: str) -> list[str]:
    """Split on a separator outside parentheses (wrappers nest specs)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char == "(") - (char == ")")
        if char == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def parse_methods(text: str) -> list[Method]:
    """Methods joined with `+` (one composed plan)."""
    parts = split_top_level(text, "+")
    if not text.strip() or any(not p.strip() for p in parts):
        raise TokensiftError(f"malformed method spec {text!r}: expected NAME[:key=value,...][+NAME...]")
    return [parse_method(p) for p in parts]


def convert(raw: str, annotation: Any, where: str) -> Any:
    """Turn a CLI string into a value of the parameter's annotated type."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        if raw not in args:
            raise TokensiftError(f"{where} must be one of {', '.join(map(str, args))}, got {raw!r}")
        return raw
    if args and type(None) in args:
        if raw.lower() == "none":
            return None
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
        origin, args = get_origin(annotation), get_args(annotation)
    if set(args) == {int, float}:
        try:
            return int(raw)
        except ValueError:
            pass
        try:
            return float(raw)
        except ValueError:
            raise TokensiftError(f"{where} must be a number, got {raw!r}") from None
    if annotation is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise TokensiftError(f"{where} must be true or false, got {raw!r}")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            raise TokensiftError(f"{where} must be {annotation.__name__}, got {raw!r}") from None
    if annotation is str:
        return raw
    if len(args) > 1:
        # A union (e.g. a number or a textual table): the first member the text converts to.
        for member in args:
            if member in (int, float, bool, str):
                try:
                    return convert(raw, member, where)
                except TokensiftError:
                    continue
    raise TokensiftError(f"{where} cannot be set from the command line")


def with_compression_ratio(spec: str, ratio: float) -> str:
    """`spec` with every eviction method's budget set to keep `1 - ratio` of the prompt.

    kvpress writes compression as the fraction removed (`compression_ratio=0.75` keeps a quarter);
    this maps one to one onto our budgets, so `snapkv --compression-ratio 0.75` is
    `snapkv:budget=0.25`. Methods without an eviction hook (dense, sparse decoding, loops) are left as
    they are; a spec that also names a budget is refused rather than silently overridden.
    """
    from tokensift.methods.base import EvictionMethod

    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio < 1.0:
        raise TokensiftError(
            f"compression ratio must lie in [0, 1) (the fraction of the KV cache removed), got {ratio!r}"
        )
    parse_methods(spec)  # the whole spec's syntax first
    keep = round(1.0 - ratio, 10)
    methods = []
    for part in split_top_level(spec, "+"):
        method = parse_method(part)
        if isinstance(method, EvictionMethod):
            if re.search(r"\bbudget\s*=", part):
                raise TokensiftError(
                    f"{part.strip()!r} names a budget and a compression ratio: give one of them "
                    f"(compression ratio {ratio} means budget={keep:g})"
                )
            inner = getattr(method, "method", None)
            if isinstance(inner, EvictionMethod):  # a wrapper takes its budget from the method it wraps
                method = dataclasses.replace(method, method=dataclasses.replace(inner, budget=keep))
            else:
                method = dataclasses.replace(method, budget=keep)
        methods.append(method)
    return "+".join(m.spec() for m in methods)
