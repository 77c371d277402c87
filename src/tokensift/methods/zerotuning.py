"""ZeroTuning: scale the attention chosen heads pay to the initial token."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokensift.errors import TokensiftError
from tokensift.methods.base import BiasMethod, register

if TYPE_CHECKING:
    from tokensift.runtime.cache import TokenCache, TokenLayer

Table = dict[int, dict[int, float]]  # layer -> query head -> gamma


def parse_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """`all`, `early` (the first third of the layers, rounded up), or indices and ranges `0-3/7`."""
    if isinstance(spec, list):
        layers = spec
    elif spec == "all":
        layers = list(range(num_layers))
    elif spec == "early":
        layers = list(range(math.ceil(num_layers / 3)))
    else:
        layers = []
        for part in filter(None, spec.split("/")):
            lo, dash, hi = part.partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()):
                raise TokensiftError(f"zerotuning layers must be all, early or like 0-3/7, got {spec!r}")
            layers.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise TokensiftError(f"zerotuning layer {bad[0]} does not exist (the model has {num_layers})")
    return sorted(set(layers))


def parse_heads(spec: str | list[int], q_heads: int) -> list[int]:
    """`all` or query-head indices `0/3/5`."""
    if isinstance(spec, list):
        heads = spec
    elif spec == "all":
        heads = list(range(q_heads))
    else:
        if not re.fullmatch(r"\d+(/\d+)*", spec):
            raise TokensiftError(f"zerotuning heads must be all or like 0/3/5, got {spec!r}")
        heads = [int(h) for h in spec.split("/")]
    bad = [h for h in heads if not 0 <= h < q_heads]
    if bad:
        raise TokensiftError(f"zerotuning head {bad[0]} does not exist (layers have {q_heads} query heads)")
    return sorted(set(heads))


def parse_table(text: str) -> Table:
    """A per-head table from the CLI form `LAYER.HEAD:GAMMA/...`, e.g. `0.3:1.5/2.1:0.5`."""
    table: Table = {}
    for item in filter(None, text.split("/")):
        match = re.fullmatch(r"(\d+)\.(\d+):([0-9.eE+-]+)", item.strip())
        if not match:
            raise TokensiftError(
                f"zerotuning gamma must be a number or a table like 0.3:1.5/2.1:0.5 (layer.head:gamma), "
                f"got {text!r}"
            )
        table.setdefault(int(match[1]), {})[int(match[2])] = float(match[3])
    return table


def check_gamma(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise TokensiftError(f"zerotuning gamma must be a finite number > 0, got {value}")


@register
@dataclass
class ZeroTuning(BiasMethod):
    """Scale the attention that chosen heads pay to the initial token by gamma, renormalising each row.

    In the chosen layers and heads, the post-softmax attention to the initial token becomes
    a0' = gamma * a0 / D and every other weight ai' = ai / D, with D = (gamma - 1) * a0 + 1: exactly
    a bias of log(gamma) on the initial token's logit before the softmax, which the runtime passes to
    the fused kernel as an additive mask column (no eager attention, every forward: prompt and
    decode). gamma > 1 parks more of a head's attention on the sink (what is left is spread as
    before, only smaller), gamma < 1 moves it to the content. gamma = 1 changes nothing: those layers
    run exact attention.
    The bias follows the initial token wherever the cache keeps it: an evictor that keeps sinks
    (StreamingLLM, H2O's heavy hitters usually) keeps it biased; a head whose cache dropped it has no
    key to bias and attends unbiased, which stats report (`bias_target_missing_layer_forwards`).

    The official code scales column 0 of the eager attention matrix in the chosen heads (one `heads`
    list for every chosen layer) and tunes gamma on a validation grid; `tokensift calibrate
    zerotuning` profiles heads, selects them and sweeps gamma, and `profile=` applies the result.

    Based on Han et al., "ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language
    Models Without Training", 2025 (official code: FeijiangHan/ZeroTuning).

    Parameters
    ----------
    gamma:
        Scale of the initial token's attention (> 0), or a per-head table {layer: {head: gamma}}
        (CLI: `0.3:1.5/2.1:0.5`, layer.head:gamma), which then fixes the heads itself.
    layers:
        "all", "early" (the first third, rounded up: our reading of "early layers matter most"),
        a list of layer indices, or on the CLI `0-3/7`.
    heads:
        "all", query-head indices used in every chosen layer (as the official code), a dict
        {layer: [heads]}, or on the CLI `0/3/5`.
    profile:
        A calibration artefact: "default" for the model's own (user-built, else shipped), or a
        path; its per-head table replaces gamma, layers and heads.
    """

    name = "zerotuning"
    paper = (
        "Han et al., ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language Models "
        "Without Training, 2025"
    )

    gamma: float | str | dict[int, dict[int, float]] = 1.0
    layers: str | list[int] = "all"
    heads: str | list[int] | dict[int, list[int]] = "all"
    profile: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.gamma, bool):
            raise TokensiftError(f"zerotuning gamma must be a number or a table, got {self.gamma!r}")
        if isinstance(self.gamma, str):
            try:
                self.gamma = float(self.gamma)
            except ValueError:
                self.gamma = parse_table(self.gamma)
        if isinstance(self.gamma, int | float):
            self.gamma = float(self.gamma)
            check_gamma(self.gamma)
        elif isinstance(self.gamma, dict):
            for row in self.gamma.values():
                for value in row.values():
                    check_gamma(float(value))
        else:
            raise TokensiftError(f"zerotuning gamma must be a number or a table, got {self.gamma!r}")
        for what in ("layers", "heads"):
            value = getattr(self, what)
            if isinstance(value, str) and not value.strip():
                raise TokensiftError(f"zerotuning {what} is empty")
        custom = self.gamma != 1.0 or self.layers != "all" or self.heads != "all"
        if self.profile and custom:
            raise TokensiftError("zerotuning takes either a profile or gamma/layers/heads, not both")
        if isinstance(self.gamma, dict) and (self.layers != "all" or self.heads != "all"):
            raise TokensiftError("a zerotuning gamma table names its heads: leave layers and heads at all")

    def params(self) -> dict[str, Any]:
        """Parameters in their CLI form (tables and lists as `/`-separated text), so specs round-trip."""
        out = super().params()
        if isinstance(self.gamma, dict):
            out["gamma"] = "/".join(f"{k}.{h}:{g}" for k, row in self.gamma.items() for h, g in row.items())
        for what in ("layers", "heads"):
            if isinstance(out[what], list):
                out[what] = "/".join(map(str, out[what]))
        return out

    # -- the per-head table ---------------------------------------------------------------------
    def table(self, num_layers: int, q_heads: int, handle: Any = None) -> Table:
        """{layer: {head: gamma}} for every biased head (gamma != 1) of a model of this shape."""
        if self.profile:
            from tokensift.calibration import load_artefact

            if handle is None and self.profile == "default":
                raise TokensiftError("zerotuning profile=default needs a tokensift Model (or a path)")
            artefact = load_artefact(self.name, handle, None if self.profile == "default" else self.profile)
            table: Table = {}
            for layer, head, gamma in artefact["table"]:
                table.setdefault(int(layer), {})[int(head)] = float(gamma)
        elif isinstance(self.gamma, dict):
            table = {int(k): {int(h): float(g) for h, g in v.items()} for k, v in self.gamma.items()}
        else:
            gamma = float(self.gamma)
            layers = parse_layers(self.layers, num_layers)
            table = {}
            for layer in layers:
                if isinstance(self.heads, dict):
                    heads = parse_heads(self.heads.get(layer, []), q_heads)
                else:
                    heads = parse_heads(self.heads, q_heads)
                table[layer] = dict.fromkeys(heads, gamma)
        for layer, row in table.items():
            parse_layers([layer], num_layers)
            parse_heads(list(row), q_heads)
        return {layer: {h: g for h, g in row.items() if g != 1.0} for layer, row in table.items() if row}

    def _biases(self, cache: TokenCache) -> dict[int, torch.Tensor]:
        """Per layer, the log-gamma of every query head (0 for heads left alone), built once per cache."""
        biases = cache.shared.get(self.name)
        if biases is None:
            config = cache.handle.model.config.get_text_config(decoder=True)
            q_heads = int(config.num_attention_heads)
            device = next(cache.handle.model.parameters()).device  # built once, where the logits are
            biases = {}
            for layer, row in self.table(cache.num_layers, q_heads, cache.handle).items():
                if row:
                    logs = torch.zeros(q_heads, 1)
                    for head, gamma in row.items():
                        logs[head, 0] = math.log(gamma)
                    biases[layer] = logs.to(device)
            if not biases:
                cache.note(f"{self.name}: every chosen head has gamma = 1, so attention stays exact")
            cache.shared[self.name] = biases
        return biases

    def key_bias(self, layer: TokenLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
        logs = self._biases(layer.cache).get(layer.index)
        if logs is None:
            return None
        return torch.zeros(1, dtype=torch.long, device=logs.device), logs
