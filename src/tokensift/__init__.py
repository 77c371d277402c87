"""tokensift: spend LLM inference compute and memory only on the tokens that matter."""

from tokensift.errors import NoOpWarning, TokensiftError
from tokensift.methods import H2O, Budget, Dense, Method, SnapKV, StreamingLLM, parse_methods
from tokensift.models import DEFAULT_MODEL, Model, known_models, load, wrap
from tokensift.runtime.cache import TokenCache
from tokensift.runtime.generate import Generation, GenerationStats, generate
from tokensift.runtime.plan import Plan

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "H2O",
    "Budget",
    "Dense",
    "Generation",
    "GenerationStats",
    "Method",
    "Model",
    "NoOpWarning",
    "Plan",
    "SnapKV",
    "StreamingLLM",
    "TokenCache",
    "TokensiftError",
    "generate",
    "known_models",
    "load",
    "parse_methods",
    "wrap",
]
