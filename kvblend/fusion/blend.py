"""Blended prefill (CacheBlend), driven layer by layer over the model's own modules.

One engine computes all three modes; they differ only in which tokens are recomputed:
  full   every token, every layer (plain prefill; the baseline);
  reuse  prefix + whole query; chunk tokens keep their cached KV (re-rotated to their new positions);
  blend  layers < check_layer run over every token; at check_layer fresh K (or V) of every chunk token is
         compared with its cached row and the top `ratio` of chunk tokens by deviation join the recompute
         set (prefix + whole query + selected), which alone goes through the remaining layers.
Recomputed tokens write fresh K/V over the cached rows of a KV buffer preallocated for the whole prompt
(plus room for decoding); cached chunk tensors are never written. Attention of a recomputed token at
position p sees exactly the keys at positions <= p (a per-token causal mask).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from kvblend.errors import ModelError
from kvblend.fusion.rope import apply_rope, rerotate, rope_cos_sin
from kvblend.fusion.select import kv_deviation, select_top
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.model.hf import DecoderModel
from kvblend.types import BlendStats, PromptIds

log = logging.getLogger(__name__)

MODES = ("full", "reuse", "blend")


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

    def has_holes(self) -> bool:
        return self.valid is not None and not bool(self.valid[: self.length].all())

    def set_valid(self, start: int, end: int, value: bool) -> None:
        if self.valid is None:
            self.valid = torch.ones(self.capacity, dtype=torch.bool, device=self.k.device)
        self.valid[start:end] = value

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def truncate(self, length: int) -> None:
        """Roll back to `length` tokens (rejected speculative drafts); rows past it become unused."""
        assert 0 <= length <= self.length, (length, self.length)
        self.length = length

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, :, : self.length], self.v[layer, :, : self.length]


@dataclass(slots=True)
class PrefillResult:
    state: KVState
    logits: torch.Tensor  # [V] at the last prompt position (fp32)
    stats: BlendStats


def allocate_state(model: DecoderModel, capacity: int) -> KVState:
    s = model.shape
    shape = (s.num_layers, s.num_kv_heads, capacity, s.head_dim)
    return KVState(
        k=torch.zeros(shape, dtype=model.dtype, device=model.device),
        v=torch.zeros(shape, dtype=model.dtype, device=model.device),
    )


def _qkv(model: DecoderModel, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """h [T, hidden] -> q [H, T, D], k [H_kv, T, D] (both after RoPE), v [H_kv, T, D]."""
    s, lm = model.shape, model.layers[layer]
    x = lm.input_norm(h)
    t = h.shape[0]
    q = lm.q_proj(x).view(t, s.num_heads, s.head_dim).transpose(0, 1)
    k = lm.k_proj(x).view(t, s.num_kv_heads, s.head_dim).transpose(0, 1)
    v = lm.v_proj(x).view(t, s.num_kv_heads, s.head_dim).transpose(0, 1)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _write_kv(state: KVState, layer: int, pos: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor) -> None:
    if isinstance(pos, slice):
        state.k[layer, :, pos] = k
        state.v[layer, :, pos] = v
    else:
        state.k[layer].index_copy_(1, pos, k)
        state.v[layer].index_copy_(1, pos, v)


def _attend_mlp(model: DecoderModel, layer: int, h: torch.Tensor, q: torch.Tensor, q_pos: torch.Tensor,
                state: KVState, num_keys: int, causal_prefix: bool) -> torch.Tensor:
    """Attention of queries q [H, r, D] at positions q_pos [r] over keys [0, num_keys), then o_proj + MLP.

    causal_prefix: the queries are exactly positions 0..num_keys-1 (a plain causal prefill).
    """
    s, lm = model.shape, model.layers[layer]
    keys = state.k[layer, :, :num_keys][None]
    vals = state.v[layer, :, :num_keys][None]
    holes = state.has_holes()
    if causal_prefix and not holes:
        out = F.scaled_dot_product_attention(q[None], keys, vals, is_causal=True, scale=model.attn_scale,
                                             enable_gqa=True)
    else:
        # per-token causal mask: key position <= query position
        mask = torch.arange(num_keys, device=q.device)[None, :] <= q_pos[:, None]
        if holes:
            mask = mask & state.valid[None, :num_keys]
        out = F.scaled_dot_product_attention(q[None], keys, vals, attn_mask=mask[None, None],
                                             scale=model.attn_scale, enable_gqa=True)
    r = q.shape[1]
    h = h + lm.o_proj(out[0].transpose(0, 1).reshape(r, s.num_heads * s.head_dim))
    return h + lm.mlp(lm.post_norm(h))


def _logits(model: DecoderModel, h: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.final_norm(h)).to(torch.float32)


def _place_chunk(state: KVState, chunk: ChunkKV, start: int, model: DecoderModel) -> None:
    """Copy a cached chunk into rows start.. of the buffer, keys re-rotated to those positions."""
    end = start + chunk.num_tokens
    state.k[:, :, start:end] = rerotate(chunk.k.to(model.device), start - chunk.rope_offset, model.inv_freq)
    state.v[:, :, start:end] = chunk.v.to(model.device)


def _elapsed_ms(t_start: float, device: torch.device) -> float:
    """Wall time since t_start, after the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t_start) * 1e3


def _check_length(model: DecoderModel, num_tokens: int) -> None:
    s = model.shape
    if num_tokens > s.max_position_embeddings:
        raise ModelError(f"{model.name}: {num_tokens} tokens exceed the model context of "
                         f"{s.max_position_embeddings}; retrieve fewer or shorter chunks")
    if s.sliding_window is not None and num_tokens > s.sliding_window:
        raise ModelError(f"{model.name}: {num_tokens} tokens exceed the sliding window of {s.sliding_window}, "
                         f"which kvblend does not implement; use a shorter prompt")


def _validate_chunks(chunks: Sequence[ChunkKV], chunk_ids: Sequence[Sequence[int]], model: DecoderModel) -> None:
    for i, (ids, ck) in enumerate(zip(chunk_ids, chunks)):
        # token ids end to end: cached KV is used only for exactly the ids it was computed from
        if tuple(ck.token_ids) != tuple(ids):
            raise ValueError(f"chunk {i}: cached KV was computed for other token ids ({ck.key})")
        if ck.key.model_fingerprint != model.fingerprint:
            raise ValueError(f"chunk {i}: cached KV belongs to model {ck.key.model_fingerprint}, not {model.fingerprint}")
        if ck.k.shape[0] != model.shape.num_layers or ck.k.shape[1] != model.shape.num_kv_heads:
            raise ValueError(f"chunk {i}: cached KV shape {tuple(ck.k.shape)} does not fit model {model.name}")


@torch.inference_mode()
def prefill(model: DecoderModel, prompt: PromptIds, chunks: Sequence[ChunkKV] | None = None,
            mode: str = "blend", ratio: float = 0.15, check_layer: int = 1, score_on: str = "k",
            extra_capacity: int = 0, resident: Sequence[bool] | None = None) -> PrefillResult:
    """Prefill `prompt`, reusing `chunks` (cached KV of prompt.chunk_ids, same order) per `mode`.

    resident: per chunk, False makes it a placeholder: its positions are reserved but nothing attends to
    it (its entry in `chunks` may be None) until promote_chunk() fills it. Needs mode reuse or blend.
    Returns the KV state (buffers sized for the prompt + extra_capacity decode tokens) and the last
    position's logits.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; use one of {', '.join(MODES)}")
    s = model.shape
    if mode == "blend" and not 1 <= check_layer < s.num_layers:
        raise ValueError(f"check_layer must be in [1, {s.num_layers - 1}], got {check_layer}")
    resident = [True] * len(prompt.chunk_ids) if resident is None else list(resident)
    if len(resident) != len(prompt.chunk_ids):
        raise ValueError(f"{len(resident)} resident flags for {len(prompt.chunk_ids)} chunks")
    if mode == "full" and not all(resident):
        raise ValueError("placeholders need mode reuse or blend (full prefill computes every chunk)")
    if mode != "full":
        if chunks is None:
            raise ValueError(f"mode '{mode}' needs the cached chunks")
        if len(chunks) != len(prompt.chunk_ids):
            raise ValueError(f"{len(chunks)} cached chunks given for {len(prompt.chunk_ids)} prompt chunks")
        _validate_chunks([c for c, r in zip(chunks, resident) if r],
                         [ids for ids, r in zip(prompt.chunk_ids, resident) if r], model)
    if not prompt.query_ids:
        raise ValueError("the query is empty; the last prompt token must belong to the query")
    n = prompt.num_tokens
    _check_length(model, n + extra_capacity)
    dev = model.device
    t_start = time.perf_counter()
    state = allocate_state(model, n + extra_capacity)
    state.length = n

    # place cached chunk KV at its global positions (new tensors; the cache is read only)
    chunk_pos_parts: list[torch.Tensor] = []
    start = len(prompt.prefix_ids)
    for i, ids in enumerate(prompt.chunk_ids):
        end = start + len(ids)
        if not resident[i]:
            state.set_valid(start, end, False)
        elif mode != "full":
            _place_chunk(state, chunks[i], start, model)
        if resident[i]:
            chunk_pos_parts.append(torch.arange(start, end, device=dev))
        start = end
    kv_load_ms = _elapsed_ms(t_start, dev)
    chunk_pos = torch.cat(chunk_pos_parts) if chunk_pos_parts else torch.empty(0, dtype=torch.long, device=dev)
    always = torch.cat([torch.arange(len(prompt.prefix_ids), device=dev), torch.arange(start, n, device=dev)])

    ids = torch.tensor(prompt.flat(), dtype=torch.long, device=dev)
    h = model.embed_tokens(ids)  # [N, hidden]
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(n, device=dev), model.dtype)

    # active: every position that is computed at all (placeholders are not); pos: the recompute set
    active = torch.cat([always, chunk_pos]).sort().values
    selected = torch.empty(0, dtype=torch.long, device=dev)
    first_partial = 0
    if mode == "full":
        pos = active
    elif mode == "reuse":
        pos = always
    else:
        h = h[active]
        cos_a, sin_a = cos[active], sin[active]
        dense = active.numel() == n
        for layer in range(check_layer):
            q, k, v = _qkv(model, layer, h, cos_a, sin_a)
            _write_kv(state, layer, slice(0, n) if dense else active, k, v)
            h = _attend_mlp(model, layer, h, q, active, state, n, causal_prefix=dense)
        q, k, v = _qkv(model, check_layer, h, cos_a, sin_a)
        lut = torch.full((n,), -1, dtype=torch.long, device=dev)
        lut[active] = torch.arange(active.numel(), device=dev)
        fresh = (k if score_on == "k" else v)[:, lut[chunk_pos]]
        cached = (state.k if score_on == "k" else state.v)[check_layer][:, chunk_pos]
        selected = chunk_pos[select_top(kv_deviation(fresh, cached), ratio)]
        pos = torch.cat([always, selected]).sort().values
        rows = lut[pos]
        _write_kv(state, check_layer, pos, k[:, rows], v[:, rows])
        if check_layer == s.num_layers - 1:
            rows = rows[-1:]
            pos_out = pos[-1:]
        else:
            pos_out = pos
        h = _attend_mlp(model, check_layer, h[rows], q[:, rows], pos_out, state, n, causal_prefix=False)
        first_partial = check_layer + 1

    if mode != "blend":
        h = h[pos]
    is_all = pos.numel() == n
    cos_r, sin_r = cos[pos], sin[pos]
    for layer in range(first_partial, s.num_layers):
        q, k, v = _qkv(model, layer, h, cos_r, sin_r)
        _write_kv(state, layer, slice(0, n) if is_all else pos, k, v)
        if layer == s.num_layers - 1:  # only the last position's output is needed
            h = _attend_mlp(model, layer, h[-1:], q[:, -1:], pos[-1:], state, n, causal_prefix=False)
        else:
            h = _attend_mlp(model, layer, h, q, pos, state, n, causal_prefix=is_all)
    logits = _logits(model, h[-1])
    prefill_ms = _elapsed_ms(t_start, dev)
    stats = BlendStats(
        mode=mode, num_tokens=n, num_chunk_tokens=int(chunk_pos.numel()),
        num_recomputed=int(pos.numel()), selected_positions=tuple(selected.tolist()),
        prefill_ms=prefill_ms, kv_load_ms=kv_load_ms,
    )
    return PrefillResult(state=state, logits=logits, stats=stats)


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
        q, k, v = _qkv(model, layer, h, cos, sin)
        if queries_out is not None:
            queries_out.append(q)
        _write_kv(state, layer, slice(start, start + t), k, v)
        h = _attend_mlp(model, layer, h, q, pos, state, num_keys, causal_prefix=(start == 0))
    state.length = num_keys
    if num_logits is not None:
        h = h[t - num_logits:] if num_logits else h[:0]
    return _logits(model, h)


@torch.inference_mode()
def promote_chunk(model: DecoderModel, state: KVState, chunk: ChunkKV, start: int) -> None:
    """Fill a placeholder's reserved rows with its cached KV (re-rotated) and make them attendable.

    Tokens decoded after the placeholder did not attend to it; from the next forward on they do.
    """
    end = start + chunk.num_tokens
    if state.valid is None or bool(state.valid[start:end].any()):
        raise ValueError(f"rows {start}..{end} are not a placeholder of this state")
    _place_chunk(state, chunk, start, model)
    state.set_valid(start, end, True)
