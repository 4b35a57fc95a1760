"""A request's KV: `KVState` (preallocated K/V rows of one sequence) and `KVArena`, the model runner's static
buffers that prefill writes into and decoding reads from, so a request's KV is never copied between them.

A static buffer holds `rows` rows (a multiple of ROW_BUCKET) plus MAX_PAD scratch rows after them: padded
computations (the captured blend front and recompute layers) write their pad rows there, never into rows a
request owns. CUDA graphs capture a buffer's tensors by address, so graphs are kept per buffer; a buffer is
leased to one request at a time and returns to the arena when the request's KVState is garbage-collected
(or `release()`d), keeping its graphs for the next request of its size.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

ROW_BUCKET = 1024  # static buffers come in multiples of this many rows
MAX_PAD = 256  # scratch rows past a static buffer's rows: more than any padded computation's pad rows
MAX_IDLE = 2  # idle buffers kept per size (more are freed, with their graphs)


@dataclass(slots=True, weakref_slot=True)
class KVState:
    """KV of one sequence in preallocated buffers. k, v: [L, H_kv, capacity, D]; rows >= length are unused.

    valid [capacity] marks attendable rows: a CPU-staged chunk is a placeholder whose rows own their
    positions but stay invalid (masked out) until the chunk is promoted into them.
    buffer: the static buffer this state lives in (a KVArena lease), or None for a private allocation.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    valid: torch.Tensor | None = None  # bool [capacity]; None = every row < length is valid
    # host mirror of `valid` (1 = valid), so has_holes() never waits for the device
    valid_host: bytearray | None = None
    buffer: "StaticKV | None" = None

    def has_holes(self) -> bool:
        return self.valid_host is not None and self.valid_host.find(0, 0, self.length) >= 0

    @torch.inference_mode()  # states are inference tensors (prefill), whoever marks them
    def set_valid(self, start: int, end: int, value: bool) -> None:
        if self.valid is None:
            self.valid = torch.ones(self.capacity, dtype=torch.bool, device=self.k.device)
        if self.valid_host is None:
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

    def release(self) -> None:
        """Give a static buffer back to its arena now (the state must not be used afterwards)."""
        if self.buffer is not None:
            self.buffer.release()


def allocate_state(model, capacity: int) -> KVState:
    """A private, zeroed KV state of `capacity` rows (no static buffer, no graphs)."""
    s = model.shape
    shape = (s.num_layers, s.num_kv_heads, capacity, s.head_dim)
    return KVState(k=torch.zeros(shape, dtype=model.dtype, device=model.device),
                   v=torch.zeros(shape, dtype=model.dtype, device=model.device))


class StaticKV:
    """One static buffer: k, v [L, H_kv, rows + MAX_PAD, D], valid [rows + MAX_PAD]; `full` is a KVState over
    all of it (what captured computations read and write), `scratch_start` its first scratch row."""

    def __init__(self, arena: "KVArena", rows: int):
        model = arena.model
        s = model.shape
        shape = (s.num_layers, s.num_kv_heads, rows + MAX_PAD, s.head_dim)
        self.arena, self.rows, self.scratch_start = arena, rows, rows
        self.id = arena.next_id()
        k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        valid = torch.zeros(rows + MAX_PAD, dtype=torch.bool, device=model.device)
        self.full = KVState(k=k, v=v, valid=valid, buffer=self)  # no host mirror: only graphs read it
        self.in_use = False
        self._finalizer: weakref.finalize | None = None

    def lease(self, capacity: int) -> KVState:
        """A zeroed, all-valid KVState of the first `capacity` rows (views of this buffer)."""
        assert capacity <= self.rows, (capacity, self.rows)
        full = self.full
        full.k[:, :, :capacity].zero_()
        full.v[:, :, :capacity].zero_()
        full.valid.zero_()
        full.valid[:capacity] = True
        full.length = 0
        state = KVState(k=full.k[:, :, :capacity], v=full.v[:, :, :capacity], valid=full.valid[:capacity],
                        valid_host=bytearray(b"\x01") * capacity, buffer=self)
        self.in_use = True
        self._finalizer = weakref.finalize(state, self.arena.give_back, self)
        return state

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs give_back once


class KVArena:
    """The model runner's static KV buffers, by size (rows rounded up to ROW_BUCKET)."""

    def __init__(self, model, on_free=None):
        self.model = model
        self.on_free = on_free  # called with a buffer that is freed (its graphs are dropped)
        self._idle: dict[int, list[StaticKV]] = {}
        self._lock = threading.Lock()
        self._ids = 0
        self.allocated = 0  # buffers made so far (a figure for tests and benches)

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    @staticmethod
    def bucket(capacity: int) -> int:
        return max(ROW_BUCKET, -(-capacity // ROW_BUCKET) * ROW_BUCKET)

    @torch.inference_mode()  # the buffers are inference tensors, whoever asks
    def lease(self, capacity: int) -> KVState:
        rows = self.bucket(capacity)
        with self._lock:
            idle = self._idle.get(rows)
            buf = idle.pop() if idle else None
        if buf is None:
            buf = StaticKV(self, rows)
            self.allocated += 1
            log.debug("%s: static KV buffer %d of %d rows", self.model.name, buf.id, rows)
        return buf.lease(capacity)

    @torch.inference_mode()
    def adopt(self, state: KVState) -> None:
        """Copy a private state into a lease of its capacity and point it there (one device copy; states
        from a lease need none). The buffer returns to the arena when `state` is collected."""
        lease = self.lease(state.capacity)
        buf, n = lease.buffer, state.length
        lease.k[:, :, :n].copy_(state.k[:, :, :n])
        lease.v[:, :, :n].copy_(state.v[:, :, :n])
        if state.valid is not None:
            lease.valid.copy_(state.valid)
            lease.valid_host = bytearray(state.valid_host) if state.valid_host is not None else lease.valid_host
        state.k, state.v, state.valid, state.valid_host, state.buffer = (lease.k, lease.v, lease.valid,
                                                                         lease.valid_host, buf)
        buf._finalizer.detach()
        buf._finalizer = weakref.finalize(state, self.give_back, buf)

    def give_back(self, buf: StaticKV) -> None:
        buf.in_use = False
        buf._finalizer = None
        with self._lock:
            idle = self._idle.setdefault(buf.rows, [])
            if len(idle) < MAX_IDLE:
                idle.append(buf)
                return
        if self.on_free is not None:
            self.on_free(buf)

    def idle_buffers(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())
