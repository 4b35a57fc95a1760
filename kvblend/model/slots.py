"""Decode slots for continuous batching: S sequences' KV in one static buffer [L, S, H_kv, rows + 1, D], and
one decode step for all of them (on CUDA a single captured graph; elsewhere the same computation eagerly).

A request is prefilled alone (its own KVState, as always), then admitted: its prompt KV is copied into a free
slot once (one device copy of its rows), and from then on every step appends one token to every busy slot.
Idle slots compute a dummy row that writes the slot's last (scratch) row; nothing reads it. Each row attends
only to its own slot's keys (a batch of one-row queries, layers.run_slot_layers), so a sequence's logits do
not depend on which other sequences share the step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from kvblend.model.kv import KVState
from kvblend.model.layers import embed, lm_logits, run_slot_layers
from kvblend.model.rope import rope_cos_sin

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SlotIO:
    host: torch.Tensor  # [2, S] long: tokens, positions
    inp: torch.Tensor  # [2, S] long on the device
    logits: torch.Tensor  # [S, V] fp32
    best: torch.Tensor  # [S] long


class DecodeSlots:
    """`num_slots` decode slots of `rows` KV rows each over one model (see the module docstring)."""

    def __init__(self, runner: Any, num_slots: int, rows: int):
        if num_slots < 1 or rows < 2:
            raise ValueError(f"decode slots need num_slots >= 1 and rows >= 2, got {num_slots}, {rows}")
        m, s = runner.model, runner.model.shape
        self.runner, self.model, self.num_slots, self.rows = runner, m, num_slots, rows
        shape = (s.num_layers, num_slots, s.num_kv_heads, rows + 1, s.head_dim)
        self.k = torch.zeros(shape, dtype=m.dtype, device=m.device)
        self.v = torch.zeros(shape, dtype=m.dtype, device=m.device)
        self.valid = torch.ones(num_slots, rows + 1, dtype=torch.bool, device=m.device)
        self.length = [0] * num_slots
        self.free = list(range(num_slots - 1, -1, -1))
        self._key_pos = torch.arange(rows + 1, device=m.device)
        self._eager_io: SlotIO | None = None  # the inputs / outputs of eager steps, made once

    @property
    def busy(self) -> int:
        return self.num_slots - len(self.free)

    @torch.inference_mode()
    def admit(self, state: KVState) -> int:
        """Copy a prefilled state's rows [0, length) into a free slot; returns the slot. The state itself is
        not used for decoding afterwards (its buffer may go back to the arena)."""
        if not self.free:
            raise RuntimeError("no free decode slot")
        n = state.length
        if state.capacity > self.rows:
            raise ValueError(f"a request of {state.capacity} KV rows does not fit a decode slot of {self.rows}")
        slot = self.free.pop()
        self.k[:, slot, :, :n].copy_(state.k[:, :, :n])
        self.v[:, slot, :, :n].copy_(state.v[:, :, :n])
        self.valid[slot].fill_(True)
        if state.valid is not None:
            self.valid[slot, :n].copy_(state.valid[:n])
        self.length[slot] = n
        return slot

    def release(self, slot: int) -> None:
        self.length[slot] = 0
        self.free.append(slot)

    def _io(self) -> SlotIO:
        dev, s = self.model.device, self.num_slots
        host = torch.zeros(2, s, dtype=torch.long)
        return SlotIO(host=host.pin_memory() if dev.type == "cuda" else host,
                      inp=torch.zeros(2, s, dtype=torch.long, device=dev),
                      logits=torch.zeros(s, self.model.shape.vocab_size, dtype=torch.float32, device=dev),
                      best=torch.zeros(s, dtype=torch.long, device=dev))

    def _body(self, lengths: list[int] | None = None):
        """The step over static inputs; lengths: eager steps attend to each busy slot's own rows only
        (layers.run_slot_layers); a captured step (None) to the whole buffer."""
        model, key_pos = self.model, self._key_pos
        inv_freq = model.inv_freq.to(model.device, torch.float32)

        def body(io: SlotIO) -> None:
            tokens, pos = io.inp[0], io.inp[1]
            cos, sin = rope_cos_sin(inv_freq, pos, model.dtype)
            mask = (key_pos[None, :] <= pos[:, None]) & self.valid
            h = run_slot_layers(model, self.k, self.v, embed(model, tokens), cos, sin, pos, mask, lengths)
            logits = lm_logits(model, h)
            io.logits.copy_(logits)
            io.best.copy_(logits.argmax(-1))
        return body

    @torch.inference_mode()
    def step(self, tokens: dict[int, int]) -> SlotIO:
        """Append tokens[slot] to each listed busy slot (one token each) in one step; returns the step's
        outputs (logits [S, V], best [S]: read the listed slots' rows before the next step; reading them
        synchronises, so the pinned input buffer is free again when the next step fills it)."""
        for slot in tokens:
            if self.length[slot] + 1 > self.rows:
                raise ValueError(f"decode slot {slot} is full ({self.rows} rows)")
        # warm-up and capture with every row at the scratch row: no busy slot's rows are touched
        g = self.runner.graphs.get(("slots", id(self), self.num_slots), self._io, self._body,
                                   lambda io: io.inp[1].fill_(self.rows)) if self.runner.use_graphs else None
        if g is None and self._eager_io is None:
            self._eager_io = self._io()
        io = g.io if g is not None else self._eager_io
        io.host[0].zero_()
        io.host[1].fill_(self.rows)  # idle slots: the scratch row
        for slot, token in tokens.items():
            io.host[0, slot] = token
            io.host[1, slot] = self.length[slot]
        io.inp.copy_(io.host, non_blocking=g is not None)
        if g is not None:
            g.replay()
        else:
            self._body([self.length[i] + 1 if i in tokens else 0 for i in range(self.num_slots)])(io)
        for slot in tokens:
            self.length[slot] += 1
        return io
