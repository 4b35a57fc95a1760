"""Chunk KV store: round trip, verification, atomic writes, budgets, pins, placement."""

from __future__ import annotations

import os
import random

import pytest
import torch

from kvblend.errors import BudgetExceededError, ChunkMissingError, StoreError
from kvblend import io as io_mod
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
    got = fresh.get(chunk.key, tier="gpu").chunk
    assert torch.equal(got.kv, chunk.kv) and got.token_ids == chunk.token_ids
    assert got.text == ""  # the sidecar keeps token ids and a hash of the text, not the text
    assert fresh.tier_of(chunk.key) == "gpu"
    import hashlib
    import json
    meta = json.loads(fresh.disk.paths(chunk.key.digest)[1].read_text())
    for field in ("text_sha256", "token_ids", "num_tokens", "nbytes", "layout", "created_at", "file_sha256", "shape"):
        assert field in meta
    assert "text" not in meta and "some text" not in fresh.disk.paths(chunk.key.digest)[1].read_text()
    assert meta["text_sha256"] == hashlib.sha256(b"some text").hexdigest()
    assert meta["layout"] == "2LHTD" and meta["num_tokens"] == 25
    for p in fresh.disk.paths(chunk.key.digest):
        assert p.stat().st_mode & 0o777 == 0o600
    kept = ChunkKVStore(tmp_path / "with-text", MiB, MiB, 100 * MiB, model_name="fake", store_text=True)
    kept.put(chunk)
    again = ChunkKVStore(tmp_path / "with-text", MiB, MiB, 100 * MiB, model_name="fake", store_text=True)
    assert again.get(chunk.key, tier="cpu").chunk.text == "some text"


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
    got = store.fetch(chunk.key)
    assert (got.chunk, got.outcome, got.found_tier) == (None, "corrupt", None)
    assert store.stats.corrupt == 1 and sum(store.stats.hits.values()) == 0  # corrupt is never a hit
    assert not tensor_path.exists() and not meta_path.exists()  # never used again
    with pytest.raises(ChunkMissingError):
        store.get(chunk.key)  # the file is gone and no builder was passed
    built = []
    store2 = make_store(tmp_path)
    store2.put(chunk)
    data = bytearray(tensor_path.read_bytes())
    data[-5] ^= 0x01
    tensor_path.write_bytes(bytes(data))
    store3 = make_store(tmp_path)
    got = store3.get(chunk.key, build=lambda: built.append(1) or chunk).chunk
    assert built == [1] and torch.equal(got.kv, chunk.kv) and store3.stats.corrupt == 1


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    chunk = fake_chunk(2)
    store = make_store(tmp_path)

    def boom(fd):
        raise KeyboardInterrupt("killed during write")

    monkeypatch.setattr(io_mod.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        store.put(chunk)
    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert leftovers == []
    monkeypatch.setattr(io_mod.os, "fsync", os.fsync)
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


def test_placement_top_k_and_placeholders():
    from kvblend.fusion.layout import place

    chunks = [fake_chunk(i, n) for i, n in enumerate([10, 20, 30, 40])]
    placement = place([c.key for c in chunks], [c.num_tokens for c in chunks], [0.1, 0.9, 0.5, 0.2],
                      first_position=7, gpu_chunks=2)
    assert [s.tier for s in placement.slots] == ["cpu", "gpu", "gpu", "cpu"]
    assert [s.start for s in placement.slots] == [7, 17, 37, 67]  # placeholders keep their ranges
    assert {s.index for s in placement.placeholders} == {0, 3}
    assert [s.index for s in place([c.key for c in chunks], [1] * 4, [0.5] * 4, 0, 3).resident] == [0, 1, 2]


def test_fetch_outcomes_missing_hit_and_tier(tmp_path):
    chunk = fake_chunk(3)
    store = make_store(tmp_path)
    assert store.lookup(chunk.key) is None
    got = store.fetch(chunk.key)
    assert (got.outcome, got.chunk) == ("missing", None) and store.stats.misses == 2
    store.put(chunk)
    fresh = make_store(tmp_path)
    got = fresh.fetch(chunk.key, tier="gpu")
    assert (got.outcome, got.found_tier) == ("hit", "disk") and torch.equal(got.chunk.kv, chunk.kv)
    assert fresh.fetch(chunk.key, tier="gpu").found_tier == "gpu"
    assert fresh.stats.hits == {"disk": 1, "gpu": 1} and fresh.stats.misses == 0


def test_get_builds_only_missing_or_corrupt(tmp_path):
    chunk = fake_chunk(4)
    store = make_store(tmp_path)
    built = []
    build = lambda: built.append(1) or chunk  # noqa: E731
    first = store.get(chunk.key, "cpu", build=build)
    assert (first.outcome, first.built) == ("missing", True) and built == [1] and store.stats.built == 1
    again = store.get(chunk.key, "cpu", build=build)
    assert (again.outcome, again.built, again.found_tier) == ("hit", False, "cpu") and built == [1]
    fresh = make_store(tmp_path)
    tensor_path = fresh.disk.paths(chunk.key.digest)[0]
    tensor_path.write_bytes(tensor_path.read_bytes()[:-3])
    healed = fresh.get(chunk.key, "gpu", build=build)
    assert (healed.outcome, healed.built) == ("corrupt", True) and built == [1, 1]
    assert fresh.stats.corrupt == 1 and fresh.stats.built == 1 and not fresh.stats.hits
    assert make_store(tmp_path).fetch(chunk.key).outcome == "hit"  # the rebuilt file verifies


def test_budget_exceeded_is_never_a_rebuild(tmp_path):
    big = fake_chunk(5, 64)
    store = make_store(tmp_path, gpu=big.nbytes - 1)
    store.put(big)  # on disk: the GPU tier cannot hold it
    built = []
    with pytest.raises(BudgetExceededError):
        store.get(big.key, "gpu", build=lambda: built.append(1) or big)
    with pytest.raises(BudgetExceededError):
        store.get(big.key, tier="gpu")
    assert built == [] and store.stats.built == 0 and store.stats.misses == 0 and store.stats.corrupt == 0


def test_get_heals_a_corrupt_chunk_through_the_builder_passed_and_raises_without_one(tmp_path):
    from kvblend.errors import ChunkCorruptError

    chunk = fake_chunk(6)
    make_store(tmp_path).put(chunk)

    def damaged_store():
        store = make_store(tmp_path)
        tensor_path = store.disk.paths(chunk.key.digest)[0]
        data = bytearray(tensor_path.read_bytes())
        data[-1] ^= 0x10
        tensor_path.write_bytes(bytes(data))
        return store

    with pytest.raises(ChunkCorruptError, match="no builder"):
        damaged_store().get(chunk.key, tier="cpu")
    make_store(tmp_path).put(chunk)
    store = damaged_store()
    assert not hasattr(store, "builder")  # the store calls back into nobody
    got = store.get(chunk.key, tier="cpu", build=lambda: chunk)
    assert (got.outcome, got.built) == ("corrupt", True) and torch.equal(got.chunk.kv, chunk.kv)
    assert store.stats.corrupt == 1 and store.stats.built == 1
    assert store.tier_of(chunk.key) == "cpu" and store.stats.build_ms > 0 and got.build_ms > 0


def test_stored_nbytes(tmp_path):
    chunk = fake_chunk(8)
    store = make_store(tmp_path)
    assert store.stored_nbytes(chunk.key) == 0
    store.put(chunk)
    assert store.stored_nbytes(chunk.key) == chunk.nbytes  # on disk
    store.fetch(chunk.key, "gpu")
    assert store.stored_nbytes(chunk.key) == chunk.nbytes


@pytest.mark.parametrize("tier", ["gpu", "cpu", "disk"])
def test_stage_leaves_the_chunk_on_exactly_that_tier(tmp_path, tier):
    chunk = fake_chunk(7)
    store = make_store(tmp_path)
    store.put(chunk, "gpu")
    store.stage(chunk.key, tier)
    assert store.tier_of(chunk.key) == tier
    assert store.fetch(chunk.key, "gpu").found_tier == tier
    store.stage(chunk.key, "disk")
    store.stage(chunk.key, tier)  # and back up from disk (a verified read)
    assert store.tier_of(chunk.key) == tier
    store.pin(chunk.key)
    with pytest.raises(StoreError, match="pinned"):
        store.stage(chunk.key, tier)
