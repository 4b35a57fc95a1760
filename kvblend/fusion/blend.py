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

from kvblend.fusion.select import CheckLayer, SelectionPolicy, select_candidates
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.model.hf import DecoderModel
from kvblend.model.rope import rerotate, rope_cos_sin
from kvblend.model.runner import (KVState, allocate_state, attend_mlp, check_length, elapsed_ms, lm_logits, qkv,
                                   write_kv)
from kvblend.types import BlendStats, PromptIds
from kvblend.vocab import MODES

log = logging.getLogger(__name__)



@dataclass(slots=True)
class PrefillResult:
    state: KVState
    logits: torch.Tensor  # [V] at the last prompt position (fp32)
    stats: BlendStats


def _place_chunk(state: KVState, chunk: ChunkKV, start: int, model: DecoderModel) -> None:
    """Copy a cached chunk into rows start.. of the buffer, keys re-rotated to those positions."""
    end = start + chunk.num_tokens
    state.k[:, :, start:end] = rerotate(chunk.k.to(model.device), start - chunk.rope_offset, model.inv_freq)
    state.v[:, :, start:end] = chunk.v.to(model.device)


def _validate_chunks(chunks: Sequence[ChunkKV], chunk_ids: Sequence[Sequence[int]], model: DecoderModel) -> None:
    for i, (ids, ck) in enumerate(zip(chunk_ids, chunks)):
        # token ids end to end: cached KV is used only for exactly the ids it was computed from
        if tuple(ck.token_ids) != tuple(ids):
            raise ValueError(f"chunk {i}: cached KV was computed for other token ids ({ck.key})")
        if ck.key.model_fingerprint != model.fingerprint:
            raise ValueError(f"chunk {i}: cached KV belongs to model {ck.key.model_fingerprint}, not {model.fingerprint}")
        if ck.k.shape[0] != model.shape.num_layers or ck.k.shape[1] != model.shape.num_kv_heads:
            raise ValueError(f"chunk {i}: cached KV shape {tuple(ck.k.shape)} does not fit model {model.name}")


def _check_and_select(model: DecoderModel, state: KVState, h: torch.Tensor, rows_pos: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, always: torch.Tensor, chunk_pos: torch.Tensor,
                      chunk_off: torch.Tensor, query_start: int, n: int, check_layer: int, ratio: float,
                      policy: SelectionPolicy):
    """The check layer(s) of a blend: score the candidate chunk tokens, keep the policy's budget, recompute
    prefix + query + kept tokens through the layer; with policy.layers > 1 the survivors are narrowed again
    at each following layer. h: hidden states of rows_pos entering check_layer.
    Returns (h of the recompute set, its positions, the selected chunk positions, the first layer after)."""
    num_layers = model.shape.num_layers
    last = min(check_layer + policy.layers, num_layers) - 1
    cand, cand_off = chunk_pos, chunk_off
    query_pos = torch.arange(query_start, n, device=h.device)
    pos = rows_pos
    for step, layer in enumerate(range(check_layer, last + 1)):
        q, k, v = qkv(model, layer, h, cos[rows_pos], sin[rows_pos])
        check = CheckLayer(q=q, k=k, v=v, rows_pos=rows_pos, cached_k=state.k[layer], cached_v=state.v[layer],
                           cand_pos=cand, query_pos=query_pos, num_keys=n, scale=model.attn_scale,
                           valid=state.valid if state.has_holes() else None)
        budget = policy.budget(step, last - check_layer + 1, ratio, chunk_pos.numel())
        forced = cand_off < policy.first_tokens if policy.first_tokens else None
        keep = select_candidates(policy, check, budget, forced)
        cand, cand_off = cand[keep], cand_off[keep]
        pos = torch.cat([always, cand]).sort().values
        rows = check.rows_of(pos)
        write_kv(state, layer, pos, k[:, rows], v[:, rows])
        if layer == num_layers - 1:
            rows, pos_out = rows[-1:], pos[-1:]
        else:
            pos_out = pos
        h = attend_mlp(model, layer, h[rows], q[:, rows], pos_out, state, n, causal_prefix=False)
        rows_pos = pos
    return h, pos, cand, last + 1


@torch.inference_mode()
def prefill(model: DecoderModel, prompt: PromptIds, chunks: Sequence[ChunkKV] | None = None,
            mode: str = "blend", ratio: float = 0.15, check_layer: int = 1, score_on: str = "k",
            extra_capacity: int = 0, resident: Sequence[bool] | None = None,
            selection: SelectionPolicy | None = None) -> PrefillResult:
    """Prefill `prompt`, reusing `chunks` (cached KV of prompt.chunk_ids, same order) per `mode`.

    resident: per chunk, False makes it a placeholder: its positions are reserved but nothing attends to
    it (its entry in `chunks` may be None) until promote_chunk() fills it. Needs mode reuse or blend.
    selection: which chunk tokens blend recomputes (fusion/select.py); None = SelectionPolicy(score_on).
    Returns the KV state (buffers sized for the prompt + extra_capacity decode tokens) and the last
    position's logits.
    """
    selection = selection if selection is not None else SelectionPolicy(signal=score_on)
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
    check_length(model, n + extra_capacity)
    dev = model.device
    t_start = time.perf_counter()
    state = allocate_state(model, n + extra_capacity)
    state.length = n

    # place cached chunk KV at its global positions (new tensors; the cache is read only)
    chunk_pos_parts: list[torch.Tensor] = []
    chunk_off_parts: list[torch.Tensor] = []  # each chunk token's offset inside its chunk
    start = len(prompt.prefix_ids)
    for i, ids in enumerate(prompt.chunk_ids):
        end = start + len(ids)
        if not resident[i]:
            state.set_valid(start, end, False)
        elif mode != "full":
            _place_chunk(state, chunks[i], start, model)
        if resident[i]:
            chunk_pos_parts.append(torch.arange(start, end, device=dev))
            chunk_off_parts.append(torch.arange(end - start, device=dev))
        start = end
    place_ms = elapsed_ms(t_start, dev)
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
            q, k, v = qkv(model, layer, h, cos_a, sin_a)
            write_kv(state, layer, slice(0, n) if dense else active, k, v)
            h = attend_mlp(model, layer, h, q, active, state, n, causal_prefix=dense)
        chunk_off = torch.cat(chunk_off_parts) if chunk_off_parts else chunk_pos
        h, pos, selected, first_partial = _check_and_select(
            model, state, h, active, cos, sin, always, chunk_pos, chunk_off, n - len(prompt.query_ids), n,
            check_layer, ratio, selection)

    if mode != "blend":
        h = h[pos]
    is_all = pos.numel() == n
    cos_r, sin_r = cos[pos], sin[pos]
    for layer in range(first_partial, s.num_layers):
        q, k, v = qkv(model, layer, h, cos_r, sin_r)
        write_kv(state, layer, slice(0, n) if is_all else pos, k, v)
        if layer == s.num_layers - 1:  # only the last position's output is needed
            h = attend_mlp(model, layer, h[-1:], q[:, -1:], pos[-1:], state, n, causal_prefix=False)
        else:
            h = attend_mlp(model, layer, h, q, pos, state, n, causal_prefix=is_all)
    logits = lm_logits(model, h[-1])
    prefill_ms = elapsed_ms(t_start, dev)
    stats = BlendStats(
        mode=mode, num_tokens=n, num_chunk_tokens=int(chunk_pos.numel()),
        num_recomputed=int(pos.numel()), selected_positions=tuple(selected.tolist()),
        prefill_ms=prefill_ms, place_ms=place_ms,
    )
    return PrefillResult(state=state, logits=logits, stats=stats)


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
