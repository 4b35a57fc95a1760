"""Chunk KV store: round trip, verification, atomic writes, budgets, pins, placement."""

from __future__ import annotations

import os
import random

import pytest
import torch

from kvblend.errors import BudgetExceededError, ChunkCorruptError
from kvblend.kvstore import tiers as tiers_mod
from kvblend.kvstore.builder import build_chunk_kv
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.kvstore.key import ChunkKey, token_hash
from kvblend.kvstore.store import ChunkKVStore

MiB = 2**20


def fake_chunk(i: int, num_tokens: int = 16) -> ChunkKV:
    ids = tuple(range(i * 1000, i * 1000 + num_tokens))
    kv = torch.randn(2, 2, 2, num_tokens, 8)
    return ChunkKV(ChunkKey("fake", "float32", token_hash(ids)), ids, kv)


def make_store(tmp_path, gpu=10 * MiB, cpu=10 * MiB, disk=100 * MiB) -> ChunkKVStore:
    return ChunkKVStore(tmp_path / "store", gpu, cpu, disk, device="cpu", model_name="fake")


def test_key_is_content_addressed():
    a = ChunkKey("m", "float32", token_hash([1, 2, 3]))
    assert a == ChunkKey("m", "float32", token_hash([1, 2, 3]))
    assert a.digest != ChunkKey("m", "bfloat16", token_hash([1, 2, 3])).digest
    assert a.digest != ChunkKey("m2", "float32", token_hash([1, 2, 3])).digest
    assert token_hash([1, 2, 3]) != token_hash([1, 2, 4]) != token_hash([1, 2, 3], sink_ids=[1])


def test_round_trip_with_metadata(tmp_path, tiny_llama):
    chunk = build_chunk_kv(tiny_llama, list(range(5, 30)), text="some text")
    store = make_store(tmp_path)
    store.put(chunk)
    fresh = make_store(tmp_path)  # a new process: nothing in memory
    assert fresh.tier_of(chunk.key) == "disk"
    got = fresh.get(chunk.key, tier="gpu")
    assert torch.equal(got.kv, chunk.kv) and got.token_ids == chunk.token_ids and got.text == "some text"
    assert fresh.tier_of(chunk.key) == "gpu"
    import json
    meta = json.loads(fresh.disk.paths(chunk.key.digest)[1].read_text())
    for field in ("text", "token_ids", "num_tokens", "nbytes", "layout", "created_at", "file_sha256", "shape"):
        assert field in meta
    assert meta["layout"] == "2LHTD" and meta["num_tokens"] == 25


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_tensor", "garbage_json"])
def test_corrupt_file_is_reported_and_rebuilt(tmp_path, damage):
    chunk = fake_chunk(1)
    make_store(tmp_path).put(chunk)
    store = make_store(tmp_path)
    tensor_path, meta_path = store.disk.paths(chunk.key.digest)
    if damage == "flip":
        data = bytearray(tensor_path.read_bytes())
        data[-5] ^= 0x01
        tensor_path.write_bytes(bytes(data))
    elif damage == "truncate":
        tensor_path.write_bytes(tensor_path.read_bytes()[:100])
    elif damage == "delete_tensor":
        tensor_path.unlink()
    else:
        meta_path.write_text("{not json")
    with pytest.raises(ChunkCorruptError, match="corrupt chunk file"):
        store.get(chunk.key)
    assert not tensor_path.exists() and not meta_path.exists()  # never used again
    built = []
    store2 = make_store(tmp_path)
    store2.put(chunk)
    data = bytearray(tensor_path.read_bytes())
    data[-5] ^= 0x01
    tensor_path.write_bytes(bytes(data))
    store3 = make_store(tmp_path)
    got = store3.get_or_build(chunk.key, lambda: built.append(1) or chunk)
    assert built == [1] and torch.equal(got.kv, chunk.kv) and store3.stats.corrupt == 1


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    chunk = fake_chunk(2)
    store = make_store(tmp_path)

    def boom(fd):
        raise KeyboardInterrupt("killed during write")

    monkeypatch.setattr(tiers_mod.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        store.put(chunk)
    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert leftovers == []
    monkeypatch.setattr(tiers_mod.os, "fsync", os.fsync)
    assert chunk.key not in make_store(tmp_path)


def test_budgets_never_exceeded_and_pins_never_evicted(tmp_path):
    rng = random.Random(0)
    sizes = [rng.randint(4, 64) for _ in range(60)]
    chunks = [fake_chunk(i, n) for i, n in enumerate(sizes)]
    budget = 6 * chunks[0].kv.element_size() * 2 * 2 * 2 * 64 * 8 // 4
    store = make_store(tmp_path, gpu=budget, cpu=budget)
    pinned = chunks[0]
    store.put(pinned, "gpu")
    store.pin(pinned.key)
    for c in chunks[1:]:
        try:
            store.put(c, tier=rng.choice(["gpu", "cpu"]))
            if rng.random() < 0.5:  # promote an earlier chunk (from cpu or disk)
                store.get(rng.choice(chunks[1:chunks.index(c) + 1]).key, tier="gpu")
        except BudgetExceededError:
            pass  # allowed: the pinned chunk leaves too little room
        used = store.used_bytes()
        assert used["gpu"] <= budget and used["cpu"] <= budget
        assert store.tier_of(pinned.key) == "gpu"
    assert store.stats.evictions["gpu"] > 0


def test_all_pinned_gives_budget_error(tmp_path):
    a, b = fake_chunk(1, 32), fake_chunk(2, 32)
    store = make_store(tmp_path, gpu=a.nbytes + 10)
    store.put(a, "gpu")
    store.pin(a.key)
    with pytest.raises(BudgetExceededError, match="pinned"):
        store.put(b, "gpu")
    store.unpin(a.key)
    store.put(b, "gpu")
    assert store.tier_of(b.key) == "gpu" and store.tier_of(a.key) == "cpu"  # demoted, not lost


def test_chunk_larger_than_budget(tmp_path):
    big = fake_chunk(1, 64)
    store = make_store(tmp_path, gpu=big.nbytes - 1)
    with pytest.raises(BudgetExceededError, match="exceeds the whole budget"):
        store.put(big, "gpu")


def test_placement_top_k_and_placeholders(tmp_path):
    chunks = [fake_chunk(i, n) for i, n in enumerate([10, 20, 30, 40])]
    store = make_store(tmp_path)
    for c in chunks:
        store.put(c)
    placement = store.place([c.key for c in chunks], [c.num_tokens for c in chunks], [0.1, 0.9, 0.5, 0.2],
                            first_position=7, top_k=2)
    assert [s.tier for s in placement.slots] == ["cpu", "gpu", "gpu", "cpu"]
    assert [s.start for s in placement.slots] == [7, 17, 37, 67]  # placeholders keep their ranges
    assert {s.index for s in placement.placeholders} == {0, 3}
    assert all(store.is_pinned(s.key) for s in placement.resident)
    assert store.tier_of(chunks[0].key) == "cpu" and store.tier_of(chunks[1].key) == "gpu"
    store.release(placement)
    assert not any(store.is_pinned(c.key) for c in chunks)
