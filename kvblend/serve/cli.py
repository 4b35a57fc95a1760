"""`kvblend serve`: flags and start-up. Importing this module does not import torch (run() does)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from kvblend.argtypes import non_negative_int as _non_negative_int
from kvblend.argtypes import duration as _duration
from kvblend.argtypes import port as _port
from kvblend.argtypes import positive_int as _positive_int
from kvblend.argtypes import ratio as _ratio

log = logging.getLogger(__name__)

API_KEY_ENV = "KVBLEND_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kvblend.vocab import MODES

    p.add_argument("--model", default=None, help="named model (default smollm2-135m-instruct) or local HF folder")
    p.add_argument("--served-model-name", dest="served_model_name", default=None,
                   help="the name clients pass as 'model' (default: the model's name)")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--config", default=None, help="TOML config file (flags > KVBLEND_* env > file > defaults)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--corpus", default=None,
                   help="dataset name (its pooled passages) or JSON/JSONL file for server-side retrieval "
                        "(requests with \"retrieval\": {\"top_k\": K})")
    p.add_argument("--mode", choices=list(MODES), default=None, help="default prefill mode (default blend)")
    p.add_argument("--ratio", type=_ratio, default=None, help="default blend recompute ratio (default 0.15)")
    p.add_argument("--gpu-budget", dest="gpu_budget", default=None, help="chunk store GPU tier budget, e.g. 4GiB")
    p.add_argument("--cpu-budget", dest="cpu_budget", default=None, help="chunk store CPU tier budget")
    p.add_argument("--max-batch", dest="max_batch", type=_positive_int, default=None,
                   help="requests decoded together, continuous batching (default 8 on CUDA, 1 on CPU, where the slots' whole-buffer "
                        "attention costs more than it saves; 1: one request "
                        "at a time)")
    p.add_argument("--batch-rows", dest="batch_rows", type=_positive_int, default=None,
                   help="KV rows per batch slot (default: the model's context, at most 8192); longer requests are "
                        "decoded alone")
    p.add_argument("--remote-store", dest="remote_store", default=None,
                   help="redis://HOST:PORT[/DB]: a Redis / Valkey server as the chunk tier shared by processes and "
                        "replicas (behind local disk; unreachable: local tiers only, with a warning)")
    p.add_argument("--remote-budget", dest="remote_budget", default=None, help="remote tier byte budget (64GiB)")
    p.add_argument("--remote-ttl", dest="remote_ttl", type=_non_negative_int, default=None,
                   help="seconds an unused remote chunk lives (default 604800; 0 = no expiry)")
    p.add_argument("--replicas", type=_positive_int, default=None,
                   help="run N engine replicas as a Ray Serve application behind this one endpoint (a local Ray "
                        "cluster, or the one at --ray-address / $RAY_ADDRESS); share chunks with --remote-store")
    p.add_argument("--ray-address", dest="ray_address", default=None,
                   help="with --replicas: the Ray cluster to join (e.g. auto, or ray://HEAD:10001); default: "
                        "$RAY_ADDRESS, else a local cluster started here")
    p.add_argument("--routing", choices=("chunk", "default"), default="chunk",
                   help="with --replicas: chunk (to the replica holding the request's chunks in memory, balanced "
                        "against queue length; round-robin without documents) or default (Ray Serve's "
                        "power of two choices)")
    p.add_argument("--replica-cpus", dest="replica_cpus", type=float, default=1.0,
                   help="with --replicas: CPUs reserved per engine replica (default 1)")
    p.add_argument("--replica-gpus", dest="replica_gpus", type=float, default=None,
                   help="with --replicas: GPUs per engine replica (default 1 when the cluster has GPUs and "
                        "--device is not cpu, else 0)")
    p.add_argument("--max-queue", dest="max_queue", type=_positive_int, default=64,
                   help="requests that may wait for the worker; more get HTTP 429 (default 64)")
    p.add_argument("--max-tokens", dest="default_max_tokens", type=_positive_int, default=256,
                   help="completion tokens when a request gives no max_tokens (default 256, clipped to the context)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no start-up lines")
    _add_guard_arguments(p)
    _add_limit_arguments(p)


def _add_guard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", dest="api_keys", action="append", default=None, metavar="KEY",
                   help=f"clients must send 'Authorization: Bearer KEY' (repeat for several keys; default: "
                        f"${API_KEY_ENV}, comma-separated); required off loopback")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback --host without an API key (anyone who can reach it can use it)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host names answered (default: loopback names when bound to loopback, "
                        "any Host otherwise); others get 403 (DNS-rebinding guard)")
    p.add_argument("--allowed-origins", default="",
                   help="comma-separated browser Origins allowed (default none: cross-site requests get 403)")
    p.add_argument("--salt-per-key", action="store_true",
                   help="each API key gets its own chunk cache namespace (tenants never share chunks)")


def _add_limit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=_positive_int, default=16 * 2**20,
                   help="largest request body, enforced while it is read (default 16 MiB); larger: 413")
    p.add_argument("--max-documents", dest="max_documents", type=_positive_int, default=64,
                   help="documents per request (default 64)")
    p.add_argument("--max-document-tokens", dest="max_document_tokens", type=_positive_int, default=4096,
                   help="tokens per document (default 4096)")
    p.add_argument("--max-build-seconds", dest="max_build_s", type=_duration, default=30.0,
                   help="chunk builds one request may take before it is stopped with 503 (what was built stays "
                        "stored; default 30s)")
    p.add_argument("--trust-message-special-tokens", dest="trust_messages", action="store_true",
                   help="parse special tokens in system / user messages (default: plain text, as documents "
                        "always are)")
    p.add_argument("--store-text", dest="store_text", action="store_true",
                   help="keep each document's text in its chunk sidecar (default: token ids and a hash only)")
    p.add_argument("--store-ttl", dest="store_ttl_s", type=_duration, default=None,
                   help="remove chunks unused for this long, e.g. 7d (default: kept until evicted)")


SERVE_FLAGS = ("model", "dtype", "device", "mode", "ratio", "gpu_budget", "cpu_budget", "remote_store", "remote_budget",
               "remote_ttl")


def _check_listen(host: str, port: int) -> None:
    """Fail with one line before loading the model when the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: cannot be resolved ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None


def _run_cluster(args: argparse.Namespace, config, policy) -> int:
    """`kvblend serve --replicas N`: deploy, print the endpoint, serve until SIGINT / SIGTERM."""
    import signal
    import threading

    import ray

    from kvblend.serve.cluster import build_app, deploy

    if args.replicas > 1 and not config.remote_store:
        _say(args, "no --remote-store: each replica builds and keeps its own chunks")
    _say(args, f"starting Ray ({args.ray_address or 'local or $RAY_ADDRESS'}) ...")
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    gpus = args.replica_gpus
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 and config.device != "cpu" else 0.0
    try:
        app = build_app(config, args.replicas, served_model=args.served_model_name, max_queue=args.max_queue,
                        default_max_tokens=args.default_max_tokens, routing=args.routing,
                        replica_cpus=args.replica_cpus, replica_gpus=gpus, corpus=args.corpus, policy=policy,
                        request_limits={"max_documents": args.max_documents,
                                        "max_document_tokens": args.max_document_tokens},
                        worker_limits={"max_document_tokens": args.max_document_tokens, "max_build_s": args.max_build_s,
                                       "trust_messages": args.trust_messages, "store_ttl_s": args.store_ttl_s})
        _say(args, f"deploying {args.replicas} engine replicas of {config.model} ({args.replica_cpus:g} CPU, "
                   f"{gpus:g} GPU each; routing {args.routing}) ...")
        url = deploy(app, args.host, args.port)
        _say(args, f"{args.replicas} replicas on {url}/v1 (Ray Serve)")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return 0
def guard_policy(args: argparse.Namespace, environ=None):
    """The GuardPolicy of the flags; ValueError (one line) for an unsafe or contradictory set."""
    import os

    from kvblend.serve.guard import LOOPBACK_HOSTS, GuardPolicy, is_loopback

    environ = os.environ if environ is None else environ
    keys = args.api_keys or [k for k in environ.get(API_KEY_ENV, "").split(",")]
    keys = tuple(k.strip() for k in keys if k.strip())
    loopback = is_loopback(args.host)
    if not loopback and not keys and not args.allow_unauthenticated:
        raise ValueError(f"--host {args.host} is reachable from other machines: give --api-key (or "
                         f"${API_KEY_ENV}), or --allow-unauthenticated to serve anyone who can reach it")
    if args.salt_per_key and not keys:
        raise ValueError("--salt-per-key needs API keys (--api-key or $" + API_KEY_ENV + ")")
    if args.allowed_hosts:
        hosts = frozenset(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
    else:
        hosts = LOOPBACK_HOSTS | {args.host.lower()} if loopback else None
    origins = frozenset(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    return GuardPolicy(api_keys=keys, allowed_hosts=hosts, allowed_origins=origins,
                       max_body_bytes=args.max_body_bytes, salt_per_key=args.salt_per_key)


def _say(args: argparse.Namespace, line: str) -> None:
    if not args.quiet:
        print(f"kvblend serve: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from kvblend.config import load_config

    flags = {k: getattr(args, k) for k in SERVE_FLAGS}
    flags["store_text"] = True if args.store_text else None
    config = load_config(args.config, flags)
    policy = guard_policy(args)
    _check_listen(args.host, args.port)
    from kvblend.serve.guard import is_loopback

    if not is_loopback(args.host) and not policy.api_keys:
        log.warning("--host %s with --allow-unauthenticated: anyone who can reach this address can use the server",
                    args.host)
    if args.replicas:
        return _run_cluster(args, config, policy)
    corpus = None
    if args.corpus:
        from kvblend.serve.corpus import load_corpus

        corpus = load_corpus(args.corpus)
        _say(args, f"corpus {corpus.name}: {len(corpus.documents)} passages (bm25)")
    return _serve(args, config, policy, corpus)


def _serve(args: argparse.Namespace, config, policy, corpus) -> int:
    import uvicorn

    from kvblend.engine import Engine
    from kvblend.serve.app import create_app
    from kvblend.serve.metrics import ServerMetrics
    from kvblend.serve.protocol import RequestLimits
    from kvblend.serve.worker import Worker, WorkerLimits

    _say(args, f"loading {config.model} ...")
    engine = Engine(config)
    served = args.served_model_name or engine.model.name
    max_batch = args.max_batch or (8 if engine.model.device.type == "cuda" else 1)
    limits = WorkerLimits(max_document_tokens=args.max_document_tokens, max_build_s=args.max_build_s,
                          max_batch=max_batch, batch_rows=args.batch_rows,
                          trust_messages=args.trust_messages, store_ttl_s=args.store_ttl_s)
    worker = Worker(engine, ServerMetrics(), max_queue=args.max_queue, default_max_tokens=args.default_max_tokens,
                    corpus=corpus, limits=limits)
    worker.start()
    remote = engine.store.remote
    if remote is not None:
        state = "reachable" if remote.reachable else "NOT reachable: local tiers only until it answers"
        _say(args, f"remote chunk store {remote.url} ({state})")
    request_limits = RequestLimits(max_documents=args.max_documents, max_document_tokens=args.max_document_tokens,
                                   context_tokens=worker.context)
    app = create_app(worker, served, policy, request_limits)
    auth = f"{len(policy.api_keys)} API key(s)" if policy.api_keys else "no API key"
    _say(args, f"{served} ({engine.model.dtype}, {engine.model.device}) on http://{args.host}:{args.port}/v1 - "
               f"mode {config.mode}, ratio {config.ratio}, max queue {args.max_queue}, {auth}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=2)
    worker.stop()
    return 0
