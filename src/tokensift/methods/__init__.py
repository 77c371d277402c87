"""Methods, one per file, registered by name when this package is imported (every module in it)."""

import importlib
import pkgutil

from tokensift.methods.base import (
    REGISTRY,
    Budget,
    EvictionMethod,
    Hook,
    LoopMethod,
    Method,
    SparseDecodeMethod,
    SparsePrefillMethod,
    resolve_budget,
)
from tokensift.methods.dense import Dense
from tokensift.methods.h2o import H2O
from tokensift.methods.snapkv import SnapKV
from tokensift.methods.spec import parse_method, parse_methods
from tokensift.methods.streaming_llm import StreamingLLM

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "H2O",
    "REGISTRY",
    "Budget",
    "Dense",
    "EvictionMethod",
    "Hook",
    "LoopMethod",
    "Method",
    "SnapKV",
    "SparseDecodeMethod",
    "SparsePrefillMethod",
    "StreamingLLM",
    "parse_method",
    "parse_methods",
    "resolve_budget",
]
