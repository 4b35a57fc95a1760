"""Residency (kvstore/residency.py): one request's placement and pins. Chunk and byte budgets never exceeded, pins
never outliving a request (an exception included), promote / demote round trips, a corrupt chunk healed during
a promotion through the request's builder, plain Engine.answer honouring gpu_chunks."""

from __future__ import annotations

import logging
import random

import pytest
import torch

import kvblend.engine as engine_mod
from conftest import make_tiny
from kvblend.config import EngineConfig
from kvblend.engine import Engine, SpecOptions
from kvblend.errors import BudgetExceededError, ChunkMissingError, StoreError
from kvblend.fusion.layout import place
from kvblend.generation.promotion import Promoter
from kvblend.generation.sampling import SamplingParams
from kvblend.kvstore.builder import build_chunk_kv, chunk_nbytes
from kvblend.kvstore.residency import Residency
from test_blend import random_prompt
from test_store import fake_chunk, make_store

SAMPLING = SamplingParams(max_new_tokens=4, stop_on_newline=False)
LENS = (12, 15, 9, 14)


def _damage(store, key) -> None:
    """Leave the chunk on disk only and flip a byte of its file."""
    store.stage(key, "disk")
    path = store.disk.paths(key.digest)[0]
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x40
    path.write_bytes(bytes(data))


def _fake_residency(tmp_path, sizes, gpu_chunks, budget, scores=None, resident=None):
    chunks = [fake_chunk(i, n) for i, n in enumerate(sizes)]
    store = make_store(tmp_path, gpu=budget)
    for c in chunks:
        store.put(c, "cpu")
    scores = scores or [1.0 - 0.1 * i for i in range(len(chunks))]
    placement = place([c.key for c in chunks], sizes, scores, 0, len(chunks) if resident is None else resident)
    return chunks, store, Residency(store, placement.slots, gpu_chunks)


def test_budget_never_exceeded_in_chunks_or_bytes(tmp_path):
    rng = random.Random(0)
    sizes = [rng.randint(4, 40) for _ in range(8)]
    per_token = fake_chunk(0, 1).nbytes
    budget = 60 * per_token
    chunks, store, res = _fake_residency(tmp_path, sizes, gpu_chunks=3, budget=budget)
    with res:
        for i in res.resident:
            res.load(i)
        refused = 0
        for _ in range(200):
            i = rng.randrange(len(chunks))
            if res.is_resident(i):
                res.demote(i) if rng.random() < 0.5 else None
            elif res.can_promote(i):
                res.promote(i)
            else:
                refused += 1
                with pytest.raises(BudgetExceededError, match="does not fit"):
                    res.promote(i)
            assert len(res.resident) <= 3 and res.resident_bytes() <= budget
            assert sum(chunks[j].nbytes for j in res.resident) <= budget
            assert store.used_bytes()["gpu"] <= budget
            assert set(res.pinned) <= set(res.resident)
            assert all(store.is_pinned(chunks[j].key) == (j in res.pinned) for j in range(len(chunks)))
        assert refused > 0
    assert not any(store.is_pinned(c.key) for c in chunks)


def test_fewer_resident_when_gpu_chunks_exceed_the_byte_budget(tmp_path, caplog):
    per_token = fake_chunk(0, 1).nbytes
    with caplog.at_level(logging.WARNING, logger="kvblend.kvstore.residency"):
        _, _, res = _fake_residency(tmp_path, [10, 10, 10, 10], gpu_chunks=3, budget=25 * per_token,
                                    scores=[0.1, 0.9, 0.8, 0.2], resident=3)
    assert res.resident == (1, 2) and res.placeholders == (0, 3)  # the best two by score fit, not the third
    assert [s.tier for s in res.slots] == ["cpu", "gpu", "gpu", "cpu"]
    assert "made placeholders" in caplog.text
    assert res.free_chunks() == 1 and not res.can_promote(0)  # one chunk free by count, none by bytes


def test_promote_demote_round_trip(tmp_path):
    chunks, store, res = _fake_residency(tmp_path, [16, 16, 16], gpu_chunks=2, budget=10 * 2**20, resident=1)
    with res:
        for i in range(3):
            res.load(i)
        assert res.resident == (0,) and res.pinned == (0,) and store.tier_of(chunks[1].key) == "cpu"
        got = res.promote(1)
        assert got.outcome == "hit" and got.found_tier == "cpu" and torch.equal(got.chunk.kv, chunks[1].kv)
        assert res.resident == (0, 1) and store.is_pinned(chunks[1].key) and store.tier_of(chunks[1].key) == "gpu"
        with pytest.raises(ValueError, match="already resident"):
            res.promote(1)
        with pytest.raises(BudgetExceededError):
            res.promote(2)  # gpu_chunks 2 reached
        assert res.can_promote(2, without=[1])
        res.demote(1)
        assert res.placeholders == (1, 2) and not store.is_pinned(chunks[1].key)
        assert store.tier_of(chunks[1].key) == "cpu"  # its KV back on the CPU tier
        res.demote(1)  # a placeholder already: nothing to do
        assert torch.equal(res.promote(2).chunk.kv, chunks[2].kv) and res.resident == (0, 2)
    assert res.pinned == () and not any(store.is_pinned(c.key) for c in chunks)
    res.release()  # idempotent
    with pytest.raises(StoreError, match="released"):
        res.promote(1)


def test_pins_released_even_on_exception(tmp_path):
    chunks, store, res = _fake_residency(tmp_path, [8, 8, 8], gpu_chunks=3, budget=10 * 2**20)
    with pytest.raises(RuntimeError):
        with res:
            res.load(0)
            res.load(1)
            raise RuntimeError("the prefill failed")
    assert not any(store.is_pinned(c.key) for c in chunks)
    # a chunk that cannot be read leaves no pin either
    missing = fake_chunk(9, 8)
    lone = Residency(store, place([missing.key], [8], [1.0], 0, 1).slots, 1)
    with pytest.raises(ChunkMissingError):
        lone.load(0)
    assert not store.is_pinned(missing.key) and lone.pinned == ()


def test_corrupt_chunk_healed_during_a_promotion(tmp_path, tiny_llama):
    prompt = random_prompt(tiny_llama.shape.vocab_size, seed=4, chunk_lens=LENS)
    engine = Engine(EngineConfig(home=str(tmp_path)), model=tiny_llama)
    keys = engine.keys(prompt)
    placement = place(keys, LENS, [0.9, 0.8, 0.2, 0.1], len(prompt.prefix_ids), 2)
    with engine._residency(prompt, [""] * 4, placement, 2) as res:
        for i in range(4):
            assert res.load(i).outcome == "missing"  # built through the request's builders
        _damage(engine.store, keys[2])
        res.demote(1)
        got = res.promote(2)
        assert (got.outcome, got.built) == ("corrupt", True) and engine.store.stats.corrupt == 1
        want = build_chunk_kv(tiny_llama, prompt.chunk_ids[2], engine.chunk_context(prompt.prefix_ids))
        assert torch.equal(got.chunk.kv, want.kv) and res.resident == (0, 2)
        assert res.resident_bytes() == sum(chunk_nbytes(tiny_llama, LENS[i]) for i in (0, 2))
    assert not hasattr(engine, "_known") and not hasattr(engine.store, "builder")


@pytest.fixture()
def tiny_engine(tmp_path):
    model = make_tiny("llama")
    prompt = random_prompt(model.shape.vocab_size, seed=21, chunk_lens=(12, 15, 9, 14, 11, 13))
    engine = Engine(EngineConfig(home=str(tmp_path), max_new_tokens=12, stop_on_newline=False), model=model)
    return engine, prompt


def test_corrupt_chunk_found_by_a_speculative_promotion_heals_and_the_answer_goes_on(tiny_engine, monkeypatch):
    engine, prompt = tiny_engine
    scores = [0.9, 0.8, 0.5, 0.4, 0.3, 0.2]
    options = SpecOptions(gpu_chunks=2, drafter="ngram", proxy="ngram_source", threshold=0.5, k=2, pinned_top=1,
                          mode="reuse", warm_start=False)
    damaged: list[int] = []

    def scripted(self, state):  # slot 3 wanted from the first step on; its file goes bad just before
        if wanted_damage and not damaged:
            _damage(engine.store, self.slots[3].key)
            damaged.append(3)
        return {i: (1.0 if i == 3 else 0.1) for i in range(len(self.slots))}

    monkeypatch.setattr(Promoter, "_scores", scripted)
    wanted_damage = False
    ref, _, ref_trace, _ = engine.answer_speculative(prompt, None, scores, options, sampling=SAMPLING)
    wanted_damage = True
    out, _, trace, placement = engine.answer_speculative(prompt, None, scores, options, sampling=SAMPLING)
    assert damaged == [3] and engine.store.stats.corrupt == 1
    assert any(3 in t.promoted for t in trace) and out.token_ids == ref.token_ids
    assert [t.promoted for t in trace] == [t.promoted for t in ref_trace]
    assert all(len(t.gpu_chunks) <= 2 for t in trace)
    assert not any(engine.store.is_pinned(s.key) for s in placement.slots)


def test_speculative_pins_released_when_decoding_fails(tiny_engine, monkeypatch):
    engine, prompt = tiny_engine
    import kvblend.generation.speculative as spec_mod

    def boom(*args, **kwargs):
        raise RuntimeError("decode failed")

    monkeypatch.setattr(spec_mod, "speculative_generate", boom)
    with pytest.raises(RuntimeError, match="decode failed"):
        engine.answer_speculative(prompt, None, [0.9, 0.8, 0.5, 0.4, 0.3, 0.2],
                                  SpecOptions(gpu_chunks=2, proxy="key_bounds", mode="reuse"), sampling=SAMPLING)
    assert not any(engine.store.is_pinned(k) for k in engine.keys(prompt))


def _spy_prefill(monkeypatch, engine):
    """Record, at each prefill of a plain answer, the resident flags and which of the prompt's chunks are pinned."""
    seen: list[dict] = []
    real = engine_mod.prefill

    def spy(model, prompt, chunks=None, **kw):
        keys = engine.keys(prompt)
        seen.append({"resident": kw.get("resident"), "pinned": [engine.store.is_pinned(k) for k in keys],
                     "gpu_bytes": engine.store.used_bytes()["gpu"]})
        return real(model, prompt, chunks, **kw)

    monkeypatch.setattr(engine_mod, "prefill", spy)
    return seen


@pytest.mark.parametrize("mode", ["reuse", "blend"])
def test_plain_answer_honours_gpu_chunks(tmp_path, monkeypatch, mode):
    model = make_tiny("llama")
    prompt = random_prompt(model.shape.vocab_size, seed=5, chunk_lens=LENS)
    engine = Engine(EngineConfig(home=str(tmp_path), gpu_chunks=2, stop_on_newline=False), model=model)
    seen = _spy_prefill(monkeypatch, engine)
    out = engine.answer(prompt, mode=mode, sampling=SAMPLING, start_tier="cpu")
    assert seen[-1]["resident"] == [True, True, False, False] and seen[-1]["pinned"] == [True, True, False, False]
    assert out.chunk_tiers == ("cpu",) * 4  # placeholders fetched to the CPU tier, from the same start tier
    engine.answer(prompt, mode=mode, sampling=SAMPLING, scores=[0.1, 0.9, 0.8, 0.2])
    assert seen[-1]["resident"] == [False, True, True, False]
    assert not any(engine.store.is_pinned(k) for k in engine.keys(prompt))
    # the same placement as a speculative answer that never promotes: the same tokens
    spec, *_ = engine.answer_speculative(prompt, None, [0.9, 0.8, 0.2, 0.1],
                                         SpecOptions(gpu_chunks=2, drafter="none", proxy="none", mode=mode),
                                         sampling=SAMPLING)
    plain = engine.answer(prompt, mode=mode, sampling=SAMPLING)
    assert plain.token_ids == spec.token_ids
    every = Engine(EngineConfig(home=str(tmp_path), gpu_chunks=4, stop_on_newline=False), model=model)
    seen = _spy_prefill(monkeypatch, every)
    every.answer(prompt, mode=mode, sampling=SAMPLING)
    assert seen[-1]["resident"] is None and seen[-1]["pinned"] == [True] * 4  # all resident: the usual prefill


def test_plain_answer_keeps_to_the_gpu_byte_budget(tmp_path, monkeypatch, caplog):
    model = make_tiny("llama")
    prompt = random_prompt(model.shape.vocab_size, seed=5, chunk_lens=LENS)
    budget = chunk_nbytes(model, 15) + chunk_nbytes(model, 12)  # room for chunks 0 and 1, not a third
    engine = Engine(EngineConfig(home=str(tmp_path), gpu_chunks=4, gpu_budget=str(budget), stop_on_newline=False),
                    model=model)
    seen = _spy_prefill(monkeypatch, engine)
    with caplog.at_level(logging.WARNING, logger="kvblend.kvstore.residency"):
        out = engine.answer(prompt, mode="reuse", sampling=SAMPLING)  # used to raise BudgetExceededError
    assert seen[-1]["resident"] == [True, True, False, False] and seen[-1]["gpu_bytes"] <= budget
    assert "made placeholders" in caplog.text and len(out.token_ids) == 4
    assert not any(engine.store.is_pinned(k) for k in engine.keys(prompt))


def test_plain_answer_releases_pins_when_the_prefill_fails(tmp_path, monkeypatch):
    model = make_tiny("llama")
    prompt = random_prompt(model.shape.vocab_size, seed=5, chunk_lens=LENS)
    engine = Engine(EngineConfig(home=str(tmp_path), gpu_chunks=3, stop_on_newline=False), model=model)
    pinned: list[list[bool]] = []

    def boom(model, prompt, chunks=None, **kw):
        pinned.append([engine.store.is_pinned(k) for k in engine.keys(prompt)])
        raise RuntimeError("prefill failed")

    monkeypatch.setattr(engine_mod, "prefill", boom)
    with pytest.raises(RuntimeError, match="prefill failed"):
        engine.answer(prompt, mode="blend", sampling=SAMPLING)
    assert pinned == [[True, True, True, False]]
    assert not any(engine.store.is_pinned(k) for k in engine.keys(prompt))
