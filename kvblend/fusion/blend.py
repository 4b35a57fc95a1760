"""Blended prefill (CacheBlend), in four stages over the model runner (kvblend/model/runner.py):

  plan       pure: validate the request and decide sizes, the recompute path and which chunks are placed;
  place      copy cached chunk KV to its global positions, keys re-rotated (fusion/placement.py); host
             chunks are loaded layer-wise on a side stream, overlapped with the first layers;
  front      blend only: the layers below the check layer over every token, then the check layer(s), which
             score each chunk token's fresh K/V against its cached row and keep the policy's budget
             (fusion/select.py); in static shapes as one CUDA graph (fusion/front_graph.py) where it applies;
  recompute  the recompute set (prefix + query + kept chunk tokens) through the remaining layers: plain, or
             padded / a CUDA graph (ModelRunner.run_layers), then the LM head at the last position.

Modes differ only in which tokens are recomputed: full (every token; this is ModelRunner.forward), reuse
(prefix + query), blend (+ the selected chunk tokens). Recomputed tokens write fresh K/V over the cached
rows of the request's KV state, which is the buffer decoding reads (a static-buffer lease when the runner
uses graphs: never copied afterwards); cached chunk tensors are never written. Attention of a recomputed
token at position p sees exactly the keys at positions <= p (a per-token causal mask).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from kvblend.config import BlendOptions, SelectionPolicy
from kvblend.fusion.front_graph import front_supported, make_plan, run_static_front
from kvblend.fusion.placement import place_chunks, place_pipelined, promote_chunk, wait
from kvblend.fusion.select import CheckLayer, select_candidates
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.model.hf import DecoderModel
from kvblend.model.kv import KVState
from kvblend.model.layers import causal_mask, embed, layer_out, lm_logits, qkv, run_layers
from kvblend.model.rope import rope_cos_sin
from kvblend.model.runner import ModelRunner, check_length, elapsed_ms, runner_of
from kvblend.types import BlendStats, PrefillResult, PromptIds

log = logging.getLogger(__name__)

__all__ = ["PrefillResult", "PrefillPlan", "plan_prefill", "prefill", "promote_chunk"]


@dataclass(frozen=True, slots=True)
class PrefillPlan:
    """Everything a prefill decides before touching the device."""

    blend: BlendOptions
    n: int  # prompt tokens
    prefix_len: int
    query_start: int
    capacity: int  # KV rows: prompt + room for decoding
    spans: tuple[tuple[int, int, bool], ...]  # per chunk (start, end, resident)
    path: str  # recompute path: plain | padded | graph
    use_front: bool  # the static front (fusion/front_graph.py)

    @property
    def mode(self) -> str:
        return self.blend.mode

    @property
    def placed(self) -> tuple[int, ...]:
        """Indices of the chunks whose cached KV is placed (resident, mode reuse or blend)."""
        return () if self.mode == "full" else tuple(i for i, (_, _, r) in enumerate(self.spans) if r)

    @property
    def first_cached_layer(self) -> int:
        """Blend recomputes every layer below the check layer for every token: their cached rows are unused."""
        return self.blend.check_layer if self.mode == "blend" else 0


class _Stages:
    """Per-stage device time of one prefill without synchronising inside it (CUDA events; host clock on
    CPU, where every op is synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []
        self.mark("start")

    def mark(self, name: str) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        else:
            ev = time.perf_counter()
        self.marks.append((name, ev))
        return ev

    def since_start_ms(self, ev) -> float:
        start = self.marks[0][1]
        return start.elapsed_time(ev) if self.cuda else (ev - start) * 1e3

    def durations_ms(self) -> dict[str, float]:
        """Consecutive marks -> milliseconds (call after the device has finished)."""
        return {name: (a.elapsed_time(b) if self.cuda else (b - a) * 1e3)
                for (_, a), (name, b) in zip(self.marks, self.marks[1:])}


def _validate_chunks(chunks: Sequence[ChunkKV], chunk_ids: Sequence[Sequence[int]], model: DecoderModel) -> None:
    for i, (ids, ck) in enumerate(zip(chunk_ids, chunks)):
        # token ids end to end: cached KV is used only for exactly the ids it was computed from
        if tuple(ck.token_ids) != tuple(ids):
            raise ValueError(f"chunk {i}: cached KV was computed for other token ids ({ck.key})")
        if ck.key.model_fingerprint != model.fingerprint:
            raise ValueError(f"chunk {i}: cached KV belongs to model {ck.key.model_fingerprint}, not {model.fingerprint}")
        if ck.k.shape[0] != model.shape.num_layers or ck.k.shape[1] != model.shape.num_kv_heads:
            raise ValueError(f"chunk {i}: cached KV shape {tuple(ck.k.shape)} does not fit model {model.name}")


def _check_request(runner: ModelRunner, prompt: PromptIds, chunks, blend: BlendOptions, resident: list,
                   prior) -> None:
    s, model = runner.model.shape, runner.model
    mode = blend.mode
    if mode == "blend" and blend.selection.needs_draft and (prior is None or prior.numel() < prompt.num_tokens):
        raise ValueError(f"selection signal '{blend.selection.signal}' needs a draft model's attention over the "
                         f"whole prompt (prior); load a draft model (EngineConfig.draft_model / --draft-model)")
    if mode == "blend" and not 1 <= blend.check_layer < s.num_layers:
        raise ValueError(f"check_layer must be in [1, {s.num_layers - 1}], got {blend.check_layer}")
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


def plan_prefill(runner: ModelRunner, prompt: PromptIds, chunks: Sequence[ChunkKV | None] | None,
                 blend: BlendOptions, resident: Sequence[bool] | None = None, extra_capacity: int = 0,
                 recompute: str = "auto", prior: torch.Tensor | None = None) -> PrefillPlan:
    """Validate a request and decide what its prefill does (no device work)."""
    resident = [True] * len(prompt.chunk_ids) if resident is None else list(resident)
    _check_request(runner, prompt, chunks, blend, resident, prior)
    n = prompt.num_tokens
    check_length(runner.model, n + extra_capacity)
    path = runner.recompute_path(recompute)
    spans, start = [], len(prompt.prefix_ids)
    for ids, res in zip(prompt.chunk_ids, resident):
        spans.append((start, start + len(ids), bool(res)))
        start += len(ids)
    use_front = (blend.mode == "blend" and path in ("graph", "padded")
                 and front_supported(runner.model, blend.selection, blend.check_layer, not all(resident),
                                     runner.runtime.front_graph))
    return PrefillPlan(blend=blend, n=n, prefix_len=len(prompt.prefix_ids), query_start=n - len(prompt.query_ids),
                       capacity=n + extra_capacity, spans=tuple(spans), path=path, use_front=use_front)


def _place(runner: ModelRunner, state: KVState, plan: PrefillPlan, chunks, stages: _Stages):
    """Placeholders marked, cached chunks placed. Returns (per-layer events to wait for, the event or mark
    at which placement is done, whether host chunks were loaded layer-wise)."""
    model, dev = runner.model, runner.model.device
    for start, end, res in plan.spans:
        if not res:
            state.set_valid(start, end, False)
    placed = [(chunks[i], plan.spans[i][0]) for i in plan.placed]
    cached_layers = list(range(plan.first_cached_layer, model.shape.num_layers))
    on_host = dev.type == "cuda" and any(c.kv.device.type == "cpu" for c, _ in placed)
    if on_host:  # layer-wise pipelined: copies of later layers overlap the compute of earlier ones
        events, done = place_pipelined(state, placed, model, cached_layers)
    elif dev.type == "cuda" and placed and plan.first_cached_layer > 0:
        # chunks already on the GPU: one side-stream step, overlapped with the layers below the check layer
        events, done = place_pipelined(state, placed, model, cached_layers, num_groups=1)
    else:
        place_chunks(state, placed, model, slice(plan.first_cached_layer, None))
        events, done = [None] * model.shape.num_layers, stages.mark("place")
    return events, done, on_host


def _chunk_positions(plan: PrefillPlan, dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chunk_pos, chunk_off, always): resident chunk tokens' positions and offsets in their chunk, and the
    always-recomputed positions (prefix + query)."""
    parts = [(torch.arange(a, b, device=dev), torch.arange(b - a, device=dev)) for a, b, r in plan.spans if r]
    empty = torch.empty(0, dtype=torch.long, device=dev)
    chunk_pos = torch.cat([p for p, _ in parts]) if parts else empty
    chunk_off = torch.cat([o for _, o in parts]) if parts else empty
    always = torch.cat([torch.arange(plan.prefix_len, device=dev), torch.arange(plan.query_start, plan.n, device=dev)])
    return chunk_pos, chunk_off, always


def _check_and_select(model: DecoderModel, state: KVState, h: torch.Tensor, rows_pos: torch.Tensor, cos, sin,
                      always: torch.Tensor, chunk_pos: torch.Tensor, chunk_off: torch.Tensor, plan: PrefillPlan,
                      prior: torch.Tensor | None):
    """The check layer(s) of an eager blend: score the candidates, keep the policy's budget, run prefix +
    query + kept tokens through the layer; with several check layers the survivors are narrowed again at
    each. h: hidden states of rows_pos entering the check layer. Returns (h, positions, selected, next layer)."""
    policy, c, n = plan.blend.selection, plan.blend.check_layer, plan.n
    num_layers = model.shape.num_layers
    last = min(c + policy.layers, num_layers) - 1
    cand, cand_off = chunk_pos, chunk_off
    query_pos = torch.arange(plan.query_start, n, device=h.device)
    pos = rows_pos
    for step, layer in enumerate(range(c, last + 1)):
        q, k, v = qkv(model, layer, h, cos[rows_pos], sin[rows_pos])
        check = CheckLayer(q=q, k=k, v=v, rows_pos=rows_pos, cached_k=state.k[layer], cached_v=state.v[layer],
                           cand_pos=cand, query_pos=query_pos, num_keys=n, scale=model.attn_scale,
                           valid=state.valid if state.has_holes() else None, prior=prior)
        budget = policy.budget(step, last - c + 1, plan.blend.ratio, chunk_pos.numel())
        forced = cand_off < policy.first_tokens if policy.first_tokens else None
        keep = select_candidates(policy, check, budget, forced)
        cand, cand_off = cand[keep], cand_off[keep]
        pos = torch.cat([always, cand]).sort().values
        rows = check.rows_of(pos)
        h = layer_out(model, layer, state, h[rows], q[:, rows], k[:, rows], v[:, rows], pos, pos, n,
                      last_only=layer == num_layers - 1)
        rows_pos = pos
    return h, pos, cand, last + 1


def _eager_front(model: DecoderModel, state: KVState, plan: PrefillPlan, ids, cos, sin, events, prior,
                 stages: _Stages):
    """Layers below the check layer over every computed token (placeholders are not), then the check layers."""
    dev = model.device
    chunk_pos, chunk_off, always = _chunk_positions(plan, dev)
    active = torch.cat([always, chunk_pos]).sort().values
    dense = active.numel() == plan.n
    c, n = plan.blend.check_layer, plan.n
    h = run_layers(model, state, embed(model, ids)[active], cos[active], sin[active], range(c),
                   slice(0, n) if dense else active, active, n, causal_prefix=dense,
                   mask=None if dense else causal_mask(active, n, state))
    stages.mark("layers_before_check")
    for layer in range(c, min(c + plan.blend.selection.layers, model.shape.num_layers)):
        wait(events[layer], dev)
    return _check_and_select(model, state, h, active, cos, sin, always, chunk_pos, chunk_off, plan,
                             None if prior is None else prior.to(dev))


def _front(runner: ModelRunner, state: KVState, plan: PrefillPlan, ids, cos, sin, events, prior,
           stages: _Stages):
    """(h of the recompute set, its positions, the selected chunk positions, the first layer after)."""
    model, dev = runner.model, runner.model.device
    if plan.mode != "blend":
        chunk_pos, _, always = _chunk_positions(plan, dev)
        pos = torch.cat([always, chunk_pos]).sort().values if plan.mode == "full" else always
        return embed(model, ids)[pos], pos, torch.empty(0, dtype=torch.long, device=dev), 0
    if not plan.use_front:
        return _eager_front(model, state, plan, ids, cos, sin, events, prior, stages)
    c, policy = plan.blend.check_layer, plan.blend.selection
    fplan = make_plan(plan.n, plan.prefix_len, plan.query_start, c, plan.blend.ratio, policy)
    for layer in range(c, c + policy.layers):
        wait(events[layer], dev)
    chunk_pos, chunk_off, _ = _chunk_positions(plan, dev)
    offsets = torch.zeros(plan.n, dtype=torch.long, device=dev)
    if policy.first_tokens and chunk_pos.numel():
        offsets.index_copy_(0, chunk_pos, chunk_off)
    h, pos = run_static_front(runner, state, fplan, ids, offsets, capture=plan.path == "graph")
    return h, pos, pos[fplan.prefix:fplan.prefix + fplan.budgets[-1]], c + policy.layers


def _recompute(runner: ModelRunner, state: KVState, plan: PrefillPlan, h, pos, cos, sin, first: int):
    """The recompute set through layers first..L-1; returns the last position's hidden state [1, hidden]."""
    if first >= runner.model.shape.num_layers:
        return h[-1:]
    is_all = pos.numel() == plan.n and not state.has_holes()
    path = "plain" if is_all else plan.path
    return runner.run_layers(state, h, pos, cos[pos], sin[pos], first, plan.n, path=path, causal_prefix=is_all)


@torch.inference_mode()
def prefill(model: DecoderModel | ModelRunner, prompt: PromptIds, chunks: Sequence[ChunkKV | None] | None = None,
            mode: str | None = None, ratio: float | None = None, check_layer: int | None = None,
            selection: SelectionPolicy | None = None, *, blend: BlendOptions | None = None,
            extra_capacity: int = 0, resident: Sequence[bool] | None = None, recompute: str = "auto",
            timings: dict | None = None, prior: torch.Tensor | None = None) -> PrefillResult:
    """Prefill `prompt`, reusing `chunks` (cached KV of prompt.chunk_ids, same order) per the blend options:
    `blend` (default BlendOptions(): kvblend's default variant), with mode / ratio / check_layer / selection
    overriding its fields. resident: per chunk, False makes it a placeholder (positions reserved, nothing
    attends to it, its `chunks` entry may be None) until promote_chunk() fills it; needs reuse or blend.
    prior: a draft model's per-position importance (select.draft_attention_prior) for the draft signals.
    recompute: auto (graphs when the runner uses them) | plain | padded (the graph's computation, eagerly)
    | graph. timings: if a dict, receives per-stage milliseconds. Returns the KV state (prompt +
    extra_capacity rows; the buffer decoding uses) and the last position's logits."""
    runner = runner_of(model)
    blend = _options(blend, mode, ratio, check_layer, selection)
    t_start = time.perf_counter()
    plan = plan_prefill(runner, prompt, chunks, blend, resident, extra_capacity, recompute, prior)
    if plan.mode == "full":
        return runner.full_prefill(prompt, plan.capacity - plan.n)
    dev = runner.model.device
    stages = _Stages(dev)
    state = runner.new_state(plan.capacity, static=plan.path != "plain")
    state.length = plan.n
    events, place_done, on_host = _place(runner, state, plan, chunks, stages)
    ids = torch.tensor(prompt.flat(), dtype=torch.long, device=dev)
    cos, sin = rope_cos_sin(runner.model.inv_freq, torch.arange(plan.n, device=dev), runner.model.dtype)
    h, pos, selected, first = _front(runner, state, plan, ids, cos, sin, events, prior, stages)
    stages.mark("check_and_select" if plan.mode == "blend" else "embed")
    for ev in events:
        wait(ev, dev)
    h = _recompute(runner, state, plan, h, pos, cos, sin, first)
    stages.mark("recompute_layers")
    logits = lm_logits(runner.model, h[-1])
    stages.mark("lm_head")
    stats = BlendStats(mode=plan.mode, num_tokens=plan.n, num_chunk_tokens=sum(b - a for a, b, r in plan.spans if r),
                       num_recomputed=int(pos.numel()), selected_positions=tuple(selected.tolist()),
                       prefill_ms=elapsed_ms(t_start, dev), place_ms=stages.since_start_ms(place_done))
    if timings is not None:
        timings.update(stages.durations_ms(), place_done=stats.place_ms, recompute_path=plan.path,
                       pipelined_h2d=on_host)
    return PrefillResult(state=state, logits=logits, stats=stats)


def _options(blend: BlendOptions | None, mode, ratio, check_layer, selection) -> BlendOptions:
    b = blend if blend is not None else BlendOptions()
    over = {k: v for k, v in (("mode", mode), ("ratio", ratio), ("check_layer", check_layer),
                              ("selection", selection)) if v is not None}
    if not over:
        return b
    from dataclasses import replace

    return replace(b, **over)
