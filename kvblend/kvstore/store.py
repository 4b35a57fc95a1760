"""ChunkKVStore: which chunk lives on which tier, pins, LRU eviction, statistics. No tensor math.

Tiers, fastest first: "gpu" (the compute device), "cpu" (host memory, pinned when CUDA is present),
"disk" (the source of truth). Every chunk put in the store is written to disk first; memory tiers
hold copies. A pinned chunk (in use by a blend or a promotion) is never evicted from any tier.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from kvblend.errors import BudgetExceededError, ChunkCorruptError, StoreError
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.kvstore.key import ChunkKey
from kvblend.kvstore.tiers import DiskTier, MemoryTier

log = logging.getLogger(__name__)

TIERS = ("gpu", "cpu", "disk")


@dataclass(slots=True)
class StoreStats:
    hits: Counter = field(default_factory=Counter)  # per tier a chunk was found on
    misses: int = 0  # not in the store at all (built)
    corrupt: int = 0  # failed verification on load (rebuilt)
    evictions: Counter = field(default_factory=Counter)  # per tier
    bytes_moved: Counter = field(default_factory=Counter)  # e.g. "cpu->gpu"

    def as_dict(self) -> dict:
        total = sum(self.hits.values()) + self.misses
        return {"hits": dict(self.hits), "misses": self.misses, "corrupt": self.corrupt,
                "evictions": dict(self.evictions), "bytes_moved": dict(self.bytes_moved),
                "hit_rate": (sum(self.hits.values()) / total) if total else None}


@dataclass(frozen=True, slots=True)
class ChunkSlot:
    """A chunk's place in one prompt. A placeholder (tier "cpu") owns its positions but is not attended."""

    index: int  # position of the chunk in the prompt (retrieval order)
    key: ChunkKey
    start: int  # first global position
    num_tokens: int
    score: float
    tier: str

    @property
    def is_placeholder(self) -> bool:
        return self.tier != "gpu"


@dataclass(frozen=True, slots=True)
class Placement:
    slots: tuple[ChunkSlot, ...]

    @property
    def resident(self) -> tuple[ChunkSlot, ...]:
        return tuple(s for s in self.slots if not s.is_placeholder)

    @property
    def placeholders(self) -> tuple[ChunkSlot, ...]:
        return tuple(s for s in self.slots if s.is_placeholder)


class ChunkKVStore:
    def __init__(self, root: Path, gpu_budget_bytes: int, cpu_budget_bytes: int, disk_budget_bytes: int,
                 device: torch.device | str = "cpu", model_name: str = ""):
        device = torch.device(device)
        cuda = device.type == "cuda"
        self.model_name = model_name
        self.tiers: dict[str, MemoryTier] = {
            "gpu": MemoryTier("gpu", device, gpu_budget_bytes),
            "cpu": MemoryTier("cpu", torch.device("cpu"), cpu_budget_bytes, pin_memory=cuda),
        }
        self.disk = DiskTier(Path(root), disk_budget_bytes)
        self.stats = StoreStats()
        self._pins: Counter = Counter()

    # pins -------------------------------------------------------------------------------------
    def pin(self, key: ChunkKey) -> None:
        self._pins[key.digest] += 1

    def unpin(self, key: ChunkKey) -> None:
        assert self._pins[key.digest] > 0, f"unpin of a chunk that is not pinned: {key}"
        self._pins[key.digest] -= 1
        if not self._pins[key.digest]:
            del self._pins[key.digest]

    def is_pinned(self, key: ChunkKey) -> bool:
        return self._pins[key.digest] > 0

    # queries ----------------------------------------------------------------------------------
    def tier_of(self, key: ChunkKey) -> str | None:
        for name in TIERS[:2]:
            if key.digest in self.tiers[name]:
                return name
        return "disk" if key.digest in self.disk else None

    def __contains__(self, key: ChunkKey) -> bool:
        return self.tier_of(key) is not None

    def used_bytes(self) -> dict[str, int]:
        return {"gpu": self.tiers["gpu"].used_bytes, "cpu": self.tiers["cpu"].used_bytes,
                "disk": self.disk.used_bytes}

    def budgets(self) -> dict[str, int]:
        return {"gpu": self.tiers["gpu"].budget_bytes, "cpu": self.tiers["cpu"].budget_bytes,
                "disk": self.disk.budget_bytes}

    def summary(self) -> dict:
        return {"stats": self.stats.as_dict(), "used_bytes": self.used_bytes(), "budget_bytes": self.budgets(),
                "num_chunks": {"gpu": len(self.tiers["gpu"]), "cpu": len(self.tiers["cpu"]),
                               "disk": len(self.disk)}}

    # writes -----------------------------------------------------------------------------------
    def put(self, chunk: ChunkKV, tier: str = "disk") -> ChunkKV:
        """Store a chunk on disk and, if asked, also resident on a memory tier."""
        if chunk.key.digest not in self.disk:
            self._make_room_on_disk(chunk.nbytes)
            self.disk.save(chunk, self.model_name)
        if tier == "disk":
            return chunk
        return self._put_memory(chunk, tier)

    def _put_memory(self, chunk: ChunkKV, tier: str) -> ChunkKV:
        t = self.tiers[tier]
        if chunk.key.digest in t:
            return t.get(chunk.key.digest)
        self._make_room(tier, chunk.nbytes)
        return t.put(chunk)

    def _make_room(self, tier: str, nbytes: int) -> None:
        t = self.tiers[tier]
        if nbytes > t.budget_bytes:
            raise BudgetExceededError(f"{tier} tier: a chunk of {nbytes} bytes exceeds the whole budget of "
                                      f"{t.budget_bytes} bytes; raise the {tier} budget")
        for digest in t.lru_digests():
            if t.used_bytes + nbytes <= t.budget_bytes:
                break
            if self._pins[digest]:
                continue
            victim = t.remove(digest)
            self.stats.evictions[tier] += 1
            if tier == "gpu" and digest not in self.tiers["cpu"]:
                cpu = self.tiers["cpu"]
                if victim.nbytes <= cpu.budget_bytes - cpu.used_bytes:  # demote without cascading
                    cpu.put(victim)
                    self.stats.bytes_moved["gpu->cpu"] += victim.nbytes
        if t.used_bytes + nbytes > t.budget_bytes:
            raise BudgetExceededError(f"{tier} tier: {t.used_bytes} of {t.budget_bytes} bytes are held by pinned "
                                      f"chunks; {nbytes} more do not fit; raise the {tier} budget or use fewer chunks")

    def _make_room_on_disk(self, nbytes: int) -> None:
        d = self.disk
        for digest in d.lru_digests():
            if d.used_bytes + nbytes <= d.budget_bytes:
                break
            if not self._pins[digest]:
                d.remove(digest)
                self.stats.evictions["disk"] += 1
        if d.used_bytes + nbytes > d.budget_bytes:
            raise BudgetExceededError(f"disk tier: {nbytes} bytes do not fit in the budget of {d.budget_bytes}; "
                                      f"raise the disk budget")

    # reads ------------------------------------------------------------------------------------
    def get(self, key: ChunkKey, tier: str = "gpu") -> ChunkKV:
        """The chunk resident on `tier` (copied up from a slower tier if needed); StoreError if absent."""
        found = self.tier_of(key)
        if found is None:
            raise StoreError(f"chunk {key} is not in the store; build it first")
        self.stats.hits[found] += 1
        if found == "disk":
            chunk = self.disk.load(key)
        else:
            chunk = self.tiers[found].get(key.digest)
        if tier == "disk" or found == tier or (found == "gpu" and tier == "cpu"):
            return chunk
        moved = self._put_memory(chunk, tier)
        self.stats.bytes_moved[f"{found}->{tier}"] += chunk.nbytes
        return moved

    def get_or_build(self, key: ChunkKey, build: Callable[[], ChunkKV], tier: str = "gpu") -> ChunkKV:
        """get(), building (and storing) the chunk when it is missing or its file is corrupt."""
        try:
            return self.get(key, tier)
        except ChunkCorruptError as exc:
            log.warning("%s", exc)
            self.stats.corrupt += 1
        except StoreError:
            self.stats.misses += 1
        chunk = build()
        if chunk.key != key:
            raise StoreError(f"builder returned chunk {chunk.key} for key {key}")
        return self.put(chunk, tier)

    def demote(self, key: ChunkKey) -> None:
        """Move a resident chunk from the GPU tier to the CPU tier (no-op if not on GPU)."""
        if key.digest not in self.tiers["gpu"]:
            return
        if self._pins[key.digest]:
            raise StoreError(f"chunk {key} is pinned; unpin it before demoting")
        chunk = self.tiers["gpu"].remove(key.digest)
        if key.digest not in self.tiers["cpu"]:
            self._put_memory(chunk, "cpu")
            self.stats.bytes_moved["gpu->cpu"] += chunk.nbytes

    # placement --------------------------------------------------------------------------------
    def place(self, keys: Sequence[ChunkKey], num_tokens: Sequence[int], scores: Sequence[float],
              first_position: int, top_k: int) -> Placement:
        """Lay the chunks out in prompt order from first_position; the top_k by score go on the GPU tier,
        the others are CPU placeholders that already own their position ranges. Resident chunks are
        pinned until release(placement)."""
        if not len(keys) == len(num_tokens) == len(scores):
            raise ValueError("keys, num_tokens and scores must have the same length")
        ranked = sorted(range(len(keys)), key=lambda i: (-scores[i], i))
        on_gpu = set(ranked[:max(0, top_k)])
        slots, start = [], first_position
        for i, key in enumerate(keys):
            tier = "gpu" if i in on_gpu else "cpu"
            self.get(key, tier)
            if tier == "gpu":
                self.pin(key)
            slots.append(ChunkSlot(i, key, start, int(num_tokens[i]), float(scores[i]), tier))
            start += int(num_tokens[i])
        return Placement(tuple(slots))

    def release(self, placement: Placement) -> None:
        """Unpin the resident chunks of a placement (they become evictable again)."""
        for slot in placement.resident:
            self.unpin(slot.key)
