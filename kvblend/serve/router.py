"""ChunkAwareRouter: a Ray Serve request router that sends a request to the engine replica already holding its
chunks in memory (GPU / CPU tiers), balanced against queue length; requests without documents go round-robin.

Route ids: one per document of a request, a hash of the prompt's system text, the document and the request's cache
salts (a chunk's store key depends on all three: kvblend/kvstore/key.py, the chunk context, the salt), computed by
the ingress (route_ids), which needs no tokenizer. Each engine replica maps the route ids it answered to the
store digests of their chunks and reports, as its routing stats (`record_routing_stats`, polled by Ray Serve every
`request_routing_stats_period_s`), the route ids whose chunks are resident on its GPU or CPU tier now. Between two
polls the router also counts the documents it sent to a replica in the last RECENT_S seconds (that replica is
building or reading them).

Choice: the replicas whose queue is within `imbalanced_threshold` requests of the shortest queue are ranked by
how many of the request's route ids they hold (most first), then by queue length, then round-robin; the others
come after, shortest queue first. Ray Serve takes the first ranked replica with room.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Sequence

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

log = logging.getLogger(__name__)

RECENT_S = 5.0  # documents sent to a replica count as held there for this long (until its stats show them)


def route_ids(request: Any, tenant_salt: str = "") -> tuple[str, ...]:
    """One id per document of a ChatRequest (system text + title + text + salts); () without documents."""
    docs = getattr(request, "documents", None) or ()
    salt = "\x00".join(s for s in (tenant_salt, getattr(request, "cache_salt", "")) if s)
    out = []
    for d in docs:
        h = hashlib.blake2b(digest_size=12)
        for part in (request.system, d.title, d.text, salt):
            h.update(part.encode())
            h.update(b"\0")
        out.append(h.hexdigest())
    return tuple(out)


def _request_ids(pending: PendingRequest | None) -> tuple[str, ...]:
    """The route ids a request was sent with (handle call answer(request, route_ids))."""
    if pending is None:
        return ()
    if len(pending.args) > 1:
        return tuple(pending.args[1] or ())
    return tuple(pending.kwargs.get("route_ids", ()) or ())


class ChunkAwareRouter(RequestRouter):
    """See the module docstring."""

    def initialize_state(self, imbalanced_threshold: int = 4, **kwargs) -> None:
        self._threshold = int(imbalanced_threshold)
        self._recent: dict[ReplicaID, dict[str, float]] = {}
        self._turn = 0

    def _queue_len(self, replica: RunningReplica) -> int:
        q = self._replica_queue_len_cache.get(replica.replica_id)
        return 0 if q is None else int(q)

    def _held(self, replica: RunningReplica, ids: Sequence[str], now: float) -> int:
        held = set((replica.routing_stats or {}).get("held", ()))
        recent = self._recent.get(replica.replica_id, {})
        held.update(i for i, t in recent.items() if now - t < RECENT_S)
        return sum(1 for i in ids if i in held)

    def _rotated(self, replicas: list[RunningReplica], advance: bool) -> list[RunningReplica]:
        """The replicas in round-robin order; advance: this request takes the next turn."""
        k = self._turn % len(replicas)
        self._turn += int(advance)
        return replicas[k:] + replicas[:k]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        replicas = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        ids, now = _request_ids(pending_request), time.time()
        held = {r.replica_id: self._held(r, ids, now) for r in replicas} if ids else {}
        order = self._rotated(replicas, advance=not any(held.values()))  # nobody holds them: next in turn
        if not ids:
            return [[r] for r in order]
        queue = {r.replica_id: self._queue_len(r) for r in order}
        low = min(queue.values())
        near = [r for r in order if queue[r.replica_id] - low <= self._threshold]
        far = sorted((r for r in order if queue[r.replica_id] - low > self._threshold),
                     key=lambda r: queue[r.replica_id])
        ranked = sorted(near, key=lambda r: (-held[r.replica_id], queue[r.replica_id]))  # stable: round-robin
        return [[r] for r in ranked + far]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        ids = _request_ids(pending_request)
        if ids:
            now = time.time()
            recent = self._recent.setdefault(replica_id, {})
            recent.update(dict.fromkeys(ids, now))
            for i in [i for i, t in recent.items() if now - t >= RECENT_S]:
                del recent[i]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self._recent.pop(replica_id, None)
        super().on_replica_actor_died(replica_id)
