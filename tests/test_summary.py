"""Chunk key summaries (kvstore/summary.py) and look before loading (Engine._look, Promoter.look)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from kvblend.config import EngineConfig
from kvblend.engine import Engine, SpecOptions
from kvblend.generation.promotion import summary_shares
from kvblend.generation.sampling import SamplingParams
from kvblend.kvstore.builder import build_chunk_kv
from kvblend.kvstore.summary import SummaryStore, chunk_bounds, summarize
from kvblend.model.rope import apply_rope, rerotate, rope_cos_sin
from test_blend import random_prompt

GREEDY = SamplingParams(max_new_tokens=12, stop_on_newline=False)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_summary_bound_covers_every_key_at_its_prompt_position(family):
    model = make_tiny(family)
    s = model.shape
    sink, ids = (3, 4), tuple(range(10, 47))  # 37 tokens: a partial last page; cached at local positions 2..
    chunk = build_chunk_kv(model, ids, sink)
    summary = summarize(chunk, range(s.num_layers), page_tokens=8)
    g = torch.Generator().manual_seed(0)
    for start in (5, 130):  # the chunk placed at prompt rows start.., the queries after it
        q_pos = torch.arange(start + len(ids), start + len(ids) + 6)
        cos, sin = rope_cos_sin(model.inv_freq, q_pos, torch.float32)
        queries = [apply_rope(torch.randn(s.num_heads, 6, s.head_dim, generator=g) * 3, cos, sin)
                   for _ in range(s.num_layers)]
        ub = chunk_bounds(queries, summary, start, model.inv_freq, model.attn_scale)  # [L, H, T]
        group = s.num_heads // s.num_kv_heads
        for layer in range(s.num_layers):
            k = rerotate(chunk.k[layer], start - chunk.rope_offset, model.inv_freq).repeat_interleave(group, 0)
            true = torch.einsum("htd,hnd->htn", queries[layer], k).amax(-1) * model.attn_scale  # [H, T]
            assert bool((ub[layer] >= true - 1e-4).all()), (start, layer, float((true - ub[layer]).max()))
            assert bool((ub[layer] < true.abs() * 50 + 50).all())  # a bound, not infinity
    # rotating the box instead of the query would be wrong: the bound depends on where the chunk is placed
    assert not torch.allclose(chunk_bounds(queries, summary, 5, model.inv_freq, 1.0),
                              chunk_bounds(queries, summary, 130, model.inv_freq, 1.0))


def test_summary_saved_verified_and_rebuilt_when_corrupt(tmp_path):
    model = make_tiny("llama")
    chunk = build_chunk_kv(model, tuple(range(5, 40)), (1,))
    layers = (1, 3)
    first = SummaryStore(tmp_path, "cpu", layers).put(chunk)
    again = SummaryStore(tmp_path, "cpu", layers)
    got = again.get(lambda: chunk, chunk.key.digest)
    assert again.stats.loaded == 1 and again.stats.built == 0
    assert torch.equal(got.kmin, first.kmin) and torch.equal(got.kmax, first.kmax)
    path = again.path(chunk.key.digest)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the tensor data
    path.write_bytes(bytes(data))
    third = SummaryStore(tmp_path, "cpu", layers)
    healed = third.get(lambda: chunk, chunk.key.digest)
    assert third.stats.corrupt == 1 and third.stats.built == 1
    assert torch.equal(healed.kmax, first.kmax) and path.exists()
    other = SummaryStore(tmp_path, "cpu", (0, 2))  # other layers asked for: rebuilt, not misused
    assert other.get(lambda: chunk, chunk.key.digest).layers == (0, 2) and other.stats.built == 1
    assert 0 < first.nbytes < chunk.nbytes / 4


def test_summary_shares_sum_to_one_and_rank_a_copied_chunk():
    model = make_tiny("llama")
    chunks = [build_chunk_kv(model, tuple(range(a, a + 20))) for a in (10, 60, 110)]
    summaries = {i: (summarize(c, range(model.shape.num_layers)), 3 + 20 * i) for i, c in enumerate(chunks)}
    # queries equal to chunk 1's own keys (placed) point at chunk 1
    k = [rerotate(chunks[1].k[layer], 23, model.inv_freq).repeat_interleave(2, 0)[:, :4] * 4
         for layer in range(model.shape.num_layers)]
    shares = summary_shares(k, summaries, model)
    assert abs(sum(shares.values()) - 1) < 1e-5 and max(shares, key=shares.get) == 1


@pytest.fixture()
def engine6(tmp_path):
    model = make_tiny("llama")
    prompt = random_prompt(model.shape.vocab_size, seed=21, chunk_lens=(12, 15, 9, 14, 11, 13))
    chunk_bytes = max(len(c) for c in prompt.chunk_ids) * 2 * 4 * 2 * 16 * 4
    config = EngineConfig(home=str(tmp_path), gpu_budget=str(2 * chunk_bytes), stop_on_newline=False)
    return Engine(config, model=model), prompt, 2 * chunk_bytes


def test_look_with_every_chunk_resident_is_the_plain_blend(tmp_path):
    model = make_tiny("llama")
    prompt = random_prompt(model.shape.vocab_size, seed=5, chunk_lens=(12, 15, 9, 14))
    engine = Engine(EngineConfig(home=str(tmp_path), stop_on_newline=False), model=model)
    scores = [0.9, 0.8, 0.5, 0.4]
    common = dict(gpu_chunks=4, drafter="ngram", mode="blend", k=3, warm_start=False)
    plain, *_ = engine.answer_speculative(prompt, None, scores, SpecOptions(proxy="none", **common), sampling=GREEDY)
    out, _, trace, _ = engine.answer_speculative(prompt, None, scores, SpecOptions(proxy="key_bounds", look=True,
                                                                                  **common), sampling=GREEDY)
    assert trace[0].step == -1 and not trace[0].promoted and not trace[0].demoted
    assert out.token_ids == plain.token_ids
    assert engine.summaries.stats.built == 4  # built with the chunks, once


def test_look_result_equals_blend_with_that_placement_and_budgets_hold(engine6):
    engine, prompt, budget = engine6
    scores = [0.9, 0.8, 0.5, 0.4, 0.3, 0.2]
    common = dict(gpu_chunks=2, drafter="none", mode="blend", k=0, warm_start=False, pinned_top=1)
    one = SamplingParams(max_new_tokens=1, stop_on_newline=False)
    look = SpecOptions(proxy="key_bounds", look=True, threshold=0.0, **common)
    _, _, trace, _ = engine.answer_speculative(prompt, None, scores, look, sampling=one)
    worst = min(range(1, 6), key=lambda i: trace[0].scores[i])  # start with the least-scored chunk resident
    scores = [1.0 if i in (0, worst) else 0.1 * (6 - i) / 6 for i in range(6)]
    out, _, trace, placement = engine.answer_speculative(prompt, None, scores, look, sampling=one)
    looked = trace[0]
    assert looked.demoted == [worst]
    assert looked.step == -1 and looked.promoted and 0 in looked.gpu_chunks  # swapped one in, kept the pinned
    for t in trace:
        assert len(t.gpu_chunks) <= 2 and t.gpu_bytes <= budget
    # the same placement from the start (scores that make those chunks the top 2): the same first token
    same = [1.0 if i in looked.gpu_chunks else 0.1 * (6 - i) / 6 for i in range(6)]
    ref, *_ = engine.answer_speculative(prompt, None, same, SpecOptions(proxy="none", **common), sampling=one)
    assert out.token_ids == ref.token_ids
    assert not any(engine.store.is_pinned(s.key) for s in placement.slots)


def test_look_and_promote_keep_budgets_over_a_long_answer(engine6):
    engine, prompt, budget = engine6
    out, steps, trace, placement = engine.answer_speculative(
        prompt, None, [0.9, 0.8, 0.5, 0.4, 0.3, 0.2],
        SpecOptions(gpu_chunks=2, drafter="ngram", proxy="key_bounds", look=True, threshold=0.0, k=3,
                    warm_start=False, mode="reuse"), sampling=SamplingParams(max_new_tokens=30, stop_on_newline=False))
    assert len(out.token_ids) == 30 and trace[0].step == -1
    for t in trace:
        assert len(t.gpu_chunks) <= 2 and t.gpu_bytes <= budget and 0 in t.gpu_chunks
    assert engine.store.used_bytes()["gpu"] <= budget
    assert not any(engine.store.is_pinned(s.key) for s in placement.slots)


def test_speculative_with_summary_promotions_equals_plain_greedy_with_the_same_moves(engine6):
    """The real key-summary Promoter (look + decode-time promotions and demotions, n-gram drafts) emits exactly
    what plain greedy decoding emits when it applies the same moves at the same cache lengths (reuse mode)."""
    from kvblend.fusion.blend import prefill
    from kvblend.fusion.placement import promote_chunk
    from kvblend.model.layers import forward_tokens

    engine, prompt, _ = engine6
    params = SamplingParams(max_new_tokens=30, stop_on_newline=False)
    out, steps, trace, placement = engine.answer_speculative(
        prompt, None, [0.9, 0.8, 0.5, 0.4, 0.3, 0.2],
        SpecOptions(gpu_chunks=2, drafter="ngram", proxy="key_bounds", look=True, threshold=0.0, k=3,
                    warm_start=False, mode="reuse"), sampling=params)
    decode = [t for t in trace if t.step >= 0]
    assert sum(len(t.promoted) for t in decode) >= 1  # promotions happened while decoding
    base, emitted = [], 1  # cache length before each verification pass
    for st in steps:
        base.append(prompt.num_tokens + emitted - 1)
        emitted += len(st.emitted_ids)
    moves: dict[int, list] = {}
    for t in decode:  # fused before pass t.step; demoted during it, so masked from the next pass on
        moves.setdefault(base[t.step], []).extend(("promote", i) for i in t.promoted)
        if t.step + 1 < len(base):
            moves.setdefault(base[t.step + 1], []).extend(("demote", i) for i in t.demoted)
    chunks = [engine.ensure_chunk(ids, prefix_ids=prompt.prefix_ids) for ids in prompt.chunk_ids]
    first = trace[0].gpu_chunks
    pre = prefill(engine.model, prompt, [c if i in first else None for i, c in enumerate(chunks)], mode="reuse",
                  resident=[i in first for i in range(6)], extra_capacity=40)
    state, token, tokens = pre.state, int(pre.logits.argmax()), []
    while len(tokens) < len(out.token_ids):
        tokens.append(token)
        for kind, i in moves.get(state.length, []):
            slot = placement.slots[i]
            if kind == "promote":
                promote_chunk(engine.model, state, chunks[i], slot.start)
            else:
                state.set_valid(slot.start, slot.start + slot.num_tokens, False)
        token = int(forward_tokens(engine.model, state, [token])[-1].argmax())
    assert tokens == list(out.token_ids)


def test_residency_recall_and_recovery_arithmetic():
    from kvblend.quality.residency import ARMS, aggregate, recall_at

    mass = [0.05, 0.1, 0.3, 0.2, 0.05]
    assert recall_at([2, 3], mass, 2) == pytest.approx(1.0)
    assert recall_at([0, 1], mass, 2) == pytest.approx(0.15 / 0.5)

    def arm(same, peak):
        return {"same_as_all_resident": same, "score": 0.5, "recall": 0.5, "promotions": 1, "demotions": 0,
                "bytes_moved": 10, "ttft_ms": 5.0, "peak_chunk_bytes": peak, "all_chunk_bytes": 100}

    samples = [{"summary_bytes": [1] * 5, "arms": {a: arm(a in ("all_resident", "look_promote") or i == 0, 30)
                                                    for a in ARMS}} for i in range(4)]
    agg = aggregate(samples, 2)
    assert agg["arms"]["static"]["same_as_all_resident"] == 0.25
    assert agg["recovery_look_promote"] == pytest.approx(1.0) and agg["recovery_promote"] == pytest.approx(0.0)
    assert agg["gpu_bytes_ratio_look_promote_vs_all"] == pytest.approx(0.35)
