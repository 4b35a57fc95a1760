"""The model runner: kvblend's own layer-by-layer forward over a DecoderModel's modules.

Everything that runs tokens through the model lives here: the preallocated KV state of one sequence,
the per-layer pieces (QKV with RoPE, attention over the state with a per-token causal mask: a dense mask for
SDPA or a block mask for FlexAttention, model/attention.py; o_proj + MLP),
the LM head, and `forward_tokens` (append tokens and return logits; decoding, verification of speculative
drafts and chunk building all use it). Blending (fusion/) and generation build on it; it imports neither.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from kvblend.errors import ModelError
from kvblend.model.attention import AttnMask, build_mask, dense_mask, masked_attention
from kvblend.model.hf import DecoderModel
from kvblend.model.rope import apply_rope, rope_cos_sin


@dataclass(slots=True)
class KVState:
    """KV of one sequence in preallocated buffers. k, v: [L, H_kv, capacity, D]; rows >= length are unused.

    valid [capacity] marks attendable rows: a CPU-staged chunk is a placeholder whose rows own their
    positions but stay invalid (masked out) until the chunk is promoted into them.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    valid: torch.Tensor | None = None  # bool [capacity]; None = every row < length is valid
    # host mirror of `valid` (1 = valid), so has_holes() never waits for the device
    valid_host: bytearray | None = None

    def has_holes(self) -> bool:
        return self.valid_host is not None and self.valid_host.find(0, 0, self.length) >= 0

    def set_valid(self, start: int, end: int, value: bool) -> None:
        if self.valid is None:
            self.valid = torch.ones(self.capacity, dtype=torch.bool, device=self.k.device)
            self.valid_host = bytearray(b"\x01") * self.capacity
        self.valid[start:end] = value
        self.valid_host[start:end] = (b"\x01" if value else b"\x00") * len(range(self.capacity)[start:end])

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def truncate(self, length: int) -> None:
        """Roll back to `length` tokens (rejected speculative drafts); rows past it become unused."""
        assert 0 <= length <= self.length, (length, self.length)
        self.length = length

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, :, : self.length], self.v[layer, :, : self.length]


def allocate_state(model: DecoderModel, capacity: int) -> KVState:
    s = model.shape
    shape = (s.num_layers, s.num_kv_heads, capacity, s.head_dim)
    return KVState(
        k=torch.zeros(shape, dtype=model.dtype, device=model.device),
        v=torch.zeros(shape, dtype=model.dtype, device=model.device),
    )


def qkv(model: DecoderModel, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """h [T, hidden] -> q [H, T, D], k [H_kv, T, D] (both after RoPE), v [H_kv, T, D].

    One fused QKV matmul (weights fused once at load, model.fused_layer) and one RoPE over q and k together.
    """
    s, lm = model.shape, model.layers[layer]
    f = model.fused_layer(layer)
    x = lm.input_norm(h)
    t = h.shape[0]
    y = F.linear(x, f.qkv_weight, f.qkv_bias).view(t, s.num_heads + 2 * s.num_kv_heads, s.head_dim).transpose(0, 1)
    qk = apply_rope(y[: s.num_heads + s.num_kv_heads], cos, sin)
    return qk[: s.num_heads], qk[s.num_heads:], y[s.num_heads + s.num_kv_heads:]


def write_kv(state: KVState, layer: int, pos: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor) -> None:
    if isinstance(pos, slice):
        state.k[layer, :, pos] = k
        state.v[layer, :, pos] = v
    else:
        state.k[layer].index_copy_(1, pos, k)
        state.v[layer].index_copy_(1, pos, v)


def causal_mask(q_pos: torch.Tensor, num_keys: int, state: KVState | None = None) -> torch.Tensor:
    """Boolean [r, num_keys]: key position <= query position (and the key row is valid in `state`).
    Build it once per prefill and pass it to attend_mlp for every layer that has the same queries."""
    return dense_mask(q_pos, num_keys, state.valid if state is not None and state.has_holes() else None)


def attn_mask(q_pos: torch.Tensor, num_keys: int, state: KVState | None = None,
              kernel: str | None = None) -> AttnMask:
    """The per-token causal mask of causal_mask() for the attention kernel (model/attention.py: "sdpa" builds
    the dense boolean mask, "flex" a BlockMask from the positions; None = $KVBLEND_ATTENTION, default auto:
    sdpa on every device, measured faster). Build it once per prefill and pass it to attend_mlp for every layer."""
    valid = state.valid if state is not None and state.has_holes() else None
    return build_mask(q_pos, num_keys, valid, kernel)


def mlp(model: DecoderModel, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The layer's gated MLP with one fused gate/up matmul: down(act(gate(x)) * up(x))."""
    f = model.fused_layer(layer)
    gate, up = F.linear(x, f.gate_up_weight, f.gate_up_bias).chunk(2, dim=-1)
    return f.down_proj(f.act_fn(gate) * up)


def attend_mlp(model: DecoderModel, layer: int, h: torch.Tensor, q: torch.Tensor, q_pos: torch.Tensor,
               state: KVState, num_keys: int, causal_prefix: bool,
               mask: torch.Tensor | AttnMask | None = None) -> torch.Tensor:
    """Attention of queries q [H, r, D] at positions q_pos [r] over keys [0, num_keys), then o_proj + MLP.

    causal_prefix: the queries are exactly positions 0..num_keys-1 (a plain causal prefill).
    mask: built once by the caller for several layers: either the boolean [r, num_keys] mask of
    causal_mask(q_pos, num_keys, state) (SDPA), or an AttnMask of attn_mask() (its kernel: SDPA with its
    dense mask, or FlexAttention with its block mask); None: a dense mask is built here (SDPA).
    """
    s, lm = model.shape, model.layers[layer]
    keys = state.k[layer, :, :num_keys][None]
    vals = state.v[layer, :, :num_keys][None]
    if isinstance(mask, AttnMask) and mask.kernel == "flex":
        out = masked_attention(q, state.k[layer], state.v[layer], mask.q_pos, num_keys, mask.valid,
                               model.attn_scale, mask=mask)[None]
    elif mask is None and causal_prefix and not state.has_holes():
        out = F.scaled_dot_product_attention(q[None], keys, vals, is_causal=True, scale=model.attn_scale,
                                             enable_gqa=True)
    else:
        if mask is None:
            mask = causal_mask(q_pos, num_keys, state)
        elif isinstance(mask, AttnMask):
            mask = mask.dense
        out = F.scaled_dot_product_attention(q[None], keys, vals, attn_mask=mask[None, None],
                                             scale=model.attn_scale, enable_gqa=True)
    r = q.shape[1]
    h = h + lm.o_proj(out[0].transpose(0, 1).reshape(r, s.num_heads * s.head_dim))
    return h + mlp(model, layer, lm.post_norm(h))


def lm_logits(model: DecoderModel, h: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.final_norm(h)).to(torch.float32)


def elapsed_ms(t_start: float, device: torch.device) -> float:
    """Wall time since t_start, after the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t_start) * 1e3


def check_length(model: DecoderModel, num_tokens: int) -> None:
    s = model.shape
    if num_tokens > s.max_position_embeddings:
        raise ModelError(f"{model.name}: {num_tokens} tokens exceed the model context of "
                         f"{s.max_position_embeddings}; retrieve fewer or shorter chunks")
    if s.sliding_window is not None and num_tokens > s.sliding_window:
        raise ModelError(f"{model.name}: {num_tokens} tokens exceed the sliding window of {s.sliding_window}, "
                         f"which kvblend does not implement; use a shorter prompt")


@torch.inference_mode()
def forward_tokens(model: DecoderModel, state: KVState, token_ids: Sequence[int],
                   num_logits: int | None = None, queries_out: list | None = None) -> torch.Tensor:
    """Append token_ids at positions state.length.. and return logits [num_logits, V] (fp32) of the last
    num_logits of them (all when None; 0 skips the LM head, e.g. when building a chunk's cache).

    One call verifies several speculative drafts at once; roll back with state.truncate().
    queries_out: if a list, receives each layer's queries [H, T, D] (after RoPE), for relevance proxies.
    """
    t = len(token_ids)
    start = state.length
    if start + t > state.capacity:
        raise ValueError(f"KV buffer full: {start} + {t} tokens > capacity {state.capacity}")
    dev = model.device
    pos = torch.arange(start, start + t, device=dev)
    h = model.embed_tokens(torch.tensor(list(token_ids), dtype=torch.long, device=dev))
    cos, sin = rope_cos_sin(model.inv_freq, pos, model.dtype)
    num_keys = start + t
    for layer in range(model.shape.num_layers):
        q, k, v = qkv(model, layer, h, cos, sin)
        if queries_out is not None:
            queries_out.append(q)
        write_kv(state, layer, slice(start, start + t), k, v)
        h = attend_mlp(model, layer, h, q, pos, state, num_keys, causal_prefix=(start == 0))
    state.length = num_keys
    if num_logits is not None:
        h = h[t - num_logits:] if num_logits else h[:0]
    return lm_logits(model, h)
