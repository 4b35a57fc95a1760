"""`kvblend serve --replicas N`: N engine replicas as one Ray Serve application behind one OpenAI-compatible endpoint.

Two deployments:
  kvblend-ingress (one replica, no model): the very FastAPI app of the single-process server (kvblend/serve/app.py:
      routes, validation, streaming, error bodies) driven by a RemoteWorker instead of a Worker: each job is relayed
      to the engine deployment through a streaming Ray Serve handle, with the request's route ids.
  kvblend-engine (N replicas): each an Engine and its Worker thread (kvblend/serve/worker.py), its own local chunk
      store (KVBLEND home/replicas/<rank>) over the shared remote tier (--remote-store), answering jobs as a stream
      of the worker's events; it reports which documents' chunks it holds in memory (record_routing_stats).
Requests reach an engine replica through the chunk-aware router (kvblend/serve/router.py), or Ray Serve's default
power-of-two-choices router with --routing default.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from pathlib import Path

from kvblend.serve.metrics import ServerMetrics
from kvblend.serve.protocol import ApiError
from kvblend.serve.worker import Job, QueueFull

log = logging.getLogger(__name__)

APP_NAME = "kvblend"
MAX_ROUTES = 65536  # route ids a replica remembers (least recently answered dropped)


class EngineReplica:
    """One engine replica (see the module docstring)."""

    def __init__(self, config: dict, options: dict):
        import torch
        from ray import serve

        from kvblend.config import EngineConfig
        from kvblend.engine import Engine
        from kvblend.serve.worker import Worker, WorkerLimits

        if options.get("threads"):
            torch.set_num_threads(int(options["threads"]))
        ctx = serve.get_replica_context()
        rank = getattr(getattr(ctx, "rank", None), "rank", None)
        self.name = f"replica-{rank}" if rank is not None else ctx.replica_id.unique_id
        config = dict(config)
        if options.get("home"):
            config["home"] = str(Path(options["home"]) / "replicas" / self.name)
        self.engine = Engine(EngineConfig(**config))
        corpus = None
        if options.get("corpus"):
            from kvblend.serve.corpus import load_corpus

            corpus = load_corpus(options["corpus"])
        self.worker = Worker(self.engine, ServerMetrics(), max_queue=options["max_queue"],
                             default_max_tokens=options["default_max_tokens"], corpus=corpus,
                             limits=WorkerLimits(**options.get("limits", {})))
        self.worker.start()
        self._routes: OrderedDict[str, str] = OrderedDict()  # route id -> digest of its chunk

    def info(self) -> dict:
        return {"settings": self.worker.settings, "context": self.worker.context, "model": self.engine.model.name,
                "replica": self.name}

    def _remember(self, ids, digests) -> None:
        if len(ids) != len(digests):  # retrieval requests carry no route ids
            return
        for rid, digest in zip(ids, digests):
            self._routes[rid] = digest
            self._routes.move_to_end(rid)
        while len(self._routes) > MAX_ROUTES:
            self._routes.popitem(last=False)

    def record_routing_stats(self) -> dict:
        """Ray Serve polls this: the route ids whose chunks are on this replica's GPU or CPU tier now."""
        tiers = self.engine.store.tiers
        held = [rid for rid, d in list(self._routes.items()) if d in tiers["gpu"] or d in tiers["cpu"]]
        return {"held": held, "queue": self.worker.depth()}

    async def answer(self, request, route_ids=(), tenant_salt: str = ""):
        """The worker's events for one request: ("accepted" | "delta" | "done" | "error", payload)."""
        job = Job(request, asyncio.get_running_loop(), tenant_salt=tenant_salt)
        try:
            self.worker.submit(job)
        except QueueFull as exc:
            yield "error", ApiError(429, f"replica {self.name}: queue full ({self.worker.max_queue} waiting); retry "
                                         f"after {exc.retry_after_s} s", code="queue_full",
                                    headers={"Retry-After": str(exc.retry_after_s)})
            return
        try:
            while True:
                kind, payload = await job.events.get()
                if kind == "done":
                    self._remember(tuple(route_ids), payload.pop("chunk_digests", ()))
                    payload["usage"]["kvblend"]["replica"] = self.name
                    payload["store"] = self.engine.store.summary()
                yield kind, payload
                if kind in ("done", "error"):
                    job.finished = True
                    return
        finally:
            if not job.finished:  # the ingress went away (client disconnected): stop decoding
                job.cancel()


def merge_summaries(summaries) -> dict:
    """The replicas' store summaries as one: numbers summed, flags and-ed, the first string kept."""
    out: dict = {}
    for s in summaries:
        for k, v in s.items():
            if isinstance(v, dict):
                out[k] = merge_summaries([out.get(k, {}), v])
            elif isinstance(v, bool) or v is None:
                out[k] = bool(v) and out.get(k, True)
            elif isinstance(v, (int, float)) and k != "hit_rate":
                out[k] = out.get(k, 0) + v
            elif isinstance(v, str):
                out.setdefault(k, v)
    return out


class RemoteWorker:
    """What app.py drives (submit, depth, max_queue, metrics, settings, context), relaying each job to the engine
    deployment through a streaming Ray Serve handle."""

    def __init__(self, handle, info: dict, max_queue: int, replicas: int):
        self.handle = handle.options(stream=True)
        self.metrics = ServerMetrics()
        self.max_queue = max_queue
        self.settings = {**info["settings"], "replicas": replicas}
        self.context = info["context"]
        self._inflight: set = set()
        self._stores: dict[str, dict] = {}

    def depth(self) -> int:
        return len(self._inflight)

    def submit(self, job: Job) -> None:
        if len(self._inflight) >= self.max_queue:
            raise QueueFull(1)
        task = job.loop.create_task(self._relay(job))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _relay(self, job: Job) -> None:
        from kvblend.serve.router import route_ids

        try:
            ids = route_ids(job.request, job.tenant_salt)
            async for kind, payload in self.handle.answer.remote(job.request, ids, job.tenant_salt):
                if kind == "done":
                    self._observe(payload)
                elif kind == "error":
                    self.metrics.count_request("bad_request" if payload.status < 500 else "error")
                job.events.put_nowait((kind, payload))
                if job.cancelled.is_set():
                    self.metrics.count_request("cancelled")
                    return
        except Exception as exc:  # noqa: BLE001 (a replica died or Serve is shutting down: the client gets a 503)
            log.warning("request %s: no engine replica answered (%s: %s)", job.request.request_id,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.metrics.count_request("error")
            job.events.put_nowait(("error", ApiError(503, f"no engine replica answered ({type(exc).__name__}); "
                                                          f"retry", code="replica_unavailable")))

    def _observe(self, payload: dict) -> None:
        usage = payload["usage"]
        kv = usage["kvblend"]
        tpot = kv["tpot_ms"] / 1e3 if usage["completion_tokens"] > 1 else None
        self.metrics.observe_request(kv["ttft_ms"] / 1e3, tpot, kv["queue_ms"] / 1e3,
                                     {"prompt": usage["prompt_tokens"], "completion": usage["completion_tokens"],
                                      "chunk": kv["chunk_tokens"], "recomputed": kv["recomputed_tokens"]})
        self.metrics.count_request("ok")
        store = payload.pop("store", None)
        if store is not None:
            self._stores[kv["replica"]] = store
            self.metrics.publish_store(merge_summaries(self._stores.values()))


class Ingress:
    """The HTTP entry point (see the module docstring); its ASGI app is built once the constructor ran."""

    async def __init__(self, engine, served_model: str | None, max_queue: int, replicas: int, policy=None,
                       request_limits: dict | None = None):
        info = await engine.info.remote()
        self.served = served_model or info["model"]
        self.worker = RemoteWorker(engine, info, max_queue, replicas)
        self.policy = policy
        self.request_limits = request_limits or {}

    def __serve_build_asgi_app__(self):
        from kvblend.serve.app import create_app
        from kvblend.serve.protocol import RequestLimits

        limits = RequestLimits(**{**self.request_limits, "context_tokens": self.worker.context})
        return create_app(self.worker, self.served, self.policy, limits)


def build_app(config, replicas: int, *, served_model: str | None = None, max_queue: int = 64,
              default_max_tokens: int = 256, routing: str = "chunk", replica_cpus: float = 1.0,
              replica_gpus: float = 0.0, corpus: str | None = None, policy=None, request_limits: dict | None = None,
              worker_limits: dict | None = None):
    """The Ray Serve application: the ingress bound to `replicas` engine replicas of EngineConfig `config`.
    routing: "chunk" (ChunkAwareRouter) or "default" (Ray Serve's power of two choices). policy: the ingress's
    GuardPolicy (default: loopback Hosts, no keys); request_limits / worker_limits: RequestLimits / WorkerLimits
    fields (kvblend/serve/protocol.py, worker.py), as the single-process server takes them."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from kvblend.home import kvblend_home
    from kvblend.serve.router import ChunkAwareRouter

    if routing not in ("chunk", "default"):
        raise ValueError(f"--routing: expected chunk or default, got {routing!r}")
    stats = {"request_routing_stats_period_s": 1.0, "request_routing_stats_timeout_s": 5.0}
    router = (RequestRouterConfig(request_router_class=ChunkAwareRouter, **stats) if routing == "chunk"
              else RequestRouterConfig(**stats))
    options = {"max_queue": max_queue, "default_max_tokens": default_max_tokens, "corpus": corpus,
               "home": config.home or str(kvblend_home()),
               "threads": None if replica_gpus else max(1, int(replica_cpus)), "limits": worker_limits or {}}
    engine = serve.deployment(name="kvblend-engine", num_replicas=replicas, max_ongoing_requests=max_queue,
                              ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
                              request_router_config=router)(EngineReplica)
    ingress = serve.deployment(name="kvblend-ingress", num_replicas=1,
                               max_ongoing_requests=max_queue * replicas + 16,
                               ray_actor_options={"num_cpus": 0})(serve.ingress()(Ingress))
    return ingress.bind(engine.bind(config.as_dict(), options), served_model, max_queue * replicas, replicas,
                        policy, request_limits)


def deploy(app, host: str, port: int) -> str:
    """Run the application on the connected Ray cluster, HTTP on host:port (replacing an earlier kvblend app);
    returns its base URL once every replica is up."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"
