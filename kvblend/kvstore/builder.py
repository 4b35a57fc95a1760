"""Precompute a chunk's KV: the chunk prefilled alone (after optional sink tokens whose rows are dropped)."""

from __future__ import annotations

from typing import Sequence

import torch

from kvblend.model.kv import allocate_state
from kvblend.model.layers import forward_tokens
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.kvstore.key import ChunkKey, token_hash
from kvblend.model.hf import DecoderModel


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def chunk_key(model: DecoderModel, token_ids: Sequence[int], sink_ids: Sequence[int] = (), salt: str = "") -> ChunkKey:
    return ChunkKey(model.fingerprint, dtype_name(model.dtype), token_hash(token_ids, sink_ids), salt)


@torch.inference_mode()
def build_chunk_kv(model: DecoderModel, token_ids: Sequence[int], sink_ids: Sequence[int] = (),
                   text: str = "", salt: str = "") -> ChunkKV:
    """KV of `token_ids` prefilled alone at local positions len(sink_ids).., in layout 2LHTD; salt: the key's
    isolation salt (kvblend.kvstore.key.ChunkKey)."""
    if not token_ids:
        raise ValueError("cannot build the KV of an empty chunk")
    sink, ids = tuple(int(i) for i in sink_ids), tuple(int(i) for i in token_ids)
    state = allocate_state(model, len(sink) + len(ids))
    forward_tokens(model, state, sink + ids, num_logits=0)
    kv = torch.stack([state.k[:, :, len(sink):], state.v[:, :, len(sink):]]).contiguous()
    return ChunkKV(key=chunk_key(model, ids, sink, salt), token_ids=ids, kv=kv, rope_offset=len(sink),
                   sink_ids=sink, text=text)


def chunk_nbytes(model: DecoderModel, num_tokens: int) -> int:
    """Bytes of the cached KV of a chunk of `num_tokens` tokens (layout 2LHTD in the model's dtype), known
    before the chunk is fetched or built."""
    s = model.shape
    return 2 * s.num_layers * s.num_kv_heads * int(num_tokens) * s.head_dim * model.dtype.itemsize
