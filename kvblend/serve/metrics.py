"""Server metrics in the Prometheus text exposition format (version 0.0.4), thread-safe. No torch."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter

from kvblend.vocab import HIT_TIERS

# seconds; CPU TTFTs of a 135M model over thousands of tokens reach tens of seconds
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for le, c in zip(self.buckets, self.counts):
            running += c
            out.append(f'{name}_bucket{{le="{le:g}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


def _labels(key: tuple[tuple[str, str], ...]) -> str:
    if not key:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in key) + "}"


class ServerMetrics:
    """Request counters and latency histograms (updated by the HTTP side and the worker), plus the chunk
    store's statistics as last published by the worker (the only thread that touches the store)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (("outcome", ...),) -> count
        self.tokens: Counter = Counter()  # prompt / completion / recomputed / chunk
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.queue_wait = Histogram(QUEUE_BUCKETS)
        self.store: dict = {}  # ChunkKVStore.summary() snapshot
        self.running = 0

    def count_request(self, outcome: str) -> None:
        with self._lock:
            self.requests[(("outcome", outcome),)] += 1

    def observe_request(self, ttft_s: float, tpot_s: float | None, queue_s: float, tokens: dict[str, int]) -> None:
        with self._lock:
            self.ttft.observe(ttft_s)
            if tpot_s is not None:
                self.tpot.observe(tpot_s)
            self.queue_wait.observe(queue_s)
            self.tokens.update(tokens)

    def set_running(self, n: int) -> None:
        with self._lock:
            self.running = n

    def publish_store(self, summary: dict) -> None:
        with self._lock:
            self.store = summary

    def render(self, queue_depth: int, queue_capacity: int) -> str:
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP {name} {help_}")
                lines.append(f"# TYPE {name} {kind}")
                for labels, value in samples:
                    lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

            outcomes = ("ok", "cancelled", "bad_request", "unauthorized", "forbidden", "rejected_queue_full", "error")
            metric("kvblend_requests_total", "counter",
                   "requests by outcome (ok, cancelled: client left, bad_request: 4xx, unauthorized: 401, "
                   "forbidden: 403 Host / Origin, rejected_queue_full: 429, error: 5xx)",
                   [(_labels((("outcome", o),)), self.requests[(("outcome", o),)]) for o in outcomes])
            metric("kvblend_tokens_total", "counter",
                   "tokens served: prompt, completion, chunk (prompt tokens in chunks), recomputed (prefilled "
                   "this request: prefix + query + selected chunk tokens, or every token in full mode)",
                   [(_labels((("kind", k),)), self.tokens[k]) for k in ("prompt", "completion", "chunk", "recomputed")])
            for name, hist, help_ in (
                ("kvblend_ttft_seconds", self.ttft, "time to first token, from the start of the request's "
                                                   "prefill (chunk fetches included, queue wait excluded)"),
                ("kvblend_tpot_seconds", self.tpot, "mean time per output token after the first, per request"),
                ("kvblend_queue_wait_seconds", self.queue_wait, "time a request waited in the queue"),
            ):
                lines.append(f"# HELP {name} {help_}")
                lines.append(f"# TYPE {name} histogram")
                lines.extend(hist.lines(name))
            metric("kvblend_queue_depth", "gauge", "requests waiting for the worker", [("", queue_depth)])
            metric("kvblend_queue_capacity", "gauge", "--max-queue", [("", queue_capacity)])
            metric("kvblend_requests_running", "gauge", "requests decoding (continuous batching: up to --max-batch)",
                   [("", self.running)])
            self._store_metrics(metric)
            return "\n".join(lines) + "\n"

    def _store_metrics(self, metric) -> None:
        """The chunk store's figures, as last published by the worker (caller holds the lock)."""
        stats = self.store.get("stats", {})
        hits = stats.get("hits", {})
        metric("kvblend_store_hits_total", "counter", "chunk store lookups answered from a tier",
               [(_labels((("tier", t),)), int(hits.get(t, 0))) for t in HIT_TIERS])
        metric("kvblend_store_misses_total", "counter", "chunks not in the store (prefilled and stored)",
               [("", int(stats.get("misses", 0)))])
        metric("kvblend_store_corrupt_total", "counter", "stored chunks that failed verification (rebuilt)",
               [("", int(stats.get("corrupt", 0)))])
        metric("kvblend_store_disk_write_errors_total", "counter",
               "chunks the disk could not take (full, quota, read-only): kept on the memory tiers only",
               [("", int(stats.get("disk_write_errors", 0)))])
        metric("kvblend_store_disk_ok", "gauge", "1 while the disk takes chunk writes, 0 while it does not",
               [("", 0 if self.store.get("disk_problem") else 1)])
        metric("kvblend_store_leftovers_removed_total", "counter",
               "files of dead writers (temp files, tensors without a sidecar) removed at start-up",
               [("", int(stats.get("leftovers_removed", 0)))])
        metric("kvblend_store_expired_total", "counter", "chunks removed for being unused longer than --store-ttl",
               [("", int(stats.get("expired", 0)))])
        ev = stats.get("evictions", {})
        metric("kvblend_store_evictions_total", "counter", "chunks evicted from a tier",
               [(_labels((("tier", t),)), int(ev.get(t, 0))) for t in ("gpu", "cpu", "disk")])
        used = self.store.get("used_bytes", {})
        metric("kvblend_store_bytes", "gauge", "bytes of chunk KV held per tier",
               [(_labels((("tier", t),)), int(used.get(t, 0))) for t in ("gpu", "cpu", "disk")])
        budget = self.store.get("budget_bytes", {})
        metric("kvblend_store_budget_bytes", "gauge", "byte budget per tier",
               [(_labels((("tier", t),)), int(budget.get(t, 0))) for t in ("gpu", "cpu", "disk")])
        chunks = self.store.get("num_chunks", {})
        metric("kvblend_store_chunks", "gauge", "chunks held per tier",
               [(_labels((("tier", t),)), int(chunks.get(t, 0))) for t in ("gpu", "cpu", "disk")])
        remote_lines(metric, self.store.get("remote"))


def remote_lines(metric, remote: dict | None) -> None:
    """The remote chunk tier's metrics (only with --remote-store)."""
    if remote is None:
        return
    metric("kvblend_remote_reachable", "gauge", "1 when the last call to the remote store succeeded, else 0",
           [("", int(bool(remote.get("reachable"))))])
    metric("kvblend_remote_unavailable_total", "counter",
           "remote store calls that failed (server unreachable or timed out; the request was served from the "
           "local tiers)", [("", int(remote.get("unavailable", 0)))])
    metric("kvblend_remote_skipped_total", "counter", "remote store calls skipped while the server was down",
           [("", int(remote.get("skipped", 0)))])
    metric("kvblend_remote_writes_total", "counter", "chunks this process wrote to the remote store",
           [("", int(remote.get("writes", 0)))])
    metric("kvblend_remote_corrupt_total", "counter", "remote entries that failed verification (deleted, rebuilt)",
           [("", int(remote.get("corrupt", 0)))])
    metric("kvblend_remote_evictions_total", "counter", "remote entries this process evicted for the byte budget",
           [("", int(remote.get("evictions", 0)))])


def parse_prometheus(text: str) -> dict[str, float]:
    """'name{labels}' -> value, for the tests and the load generator (no comments)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
