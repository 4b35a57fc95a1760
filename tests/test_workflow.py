"""The house rules: TTFT defined once (same starting tier per mode, builds outside TTFT, tiers recorded), one
vocabulary and one name for the GPU chunk budget, one dataset-name resolver with per-dataset policy, one model
shape type, stale stage inputs healed, failed commands leave good outputs alone, one-line encoder errors."""

from __future__ import annotations

import json
import time

import pytest

from conftest import make_tiny
from kvblend.cli import build_parser, main
from kvblend.config import EngineConfig, load_config
from kvblend.engine import Engine, SpecOptions
from kvblend.generation.sampling import SamplingParams
from kvblend.vocab import DRAFTERS, MODES, PROXIES, RETRIEVAL_MODES, TIERS
from test_blend import random_prompt


@pytest.fixture()
def tiny_engine(tmp_path):
    model = make_tiny("llama")
    prompt = random_prompt(model.shape.vocab_size, seed=5, chunk_lens=(12, 15, 9, 14))
    return Engine(EngineConfig(home=str(tmp_path), max_new_tokens=4, stop_on_newline=False), model=model), prompt


# TTFT ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", TIERS)
def test_every_mode_starts_from_the_same_tier_and_records_it(tiny_engine, tier):
    engine, prompt = tiny_engine
    sampling = SamplingParams(max_new_tokens=3, stop_on_newline=False)
    outs = {m: engine.answer(prompt, mode=m, sampling=sampling, start_tier=tier) for m in MODES}
    for mode, out in outs.items():
        assert out.chunk_tiers == (tier,) * 4, (mode, out.chunk_tiers)
        assert out.build_ms == 0.0 and out.ttft_ms > 0
        assert out.chunk_outcomes == (() if mode == "full" else ("hit",) * 4)
        assert (out.fetch_ms > 0) == (mode != "full") and out.fetch_ms <= out.ttft_ms
    spec, *_ = engine.answer_speculative(prompt, None, [0.9, 0.8, 0.2, 0.1],
                                         SpecOptions(gpu_chunks=2, drafter="none", proxy="none", mode="reuse"),
                                         sampling=sampling, start_tier=tier)
    assert spec.chunk_tiers == (tier,) * 4  # resident ones fetched to GPU, placeholders to CPU, all from `tier`


def test_building_a_missing_chunk_is_never_inside_ttft(tiny_engine, monkeypatch):
    import kvblend.engine as engine_mod

    engine, prompt = tiny_engine
    real = engine_mod.build_chunk_kv

    def slow_build(*args, **kwargs):
        time.sleep(2.0)  # far above a tiny model's TTFT even on a loaded machine
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "build_chunk_kv", slow_build)
    sampling = SamplingParams(max_new_tokens=2, stop_on_newline=False)
    for answer in (lambda: engine.answer(prompt, mode="blend", sampling=sampling),
                   lambda: engine.answer_speculative(prompt, None, [0.9, 0.8, 0.2, 0.1],
                                                     SpecOptions(gpu_chunks=2, drafter="none", proxy="none",
                                                                 mode="blend"), sampling=sampling)[0]):
        engine.store.tiers["gpu"]._items.clear(), engine.store.tiers["cpu"]._items.clear()
        for digest in list(engine.store.disk._sizes):
            engine.store.disk.remove(digest)
        engine.store.tiers["gpu"].used_bytes = engine.store.tiers["cpu"].used_bytes = 0
        out = answer()
        assert out.chunk_tiers == ("built (missing)",) * 4 and out.chunk_outcomes == ("missing",) * 4
        assert out.build_ms >= 4 * 2000 and out.ttft_ms < 2000, (out.build_ms, out.ttft_ms)  # not even one build


def test_corrupt_chunk_found_by_a_request_is_rebuilt_and_counted(tiny_engine):
    engine, prompt = tiny_engine
    sampling = SamplingParams(max_new_tokens=2, stop_on_newline=False)
    ref = engine.answer(prompt, mode="reuse", sampling=sampling, start_tier="disk")
    key = engine.chunk_key(prompt.chunk_ids[1], prompt.prefix_ids)
    tensor_path = engine.store.disk.paths(key.digest)[0]
    engine.store.stage(key, "disk")
    data = bytearray(tensor_path.read_bytes())
    data[-2] ^= 0x40
    tensor_path.write_bytes(bytes(data))
    hits = sum(engine.store.stats.hits.values())
    out = engine.answer(prompt, mode="reuse", sampling=sampling)
    assert out.chunk_tiers[1] == "built (corrupt)" and out.chunk_outcomes[1] == "corrupt"
    assert engine.store.stats.corrupt == 1 and sum(engine.store.stats.hits.values()) == hits + 3
    assert out.token_ids == ref.token_ids  # the request went on, with the same KV


def test_warm_and_prefetch_opt_outs_parse_from_flags_env_and_file(tmp_path):
    from kvblend.cli import _config_from_args

    c = EngineConfig()
    assert (c.warm_ttft, c.prefetch) == (True, True)  # warm measured, prefetch on, by default
    for command in ("decode", "run", "eval"):
        args = build_parser().parse_args([command, "--no-warm", "--no-prefetch"])
        assert (_config_from_args(args).warm_ttft, _config_from_args(args).prefetch) == (False, False)
        args = build_parser().parse_args([command])
        assert (_config_from_args(args).warm_ttft, _config_from_args(args).prefetch) == (True, True)
    assert load_config(None, {}, {"KVBLEND_PREFETCH": "0", "KVBLEND_WARM_TTFT": "false"}).prefetch is False
    toml = tmp_path / "c.toml"
    toml.write_text("warm_ttft = false\n")
    assert load_config(str(toml)).warm_ttft is False


def test_eval_shows_cold_and_warm_ttft_and_a_dash_for_files_without_warm(tmp_path):
    from kvblend.pipeline import decode_path, format_eval_table, made_from, run_eval

    config = EngineConfig(dataset="toy", limit=1, results_dir=str(tmp_path))

    def write(mode, ttfts, warm):
        rows = [{"sample_id": f"toy/{i}", "answer": "a", "raw_output": "a", "gold": [], "ttft_ms": t,
                 **({"ttft_warm_ms": w} if warm else {})} for i, (t, w) in enumerate(ttfts)]
        doc = {"made_from": made_from(config), "mode": mode, "ratio": 0.0, "metric": "f1", "start_tier": "disk",
               "mean_ttft_ms": sum(t for t, _ in ttfts) / len(ttfts), "mean_tpot_ms": 1.0, "samples": rows}
        path = decode_path(config, mode)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))

    write("full", [(100.0, 0), (300.0, 0), (110.0, 0)], warm=False)  # a file from before the warm pass
    write("reuse", [(50.0, 10.0), (70.0, 20.0), (60.0, 12.0)], warm=True)
    _, table = run_eval(config, ("full", "reuse"), progress=False)
    by_mode = {r["mode"]: r for r in table}
    assert by_mode["reuse"]["ttft_cold_ms"] == {"mean": 60.0, "median": 60.0}
    assert by_mode["reuse"]["ttft_warm_ms"] == {"mean": 14.0, "median": 12.0}
    assert by_mode["full"]["ttft_cold_ms"] == {"mean": 170.0, "median": 110.0}
    assert by_mode["full"]["ttft_warm_ms"] == {"mean": None, "median": None}
    assert by_mode["full"]["mean_ttft_ms"] == 170.0  # the old key, still the cold mean
    text = format_eval_table(table)
    assert "TTFT cold ms mean / median | TTFT warm ms mean / median" in text
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 170 / 110 | - / - |" in lines["full"] and "| 60 / 60 | 14 / 12 |" in lines["reuse"]
    assert "| 2.83x | - |" in lines["reuse"]  # cold vs full; no warm figure for full
    # an eval table written before the warm figures renders too
    old = [{k: v for k, v in r.items() if k not in ("ttft_cold_ms", "ttft_warm_ms")} for r in table]
    assert "| 170 / - | - / - |" in format_eval_table(old)


# one vocabulary ---------------------------------------------------------------------------------------------
def test_argparse_choices_come_from_the_vocabulary():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    decode = {a.dest: a for a in sub["decode"]._actions}
    assert tuple(decode["mode"].choices) == MODES and tuple(decode["drafter"].choices) == DRAFTERS
    assert tuple(decode["proxy"].choices) == PROXIES and tuple(decode["retrieval_mode"].choices) == RETRIEVAL_MODES
    assert tuple(decode["start_tier"].choices) == TIERS
    assert "--gpu-chunks" in decode["gpu_chunks"].option_strings and "--top-k-gpu" in decode["gpu_chunks"].option_strings


def test_gpu_chunk_budget_has_one_name_and_old_keys_are_aliases(tmp_path, caplog):
    c = EngineConfig()
    assert (c.gpu_chunks, c.retrieval_mode, c.start_tier) == (2, "both", "cpu")  # workflow defaults
    assert SpecOptions.from_config(c).gpu_chunks == 2
    toml = tmp_path / "c.toml"
    toml.write_text("top_k_gpu = 3\n")
    with caplog.at_level("WARNING"):
        assert load_config(str(toml)).gpu_chunks == 3
    assert "deprecated" in caplog.text and "gpu_chunks" in caplog.text
    assert load_config(None, {}, {"KVBLEND_MAX_GPU_CHUNKS": "4"}).gpu_chunks == 4
    assert load_config(None, {}, {"KVBLEND_TOP_K_GPU": "4", "KVBLEND_GPU_CHUNKS": "1"}).gpu_chunks == 1
    with pytest.raises(ValueError, match="start_tier"):
        EngineConfig(start_tier="ssd")
    with pytest.raises(ValueError, match="unknown proxy"):
        SpecOptions(proxy="magic")


# datasets: one resolver, policy with the dataset ----------------------------------------------------------
def test_dataset_name_resolver(tmp_path):
    from kvblend.data.datasets import dataset_name, load_dataset
    from kvblend.pipeline import paths

    assert dataset_name("musique_s") == "musique_s" and dataset_name("data/foo.jsonl") == "foo"
    assert dataset_name("foo.jsonl") == "foo" and dataset_name(tmp_path) == tmp_path.name
    src = tmp_path / "mine.jsonl"
    src.write_text(json.dumps({"question": "q?", "answers": ["a"], "ctxs": [{"title": "", "text": "t"}]}) + "\n")
    data = load_dataset(str(src))
    p = paths(EngineConfig(dataset="mine.jsonl", results_dir=str(tmp_path)))
    assert data.name == "mine" and p["retrieval"].name == "mine_rag_both_k5.json"
    assert data.max_context_tokens == 0 and load_dataset("musique_s", limit=1).max_context_tokens == 0


def test_samsum_context_cap_is_declared_with_the_dataset(tmp_path):
    from kvblend.data.datasets import SAMSUM_CONTEXT_TOKENS, load_dataset

    rows = [{"id": str(i), "dialogue": f"A: hi {i}\nB: bye {i}", "summary": f"they part {i}"} for i in range(8)]
    src = tmp_path / "samsum_like.json"
    src.write_text(json.dumps(rows))
    data = load_dataset(str(src), limit=2)
    assert data.metric == "rougeL" and data.max_context_tokens == SAMSUM_CONTEXT_TOKENS == 3400


# one shape type -------------------------------------------------------------------------------------------
def test_one_model_shape_type_shared_by_runner_budget_and_benchmarks():
    from kvblend.budget import resolve_shape
    from kvblend.model.hf import ModelShape as HfShape
    from kvblend.model.hf import random_model
    from kvblend.model.shape import PRESETS, ModelShape

    assert HfShape is ModelShape and resolve_shape("smollm2-135m") is PRESETS["smollm2-135m-instruct"]
    small = ModelShape(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                       vocab_size=128, model_type="qwen2", attention_bias=True, tie_word_embeddings=True,
                       max_position_embeddings=512, rope_theta=1e6)
    model = random_model(small.hf_config(), model_type="qwen2", seed=0, name="x")
    assert model.shape == small


# stale inputs heal; failures leave good outputs alone -------------------------------------------------------
def test_retrieval_file_with_fewer_samples_than_limit_heals(tmp_path, caplog):
    from kvblend.pipeline import load_inputs, run_retrieve
    from kvblend.retrieval import load_retrieval

    config = EngineConfig(dataset="toy", limit=1, top_k=2, retrieval_mode="bm25", results_dir=str(tmp_path))
    path, _ = run_retrieve(config, progress=False)
    assert len(load_retrieval(path).retrieved) == 1
    more = EngineConfig(dataset="toy", limit=3, top_k=2, retrieval_mode="bm25", results_dir=str(tmp_path))
    with caplog.at_level("WARNING"):
        data, by_id = load_inputs(more, progress=False)
    assert "lacks 2 of the 3 samples" in caplog.text
    assert set(by_id) == {s.sample_id for s in data.samples} and len(load_retrieval(path).retrieved) == 3
    before = path.read_bytes()
    load_inputs(config, progress=False)  # a smaller --limit never shrinks a file that covers it
    assert path.read_bytes() == before
    other_k = EngineConfig(dataset="toy", limit=1, top_k=2, retrieval_mode="bm25", results_dir=str(tmp_path))
    path.write_text(path.read_text().replace('"k": 2', '"k": 3'))  # a file that lies about its settings
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_inputs(other_k, progress=False)
    assert "made with mode=bm25 k=3" in caplog.text and load_retrieval(path).k == 2


def test_failed_run_leaves_a_covering_retrieval_file_untouched(tmp_path, capsys):
    from kvblend.pipeline import run_retrieve

    results = tmp_path / "results"
    config = EngineConfig(dataset="toy", limit=3, top_k=2, retrieval_mode="bm25", results_dir=str(results))
    path, _ = run_retrieve(config, progress=False)
    before = path.read_bytes()
    code = main(["run", "--dataset", "toy", "--limit", "1", "--top-k", "2", "--retrieval-mode", "bm25",
                 "--results-dir", str(results), "--model", str(tmp_path / "no_such_model"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert path.read_bytes() == before  # 3 samples, not the 1 this failed run asked for
    assert not (results / "kv_caches").exists() and not (results / "decoding").exists()


def test_missing_minilm_wheel_is_one_line(tmp_path, monkeypatch, capsys):
    import kvblend.retrieval.encoders as enc

    monkeypatch.setattr(enc, "MINILM_PACKAGE", "kvblend_no_such_minilm_package")
    code = main(["retrieve", "--dataset", "toy", "--limit", "1", "--retrieval-mode", "dense", "--quiet",
                 "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "not installed" in err
    assert not (tmp_path / "retrieval").exists()


def test_warm_start_docstring_states_what_blend_gets():
    from kvblend.generation.promotion import Promoter

    doc = Promoter.warm_start.__doc__
    assert "reuse" in doc and "blend" in doc and "exactly as if" not in doc


def test_speculative_full_prefill_fetches_nothing_and_matches_plain(tmp_path):
    model = make_tiny("llama")
    prompt = random_prompt(model.shape.vocab_size, seed=6, chunk_lens=(10, 12, 8))
    engine = Engine(EngineConfig(home=str(tmp_path), mode="full", max_new_tokens=5, stop_on_newline=False), model)
    sampling = SamplingParams(max_new_tokens=5, stop_on_newline=False)
    plain = engine.answer(prompt, mode="full", sampling=sampling, start_tier="disk")
    out, _, trace, placement = engine.answer_speculative(prompt, None, [0.3, 0.2, 0.1],
                                                         SpecOptions(gpu_chunks=3, proxy="key_bounds"),
                                                         sampling=sampling, start_tier="disk")
    assert out.token_ids == plain.token_ids and trace == [] and out.fetch_ms == 0.0
    assert out.chunk_tiers == ("disk",) * 3 and not placement.placeholders
    assert not any(engine.store.is_pinned(s.key) for s in placement.slots)
