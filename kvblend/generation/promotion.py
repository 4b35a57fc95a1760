"""Relevance proxies and proactive promotion of CPU-staged chunks during speculative decoding.

The target attends to the GPU-resident chunks; the others are placeholders that own their positions
(rows masked out of attention). After each verification pass a proxy scores every chunk; chunks whose
score passes a threshold are fetched to the GPU tier *now* (pinned memory + a side CUDA stream on GPU)
and fused into the target's KV at their reserved positions at the *next* pass, so the copy overlaps a
decoding step. Placement, pins and the GPU chunk budget (chunk count and bytes) are the request's Residency
(kvstore/residency.py): it fetches and pins a promoted chunk, the Promoter writes its KV into the target's state.
When the budget is full, the least useful resident chunk that is not kept (pinned_top) is demoted (its rows masked
again, its KV moved to the CPU tier).

Proxies (all return one score per chunk in [0, 1], higher = more likely needed):
  draft_attention  each chunk's share of the attention the draft model's newest query gives to chunks (the
                   draft attends to every chunk, resident or not), averaged over heads and a few layers;
  key_bounds       Quest-style: the chunk's key summary (kvstore/summary.py: per page of 16 tokens, min/max of its
                   keys per dimension, built with the chunk); the upper bound of q.k for every query row of the
                   target's last verification pass (all T), softmax-normalised across chunks (summary_shares);
  ngram_source     1 for the chunk the last n-gram draft was copied from, decaying by half each step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from kvblend.fusion.placement import promote_chunk
from kvblend.model.kv import KVState
from kvblend.model.layers import forward_tokens
from kvblend.model.rope import rerotate
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.kvstore.summary import ChunkSummary, chunk_bounds, summarize, summary_layers
from kvblend.fusion.layout import ChunkSlot
from kvblend.kvstore.residency import Residency
from kvblend.model.hf import DecoderModel
from kvblend import vocab

log = logging.getLogger(__name__)

PROXIES = tuple(p for p in vocab.PROXIES if p != "none")  # the proxies that score chunks ("none": no Promoter)


def _probe_layers(num_layers: int, count: int = 3) -> list[int]:
    """A few layers spread over the middle and late part of the stack (early layers attend locally)."""
    return sorted({int(num_layers * f) for f in (0.5, 0.75, 0.95)[:count]})


def attention_mass(queries: Sequence[torch.Tensor], state: KVState, ranges: Sequence[tuple[int, int]],
                   model: DecoderModel, layers: Sequence[int]) -> torch.Tensor:
    """Mean (over heads and `layers`) softmax attention mass of queries[layer] [H, D] on each range."""
    s = model.shape
    n = state.length
    masses = torch.zeros(len(ranges))
    group = s.num_heads // s.num_kv_heads
    for layer in layers:
        q = queries[layer].to(torch.float32)  # [H, D]
        k = state.k[layer, :, :n].to(torch.float32).repeat_interleave(group, dim=0)  # [H, N, D]
        logits = torch.einsum("hd,hnd->hn", q, k) * model.attn_scale
        if state.valid is not None:
            logits = logits.masked_fill(~state.valid[:n][None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).mean(0).cpu()  # [N]
        for i, (a, b) in enumerate(ranges):
            masses[i] += probs[a:b].sum()
    return masses / max(1, len(layers))


def summary_shares(queries: Sequence[torch.Tensor], summaries: dict[int, tuple[ChunkSummary, int]],
                   model: DecoderModel) -> dict[int, float]:
    """Each chunk's estimated share of the attention that the query rows give to chunks: per layer of the
    summaries, kv-head group, head and query row, a softmax over the chunks' attention-logit upper bounds
    (kvstore/summary.py chunk_bounds; every chunk, resident or not, is scored the same way, so a chunk is only
    ranked against the others' bounds, never against exact logits), averaged over layers, heads and rows.
    summaries: slot -> (summary, the slot's first prompt row). queries: per model layer [H, T, D]. Sums to 1."""
    ids = sorted(summaries)
    if not ids:
        return {}
    bounds = torch.stack([chunk_bounds(queries, s, start, model.inv_freq, model.attn_scale)
                          for s, start in (summaries[i] for i in ids)])  # [chunks, layers, H, T]
    share = torch.softmax(bounds, dim=0).mean(dim=(1, 2, 3)).cpu()
    return {i: float(v) for i, v in zip(ids, share)}


@dataclass
class StepTrace:
    step: int
    drafted: list[int] = field(default_factory=list)
    accepted: int = 0
    scores: dict[int, float] = field(default_factory=dict)
    promoted: list[int] = field(default_factory=list)  # fused into the target's KV at this pass
    requested: list[int] = field(default_factory=list)  # copies started this step (fused next pass)
    demoted: list[int] = field(default_factory=list)
    gpu_chunks: list[int] = field(default_factory=list)
    cpu_chunks: list[int] = field(default_factory=list)
    bytes_moved: int = 0
    hook_ms: float = 0.0  # the whole step hook: fuse last step's chunks, score, request copies (not a copy time)
    gpu_bytes: int = 0

    def as_dict(self) -> dict:
        return {"step": self.step, "drafted": self.drafted, "accepted": self.accepted,
                "proxy_scores": {str(k): round(v, 5) for k, v in self.scores.items()},
                "promoted": self.promoted, "requested": self.requested, "demoted": self.demoted,
                "gpu_chunks": self.gpu_chunks, "cpu_chunks": self.cpu_chunks, "bytes_moved": self.bytes_moved,
                "hook_ms": round(self.hook_ms, 3), "gpu_bytes": self.gpu_bytes}


class Promoter:
    """on_step hook for speculative_generate: fuses last step's requested chunks, scores, requests new ones.
    residency: the request's placement and pins (the Promoter never pins or unpins itself; the engine releases
    the residency at the end of the request). pinned: slots never demoted (the best resident ones)."""

    def __init__(self, target: DecoderModel, residency: Residency, proxy: str | None, threshold: float = 0.3,
                 pinned: Sequence[int] = (), drafter=None, probe: list | None = None,
                 summaries: dict[int, ChunkSummary] | None = None):
        if proxy is not None and proxy not in PROXIES:
            raise ValueError(f"unknown proxy '{proxy}'; use one of {', '.join(PROXIES)}")
        self.target, self.residency, self.store = target, residency, residency.store
        self.slots: list[ChunkSlot] = list(residency.slots)
        self.proxy, self.threshold = proxy, threshold
        self.pinned = set(pinned)
        self.drafter, self.probe = drafter, probe
        self.pending: dict[int, tuple[ChunkKV, torch.cuda.Event | None]] = {}
        self.summaries: dict[int, tuple[ChunkSummary, int]] = {}
        self.ngram_scores: dict[int, float] = {}
        self.trace: list[StepTrace] = []
        self.stream = torch.cuda.Stream() if target.device.type == "cuda" else None
        if proxy == "key_bounds":  # the chunks' key summaries (built with them; computed here when not given)
            for s in self.slots:
                got = (summaries or {}).get(s.index)
                if got is None:
                    got = summarize(residency.read(s.index), summary_layers(target.shape.num_layers))
                self.summaries[s.index] = (got, s.start)

    @property
    def resident(self) -> set[int]:
        """Slots resident on the GPU tier (fused, or requested and fused at the next pass)."""
        return set(self.residency.resident)

    def _scores(self, state: KVState) -> dict[int, float]:
        if self.proxy == "draft_attention":
            queries = getattr(self.drafter, "last_queries", None)
            if not queries:
                return {}
            draft = self.drafter.model
            ranges = [(s.start, s.start + s.num_tokens) for s in self.slots]
            mass = attention_mass(queries, self.drafter.state, ranges, draft, _probe_layers(draft.shape.num_layers))
            mass = mass / mass.sum().clamp_min(1e-12)  # share of the chunks' attention
            return {s.index: float(m) for s, m in zip(self.slots, mass)}
        if self.proxy == "key_bounds":
            if not self.probe:
                return {}
            # every row of the last verification pass: the newest emitted token and the drafts ahead of it
            return summary_shares(self.probe, self.summaries, self.target)
        if self.proxy == "ngram_source":
            self.ngram_scores = {i: v / 2 for i, v in self.ngram_scores.items() if v > 1e-3}
            source = getattr(self.drafter, "last_source_chunk", None)
            if source is not None:
                self.ngram_scores[source] = 1.0
            return dict(self.ngram_scores)
        return {}

    def _fetch(self, slot: ChunkSlot) -> tuple[ChunkKV, torch.cuda.Event | None]:
        """Promote the slot in the Residency (fetch to the GPU tier, pin; a corrupt chunk is rebuilt there) and
        start the CPU -> GPU copy (async on CUDA: pinned source, side stream); the store accounts bytes."""
        if self.stream is None:
            return self.residency.promote(slot.index).chunk, None
        # no wait on the main stream: that would queue the copy behind the pass running now (a stall at the
        # next boundary); the source is pinned host memory, the destination new device memory
        with torch.cuda.stream(self.stream):
            chunk = self.residency.promote(slot.index).chunk
            # re-rotate to the slot's positions here too, so the fuse at the step boundary is a plain copy
            k = rerotate(chunk.k, slot.start - chunk.rope_offset, self.target.inv_freq)
            chunk = ChunkKV(chunk.key, chunk.token_ids, torch.stack((k, chunk.v)), rope_offset=slot.start,
                            sink_ids=chunk.sink_ids, text=chunk.text)
            event = torch.cuda.Event()
            event.record(self.stream)
        return chunk, event

    def _victims(self, idx: int, scores: dict[int, float]) -> list[int] | None:
        """The resident chunks to demote so that `idx` fits the Residency's chunk and byte budgets, least useful
        first (never a pinned one, nor one whose copy is in flight); None when that takes demoting a chunk at
        least as useful as `idx`, or nothing demotable makes room."""
        candidates = sorted((i for i in self.residency.resident if i not in self.pinned and i not in self.pending),
                            key=lambda i: (scores.get(i, 0.0), -i))
        victims: list[int] = []
        for v in candidates:
            if self.residency.can_promote(idx, without=victims):
                break
            if scores.get(v, 0.0) >= scores[idx]:
                return None
            victims.append(v)
        return victims if self.residency.can_promote(idx, without=victims) else None

    def _demote(self, state: KVState, idx: int) -> None:
        slot = self.slots[idx]
        state.set_valid(slot.start, slot.start + slot.num_tokens, False)
        self.residency.demote(idx)

    def _fuse_pending(self, state: KVState, rec: StepTrace) -> None:
        """Fuse every requested chunk into the target's KV at its reserved positions."""
        for idx, (chunk, event) in list(self.pending.items()):
            if event is not None:  # device-side wait: the host never blocks on the copy
                torch.cuda.current_stream().wait_event(event)
                chunk.kv.record_stream(torch.cuda.current_stream())  # allocated on the side stream
            promote_chunk(self.target, state, chunk, self.slots[idx].start)
            rec.promoted.append(idx)
        self.pending.clear()

    def _bring_in(self, rec: StepTrace, demote: Callable[[int], None], bring: Callable[[int], None]) -> None:
        """The placeholders scored over the threshold, best first: demote(victim) for each less useful resident
        that must make room (recorded in rec.demoted), then bring(idx); stops at the first that finds no room."""
        resident = self.resident
        wanted = sorted((i for i, v in rec.scores.items() if v >= self.threshold and i not in resident),
                        key=lambda i: -rec.scores[i])
        for idx in wanted:
            victims = self._victims(idx, rec.scores)
            if victims is None:
                break  # nothing demotable, or only chunks at least as useful as the candidate
            for victim in victims:
                demote(victim)
                rec.demoted.append(victim)
            bring(idx)

    def _request(self, state: KVState, rec: StepTrace) -> None:
        """Start fetching the chunks over the threshold, best first, demoting less useful ones for room."""
        def fetch(idx: int) -> None:
            self.pending[idx] = self._fetch(self.slots[idx])
            rec.requested.append(idx)

        self._bring_in(rec, lambda victim: self._demote(state, victim), fetch)

    def _record(self, rec: StepTrace, t0: float, moved_before: int) -> None:
        rec.bytes_moved = sum(self.store.stats.bytes_moved.values()) - moved_before
        rec.hook_ms = (time.perf_counter() - t0) * 1e3
        rec.gpu_chunks = sorted(self.resident)
        rec.cpu_chunks = sorted({s.index for s in self.slots} - set(rec.gpu_chunks))
        rec.gpu_bytes = self.store.used_bytes()["gpu"]
        self.trace.append(rec)

    @torch.inference_mode()
    def __call__(self, step: int, state: KVState) -> None:
        rec, t0, moved = StepTrace(step=step), time.perf_counter(), sum(self.store.stats.bytes_moved.values())
        self._fuse_pending(state, rec)  # the copies started last step
        rec.scores = self._scores(state)  # signals of the last verification pass
        self._request(state, rec)  # fused at the next pass: the copy overlaps this one
        self._record(rec, t0, moved)

    # the same hook split around the target's pass (speculative_generate calls these when present) --------
    @torch.inference_mode()
    def before_pass(self, step: int, state: KVState) -> None:
        """At the step boundary: fuse the chunks whose copies were started last step (device-side waits)."""
        t0 = time.perf_counter()
        self._open = (StepTrace(step=step), sum(self.store.stats.bytes_moved.values()))
        self._fuse_pending(state, self._open[0])
        self._before_ms = (time.perf_counter() - t0) * 1e3

    @torch.inference_mode()
    def during_pass(self, step: int, state: KVState) -> None:
        """While the device runs the pass: score, demote, start the next copies (fused at the next boundary;
        a demotion masks its rows from the next pass on)."""
        rec, moved = self._open
        t0 = time.perf_counter() - self._before_ms / 1e3
        rec.scores = self._scores(state)
        self._request(state, rec)
        self._record(rec, t0, moved)

    @torch.inference_mode()
    def look(self, queries: Sequence[torch.Tensor]) -> StepTrace:
        """Look before loading (before the prefill that produces the first token): score every chunk's summary
        with the query rows' queries (per layer [H, T, D]), then bring the placeholders over the threshold to
        the GPU tier, best first, demoting less useful unpinned residents for room (the Residency's chunk and
        byte budgets). Nothing is written into a KV state: the caller prefills with the new placement."""
        rec, t0, moved = StepTrace(step=-1), time.perf_counter(), sum(self.store.stats.bytes_moved.values())
        rec.scores = summary_shares(queries, self.summaries, self.target) if self.summaries else {}

        def promote(idx: int) -> None:
            self.residency.promote(idx)
            rec.promoted.append(idx)

        self._bring_in(rec, self.residency.demote, promote)
        self._record(rec, t0, moved)
        return rec

    @torch.inference_mode()
    def warm_start(self, state: KVState, prompt_ids: Sequence[int], query_start: int) -> torch.Tensor | None:
        """Before the first token: score the placeholders with the prompt's last query, promote the ones that
        pass, and recompute the whole query over the updated KV. Only the query is recomputed: for a reuse
        prefill that equals having had those chunks resident from the start (chunk KV is the cached KV either
        way); for a blend prefill it does not (chunk tokens selected for recomputation at prefill time did not
        attend to the promoted chunks, and the promoted chunks' own tokens were never selected), so the
        logits differ from a blend with those chunks resident (max |diff| ~1e-1 on SmolLM2).
        Returns the new last-position logits, or None when nothing changed."""
        if self.proxy not in ("key_bounds", "draft_attention"):
            return None
        model, kv = (self.target, state) if self.proxy == "key_bounds" else (self.drafter.model, self.drafter.state)
        if kv.length != len(prompt_ids):
            return None
        rec, t0, moved = StepTrace(step=-1), time.perf_counter(), sum(self.store.stats.bytes_moved.values())
        queries: list[torch.Tensor] = []
        kv.truncate(kv.length - 1)
        forward_tokens(model, kv, [int(prompt_ids[-1])], num_logits=0, queries_out=queries)  # same KV + queries
        if self.proxy == "key_bounds":
            self.probe[:] = queries  # the list speculative_generate refills after each pass
        else:
            self.drafter.last_queries = [q[:, -1] for q in queries]
        rec.scores = self._scores(state)
        self._request(state, rec)
        self._fuse_pending(state, rec)
        self._record(rec, t0, moved)
        if not rec.promoted and not rec.demoted:
            return None
        state.truncate(query_start)
        return forward_tokens(self.target, state, list(prompt_ids[query_start:]), num_logits=1)[-1]
