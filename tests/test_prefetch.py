"""Prefetch of the next sample's chunks while one decodes, and the cold / warm TTFT pair of the decode loop
(kvblend/pipeline/decode.py::answer_plans, Engine.prefetch, ChunkKVStore.prefetch): chunks found in the CPU tier,
budgets and pins held, the request in flight untouched, answers unchanged, opt-outs honoured."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import make_tiny
from kvblend.config import EngineConfig
from kvblend.engine import Engine
from kvblend.generation.sampling import SamplingParams
from kvblend.kvstore.tiers import MemoryTier
from kvblend.pipeline.decode import answer_plans
from kvblend.pipeline.plan import SamplePlan
from kvblend.types import PromptIds

SAMPLING = SamplingParams(max_new_tokens=4, stop_on_newline=False)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama")


def _plans(vocab: int, shared: bool = True) -> list[SamplePlan]:
    """Three samples of three chunks after one shared prefix; sample 1 shares its first chunk with sample 0."""
    g = torch.Generator().manual_seed(11)

    def ids(n):
        return tuple(torch.randint(0, vocab, (n,), generator=g).tolist())

    prefix = ids(5)
    chunks = [[ids(13), ids(9), ids(11)] for _ in range(3)]
    if shared:
        chunks[1][0] = chunks[0][0]
    plans = []
    for i, cs in enumerate(chunks):
        prompt = PromptIds(prefix, tuple(cs), ids(6))
        plans.append(SamplePlan(f"s/{i}", "q", (), prompt, tuple(f"chunk {i}.{j}" for j in range(3)),
                                tuple(f"p{i}{j}" for j in range(3)), (1.0, 0.5, 0.2)))
    return plans


def _engine(tiny, tmp_path, **kw) -> Engine:
    return Engine(EngineConfig(home=str(tmp_path), stop_on_newline=False, **kw), model=tiny)


def test_prefetch_makes_next_samples_chunks_found_in_cpu_tier_and_answers_do_not_change(tiny, tmp_path):
    plans = _plans(tiny.shape.vocab_size)
    engine = _engine(tiny, tmp_path)
    runs = {pf: answer_plans(engine, plans, "blend", SAMPLING, "disk", progress=False, prefetch=pf, warm=pf)
            for pf in (False, True)}
    cold, pre = runs[False], runs[True]
    for got in cold:  # --no-prefetch: every sample truly cold
        assert got.out.chunk_tiers == ("disk",) * 3 and got.prefetched == 0
    assert pre[0].out.chunk_tiers == ("disk",) * 3  # nothing to prefetch before the first sample
    # sample 1 shares chunk 0 with sample 0 (left where sample 0 left it: GPU); the others were prefetched
    assert pre[1].out.chunk_tiers == ("gpu", "cpu", "cpu") and pre[1].prefetched == 2
    assert pre[2].out.chunk_tiers == ("cpu",) * 3 and pre[2].prefetched == 3
    assert all(p.prefetch_wait_ms >= 0 for p in pre)
    for a, b in zip(cold, pre):  # same bytes wherever they are found: same answers
        assert a.out.token_ids == b.out.token_ids
    assert engine.store.stats.prefetched == 5 and engine.store.stats.corrupt == 0
    assert engine.store.stats.bytes_moved["disk->cpu"] > 0


def test_prefetch_only_from_disk_start_tier(tiny, tmp_path):
    plans = _plans(tiny.shape.vocab_size)
    engine = _engine(tiny, tmp_path)
    for got in answer_plans(engine, plans, "reuse", SAMPLING, "cpu", progress=False, prefetch=True):
        assert got.out.chunk_tiers == ("cpu",) * 3 and got.prefetched == 0
    assert engine.store.stats.prefetched == 0


def test_prefetch_respects_budgets_and_never_evicts_the_request_in_flight(tiny, tmp_path, monkeypatch):
    plans = _plans(tiny.shape.vocab_size, shared=False)
    engine = _engine(tiny, tmp_path)
    answer_plans(engine, plans, "reuse", SAMPLING, "disk", progress=False)  # builds every chunk
    sizes = [engine.store.disk.nbytes(k.digest) for k in engine.keys(plans[1].prompt)]
    assert sizes[0] > sizes[1] and sizes[2] > sizes[1]  # 13, 9, 11 tokens
    over: list[str] = []
    real_put = MemoryTier.put

    def checked_put(self, chunk):
        local = real_put(self, chunk)
        if self.used_bytes > self.budget_bytes:
            over.append(f"{self.name}: {self.used_bytes} > {self.budget_bytes}")
        return local

    monkeypatch.setattr(MemoryTier, "put", checked_put)
    # the CPU tier holds the biggest chunk plus the smallest, not all three
    cpu = engine.store.tiers["cpu"]
    cpu.budget_bytes = sizes[0] + sizes[1] + 1
    for tier in engine.store.tiers.values():
        for digest in list(tier.lru_digests()):
            tier.remove(digest)
    keys0, keys1 = engine.keys(plans[0].prompt), engine.keys(plans[1].prompt)
    # the request in flight (plan 0) holds its first chunk in the CPU tier: the prefetch must not evict it
    engine.store.fetch(keys0[0], "cpu")
    engine.store.pin(keys0[1])
    engine.store.fetch(keys0[1], "cpu")
    made = engine.prefetch(plans[1].prompt, plans[1].chunk_texts, keep=keys0[:1]).result()
    assert keys0[0].digest in cpu and keys0[1].digest in cpu  # kept and pinned: still there
    assert cpu.used_bytes <= cpu.budget_bytes and not over
    assert made == []  # nothing fits beside what is kept and pinned: skipped, no error
    engine.store.unpin(keys0[1])
    # with nothing protected, LRU chunks make way; still within the budget
    made = engine.prefetch(plans[1].prompt, plans[1].chunk_texts).result()
    assert cpu.used_bytes <= cpu.budget_bytes and not over
    assert made == keys1[:2] and set(cpu.lru_digests()) == {k.digest for k in keys1[:2]}  # the third: no room


def test_prefetch_never_prefetches_or_restages_the_request_in_flight(tiny, tmp_path):
    plans = _plans(tiny.shape.vocab_size)
    engine = _engine(tiny, tmp_path)
    for p in plans[:2]:
        engine.stage(p.prompt, p.chunk_texts, "disk")
    keys0 = engine.keys(plans[0].prompt)
    made = engine.prefetch(plans[1].prompt, plans[1].chunk_texts, keep=keys0).result()
    assert keys0[0] not in made and len(made) == 2  # the shared chunk is the request in flight's to fetch
    assert engine.store.tier_of(keys0[0]) == "disk"


def test_prefetch_of_a_corrupt_file_leaves_it_for_the_request(tiny, tmp_path):
    plans = _plans(tiny.shape.vocab_size, shared=False)
    engine = _engine(tiny, tmp_path)
    engine.stage(plans[0].prompt, plans[0].chunk_texts, "disk")
    key = engine.keys(plans[0].prompt)[1]
    path = engine.store.disk.paths(key.digest)[0]
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x40
    path.write_bytes(bytes(data))
    made = engine.prefetch(plans[0].prompt, plans[0].chunk_texts).result()
    assert key not in made and len(made) == 2 and engine.store.stats.corrupt == 0
    out = engine.answer(plans[0].prompt, plans[0].chunk_texts, mode="reuse", sampling=SAMPLING)
    assert out.chunk_tiers == ("cpu", "built (corrupt)", "cpu") and engine.store.stats.corrupt == 1


def test_store_verbs_and_prefetch_from_two_threads_keep_the_store_consistent(tiny, tmp_path):
    plans = _plans(tiny.shape.vocab_size, shared=False)
    engine = _engine(tiny, tmp_path)
    answer_plans(engine, plans, "reuse", SAMPLING, "disk", progress=False)
    keys = [k for p in plans for k in engine.keys(p.prompt)]
    store = engine.store
    store.tiers["cpu"].budget_bytes = 4 * max(store.disk.nbytes(k.digest) for k in keys)
    stop, errors = threading.Event(), []

    def churn():
        try:
            while not stop.is_set():
                for k in keys[:3]:
                    store.stage(k, "disk")
                    store.fetch(k, "gpu")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(20):
            for k in keys[3:]:
                store.stage(k, "disk")
            store.prefetch(keys[3:], "cpu", keep=keys[:3])
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    for name, tier in store.tiers.items():
        assert tier.used_bytes == sum(tier.nbytes(d) for d in tier.lru_digests()) <= tier.budget_bytes, name


def test_warm_pass_records_gpu_resident_ttft_beside_the_cold_one(tiny, tmp_path):
    plans = _plans(tiny.shape.vocab_size)
    engine = _engine(tiny, tmp_path)
    for mode in ("full", "blend"):
        got = answer_plans(engine, plans, mode, SAMPLING, "disk", progress=False, warm=True, prefetch=False)
        for g in got:
            assert g.warm is not None and g.warm.ttft_ms > 0
            if mode == "full":
                assert g.warm is g.out  # full prefill fetches nothing: its warm TTFT is its cold one
            else:
                assert g.out.chunk_tiers == ("disk",) * 3 and g.warm.chunk_tiers == ("gpu",) * 3
                assert len(g.warm.token_ids) == 1 and len(g.out.token_ids) == 4  # answers from the cold pass
    skipped = answer_plans(engine, plans, "blend", SAMPLING, "disk", progress=False)
    assert all(g.warm is None for g in skipped)
