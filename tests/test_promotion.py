"""Tiered context with promotions: budgets, pins, proxies, losslessness against plain decoding."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_tiny
from kvblend.config import EngineConfig
from kvblend.engine import Engine, SpecOptions
from kvblend.generation.promotion import PROXIES, Promoter, attention_mass
from kvblend.generation.sampling import SamplingParams
from test_blend import random_prompt


@pytest.fixture()
def tiny_engine(tmp_path):
    model = make_tiny("llama")
    prompt = random_prompt(model.shape.vocab_size, seed=21, chunk_lens=(12, 15, 9, 14, 11, 13))
    chunk_bytes = max(len(c) for c in prompt.chunk_ids) * 2 * 4 * 2 * 16 * 4
    config = EngineConfig(home=str(tmp_path), gpu_budget=str(2 * chunk_bytes), max_new_tokens=40,
                          stop_on_newline=False)
    return Engine(config, model=model), prompt, 2 * chunk_bytes


def test_budget_never_exceeded_and_pinned_never_demoted(tiny_engine, monkeypatch):
    engine, prompt, budget = tiny_engine
    rng = random.Random(0)

    def random_scores(self, state):  # a restless proxy: many promotions and demotions
        return {i: rng.random() for i in range(len(self.slots))}

    monkeypatch.setattr(Promoter, "_scores", random_scores)
    scores = [0.9, 0.8, 0.5, 0.4, 0.3, 0.2]
    out, steps, trace, placement = engine.answer_speculative(
        prompt, [""] * 6, scores, SpecOptions(gpu_chunks=2, drafter="ngram", proxy="ngram_source", threshold=0.3,
                                              k=3, pinned_top=1, mode="reuse"),
        sampling=SamplingParams(max_new_tokens=40, stop_on_newline=False))
    promotions = sum(len(t.promoted) for t in trace)
    assert promotions >= 5 and sum(len(t.demoted) for t in trace) >= 3
    for t in trace:
        assert t.gpu_bytes <= budget
        assert len(t.gpu_chunks) <= 2
        assert 0 in t.gpu_chunks and 0 not in t.demoted  # the pinned top chunk stays
    assert engine.store.used_bytes()["gpu"] <= budget
    assert not any(engine.store.is_pinned(s.key) for s in placement.slots)  # every pin released


def test_no_proxy_means_no_promotion_and_placeholders_masked(tiny_engine):
    engine, prompt, _ = tiny_engine
    out, steps, trace, placement = engine.answer_speculative(
        prompt, [""] * 6, [0.9, 0.8, 0.5, 0.4, 0.3, 0.2], SpecOptions(gpu_chunks=2, drafter="none", proxy="none",
                                                                     mode="reuse"),
        sampling=SamplingParams(max_new_tokens=6, stop_on_newline=False))
    assert trace == [] and len(out.token_ids) == 6
    assert [s.tier for s in placement.slots] == ["gpu", "gpu", "cpu", "cpu", "cpu", "cpu"]


@pytest.mark.parametrize("proxy", PROXIES)
def test_each_proxy_scores_every_chunk(tiny_engine, proxy):
    engine, prompt, _ = tiny_engine
    draft = make_tiny("llama", num_hidden_layers=2) if proxy == "draft_attention" else None
    out, steps, trace, _ = engine.answer_speculative(
        prompt, [""] * 6, [0.9, 0.8, 0.5, 0.4, 0.3, 0.2],
        SpecOptions(gpu_chunks=2, proxy=proxy, threshold=2.0, k=2, mode="reuse",
                    drafter="model" if draft is not None else "ngram"),
        draft_model=draft, sampling=SamplingParams(max_new_tokens=8, stop_on_newline=False))
    assert trace, "the promoter runs every step"
    scored = [t.scores for t in trace if t.scores]
    if proxy != "ngram_source":  # n-gram scores only exist when a draft was copied from a chunk
        assert scored and all(set(s) == set(range(6)) for s in scored)
        assert all(0.0 <= v <= 1.0 + 1e-6 for s in scored for v in s.values())
    assert all(not t.promoted for t in trace)  # threshold 2.0 is never reached


def test_attention_mass_sums_to_one_over_the_whole_prompt():
    model = make_tiny("llama")
    prompt = random_prompt(model.shape.vocab_size, seed=3)
    from kvblend.fusion.blend import prefill
    from kvblend.model.layers import forward_tokens
    res = prefill(model, prompt, mode="full", extra_capacity=2)
    queries: list = []
    forward_tokens(model, res.state, [5], queries_out=queries)
    n = res.state.length
    mass = attention_mass([q[:, -1] for q in queries], res.state, [(0, 10), (10, n)], model, [1, 2])
    assert torch.isclose(mass.sum(), torch.tensor(1.0), atol=1e-5)


@pytest.fixture(scope="module")
def smollm_engine(tmp_path_factory):
    from kvblend.model.registry import load_model

    model = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    return Engine(EngineConfig(home=str(tmp_path_factory.mktemp("home")), max_new_tokens=16), model=model)


@pytest.mark.parametrize("proxy,drafter", [("key_bounds", "ngram"), ("ngram_source", "ngram"),
                                           ("draft_attention", "model")])
def test_answer_only_in_cpu_chunk_gets_promoted(smollm_engine, proxy, drafter):
    """Two distractor passages are resident, the one passage holding the answer is staged on CPU: the proxy
    must promote it into the target's KV and the answer must appear; without promotion it does not."""
    from kvblend.data.datasets import load_dataset

    engine = smollm_engine
    data = load_dataset("musique_s", limit=1)
    texts = [data.template.format_passage(p)[:600] for p in data.samples[0].passages[:2]]
    texts.append("Museum facts\n\nThe secret code word of the Oslo museum is PINEAPPLE. "
                 "Visitors must say it at the door.\n\n")
    prompt = engine.prompt(data.template.prefix, texts,
                           data.template.format_query("What is the secret code word of the Oslo museum"))
    scores = [0.9, 0.8, 0.1]  # retrieval ranked the answer last: it starts on the CPU tier
    base, *_ = engine.answer_speculative(prompt, texts, scores,
                                         SpecOptions(gpu_chunks=2, drafter="none", proxy="none", mode="reuse"))
    assert "pineapple" not in base.text.lower()
    out, steps, trace, placement = engine.answer_speculative(
        prompt, texts, scores, SpecOptions(gpu_chunks=2, drafter=drafter, proxy=proxy, k=4, mode="reuse"),
        draft_model=engine.model)
    assert placement.slots[2].is_placeholder
    assert any(2 in t.promoted for t in trace)
    assert "pineapple" in out.text.lower()
    assert all(len(t.gpu_chunks) <= 2 for t in trace)
