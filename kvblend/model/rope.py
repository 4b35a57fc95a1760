"""Rotary position embedding: apply at absolute positions, and re-rotate cached keys by a position delta.

Keys are cached *after* RoPE at chunk-local positions (as transformers does). For RoPE types whose
rotation composes (default, linear, llama3: only per-dimension frequencies change), a key rotated at
position p is moved to position p + d by one more rotation of angle d * inv_freq.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, D] for integer positions [T]; computed in fp32 like transformers, then cast."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device, torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [H, T, D]; cos/sin: [T, D]."""
    return x * cos + rotate_half(x) * sin


def rerotate(k: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move post-RoPE keys k [..., T, D] by `delta` positions; returns a new tensor (k is untouched).

    The angle delta * inv_freq is formed in float64 so large deltas add no error of their own.
    """
    if delta == 0:
        return k.clone()
    angle = float(delta) * inv_freq.to(device=k.device, dtype=torch.float64)
    emb = torch.cat((angle, angle), dim=-1)
    cos = emb.cos().to(torch.float32)
    sin = emb.sin().to(torch.float32)
    kf = k.to(torch.float32)
    return (kf * cos + rotate_half(kf) * sin).to(k.dtype)
