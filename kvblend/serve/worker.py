"""The worker: one thread owns the engine (model + chunk store) and answers queued requests.

The HTTP side (asyncio) validates a request, wraps it in a Job and puts it in a bounded FIFO queue (full:
429). The worker tokenizes the prompt (the tokenizer is only ever used from this thread), checks it fits the
context and prefills it (Engine.start_answer); with continuous batching (WorkerLimits.max_batch > 1) the
request then joins the running batch (generation/batch.py: one decode step for every running request, new
requests prefilled one at a time between steps), else it is decoded alone. Events go back to the job's
asyncio queue: ("accepted",
info) once the prompt is valid, ("delta", text) while streaming, then ("done", result) or ("error",
ApiError). A job whose client left is skipped if still queued, or stops decoding at its next token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kvblend.serve.metrics import ServerMetrics
from kvblend.serve.protocol import ApiError, ChatRequest, Document, StopText
from kvblend.vocab import HIT_TIERS

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    finished: bool = False
    tenant_salt: str = ""  # the caller's API-key salt (--salt-per-key), joined with the request's cache_salt

    def emit(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class _Cancelled(Exception):
    """The client left while its request was being prepared (raised before a chunk build)."""


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    max_document_tokens: int = 4096  # --max-document-tokens
    max_build_s: float = 30.0  # --max-build-seconds: chunk builds one request may take
    trust_messages: bool = False  # --trust-message-special-tokens: parse special tokens in messages
    store_ttl_s: float | None = None  # --store-ttl: chunks unused this long are removed
    ttl_check_every_s: float = 10.0
    max_batch: int = 1  # --max-batch: requests decoded together (continuous batching); 1 = one at a time
    batch_rows: int | None = None  # --batch-rows: KV rows per batch slot (None: the model's context, <= 8192)


_STOP = object()  # the queue's stop sentinel, as _next_job returns it


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Worker:
    def __init__(self, engine, metrics: ServerMetrics, max_queue: int, default_max_tokens: int = 256,
                 corpus=None, limits: WorkerLimits | None = None):
        self.engine = engine
        self.limits = limits or WorkerLimits()
        self._ttl_checked = 0.0
        self.metrics = metrics
        self.max_queue = max_queue
        self.default_max_tokens = default_max_tokens
        self.corpus = corpus
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._service_s: list[float] = []  # recent service times, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="kvblend-serve-worker", daemon=True)
        self._batch = None  # the continuous batch (generation/batch.py), made on the first batched request
        self.model_name = engine.model.name
        self.context = engine.model.shape.max_position_embeddings
        c = engine.config  # the engine settings every answer uses (shown by /health, recorded by the benchmark)
        self.settings = {k: getattr(c, k) for k in ("mode", "ratio", "chunk_sink", "check_layer", "score_on",
                                                    "select_first_tokens", "select_layers", "chat_template",
                                                    "gpu_budget", "cpu_budget", "disk_budget") if hasattr(c, k)}
        self.settings.update(dtype=str(engine.model.dtype).removeprefix("torch."), device=str(engine.model.device))
        self._expire()
        metrics.publish_store(engine.store.summary())

    # HTTP side ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass

    def depth(self) -> int:
        return self.queue.qsize()

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            recent = self._service_s[-16:]
            mean = sum(recent) / len(recent) if recent else 1.0
            raise QueueFull(max(1, round(mean * (self.queue.qsize() + 1)))) from None

    # worker thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                job = self._next_job()
                if job is _STOP:
                    if self._batch is not None:
                        self._fail_running(ApiError(503, "the server is shutting down", code="shutting_down"))
                    return
                if job is not None:
                    self._serve(job)
                if self._batch is not None and self._batch.running:
                    self._step()

    def _next_job(self):
        """The next queued job: wait for one when nothing is decoding; between batch steps take one only if
        a slot is free (None: go on decoding)."""
        batch = self._batch
        decoding = batch is not None and batch.running
        if decoding and not batch.has_room:
            return None
        try:
            job = self.queue.get(block=not decoding)
        except queue.Empty:
            return None
        return _STOP if job is None else job

    def _serve(self, job: Job) -> None:
        """Prefill one job and start its decoding (in the batch or alone); errors answer the job only."""
        if job.cancelled.is_set():
            self.metrics.count_request("cancelled")
            return
        t0 = time.perf_counter()
        try:
            self._answer(job)
        except Exception as exc:  # noqa: BLE001 (one job's failure; the worker keeps serving)
            self._fail(job, exc)
        finally:
            self._after(t0)

    def _fail(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, _Cancelled):
            self.metrics.count_request("cancelled")
        elif isinstance(exc, ApiError):
            self.metrics.count_request("bad_request" if exc.status < 500 else "error")
            job.emit("error", exc)
        else:  # keep serving; the client gets a 500 error object
            log.error("request %s failed", job.request.request_id, exc_info=exc)
            self.metrics.count_request("error")
            job.emit("error", ApiError(500, f"internal error: {type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0] if str(exc) else ''}", code="internal_error"))

    def _after(self, t0: float) -> None:
        self.metrics.set_running(len(self._batch.running) if self._batch is not None else 0)
        self._service_s = (self._service_s + [time.perf_counter() - t0])[-64:]
        self._expire()
        self.metrics.publish_store(self.engine.store.summary())

    def _step(self) -> None:
        """One decode step of the running batch; a failure fails every request in it."""
        try:
            self._batch.step()
        except Exception as exc:  # noqa: BLE001
            log.error("decode step failed", exc_info=exc)
            self._fail_running(exc)
        self.metrics.set_running(len(self._batch.running))

    def _fail_running(self, exc: Exception) -> None:
        for job in self._batch.drop_all():
            self._fail(job, exc)

    def _expire(self) -> None:
        """--store-ttl: remove the chunks unused for longer (at most every ttl_check_every_s)."""
        ttl = self.limits.store_ttl_s
        if ttl is None or time.monotonic() - self._ttl_checked < self.limits.ttl_check_every_s:
            return
        self._ttl_checked = time.monotonic()
        removed = self.engine.store.expire(ttl)
        if removed:
            log.info("store TTL %g s: %d unused chunks removed", ttl, removed)

    def _documents(self, req: ChatRequest) -> tuple[Document, ...]:
        if req.documents is not None:
            return req.documents
        if req.retrieval_top_k is None:
            return ()
        if self.corpus is None:
            raise ApiError(400, "'retrieval' needs a server started with --corpus; send 'documents' instead",
                           param="retrieval", code="no_corpus")
        return tuple(self.corpus.search(req.query, req.retrieval_top_k))

    def _prepare(self, job: Job):
        """(documents, chunk texts, prompt, max_tokens) of a job; ApiError(400) for what does not fit."""
        req = job.request
        docs = self._documents(req)
        # a string document is one chunk followed by a blank line, as the pipeline's passage template does
        texts = [d.text if d.doc_id else (f"{d.title}\n\n{d.text}\n\n" if d.title else f"{d.text}\n\n")
                 for d in docs]
        prompt = self.engine.prompt(req.system, texts, req.query, trust_messages=self.limits.trust_messages)
        for i, ids in enumerate(prompt.chunk_ids):
            if len(ids) > self.limits.max_document_tokens:
                raise ApiError(400, f"'documents[{i}]' has {len(ids)} tokens; this server takes documents of at "
                                    f"most {self.limits.max_document_tokens} tokens (--max-document-tokens); split "
                                    f"it", param=f"documents[{i}]", code="document_too_long")
        room = self.context - prompt.num_tokens
        if req.max_tokens is not None and req.max_tokens > room or room < 1:
            asked = req.max_tokens or 1
            raise ApiError(400, f"this model's maximum context length is {self.context} tokens; the prompt has "
                                f"{prompt.num_tokens} tokens and {asked} completion tokens were asked for; "
                                f"send fewer or shorter documents or lower max_tokens",
                           param="messages", code="context_length_exceeded")
        return docs, texts, prompt, req.max_tokens or min(self.default_max_tokens, room)

    def _build_guard(self, job: Job):
        """Called before each chunk build: stops the request once its builds passed the budget of build time
        (the chunks built so far stay stored, so a resend goes on from there), or when its client left."""
        started, built = time.perf_counter(), [0]
        budget = self.limits.max_build_s

        def check() -> None:
            if job.cancelled.is_set():
                raise _Cancelled()
            spent = time.perf_counter() - started
            if built[0] and spent > budget:  # one build per request always runs: a resend makes progress
                raise ApiError(503, f"building this request's new documents took over the budget of {budget:g} s "
                                    f"(--max-build-seconds); the {built[0]} built so far are stored: resend the "
                                    f"request to go on, or send fewer new documents",
                               code="build_budget_exceeded", headers={"Retry-After": "1"})
            built[0] += 1

        return check

    def _on_token(self, job: Job, stop_text: StopText, stopped_by: list[str]):
        req, tokenizer, tokens = job.request, self.engine.model.tokenizer, []

        def on_token(token: int) -> bool:
            if job.cancelled.is_set():
                stopped_by.append("cancelled")
                return True
            if not (req.stream or req.stop):
                return False
            tokens.append(token)
            delta, hit = stop_text.update(tokenizer.decode(tokens, skip_special_tokens=True))
            if delta and req.stream:
                job.emit("delta", delta)
            if hit:
                stopped_by.append("stop")
            return hit

        return on_token

    def _answer(self, job: Job) -> None:
        from kvblend.generation.generate import generate
        from kvblend.generation.sampling import SamplingParams

        req, engine = job.request, self.engine
        queue_s = time.perf_counter() - job.enqueued_at
        docs, texts, prompt, max_tokens = self._prepare(job)
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        sampling = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  stop_on_newline=False, seed=seed)
        mode = req.mode or engine.config.mode
        ratio = engine.config.ratio if req.ratio is None else req.ratio
        salt = "\x00".join(s for s in (job.tenant_salt, req.cache_salt) if s)
        job.emit("accepted", {"prompt_tokens": prompt.num_tokens})
        before = engine.store.summary()["stats"]
        stop_text, stopped_by = StopText(req.stop), []
        started = engine.start_answer(prompt, texts, mode=mode, ratio=ratio, sampling=sampling, salt=salt,
                                      on_build=self._build_guard(job))
        store_delta = self._store_delta(before)  # this request's hits and misses, before others' builds
        on_token = self._on_token(job, stop_text, stopped_by)

        def done(out) -> None:  # called from a batch step too: a failure here fails this job only
            try:
                self._done(job, engine.finish_answer(started, out), docs, prompt, (mode, ratio, started.keys),
                           store_delta, queue_s, stop_text, stopped_by)
            except Exception as exc:  # noqa: BLE001
                self._fail(job, exc)

        batch = self._batcher()
        if batch is not None and batch.has_room and batch.fits(started.result):
            batch.add(started.result, sampling, started.clock.ttft_start(), done, on_token, owner=job)
        else:
            done(generate(engine.model, started.result, sampling, started.clock.ttft_start(), engine.newline,
                          on_token=on_token))

    def _batcher(self):
        """The continuous batch (made on first use), or None without batching."""
        if self._batch is None and self.limits.max_batch > 1:
            from kvblend.generation.batch import ContinuousBatch
            from kvblend.model.slots import DecodeSlots

            rows = self.limits.batch_rows or min(self.context, 8192)
            slots = DecodeSlots(self.engine.runner, self.limits.max_batch, rows)
            self._batch = ContinuousBatch(self.engine.model, slots, self.engine.newline)
            log.info("continuous batching: %d slots of %d KV rows", self.limits.max_batch, rows)
        return self._batch

    def _done(self, job: Job, out, docs, prompt, how: tuple, store_delta: dict, queue_s: float, stop_text: StopText,
              stopped_by: list[str]) -> None:
        """A job's decoding ended: its last text delta, usage and the done event (or the cancellation).
        how: (mode, ratio, the request's chunk keys)."""
        req, (mode, ratio, keys) = job.request, how
        if stopped_by and stopped_by[0] == "cancelled":
            self.metrics.count_request("cancelled")
            return
        delta, text = stop_text.finish(out.text)
        if delta and req.stream:
            job.emit("delta", delta)
        usage = self._usage(prompt, out, mode, ratio, store_delta, queue_s)
        finish = "length" if out.stop_reason == "length" and not stop_text.stopped else "stop"
        retrieved = [{"id": d.doc_id, "title": d.title, "score": d.score} for d in docs if d.doc_id]
        self.metrics.count_request("ok")
        self.metrics.publish_store(self.engine.store.summary())  # before the client can see the answer
        job.emit("done", {"text": text, "finish_reason": finish, "usage": usage,
                          "retrieved": retrieved, "token_ids": list(out.token_ids),
                          "chunk_digests": [k.digest for k in keys]})  # for the cluster's router

    def _store_delta(self, before: dict) -> dict:
        after = self.engine.store.summary()["stats"]
        return {"hits": {t: after["hits"].get(t, 0) - before["hits"].get(t, 0) for t in HIT_TIERS},
                "misses": after["misses"] - before["misses"],
                "corrupt": after.get("corrupt", 0) - before.get("corrupt", 0)}

    def _usage(self, prompt, out, mode: str, ratio: float, delta: dict, queue_s: float) -> dict:
        """The OpenAI usage object with kvblend's figures; the request's latencies and tokens go to the metrics."""
        hits = delta["hits"]
        stats = out.blend
        chunk_tokens = sum(len(c) for c in prompt.chunk_ids)
        recomputed = stats.num_recomputed if stats is not None else prompt.num_tokens
        self.metrics.observe_request(out.ttft_ms / 1e3, out.tpot_ms / 1e3 if out.token_ms else None, queue_s,
                                     {"prompt": prompt.num_tokens, "completion": len(out.token_ids),
                                      "chunk": chunk_tokens, "recomputed": recomputed})
        return {
            "prompt_tokens": prompt.num_tokens, "completion_tokens": len(out.token_ids),
            "total_tokens": prompt.num_tokens + len(out.token_ids),
            "kvblend": {
                "mode": mode, "ratio": ratio if mode == "blend" else None, "chunks": len(prompt.chunk_ids),
                "chunk_tokens": chunk_tokens, "recomputed_tokens": recomputed,
                "chunk_hits": hits, "chunk_misses": delta["misses"], "chunk_corrupt": delta["corrupt"],
                "ttft_ms": round(out.ttft_ms, 3), "tpot_ms": round(out.tpot_ms, 3),
                "prefill_ms": round(stats.prefill_ms, 3) if stats is not None else None,
                "fetch_ms": round(out.fetch_ms, 3),  # reading cached chunks from their tiers (inside TTFT)
                "build_ms": round(out.build_ms, 3),  # prefilling missing chunks alone (outside ttft_ms)
                "chunk_tiers": list(out.chunk_tiers),  # where each chunk came from ("built ...": a miss)
                "queue_ms": round(queue_s * 1e3, 3),
            },
        }
