"""Dense attention: the reference every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from tokensift.methods.base import Method, register


@register
@dataclass
class Dense(Method):
    """Full KV cache and exact attention: the baseline.

    Keeps every token and attends to all of them; used as the ceiling for accuracy and the
    reference for memory and time ratios.
    """

    name = "dense"
    paper = "Vaswani et al., Attention Is All You Need, NeurIPS 2017"
