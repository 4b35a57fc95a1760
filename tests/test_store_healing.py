"""The chunk store heals: a sidecar that disagrees with its KV is corrupt (removed, rebuilt, counted), leftovers of
dead writers are swept at start-up, a disk that takes no writes degrades to the memory tiers, the disk budget is
capped by the free space, tenants' salts keep entries apart, entries expire (TTL, `kvblend store gc`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from kvblend.kvstore.builder import build_chunk_kv
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.kvstore.key import ChunkKey, token_hash
from kvblend.kvstore.retention import gc_chunks
from kvblend.kvstore.store import ChunkKVStore

MiB = 2**20
SHAPE = (2, 2, 8)  # layers, kv heads, head dim of fake_chunk


def fake_chunk(i: int, num_tokens: int = 16, salt: str = "") -> ChunkKV:
    ids = tuple(range(i * 1000, i * 1000 + num_tokens))
    return ChunkKV(ChunkKey("fake", "float32", token_hash(ids), salt), ids, torch.randn(2, 2, 2, num_tokens, 8))


def make_store(root, disk=100 * MiB) -> ChunkKVStore:
    return ChunkKVStore(root, MiB, MiB, disk, device="cpu", model_name="fake", chunk_shape=SHAPE)


def _edit_sidecar(store, chunk, edit) -> None:
    meta_path = store.disk.paths(chunk.key.digest)[1]
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("poison", ["token_ids", "tensor_dtype", "shape_vs_model"])
def test_a_sidecar_that_disagrees_with_its_kv_is_corrupt_and_rebuilt(tmp_path, poison):
    chunk = fake_chunk(1)
    make_store(tmp_path / "s").put(chunk)
    if poison == "token_ids":  # valid JSON, first id + 1 (the poisoned entry)
        _edit_sidecar(make_store(tmp_path / "s"), chunk, lambda m: m["token_ids"].__setitem__(0, m["token_ids"][0] + 1))
    elif poison == "tensor_dtype":
        _edit_sidecar(make_store(tmp_path / "s"), chunk, lambda m: m.update(tensor_dtype="bfloat16"))
    store = ChunkKVStore(tmp_path / "s", MiB, MiB, 100 * MiB, model_name="fake",
                         chunk_shape=(3, 2, 8) if poison == "shape_vs_model" else SHAPE)
    tensor_path, meta_path = store.disk.paths(chunk.key.digest)
    got = store.get(chunk.key, "cpu", build=lambda: chunk)
    assert got.outcome == "corrupt" and got.built and store.stats.corrupt == 1
    assert got.chunk.token_ids == chunk.token_ids and torch.equal(got.chunk.kv, chunk.kv)
    assert json.loads(meta_path.read_text())["token_ids"] == list(chunk.token_ids)  # rewritten, consistent
    assert tensor_path.exists()


def test_the_corrupt_error_names_the_file(tmp_path):
    from kvblend.errors import ChunkCorruptError

    chunk = fake_chunk(2)
    make_store(tmp_path / "s").put(chunk)
    store = make_store(tmp_path / "s")
    _edit_sidecar(store, chunk, lambda m: m["token_ids"].reverse())
    with pytest.raises(ChunkCorruptError) as exc:
        store.disk.load(chunk.key)
    assert str(store.disk.paths(chunk.key.digest)[0]) in str(exc.value) and "token ids" in str(exc.value)


def test_salts_keep_tenants_apart(tmp_path):
    store = make_store(tmp_path / "s")
    plain, a, b = fake_chunk(3), fake_chunk(3, salt="tenant-a"), fake_chunk(3, salt="tenant-b")
    assert len({plain.key.digest, a.key.digest, b.key.digest}) == 3
    store.put(a)
    assert a.key in store and b.key not in store and plain.key not in store
    assert store.fetch(b.key, "cpu").outcome == "missing"
    sidecar = store.disk.paths(a.key.digest)[1].read_text()
    assert "tenant-a" not in sidecar and json.loads(sidecar)["key"]["salted"] is True
    assert "tenant-a" not in repr(a.key)


def test_leftovers_of_dead_writers_are_removed_and_counted(tmp_path):
    store = make_store(tmp_path / "s")
    chunk = fake_chunk(4)
    store.put(chunk)
    shard = store.disk.paths(chunk.key.digest)[0].parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_tmp = shard / f".{chunk.key.digest}.safetensors.pid{int(dead.stdout)}.abc123.tmp"
    live_tmp = shard / f".{chunk.key.digest}.json.pid{os.getppid()}.def456.tmp"  # a live writer's: kept
    orphan = shard / ("ab" * 16 + ".safetensors")  # a tensor whose sidecar was never written
    for p in (dead_tmp, live_tmp, orphan):
        p.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    fresh = make_store(tmp_path / "s")
    assert fresh.stats.leftovers_removed == 2 and fresh.summary()["stats"]["leftovers_removed"] == 2
    assert not dead_tmp.exists() and not orphan.exists() and live_tmp.exists()
    assert fresh.get(chunk.key, "cpu").outcome == "hit"


def test_a_disk_that_takes_no_writes_degrades_to_memory(tmp_path):
    store = make_store(tmp_path / "s")
    chunk, other = fake_chunk(5), fake_chunk(6)
    blockers = {store.disk.paths(c.key.digest)[0].parent for c in (chunk, other)}
    for blocker in blockers:  # a file where the chunk's folder must go: every write there fails (a real OSError)
        blocker.write_bytes(b"")
    got = store.get(chunk.key, "gpu", build=lambda: chunk)
    assert got.built and torch.equal(got.chunk.kv, chunk.kv)
    assert store.tier_of(chunk.key) == "gpu" and chunk.key.digest not in store.disk
    assert store.stats.disk_write_errors == 1 and "disk writes failing" in store.summary()["disk_problem"]
    assert store.get(chunk.key, "gpu").outcome == "hit"  # answered from memory
    assert store.get(other.key, "disk", build=lambda: other).chunk is not None  # a disk put lands on the CPU tier
    assert store.tier_of(other.key) == "cpu"
    for blocker in blockers:
        blocker.unlink()
    third = fake_chunk(7)
    store.get(third.key, "cpu", build=lambda: third)
    assert store.disk_problem is None and third.key.digest in store.disk


def test_disk_budget_is_capped_by_the_free_space(tmp_path):
    store = ChunkKVStore(tmp_path / "s", MiB, MiB, 2**60, model_name="fake")
    free = shutil.disk_usage(tmp_path).free
    assert store.budgets()["disk"] <= free and store.budgets()["disk"] < 2**60
    assert store.disk.configured_budget_bytes == 2**60


def test_ttl_expires_unused_chunks_across_restarts(tmp_path):
    store = make_store(tmp_path / "s")
    old, new = fake_chunk(8), fake_chunk(9)
    store.put(old, "cpu")
    store.put(new, "cpu")
    meta = store.disk.paths(old.key.digest)[1]
    past = time.time() - 7200
    os.utime(meta, (past, past))
    fresh = make_store(tmp_path / "s")  # last use comes from the sidecar's mtime
    assert fresh.expire(3600) == 1 and fresh.stats.expired == 1
    assert old.key not in fresh and new.key in fresh and not meta.exists()


def test_gc_removes_chunks_older_than(tmp_path):
    root = tmp_path / "home" / "chunks" / "model" / "float32"
    store = make_store(root)
    old, new = fake_chunk(10), fake_chunk(11)
    store.put(old)
    store.put(new)
    past = time.time() - 3 * 86400
    os.utime(store.disk.paths(old.key.digest)[1], (past, past))
    result = gc_chunks(tmp_path / "home" / "chunks", older_than_s=86400)
    assert result.chunks == 1 and result.bytes > 0
    assert not any(p.exists() for p in store.disk.paths(old.key.digest))
    assert all(p.exists() for p in store.disk.paths(new.key.digest))


def test_real_chunk_round_trip_with_a_salt(tmp_path, tiny_llama):
    chunk = build_chunk_kv(tiny_llama, list(range(5, 20)), salt="s1")
    assert chunk.key.salt == "s1"
    store = ChunkKVStore(tmp_path / "s", MiB, MiB, 100 * MiB, model_name="tiny",
                         chunk_shape=(tiny_llama.shape.num_layers, tiny_llama.shape.num_kv_heads,
                                      tiny_llama.shape.head_dim))
    store.put(chunk)
    fresh = ChunkKVStore(tmp_path / "s", MiB, MiB, 100 * MiB, model_name="tiny",
                         chunk_shape=(tiny_llama.shape.num_layers, tiny_llama.shape.num_kv_heads,
                                      tiny_llama.shape.head_dim))
    assert fresh.get(chunk.key, "cpu").outcome == "hit"
