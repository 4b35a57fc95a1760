"""Continuous batching of decoding: sequences join a running batch after their prefill, every step decodes
one token for each of them in one pass over the model (model/slots.py), and they leave as they stop.

Each sequence follows generate()'s rules token for token (the same Stopper, on_token semantics, sampling
generator and TTFT), so a request's greedy output equals its output decoded alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kvblend.generation.generate import NewlineDetector, Stopper
from kvblend.generation.sampling import SamplingParams, make_generator, sample
from kvblend.model.hf import DecoderModel
from kvblend.model.slots import DecodeSlots
from kvblend.types import GenOutput, PrefillResult


@dataclass
class BatchedSequence:
    """One request in the batch; `on_done(GenOutput)` is called once when it stops."""

    params: SamplingParams
    stop: Stopper
    gen: torch.Generator
    ttft_ms: float
    blend: object
    on_token: Callable[[int], bool | None] | None
    on_done: Callable[[GenOutput], None]
    owner: object = None  # the caller's handle (the server's job)
    token: int = -1  # sampled, not yet in the cache
    slot: int = -1
    token_ms: list[float] = field(default_factory=list)


class ContinuousBatch:
    """The running batch over `slots` (one DecodeSlots per model)."""

    def __init__(self, model: DecoderModel, slots: DecodeSlots, newline: NewlineDetector | None = None):
        self.model, self.slots, self.newline = model, slots, newline
        self.running: list[BatchedSequence] = []

    @property
    def has_room(self) -> bool:
        return bool(self.slots.free)

    def fits(self, prefilled: PrefillResult) -> bool:
        return prefilled.state.capacity <= self.slots.rows

    @torch.inference_mode()
    def add(self, prefilled: PrefillResult, params: SamplingParams, t_start: float,
            on_done: Callable[[GenOutput], None], on_token: Callable[[int], bool | None] | None = None,
            owner: object = None) -> None:
        """Sample the first token (TTFT), then join the batch unless the sequence already stopped."""
        state, model = prefilled.state, self.model
        gen = make_generator(params.seed, model.device if self.slots.runner.use_graphs else "cpu")
        seq = BatchedSequence(params=params, gen=gen, blend=prefilled.stats, on_token=on_token, on_done=on_done,
                              stop=Stopper(model, params, model.eos_token_ids(), state.capacity, self.newline),
                              token=sample(prefilled.logits, params, gen), ttft_ms=0.0, owner=owner)
        seq.ttft_ms = (time.perf_counter() - t_start) * 1e3
        if self._stops(seq, state.length):
            return
        seq.slot = self.slots.admit(state)
        self.running.append(seq)

    def _stops(self, seq: BatchedSequence, cache_len: int) -> bool:
        """generate()'s loop condition for seq.token; finishes the sequence when it stops."""
        if seq.stop.push(seq.token, cache_len):
            self._finish(seq)
            return True
        if seq.on_token is not None and seq.on_token(seq.token):
            seq.stop.reason = "callback"
            self._finish(seq)
            return True
        return False

    def _finish(self, seq: BatchedSequence) -> None:
        if seq.slot >= 0:
            self.slots.release(seq.slot)
        seq.on_done(seq.stop.output(seq.ttft_ms, seq.token_ms, seq.blend))

    @torch.inference_mode()
    def step(self) -> int:
        """One decode step for every running sequence; returns how many ran."""
        running = self.running
        if not running:
            return 0
        t0 = time.perf_counter()
        io = self.slots.step({seq.slot: seq.token for seq in running})
        greedy = all(seq.params.temperature <= 0 for seq in running)
        best = io.best.tolist() if greedy else None
        step_ms = (time.perf_counter() - t0) * 1e3
        still = []
        for seq in running:
            seq.token = best[seq.slot] if greedy else sample(io.logits[seq.slot], seq.params, seq.gen)
            seq.token_ms.append(step_ms)
            if not self._stops(seq, self.slots.length[seq.slot]):
                still.append(seq)
        self.running = still
        return len(running)

    def drop_all(self) -> list[object]:
        """Remove every running sequence without finishing it (a failed step); returns their owners."""
        owners = [seq.owner for seq in self.running]
        for seq in self.running:
            self.slots.release(seq.slot)
        self.running = []
        return owners
