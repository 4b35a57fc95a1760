"""`kvblend bench serve`: a loopback load generator for `kvblend serve`, --mode full vs blend under one load.

Workload (seeded, the same request list for every mode): a pool of --pool passages from --dataset (pooled,
deduplicated); each request carries --docs distinct passages drawn with Zipf popularity (weight 1/rank^s
over a seeded shuffle of the pool), in draw order, and the question of the first drawn passage's sample,
with the dataset's own prompt template (system = the template prefix, user = the formatted question).

Per mode: a fresh server (own KVBLEND_HOME, so the chunk store starts cold and hits come only from
documents repeating within the run) on a free loopback port; one warm-up request (not counted). The
workload is split into --rounds blocks; each block is run by every mode in turn, the order alternating per
round (so a shared machine's background load falls on every mode alike), by --concurrency closed-loop
clients that stream the requests, bounded by --requests and --duration (running time per mode). Measured per
request: client TTFT (send -> first content token; queue wait included), the server's TTFT (prefill start
-> first token, from usage), queue wait, chunk hits and misses; per mode: throughput, p50/p90/p99, hit rate,
and how many answers equal full's (same prompts, greedy).

Writes --out (default results/bench/serve.json) and, with --plot, a PNG of the TTFT percentiles.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from kvblend.bench.harness import distribution, results_header

log = logging.getLogger(__name__)

DEFAULT_OUT = "results/bench/serve.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", help="named model or local HF folder")
    p.add_argument("--dtype", default="float32", help="server dtype (default float32: answers are compared)")
    p.add_argument("--device", default="auto")
    p.add_argument("--modes", default="full,blend",
                   help="comma-separated modes, each on its own fresh server; MODE:batchN runs that server with "
                        "--max-batch N (e.g. blend:batch1,blend:batch16: one at a time vs continuous batching)")
    p.add_argument("--ratio", type=float, default=0.15, help="blend recompute ratio")
    p.add_argument("--dataset", default="musique_s", help="where the passages and questions come from")
    p.add_argument("--pool", type=int, default=16, help="distinct passages in the workload")
    p.add_argument("--docs", type=int, default=2, help="documents (chunks) per request")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s of document popularity")
    p.add_argument("--requests", type=int, default=24, help="requests per mode (upper bound)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds per mode (upper bound; no new request after)")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    p.add_argument("--rounds", type=int, default=4,
                   help="blocks the workload is split into; each block is run by every mode in turn (order "
                        "alternating), so that a shared machine's background load falls on every mode alike")
    p.add_argument("--max-tokens", type=int, default=8, help="completion tokens per request (greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--plot", default=None, help="write a PNG of TTFT p50/p90/p99 per mode")
    p.add_argument("--log-dir", default=None, help="keep the servers' logs here (default: a temp folder)")
    p.add_argument("--replicas", type=int, default=0,
                   help="scale-out run instead (kvblend/bench/scale_out.py): N Ray Serve engine replicas in blend "
                        "mode, without / with the remote tier, default / chunk-aware routing (default 0: off)")
    p.add_argument("--remote-store", dest="remote_store", default="auto",
                   help="with --replicas: redis://HOST:PORT of a server to use (its databases 1-4 are flushed), or "
                        "auto (a redis-server started in a temp folder)")
    p.add_argument("--replica-cpus", dest="replica_cpus", type=float, default=1.0, help="with --replicas")
    p.add_argument("--replica-gpus", dest="replica_gpus", type=float, default=0.0, help="with --replicas")
    p.add_argument("--ray-address", dest="ray_address", default=None,
                   help="with --replicas: a running Ray cluster (default: a local one started by the bench)")
    p.add_argument("--probe", type=int, default=4,
                   help="with --replicas: requests of fresh documents answered by one server, then by a second one "
                        "sharing the remote tier (TTFT of a remote fetch vs a build; 0: skip)")
    p.add_argument("--from-json", dest="from_json", default=None,
                   help="no run: print the tables (and --plot, of the first) of serve JSONs already measured (comma list)")
    p.add_argument("--summary", nargs="?", const="docs/results/bench/summary.json", default=None,
                   help="with --from-json: write S1_batched_throughput_x16 / S2_ttft_p50_x16_vs_unloaded")


def _positive(args, *names) -> None:
    for n in names:
        if getattr(args, n) <= 0:
            raise ValueError(f"--{n.replace('_', '-')} must be > 0, got {getattr(args, n)}")


def build_workload(dataset: str, pool_size: int, docs: int, zipf_s: float, n: int, seed: int) -> dict:
    """The seeded request list: messages and {"title", "text"} documents per request."""
    from kvblend.data.datasets import load_dataset

    data = load_dataset(dataset)
    pool, owner, seen = [], [], set()
    for sample in data.samples:
        for p in sample.passages:
            if (p.title, p.text) not in seen:
                seen.add((p.title, p.text))
                pool.append(p)
                owner.append(sample)
    if docs > pool_size:
        raise ValueError(f"--docs {docs} exceeds --pool {pool_size}")
    rng = random.Random(seed)
    chosen = rng.sample(range(len(pool)), min(pool_size, len(pool)))  # popularity rank -> pool index
    weights = [1.0 / (r + 1) ** zipf_s for r in range(len(chosen))]
    requests = []
    for _ in range(n):
        ranks: list[int] = []
        while len(ranks) < docs:
            r = rng.choices(range(len(chosen)), weights)[0]
            if r not in ranks:
                ranks.append(r)
        picked = [chosen[r] for r in ranks]
        question = data.template.format_query(owner[picked[0]].question)
        requests.append({
            "messages": [{"role": "system", "content": data.template.prefix}, {"role": "user", "content": question}],
            "documents": [{"title": pool[i].title, "text": pool[i].text} for i in picked],
            "doc_ranks": ranks,
        })
    distinct = {r for q in requests for r in q["doc_ranks"]}
    return {"dataset": data.name, "pool": len(chosen), "docs_per_request": docs, "zipf_s": zipf_s,
            "requests": requests, "distinct_docs_used": len(distinct),
            "ideal_hit_rate": 1 - len(distinct) / (len(requests) * docs) if requests else None}


def stream_request(host: str, port: int, body: dict, timeout: float = 900.0) -> dict:
    """One streamed chat completion: client TTFT, total time, text, usage (or the error)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"status": resp.status, "error": resp.read().decode(errors="replace")[:300]}
        first = None
        text, usage = [], None
        while True:
            line = resp.fp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return {"status": 500, "error": event["error"].get("message", "")}
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter()
                    text.append(piece)
            usage = event.get("usage") or usage
        end = time.perf_counter()
        return {"status": 200, "client_ttft_ms": ((first or end) - t0) * 1e3, "latency_ms": (end - t0) * 1e3,
                "text": "".join(text), "usage": usage}
    finally:
        conn.close()


def parse_mode(spec: str) -> tuple[str, int | None]:
    """'blend' -> ('blend', None); 'blend:batch16' -> ('blend', 16); ValueError otherwise."""
    from kvblend.vocab import MODES

    mode, _, batch = spec.partition(":")
    if mode not in MODES or (batch and not (batch.startswith("batch") and batch[5:].isdigit() and int(batch[5:]) > 0)):
        raise ValueError(f"--modes: '{spec}' is not MODE or MODE:batchN with MODE one of {','.join(MODES)}")
    return mode, int(batch[5:]) if batch else None


def model_folder(args) -> str:
    """A named model is converted under the user's KVBLEND_HOME: its folder, so a fresh home holds only chunks."""
    from kvblend.model.registry import NAMED_MODELS, converted_folder

    return str(converted_folder(NAMED_MODELS[args.model])) if args.model in NAMED_MODELS else args.model


def start_server(args, mode: str, log_dir: Path, extra: tuple[str, ...] = (), name: str | None = None):
    """A fresh `kvblend serve` in `mode` with its own empty chunk store (not waited for: see warm_up); extra: more
    flags (e.g. --remote-store URL)."""
    from kvblend.serve.process import ServerProcess

    mode, batch = parse_mode(mode)
    name = name or (mode if batch is None else f"{mode}_batch{batch}")
    home = Path(tempfile.mkdtemp(prefix=f"kvblend-bench-serve-{name}-"))
    srv = ServerProcess(["--model", model_folder(args), "--dtype", args.dtype, "--device", args.device, "--mode", mode,
                         "--ratio", str(args.ratio), "--max-queue", str(max(64, args.concurrency * 2)), *extra,
                         *(["--max-batch", str(batch)] if batch else [])],
                        log_dir / f"server_{name}.log", env={"KVBLEND_HOME": str(home)}, startup_timeout_s=600,
                        wait=False)
    return srv


def warm_up(srv) -> None:
    """Wait until the server answers, then one uncounted request (first-call costs stay out of the numbers)."""
    srv.wait_ready()
    warm = {"messages": [{"role": "user", "content": "warm-up"}], "documents": ["warm-up document"],
            "max_tokens": 2, "temperature": 0, "stream": True}
    stream_request(srv.host, srv.port, warm)


def run_block(args, srv, block: list[tuple[int, dict]], deadline: float) -> tuple[list[dict], float]:
    """--concurrency closed-loop clients stream the block's requests; (results, wall seconds)."""
    todo = list(block)
    lock = threading.Lock()
    results: list[dict] = []

    def client() -> None:
        while True:
            with lock:
                if not todo or time.perf_counter() > deadline:
                    return
                i, req = todo.pop(0)
            body = {"messages": req["messages"], "documents": req["documents"], "max_tokens": args.max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            r = stream_request(srv.host, srv.port, body)
            r["index"] = i
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def summarize(args, mode: str, results: list[dict], wall: float, metrics_before: dict, metrics_after: dict) -> dict:
    ok = sorted((r for r in results if r["status"] == 200), key=lambda r: r["index"])
    kv = [r["usage"]["kvblend"] for r in ok]
    hits = sum(sum(k["chunk_hits"].values()) for k in kv)
    misses = sum(k["chunk_misses"] for k in kv)
    delta = {k: metrics_after.get(k, 0) - metrics_before.get(k, 0) for k in metrics_after
             if k.startswith("kvblend_store_") and "total" in k}
    keep = ("ttft_ms", "queue_ms", "prefill_ms", "build_ms", "fetch_ms", "recomputed_tokens", "chunk_hits",
            "chunk_misses")
    return {
        "mode": mode, "ratio": args.ratio if mode == "blend" else None, "requests_sent": len(results),
        "requests_ok": len(ok), "errors": [r for r in results if r["status"] != 200][:5], "wall_s": wall,
        "throughput_rps": len(ok) / wall if wall > 0 else None,
        "output_tokens_per_s": sum(r["usage"]["completion_tokens"] for r in ok) / wall if wall > 0 else None,
        "client_ttft_ms": distribution([r["client_ttft_ms"] for r in ok]),
        "server_ttft_ms": distribution([k["ttft_ms"] for k in kv]),
        "queue_ms": distribution([k["queue_ms"] for k in kv]),
        "latency_ms": distribution([r["latency_ms"] for r in ok]),
        "chunk_hits": hits, "chunk_misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        "recomputed_fraction": (sum(k["recomputed_tokens"] for k in kv) / sum(r["usage"]["prompt_tokens"] for r in ok)
                                if ok else None),
        "store_counters": delta,
        "per_request": [{"index": r["index"], "client_ttft_ms": r["client_ttft_ms"], "latency_ms": r["latency_ms"],
                         "text": r["text"], "prompt_tokens": r["usage"]["prompt_tokens"],
                         **{k: r["usage"]["kvblend"][k] for k in keep}} for r in ok],
    }


def run_modes(args, modes: list[str], workload: dict, log_dir: Path) -> dict:
    """Every mode's server up at once (idle ones cost no CPU); the workload split into --rounds blocks, each
    block run by every mode in turn, the order alternating per round, so that background load on a shared
    machine falls on both modes alike."""
    from contextlib import ExitStack

    from kvblend.serve.metrics import parse_prometheus

    from tqdm import tqdm

    requests = list(enumerate(workload["requests"][:args.requests]))
    rounds = max(1, min(args.rounds, len(requests)))
    blocks = [requests[r * len(requests) // rounds:(r + 1) * len(requests) // rounds] for r in range(rounds)]
    with ExitStack() as stack:
        servers = {m: stack.enter_context(start_server(args, m, log_dir)) for m in modes}  # start together
        for srv in servers.values():
            warm_up(srv)
        before = {m: parse_prometheus(servers[m].get_text("/metrics")) for m in modes}
        engine = {m: servers[m].get_json("/health").get("engine") for m in modes}
        results: dict[str, list[dict]] = {m: [] for m in modes}
        wall = dict.fromkeys(modes, 0.0)
        with tqdm(total=len(requests) * len(modes), desc="serve bench", unit="req",
                  disable=not sys.stderr.isatty()) as bar:
            for r, block in enumerate(blocks):
                for m in (modes if r % 2 == 0 else modes[::-1]):
                    if wall[m] >= args.duration:  # --duration bounds the time spent running each mode
                        continue
                    got, dt = run_block(args, servers[m], block, time.perf_counter() + args.duration - wall[m])
                    results[m].extend(got)
                    wall[m] += dt
                    bar.update(len(block))
        after = {m: parse_prometheus(servers[m].get_text("/metrics")) for m in modes}
    return {m: {**summarize(args, m, results[m], wall[m], before[m], after[m]), "engine": engine[m]}
            for m in modes}


def measure(args) -> dict:
    from kvblend.vocab import MODES

    _positive(args, "pool", "docs", "requests", "duration", "concurrency", "rounds", "max_tokens")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise ValueError(f"--modes: expected a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    for m in modes:
        parse_mode(m)
    workload = build_workload(args.dataset, args.pool, args.docs, args.zipf, args.requests, args.seed)
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="kvblend-bench-serve-logs-"))
    runs = run_modes(args, modes, workload, log_dir)
    if "full" in runs:
        ref = {r["index"]: r["text"] for r in runs["full"]["per_request"]}
        for run in runs.values():
            same = [r["text"] == ref[r["index"]] for r in run["per_request"] if r["index"] in ref]
            run["answers_equal_full"] = sum(same)
            run["answers_compared"] = len(same)
    import platform

    return {
        **results_header(), "benchmark": "serve", "model": args.model, "dtype": args.dtype,
        "device": args.device, "host": f"{platform.machine()} ({platform.processor() or '?'}), loopback",
        "settings": {k: getattr(args, k) for k in ("modes", "ratio", "dataset", "pool", "docs", "zipf", "requests",
                                                  "duration", "concurrency", "rounds", "max_tokens", "seed")},
        "workload": {k: v for k, v in workload.items() if k != "requests"},
        "runs": runs,
    }


BATCH_TARGETS = {  # key: (target, better, what)
    "S1_batched_throughput_x16": (6.0, "higher", "requests/s at concurrency 16, continuous batching / one at a time "
                                                 "(blend:batchN vs blend:batch1, one run)"),
    "S2_ttft_p50_x16_vs_unloaded": (2.0, "lower", "client TTFT p50 at concurrency 16 with batching / at concurrency 1"),
}


def batching_entries(docs: list[dict], source: str) -> dict[str, dict]:
    """S1 / S2 from serve results: a run at concurrency 16 with blend:batch1 and blend:batchN (N > 1), and for
    S2 also a run at concurrency 1 with the same batched spec."""
    from kvblend.bench.summary import entry

    out: dict[str, dict] = {}
    at = {d["settings"]["concurrency"]: d for d in docs}
    loaded = at.get(16)
    if loaded is None:
        return out
    runs = loaded["runs"]
    batched = next((k for k in runs if k.startswith("blend:batch") and k != "blend:batch1"), None)
    dev = loaded.get("device_name") or loaded.get("device")
    if batched and "blend:batch1" in runs:
        a, b = runs[batched]["throughput_rps"], runs["blend:batch1"]["throughput_rps"]
        t, better, what = BATCH_TARGETS["S1_batched_throughput_x16"]
        out["S1_batched_throughput_x16"] = entry(a / b, t, better, source, device=dev, what=what, batched_rps=a,
                                                 one_at_a_time_rps=b, batched=batched)
    unloaded = at.get(1)
    if batched and unloaded is not None and batched in unloaded["runs"]:
        a, b = runs[batched]["client_ttft_ms"]["p50"], unloaded["runs"][batched]["client_ttft_ms"]["p50"]
        t, better, what = BATCH_TARGETS["S2_ttft_p50_x16_vs_unloaded"]
        out["S2_ttft_p50_x16_vs_unloaded"] = entry(a / b, t, better, source, device=dev, what=what,
                                                   ttft_p50_x16_ms=a, ttft_p50_x1_ms=b)
    return out


def table(result: dict) -> str:
    def f(x, spec=".0f"):
        return "-" if x is None else format(x, spec)

    head = ("| mode | requests | req/s | client TTFT p50 / p90 / p99 (ms) | server TTFT p50 / p99 (ms) | "
            "queue p50 (ms) | hit rate | recomputed | answers = full |")
    lines = [head, "|" + "---|" * 9]
    for m, r in result["runs"].items():
        c, s = r["client_ttft_ms"], r["server_ttft_ms"]
        eq = f"{r['answers_equal_full']}/{r['answers_compared']}" if "answers_equal_full" in r else "-"
        lines.append(f"| {m}{'@' + str(r['ratio']) if r['ratio'] is not None else ''} | {r['requests_ok']} | "
                     f"{f(r['throughput_rps'], '.3f')} | {f(c['p50'])} / {f(c['p90'])} / {f(c['p99'])} | "
                     f"{f(s['p50'])} / {f(s['p99'])} | {f(r['queue_ms']['p50'])} | {f(r['hit_rate'], '.2f')} | "
                     f"{f(r['recomputed_fraction'], '.2f')} | {eq} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in ((axes[0], "client_ttft_ms", "client TTFT (queue included)"),
                           (axes[1], "server_ttft_ms", "server TTFT (prefill start -> first token; chunk builds excluded)")):
        width = 0.8 / max(1, len(runs))
        for j, (mode, r) in enumerate(runs.items()):
            vals = [(r[key][p] or 0) / 1e3 for p in ("p50", "p90", "p99")]
            ax.bar([i + j * width for i in range(3)], vals, width, label=mode)
        ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(3)], ["p50", "p90", "p99"])
        ax.set_ylabel("seconds")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"kvblend serve, {result['model']} ({result['dtype']}), {s['concurrency']} clients, "
                 f"{s['docs']} docs/request, Zipf s={s['zipf']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_and_report(result: dict, out: Path, text: str) -> None:
    """Write a serve-style result atomically, print its table and the runs' failures."""
    from kvblend.io import atomic_write_json

    atomic_write_json(out, result)
    print(text)
    for m, r in result["runs"].items():
        if r["errors"]:
            print(f"{m}: {r['requests_sent'] - r['requests_ok']} requests failed, e.g. {r['errors'][0]}")
    print(f"\nwrote {out}")


def _write_summary(docs: list[dict], args) -> None:
    from kvblend.bench.summary import update_summary

    entries = batching_entries(docs, args.from_json)
    if entries:
        update_summary(args.summary, entries)
    for k, e in entries.items():
        print(f"{k}: {e['measured']:.3f} (target {e['better']} {e['target']}; {'met' if e['met'] else 'missed'})")
    if not entries:
        print("no S1 / S2 entry: needs a concurrency-16 run with blend:batch1 and blend:batchN (and, for S2, a "
              "concurrency-1 run of blend:batchN)")


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        docs = []
        for path in [x for x in args.from_json.split(",") if x]:
            try:
                docs.append(json.loads(Path(path).read_text(encoding="utf-8")))
                print(f"{path}:\n{table(docs[-1])}\n")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: not a serve benchmark JSON ({type(exc).__name__}: {exc})") from None
        if args.plot:
            plot(docs[0], Path(args.plot))
            print(f"wrote {args.plot}")
        if args.summary:
            _write_summary(docs, args)
        return 0
    result = measure(args)
    out = Path(args.out)
    write_and_report(result, out, table(result))
    if args.plot:
        plot(result, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0
