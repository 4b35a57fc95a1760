"""Quality variants: equivalences for every selection policy and precompute context, the selection rules,
the frontier's answer shortcut against plain greedy decoding, chunk-context keys, statistics and the report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny
from kvblend.data.prompt import chunk_context_ids
from kvblend.fusion.blend import prefill
from kvblend.fusion.select import (SIGNALS, CheckLayer, SelectionPolicy, draft_attention_prior, kv_deviation,
                                   num_to_select,
                                   query_attention, select_candidates, token_scores)
from kvblend.generation.generate import generate
from kvblend.generation.sampling import SamplingParams
from kvblend.kvstore.builder import build_chunk_kv
from kvblend.quality.variants import VARIANTS, parse_variants
from test_blend import hf_full_logits, random_prompt

POLICIES = [SelectionPolicy(sig) for sig in SIGNALS] + [
    SelectionPolicy("k", first_tokens=4), SelectionPolicy("k_attn_product", layers=3),
    SelectionPolicy("attn", first_tokens=3, layers=2), SelectionPolicy("k_tail_product", first_tokens=2, layers=3)]
TEXT_SINK = (3, 4, 5)  # a 'text' chunk context is a fixed id sequence (its ids come from the tokenizer)


def _prior(model, prompt, policy):
    """A draft signal's prior: the model itself as its own draft (any draft works for these invariants)."""
    return draft_attention_prior(model, prompt.flat(), len(prompt.query_ids)) if policy.needs_draft else None


def _variant_policy(v) -> SelectionPolicy:
    return SelectionPolicy(v.score_on, v.select_first_tokens, v.select_layers)


def _variant_chunks(model, prompt, v):
    ctx = TEXT_SINK if v.chunk_sink == "text" else chunk_context_ids(None, v.chunk_sink, prompt.prefix_ids)
    return [build_chunk_kv(model, c, ctx) for c in prompt.chunk_ids]


def _chunks(model, prompt, context: str):
    ctx = chunk_context_ids(None, context, prompt.prefix_ids)
    return [build_chunk_kv(model, c, ctx) for c in prompt.chunk_ids]


@pytest.mark.parametrize("context", ["auto", "prefix"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.signal}-f{p.first_tokens}-l{p.layers}")
def test_every_policy_ratio_one_is_full_and_ratio_zero_is_reuse(tiny_model, policy, context):
    prompt = random_prompt(tiny_model.shape.vocab_size, seed=11)
    chunks = _chunks(tiny_model, prompt, context)
    full = prefill(tiny_model, prompt, mode="full")
    prior = _prior(tiny_model, prompt, policy)
    one = prefill(tiny_model, prompt, chunks, mode="blend", ratio=1.0, selection=policy, prior=prior)
    torch.testing.assert_close(one.logits, full.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.logits, hf_full_logits(tiny_model, prompt), atol=1e-5, rtol=1e-5)
    reuse = prefill(tiny_model, prompt, chunks, mode="reuse")
    zero = prefill(tiny_model, prompt, chunks, mode="blend", ratio=0.0, selection=policy, prior=prior)
    torch.testing.assert_close(zero.logits, reuse.logits, atol=1e-5, rtol=1e-5)
    assert zero.stats.selected_positions == ()


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.signal}-f{p.first_tokens}-l{p.layers}")
def test_every_policy_keeps_exactly_the_ratio_budget(tiny_llama, policy):
    prompt = random_prompt(tiny_llama.shape.vocab_size, seed=12, chunk_lens=(30, 25, 20))
    chunks = _chunks(tiny_llama, prompt, "auto")
    out = prefill(tiny_llama, prompt, chunks, mode="blend", ratio=0.2, selection=policy,
                  prior=_prior(tiny_llama, prompt, policy))
    assert len(out.stats.selected_positions) == num_to_select(75, 0.2)
    assert out.stats.num_recomputed == len(prompt.prefix_ids) + len(prompt.query_ids) + num_to_select(75, 0.2)
    if policy.first_tokens:
        starts = [5, 35, 60]  # prefix 5, chunks of 30 / 25 / 20
        firsts = {s + j for s in starts for j in range(policy.first_tokens)}
        assert firsts <= set(out.stats.selected_positions)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_ratio_one_is_full_ratio_zero_is_reuse_and_keeps_the_budget(tiny_model, name):
    """Every registered variant (its precompute context and selection policy, as the frontier runs it)."""
    v = VARIANTS[name]
    policy = _variant_policy(v)
    prompt = random_prompt(tiny_model.shape.vocab_size, seed=14, chunk_lens=(30, 25, 20))
    chunks = _variant_chunks(tiny_model, prompt, v)
    full = prefill(tiny_model, prompt, mode="full")
    prior = _prior(tiny_model, prompt, policy)
    one = prefill(tiny_model, prompt, chunks, mode="blend", ratio=1.0, selection=policy, prior=prior)
    torch.testing.assert_close(one.logits, full.logits, atol=1e-5, rtol=1e-5)
    reuse = prefill(tiny_model, prompt, chunks, mode="reuse")
    zero = prefill(tiny_model, prompt, chunks, mode="blend", ratio=0.0, selection=policy, prior=prior)
    torch.testing.assert_close(zero.logits, reuse.logits, atol=1e-5, rtol=1e-5)
    assert zero.stats.selected_positions == ()
    mid = prefill(tiny_model, prompt, chunks, mode="blend", ratio=0.2, selection=policy, prior=prior)
    assert len(mid.stats.selected_positions) == num_to_select(75, 0.2)


def test_new_candidate_variants_are_registered():
    assert {"prefix_epic_product_narrow", "prefix_product_narrow5", "prefix_tail_product_narrow"} <= set(VARIANTS)
    v = VARIANTS["prefix_epic_product_narrow"]
    assert (v.chunk_sink, v.score_on, v.select_first_tokens, v.select_layers) == ("prefix", "k_attn_product", 8, 3)
    assert VARIANTS["prefix_product_narrow5"].select_layers == 5
    assert all(x.score_on in SIGNALS for x in VARIANTS.values())
    # the draft-signal variant is asked for by name (it needs --draft-model), never by 'all'
    assert "prefix_draft_product" in VARIANTS and "prefix_draft_product" not in parse_variants("all")


def test_tail_signal_counts_only_the_last_query_tokens(monkeypatch):
    import kvblend.fusion.select as sel

    layer = _check_layer(t=12)  # 3 query tokens
    dev = token_scores("k", layer)
    # a tail at least as long as the query: the whole query's attention, so k_attn_product exactly
    torch.testing.assert_close(token_scores("k_tail_product", layer), token_scores("k_attn_product", layer))
    monkeypatch.setattr(sel, "TAIL_QUERY_TOKENS", 1)
    keys = layer.k.repeat_interleave(2, dim=0)
    qi = int(layer.query_pos[-1])
    ref = torch.zeros(layer.num_keys)
    for hh in range(4):
        ref[: qi + 1] += ((layer.q[hh, qi] @ keys[hh, : qi + 1].T) * layer.scale).softmax(-1)
    torch.testing.assert_close(token_scores("k_tail_product", layer), dev * ref[layer.cand_pos])
    assert SelectionPolicy("k_tail_product").needs_attention


def test_prefix_context_makes_a_single_chunk_prompt_exact(tiny_model):
    """A chunk precomputed after the prompt's prefix holds exactly full prefill's KV when it follows that
    prefix: reuse then equals full prefill (with a BOS-only/empty context it does not)."""
    prompt = random_prompt(tiny_model.shape.vocab_size, seed=13, chunk_lens=(29,))
    full = prefill(tiny_model, prompt, mode="full")
    exact = prefill(tiny_model, prompt, _chunks(tiny_model, prompt, "prefix"), mode="reuse")
    torch.testing.assert_close(exact.logits, full.logits, atol=1e-5, rtol=1e-5)
    alone = prefill(tiny_model, prompt, _chunks(tiny_model, prompt, "auto"), mode="reuse")
    assert (alone.logits - full.logits).abs().max() > 1e-3


def test_chunk_context_ids_rules():
    assert chunk_context_ids(None, "prefix", (5, 6)) == (5, 6)
    assert chunk_context_ids(None, "auto") == ()
    with pytest.raises(ValueError, match="prefix ids"):
        chunk_context_ids(None, "prefix")
    with pytest.raises(ValueError, match="tokenizer"):
        chunk_context_ids(None, "text")


def test_engine_keys_chunks_by_their_context(tiny_llama, tmp_path):
    from kvblend.config import EngineConfig
    from kvblend.engine import Engine

    ids = (1, 2, 3, 4)
    eng = Engine(EngineConfig(home=str(tmp_path), chunk_sink="prefix", device="cpu"), model=tiny_llama)
    assert eng.chunk_key(ids, (7, 8)) != eng.chunk_key(ids, (7, 9))
    with pytest.raises(ValueError):
        eng.chunk_key(ids)
    plain = Engine(EngineConfig(home=str(tmp_path), chunk_sink="none", device="cpu"), model=tiny_llama)
    assert plain.chunk_key(ids, (7, 8)) == plain.chunk_key(ids, (7, 9)) != eng.chunk_key(ids, (7, 8))
    got = eng.ensure_chunk(ids, prefix_ids=(7, 8))
    assert got.sink_ids == (7, 8) and got.rope_offset == 2


def _check_layer(t=12, h_kv=2, heads=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = t + 4
    rows = torch.arange(n)
    fresh_k, fresh_v = torch.randn(h_kv, n, d, generator=g), torch.randn(h_kv, n, d, generator=g)
    cached_k, cached_v = torch.randn(h_kv, n + 3, d, generator=g), torch.randn(h_kv, n + 3, d, generator=g)
    q = torch.randn(heads, n, d, generator=g)
    return CheckLayer(q=q, k=fresh_k, v=fresh_v, rows_pos=rows, cached_k=cached_k, cached_v=cached_v,
                      cand_pos=torch.arange(1, t + 1), query_pos=torch.arange(t + 1, n), num_keys=n, scale=d ** -0.5)


def test_signals_score_what_they_say():
    layer = _check_layer()
    cand = layer.cand_pos
    torch.testing.assert_close(token_scores("k", layer), kv_deviation(layer.k[:, cand], layer.cached_k[:, cand]))
    torch.testing.assert_close(token_scores("v", layer), kv_deviation(layer.v[:, cand], layer.cached_v[:, cand]))
    attn = query_attention(layer)
    # reference: per head softmax over keys <= query position, summed over heads and query tokens
    keys = layer.k.repeat_interleave(2, dim=0)
    ref = torch.zeros(layer.num_keys)
    for hh in range(4):
        for qi in layer.query_pos.tolist():
            s = (layer.q[hh, qi] @ keys[hh, : qi + 1].T) * layer.scale
            ref[: qi + 1] += s.softmax(-1)
    torch.testing.assert_close(attn, ref[cand])
    torch.testing.assert_close(token_scores("k_attn_product", layer), token_scores("k", layer) * attn)
    rank = token_scores("k_attn_rank", layer)
    assert sorted(rank.tolist())[-1] <= 2 * (cand.numel() - 1)


def test_forced_first_tokens_fill_the_budget_first():
    layer = _check_layer(t=10)
    forced = torch.zeros(10, dtype=torch.bool)
    forced[[0, 5]] = True
    keep = select_candidates(SelectionPolicy("k"), layer, 4, forced)
    assert {0, 5} <= set(keep.tolist()) and keep.numel() == 4
    top = torch.topk(token_scores("k", layer), 10).indices.tolist()
    rest = [i for i in top if i not in (0, 5)][:2]
    assert set(keep.tolist()) == {0, 5, *rest}


def test_progressive_budget_schedule():
    p = SelectionPolicy("k", layers=3)
    assert [p.budget(s, 3, 0.1, 100) for s in range(3)] == [30, 20, 10]
    assert [p.budget(s, 3, 1.0, 100) for s in range(3)] == [100, 100, 100]
    assert [p.budget(s, 3, 0.0, 100) for s in range(3)] == [0, 0, 0]
    assert [p.budget(s, 3, 0.5, 100) for s in range(3)] == [100, 100, 50]
    with pytest.raises(ValueError):
        SelectionPolicy("nope")


def test_frontier_answer_shortcut_equals_greedy_decoding():
    """compare() reads x's greedy answer off the teacher-forced pass until it leaves the reference, then
    decodes on: it must give exactly the tokens plain greedy decoding from x's prefill gives."""
    from kvblend.quality.frontier import compare, reference

    model = make_tiny("llama", vocab_size=64)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_on_newline=False)
    checked = diverged = 0
    for seed in range(6):
        prompt = random_prompt(64, seed=20 + seed)
        ref = reference(model, prompt, params, None)
        full = prefill(model, prompt, mode="full", extra_capacity=13)
        assert generate(model, full, params, 0.0).token_ids == ref.tokens
        chunks = _chunks(model, prompt, "auto")
        for ratio, policy in ((0.0, SelectionPolicy("k")), (0.2, SelectionPolicy("k_attn_rank")),
                              (0.5, SelectionPolicy("v", layers=2))):
            mode = "reuse" if ratio == 0 else "blend"
            out = compare(model, prompt, ref, chunks, mode, ratio, policy, params, None)
            again = prefill(model, prompt, chunks, mode=mode, ratio=ratio, selection=policy, extra_capacity=13)
            assert out["tokens"] == generate(model, again, params, 0.0).token_ids
            assert out["kl_first"] >= 0 and out["kl_mean"] >= 0
            checked += 1
            diverged += out["diverge_at"] is not None
        one = compare(model, prompt, ref, chunks, "blend", 1.0, SelectionPolicy("k"), params, None)
        assert one["diverge_at"] is None and one["kl_first"] < 1e-8 and one["tokens"] == ref.tokens
    assert checked == 18 and diverged > 0  # the decode-on path really ran


def test_evaluate_prompt_and_report(tmp_path):
    from kvblend.quality.frontier import SCHEMA, aggregate, evaluate_prompt
    from kvblend.quality.report import target_entries, write_report

    model = make_tiny("llama", vocab_size=64)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_on_newline=False)
    variants, ratios = ["plain", "prefix_product"], [0.0, 0.3, 1.0]
    docs = {}
    for ds in ("musique_s", "samsum"):
        samples = []
        for seed in range(4):
            prompt = random_prompt(64, seed=40 + seed)
            rec = evaluate_prompt(model, prompt, variants, ratios, params, metric="f1", answers=(("1 2",),))
            samples.append({"sample_id": f"{ds}/{seed}", **rec})
        for s in samples:
            assert s["runs"]["plain@1"]["same"] and s["runs"]["plain@1"]["kl_first"] < 1e-8
            assert s["runs"]["plain@0"]["recompute"] == 0.0
            assert s["runs"]["prefix_product@0.3"]["recompute"] == pytest.approx(0.3, abs=0.03)
        doc = {"schema": SCHEMA, "complete": True, "ratios": ratios,
               "setup": {"dataset": ds, "model": "smollm2-135m-instruct", "dtype": "float32", "offset": 0},
               "variants": {v: {} for v in variants}, "aggregate": aggregate(samples, variants, ratios),
               "samples": samples}
        (tmp_path / f"frontier_{ds}_tiny_float32.json").write_text(json.dumps(doc))
        docs[ds] = (doc, f"frontier_{ds}.json")
    entries = target_entries(docs, "prefix_product", ratio=0.3)
    assert {"Q2_kl_ratio_vs_plain", "Q1_score_gap"} <= set(entries)  # Q2b is left out if plain kept 0 answers
    e = entries["Q2_kl_ratio_vs_plain"]
    assert e["n_samples"] == 4 and e["better"] == "lower" and e["target"] == 0.4 and len(e["ci95"]) == 2
    worse = max(entries["Q2_kl_ratio_vs_plain"]["per_dataset"].values(), key=lambda d: d["measured"])
    assert e["measured"] == worse["measured"]
    lines = write_report(tmp_path, tmp_path / "docs")
    assert (tmp_path / "docs" / "QUALITY.md").is_file()
    assert (tmp_path / "docs" / "results" / "quality" / "frontier_musique_s_tiny_float32_kl.png").is_file()
    assert any("QUALITY.md" in line for line in lines)


def test_variants_parse_and_cli_is_torch_free_with_one_line_errors():
    assert parse_variants("prefix")[0] == "plain" and set(parse_variants("all")) == set(VARIANTS) - {"prefix_draft_product"}
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variants("nope")
    code = "import sys, kvblend.quality.cli, kvblend.quality.variants, kvblend.quality.report; " \
           "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    bad = subprocess.run([sys.executable, "-m", "kvblend.cli", "frontier", "--variants", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "unknown variant" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "kvblend.cli", "frontier", "--ratios", "0.1,2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
