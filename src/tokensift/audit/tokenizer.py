"""The tokenizers under audit, seen only through what the audit needs: ids for texts, bytes for ids.

Token counts from different tokenizers are only comparable on the same text (the point of token
premiums, Arnett et al., arXiv 2510.21909). To report byte-fallback and unknown pieces, and to check
tokens against a lexicon (%TR / %Pure, Bayram et al., arXiv 2502.07057), we also need each token's
bytes: byte-level BPE spells bytes with GPT-2's printable alphabet, SentencePiece-style vocabularies
write `▁` for a space and `<0xNN>` for byte fallback, tiktoken stores raw bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from tokensift.errors import TokensiftError

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class Piece:
    """What one token id stands for: its bytes, and whether it is a byte-fallback or unknown piece."""

    data: bytes
    byte_fallback: bool = False  # a `<0xNN>` piece, or a byte-level piece that is not whole characters
    unknown: bool = False

    @property
    def text(self) -> str | None:
        """The token's text (a leading space marks a word start); None if it splits a character."""
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            return None


@dataclass
class AuditTokenizer:
    """A named tokenizer: `encode` maps texts to id lists (no special tokens), `piece` describes an id."""

    name: str
    vocab_size: int
    kind: str
    encode: Callable[[Sequence[str]], list[list[int]]]
    describe: Callable[[int], Piece]
    _pieces: dict[int, Piece] = field(default_factory=dict, repr=False)

    def piece(self, token_id: int) -> Piece:
        if token_id not in self._pieces:
            self._pieces[token_id] = self.describe(token_id)
        return self._pieces[token_id]


@cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: printable stand-ins back to the bytes they spell."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _mentions(node: Any, type_name: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == type_name or any(_mentions(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, type_name) for v in node)
    return False


def from_tokenizers(backend: Any, name: str) -> AuditTokenizer:
    """Wrap a `tokenizers.Tokenizer` (what transformers' fast tokenizers run on, and what we train)."""
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    byte_level = _mentions(spec.get("decoder"), "ByteLevel") or _mentions(
        spec.get("pre_tokenizer"), "ByteLevel"
    )
    if model.get("type") == "Unigram":
        unk_id = model.get("unk_id")
    else:
        unk_id = backend.token_to_id(model["unk_token"]) if model.get("unk_token") else None
    prefix = model.get("continuing_subword_prefix") if model.get("type") == "WordPiece" else None
    decoder = _byte_decoder()
    added = {t.content for t in backend.get_added_tokens_decoder().values()}

    def encode(texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def describe(token_id: int) -> Piece:
        token = backend.id_to_token(token_id) or ""
        if token_id == unk_id:
            return Piece(token.encode(), unknown=True)
        if token in added:
            return Piece(token.encode())
        if byte_level and all(c in decoder for c in token):
            data = bytes(decoder[c] for c in token)
            return Piece(data, byte_fallback=not _whole_chars(data))
        if match := _BYTE_PIECE.fullmatch(token):
            return Piece(bytes([int(match.group(1), 16)]), byte_fallback=True)
        if prefix and token.startswith(prefix):
            return Piece(token[len(prefix) :].encode())
        return Piece(token.replace("▁", " ").encode())

    kind = f"{model.get('type', '?')}{' byte-level' if byte_level else ''}"
    if model.get("byte_fallback"):
        kind += " byte-fallback"
    return AuditTokenizer(name, backend.get_vocab_size(with_added_tokens=True), kind, encode, describe)


def from_transformers(tokenizer: Any, name: str) -> AuditTokenizer:
    """Wrap a transformers tokenizer through its `tokenizers` backend (identical ids, batched in Rust)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokensiftError(f"tokenizer {name!r} has no fast (tokenizers) backend; the audit needs one")
    return from_tokenizers(backend, name)


def from_tiktoken(encoding: Any, name: str) -> AuditTokenizer:
    """Wrap a `tiktoken.Encoding` (byte-level BPE over raw bytes)."""

    def encode(texts: Sequence[str]) -> list[list[int]]:
        return encoding.encode_ordinary_batch(list(texts))

    def describe(token_id: int) -> Piece:
        data = encoding.decode_single_token_bytes(token_id)
        return Piece(data, byte_fallback=not _whole_chars(data))

    return AuditTokenizer(name, encoding.n_vocab, "BPE byte-level (tiktoken)", encode, describe)


def _whole_chars(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def load_audit_tokenizer(spec: str) -> AuditTokenizer:
    """`cl100k`, an embedded model name, a local tokenizer directory, a `tokenizer.json` file or a HF id."""
    from tokensift.audit.cl100k import NAME as CL100K
    from tokensift.audit.cl100k import load_cl100k

    spec = spec.strip()
    if not spec:
        raise TokensiftError("empty tokenizer name")
    if spec == CL100K:
        return from_tiktoken(load_cl100k(), CL100K)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        from tokenizers import Tokenizer

        try:
            return from_tokenizers(Tokenizer.from_file(str(path)), spec)
        except Exception as exc:  # the Rust side raises bare Exceptions with long messages
            raise TokensiftError(f"cannot load tokenizer {spec!r}: {str(exc).splitlines()[0]}") from exc
    if not path.exists() and ("/" in spec and spec.startswith((".", "/", "~"))):
        raise TokensiftError(f"tokenizer {spec!r}: no such file or directory")
    from tokensift.models import EMBEDDED, load_tokenizer

    if spec not in EMBEDDED and not path.is_dir() and "/" not in spec:
        raise TokensiftError(
            f"unknown tokenizer {spec!r}: use {CL100K}, an embedded model ({', '.join(EMBEDDED)}), "
            "a local tokenizer directory or tokenizer.json, or a Hugging Face id"
        )
    return from_transformers(load_tokenizer(spec), spec)
