"""End-to-end checks on the real default model (SmolLM2-135M-Instruct, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from kvblend.config import EngineConfig
from kvblend.data.datasets import load_dataset
from kvblend.engine import Engine
from kvblend.fusion.blend import prefill
from kvblend.model.registry import load_model
from test_blend import hf_full_logits, hf_naive_reuse_logits


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m-instruct", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def engine(smollm, tmp_path_factory):
    # plain CacheBlend settings: the reuse reference below prefills each chunk alone (after engine.sink_ids)
    return Engine(EngineConfig(home=str(tmp_path_factory.mktemp("home")), chunk_sink="auto", score_on="k",
                               select_layers=1), model=smollm)


@pytest.fixture(scope="module")
def musique_prompt(engine):
    data = load_dataset("musique_s", limit=1)
    sample = data.samples[0]
    texts = [data.template.format_passage(p)[:700] for p in sample.passages[:3]]
    return engine.prompt(data.template.prefix, texts, data.template.format_query(sample.question)), texts


def test_real_model_shape(smollm):
    s = smollm.shape
    assert (s.model_type, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == ("llama", 30, 9, 3, 64)
    assert smollm.fingerprint.startswith("smollm2-135m-instruct@b179c952")


def test_real_blend_ratio_one_and_reuse_match_transformers(engine, musique_prompt):
    prompt, texts = musique_prompt
    model = engine.model
    chunks = [engine.ensure_chunk(ids, t) for ids, t in zip(prompt.chunk_ids, texts)]
    ref = hf_full_logits(model, prompt)
    blend1 = prefill(model, prompt, chunks, mode="blend", ratio=1.0)
    torch.testing.assert_close(blend1.logits, ref, atol=2e-3, rtol=1e-3)
    reuse = prefill(model, prompt, chunks, mode="reuse")
    torch.testing.assert_close(reuse.logits, hf_naive_reuse_logits(model, prompt, engine.sink_ids),
                               atol=2e-3, rtol=1e-3)
    # recomputing 15% of the chunk tokens brings the last layer's KV closer to full prefill's
    full = prefill(model, prompt, mode="full")
    blend = prefill(model, prompt, chunks, mode="blend", ratio=0.15)
    n = prompt.num_tokens
    dev = lambda out: (out.state.k[-1, :, :n] - full.state.k[-1, :, :n]).square().sum().item()  # noqa: E731
    assert dev(blend) < 0.9 * dev(reuse)


def test_real_greedy_answer_equals_transformers_generate(engine, musique_prompt):
    prompt, _ = musique_prompt
    out = engine.answer(prompt, mode="full", sampling=engine.sampling(12).__class__(max_new_tokens=12,
                                                                                     stop_on_newline=False))
    ids = torch.tensor([prompt.flat()])
    ref = engine.model.hf_model.generate(ids, max_new_tokens=12, do_sample=False,
                                         attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    eos = engine.model.eos_token_ids()
    ref = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    assert out.token_ids == ref
    assert out.ttft_ms > 0 and len(out.token_ms) == len(out.token_ids) - 1


def test_demo_reports_ttft_from_the_start_tier_and_gpu_resident(engine):
    """`make demo`'s rows: every mode answered from config.start_tier, reuse and blend timed again with their
    chunks GPU-resident (the warm TTFT); the table carries both figures."""
    from kvblend.demo import format_table, run_demo

    rows = run_demo(engine.config, num_samples=1, num_chunks=2, engine=engine, progress=False)
    assert [r.mode for r in rows] == ["full", "reuse", "blend"]
    start = engine.config.start_tier
    for r in rows:
        assert r.ttft_ms > 0 and r.warm_ttft_ms > 0
        if r.mode == "full":
            assert r.warm_ttft_ms == r.ttft_ms and r.chunk_tiers == r.warm_chunk_tiers
        else:
            assert set(r.chunk_tiers) == {start} and set(r.warm_chunk_tiers) == {"gpu"}, (r.chunk_tiers,
                                                                                          r.warm_chunk_tiers)
    table = format_table(rows)
    assert "warm TTFT ms (chunks GPU-resident)" in table and table.count("\n| reuse |") == 1
