"""ChunkKV: one chunk's cached K and V for every layer, in one fixed layout.

Layout "2LHTD": kv[0] = K, kv[1] = V, each [num_layers, num_kv_heads, num_tokens, head_dim].
K is stored *after* RoPE, at chunk-local positions rope_offset .. rope_offset + num_tokens - 1 (the
chunk was prefilled alone, after `sink_ids`, whose rows are dropped). fusion.rope.rerotate moves it.
Cached tensors are read only: blending copies them into a new buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvblend.kvstore.key import ChunkKey

LAYOUT = "2LHTD"


@dataclass(frozen=True, slots=True)
class ChunkKV:
    key: ChunkKey
    token_ids: tuple[int, ...]
    kv: torch.Tensor  # [2, L, H_kv, T, D]
    rope_offset: int = 0
    sink_ids: tuple[int, ...] = ()
    text: str = ""

    @property
    def k(self) -> torch.Tensor:
        return self.kv[0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[1]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def to(self, device: torch.device | str, pin: bool = False) -> "ChunkKV":
        """Copy to `device`. Host -> GPU from pinned memory is asynchronous (ordered on the current stream);
        GPU -> host is blocking, so the host copy is complete when this returns."""
        device = torch.device(device)
        if device.type == "cpu":
            kv = self.kv.to(device)  # blocking: readers on the host see finished bytes
            if pin and torch.cuda.is_available() and not kv.is_pinned():
                kv = kv.pin_memory()
        else:
            kv = self.kv.to(device, non_blocking=self.kv.device.type == "cpu" and self.kv.is_pinned())
        return ChunkKV(self.key, self.token_ids, kv, self.rope_offset, self.sink_ids, self.text)
