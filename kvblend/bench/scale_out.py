"""`kvblend bench serve --replicas N`: N engine replicas (Ray Serve, `kvblend serve --replicas`) under one seeded
Zipf workload over a shared corpus (kvblend/bench/serve.py build_workload), blend mode, greedy, streamed by
--concurrency closed-loop clients through the one endpoint.

Scenarios, each a fresh deployment with empty local stores (and its own, flushed, Redis database):
  local/default   no remote tier, Ray Serve's default router (power of two choices)
  remote/default  the replicas share the remote tier (a real redis-server), default router
  remote/chunk    shared remote tier, the chunk-aware router (kvblend/serve/router.py)
Per scenario, from each answer's usage.kvblend.chunk_tiers: chunks built (any replica), reads answered per tier
(gpu / cpu / disk / remote), hit rate (any tier) and memory hit rate (gpu + cpu); client TTFT (send -> first
token, queue and builds included) and latency p50 / p99; requests per replica. Warm-up: two requests per
replica without documents (round-robin), not counted.

Probe (remote fetch vs build, --probe requests): two single-process `kvblend serve` sharing one fresh Redis
database; server A answers requests of documents nobody has seen (each chunk built), then server B answers the
same requests (each chunk fetched from the remote tier, verified, copied to its disk). Client and server TTFT,
build_ms and fetch_ms of both.

Writes --out (default results/bench/serve_scale_out.json).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from contextlib import ExitStack, nullcontext
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

from kvblend.bench.harness import distribution, results_header
from kvblend.bench.serve import build_workload, model_folder, run_block, start_server, stream_request, warm_up

log = logging.getLogger(__name__)

DEFAULT_OUT = "results/bench/serve_scale_out.json"
SCENARIOS = (("local", "default"), ("remote", "default"), ("remote", "chunk"))
PROBE_DB = 4


def _db_url(base: str, db: int) -> str:
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


def _flush(url: str) -> None:
    import redis

    redis.Redis.from_url(url, socket_timeout=5).flushdb()


def tier_counts(ok: list[dict]) -> Counter:
    """Chunk reads per tier label over the answers ("built (missing)" etc. for builds)."""
    return Counter(t for r in ok for t in r["usage"]["kvblend"]["chunk_tiers"])


def summarize_scenario(results: list[dict], wall: float) -> dict:
    ok = sorted((r for r in results if r["status"] == 200), key=lambda r: r["index"])
    tiers = tier_counts(ok)
    reads = sum(tiers.values())
    built = sum(v for t, v in tiers.items() if t.startswith("built"))
    hits = {t: tiers.get(t, 0) for t in ("gpu", "cpu", "disk", "remote")}
    kv = [r["usage"]["kvblend"] for r in ok]
    return {
        "requests_sent": len(results), "requests_ok": len(ok), "errors": [r for r in results if r["status"] != 200][:5],
        "wall_s": wall, "throughput_rps": len(ok) / wall if wall > 0 else None,
        "chunk_reads": reads, "chunks_built": built, "hits": hits,
        "hit_rate": (reads - built) / reads if reads else None,
        "memory_hit_rate": (hits["gpu"] + hits["cpu"]) / reads if reads else None,
        "client_ttft_ms": distribution([r["client_ttft_ms"] for r in ok]),
        "latency_ms": distribution([r["latency_ms"] for r in ok]),
        "server_ttft_ms": distribution([k["ttft_ms"] for k in kv]),
        "build_ms_total": sum(k["build_ms"] for k in kv),
        "per_replica": dict(Counter(k.get("replica", "?") for k in kv)),
        "per_request": [{"index": r["index"], "replica": r["usage"]["kvblend"].get("replica"),
                         "client_ttft_ms": r["client_ttft_ms"], "latency_ms": r["latency_ms"],
                         "chunk_tiers": r["usage"]["kvblend"]["chunk_tiers"], "text": r["text"]} for r in ok],
    }


def run_scenario(args, workload: dict, remote_url: str, routing: str, home: Path, port: int) -> dict:
    """One fresh deployment of args.replicas replicas; the workload through it; the summary."""
    from ray import serve

    from kvblend.config import EngineConfig
    from kvblend.serve.cluster import APP_NAME, build_app, deploy

    config = EngineConfig(model=model_folder(args), dtype=args.dtype, device=args.device, home=str(home),
                          remote_store=remote_url, mode="blend", ratio=args.ratio)
    app = build_app(config, args.replicas, max_queue=max(64, args.concurrency * 2), routing=routing,
                    replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus)
    deploy(app, "127.0.0.1", port)
    srv = SimpleNamespace(host="127.0.0.1", port=port)
    try:
        warm = {"messages": [{"role": "user", "content": "warm-up"}], "max_tokens": 2, "temperature": 0,
                "stream": True}
        for _ in range(2 * args.replicas):
            stream_request(srv.host, srv.port, warm)
        requests = list(enumerate(workload["requests"][:args.requests]))
        results, wall = run_block(args, srv, requests, time.perf_counter() + args.duration)
    finally:
        serve.delete(APP_NAME)
    return summarize_scenario(results, wall)


def _probe_bodies(args, n: int) -> list[dict]:
    """n requests whose documents nobody has seen (a probe marker in each text), from the same dataset."""
    workload = build_workload(args.dataset, args.pool, args.docs, args.zipf, n, args.seed + 1)
    bodies = []
    for i, req in enumerate(workload["requests"]):
        docs = [{"title": d["title"], "text": f"[probe {i}.{j}] {d['text']}"} for j, d in enumerate(req["documents"])]
        bodies.append({"messages": req["messages"], "documents": docs, "max_tokens": args.max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    return bodies


def _probe_side(results: list[dict]) -> dict:
    ok = [r for r in results if r["status"] == 200]
    kv = [r["usage"]["kvblend"] for r in ok]
    return {"requests_ok": len(ok), "client_ttft_ms": distribution([r["client_ttft_ms"] for r in ok]),
            "server_ttft_ms": distribution([k["ttft_ms"] for k in kv]),
            "build_ms": distribution([k["build_ms"] for k in kv]), "fetch_ms": distribution([k["fetch_ms"] for k in kv]),
            "chunk_tiers": dict(tier_counts(ok)), "texts": [r["text"] for r in ok]}


def run_probe(args, remote_url: str, log_dir: Path) -> dict:
    """Server A builds fresh documents, server B (same remote tier) fetches them: TTFT of both."""
    bodies = _probe_bodies(args, args.probe)
    extra = ("--remote-store", remote_url)
    with ExitStack() as stack:
        a = stack.enter_context(start_server(args, "blend", log_dir, extra, name="probe_builder"))
        b = stack.enter_context(start_server(args, "blend", log_dir, extra, name="probe_fetcher"))
        for srv in (a, b):
            warm_up(srv)
        built = [stream_request(a.host, a.port, body) for body in bodies]
        fetched = [stream_request(b.host, b.port, body) for body in bodies]
    out = {"requests": len(bodies), "build": _probe_side(built), "remote_fetch": _probe_side(fetched)}
    out["answers_equal"] = out["build"]["texts"] == out["remote_fetch"]["texts"]
    return out


def _redis(args, tmp: Path):
    """The Redis base URL: --remote-store, or a redis-server started in tmp (auto)."""
    from kvblend.serve.process import RedisServer

    if args.remote_store != "auto":
        return nullcontext(args.remote_store)
    server = RedisServer(tmp / "redis")

    class Running:
        def __enter__(self):
            return server.url

        def __exit__(self, *exc):
            server.kill()

    return Running()


def measure_scale_out(args) -> dict:
    import ray

    from kvblend.serve.process import free_port

    if args.replicas < 1 or args.probe < 0:
        raise ValueError(f"--replicas must be >= 1 and --probe >= 0, got {args.replicas} and {args.probe}")
    workload = build_workload(args.dataset, args.pool, args.docs, args.zipf, args.requests, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="kvblend-bench-scale-out-"))
    log_dir = Path(args.log_dir) if args.log_dir else tmp / "logs"
    runs = {}
    with _redis(args, tmp) as base:
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        try:
            port = free_port()
            for i, (tier, routing) in enumerate(SCENARIOS, start=1):
                url = _db_url(base, i) if tier == "remote" else ""
                if url:
                    _flush(url)
                log.info("scale-out scenario %s/%s", tier, routing)
                runs[f"{tier}/{routing}"] = run_scenario(args, workload, url, routing, tmp / f"home{i}", port)
        finally:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        probe = None
        if args.probe:
            _flush(_db_url(base, PROBE_DB))
            probe = run_probe(args, _db_url(base, PROBE_DB), log_dir)
    return {**results_header(), "benchmark": "serve_scale_out", "model": args.model, "dtype": args.dtype,
            "device": args.device, "replicas": args.replicas,
            "settings": {k: getattr(args, k) for k in ("ratio", "dataset", "pool", "docs", "zipf", "requests",
                                                      "duration", "concurrency", "max_tokens", "seed", "replica_cpus",
                                                      "replica_gpus", "probe")},
            "workload": {k: v for k, v in workload.items() if k != "requests"},
            "runs": runs, "remote_fetch_vs_build": probe}


def table(result: dict) -> str:
    def f(x, spec=".0f"):
        return "-" if x is None else format(x, spec)

    lines = ["| scenario | requests | chunks built | hits gpu / cpu / disk / remote | hit rate | memory hit rate | "
             "client TTFT p50 / p99 (ms) | latency p50 / p99 (ms) | per replica |", "|" + "---|" * 9]
    for name, r in result["runs"].items():
        h, c, lat = r["hits"], r["client_ttft_ms"], r["latency_ms"]
        lines.append(f"| {name} | {r['requests_ok']} | {r['chunks_built']} | {h['gpu']} / {h['cpu']} / {h['disk']} / "
                     f"{h['remote']} | {f(r['hit_rate'], '.2f')} | {f(r['memory_hit_rate'], '.2f')} | "
                     f"{f(c['p50'])} / {f(c['p99'])} | {f(lat['p50'])} / {f(lat['p99'])} | "
                     f"{', '.join(f'{k}: {v}' for k, v in sorted(r['per_replica'].items()))} |")
    p = result.get("remote_fetch_vs_build")
    if p:
        lines.append("\n| probe (fresh documents) | client TTFT p50 / p99 (ms) | server TTFT p50 (ms) | build_ms p50 | "
                     "fetch_ms p50 | chunk tiers |\n|---|---|---|---|---|---|")
        for side in ("build", "remote_fetch"):
            s = p[side]
            lines.append(f"| {side} | {f(s['client_ttft_ms']['p50'])} / {f(s['client_ttft_ms']['p99'])} | "
                         f"{f(s['server_ttft_ms']['p50'])} | {f(s['build_ms']['p50'])} | {f(s['fetch_ms']['p50'])} | "
                         f"{s['chunk_tiers']} |")
    return "\n".join(lines)


def run_scale_out(args) -> int:
    from kvblend.bench.serve import DEFAULT_OUT as SERVE_OUT, write_and_report

    result = measure_scale_out(args)
    write_and_report(result, Path(DEFAULT_OUT if args.out == SERVE_OUT else args.out), table(result))
    return 0
