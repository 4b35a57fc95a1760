"""The remote chunk tier on a real redis-server: shared hits across stores and processes, verification and healing
of corrupt or partial entries, TTL and byte budget, and a server that is down or killed mid-run (requests still
answered from the local tiers, with a warning and a metric)."""

from __future__ import annotations

import logging
import time

import openai
import pytest
import torch

from conftest import start_redis
from kvblend.config import load_config
from kvblend.errors import ConfigError
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.kvstore.key import ChunkKey, token_hash
from kvblend.kvstore.remote import RemoteTier, redact
from kvblend.kvstore.store import ChunkKVStore
from kvblend.serve.metrics import parse_prometheus
from kvblend.serve.process import ServerProcess, free_port

MiB = 2**20


def fake_chunk(i: int, num_tokens: int = 16) -> ChunkKV:
    ids = tuple(range(i * 1000, i * 1000 + num_tokens))
    g = torch.Generator().manual_seed(i)
    return ChunkKV(ChunkKey("fake", "float32", token_hash(ids)), ids, torch.randn(2, 2, 2, num_tokens, 8, generator=g))


def store_with(root, url, budget=64 * MiB, ttl=0, prefix="t:") -> ChunkKVStore:
    remote = RemoteTier(url, budget, ttl, prefix=prefix)
    return ChunkKVStore(root, 10 * MiB, 10 * MiB, 100 * MiB, device="cpu", model_name="fake", remote=remote)


def builder(chunk, calls):
    def build():
        calls.append(chunk.key)
        return chunk
    return build


def test_chunk_built_by_one_store_is_a_remote_hit_for_another(redis_server, tmp_path):
    chunk, calls = fake_chunk(1), []
    a = store_with(tmp_path / "a", redis_server.url, prefix="hit:")
    got = a.get(chunk.key, "gpu", build=builder(chunk, calls))
    assert got.built and got.outcome == "missing" and a.remote.stats["writes"] == 1
    b = store_with(tmp_path / "b", redis_server.url, prefix="hit:")  # another process's store: empty disk
    got = b.get(chunk.key, "gpu", build=builder(chunk, calls))
    assert not got.built and got.found_tier == "remote" and calls == [chunk.key]
    assert torch.equal(got.chunk.kv, chunk.kv) and got.chunk.token_ids == chunk.token_ids
    assert b.stats.hits["remote"] == 1 and b.tier_of(chunk.key) == "gpu"
    assert b.disk.read(chunk.key).token_ids == chunk.token_ids  # copied to local disk (verified read)
    assert b.summary()["remote"]["hits"] == 1
    # written once: a later put of the same chunk does not write again
    assert b.remote.put(chunk, b.disk) is False and redis_server.client().hlen("hit:bytes") == 1


def test_remote_entries_follow_the_local_key_salt_included(redis_server, tmp_path):
    from dataclasses import replace

    chunk, calls = fake_chunk(5), []
    salted = replace(chunk, key=replace(chunk.key, salt="tenant-a"))
    store_with(tmp_path / "a", redis_server.url, prefix="salt:").put(salted)
    r = redis_server.client()
    assert r.exists(f"salt:{salted.key}:meta") and not r.exists(f"salt:{chunk.key}:meta")
    other = store_with(tmp_path / "b", redis_server.url, prefix="salt:")
    assert other.get(chunk.key, "cpu", build=builder(chunk, calls)).built  # unsalted: not the tenant's entry
    assert other.get(salted.key, "cpu", build=builder(salted, calls)).found_tier == "remote"
    assert calls == [chunk.key]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "drop_meta", "drop_kv", "bad_meta_json"])
def test_corrupt_or_partial_remote_entry_is_rebuilt_and_rewritten(redis_server, tmp_path, damage, caplog):
    chunk, calls = fake_chunk(2), []
    prefix = f"corrupt-{damage}:"
    store_with(tmp_path / "a", redis_server.url, prefix=prefix).put(chunk)
    r = redis_server.client()
    kv_key, meta_key = f"{prefix}{chunk.key}:kv", f"{prefix}{chunk.key}:meta"
    data = bytearray(r.get(kv_key))
    if damage == "flip_byte":
        data[-3] ^= 0xFF
        r.set(kv_key, bytes(data))
    elif damage == "truncate":
        r.set(kv_key, bytes(data[:-10]))
    elif damage == "drop_meta":
        r.delete(meta_key)
    elif damage == "drop_kv":
        r.delete(kv_key)
    else:
        r.set(meta_key, b"{not json")
    b = store_with(tmp_path / "b", redis_server.url, prefix=prefix)
    with caplog.at_level(logging.WARNING, logger="kvblend.kvstore.remote"):
        got = b.get(chunk.key, "cpu", build=builder(chunk, calls))
    assert got.built and got.outcome == "corrupt" and calls == [chunk.key]
    assert b.stats.corrupt == 1 and b.remote.stats["corrupt"] == 1
    assert "failed verification" in caplog.text
    assert torch.equal(got.chunk.kv, chunk.kv)
    c = store_with(tmp_path / "c", redis_server.url, prefix=prefix)  # the rewritten entry verifies
    healed = c.get(chunk.key, "cpu", build=builder(chunk, calls))
    assert healed.found_tier == "remote" and not healed.built and len(calls) == 1


def test_local_corrupt_file_is_healed_from_the_remote_tier(redis_server, tmp_path):
    chunk, calls = fake_chunk(3), []
    a = store_with(tmp_path / "a", redis_server.url, prefix="local:")
    a.put(chunk)
    path = a.disk.paths(chunk.key.digest)[0]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    fresh = store_with(tmp_path / "a", redis_server.url, prefix="local:")
    got = fresh.get(chunk.key, "cpu", build=builder(chunk, calls))
    assert got.found_tier == "remote" and not got.built and calls == [] and fresh.stats.corrupt == 1
    assert torch.equal(fresh.disk.read(chunk.key).kv, chunk.kv)  # the local file was rewritten


def test_ttl_and_byte_budget(redis_server, tmp_path):
    chunks = [fake_chunk(10 + i) for i in range(4)]
    size = len(store_with(tmp_path / "probe", redis_server.url).disk.encode(chunks[0])[0])
    store = store_with(tmp_path / "a", redis_server.url, budget=int(size * 2.5), ttl=300, prefix="budget:")
    for c in chunks:
        store.put(c)
    r = redis_server.client()
    assert 0 < r.ttl(f"budget:{chunks[-1].key}:kv") <= 300 and 0 < r.ttl(f"budget:{chunks[-1].key}:meta") <= 300
    held = [c for c in chunks if r.exists(f"budget:{c.key}:meta")]
    assert held == chunks[-2:] and store.remote.stats["evictions"] == 2  # oldest first
    assert store.remote.used_bytes() <= store.remote.budget_bytes


def test_unreachable_server_degrades_to_local_tiers(tmp_path, caplog):
    chunk, calls = fake_chunk(4), []
    store = store_with(tmp_path / "a", f"redis://127.0.0.1:{free_port()}/0", prefix="down:")
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="kvblend.kvstore.remote"):
        got = store.get(chunk.key, "gpu", build=builder(chunk, calls))
        again = store_with(tmp_path / "a", store.remote.url).get(chunk.key, "gpu", build=builder(chunk, calls))
    assert time.perf_counter() - t0 < 5
    assert got.built and again.found_tier == "disk" and calls == [chunk.key]
    assert store.remote.stats["unavailable"] >= 1 and store.summary()["remote"]["reachable"] is False
    assert sum("serving from the local tiers" in r.getMessage() for r in caplog.records) == 1  # one warning


def test_remote_store_setting_from_flag_env_and_toml(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('remote_store = "redis://10.0.0.5:6380/2"\nremote_ttl = 60\n')
    assert load_config(str(toml), environ={}).remote_store == "redis://10.0.0.5:6380/2"
    env = {"KVBLEND_REMOTE_STORE": "redis://cache:6379"}
    assert load_config(str(toml), environ=env).remote_store == "redis://cache:6379"
    assert load_config(str(toml), {"remote_store": "redis://x:1"}, environ=env).remote_store == "redis://x:1"
    for bad in ("http://host:6379", "redis://host:notaport", "redis://:6379", "redis://h:6379/db"):
        with pytest.raises(ConfigError, match="remote_store"):
            load_config(None, {"remote_store": bad}, environ={})
    assert redact("redis://user:secret@h:1/0") == "redis://user:***@h:1/0"


def test_bad_remote_url_on_the_command_line_is_one_line():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "kvblend.cli", "serve", "--remote-store", "http://h:1",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "remote_store" in proc.stderr


# two `kvblend serve` processes sharing one redis-server ------------------------------------------------------
DOCS = ["Remote tier document one: the Rhine flows into the North Sea.",
        "Remote tier document two: Lake Baikal is the deepest lake on Earth."]


def ask(srv, docs, question="Which lake is deepest?"):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    resp = client.chat.completions.create(model=srv.get_json("/v1/models")["data"][0]["id"],
                                          messages=[{"role": "user", "content": question}], max_tokens=4,
                                          temperature=0, extra_body={"documents": docs})
    return resp.usage.model_extra["kvblend"], resp.model_extra["kvblend"]["completion_token_ids"]


def serve(folder, root, name, url):
    return ServerProcess(["--model", str(folder), "--dtype", "float32", "--remote-store", url], root / f"{name}.log",
                         env={"KVBLEND_HOME": str(root / name)}, startup_timeout_s=180)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import conftest

    return conftest.make_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny-remote")


def test_second_process_finds_every_chunk_remote_and_builds_nothing(redis_server, tiny_folder, tmp_path):
    with serve(tiny_folder, tmp_path, "first", redis_server.url) as first:
        built, want = ask(first, DOCS)
    assert built["chunk_tiers"] == ["built (missing)"] * 2 and built["chunk_misses"] == 2
    with serve(tiny_folder, tmp_path, "second", redis_server.url) as second:
        got, tokens = ask(second, DOCS)
        m = parse_prometheus(second.get_text("/metrics"))
    assert got["chunk_tiers"] == ["remote", "remote"] and got["chunk_hits"]["remote"] == 2
    assert got["chunk_misses"] == 0 and got["build_ms"] == 0 and tokens == want
    assert m['kvblend_store_hits_total{tier="remote"}'] == 2 and m["kvblend_remote_reachable"] == 1


def test_redis_killed_mid_run_requests_still_answered(tiny_folder, tmp_path):
    redis = start_redis(tmp_path / "redis")
    try:
        with serve(tiny_folder, tmp_path, "killed", redis.url) as srv:
            first, _ = ask(srv, ["Killed test document A about copper."])
            redis.kill()
            second, _ = ask(srv, ["Killed test document B about tin."])
            again, _ = ask(srv, ["Killed test document B about tin."])
            m = parse_prometheus(srv.get_text("/metrics"))
            log_text = srv.log_tail(20000)
            redis.start()  # back on the same port: after the retry pause the tier is used again
            time.sleep(5.5)
            third, _ = ask(srv, ["Killed test document C about zinc."])
            rewritten = redis.client().hlen("kvblend:bytes")
    finally:
        redis.kill()
    assert first["chunk_tiers"] == ["built (missing)"]
    assert second["chunk_tiers"] == ["built (missing)"] and again["chunk_hits"]["gpu"] == 1
    assert m["kvblend_remote_unavailable_total"] >= 1 and m["kvblend_remote_reachable"] == 0
    assert "serving from the local tiers" in log_text and "Traceback" not in log_text
    assert third["chunk_tiers"] == ["built (missing)"] and rewritten == 1  # written to the restarted server
