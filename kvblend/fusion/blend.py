"""Blended prefill (CacheBlend), driven layer by layer over the model's own modules.

One engine computes all three modes; they differ only in which tokens are recomputed:
  full   every token, every layer (plain prefill; the baseline);
  reuse  prefix + whole query; chunk tokens keep their cached KV (re-rotated to their new positions);
  blend  layers < check_layer run over every token; at check_layer fresh K (or V) of every chunk token is
         compared with its cached row and the top `ratio` of chunk tokens by deviation join the recompute
         set (prefix + whole query + selected), which alone goes through the remaining layers.
On CUDA the front of a blend (layers below the check layer, check layers, selection) runs as one CUDA graph
(fusion/front_graph.py) and the recompute layers as another (model/layer_graphs.py); the eager loop below is
the reference they are tested against.
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

from kvblend.fusion.front_graph import front_graphs, front_supported, make_plan
from kvblend.fusion.select import CheckLayer, SelectionPolicy, select_candidates
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.model.hf import DecoderModel
from kvblend.model.layer_graphs import (KEY_BUCKET, MAX_PAD, copy_state, graph_cache, graphs_enabled,
                                        run_layers_padded_eager, run_layers_plain)
from kvblend.model.rope import rope_cos_sin, rotate_half
from kvblend.model.runner import (KVState, allocate_state, attend_mlp, causal_mask, check_length, elapsed_ms,
                                   lm_logits, qkv, write_kv)
from kvblend.types import BlendStats, PromptIds
from kvblend.vocab import MODES

log = logging.getLogger(__name__)



@dataclass(slots=True)
class PrefillResult:
    state: KVState
    logits: torch.Tensor  # [V] at the last prompt position (fp32)
    stats: BlendStats


RECOMPUTE_PATHS = ("auto", "plain", "padded", "graph")
H2D_GROUPS = 8  # layer groups of a pipelined host->device chunk load (one event each)


def _rotation_tables(placed: Sequence[tuple[ChunkKV, int]], row_start: int, row_end: int,
                     model: DecoderModel) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [rows, D] that move each placed chunk's keys from their cached positions to rows
    start.. (rows of no placed chunk get delta 0, the identity). The angle is formed in float64, as
    rope.rerotate does, so a batched re-rotation equals the per-chunk one."""
    delta = torch.zeros(row_end - row_start, dtype=torch.float64)
    for chunk, start in placed:
        delta[start - row_start:start - row_start + chunk.num_tokens] = float(start - chunk.rope_offset)
    delta = delta.to(model.device, non_blocking=True)
    angle = delta[:, None] * model.inv_freq.to(device=model.device, dtype=torch.float64)[None, :]
    emb = torch.cat((angle, angle), dim=-1)
    return emb.cos().to(torch.float32), emb.sin().to(torch.float32)


def _place_chunks(state: KVState, placed: Sequence[tuple[ChunkKV, int]], model: DecoderModel,
                  layers: slice = slice(None), tables: tuple[torch.Tensor, torch.Tensor, int, int] | None = None) -> None:
    """Copy cached chunks (chunk, first row) into the buffer for `layers`, then re-rotate all their keys
    in one step. Host chunks in pinned memory are copied asynchronously (ordered on the current stream)."""
    if not placed:
        return
    for chunk, start in placed:
        end = start + chunk.num_tokens
        pinned = chunk.kv.device.type == "cpu" and chunk.kv.is_pinned()
        state.k[layers, :, start:end].copy_(chunk.kv[0, layers], non_blocking=pinned)
        state.v[layers, :, start:end].copy_(chunk.kv[1, layers], non_blocking=pinned)
    if tables is None:
        a = min(start for _, start in placed)
        b = max(start + chunk.num_tokens for chunk, start in placed)
        cos, sin = _rotation_tables(placed, a, b, model)
    else:
        cos, sin, a, b = tables
    kf = state.k[layers, :, a:b].to(torch.float32)
    state.k[layers, :, a:b] = (kf * cos + rotate_half(kf) * sin).to(state.k.dtype)


def _place_chunk(state: KVState, chunk: ChunkKV, start: int, model: DecoderModel) -> None:
    """Copy a cached chunk into rows start.. of the buffer, keys re-rotated to those positions."""
    _place_chunks(state, [(chunk, start)], model)


def _place_pipelined(state: KVState, placed: Sequence[tuple[ChunkKV, int]], model: DecoderModel,
                     order: Sequence[int], num_groups: int = H2D_GROUPS) -> tuple[list, torch.cuda.Event]:
    """Host chunks -> GPU on a side stream, layer group by layer group in `order` (the layers the compute
    needs first go first), each group re-rotated on arrival. Returns per layer the event to wait for before
    reading that layer's rows (None: not copied) and the event of the last group."""
    dev = model.device
    num_layers = model.shape.num_layers
    side = _side_stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))  # the buffer was allocated / zeroed there
    a = min(start for _, start in placed)
    b = max(start + chunk.num_tokens for chunk, start in placed)
    size = max(1, -(-len(order) // num_groups))
    groups, run = [], []
    for layer in order:  # consecutive layers of `order` form a group while they are contiguous
        if run and (layer != run[-1] + 1 or len(run) == size):
            groups.append(run)
            run = []
        run.append(layer)
    if run:
        groups.append(run)
    events: list = [None] * num_layers
    last = None
    with torch.cuda.stream(side):
        cos, sin = _rotation_tables(placed, a, b, model)
        for group in groups:
            _place_chunks(state, placed, model, slice(group[0], group[-1] + 1), (cos, sin, a, b))
            last = torch.cuda.Event(enable_timing=True)
            last.record(side)
            for layer in group:
                events[layer] = last
    return events, last


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One copy stream per device for the whole process: a new stream per call would also give the caching
    allocator a new pool per call (fresh cudaMallocs on the critical path)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[key]


class _Stages:
    """Per-stage device time of one prefill without synchronising inside it (CUDA events; host clock on
    CPU, where every op is synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []
        self.mark("start")

    def mark(self, name: str, stream=None) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream) if stream is not None else ev.record()
        else:
            ev = time.perf_counter()
        self.marks.append((name, ev))
        return ev

    def since_start_ms(self, ev) -> float:
        start = self.marks[0][1]
        return start.elapsed_time(ev) if self.cuda else (ev - start) * 1e3

    def durations_ms(self) -> dict[str, float]:
        """Consecutive marks -> milliseconds (call after the device has finished)."""
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


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
                      policy: SelectionPolicy, prior: torch.Tensor | None = None):
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
                           valid=state.valid if state.has_holes() else None, prior=prior)
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
            selection: SelectionPolicy | None = None, recompute: str = "auto",
            timings: dict | None = None, prior: torch.Tensor | None = None) -> PrefillResult:
    """Prefill `prompt`, reusing `chunks` (cached KV of prompt.chunk_ids, same order) per `mode`.

    resident: per chunk, False makes it a placeholder: its positions are reserved but nothing attends to
    it (its entry in `chunks` may be None) until promote_chunk() fills it. Needs mode reuse or blend.
    selection: which chunk tokens blend recomputes (fusion/select.py); None = SelectionPolicy(score_on).
    prior: per-position importance [>= prompt tokens] from a draft model (fusion/select.py
    draft_attention_prior), needed by the draft selection signals and ignored by the others.
    recompute: how the recompute set runs through the layers after the check layer (model/layer_graphs.py):
    "auto" (CUDA graphs on CUDA unless KVBLEND_CUDA_GRAPHS=0, else plain), "plain", "padded" (the graph's
    padded computation, eagerly: for tests), "graph". Host chunks (pinned) are loaded layer-wise on a side
    stream, overlapped with the first layers. timings: if a dict, receives per-stage milliseconds.
    Returns the KV state (buffers sized for the prompt + extra_capacity decode tokens) and the last
    position's logits.
    """
    selection = selection if selection is not None else SelectionPolicy(signal=score_on)
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; use one of {', '.join(MODES)}")
    s = model.shape
    if mode == "blend" and selection.needs_draft and (prior is None or prior.numel() < prompt.num_tokens):
        raise ValueError(f"selection signal '{selection.signal}' needs a draft model's attention over the whole "
                         f"prompt (prior); load a draft model (EngineConfig.draft_model / --draft-model)")
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
    if recompute not in RECOMPUTE_PATHS:
        raise ValueError(f"unknown recompute path '{recompute}'; use one of {', '.join(RECOMPUTE_PATHS)}")
    dev = model.device
    if recompute == "auto":
        recompute = "graph" if graphs_enabled(dev) else "plain"
    if recompute == "graph" and dev.type != "cuda":
        raise ValueError("recompute path 'graph' needs CUDA")
    if mode == "full":
        recompute = "plain"  # every token: compute-bound, plain causal attention
    t_start = time.perf_counter()
    stages = _Stages(dev)
    capacity = n + extra_capacity
    if recompute == "graph":
        state = graph_cache(model).state(capacity)  # in the graphs' static buffer; copied out at the end
    elif recompute == "padded":
        state = allocate_state(model, -(-capacity // KEY_BUCKET) * KEY_BUCKET + MAX_PAD)
    else:
        state = allocate_state(model, capacity)
    state.length = n

    # place cached chunk KV at its global positions (copies; the cache is read only)
    chunk_pos_parts: list[torch.Tensor] = []
    chunk_off_parts: list[torch.Tensor] = []  # each chunk token's offset inside its chunk
    placed: list[tuple[ChunkKV, int]] = []
    start = len(prompt.prefix_ids)
    for i, ids in enumerate(prompt.chunk_ids):
        end = start + len(ids)
        if not resident[i]:
            state.set_valid(start, end, False)
        elif mode != "full":
            placed.append((chunks[i], start))
        if resident[i]:
            chunk_pos_parts.append(torch.arange(start, end, device=dev))
            chunk_off_parts.append(torch.arange(end - start, device=dev))
        start = end
    # blend recomputes every layer below the check layer for every token: their cached rows are not needed
    first_cached = check_layer if mode == "blend" else 0
    cached_layers = list(range(first_cached, s.num_layers))
    layer_ready: list = [None] * s.num_layers
    on_host = dev.type == "cuda" and any(c.kv.device.type == "cpu" for c, _ in placed)
    if on_host:  # layer-wise pipelined: copies of later layers overlap the compute of earlier ones
        layer_ready, place_done = _place_pipelined(state, placed, model, cached_layers)
    elif dev.type == "cuda" and placed and first_cached > 0:
        # chunks already on the GPU: one side-stream step, overlapped with the layers below the check layer
        layer_ready, place_done = _place_pipelined(state, placed, model, cached_layers, num_groups=1)
    else:
        _place_chunks(state, placed, model, slice(first_cached, None))
        place_done = stages.mark("place")
    chunk_pos = torch.cat(chunk_pos_parts) if chunk_pos_parts else torch.empty(0, dtype=torch.long, device=dev)
    always = torch.cat([torch.arange(len(prompt.prefix_ids), device=dev), torch.arange(start, n, device=dev)])

    ids = torch.tensor(prompt.flat(), dtype=torch.long, device=dev)
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(n, device=dev), model.dtype)
    use_front = (mode == "blend" and recompute in ("graph", "padded")
                 and front_supported(model, selection, check_layer, state.has_holes()))
    h = None if use_front else model.embed_tokens(ids)  # [N, hidden]

    # active: every position that is computed at all (placeholders are not); pos: the recompute set
    active = None if use_front else torch.cat([always, chunk_pos]).sort().values
    selected = torch.empty(0, dtype=torch.long, device=dev)
    first_partial = 0
    if mode == "full":
        pos = active
    elif mode == "reuse":
        pos = always
    elif use_front:
        # the front (layers below the check layer + check layers + selection) in static shapes: one CUDA
        # graph replay (fusion/front_graph.py); "padded" runs the same computation eagerly (tests)
        plan = make_plan(n, len(prompt.prefix_ids), n - len(prompt.query_ids), check_layer, ratio, selection)
        for layer in range(check_layer, check_layer + selection.layers):
            _wait(layer_ready[layer], dev)
        offsets = torch.zeros(n, dtype=torch.long, device=dev)
        if selection.first_tokens and chunk_pos.numel():
            offsets.index_copy_(0, chunk_pos, torch.cat(chunk_off_parts))
        scratch = state.capacity - MAX_PAD
        h, pos = front_graphs(model).run(state, plan, ids, offsets, scratch, capture=recompute == "graph")
        selected = pos[plan.prefix:plan.prefix + plan.budgets[-1]]
        first_partial = check_layer + selection.layers
        stages.mark("check_and_select")
    else:
        h = h[active]
        cos_a, sin_a = cos[active], sin[active]
        dense = active.numel() == n
        mask_active = None if dense else causal_mask(active, n, state)
        for layer in range(check_layer):
            q, k, v = qkv(model, layer, h, cos_a, sin_a)
            write_kv(state, layer, slice(0, n) if dense else active, k, v)
            h = attend_mlp(model, layer, h, q, active, state, n, causal_prefix=dense, mask=mask_active)
        stages.mark("layers_before_check")
        for layer in range(check_layer, min(check_layer + selection.layers, s.num_layers)):
            _wait(layer_ready[layer], dev)
        chunk_off = torch.cat(chunk_off_parts) if chunk_off_parts else chunk_pos
        h, pos, selected, first_partial = _check_and_select(
            model, state, h, active, cos, sin, always, chunk_pos, chunk_off, n - len(prompt.query_ids), n,
            check_layer, ratio, selection, None if prior is None else prior.to(dev))

        stages.mark("check_and_select")

    if mode != "blend":
        h = h[pos]
    for ev in layer_ready:
        _wait(ev, dev)
    if first_partial < s.num_layers:
        cos_r, sin_r = cos[pos], sin[pos]
        is_all = pos.numel() == n and not state.has_holes()
        if recompute == "plain" or is_all:
            h = run_layers_plain(model, state, h, pos, cos_r, sin_r, first_partial, n, causal_prefix=is_all)
        elif recompute == "padded":
            h = run_layers_padded_eager(model, state, h, pos, cos_r, sin_r, first_partial, n)
        else:
            h = graph_cache(model).run(state, h, pos, cos_r, sin_r, first_partial, n)
        stages.mark("recompute_layers")
    logits = lm_logits(model, h[-1])
    stages.mark("lm_head")
    if recompute != "plain":
        state = copy_state(state, capacity)
        stages.mark("copy_out")
    prefill_ms = elapsed_ms(t_start, dev)
    stage_ms = stages.durations_ms()
    place_ms = stages.since_start_ms(place_done)
    stats = BlendStats(
        mode=mode, num_tokens=n, num_chunk_tokens=int(chunk_pos.numel()),
        num_recomputed=int(pos.numel()), selected_positions=tuple(selected.tolist()),
        prefill_ms=prefill_ms, place_ms=place_ms,
    )
    if timings is not None:
        timings.update(stage_ms)
        timings["place_done"] = place_ms
        timings["recompute_path"] = recompute
        timings["pipelined_h2d"] = on_host
    return PrefillResult(state=state, logits=logits, stats=stats)


def _wait(event, device: torch.device) -> None:
    """Make the compute stream wait for a side-stream event (a pipelined chunk copy); None: nothing to wait."""
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)


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
