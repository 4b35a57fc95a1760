"""HKVD token selection: which chunk tokens deviate most from their cached KV at the check layer."""

from __future__ import annotations

import math

import torch


def kv_deviation(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Per-token squared deviation summed over heads and dims. fresh, cached: [H_kv, T, D] -> [T] (fp32)."""
    diff = fresh.to(torch.float32) - cached.to(torch.float32)
    return diff.square().sum(dim=(0, 2))


def num_to_select(num_tokens: int, ratio: float) -> int:
    """ceil(ratio * num_tokens), so ratio 1.0 selects every token and ratio 0 none."""
    return min(num_tokens, max(0, math.ceil(ratio * num_tokens - 1e-9)))


def select_top(deviation: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (sorted ascending) of the top `ratio` fraction of tokens by deviation."""
    n = num_to_select(deviation.numel(), ratio)
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=deviation.device)
    return torch.topk(deviation, n, sorted=False).indices.sort().values
