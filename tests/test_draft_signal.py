"""The CacheClip selection signal: a draft model's attention over the whole prompt (fusion/select.py
draft_attention_prior), alone (draft_attn) or times K deviation (k_draft_product)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny, make_tiny_folder
from test_blend import random_prompt

from kvblend.config import EngineConfig
from kvblend.errors import ConfigError
from kvblend.fusion.blend import prefill
from kvblend.fusion.select import SelectionPolicy, draft_attention_prior, num_to_select
from kvblend.kvstore.builder import build_chunk_kv


@pytest.fixture(scope="module")
def pair():
    target = make_tiny("llama")
    draft = make_tiny("llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    return target, draft


def test_prior_is_the_query_attention_mass_of_the_draft(pair):
    _, draft = pair
    prompt = random_prompt(draft.shape.vocab_size, seed=3)
    n, q = prompt.num_tokens, len(prompt.query_ids)
    prior = draft_attention_prior(draft, prompt.flat(), q)
    assert prior.shape == (n,) and bool((prior >= 0).all())
    # every query token's attention sums to 1 per head and layer
    total = draft.shape.num_layers * draft.shape.num_heads * q
    assert float(prior.sum()) == pytest.approx(total, rel=1e-5)
    with pytest.raises(ValueError, match="share a tokenizer"):
        draft_attention_prior(draft, [draft.shape.vocab_size + 5] * 4, 2)


@pytest.mark.parametrize("signal", ["draft_attn", "k_draft_product"])
def test_draft_signals_pick_by_the_prior_and_keep_the_invariants(pair, signal):
    target, draft = pair
    prompt = random_prompt(target.shape.vocab_size, seed=4, chunk_lens=(30, 25, 20))
    chunks = [build_chunk_kv(target, c) for c in prompt.chunk_ids]
    policy = SelectionPolicy(signal)
    prior = draft_attention_prior(draft, prompt.flat(), len(prompt.query_ids))
    out = prefill(target, prompt, chunks, mode="blend", ratio=0.2, selection=policy, prior=prior)
    budget = num_to_select(75, 0.2)
    assert len(out.stats.selected_positions) == budget
    if signal == "draft_attn":  # the chunk tokens the draft attends to most
        cand = torch.arange(5, 80)
        best = cand[prior[cand].topk(budget).indices].sort().values.tolist()
        assert list(out.stats.selected_positions) == best
    full = prefill(target, prompt, None, mode="full")
    one = prefill(target, prompt, chunks, mode="blend", ratio=1.0, selection=policy, prior=prior)
    torch.testing.assert_close(one.logits, full.logits, atol=1e-5, rtol=1e-5)


def test_a_draft_signal_without_a_draft_is_one_clear_error(pair):
    target, _ = pair
    prompt = random_prompt(target.shape.vocab_size, seed=5)
    chunks = [build_chunk_kv(target, c) for c in prompt.chunk_ids]
    with pytest.raises(ValueError, match="needs a draft model"):
        prefill(target, prompt, chunks, mode="blend", selection=SelectionPolicy("k_draft_product"))
    with pytest.raises(ConfigError, match="needs draft_model"):
        EngineConfig(score_on="draft_attn")


def test_engine_loads_the_draft_and_answers_with_its_prior(tmp_path):
    from kvblend.engine import Engine

    target_dir = make_tiny_folder(tmp_path / "target")
    draft_dir = make_tiny_folder(tmp_path / "draft", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                 num_key_value_heads=1)
    cfg = EngineConfig(model=str(target_dir), draft_model=str(draft_dir), score_on="k_draft_product",
                       select_layers=1, select_first_tokens=0, device="cpu", dtype="float32",
                       home=str(tmp_path / "home"), max_new_tokens=3, stop_on_newline=False)
    engine = Engine(cfg)
    prompt = engine.prompt("Answer briefly.", ["The sky is blue.", "Grass is green in spring."], "What is blue?")
    out = engine.answer(prompt, ["a", "b"], mode="blend", ratio=0.3)
    assert len(out.token_ids) == 3 and out.blend.mode == "blend"
    assert engine.draft_model().name != engine.model.name


def test_frontier_runs_a_draft_variant_with_a_draft_and_refuses_it_without(tmp_path):
    from kvblend.generation.sampling import SamplingParams
    from kvblend.quality.frontier import evaluate_prompt

    target = make_tiny("llama", vocab_size=64)
    draft = make_tiny("llama", vocab_size=64, num_hidden_layers=2)
    prompt = random_prompt(64, seed=6)
    params = SamplingParams(max_new_tokens=4, temperature=0.0, stop_on_newline=False)
    rec = evaluate_prompt(target, prompt, ["plain", "prefix_draft_product"], [0.15, 1.0], params, draft=draft)
    run = rec["runs"]["prefix_draft_product@0.15"]
    assert run["draft_model"] == draft.name and run["kl_first"] >= 0
    assert rec["runs"]["prefix_draft_product@1"]["kl_first"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="needs a draft model"):
        evaluate_prompt(target, prompt, ["prefix_draft_product"], [0.15], params)
