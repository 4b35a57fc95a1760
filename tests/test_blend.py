"""Equivalences of the blended prefill against transformers' own forward (fp32, CPU)."""

from __future__ import annotations

import torch

from conftest import make_tiny
from kvblend.fusion.blend import prefill
from kvblend.model.layers import forward_tokens
from kvblend.model.rope import rerotate
from kvblend.fusion.select import SelectionPolicy, num_to_select, select_top
from kvblend.kvstore.builder import build_chunk_kv
from kvblend.model.hf import hf_cache_from_kv, kv_from_hf_cache
from kvblend.types import PromptIds


def random_prompt(vocab: int, seed: int = 1, chunk_lens=(17, 23, 11), prefix_len=5, query_len=7) -> PromptIds:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(torch.randint(0, vocab, (n,), generator=g).tolist())

    return PromptIds(ids(prefix_len), tuple(ids(n) for n in chunk_lens), ids(query_len))


def hf_full_logits(model, prompt: PromptIds) -> torch.Tensor:
    logits, _ = model.hf_forward_logits(torch.tensor(prompt.flat()))
    return logits[-1]


def hf_naive_reuse_logits(model, prompt: PromptIds, sink_ids=()) -> torch.Tensor:
    """Reference for ratio 0: every piece prefilled alone by transformers at its own global positions,
    KV concatenated, then the query run over that cache by transformers."""
    per_layer = [([], []) for _ in range(model.shape.num_layers)]
    pieces = [prompt.prefix_ids, *prompt.chunk_ids]
    start = 0
    for i, piece in enumerate(pieces):
        sink = tuple(sink_ids) if i > 0 else ()
        ids = torch.tensor(sink + tuple(piece))
        pos = torch.arange(start - len(sink), start + len(piece))[None]  # sink right before the piece
        _, cache = model.hf_forward_logits(ids, position_ids=pos)
        for layer, (k, v) in enumerate(kv_from_hf_cache(cache)):
            per_layer[layer][0].append(k[:, len(sink):])
            per_layer[layer][1].append(v[:, len(sink):])
        start += len(piece)
    cache = hf_cache_from_kv([(torch.cat(k, 1), torch.cat(v, 1)) for k, v in per_layer], model.hf_model.config)
    q = torch.tensor(prompt.query_ids)
    logits, _ = model.hf_forward_logits(q, cache=cache, position_ids=torch.arange(start, start + len(q))[None])
    return logits[-1]


def test_full_mode_matches_transformers(tiny_model):
    prompt = random_prompt(tiny_model.shape.vocab_size)
    out = prefill(tiny_model, prompt, mode="full")
    torch.testing.assert_close(out.logits, hf_full_logits(tiny_model, prompt), atol=1e-5, rtol=1e-5)
    assert out.stats.num_recomputed == prompt.num_tokens


def test_blend_ratio_one_reproduces_full_prefill(tiny_model):
    prompt = random_prompt(tiny_model.shape.vocab_size, seed=2)
    chunks = [build_chunk_kv(tiny_model, c) for c in prompt.chunk_ids]
    out = prefill(tiny_model, prompt, chunks, mode="blend", ratio=1.0)
    torch.testing.assert_close(out.logits, hf_full_logits(tiny_model, prompt), atol=1e-5, rtol=1e-5)
    full = prefill(tiny_model, prompt, mode="full")
    n = prompt.num_tokens
    torch.testing.assert_close(out.state.k[:, :, :n], full.state.k[:, :, :n], atol=1e-5, rtol=1e-5)


def test_reuse_reproduces_naive_concatenation(tiny_model):
    prompt = random_prompt(tiny_model.shape.vocab_size, seed=3)
    chunks = [build_chunk_kv(tiny_model, c) for c in prompt.chunk_ids]
    out = prefill(tiny_model, prompt, chunks, mode="reuse")
    ref = hf_naive_reuse_logits(tiny_model, prompt)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    # and reuse is not full prefill (the chunks really were reused)
    assert (out.logits - hf_full_logits(tiny_model, prompt)).abs().max() > 1e-3


def test_reuse_with_sink_tokens_matches_reference(tiny_llama):
    prompt = random_prompt(tiny_llama.shape.vocab_size, seed=4)
    sink = (1,)
    chunks = [build_chunk_kv(tiny_llama, c, sink_ids=sink) for c in prompt.chunk_ids]
    assert all(c.rope_offset == 1 for c in chunks)
    out = prefill(tiny_llama, prompt, chunks, mode="reuse")
    torch.testing.assert_close(out.logits, hf_naive_reuse_logits(tiny_llama, prompt, sink), atol=1e-5, rtol=1e-5)


def test_blend_ratio_zero_equals_reuse_up_to_layer0_rounding(tiny_llama):
    prompt = random_prompt(tiny_llama.shape.vocab_size, seed=5)
    chunks = [build_chunk_kv(tiny_llama, c) for c in prompt.chunk_ids]
    a = prefill(tiny_llama, prompt, chunks, mode="blend", ratio=0.0)
    b = prefill(tiny_llama, prompt, chunks, mode="reuse")
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    assert a.stats.selected_positions == ()


def test_blend_error_shrinks_with_ratio(tiny_llama):
    prompt = random_prompt(tiny_llama.shape.vocab_size, seed=6, chunk_lens=(40, 40, 40))
    chunks = [build_chunk_kv(tiny_llama, c) for c in prompt.chunk_ids]
    ref = hf_full_logits(tiny_llama, prompt)
    errs = [(prefill(tiny_llama, prompt, chunks, mode="blend", ratio=r).logits - ref).abs().max().item()
            for r in (0.0, 0.5, 1.0)]
    assert errs[2] < 1e-4 and errs[1] < errs[0]


def test_cached_tensors_are_not_mutated(tiny_llama):
    prompt = random_prompt(tiny_llama.shape.vocab_size, seed=7)
    chunks = [build_chunk_kv(tiny_llama, c) for c in prompt.chunk_ids]
    before = [c.kv.clone() for c in chunks]
    out = prefill(tiny_llama, prompt, chunks, mode="blend", ratio=0.5, extra_capacity=4)
    forward_tokens(tiny_llama, out.state, [1, 2, 3])
    for c, b in zip(chunks, before):
        assert torch.equal(c.kv, b)


def test_decoding_from_blend_state_matches_transformers(tiny_model):
    prompt = random_prompt(tiny_model.shape.vocab_size, seed=8)
    out = prefill(tiny_model, prompt, mode="full", extra_capacity=3)
    extra = [5, 9, 11]
    logits = forward_tokens(tiny_model, out.state, extra)
    ref, _ = tiny_model.hf_forward_logits(torch.tensor(prompt.flat() + extra))
    torch.testing.assert_close(logits, ref[-3:], atol=1e-5, rtol=1e-5)
    out.state.truncate(prompt.num_tokens + 1)  # roll back two tokens, then redo them one by one
    for i, t in enumerate(extra[1:]):
        step = forward_tokens(tiny_model, out.state, [t])
        torch.testing.assert_close(step[0], ref[-2 + i], atol=1e-5, rtol=1e-5)


def test_selected_token_output_ignores_later_tokens(tiny_llama):
    """The per-token causal mask: a recomputed token at position p must not see keys after p."""
    prompt = random_prompt(tiny_llama.shape.vocab_size, seed=9)
    chunks = [build_chunk_kv(tiny_llama, c) for c in prompt.chunk_ids]
    base = prefill(tiny_llama, prompt, chunks, mode="blend", ratio=0.3)
    changed_query = tuple((t + 1) % tiny_llama.shape.vocab_size for t in prompt.query_ids)
    other = PromptIds(prompt.prefix_ids, prompt.chunk_ids, changed_query)
    alt = prefill(tiny_llama, other, chunks, mode="blend", ratio=0.3)
    q0 = prompt.num_tokens - len(prompt.query_ids)
    # selection happens at the check layer, which may differ only through later tokens if the mask leaks;
    # compare the KV rows (every layer) of all tokens before the query
    assert base.stats.selected_positions == alt.stats.selected_positions
    torch.testing.assert_close(base.state.k[:, :, :q0], alt.state.k[:, :, :q0], atol=0, rtol=0)
    torch.testing.assert_close(base.state.v[:, :, :q0], alt.state.v[:, :, :q0], atol=0, rtol=0)
    # and the query rows did change
    assert not torch.equal(base.state.k[:, :, q0:], alt.state.k[:, :, q0:])


def test_selection_picks_planted_deviation():
    g = torch.Generator().manual_seed(0)
    cached = torch.randn(2, 100, 8, generator=g)
    fresh = cached + 1e-3 * torch.randn(2, 100, 8, generator=g)
    planted = torch.tensor([3, 17, 42, 77, 98])
    fresh[:, planted] += 5.0
    from kvblend.fusion.select import kv_deviation
    sel = select_top(kv_deviation(fresh, cached), 0.05)
    assert sel.tolist() == planted.tolist()
    assert num_to_select(100, 1.0) == 100 and num_to_select(100, 0.0) == 0 and num_to_select(7, 0.15) == 2


def test_blend_selects_planted_tokens_end_to_end(tiny_llama):
    """Corrupt a few cached K rows at the check layer: the blend must pick exactly those tokens."""
    prompt = random_prompt(tiny_llama.shape.vocab_size, seed=10, chunk_lens=(30, 30))
    chunks = [build_chunk_kv(tiny_llama, c) for c in prompt.chunk_ids]
    bad = chunks[1].kv.clone()
    bad[0, 1, :, [2, 9, 20]] += 50.0  # K of check layer 1, chunk-local tokens 2, 9, 20
    from dataclasses import replace
    chunks[1] = replace(chunks[1], kv=bad)
    out = prefill(tiny_llama, prompt, chunks, mode="blend", ratio=0.05, check_layer=1,
                  selection=SelectionPolicy("k"))  # plain CacheBlend: K deviation alone
    start = len(prompt.prefix_ids) + 30
    assert set(out.stats.selected_positions) == {start + 2, start + 9, start + 20}


def _keys_at_offset(model, ids, offset):
    pos = torch.arange(offset, offset + len(ids))[None]
    _, cache = model.hf_forward_logits(torch.tensor(ids), position_ids=pos)
    return torch.stack([k for k, _ in kv_from_hf_cache(cache)])


def test_rerotated_keys_equal_keys_at_new_positions_default_and_llama3():
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    linear = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    for rope in (None, llama3, linear):
        model = make_tiny("llama", **({"rope_parameters": rope} if rope else {}))
        if rope:
            assert model.shape.rope_type == rope["rope_type"]
        ids = list(range(3, 40))
        chunk = build_chunk_kv(model, ids)
        for offset in (1, 57, 1000):
            expect = _keys_at_offset(model, ids, offset)
            got = rerotate(chunk.k, offset, model.inv_freq)
            torch.testing.assert_close(got, expect, atol=2e-5, rtol=1e-4)


def test_placeholder_is_not_attended_and_promotion_matches_resident(tiny_llama):
    prompt = random_prompt(tiny_llama.shape.vocab_size, seed=11)
    chunks = [build_chunk_kv(tiny_llama, c) for c in prompt.chunk_ids]
    from kvblend.fusion.blend import promote_chunk
    # a placeholder behaves as if the chunk were absent from attention, positions unchanged
    staged = prefill(tiny_llama, prompt, [chunks[0], None, chunks[2]], mode="reuse", resident=[True, False, True],
                     extra_capacity=8)
    resident = prefill(tiny_llama, prompt, chunks, mode="reuse", extra_capacity=8)
    assert (staged.logits - resident.logits).abs().max() > 1e-4
    assert staged.stats.num_chunk_tokens == len(prompt.chunk_ids[0]) + len(prompt.chunk_ids[2])
    # decode two tokens, then promote chunk 1 and recompute the tail (query + decoded tokens)
    decoded = [3, 4]
    forward_tokens(tiny_llama, staged.state, decoded)
    start = len(prompt.prefix_ids) + len(prompt.chunk_ids[0])
    promote_chunk(tiny_llama, staged.state, chunks[1], start)
    q0 = prompt.num_tokens - len(prompt.query_ids)
    staged.state.truncate(q0)
    after = forward_tokens(tiny_llama, staged.state, list(prompt.query_ids) + decoded)
    ref = forward_tokens(tiny_llama, resident.state, decoded)
    torch.testing.assert_close(after[-2:], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[-3], resident.logits, atol=1e-5, rtol=1e-5)
    try:
        promote_chunk(tiny_llama, staged.state, chunks[1], start)
        raise AssertionError("promoting twice must fail")
    except ValueError:
        pass


def test_blend_with_placeholder_skips_its_tokens(tiny_llama):
    prompt = random_prompt(tiny_llama.shape.vocab_size, seed=12)
    chunks = [build_chunk_kv(tiny_llama, c) for c in prompt.chunk_ids]
    out = prefill(tiny_llama, prompt, [chunks[0], chunks[1], None], mode="blend", ratio=1.0,
                  resident=[True, True, False])
    lo = len(prompt.prefix_ids) + len(prompt.chunk_ids[0]) + len(prompt.chunk_ids[1])
    hi = lo + len(prompt.chunk_ids[2])
    assert not any(lo <= p < hi for p in out.stats.selected_positions)
    assert torch.isfinite(out.logits).all()
