"""`kvblend serve --replicas`: two engine replicas on a real local Ray cluster (Ray Serve), one OpenAI-compatible
endpoint, the chunk-aware router, a real redis-server as the shared remote tier; answers equal a single engine's."""

from __future__ import annotations

import http.client
import json

import openai
import pytest
import ray

import conftest
from kvblend.config import EngineConfig
from kvblend.engine import Engine
from kvblend.generation.sampling import SamplingParams
from kvblend.model.registry import load_model
from kvblend.serve.process import free_port


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return conftest.make_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny-cluster")


@pytest.fixture(scope="module")
def cluster(tiny_folder, redis_server, tmp_path_factory):
    """A local Ray instance (2 CPUs) running the kvblend application with 2 CPU replicas; its base URL."""
    from ray import serve

    from kvblend.serve.cluster import build_app, deploy

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = EngineConfig(model=str(tiny_folder), dtype="float32", device="cpu",
                              home=str(tmp_path_factory.mktemp("cluster-home")), remote_store=redis_server.url)
        app = build_app(config, 2, max_queue=8, replica_cpus=0.5)
        yield deploy(app, "127.0.0.1", free_port())
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(tiny_folder, tmp_path_factory):
    model = load_model(str(tiny_folder), dtype="float32", device="cpu")
    return Engine(EngineConfig(home=str(tmp_path_factory.mktemp("single-home"))), model=model)


def ask(client, docs, question="What is in the documents?", **kw):
    return client.chat.completions.create(model="tiny-cluster", messages=[{"role": "user", "content": question}],
                                          max_tokens=kw.pop("max_tokens", 4), temperature=0,
                                          extra_body={"documents": docs} if docs else None, **kw)


def test_streaming_and_plain_answers_equal_a_single_engine(client, engine):
    docs = ["Cluster doc: the Nile is long.", "Cluster doc: Everest is high."]
    system, question = "Answer from the passages.", "Which river is long?"
    kw = dict(model="tiny-cluster", messages=[{"role": "system", "content": system},
                                              {"role": "user", "content": question}],
              max_tokens=10, temperature=0, extra_body={"documents": docs})
    plain = client.chat.completions.create(**kw)
    texts = [f"{d}\n\n" for d in docs]
    want = engine.answer(engine.prompt(system, texts, question), texts, mode="blend",
                         sampling=SamplingParams(max_new_tokens=10, temperature=0.0, stop_on_newline=False))
    assert plain.model_extra["kvblend"]["completion_token_ids"] == want.token_ids
    assert plain.choices[0].message.content == want.text
    pieces, usage = [], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(pieces) == want.text and usage.completion_tokens == 10
    assert usage.model_extra["kvblend"]["replica"].startswith("replica-")


def test_second_identical_request_lands_where_its_chunks_are(client):
    firsts = []
    for i in range(4):  # new documents spread round-robin; a repeat follows its chunks
        docs = [f"Routing doc {i}a about granite.", f"Routing doc {i}b about basalt."]
        first = ask(client, docs).usage.model_extra["kvblend"]
        second = ask(client, docs).usage.model_extra["kvblend"]
        assert first["chunk_misses"] == 2
        assert second["replica"] == first["replica"], (first, second)
        assert second["chunk_tiers"] == ["gpu", "gpu"] and second["chunk_misses"] == 0
        firsts.append(first["replica"])
    assert len(set(firsts)) == 2, firsts


def test_requests_without_documents_go_round_robin(client):
    replicas = {ask(client, None, question=f"hello {i}").usage.model_extra["kvblend"]["replica"] for i in range(4)}
    assert len(replicas) == 2


def test_errors_and_routes_are_the_single_server_ones(cluster):
    host, port = cluster.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 400 and body["error"]["code"] == "invalid_json"
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "other", "messages": [{"role": "user", "content": "x"}]}).encode(), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 404 and json.loads(resp.read())["error"]["code"] == "model_not_found"
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["engine"]["replicas"] == 2
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert "kvblend_requests_total" in text and "kvblend_remote_reachable 1" in text
    conn.close()
