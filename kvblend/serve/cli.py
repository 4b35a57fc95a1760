"""`kvblend serve`: flags and start-up. Importing this module does not import torch (run() does)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys

from kvblend.argtypes import non_negative_int as _non_negative_int
from kvblend.argtypes import port as _port
from kvblend.argtypes import positive_int as _positive_int
from kvblend.argtypes import ratio as _ratio

log = logging.getLogger(__name__)


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


def _run_cluster(args: argparse.Namespace, config) -> int:
    """`kvblend serve --replicas N`: deploy, print the endpoint, serve until SIGINT / SIGTERM."""
    import signal
    import threading

    import ray

    from kvblend.serve.cluster import build_app, deploy

    if args.replicas > 1 and not config.remote_store:
        print("kvblend serve: no --remote-store: each replica builds and keeps its own chunks", file=sys.stderr)
    print(f"kvblend serve: starting Ray ({args.ray_address or 'local or $RAY_ADDRESS'}) ...", file=sys.stderr)
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    gpus = args.replica_gpus
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 and config.device != "cpu" else 0.0
    try:
        app = build_app(config, args.replicas, served_model=args.served_model_name, max_queue=args.max_queue,
                        default_max_tokens=args.default_max_tokens, routing=args.routing,
                        replica_cpus=args.replica_cpus, replica_gpus=gpus, corpus=args.corpus)
        print(f"kvblend serve: deploying {args.replicas} engine replicas of {config.model} "
              f"({args.replica_cpus:g} CPU, {gpus:g} GPU each; routing {args.routing}) ...", file=sys.stderr)
        url = deploy(app, args.host, args.port)
        print(f"kvblend serve: {args.replicas} replicas on {url}/v1 (Ray Serve)", file=sys.stderr, flush=True)
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


def run(args: argparse.Namespace) -> int:
    from kvblend.config import load_config

    flags = {k: getattr(args, k) for k in SERVE_FLAGS}
    config = load_config(args.config, flags)
    _check_listen(args.host, args.port)
    if args.replicas:
        return _run_cluster(args, config)
    corpus = None
    if args.corpus:
        from kvblend.serve.corpus import load_corpus

        corpus = load_corpus(args.corpus)
        print(f"kvblend serve: corpus {corpus.name}: {len(corpus.documents)} passages (bm25)", file=sys.stderr)

    import uvicorn

    from kvblend.engine import Engine
    from kvblend.serve.app import create_app
    from kvblend.serve.metrics import ServerMetrics
    from kvblend.serve.worker import Worker

    print(f"kvblend serve: loading {config.model} ...", file=sys.stderr)
    engine = Engine(config)
    served = args.served_model_name or engine.model.name
    worker = Worker(engine, ServerMetrics(), max_queue=args.max_queue, default_max_tokens=args.default_max_tokens,
                    corpus=corpus)
    worker.start()
    remote = engine.store.remote
    if remote is not None:
        state = "reachable" if remote.reachable else "NOT reachable: local tiers only until it answers"
        print(f"kvblend serve: remote chunk store {remote.url} ({state})", file=sys.stderr)
    app = create_app(worker, served)
    print(f"kvblend serve: {served} ({engine.model.dtype}, {engine.model.device}) on http://{args.host}:{args.port}"
          f"/v1 - mode {config.mode}, ratio {config.ratio}, max queue {args.max_queue}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=2)
    worker.stop()
    return 0
