"""Rotary-embedding helpers for methods that re-position keys inside the cache (G3-ii)."""

from __future__ import annotations

import torch


def find_inv_freq(model: torch.nn.Module) -> torch.Tensor:
    """The rotary inverse frequencies of a transformers model (its `rotary_emb` buffer)."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            if getattr(module, "rope_type", "default") == "dynamic":
                raise ValueError("dynamic RoPE scaling cannot be re-positioned exactly")
            return inv_freq.detach().float()
    raise ValueError("model has no rotary embedding (no `inv_freq` buffer found)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def shift_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate keys cached at position p to position p + delta (RoPE rotations compose additively).

    keys: (..., n, head_dim); delta: (..., n) integer shifts, broadcastable to keys' leading dims.
    """
    angles = delta.to(torch.float32).unsqueeze(-1) * inv_freq.to(keys.device)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(keys.dtype), emb.sin().to(keys.dtype)
    return keys * cos + rotate_half(keys) * sin


class RopeTable:
    """cos/sin of every position up to a length, grown on demand: re-rotation without trigonometry."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq
        self.cos = self.sin = torch.empty(0)

    def get(self, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos.shape[0] < length or self.cos.dtype != dtype or self.cos.device != device:
            size = max(length, 2 * self.cos.shape[0], 256)
            positions = torch.arange(size, dtype=torch.float32, device=device)
            angles = positions[:, None] * self.inv_freq.to(device)
            emb = torch.cat((angles, angles), dim=-1)
            self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        return self.cos[:length], self.sin[:length]

    def rotate(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate x (..., n, D) to positions start..start+n-1."""
        n = x.shape[-2]
        cos, sin = self.get(start + n, x.dtype, x.device)
        return x * cos[start:] + rotate_half(x) * sin[start:]

    def unrotate(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Undo `rotate(x, start)`: the key as it was before RoPE."""
        n = x.shape[-2]
        cos, sin = self.get(start + n, x.dtype, x.device)
        return x * cos[start:] - rotate_half(x) * sin[start:]
