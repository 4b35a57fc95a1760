"""`kvblend serve` as a real process on a loopback port, with a tiny random-weight llama that uses SmolLM2's
tokenizer (and chat template): the official openai client (plain, streaming), raw HTTP for bad requests,
concurrency, the bounded queue, disconnects, store hits across requests, and equality with Engine.answer."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import conftest
import openai
import pytest

from kvblend.bench.harness import HEADER_KEYS
from kvblend.config import EngineConfig
from kvblend.engine import Engine
from kvblend.generation.sampling import SamplingParams
from kvblend.model.registry import load_model
from kvblend.serve.metrics import parse_prometheus
from kvblend.serve.process import ServerProcess, free_port

CONTEXT = 8192
DOCS = ["The Eiffel Tower is in Paris and was finished in 1889.",
        "Mount Fuji is the highest mountain in Japan, 3,776 metres tall.",
        "The Danube flows through ten countries before reaching the Black Sea."]
CORPUS = [{"id": "p-tower", "title": "Eiffel Tower",
           "text": "The Eiffel Tower is a wrought-iron lattice tower in Paris."},
          {"id": "p-fuji", "title": "Mount Fuji", "text": "Mount Fuji is an active volcano on Honshu in Japan."},
          {"id": "p-danube", "title": "Danube", "text": "The Danube is the second-longest river in Europe."}]


def make_tiny_folder(out: Path) -> Path:
    """A 2-layer random llama saved as a Hugging Face folder, with the real SmolLM2 tokenizer files."""
    return conftest.make_tiny_folder(out, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny-serve")


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in CORPUS))
    with ServerProcess(["--model", str(tiny_folder), "--dtype", "float32", "--max-queue", "8",
                        "--corpus", str(corpus)], root / "server.log",
                       env={"KVBLEND_HOME": str(root / "home")}, startup_timeout_s=180) as srv:
        srv.home = root / "home"
        yield srv


@pytest.fixture(scope="module")
def engine(tiny_folder, tmp_path_factory):
    model = load_model(str(tiny_folder), dtype="float32", device="cpu")
    return Engine(EngineConfig(home=str(tmp_path_factory.mktemp("engine-home"))), model=model)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def served_name(server) -> str:
    return server.get_json("/v1/models")["data"][0]["id"]


def post(server, body, timeout: float = 60) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/v1/chat/completions", raw, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    headers = {k.lower(): v for k, v in resp.getheaders()}
    conn.close()
    return resp.status, data, headers


def metrics(server) -> dict[str, float]:
    return parse_prometheus(server.get_text("/metrics"))


def chunk_texts(docs):
    return [f"{d}\n\n" for d in docs]  # what the server makes of a string document


def test_models_health_and_metrics_format(server):
    models = server.get_json("/v1/models")
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-serve"
    assert models["data"][0]["max_model_len"] == CONTEXT
    health = server.get_json("/health")
    assert health["status"] == "ok" and health["engine"]["mode"] == "blend" and health["engine"]["dtype"] == "float32"
    text = server.get_text("/metrics")
    assert "# TYPE kvblend_ttft_seconds histogram" in text and "# TYPE kvblend_queue_depth gauge" in text
    m = parse_prometheus(text)
    assert m['kvblend_store_bytes{tier="disk"}'] >= 0 and "kvblend_queue_depth" in m


@pytest.mark.parametrize("mode", ["blend", "full"])
def test_openai_client_output_equals_engine_answer(server, client, engine, mode):
    """Greedy and seeded sampling over HTTP give the very tokens Engine.answer gives for the same prompt."""
    system, question = "Answer from the passages.", "Where is the Eiffel Tower?"
    prompt = engine.prompt(system, chunk_texts(DOCS[:2]), question)
    for temperature, seed in ((0.0, 0), (1.0, 7)):
        resp = client.chat.completions.create(
            model=served_name(server), messages=[{"role": "system", "content": system},
                                                 {"role": "user", "content": question}],
            max_tokens=12, temperature=temperature, seed=seed,
            extra_body={"documents": DOCS[:2], "kvblend": {"mode": mode, "ratio": 0.15}})
        want = engine.answer(prompt, chunk_texts(DOCS[:2]), mode=mode, ratio=0.15,
                             sampling=SamplingParams(max_new_tokens=12, temperature=temperature,
                                                     stop_on_newline=False, seed=seed))
        assert resp.model_extra["kvblend"]["completion_token_ids"] == want.token_ids
        assert resp.choices[0].message.content == want.text
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage.prompt_tokens == prompt.num_tokens and resp.usage.completion_tokens == 12


def test_second_request_with_same_documents_hits_the_store(server, client):
    docs = ["Unique document alpha for the hit test.", "Unique document beta for the hit test."]
    before = metrics(server)

    def ask():
        return client.chat.completions.create(
            model=served_name(server), messages=[{"role": "user", "content": "What is alpha?"}], max_tokens=3,
            temperature=0, extra_body={"documents": docs})

    first, second = ask().usage.model_extra["kvblend"], ask().usage.model_extra["kvblend"]
    assert first["chunk_misses"] == 2 and sum(first["chunk_hits"].values()) == 0
    assert second["chunk_misses"] == 0 and second["chunk_hits"]["gpu"] == 2
    after = metrics(server)
    assert after["kvblend_store_misses_total"] - before["kvblend_store_misses_total"] == 2
    assert after['kvblend_store_hits_total{tier="gpu"}'] - before['kvblend_store_hits_total{tier="gpu"}'] == 2
    third = ask().usage
    assert third.model_extra["kvblend"]["recomputed_tokens"] < third.prompt_tokens  # blend skips chunk tokens
    full = client.chat.completions.create(
        model=served_name(server), messages=[{"role": "user", "content": "What is alpha?"}], max_tokens=3,
        temperature=0, extra_body={"documents": docs, "kvblend": {"mode": "full"}}).usage
    assert sum(full.model_extra["kvblend"]["chunk_hits"].values()) == 0
    assert full.model_extra["kvblend"]["recomputed_tokens"] == full.prompt_tokens


def test_streaming_equals_plain_and_ends_with_usage(server, client):
    kw = dict(model=served_name(server), messages=[{"role": "user", "content": "Tell me about Fuji."}],
              max_tokens=16, temperature=1.0, seed=11, extra_body={"documents": DOCS})
    plain = client.chat.completions.create(**kw)
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == plain.choices[0].message.content
    assert len([p for p in pieces if p]) > 1, "text arrives in several events"
    assert finish == "length" and usage.completion_tokens == 16
    assert usage.model_extra["kvblend"]["ttft_ms"] > 0


def test_raw_stream_is_sse_ending_with_done(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}).encode(),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    conn.close()


def test_stop_sequences_plain_and_streaming(server, client):
    kw = dict(model=served_name(server), messages=[{"role": "user", "content": "Say something."}],
              max_tokens=24, temperature=1.0, seed=5, extra_body={"documents": DOCS[:1]})
    text = client.chat.completions.create(**kw).choices[0].message.content
    assert len(text) > 12
    stop = text[6:9]
    want = text[:text.find(stop)]
    stopped = client.chat.completions.create(stop=[stop, "zzzz-never"], **kw)
    assert stopped.choices[0].message.content == want and stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        stream=True, stop=stop, **kw) if c.choices)
    assert streamed == want


def test_server_side_retrieval(server, client):
    resp = client.chat.completions.create(
        model=served_name(server), messages=[{"role": "user", "content": "Which volcano is on Honshu?"}],
        max_tokens=2, temperature=0, extra_body={"retrieval": {"top_k": 1}})
    assert [r["id"] for r in resp.model_extra["kvblend"]["retrieved"]] == ["p-fuji"]
    assert resp.usage.model_extra["kvblend"]["chunks"] == 1


BAD = [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_type"),
    ({"messages": []}, "messages", "empty_array"),
    ({}, "messages", "missing_required_parameter"),
    ({"messages": "hello"}, "messages", "invalid_type"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, "max_tokens", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "documents": "doc"}, "documents", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x"}], "kvblend": {"mode": "turbo"}}, "kvblend.mode", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "kvblend": {"ratio": 2}}, "ratio", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "x"}], "documents": ["a " * 3000] * 3}, "messages",
     "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "x"}], "documents": ["a " * 5000]}, "documents[0]",
     "document_too_long"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": CONTEXT}, "messages", "context_length_exceeded"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    for body, param, code in BAD:
        status, data, _ = post(server, body)
        assert status == 400, (body, data)
        err = data["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param and err["code"] == code, (body, err)
        assert "\n" not in err["message"]
    status, data, _ = post(server, {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
    assert status == 404 and data["error"]["code"] == "model_not_found"
    status, data, _ = post(server, {"messages": [{"role": "user", "content": "x"}], "documents": DOCS,
                                    "max_tokens": 2})
    assert status == 200 and data["usage"]["completion_tokens"] == 2
    # nothing half-written: every stored chunk has its tensor file and its metadata, no temp files
    files = [p for p in server.home.rglob("*") if p.is_file() and "chunks" in p.parts]
    assert files and not [p for p in files if p.suffix not in (".safetensors", ".json")]
    assert {p.stem for p in files if p.suffix == ".json"} == {p.stem for p in files if p.suffix == ".safetensors"}


def test_eight_concurrent_clients_three_requests_each(server, client):
    before = metrics(server)

    def user(i: int) -> list[int]:
        got = []
        for j in range(3):
            r = client.chat.completions.create(
                model=served_name(server), messages=[{"role": "user", "content": f"client {i} request {j}"}],
                max_tokens=4, temperature=0, extra_body={"documents": [DOCS[(i + j) % 3]]})
            got.append(r.usage.completion_tokens)
        return got

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(user, range(8)))
    assert results == [[4, 4, 4]] * 8
    after = metrics(server)
    assert after['kvblend_requests_total{outcome="ok"}'] - before['kvblend_requests_total{outcome="ok"}'] == 24


def test_full_queue_gets_429_and_a_disconnected_stream_frees_the_worker(server):
    before = metrics(server)
    long = http.client.HTTPConnection(server.host, server.port, timeout=60)
    long.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "go on forever"}], "max_tokens": CONTEXT - 100,
         "temperature": 0, "stream": True}).encode(), {"Content-Type": "application/json"})
    resp = long.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event: the worker is busy with this request now
    results: list[int] = []

    def waiter():
        results.append(post(server, {"messages": [{"role": "user", "content": "queued"}], "max_tokens": 2},
                            timeout=120)[0])

    threads = [threading.Thread(target=waiter) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while metrics(server)["kvblend_queue_depth"] < 8:
        assert time.monotonic() < deadline, "8 requests never queued"
        time.sleep(0.05)
    status, data, headers = post(server, {"messages": [{"role": "user", "content": "one too many"}]})
    assert status == 429 and data["error"]["code"] == "queue_full" and int(headers["retry-after"]) >= 1
    t0 = time.monotonic()
    long.close()  # the client goes away mid-stream: its decoding stops, the queued requests run
    for t in threads:
        t.join(timeout=60)
    assert results == [200] * 8
    assert time.monotonic() - t0 < 20
    after = metrics(server)

    def grew(key: str) -> float:
        return after[key] - before[key]

    assert grew('kvblend_requests_total{outcome="cancelled"}') == 1
    assert grew('kvblend_requests_total{outcome="rejected_queue_full"}') == 1
    assert grew('kvblend_tokens_total{kind="completion"}') == 16  # the cancelled request's tokens are not counted


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvblend.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_bad_input_is_one_line(tmp_path):
    r = run_cli("--port", "0")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("--model", str(tmp_path / "nope"), "--port", str(free_port()))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("kvblend serve: error:")
    r = run_cli("--corpus", str(tmp_path / "missing.jsonl"), "--port", str(free_port()))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "missing.jsonl" in r.stderr
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run_cli("--port", str(busy.getsockname()[1]))
    assert r.returncode == 1 and "cannot listen" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bench_serve_quick_run(tiny_folder, tmp_path):
    """The load generator end to end on the tiny model: both modes answer every request of the same
    workload, blend's hits match the store's own counters, full never consults the store."""
    from kvblend.cli import main

    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--model", str(tiny_folder), "--requests", "4", "--concurrency", "2",
                 "--rounds", "2", "--pool", "3", "--docs", "2", "--max-tokens", "2", "--out", str(out),
                 "--plot", str(tmp_path / "serve.png"), "--log-dir", str(tmp_path / "logs")]) == 0
    result = json.loads(out.read_text())
    assert HEADER_KEYS <= set(result) and result["git_sha"]  # the harness's results header
    full, blend = result["runs"]["full"], result["runs"]["blend"]
    assert full["requests_ok"] == blend["requests_ok"] == 4 and not full["errors"] and not blend["errors"]
    assert full["chunk_hits"] == full["chunk_misses"] == 0 and full["hit_rate"] is None
    assert full["recomputed_fraction"] == 1.0 and blend["recomputed_fraction"] < 1.0
    assert blend["chunk_hits"] + blend["chunk_misses"] == 8 and blend["chunk_hits"] >= 5
    assert blend["chunk_misses"] == result["workload"]["distinct_docs_used"]  # each distinct document built once
    assert blend["store_counters"]["kvblend_store_misses_total"] == blend["chunk_misses"]
    assert blend["answers_compared"] == 4 and full["answers_equal_full"] == 4
    for run in (full, blend):
        c = run["client_ttft_ms"]
        assert 0 < c["p50"] <= c["p90"] <= c["p99"]
    assert (tmp_path / "serve.png").stat().st_size > 0
    assert full["engine"]["mode"] == "full" and blend["engine"]["mode"] == "blend"


def test_bench_serve_bad_modes_is_one_line(capsys):
    from kvblend.cli import main

    assert main(["bench", "serve", "--modes", "full,turbo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--modes" in err[0]
