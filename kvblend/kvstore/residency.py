"""Residency: one request's chunk placement and pins (which chunk slots are resident on the GPU tier, which are
CPU placeholders), with the verbs that change it: load, promote, demote, release.

It enforces the request's GPU chunk budget against the GPU tier's byte budget: at no time are more than
`gpu_chunks` of the request's chunks resident, nor more bytes than the GPU tier holds. When the best `gpu_chunks`
chunks of a placement would not fit in the byte budget, fewer start resident (a warning says so) and the rest
become placeholders. Each resident chunk is pinned in the store for as long as it is resident; release() (also
run on leaving a `with` block, an exception included) unpins every chunk the request pinned, so no pin outlives
the request. Reads go through ChunkKVStore.get with the request's builder of each chunk, so a chunk found
missing or corrupt (a promotion included) is rebuilt from the request's token ids and the request goes on.

The Residency decides and fetches; writing a promoted chunk's KV into the request's KV state
(fusion.blend.promote_chunk) is the caller's. Slots are the layout's ChunkSlot (fusion/layout.py), read by
attribute only (kvstore sits below fusion).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, Iterable, Protocol, Sequence

from kvblend.errors import BudgetExceededError, StoreError
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.kvstore.key import ChunkKey
from kvblend.kvstore.store import ChunkKVStore, Fetched

log = logging.getLogger(__name__)

Builder = Callable[[], ChunkKV]


class Slot(Protocol):
    index: int
    key: ChunkKey
    score: float
    tier: str  # "gpu" (resident) or "cpu" (placeholder)


class Residency:
    """The placement and pins of one request over `store` (see the module docstring)."""

    def __init__(self, store: ChunkKVStore, slots: Sequence[Slot], gpu_chunks: int,
                 builders: Sequence[Builder | None] | None = None, nbytes: Sequence[int] | None = None,
                 gpu_budget_bytes: int | None = None):
        """slots: the layout's slots, in prompt order (slot.index == position); slot.tier "gpu" asks for a
        resident chunk. builders: per slot, the request's builder of that chunk (None: a missing or corrupt
        chunk is an error). nbytes: per slot, the chunk's size in bytes (default: the size the store knows,
        0 for a chunk not stored yet; replaced by the real size once loaded). gpu_budget_bytes: default the
        store's GPU tier budget."""
        if [s.index for s in slots] != list(range(len(slots))):
            raise ValueError("slots must be in prompt order, slot.index == its position")
        n = len(slots)
        self.store = store
        self.gpu_chunks = max(0, int(gpu_chunks))
        self.budget_bytes = store.budgets()["gpu"] if gpu_budget_bytes is None else int(gpu_budget_bytes)
        self._builders = list(builders) if builders is not None else [None] * n
        self._nbytes = list(nbytes) if nbytes is not None else [store.stored_nbytes(s.key) for s in slots]
        if not len(self._builders) == len(self._nbytes) == n:
            raise ValueError(f"{len(self._builders)} builders and {len(self._nbytes)} sizes for {n} slots")
        self._keys = [s.key for s in slots]
        self._on_gpu = self._admit(slots)
        self._pinned: set[int] = set()
        self._released = False
        # the placement as it starts (after the byte budget): what a caller reports as the initial layout
        self.slots = tuple(replace(s, tier="gpu" if s.index in self._on_gpu else "cpu") for s in slots)

    def _admit(self, slots: Sequence[Slot]) -> set[int]:
        """The slots asked to be resident that fit gpu_chunks and the byte budget, best score first."""
        asked = sorted((s for s in slots if s.tier == "gpu"), key=lambda s: (-s.score, s.index))
        admitted: set[int] = set()
        used = 0
        for s in asked:
            if len(admitted) < self.gpu_chunks and used + self._nbytes[s.index] <= self.budget_bytes:
                admitted.add(s.index)
                used += self._nbytes[s.index]
        if len(admitted) < len(asked):
            log.warning("%d chunks asked to be GPU-resident (%d bytes), gpu_chunks %d, GPU budget %d bytes: %d "
                        "resident, %d made placeholders", len(asked), sum(self._nbytes[s.index] for s in asked),
                        self.gpu_chunks, self.budget_bytes, len(admitted), len(asked) - len(admitted))
        return admitted

    # queries ----------------------------------------------------------------------------------------
    @property
    def resident(self) -> tuple[int, ...]:
        """Slots resident on the GPU tier now (loaded or promoted, or to be loaded resident), prompt order."""
        return tuple(sorted(self._on_gpu))

    @property
    def placeholders(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self._keys)) if i not in self._on_gpu)

    @property
    def pinned(self) -> tuple[int, ...]:
        """Slots whose chunk this request holds a store pin on."""
        return tuple(sorted(self._pinned))

    def is_resident(self, index: int) -> bool:
        return index in self._on_gpu

    def resident_bytes(self, without: Iterable[int] = ()) -> int:
        skip = set(without)
        return sum(self._nbytes[i] for i in self._on_gpu if i not in skip)

    def free_chunks(self, without: Iterable[int] = ()) -> int:
        """How many more chunks may be resident (after demoting `without`)."""
        skip = set(without)
        return self.gpu_chunks - len([i for i in self._on_gpu if i not in skip])

    def free_bytes(self, without: Iterable[int] = ()) -> int:
        return self.budget_bytes - self.resident_bytes(without)

    def can_promote(self, index: int, without: Iterable[int] = ()) -> bool:
        """Whether placeholder `index` fits the chunk and byte budgets (after demoting `without`)."""
        without = list(without)
        return (index not in self._on_gpu and not self._released and self.free_chunks(without) >= 1
                and self._nbytes[index] <= self.free_bytes(without))

    # verbs ------------------------------------------------------------------------------------------
    def _get(self, index: int, tier: str) -> Fetched:
        got = self.store.get(self._keys[index], tier, build=self._builders[index])
        self._nbytes[index] = got.chunk.nbytes
        return got

    def _check_open(self) -> None:
        if self._released:
            raise StoreError("this request's residency was released; its pins are gone: start a new request")

    def _pin_and_get(self, index: int) -> Fetched:
        """Pin first (nothing evicts the chunk between its fetch and its pin), then fetch it to the GPU tier."""
        self._check_open()
        self.store.pin(self._keys[index])
        self._pinned.add(index)
        try:
            return self._get(index, "gpu")
        except BaseException:
            self._pinned.discard(index)
            self.store.unpin(self._keys[index])
            raise

    def load(self, index: int) -> Fetched:
        """At the request's start: bring slot `index` to its tier (resident: the GPU tier, pinned; placeholder:
        the CPU tier, not pinned). A missing or corrupt chunk is built through the slot's builder."""
        if index in self._on_gpu:
            return self._pin_and_get(index)
        return self._get(index, "cpu")

    def read(self, index: int) -> ChunkKV:
        """The slot's chunk from the tier it is on now (no pin taken or dropped), e.g. to summarise its keys."""
        return self._get(index, "gpu" if index in self._on_gpu else "cpu").chunk

    def promote(self, index: int) -> Fetched:
        """Fetch placeholder `index` to the GPU tier, pin it and record it resident (a corrupt or missing chunk
        is rebuilt through its builder). BudgetExceededError when it does not fit: demote another first."""
        self._check_open()
        if index in self._on_gpu:
            raise ValueError(f"slot {index} is already resident")
        if not self.can_promote(index):
            raise BudgetExceededError(f"slot {index} ({self._nbytes[index]} bytes) does not fit: "
                                      f"{self.free_chunks()} of {self.gpu_chunks} chunks and {self.free_bytes()} "
                                      f"of {self.budget_bytes} bytes free; demote a chunk first")
        got = self._pin_and_get(index)
        self._on_gpu.add(index)
        return got

    def demote(self, index: int) -> None:
        """Unpin slot `index`, mark it a placeholder and move its chunk to the CPU tier (unless another request
        still pins it). A placeholder already: nothing to do."""
        if index not in self._on_gpu:
            return
        self._on_gpu.discard(index)
        if index in self._pinned:
            self._pinned.discard(index)
            self.store.unpin(self._keys[index])
        if not self.store.is_pinned(self._keys[index]):
            self.store.demote(self._keys[index])

    def release(self) -> None:
        """Unpin every chunk this request pinned (idempotent). The placement stays readable; no verb changes it
        any more."""
        for index in sorted(self._pinned):
            self.store.unpin(self._keys[index])
        self._pinned.clear()
        self._released = True

    def __enter__(self) -> "Residency":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
