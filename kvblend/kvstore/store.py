"""ChunkKVStore: which chunk lives on which tier, pins, LRU eviction, statistics. No tensor math, no prompt layout.

Tiers, fastest first: "gpu" (the compute device), "cpu" (host memory, pinned when CUDA is present),
"disk" (the source of truth), and optionally "remote" (kvblend/kvstore/remote.py: a Redis-protocol server shared
by every process and replica). Every chunk put in the store is written to disk first (and to the remote tier when
there is one); memory tiers hold copies. A chunk found only on the remote tier (verified there, as a disk file is)
is copied to disk, then read on like a disk chunk. A pinned chunk (in use by a blend or a promotion) is never
evicted from any tier.

Read verbs and their outcomes (LMCache-style):
  fetch(key, tier)            -> Fetched: the chunk made resident on `tier`, or no chunk with outcome "missing"
                                 (not stored) or "corrupt" (its file failed verification: removed, never used)
  lookup(key, tier)           -> the chunk or None (fetch(...).chunk): reads that must never build
  get(key, tier, build=None)  -> Fetched with a chunk: build() (the caller's builder of that chunk: it knows its
                                 token ids) runs only for a missing or corrupt chunk, timed into build_ms; without
                                 a builder, ChunkMissingError / ChunkCorruptError. The store knows no token ids
                                 and calls back into nobody: a request's Residency passes its chunks' builders
  prefetch(keys, tier, keep)  -> ahead of a request (a background thread): disk-only chunks made resident on a memory
                                 tier as far as its budget allows, evicting nothing pinned or in `keep`; never a hit
Over-budget is never a "missing" outcome: BudgetExceededError propagates from every verb and nothing is rebuilt.
A corrupt chunk counts in stats.corrupt, never as a hit; a missing one in stats.misses.

A disk that cannot take a chunk (full, a quota, read-only, or its budget capped by the free space and held by pinned
chunks) is not an error: put() keeps the chunk on the memory tiers only, counts stats.disk_write_errors, logs one
warning when the disk stops taking writes and sets disk_problem (None again after the next successful write).

Thread safety: every verb holds the store's lock (an RLock) while it reads or changes which chunk lives where, so a
prefetch thread and the request thread can share one store. Chunk builds (get) and the prefetch's file reads
run outside the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from functools import wraps
from typing import TYPE_CHECKING, Callable, Iterable, Literal

import torch

from kvblend.errors import BudgetExceededError, ChunkCorruptError, ChunkMissingError, StoreError
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.kvstore.key import ChunkKey
from kvblend.kvstore.tiers import DiskTier, MemoryTier

if TYPE_CHECKING:
    from kvblend.kvstore.remote import RemoteTier
from kvblend.vocab import TIERS

log = logging.getLogger(__name__)

Outcome = Literal["hit", "missing", "corrupt"]


def _locked(method):
    """Run the method holding the store's lock (reentrant: verbs call each other)."""

    @wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return run


@dataclass(slots=True)
class StoreStats:
    hits: Counter = field(default_factory=Counter)  # per tier a chunk was found on (verified)
    misses: int = 0  # not in the store at all
    corrupt: int = 0  # failed verification on load (file removed; rebuilt when the reader passed a builder)
    built: int = 0  # chunks built by get() for a missing or corrupt outcome
    build_ms: float = 0.0  # wall time of those builds (prefill alone + write), never part of a TTFT
    evictions: Counter = field(default_factory=Counter)  # per tier
    bytes_moved: Counter = field(default_factory=Counter)  # e.g. "cpu->gpu"
    prefetched: int = 0  # chunks a prefetch made resident ahead of a request (not hits: the request counts those)
    disk_write_errors: int = 0  # chunks the disk could not take (kept on the memory tiers only)
    leftovers_removed: int = 0  # files of dead writers removed at start-up (temp files, tensors without sidecar)
    expired: int = 0  # chunks removed for being unused longer than the store's TTL

    def as_dict(self) -> dict:
        hits = sum(self.hits.values())
        total = hits + self.misses + self.corrupt
        return {"hits": dict(self.hits), "misses": self.misses, "corrupt": self.corrupt, "built": self.built,
                "build_ms": round(self.build_ms, 3), "evictions": dict(self.evictions),
                "bytes_moved": dict(self.bytes_moved), "prefetched": self.prefetched,
                "disk_write_errors": self.disk_write_errors, "leftovers_removed": self.leftovers_removed,
                "expired": self.expired, "hit_rate": (hits / total) if total else None}


@dataclass(frozen=True, slots=True)
class Fetched:
    """The outcome of one read: the chunk (None when missing or corrupt and not built), where it was found."""

    key: ChunkKey
    chunk: ChunkKV | None
    outcome: Outcome
    found_tier: str | None  # tier the chunk was read from ("gpu" | "cpu" | "disk" | "remote"); None unless a hit
    built: bool = False  # get() built it after a missing or corrupt outcome
    build_ms: float = 0.0


class ChunkKVStore:
    def __init__(self, root: Path, gpu_budget_bytes: int, cpu_budget_bytes: int, disk_budget_bytes: int,
                 device: torch.device | str = "cpu", model_name: str = "", store_text: bool = False,
                 chunk_shape: tuple[int, int, int] | None = None, remote: RemoteTier | None = None):
        """store_text: keep each chunk's text in its sidecar (default: token ids and a hash only); chunk_shape:
        (layers, kv heads, head dim) a stored chunk must have to be used (None: not checked); remote: the shared
        tier behind disk (read on a local miss, written with every chunk the store takes)."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        self.model_name = model_name
        self.tiers: dict[str, MemoryTier] = {
            "gpu": MemoryTier("gpu", device, gpu_budget_bytes),
            "cpu": MemoryTier("cpu", torch.device("cpu"), cpu_budget_bytes, pin_memory=cuda),
        }
        self.disk = DiskTier(Path(root), disk_budget_bytes, store_text=store_text, chunk_shape=chunk_shape)
        self.stats = StoreStats(leftovers_removed=self.disk.leftovers_removed)
        self.disk_problem: str | None = None  # why the disk takes no chunks now (None: it does)
        self.remote = remote
        self._pins: Counter = Counter()
        self._lock = threading.RLock()

    # pins -------------------------------------------------------------------------------------
    @_locked
    def pin(self, key: ChunkKey) -> None:
        self._pins[key.digest] += 1

    @_locked
    def unpin(self, key: ChunkKey) -> None:
        assert self._pins[key.digest] > 0, f"unpin of a chunk that is not pinned: {key}"
        self._pins[key.digest] -= 1
        if not self._pins[key.digest]:
            del self._pins[key.digest]

    @_locked
    def is_pinned(self, key: ChunkKey) -> bool:
        return self._pins[key.digest] > 0

    # queries (no statistics, no file reads) -----------------------------------------------------
    @_locked
    def tier_of(self, key: ChunkKey) -> str | None:
        """Fastest tier holding the chunk, None if it is not stored (a disk file is not verified here)."""
        for name in TIERS[:2]:
            if key.digest in self.tiers[name]:
                return name
        return "disk" if key.digest in self.disk else None

    @_locked
    def stored_nbytes(self, key: ChunkKey) -> int:
        """The chunk's size in bytes as stored (fastest tier holding it), 0 when it is not stored."""
        found = self.tier_of(key)
        if found is None:
            return 0
        return self.disk.nbytes(key.digest) if found == "disk" else self.tiers[found].nbytes(key.digest)

    def __contains__(self, key: ChunkKey) -> bool:
        return self.tier_of(key) is not None

    @_locked
    def used_bytes(self) -> dict[str, int]:
        return {"gpu": self.tiers["gpu"].used_bytes, "cpu": self.tiers["cpu"].used_bytes,
                "disk": self.disk.used_bytes}

    def budgets(self) -> dict[str, int]:
        return {"gpu": self.tiers["gpu"].budget_bytes, "cpu": self.tiers["cpu"].budget_bytes,
                "disk": self.disk.budget_bytes}

    @_locked
    def summary(self) -> dict:
        return {"stats": self.stats.as_dict(), "used_bytes": self.used_bytes(), "budget_bytes": self.budgets(),
                "num_chunks": {"gpu": len(self.tiers["gpu"]), "cpu": len(self.tiers["cpu"]),
                               "disk": len(self.disk)}, "disk_problem": self.disk_problem,
                **({"remote": self.remote.summary()} if self.remote is not None else {})}

    # writes -----------------------------------------------------------------------------------
    @_locked
    def put(self, chunk: ChunkKV, tier: str = "disk") -> ChunkKV:
        """Store a chunk on disk and, if asked, also resident on a memory tier. A disk that cannot take it: the
        chunk goes to the memory tiers only (`tier`, or the CPU tier when `tier` is disk; see the module doc)."""
        known = chunk.key.digest in self.disk
        on_disk = known or self._save_to_disk(chunk)
        if not known and self.remote is not None:
            self.remote.put(chunk, self.disk, self.model_name)
        if tier == "disk":
            if on_disk:
                return chunk
            try:
                return self._put_memory(chunk, "cpu")
            except BudgetExceededError:
                return chunk  # kept nowhere: the next request builds it again
        return self._put_memory(chunk, tier)

    def _save_to_disk(self, chunk: ChunkKV) -> bool:
        """Write the chunk to disk; False (counted, warned once) when the disk cannot take it."""
        try:
            self._make_room_on_disk(chunk.nbytes)
            self.disk.save(chunk, self.model_name)
        except (OSError, BudgetExceededError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            self.stats.disk_write_errors += 1
            if self.disk_problem is None:
                log.warning("chunk store %s: the disk takes no more chunks (%s); serving from the memory tiers",
                            self.disk.root, detail)
            self.disk_problem = f"disk writes failing ({detail}); chunks kept on the memory tiers only"
            return False
        if self.disk_problem is not None:
            log.warning("chunk store %s: disk writes work again", self.disk.root)
            self.disk_problem = None
        return True

    @_locked
    def expire(self, max_age_s: float) -> int:
        """Remove every unpinned chunk (all tiers) not used for more than max_age_s seconds; how many."""
        removed = 0
        for digest in self.disk.expired(max_age_s):
            if self._pins[digest]:
                continue
            self.disk.remove(digest)
            for t in self.tiers.values():
                if digest in t:
                    t.remove(digest)
            removed += 1
        self.stats.expired += removed
        return removed

    @_locked
    def _put_memory(self, chunk: ChunkKV, tier: str) -> ChunkKV:
        t = self.tiers[tier]
        if chunk.key.digest in t:
            return t.get(chunk.key.digest)
        self._make_room(tier, chunk.nbytes)
        return t.put(chunk)

    def _make_room(self, tier: str, nbytes: int, keep: frozenset[str] = frozenset()) -> None:
        """Evict least recently used chunks of `tier` (never a pinned one, nor one whose digest is in `keep`)
        until nbytes more fit; BudgetExceededError when they cannot."""
        t = self.tiers[tier]
        if nbytes > t.budget_bytes:
            raise BudgetExceededError(f"{tier} tier: a chunk of {nbytes} bytes exceeds the whole budget of "
                                      f"{t.budget_bytes} bytes; raise the {tier} budget")
        for digest in t.lru_digests():
            if t.used_bytes + nbytes <= t.budget_bytes:
                break
            if self._pins[digest] or digest in keep:
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

    def _fits(self, tier: str, nbytes: int, keep: frozenset[str]) -> bool:
        """Whether nbytes more fit on `tier` after evicting every chunk _make_room(..., keep) may evict."""
        t = self.tiers[tier]
        held = sum(t.nbytes(d) for d in t.lru_digests() if self._pins[d] or d in keep)
        return held + nbytes <= t.budget_bytes

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
    @_locked
    def fetch(self, key: ChunkKey, tier: str = "gpu") -> Fetched:
        """Make the chunk resident on `tier` (copied up from a slower tier if needed; for "disk": verified
        read; not on a local tier: the remote tier's verified entry, copied to disk). Outcome "missing" when it is
        not stored (or the remote tier is unreachable), "corrupt" when its file or remote entry fails verification
        (removed, a warning logged); BudgetExceededError propagates."""
        found, chunk, outcome = self.tier_of(key), None, "missing"
        if found == "disk":
            try:
                chunk = self.disk.load(key)
            except ChunkCorruptError as exc:
                log.warning("%s", exc)
                self.stats.corrupt += 1
                found, outcome = None, "corrupt"
        elif found is not None:
            chunk = self.tiers[found].get(key.digest)
        if found is None and self.remote is not None:
            chunk, outcome = self._from_remote(key, outcome)
            found = "remote" if chunk is not None else None
        if found is None:
            self.stats.misses += int(outcome == "missing")
            return Fetched(key, None, outcome, None)
        self.stats.hits[found] += 1
        if tier == "disk" or found == tier or (found == "gpu" and tier == "cpu"):
            return Fetched(key, chunk, "hit", found)
        moved = self._put_memory(chunk, tier)
        self.stats.bytes_moved[f"{found}->{tier}"] += chunk.nbytes
        return Fetched(key, moved, "hit", found)

    def _from_remote(self, key: ChunkKey, local: Outcome) -> tuple[ChunkKV | None, Outcome]:
        """The chunk from the remote tier (verified there), copied to disk (a disk that cannot take it: kept in
        memory only); else None and the outcome: corrupt when the local file or the remote entry was (each counted
        once), missing otherwise (an unreachable server too)."""
        chunk, outcome = self.remote.get(key, self.disk)
        if chunk is None:
            if outcome == "corrupt" and local != "corrupt":
                self.stats.corrupt += 1
            return None, "corrupt" if "corrupt" in (outcome, local) else "missing"
        self._save_to_disk(chunk)
        return chunk, "hit"

    def prefetch(self, keys: Iterable[ChunkKey], tier: str = "cpu", keep: Iterable[ChunkKey] = (),
                 stop: threading.Event | None = None) -> list[ChunkKey]:
        """Ahead of a request (typically in a background thread): make the chunks that are only on disk resident
        on memory tier `tier`, as far as its budget allows. Only a chunk that fits after evicting unpinned chunks
        outside `keep` and `keys` is read (what does not fit is skipped, never an error); nothing pinned or in
        `keep` (the chunks of the request in flight) is ever evicted. The read is verified (CRC-32) like fetch's;
        a file that fails it is left where it is, for the request's own fetch to find (counted there, once).
        Not a hit: the request that then finds the chunk on `tier` counts one. The file reads run outside the
        store's lock. `stop` set: the chunks not started yet are skipped. Returns the keys made resident."""
        if tier not in ("gpu", "cpu"):
            raise ValueError(f"prefetch goes to a memory tier (gpu or cpu), not {tier!r}")
        keys = list(keys)
        protect = frozenset(k.digest for k in keys) | frozenset(k.digest for k in keep)
        done: list[ChunkKey] = []
        for key in keys:
            if stop is not None and stop.is_set():
                break
            with self._lock:
                if self.tier_of(key) != "disk":  # resident already, or not stored (a request builds it)
                    continue
                if not self._fits(tier, self.disk.nbytes(key.digest), protect):
                    log.debug("prefetch: chunk %s does not fit in the %s budget; skipped", key, tier)
                    continue
            try:
                chunk = self.disk.read(key)
            except ChunkCorruptError as exc:
                log.debug("prefetch: %s; left for the request to find", exc)
                continue
            with self._lock:
                if self.tier_of(key) != "disk":  # a request took it meanwhile, or its file went away
                    continue
                if not self._fits(tier, chunk.nbytes, protect):
                    continue
                self._make_room(tier, chunk.nbytes, keep=protect)
                self.tiers[tier].put(chunk)
                self.disk.touch(key.digest)
                self.stats.prefetched += 1
                self.stats.bytes_moved[f"disk->{tier}"] += chunk.nbytes
            done.append(key)
        return done

    def lookup(self, key: ChunkKey, tier: str = "gpu") -> ChunkKV | None:
        """The chunk resident on `tier`, or None when it is missing or corrupt."""
        return self.fetch(key, tier).chunk

    def get(self, key: ChunkKey, tier: str = "gpu", build: Callable[[], ChunkKV] | None = None) -> Fetched:
        """fetch(), building and storing the chunk when (and only when) it is missing or corrupt and `build` is
        given (without it: ChunkMissingError / ChunkCorruptError). The build is timed into Fetched.build_ms and
        stats.build_ms; budget errors are never a rebuild."""
        got = self.fetch(key, tier)
        if got.chunk is not None:
            return got
        if build is None:
            if got.outcome == "corrupt":
                raise ChunkCorruptError(f"chunk {key}: its file was corrupt (removed) and no builder was given; "
                                        f"build it again")
            raise ChunkMissingError(f"chunk {key} is not in the store; build it first")
        t0 = time.perf_counter()
        chunk = build()
        if chunk.key != key:
            raise StoreError(f"builder returned chunk {chunk.key} for key {key}")
        chunk = self.put(chunk, tier)
        ms = (time.perf_counter() - t0) * 1e3
        self.stats.built += 1
        self.stats.build_ms += ms
        if got.outcome == "corrupt":
            log.info("chunk %s was corrupt on the read path; rebuilt in %.1f ms", key, ms)
        return Fetched(key, chunk, got.outcome, None, built=True, build_ms=ms)

    @_locked
    def stage(self, key: ChunkKey, tier: str) -> None:
        """Before a timed comparison: leave the chunk with `tier` as its fastest tier (copies on faster tiers
        are dropped, a copy on `tier` is made). Not counted as a hit; the chunk must be stored and unpinned."""
        if self._pins[key.digest]:
            raise StoreError(f"chunk {key} is pinned; it cannot be staged")
        found = self.tier_of(key)
        if found is None:
            raise ChunkMissingError(f"chunk {key} is not in the store; build it before staging it")
        order = TIERS.index(tier)
        if TIERS.index(found) > order:  # copy it up to `tier` (a verified read when it is on disk only)
            hits = self.stats.hits.copy()
            moved = self.stats.bytes_moved.copy()
            got = self.fetch(key, tier)
            self.stats.hits, self.stats.bytes_moved = hits, moved
            if got.chunk is None:
                raise ChunkCorruptError(f"chunk {key}: corrupt file found while staging (removed); build it again")
        for name in TIERS[:order]:  # drop faster copies; disk always keeps the file
            if key.digest in self.tiers[name]:
                chunk = self.tiers[name].remove(key.digest)
                if tier == "cpu" and name == "gpu" and key.digest not in self.tiers["cpu"]:
                    self._put_memory(chunk, "cpu")

    @_locked
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
