"""The fast prefill paths against their plain references (CPU): fused projections, the padded recompute
path that CUDA graphs capture, batched / layer-grouped chunk placement, the host mirror of the valid mask,
and the disk tier's pinned-read / CRC / prefetch load path."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from safetensors.torch import load as st_load

from conftest import make_tiny
from test_blend import random_prompt

from kvblend.errors import ChunkCorruptError
from kvblend.fusion.blend import prefill
from kvblend.fusion.placement import place_chunks
from kvblend.kvstore.builder import build_chunk_kv
from kvblend.kvstore.tiers import DiskTier
from kvblend.model.rope import apply_rope, rerotate, rope_cos_sin
from kvblend.model.kv import allocate_state
from kvblend.model.layers import mlp, qkv
from kvblend.model.runner import row_bucket


def test_fused_projections_equal_the_modules(tiny_model):
    m = tiny_model
    s = m.shape
    h = torch.randn(7, s.hidden_size)
    cos, sin = rope_cos_sin(m.inv_freq, torch.arange(7), m.dtype)
    for layer in range(s.num_layers):
        lm = m.layers[layer]
        x = lm.input_norm(h)
        q_ref = apply_rope(lm.q_proj(x).view(7, s.num_heads, s.head_dim).transpose(0, 1), cos, sin)
        k_ref = apply_rope(lm.k_proj(x).view(7, s.num_kv_heads, s.head_dim).transpose(0, 1), cos, sin)
        v_ref = lm.v_proj(x).view(7, s.num_kv_heads, s.head_dim).transpose(0, 1)
        q, k, v = qkv(m, layer, h, cos, sin)
        torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mlp(m, layer, x), lm.mlp(x), atol=1e-6, rtol=1e-6)
    # one copy of the weights: the modules' parameters are views into the fused tensors
    f = m.fused_layer(0)
    assert m.layers[0].q_proj.weight.data_ptr() == f.qkv_weight.data_ptr()


def test_fused_weights_follow_a_dtype_move():
    m = make_tiny("qwen2")
    m.hf_model.to(torch.float64)  # parameters replaced: the fused copies must be rebuilt, not reused
    with torch.inference_mode():  # as inside a prefill
        f = m.fused_layer(1)
    m.hf_model(input_ids=torch.tensor([[1, 2, 3]]))  # transformers' forward, autograd on: no inference tensors
    assert f.qkv_weight.dtype == torch.float64 and f.qkv_bias is not None
    assert m.layers[1].k_proj.weight.data_ptr() == f.qkv_weight.data_ptr() + \
        m.shape.num_heads * m.shape.head_dim * m.shape.hidden_size * 8


def test_row_bucket():
    assert [row_bucket(r) for r in (1, 64, 65, 2048, 2049)] == [64, 64, 128, 2048, 2304]


@pytest.mark.parametrize("mode,ratio", [("reuse", 0.0), ("blend", 0.15), ("blend", 0.5), ("blend", 1.0)])
def test_padded_recompute_path_equals_plain(tiny_model, mode, ratio):
    prompt = random_prompt(tiny_model.shape.vocab_size, seed=11)
    chunks = [build_chunk_kv(tiny_model, c) for c in prompt.chunk_ids]
    a = prefill(tiny_model, prompt, chunks, mode=mode, ratio=ratio, recompute="plain", extra_capacity=3)
    b = prefill(tiny_model, prompt, chunks, mode=mode, ratio=ratio, recompute="padded", extra_capacity=3)
    assert b.state.capacity == a.state.capacity and b.state.length == a.state.length
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.state.k, a.state.k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.state.v, a.state.v, atol=1e-5, rtol=1e-5)
    assert a.stats.selected_positions == b.stats.selected_positions


def test_padded_path_with_a_placeholder_equals_plain(tiny_llama):
    prompt = random_prompt(tiny_llama.shape.vocab_size, seed=12)
    chunks = [build_chunk_kv(tiny_llama, c) for c in prompt.chunk_ids]
    resident = [True, False] + [True] * (len(chunks) - 2)
    kw = dict(mode="blend", ratio=0.3, extra_capacity=2, resident=resident)
    a = prefill(tiny_llama, prompt, chunks, recompute="plain", **kw)
    b = prefill(tiny_llama, prompt, chunks, recompute="padded", **kw)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    assert b.state.has_holes() and bytes(b.state.valid_host) == bytes(b.state.valid.to(torch.uint8).tolist())


def test_batched_and_layer_grouped_placement_equal_per_chunk_rerotation(tiny_llama):
    m = tiny_llama
    prompt = random_prompt(m.shape.vocab_size, seed=13)
    chunks = [build_chunk_kv(m, c, sink_ids=(1,)) for c in prompt.chunk_ids]
    before = [c.kv.clone() for c in chunks]
    n = prompt.num_tokens
    placed, start = [], len(prompt.prefix_ids)
    for c in chunks:
        placed.append((c, start))
        start += c.num_tokens
    ref = allocate_state(m, n)
    for c, st in placed:
        ref.k[:, :, st:st + c.num_tokens] = rerotate(c.k, st - c.rope_offset, m.inv_freq)
        ref.v[:, :, st:st + c.num_tokens] = c.v
    at_once = allocate_state(m, n)
    place_chunks(at_once, placed, m)
    grouped = allocate_state(m, n)
    for a, b in ((0, 1), (1, 3), (3, m.shape.num_layers)):  # what the pipelined H2D load does per layer group
        place_chunks(grouped, placed, m, slice(a, b))
    for got in (at_once, grouped):
        assert torch.equal(got.k, ref.k) and torch.equal(got.v, ref.v)
    assert all(torch.equal(c.kv, b) for c, b in zip(chunks, before))


def test_valid_mask_host_mirror(tiny_llama):
    state = allocate_state(tiny_llama, 10)
    state.length = 8
    assert not state.has_holes()
    state.set_valid(2, 4, False)
    assert state.has_holes()
    state.length = 2
    assert not state.has_holes()
    state.length = 8
    state.set_valid(2, 4, True)
    assert not state.has_holes() and bool(state.valid.all())


def _disk_with_chunk(tmp_path, model):
    prompt = random_prompt(model.shape.vocab_size, seed=14)
    chunk = build_chunk_kv(model, prompt.chunk_ids[0])
    disk = DiskTier(tmp_path / "disk", 1 << 30, pin_memory=False)
    disk.save(chunk)
    return disk, chunk


def test_disk_load_equals_safetensors_and_prefetch(tmp_path, tiny_llama):
    disk, chunk = _disk_with_chunk(tmp_path, tiny_llama)
    tensor_path, meta_path = disk.paths(chunk.key.digest)
    ref = st_load(tensor_path.read_bytes())["kv"]
    got = disk.load(chunk.key)
    assert torch.equal(got.kv, ref) and torch.equal(got.kv, chunk.kv) and got.token_ids == chunk.token_ids
    disk.prefetch([chunk.key])
    assert torch.equal(disk.load(chunk.key).kv, chunk.kv)
    meta = json.loads(meta_path.read_text())
    assert meta["file_crc32"] == zlib.crc32(tensor_path.read_bytes())


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("old_format", [False, True])
def test_disk_load_never_uses_a_corrupt_file(tmp_path, tiny_llama, prefetch, old_format):
    disk, chunk = _disk_with_chunk(tmp_path, tiny_llama)
    tensor_path, meta_path = disk.paths(chunk.key.digest)
    if old_format:  # files written before the CRC: verified by their SHA-256
        meta = json.loads(meta_path.read_text())
        del meta["file_crc32"]
        meta_path.write_text(json.dumps(meta))
    data = bytearray(tensor_path.read_bytes())
    data[-3] ^= 0x10  # one bit in the tensor data
    tensor_path.write_bytes(bytes(data))
    if prefetch:
        disk.prefetch([chunk.key])
    with pytest.raises(ChunkCorruptError, match="crc32 mismatch" if not old_format else "sha256 mismatch"):
        disk.load(chunk.key)
    assert not tensor_path.exists() and chunk.key.digest not in disk


@pytest.mark.parametrize("n", [5, 64, 130])
def test_captured_full_prefill_equals_the_plain_loop(tiny_model, n):
    """The full prefill CUDA takes when it is faster (the prompt padded at the end to its row bucket, causal
    attention, one graph per bucket): here run eagerly in a static buffer; the same logits and KV rows as the
    plain causal loop, and decoding after it the same."""
    from kvblend.model.runner import ModelRunner

    ids = torch.randint(0, tiny_model.shape.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    plain_state, plain_logits = ModelRunner(tiny_model).forward(ids, 3, static=False)
    runner = ModelRunner(tiny_model, static_eager=True)
    state, logits = runner.forward(ids, 3)
    assert state.buffer is not None and runner._full_path(state, n) == "padded"
    assert state.length == n
    torch.testing.assert_close(logits, plain_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.k[:, :, :n], plain_state.k[:, :, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.v[:, :, :n], plain_state.v[:, :, :n], atol=1e-5, rtol=1e-5)
    assert runner.decoder(state).argmax([1]) == ModelRunner(tiny_model).decoder(plain_state).argmax([1])
