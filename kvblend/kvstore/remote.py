"""RemoteTier: chunk KV shared by every process and replica, on a Redis-protocol server (Redis, Valkey).

The slowest tier, behind local disk (GPU -> pinned CPU -> disk -> remote). An entry is the chunk exactly as the
store's disk tier stores it (the `codec`, a kvblend/kvstore/tiers.py DiskTier: encode / verify / as_chunk): the
safetensors bytes under `<prefix><key>:kv` and their sidecar JSON (sizes, CRC-32, SHA-256, key, token ids) under
`<prefix><key>:meta`, written once in one
MULTI/EXEC transaction (both or neither, metadata last) with the tier's TTL, and never over an entry that exists.
`<key>` is str(ChunkKey), the local store's own key string, so everything the local key carries (model
fingerprint, dtype, precompute context, cache salt) separates remote entries too.

Reads fetch both values in one round trip and verify them as a disk read is verified (DiskTier.verify: size,
CRC-32, key digest, layout, shape, token ids against the key, dtype); an entry that fails, or holds only one of its two values, is deleted and reported "corrupt" (the
store then rebuilds the chunk and writes it again). Never trusted unverified.

Byte budget: a sorted set `<prefix>lru` (digest -> last use) and a hash `<prefix>bytes` (digest -> stored bytes)
shared by every writer; a write evicts the least recently used entries until it fits (several writers at once may
overshoot the budget by the entries in flight). Entries idle longer than the TTL expire on the server.

Availability: short socket timeouts (0.5 s unless the URL sets socket_timeout / socket_connect_timeout). A failed
call logs one warning, counts in `unavailable`, and the tier is skipped for RETRY_S seconds (reads are misses,
writes are dropped): requests are served from the local tiers, never failed. The next call after RETRY_S tries
again; success logs that the server is back.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
import time
from collections import Counter

import torch

from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.kvstore.key import ChunkKey
from kvblend.kvstore.tiers import DiskTier

log = logging.getLogger(__name__)

RETRY_S = 5.0  # after a failed call the tier is skipped this long
DEFAULT_TIMEOUT_S = 0.5
_DOWN = object()  # what _call returns when the server could not be reached
_VERIFY_ERRORS = (ValueError, KeyError, TypeError, struct.error)


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for logs and /health."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


class RemoteTier:
    """A Redis-protocol server as a chunk tier (see the module docstring)."""

    def __init__(self, url: str, budget_bytes: int, ttl_s: int = 0, prefix: str = "kvblend:"):
        import redis

        self.url = redact(url)
        self.budget_bytes = int(budget_bytes)
        self.ttl_s = int(ttl_s)
        self.prefix = prefix
        kwargs = {}
        if "socket_timeout" not in url:
            kwargs["socket_timeout"] = DEFAULT_TIMEOUT_S
        if "socket_connect_timeout" not in url:
            kwargs["socket_connect_timeout"] = DEFAULT_TIMEOUT_S
        self._errors = (redis.exceptions.RedisError, OSError)
        self._redis = redis.Redis.from_url(url, **kwargs)
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self.reachable: bool | None = None  # None: not tried yet
        self.stats: Counter = Counter()  # hits, misses, corrupt, writes, write_bytes, evictions, unavailable, skipped

    # keys ---------------------------------------------------------------------------------------------
    def _keys(self, digest: str) -> tuple[str, str]:
        return f"{self.prefix}{digest}:kv", f"{self.prefix}{digest}:meta"

    @property
    def _lru(self) -> str:
        return f"{self.prefix}lru"

    @property
    def _sizes(self) -> str:
        return f"{self.prefix}bytes"

    # availability -------------------------------------------------------------------------------------
    def _call(self, what: str, fn):
        """fn(client), or _DOWN when the server is unreachable (now, or within RETRY_S of the last failure)."""
        with self._lock:
            if time.monotonic() < self._retry_at:
                self.stats["skipped"] += 1
                return _DOWN
        try:
            result = fn(self._redis)
        except self._errors as exc:
            with self._lock:
                self.stats["unavailable"] += 1
                self._retry_at = time.monotonic() + RETRY_S
                was = self.reachable
                self.reachable = False
            if was is not False:
                log.warning("remote store %s: %s failed (%s: %s); serving from the local tiers, retrying in "
                            "%.0f s", self.url, what, type(exc).__name__, str(exc).splitlines()[0] if str(exc)
                            else "", RETRY_S)
            return _DOWN
        if self.reachable is False:
            log.warning("remote store %s is reachable again", self.url)
        self.reachable = True
        return result

    def ping(self) -> bool:
        """Whether the server answers now (logs the warning when it does not)."""
        return self._call("ping", lambda r: r.ping()) is True

    # reads --------------------------------------------------------------------------------------------
    def get(self, key: ChunkKey, codec: DiskTier) -> tuple[ChunkKV | None, str]:
        """(chunk, "hit"), or (None, "missing" | "corrupt" | "unavailable"). A corrupt or partial entry is
        deleted (the caller rebuilds the chunk and put() writes it again)."""
        digest = str(key)
        kv_key, meta_key = self._keys(digest)
        got = self._call("read", lambda r: r.pipeline(transaction=False).get(meta_key).get(kv_key).execute())
        if got is _DOWN:
            return None, "unavailable"
        meta_raw, data = got
        if meta_raw is None and data is None:
            self.stats["misses"] += 1
            return None, "missing"
        try:
            if meta_raw is None or data is None:
                raise ValueError(f"partial entry (the {'metadata' if meta_raw is None else 'tensor bytes'} "
                                 f"missing)")
            meta = json.loads(meta_raw)
            kv = codec.verify(key, torch.frombuffer(bytearray(data), dtype=torch.uint8), meta)
            chunk = codec.as_chunk(key, kv, meta)
        except _VERIFY_ERRORS as exc:
            log.warning("remote store %s: chunk %s failed verification (%s); deleted, it will be rebuilt",
                        self.url, digest, exc)
            self.stats["corrupt"] += 1
            self._call("delete", lambda r: r.pipeline(transaction=True).delete(kv_key, meta_key)
                       .zrem(self._lru, digest).hdel(self._sizes, digest).execute())
            return None, "corrupt"
        self.stats["hits"] += 1
        self._call("touch", lambda r: self._touch(r.pipeline(transaction=False), digest).execute())
        return chunk, "hit"

    def _touch(self, pipe, digest: str):
        """Mark the entry used now (LRU) and restart its TTL."""
        pipe.zadd(self._lru, {digest: time.time()})
        if self.ttl_s:
            for k in self._keys(digest):
                pipe.expire(k, self.ttl_s)
        return pipe

    # writes -------------------------------------------------------------------------------------------
    def put(self, chunk: ChunkKV, codec: DiskTier, model_name: str = "") -> bool:
        """Write the chunk once (skipped when an entry exists, when it cannot fit the budget, or when the server
        is unreachable); True when this call wrote it."""
        digest = str(chunk.key)
        kv_key, meta_key = self._keys(digest)
        data, meta = codec.encode(chunk, model_name)
        if len(data) > self.budget_bytes:
            log.debug("remote store: chunk %s (%d bytes) exceeds the whole budget of %d bytes; not written",
                      digest, len(data), self.budget_bytes)
            return False
        if self._call("exists", lambda r: r.exists(meta_key)) in (_DOWN, 1):
            return False
        if self._call("evict", lambda r: self._make_room(r, len(data))) is _DOWN:
            return False
        ex = self.ttl_s or None

        def write(r):
            pipe = r.pipeline(transaction=True)  # MULTI ... EXEC: both values or neither, metadata last
            pipe.set(kv_key, data, ex=ex).set(meta_key, json.dumps(meta), ex=ex)
            pipe.hset(self._sizes, digest, len(data))
            return self._touch(pipe, digest).execute()

        if self._call("write", write) is _DOWN:
            return False
        self.stats["writes"] += 1
        self.stats["write_bytes"] += len(data)
        return True

    def _make_room(self, r, nbytes: int) -> None:
        """Drop the index entries of expired chunks, then evict least recently used chunks until nbytes fit."""
        if self.ttl_s:
            expired = r.zrangebyscore(self._lru, "-inf", time.time() - self.ttl_s)
            if expired:
                r.pipeline(transaction=True).zrem(self._lru, *expired).hdel(self._sizes, *expired).execute()
        used = sum(int(v) for v in r.hvals(self._sizes))
        while used + nbytes > self.budget_bytes:
            popped = r.zpopmin(self._lru, 1)
            if not popped:
                break
            digest = popped[0][0].decode()
            size = int(r.hget(self._sizes, digest) or 0)
            r.pipeline(transaction=True).delete(*self._keys(digest)).hdel(self._sizes, digest).execute()
            used -= size
            self.stats["evictions"] += 1

    def used_bytes(self) -> int | None:
        """Bytes the tier's index records (every writer's), None when the server is unreachable."""
        got = self._call("used bytes", lambda r: sum(int(v) for v in r.hvals(self._sizes)))
        return None if got is _DOWN else got

    def summary(self) -> dict:
        """This process's view of the tier (no server call): counters, budget, TTL, reachability."""
        return {"url": self.url, "reachable": self.reachable, "budget_bytes": self.budget_bytes,
                "ttl_s": self.ttl_s, **{k: self.stats[k] for k in ("hits", "misses", "corrupt", "writes",
                                                                   "write_bytes", "evictions", "unavailable",
                                                                   "skipped")}}
