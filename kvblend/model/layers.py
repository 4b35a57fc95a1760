"""The decoder layer body, written once: every path that runs tokens through the model (full prefill, the
blend front, its check layers, the recompute layers, decode and verification steps, eager or captured as a
CUDA graph) calls these functions.

  qkv         h -> q, k, v (one fused matmul, RoPE on q and k together)
  layer_out   write K/V at their rows, attention of the queries over the state's keys (a per-token causal
              mask, model/attention.py), o_proj + MLP with the residuals
  run_layers  qkv + layer_out over a range of layers for one set of rows (the loop every path shares)
  lm_logits   final norm + LM head (fp32)
  forward_tokens  append tokens to a state and return their logits (prefill, chunk builds, drafters, steps)

The check layers of a blend call qkv, score the candidates, and call layer_out on the rows they keep.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from kvblend.model.attention import AttnMask, build_mask, dense_mask, masked_attention
from kvblend.model.hf import DecoderModel
from kvblend.model.kv import KVState
from kvblend.model.rope import apply_rope, rope_cos_sin


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
    """Boolean [r, num_keys]: key position <= query position (and the key row is valid in `state`)."""
    return dense_mask(q_pos, num_keys, state.valid if state is not None and state.has_holes() else None)


def attn_mask(q_pos: torch.Tensor, num_keys: int, state: KVState | None = None,
              kernel: str | None = None) -> AttnMask:
    """The per-token causal mask of causal_mask() for the attention kernel (model/attention.py: "sdpa" builds
    the dense boolean mask, "flex" a BlockMask from the positions). Build it once per set of query rows and
    pass it to every layer with those rows."""
    valid = state.valid if state is not None and state.has_holes() else None
    return build_mask(q_pos, num_keys, valid, kernel)


def mlp(model: DecoderModel, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The layer's gated MLP with one fused gate/up matmul: down(act(gate(x)) * up(x))."""
    f = model.fused_layer(layer)
    gate, up = F.linear(x, f.gate_up_weight, f.gate_up_bias).chunk(2, dim=-1)
    return f.down_proj(f.act_fn(gate) * up)


# Up to FEW_ROWS masked query rows (decode and verification steps) attend as a batch of one-row queries over
# the same keys: on the H200 (torch 2.11, cuDNN) a [1, H, r, D] query with a dense mask over a 4K-row buffer
# takes a multi-row kernel costing 6x the one-row kernel for any r >= 2 (SmolLM2 shape: 72 vs 12 us per
# layer), while r one-row queries cost 13-22 us for r = 2..16 (docs/results/bench/small_attention_h200.json).
FEW_ROWS = 16
ALL_KEYS = object()  # mask sentinel: every key in [0, num_keys) is seen (one query at the last position, no holes)


def _one_row_queries(model: DecoderModel, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Query rows q [H, r, D] attending as r one-row queries, row i to keys[i] / vals[i] [H_kv, N, D] where
    mask[i] [N] admits: [H, r, D]."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[:, :, None], keys, vals, attn_mask=mask[:, None, None],
                                         scale=model.attn_scale, enable_gqa=True)  # [r, H, 1, D]
    return out[:, :, 0].transpose(0, 1)


def _attend(model: DecoderModel, layer: int, q: torch.Tensor, q_pos: torch.Tensor | None, state: KVState,
            num_keys: int, causal_prefix: bool, mask) -> torch.Tensor:
    keys = state.k[layer, :, :num_keys][None]
    vals = state.v[layer, :, :num_keys][None]
    if isinstance(mask, AttnMask) and mask.kernel == "flex":
        return masked_attention(q, state.k[layer], state.v[layer], mask.q_pos, num_keys, mask.valid,
                                model.attn_scale, mask=mask)[None]
    if mask is ALL_KEYS:
        return F.scaled_dot_product_attention(q[None], keys, vals, scale=model.attn_scale, enable_gqa=True)
    if mask is None and causal_prefix and not state.has_holes():
        return F.scaled_dot_product_attention(q[None], keys, vals, is_causal=True, scale=model.attn_scale,
                                              enable_gqa=True)
    if mask is None:
        mask = causal_mask(q_pos, num_keys, state)
    elif isinstance(mask, AttnMask):
        mask = mask.dense
    r = q.shape[1]
    if 2 <= r <= FEW_ROWS:  # each row its own batch entry over the same (broadcast) keys: see FEW_ROWS
        return _one_row_queries(model, q, keys.expand(r, -1, -1, -1), vals.expand(r, -1, -1, -1), mask)[None]
    return F.scaled_dot_product_attention(q[None], keys, vals, attn_mask=mask[None, None],
                                          scale=model.attn_scale, enable_gqa=True)


def layer_out(model: DecoderModel, layer: int, state: KVState, h: torch.Tensor, q: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor, write_at: torch.Tensor | slice, q_pos: torch.Tensor | None,
              num_keys: int, causal_prefix: bool = False, mask=None, last_only: bool = False) -> torch.Tensor:
    """Write k, v [H_kv, R, D] at rows `write_at`, then attention of q [H, r, D] (positions q_pos [r]) over
    keys [0, num_keys), o_proj + MLP: returns h [r, hidden] (last_only: only the last row, [1, hidden]).

    causal_prefix: the queries are exactly positions 0..num_keys-1 (plain causal attention, no mask).
    mask: built once by the caller for several layers (causal_mask or attn_mask; a flex AttnMask runs
    FlexAttention) or None (a dense mask is built here from q_pos)."""
    write_kv(state, layer, write_at, k, v)
    if last_only:
        h, q = h[-1:], q[:, -1:]
        q_pos = None if q_pos is None else q_pos[-1:]
        if mask is not ALL_KEYS:
            mask = mask.last_row() if isinstance(mask, AttnMask) else (None if mask is None else mask[-1:])
        if mask is None:
            mask = causal_mask(q_pos, num_keys, state)
        causal_prefix = False
    out = _attend(model, layer, q, q_pos, state, num_keys, causal_prefix, mask)
    return _residual_out(model, layer, h, out[0])


def _residual_out(model: DecoderModel, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """attn [H, r, D] -> o_proj, residual, post-norm MLP, residual: the layer's output rows [r, hidden]."""
    s, lm = model.shape, model.layers[layer]
    h = h + lm.o_proj(attn.transpose(0, 1).reshape(h.shape[0], s.num_heads * s.head_dim))
    return h + mlp(model, layer, lm.post_norm(h))


def run_slot_layers(model: DecoderModel, k_slots: torch.Tensor, v_slots: torch.Tensor, h: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                    lengths: list[int] | None = None) -> torch.Tensor:
    """One decode token for each of S sequences held in slots of one buffer (continuous batching): rows h
    [S, hidden] at positions pos [S]; k_slots, v_slots [L, S, H_kv, R, D]: row s writes its K/V at
    [layer, s, :, pos[s]] and attends to its own slot's keys allowed by mask [S, R]. lengths None (a captured
    step): every slot at once over the whole buffer, a batch of one-row queries (as FEW_ROWS); lengths (eager
    steps): slot s attends to its first lengths[s] rows only, one attention per busy slot (0: idle, skipped).
    The layer body is the one above (qkv, then o_proj + MLP)."""
    slots = torch.arange(h.shape[0], device=h.device)
    for layer in range(model.shape.num_layers):
        q, k, v = qkv(model, layer, h, cos, sin)  # [H, S, D], [H_kv, S, D]
        k_slots[layer, slots, :, pos] = k.transpose(0, 1)
        v_slots[layer, slots, :, pos] = v.transpose(0, 1)
        if lengths is None:
            out = _one_row_queries(model, q, k_slots[layer], v_slots[layer], mask)  # [H, S, D]
        else:
            out = torch.zeros_like(q)
            for i, n in enumerate(lengths):
                if n:
                    out[:, i:i + 1] = F.scaled_dot_product_attention(
                        q[None, :, i:i + 1], k_slots[layer, i, :, :n][None], v_slots[layer, i, :, :n][None],
                        attn_mask=mask[i, :n][None, None, None], scale=model.attn_scale, enable_gqa=True)[0]
        h = _residual_out(model, layer, h, out)
    return h


def run_layers(model: DecoderModel, state: KVState, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               layers: range, write_at: torch.Tensor | slice, q_pos: torch.Tensor | None, num_keys: int,
               causal_prefix: bool = False, mask=None, last_only: bool = False,
               queries_out: list | None = None) -> torch.Tensor:
    """Rows h [r, hidden] through `layers` (the one layer loop): K/V written at `write_at`, each row
    attending to the keys its mask admits. last_only: the final layer computes only the last row (a
    prefill needs that row's logits alone). queries_out: receives each layer's queries [H, r, D]."""
    last = layers[-1] if len(layers) else -1
    for layer in layers:
        q, k, v = qkv(model, layer, h, cos, sin)
        if queries_out is not None:
            queries_out.append(q)
        h = layer_out(model, layer, state, h, q, k, v, write_at, q_pos, num_keys, causal_prefix, mask,
                      last_only=last_only and layer == last)
    return h


def lm_logits(model: DecoderModel, h: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.final_norm(h)).to(torch.float32)


def embed(model: DecoderModel, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if not isinstance(token_ids, torch.Tensor):
        token_ids = torch.tensor(list(token_ids), dtype=torch.long, device=model.device)
    return model.embed_tokens(token_ids)


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
    pos = torch.arange(start, start + t, device=model.device)
    cos, sin = rope_cos_sin(model.inv_freq, pos, model.dtype)
    last_only = num_logits is not None and num_logits <= 1  # the last layer computes the last row alone
    mask = None  # start 0 without holes: plain causal attention
    if start > 0 or state.has_holes():  # built once for every layer
        mask = ALL_KEYS if t == 1 and not state.has_holes() else causal_mask(pos, start + t, state)
    h = run_layers(model, state, embed(model, token_ids), cos, sin, range(model.shape.num_layers),
                   slice(start, start + t), pos, start + t, causal_prefix=start == 0, mask=mask,
                   last_only=last_only, queries_out=queries_out)
    state.length = start + t
    if num_logits is not None:
        h = h[h.shape[0] - num_logits:] if num_logits else h[:0]
    return lm_logits(model, h)
