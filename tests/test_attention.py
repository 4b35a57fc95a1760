"""Attention of recomputed tokens with the per-token causal mask (model/attention.py): FlexAttention with a
block mask built from positions against SDPA with the dense mask (CPU, under torch.compile), the block
structure against a brute-force check, and the prefill equivalences with the flex kernel."""

from __future__ import annotations

import logging

import pytest
import torch

from test_blend import random_prompt

from kvblend.fusion.blend import prefill
from kvblend.kvstore.builder import build_chunk_kv
from kvblend.model import attention as A


def _case(h, h_kv, d, r, n, *, holes=False, dense=False, dtype=torch.float32, seed=0, extra=5):
    """q [h, r, D]; keys / values with `extra` rows past n (never attended); sorted positions in [0, n)."""
    with torch.inference_mode():  # inference tensors, like a prefill's (one compiled variant for all)
        return _make_case(h, h_kv, d, r, n, holes=holes, dense=dense, dtype=dtype, seed=seed, extra=extra)


def _make_case(h, h_kv, d, r, n, *, holes, dense, dtype, seed, extra):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(h, r, d, generator=g).to(dtype)
    k = torch.randn(h_kv, n + extra, d, generator=g).to(dtype)
    v = torch.randn(h_kv, n + extra, d, generator=g).to(dtype)
    if dense:
        assert r == n
        pos = torch.arange(n)
    else:
        pos = torch.randperm(n - 1, generator=g)[: r - 1].sort().values
        pos = torch.cat([pos, torch.tensor([n - 1])])  # the last query sees every key, like a prompt's last token
    valid = None
    if holes:
        valid = torch.ones(n + extra, dtype=torch.bool)
        valid[n // 4: n // 4 + 150] = False  # a placeholder chunk spanning block boundaries
        valid[n - 9: n - 3] = False
        valid[0] = True
    return q, k, v, pos, valid


@pytest.fixture(scope="module")
def flex():
    """The process-wide compiled flex_attention, compiled once here (skips the module if it cannot be)."""
    if A.flex_attention is None:
        pytest.skip("this torch has no FlexAttention")
    q, k, v, pos, valid = _case(4, 2, 16, 200, 700, holes=True)
    try:
        with torch.inference_mode():
            mask = A.build_mask(pos, 700, valid, "flex")
            out = A._flex(q, k, v, 700, 0.25, mask)
    except Exception as exc:  # no compiler toolchain, unsupported platform, ...
        pytest.skip(f"torch.compile of flex_attention is unavailable here: {type(exc).__name__}: {exc}")
    assert torch.isfinite(out).all()
    return A.compiled_flex(mask.compile_mode)


def _both(q, k, v, pos, n, valid, scale=0.25):
    with torch.inference_mode():
        a = A.masked_attention(q, k, v, pos, n, valid, scale, kernel="flex")
        b = A.masked_attention(q, k, v, pos, n, valid, scale, kernel="sdpa")
    assert A._flex_broken is None, A._flex_broken
    return a, b


CASES = {  # name: (h, h_kv, d, r, n, kwargs)
    "dense": (4, 2, 16, 300, 300, dict(dense=True)),
    "sparse": (4, 2, 16, 200, 700, {}),
    "holes": (4, 2, 16, 200, 700, dict(holes=True)),
    "holes-dense": (4, 2, 16, 333, 333, dict(holes=True, dense=True)),
    "one-block": (4, 2, 16, 37, 1000, dict(holes=True)),
    "aligned": (4, 2, 16, 256, 512, dict(extra=0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_flex_equals_dense_sdpa(flex, name):
    h, h_kv, d, r, n, kw = CASES[name]
    q, k, v, pos, valid = _case(h, h_kv, d, r, n, **kw)
    a, b = _both(q, k, v, pos, n, valid)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flex_equals_dense_sdpa_bf16(flex):
    q, k, v, pos, valid = _case(4, 2, 16, 200, 700, holes=True, dtype=torch.bfloat16)
    a, b = _both(q, k, v, pos, 700, valid)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def _brute_structure(pos, n, valid, block):
    """(full, partial) by evaluating the dense mask on every tile (pad rows / keys past n excluded)."""
    r = pos.shape[0]
    nq, nk = -(-r // block), -(-n // block)
    m = torch.zeros(r, nk * block, dtype=torch.bool)
    m[:, :n] = A.dense_mask(pos, n, valid)
    full = torch.zeros(nq, nk, dtype=torch.bool)
    partial = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            tile = m[i * block: (i + 1) * block, j * block: (j + 1) * block]
            full[i, j] = bool(tile.all())
            partial[i, j] = bool(tile.any()) and not bool(tile.all())
    return full, partial


@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("name", ["dense", "sparse", "holes", "holes-dense", "one-block", "aligned"])
def test_block_structure_against_brute_force(name, block):
    _, _, _, r, n, kw = CASES[name]
    _, _, _, pos, valid = _case(1, 1, 1, r, n, **kw)
    full, partial = A.block_structure(pos, n, valid, block)
    bf, bp = _brute_structure(pos, n, valid, block)
    assert torch.equal(full, bf) and torch.equal(partial, bp)
    if block == 16:
        assert full.any() and partial.any() and not (full & partial).any()
    # the BlockMask lists exactly these blocks: partial ones in kv_*, full ones in full_kv_*, ascending
    bm = A.position_block_mask(pos, n, valid, block)
    for counts, idx, want in ((bm.kv_num_blocks, bm.kv_indices, bp), (bm.full_kv_num_blocks, bm.full_kv_indices, bf)):
        for i in range(want.shape[0]):
            c = int(counts[0, 0, i])
            assert idx[0, 0, i, :c].tolist() == want[i].nonzero().flatten().tolist()
    assert bm.seq_lengths == (r, n)


def test_a_block_with_no_valid_key_is_skipped():
    pos = torch.arange(130, 170)
    valid = torch.ones(256, dtype=torch.bool)
    valid[:64] = False  # key block 0 (of 64) is wholly a placeholder
    full, partial = A.block_structure(pos, 170, valid, 64)
    assert not full[:, 0].any() and not partial[:, 0].any()
    assert full[0, 1] and partial[0, 2]


def test_kernel_selection():
    from kvblend.config import ConfigError, load_config

    assert A.resolve_kernel("cpu") == "sdpa"  # auto: sdpa on CPU
    assert A.resolve_kernel("cpu", "sdpa") == "sdpa"
    assert A.resolve_kernel("cuda", "auto") == "sdpa"
    with pytest.raises(ValueError, match="bogus"):
        A.resolve_kernel("cpu", "bogus")
    if A.flex_available():
        assert A.resolve_kernel("cpu", "flex") == "flex"
        assert A.build_mask(torch.arange(3), 3, kernel="flex").block is not None
    # the environment is read by load_config only, into RuntimeOptions
    assert load_config(environ={"KVBLEND_ATTENTION": "flex"}).runtime.attention == "flex"
    assert load_config(environ={"KVBLEND_CUDA_GRAPHS": "0", "KVBLEND_FRONT_GRAPH": "false"}).runtime.cuda_graphs is False
    with pytest.raises(ConfigError, match="attention"):
        load_config(environ={"KVBLEND_ATTENTION": "bogus"})


def test_flex_failure_falls_back_to_sdpa_with_one_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(A, "compiled_flex", lambda mode="static": broken)
    monkeypatch.setattr(A, "_flex_broken", None)
    q, k, v, pos, valid = _case(4, 2, 16, 20, 50, holes=True)
    mask = A.build_mask(pos, 50, valid, "flex")
    assert mask.kernel == "flex"
    with caplog.at_level(logging.WARNING, logger=A.__name__):
        a = A.masked_attention(q, k, v, pos, 50, valid, 0.25, mask=mask)
        a2 = A.masked_attention(q, k, v, pos, 50, valid, 0.25, mask=mask)
    b = A.masked_attention(q, k, v, pos, 50, valid, 0.25, kernel="sdpa")
    assert torch.equal(a, b) and torch.equal(a2, b)
    assert len([r for r in caplog.records if "FlexAttention unavailable" in r.message]) == 1
    assert A.resolve_kernel("cpu", "flex") == "sdpa"  # from now on


# ------------------------------------------------------------------ the prefill with the flex kernel
@pytest.fixture
def chunks_of(tiny_llama):
    def make(seed, lens):
        prompt = random_prompt(tiny_llama.shape.vocab_size, seed=seed, chunk_lens=lens, prefix_len=5, query_len=7)
        return prompt, [build_chunk_kv(tiny_llama, c) for c in prompt.chunk_ids]
    return make


def _runner(model, kernel):
    from kvblend.config import RuntimeOptions
    from kvblend.model.runner import ModelRunner

    return ModelRunner(model, RuntimeOptions(attention=kernel))


def test_prefill_with_flex_equals_sdpa(flex, tiny_llama, chunks_of):
    m = tiny_llama
    prompt, chunks = chunks_of(21, (60, 45, 70, 30))  # 217 tokens: recompute sets from 12 to 217 rows
    for mode, ratio, recompute, resident in [("blend", 0.15, "plain", None), ("blend", 0.5, "padded", None),
                                             ("reuse", 0.0, "plain", None),
                                             ("blend", 0.3, "plain", [True, False, True, True]),
                                             ("blend", 0.3, "padded", [True, False, True, True])]:
        kw = dict(mode=mode, ratio=ratio, recompute=recompute, resident=resident, extra_capacity=3)
        a = prefill(_runner(m, "sdpa"), prompt, chunks, **kw)
        b = prefill(_runner(m, "flex"), prompt, chunks, **kw)
        assert A._flex_broken is None, A._flex_broken
        where = f"{mode}@{ratio} {recompute} resident={resident}"
        torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5, msg=where)
        torch.testing.assert_close(b.state.k, a.state.k, atol=1e-5, rtol=1e-5, msg=where)
        torch.testing.assert_close(b.state.v, a.state.v, atol=1e-5, rtol=1e-5, msg=where)
        assert a.stats.selected_positions == b.stats.selected_positions


def test_blend_ratio_one_with_flex_equals_full_prefill(flex, tiny_llama, chunks_of):
    runner = _runner(tiny_llama, "flex")
    prompt, chunks = chunks_of(22, (60, 45, 70, 30))
    full = prefill(runner, prompt, mode="full", extra_capacity=2)
    for recompute in ("plain", "padded"):
        blend = prefill(runner, prompt, chunks, mode="blend", ratio=1.0, recompute=recompute, extra_capacity=2)
        torch.testing.assert_close(blend.logits, full.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(blend.state.k, full.state.k[:, :, : blend.state.capacity], atol=1e-4, rtol=1e-4)


def test_run_layers_with_flex_equal_sdpa_in_plain_and_padded_paths(flex, tiny_llama):
    """The recompute layers themselves (the flex mask is what the recompute graphs capture on CUDA)."""
    from kvblend.model.rope import rope_cos_sin

    m = tiny_llama
    n = 250  # 110 rows over 250 keys: the same padded flex shape as the prefill tests (one compilation)
    g = torch.Generator().manual_seed(5)
    pos = torch.cat([torch.arange(5), torch.randperm(230, generator=g)[:90].sort().values + 5,
                     torch.arange(235, n)])
    h = torch.randn(pos.shape[0], m.shape.hidden_size, generator=g)
    cos, sin = rope_cos_sin(m.inv_freq, pos, m.dtype)
    base = torch.randn(m.shape.num_layers, m.shape.num_kv_heads, 512, m.shape.head_dim, generator=g)
    outs = {}
    with torch.inference_mode():
        for path in ("plain", "padded"):
            for kernel in ("sdpa", "flex"):
                runner = _runner(m, kernel)
                st = runner.new_state(512, static=True)
                st.k.copy_(base)
                st.v.copy_(base.flip(2))
                st.length = n
                st.set_valid(100, 140, False)
                out = runner.run_layers(st, h, pos, cos, sin, 1, n, path=path)
                outs[path, kernel] = (out, st.k[:, :, :n].clone())
    ref_out, ref_k = outs["plain", "sdpa"]
    for key, (out, k) in outs.items():
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=str(key))
        torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=1e-5, msg=str(key))
    assert A._flex_broken is None


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17])
@pytest.mark.parametrize("holes", [False, True])
def test_few_query_rows_attend_as_the_dense_mask_does(tiny_llama, rows, holes):
    """Decode / verification rows (2..FEW_ROWS) attend as a batch of one-row queries: same result as the
    dense-mask SDPA of the whole set, with placeholder holes too; 1 and > FEW_ROWS rows keep the dense path."""
    from kvblend.model import layers as L
    from kvblend.model.kv import allocate_state

    model = tiny_llama
    s = model.shape
    n = 40
    state = allocate_state(model, n + rows)
    g = torch.Generator().manual_seed(rows)
    state.k.copy_(torch.randn(state.k.shape, generator=g))
    state.v.copy_(torch.randn(state.v.shape, generator=g))
    state.length = n
    if holes:
        state.set_valid(5, 12, False)
    q = torch.randn(s.num_heads, rows, s.head_dim, generator=g)
    q_pos = torch.arange(n, n + rows)
    mask = L.causal_mask(q_pos, n + rows, state)
    got = L._attend(model, 0, q, q_pos, state, n + rows, False, mask)
    keys = state.k[0, :, :n + rows].repeat_interleave(s.num_heads // s.num_kv_heads, 0)
    vals = state.v[0, :, :n + rows].repeat_interleave(s.num_heads // s.num_kv_heads, 0)
    scores = (q @ keys.transpose(1, 2)) * model.attn_scale
    want = scores.masked_fill(~mask[None], float("-inf")).softmax(-1) @ vals
    assert got.shape == (1, s.num_heads, rows, s.head_dim)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
