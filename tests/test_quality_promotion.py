"""Quality frontier: the Q3 promotion measurement, per-sample provenance, and resuming --jobs passes from the
merged results file (the resumed GPU pass that added no sample)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny, make_tiny_folder
from kvblend.fusion.select import SelectionPolicy
from kvblend.generation.sampling import SamplingParams
from kvblend.quality.promotion import ARMS, aggregate_promotion, measure_promotion, promotion_key, recovery
from kvblend.quality.variants import VARIANTS
from test_blend import random_prompt


def _text(ids):
    return " ".join(str(i) for i in ids)


@pytest.mark.parametrize("variant", ["plain", "prefix_product_narrow"])
def test_promotion_arms_on_a_tiny_model(variant):
    """all_resident is the variant's own greedy blend answer (what the frontier's run measures); the two
    partial arms start with the first gpu_chunks chunks resident; no proxy means no promotion."""
    from kvblend.data.prompt import chunk_context_ids
    from kvblend.kvstore.builder import build_chunk_kv
    from kvblend.quality.frontier import compare, reference

    model = make_tiny("llama", vocab_size=64)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop_on_newline=False)
    prompt = random_prompt(64, seed=31, chunk_lens=(12, 10, 9, 11, 8))
    ref = reference(model, prompt, params, None)
    rec = measure_promotion(model, prompt, ref.tokens, _text(ref.tokens), params, variant, 0.3, 2,
                            answer_text=_text, metric="f1", answers=(("1 2",),))
    assert set(rec["arms"]) == set(ARMS) and rec["num_chunks"] == 5 and rec["proxy"] == "key_bounds"
    arms = rec["arms"]
    assert arms["all_resident"]["resident"] == [0, 1, 2, 3, 4]
    assert arms["promote"]["resident"] == arms["static"]["resident"] == [0, 1]
    assert arms["static"]["promotions"] == 0 and arms["all_resident"]["promotions"] == 0
    assert arms["all_resident"]["same_as_all_resident"]
    v = VARIANTS[variant]
    ctx = chunk_context_ids(None, v.chunk_sink, prompt.prefix_ids)
    chunks = [build_chunk_kv(model, c, ctx) for c in prompt.chunk_ids]
    out = compare(model, prompt, ref, chunks, "blend", 0.3,
                  SelectionPolicy(v.score_on, v.select_first_tokens, v.select_layers), params, None)
    assert arms["all_resident"]["answer"] == _text(out["tokens"])
    assert arms["all_resident"]["same"] == (out["tokens"] == ref.tokens)


def _promo_sample(i: int, exact: dict, variant: str = "prefix_product_narrow") -> dict:
    arms = {a: {"answer": "x", "same": exact[a], "exact": exact[a], "fid_rougeL": float(exact[a]),
                "score": 0.5 * exact[a], "promotions": 1 if a == "promote" else 0,
                "same_as_all_resident": exact[a] == exact["all_resident"]} for a in ARMS}
    return {"sample_id": f"musique_s/{i}", "runs": {}, "full": {"score": 0.5},
            "promotion": {promotion_key(variant, 0.15): {"arms": arms}}}


def test_recovery_ratio_and_q3_entry_in_the_report(tmp_path):
    from kvblend.quality.frontier import SCHEMA, aggregate, evaluate_prompt
    from kvblend.quality.report import Q3_KEY, default_variant, q3_entry, write_report

    dv = default_variant()  # the report measures Q3 on the EngineConfig default

    # 10 samples: all_resident keeps 8, promote 6 of them, static 3
    pattern = [(1, 1, 1)] * 3 + [(1, 1, 0)] * 3 + [(1, 0, 0)] * 2 + [(0, 0, 0)] * 2
    samples = [_promo_sample(i, dict(zip(ARMS, map(bool, p))), dv) for i, p in enumerate(pattern)]
    key = promotion_key(dv, 0.15)
    r = recovery(samples, key)
    assert r["mean"] == pytest.approx(6 / 8) and r["n"] == 10 and r["ci95"][0] <= 0.75 <= r["ci95"][1]
    assert recovery(samples, key, "static")["mean"] == pytest.approx(3 / 8)
    agg = aggregate_promotion(samples)[key]
    assert agg["promote"]["exact"]["mean"] == pytest.approx(0.6) and agg["recovery"]["static/exact"]["n"] == 10
    e = q3_entry({"musique_s": ({"samples": samples}, "src.json")}, dv)[Q3_KEY]
    assert e["measured"] == 0.75 and e["target"] == 0.9 and e["better"] == "higher" and not e["met"]
    assert e["per_dataset"]["musique_s"]["without_promotions"]["measured"] == 0.375

    # end to end: a --promotion record made by evaluate_prompt lands in summary.json and QUALITY.md
    model = make_tiny("llama", vocab_size=64)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, stop_on_newline=False)
    variants, ratios = ["plain", dv], [0.15]
    for ds in ("musique_s", "samsum"):
        recs = []
        for seed in range(3):
            prompt = random_prompt(64, seed=50 + seed)
            rec = evaluate_prompt(model, prompt, variants, ratios, params, metric="f1", answers=(("1 2",),),
                                  promotion=(dv, 0.15, 2), pass_id="p1")
            assert rec["runs"]["plain@0.15"]["pass"] == "p1" and key in rec["promotion"]
            recs.append({"sample_id": f"{ds}/{seed}", "pass": "p1", "git_sha": "abc", "command": "c", **rec})
        recs[0]["promotion"][key]["arms"]["all_resident"]["exact"] = True  # a non-zero denominator
        doc = {"schema": SCHEMA, "complete": True, "ratios": ratios,
               "setup": {"dataset": ds, "model": "smollm2-135m-instruct", "dtype": "float32", "offset": 0},
               "variants": {v: {} for v in variants}, "aggregate": aggregate(recs, variants, ratios),
               "promotion_aggregate": aggregate_promotion(recs), "samples": recs,
               "passes": [{"id": "p1", "git_sha": "abc", "command": "c"}]}
        (tmp_path / f"frontier_{ds}_tiny_float32.json").write_text(json.dumps(doc))
    write_report(tmp_path, tmp_path / "docs")
    summary = json.loads((tmp_path / "docs" / "results" / "quality" / "summary.json").read_text())
    assert Q3_KEY in summary and summary[Q3_KEY]["n_samples"] == 3
    md = (tmp_path / "docs" / "QUALITY.md").read_text()
    assert "Promotion recovery" in md and "| promote |" in md and "git `abc`: 3 samples created" in md
    redacted = json.loads((tmp_path / "docs" / "results" / "quality" / "frontier_samsum_tiny_float32.json").read_text())
    assert all("answer" not in a for s in redacted["samples"] for a in s["promotion"][key]["arms"].values())


# ------------------------------------------------------------------------------------------ resuming --jobs


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 2-layer random llama with the real SmolLM2 tokenizer (prompts are built from text)."""
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny-frontier", hidden_size=32, intermediate_size=64,
                            num_attention_heads=2, num_key_value_heads=1)


def _fake_evaluate(calls: list):
    """Stands in for evaluate_prompt (the model's numbers play no part in resuming): records what it was asked."""
    from kvblend.quality.frontier import run_key

    def fake(model, prompt, variants, ratios, params, *, done=None, pass_id="", **kw):
        calls.append((prompt.num_tokens, sorted(run_key(v, r) for v in variants for r in ratios
                                                if run_key(v, r) not in (done or {}))))
        runs = dict(done or {})
        for v in variants:
            for r in ratios:
                runs.setdefault(run_key(v, r), {"kl_first": 0.1, "kl_mean": 0.1, "same": True, "exact": True,
                                                "fid_rougeL": 1.0, "score": 0.5, "recompute": r, "prefill_ms": 1.0,
                                                "pass": pass_id})
        return {"num_tokens": prompt.num_tokens, "full": {"score": 0.5}, "runs": runs, "seconds": 0.0}
    return fake


def _pass(tiny_folder, out_dir: Path, limit: int, variants: list[str], k: int, monkeypatch, started: float):
    from kvblend.quality import frontier as fr

    monkeypatch.setenv("KVBLEND_FRONTIER_STARTED", str(started))
    monkeypatch.setenv("KVBLEND_FRONTIER_COMMAND", f"kvblend frontier --limit {limit} --variants {','.join(variants)}")
    shards = []
    for i in range(k):
        s = fr.FrontierSettings(dataset="musique_s", model=str(tiny_folder), device="cpu", variants=variants,
                                ratios=[0.15], limit=limit, out_dir=str(out_dir), progress=False, shard=(i, k))
        path, _ = fr.run_frontier(s)
        shards.append(path)
    merged = fr.output_path(s, "musique_s", "float32", shard=False)
    return fr.merge_shards(shards, merged), shards


def test_resumed_jobs_pass_continues_from_the_merged_file(tiny_folder, tmp_path, monkeypatch):
    """The bug: each --jobs worker resumed only from its own shard file, so a rerun with only the merged file at
    hand (a fresh GPU machine: shard files stay in its /tmp) recomputed the merged samples from the start and,
    under a deadline, added none; the merge then replaced whole records and kept only the last pass's command."""
    from kvblend.quality import frontier as fr

    calls: list = []
    monkeypatch.setattr(fr, "evaluate_prompt", _fake_evaluate(calls))
    doc1, shards = _pass(tiny_folder, tmp_path, 2, ["plain"], 2, monkeypatch, 1000.0)
    assert [s["sample_id"] for s in doc1["samples"]] == ["musique_s/0", "musique_s/1"] and len(calls) == 2
    first_pass = doc1["samples"][0]["pass"]
    for p in shards:  # the next call runs on a fresh machine with only the merged file
        p.unlink()
    calls.clear()
    doc2, _ = _pass(tiny_folder, tmp_path, 4, ["plain", "prefix"], 2, monkeypatch, 2000.0)
    # samples 0 and 1: only the new variant's run; samples 2 and 3: both
    asked = sorted(c[1] for c in calls)
    assert asked == sorted([["prefix@0.15"]] * 2 + [["plain@0.15", "prefix@0.15"]] * 2)
    assert [s["sample_id"] for s in doc2["samples"]] == [f"musique_s/{i}" for i in range(4)]
    s0 = doc2["samples"][0]
    assert s0["pass"] == first_pass and s0["runs"]["plain@0.15"]["pass"] == first_pass
    assert s0["runs"]["prefix@0.15"]["pass"] != first_pass
    assert len(doc2["passes"]) == 2 and len(doc2["commands"]) == 2
    assert doc2["git_shas"][0]["samples"] == 4 and doc2["git_shas"][0]["runs"] == 8
    # a rerun of the same command with everything done computes nothing
    calls.clear()
    _pass(tiny_folder, tmp_path, 4, ["plain", "prefix"], 2, monkeypatch, 3000.0)
    assert calls == []


def test_legacy_file_samples_get_inferred_provenance():
    from kvblend.quality.provenance import sha_counts, with_provenance

    doc = {"git_sha": "deadbeef", "commands": ["a [cpu]"], "hardware": "cpu",
           "samples": [{"sample_id": "x/0", "runs": {"plain@0.15": {}}}]}
    d = with_provenance(doc)
    assert d["samples"][0]["provenance"] == "inferred" and d["samples"][0]["git_sha"] == "deadbeef"
    assert sha_counts(d["samples"], d["passes"]) == [{"git_sha": "deadbeef", "samples": 1, "runs": 1,
                                                      "inferred_samples": 1}]
