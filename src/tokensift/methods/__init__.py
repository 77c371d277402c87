"""Methods, one per file, registered by name."""

from tokensift.methods.base import REGISTRY, Budget, EvictionMethod, Hook, Method, resolve_budget
from tokensift.methods.dense import Dense
from tokensift.methods.h2o import H2O
from tokensift.methods.snapkv import SnapKV
from tokensift.methods.spec import parse_method, parse_methods
from tokensift.methods.streaming_llm import StreamingLLM

__all__ = [
    "H2O",
    "REGISTRY",
    "Budget",
    "Dense",
    "EvictionMethod",
    "Hook",
    "Method",
    "SnapKV",
    "StreamingLLM",
    "parse_method",
    "parse_methods",
    "resolve_budget",
]
