"""The one attention function tokensift registers with transformers' AttentionInterface.

`TokenLayer.update` hands the layer it just updated to this function (a context variable set in the
same layer's forward); the function runs that layer's part of the plan: dense or method-specific
attention, then the method's cache update (eviction). Models are never patched: they only get
`attn_implementation="tokensift"`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from tokensift.errors import TokensiftError
from tokensift.runtime import block_sparse
from tokensift.runtime.batch import PENDING_ROWS
from tokensift.runtime.cache import PENDING, TokenLayer
from tokensift.runtime.scores import (
    ACTIVE_BIAS,
    ACTIVE_TREE,
    KeyBias,
    attention_with_colsums,
    dense_attention,
    key_bias,
)

NAME = "tokensift"


def tokensift_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise TokensiftError("tokensift attention does not support soft-capping or attention sinks logits")
    if attention_mask is not None:
        raise TokensiftError(
            "tokensift attention received an attention mask; padded batches are not supported"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    rows = PENDING_ROWS.get()
    if rows is not None:
        # A batched decode step (runtime.batch): each row attends over its own cache, as alone.
        PENDING_ROWS.set(None)
        outs = [attend(module, layer, query[b : b + 1], k, v, scale) for b, (layer, k, v) in enumerate(rows)]
        return torch.cat(outs, dim=0).transpose(1, 2).contiguous(), None
    layer = PENDING.get()
    if layer is not None:
        PENDING.set(None)
    if layer is None:
        out = dense_attention(query, key, value, scale)
    else:
        out = attend(module, layer, query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


def attend(
    module: torch.nn.Module,
    layer: TokenLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One cache layer's attention under its plan (observer, bias, method kernels, eviction)."""
    if layer.index != getattr(module, "layer_idx", layer.index):
        raise RuntimeError(f"cache layer {layer.index} does not match attention layer {module.layer_idx}")
    if layer.cache.observer is not None:
        layer.cache.observer(module, layer, query, key, value, scale)
    tree = ACTIVE_TREE.get()
    if tree is not None:
        tree.used = False
    columns = bias_columns(layer, query)
    if columns is None and ACTIVE_BIAS.get() is None:
        out = run_layer(layer, query, key, value, scale)  # no bias to set or clear: skip the context
    else:
        with key_bias(columns) as bias:
            out = run_layer(layer, query, key, value, scale)
        if bias is not None:
            record_bias(layer, bias)
    if tree is not None and query.shape[2] > 1 and not tree.used:
        raise TokensiftError(
            "a tree-masked forward reached an attention kernel that takes no tree mask "
            "(sparse or per-head layers): verify drafts as paths with this plan"
        )
    return out


def bias_columns(layer: TokenLayer, query: torch.Tensor) -> torch.Tensor | None:
    """The plan's logit bias for this layer as additive columns (B, H_q, n), or None (exact attention).

    The bias method names original positions; the columns follow those tokens to whatever slots the
    cache keeps them in. A target an evictor dropped gets no bias (there is no key to bias).
    """
    method = layer.cache.plan.bias
    spec = None if method is None else method.key_bias(layer)
    if spec is None:
        return None
    assert method is not None
    cache = layer.cache
    prefill = cache.plan.prefill if query.shape[2] > 1 else None
    if getattr(layer, "ragged", False) or prefill is not None:
        # Per-head ragged storage and block-sparse prefill kernels take no bias: say so, never half-apply.
        where = f"{prefill.name} prefill forwards" if prefill else "layers holding per-head budgets (ragged)"
        cache.note(f"{method.name}: {where} attend without the bias")
        cache.count("bias_skipped_layer_forwards")
        return None
    columns, complete = layer.bias_columns(*spec)
    if not complete:
        cache.count("bias_target_missing_layer_forwards")
        cache.note(
            f"{method.name}: the cache no longer holds a biased token in some heads (evicted); "
            "those heads attend without the bias"
        )
    if not bool(columns.any()):
        return None
    return columns


def record_bias(layer: TokenLayer, bias: KeyBias) -> None:
    cache = layer.cache
    if bias.used:
        cache.count("biased_layer_forwards")
        return
    cache.count("bias_skipped_layer_forwards")
    owners = [m.name for m in (cache.plan.prefill, cache.plan.select) if m is not None]
    cache.note(
        f"{cache.plan.bias.name if cache.plan.bias else 'bias'}: the attention kernel of "
        f"{' / '.join(owners) or 'this layer'} does not take a logit bias; some layer forwards ran unbiased"
    )


def run_layer(
    layer: TokenLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention for one layer under the cache's plan, then the plan's eviction for that layer.

    Multi-token forwards go to the plan's sparse-prefill method, single decode queries to its
    sparse-decode method, everything else to exact attention; an evictor that scores with attention
    probabilities gets them from an exact chunked pass.
    """
    plan = layer.cache.plan
    evict = plan.evict if layer.cache.evicting else None
    if getattr(layer, "ragged", False):
        # Heads of different lengths (head-adaptive budgets): exact attention per KV head.
        selector = plan.select if query.shape[2] == 1 else plan.prefill
        if selector is not None:
            layer.cache.note(
                f"{selector.name}: layers holding per-head budgets (ragged) attend densely; "
                "the sparse method did not run there"
            )
        out = layer.attention(query, scale)
        if evict is not None:
            evict.compress(layer, query, None, scale)
        return out
    colsum = None
    if evict is not None and evict.needs_colsums:
        out, colsum = attention_with_colsums(query, key, value, scale, score_fn=evict.column_scores(layer))
    elif query.shape[2] > 1 and plan.prefill is not None:
        # Count the (row, key) pairs the method computed and skipped, against dense causal attention.
        meter = (
            block_sparse.metered(layer.cache, query, key.shape[2]) if plan.prefill.metered else nullcontext()
        )
        with meter:
            out = plan.prefill.prefill_attention(layer, query, key, value, scale)
    elif query.shape[2] == 1 and plan.select is not None:
        out = plan.select.decode_attention(layer, query, key, value, scale)
    else:
        out = dense_attention(query, key, value, scale)
    if evict is not None:
        evict.compress(layer, query, colsum, scale)
    return out


def tokensift_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> None:
    """No mask tensor: causality follows from shapes (new queries are the last keys)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise TokensiftError(
            "padded batches are not supported by tokensift attention: run one sequence at a time"
        )
    return None


def register() -> None:
    AttentionInterface.register(NAME, tokensift_attention)
    AttentionMaskInterface.register(NAME, tokensift_mask)


def install(model: torch.nn.Module) -> None:
    """Switch a transformers model to tokensift attention (through its public setter)."""
    register()
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise TokensiftError(f"{type(model).__name__} does not accept a registered attention function")
