"""The static-shape blend front (fusion/front_graph.py: layers below the check layer, check layers and the
token selection, as one CUDA graph captures them) against the eager blend, on CPU (fp32)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from test_blend import random_prompt

from kvblend.fusion.blend import prefill
from kvblend.fusion.front_graph import front_supported, make_plan
from kvblend.fusion.select import SelectionPolicy
from kvblend.kvstore.builder import build_chunk_kv

POLICIES = [
    SelectionPolicy("k"),
    SelectionPolicy("v"),
    SelectionPolicy("attn"),
    SelectionPolicy("k_attn_product"),
    SelectionPolicy("k", first_tokens=3),
    SelectionPolicy("k", layers=3),
    SelectionPolicy("k_attn_product", layers=3),
    SelectionPolicy("k_attn_product", first_tokens=2, layers=3),
]


@pytest.fixture(scope="module")
def model6():
    return make_tiny("llama", num_hidden_layers=6)


@pytest.fixture(scope="module")
def case(model6):
    # 300 tokens: the front pads them to 512, so pad rows and pad keys are exercised
    prompt = random_prompt(model6.shape.vocab_size, seed=3, chunk_lens=(90, 71, 100), prefix_len=13, query_len=26)
    chunks = [build_chunk_kv(model6, ids) for ids in prompt.chunk_ids]
    return prompt, chunks


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.signal}-f{p.first_tokens}-l{p.layers}")
@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.5, 1.0])
def test_front_equals_eager_blend(model6, case, policy, ratio):
    prompt, chunks = case
    assert front_supported(model6, policy, 1, has_holes=False)
    ref = prefill(model6, prompt, chunks, mode="blend", ratio=ratio, selection=policy, recompute="plain",
                  extra_capacity=4)
    got = prefill(model6, prompt, chunks, mode="blend", ratio=ratio, selection=policy, recompute="padded",
                  extra_capacity=4)
    assert got.stats.selected_positions == ref.stats.selected_positions
    assert got.stats.num_recomputed == ref.stats.num_recomputed
    torch.testing.assert_close(got.logits, ref.logits, atol=2e-5, rtol=2e-5)
    n = prompt.num_tokens
    torch.testing.assert_close(got.state.k[:, :, :n], ref.state.k[:, :, :n], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got.state.v[:, :, :n], ref.state.v[:, :, :n], atol=2e-5, rtol=2e-5)
    assert got.state.length == n


def test_front_at_ratio_one_is_full_prefill(model6, case):
    prompt, chunks = case
    full = prefill(model6, prompt, None, mode="full")
    got = prefill(model6, prompt, chunks, mode="blend", ratio=1.0, recompute="padded",
                  selection=SelectionPolicy("k_attn_product", layers=3))
    torch.testing.assert_close(got.logits, full.logits, atol=2e-5, rtol=2e-5)


def test_front_leaves_the_cached_chunks_untouched(model6, case):
    prompt, chunks = case
    before = [c.kv.clone() for c in chunks]
    prefill(model6, prompt, chunks, mode="blend", ratio=0.3, recompute="padded")
    for a, c in zip(before, chunks):
        assert torch.equal(a, c.kv)


def test_front_plan_sizes():
    p = make_plan(n=300, prefix=13, query_start=274, check_layer=1, ratio=0.15,
                  policy=SelectionPolicy("k", layers=3))
    assert p.n_pad == 512 and p.budgets == (118, 79, 40)
    assert p.set_rows == (192, 128, 128)  # 39 always + budget, in buckets of 64
    assert p.rows_out == 39 + 40


def test_front_falls_back_where_it_does_not_apply(model6):
    assert not front_supported(model6, SelectionPolicy("k_attn_rank"), 1, has_holes=False)
    assert not front_supported(model6, SelectionPolicy("k"), 1, has_holes=True)
    # the check layers must leave a recompute layer after them
    assert not front_supported(model6, SelectionPolicy("k", layers=5), 1, has_holes=False)
    assert front_supported(model6, SelectionPolicy("k", layers=4), 1, has_holes=False)
