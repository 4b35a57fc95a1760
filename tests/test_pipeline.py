"""The user pipeline end to end on the real default model: retrieve, build (and resume), decode, eval,
speculative decode with its trace."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kvblend.config import EngineConfig
from kvblend.engine import Engine
from kvblend.model.registry import load_model
from kvblend.pipeline import (format_eval_table, run_budget_sweep, run_build, run_decode, run_eval, run_retrieve,
                              run_speculative)
from kvblend.retrieval import load_retrieval


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    config = EngineConfig(home=str(tmp / "home"), results_dir=str(tmp / "results"), dataset="toy", limit=1,
                          max_new_tokens=8, top_k=4, gpu_chunks=4)
    model = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    return config, model


def test_pipeline_end_to_end(setup):
    config, model = setup
    path, recall = run_retrieve(config, progress=False)
    assert recall is None  # toy samples have no gold answers
    run = load_retrieval(path)
    assert path.name == "toy_rag_both_k4.json" and len(run.retrieved[0].passage_ids) == 4  # hybrid by default

    summary = json.loads(run_build(config, engine=Engine(config, model=model), progress=False).read_text())
    assert (summary["chunks_built"], summary["chunks_reused"]) == (4, 0)
    assert summary["model_fingerprint"] == model.fingerprint and len(summary["placements"]) == 1

    # an interrupted build: one chunk file lost; a fresh process rebuilds only that one
    engine = Engine(config, model=model)
    victim = summary["placements"][0]["chunks"][2]["key"]
    for p in engine.store.disk.paths(victim):
        p.unlink()
    engine = Engine(config, model=model)
    again = json.loads(run_build(config, engine=engine, progress=False).read_text())
    assert (again["chunks_built"], again["chunks_reused"]) == (1, 3)

    for mode in ("full", "blend"):
        res = json.loads(run_decode(config, mode=mode, engine=engine, progress=False).read_text())
        row = res["samples"][0]
        assert row["num_output_tokens"] >= 1 and row["ttft_ms"] > 0 and row["prompt_tokens"] > 1000
        # every mode of the comparison starts with its chunks on the same tier, recorded per sample
        assert res["start_tier"] == "cpu" and row["chunk_tiers"] == ["cpu"] * 4 and row["build_ms"] == 0
        assert (row["fetch_ms"] > 0) == (mode != "full")
        assert res["made_from"]["dataset"] == "toy" and res["made_from"]["limit"] == 1
        # the warm TTFT beside the cold one: the same request with its chunks GPU-resident (full: its own TTFT)
        assert row["ttft_warm_ms"] > 0 and res["warm_ttft"] and res["mean_ttft_warm_ms"] == row["ttft_warm_ms"]
        assert row["warm_chunk_tiers"] == (["cpu"] * 4 if mode == "full" else ["gpu"] * 4)
        assert (row["ttft_warm_ms"] == row["ttft_ms"]) == (mode == "full")
        assert res["median_ttft_ms"] == row["ttft_ms"] and row["prefetched_chunks"] == 0
    path, table = run_eval(config, ("full", "blend"))
    by_mode = {r["mode"]: r for r in table}
    assert by_mode["full"]["fidelity_exact"] == 1.0 and by_mode["blend"]["fidelity_rougeL"] is not None
    blend = by_mode["blend"]
    assert blend["ttft_cold_ms"]["mean"] == blend["mean_ttft_ms"] > 0 and blend["ttft_warm_ms"]["median"] > 0
    assert "TTFT warm ms mean / median" in format_eval_table(table)
    assert json.loads(path.read_text())["modes"] == table
    # --no-warm: one prefill per sample, no warm figures (eval shows '-')
    res = json.loads(run_decode(replace(config, warm_ttft=False), mode="reuse", engine=engine,
                                progress=False).read_text())
    assert res["warm_ttft"] is False and res["mean_ttft_warm_ms"] is None
    assert res["samples"][0]["ttft_warm_ms"] is None
    _, table = run_eval(config, ("full", "reuse"))
    assert {r["mode"]: r for r in table}["reuse"]["ttft_warm_ms"] == {"mean": None, "median": None}

    spec = json.loads(run_speculative(config, engine=engine, gpu_chunks=2, proxy="key_bounds",
                                      progress=False).read_text())
    assert spec["samples"][0]["initial_gpu_chunks"] == [0, 1]
    trace = json.loads((Path(config.results_dir) / "decoding" / "speculative_trace.json").read_text())
    assert trace["results"][0]["sample_id"] == "toy/0"
    assert trace["trace"] and all("gpu_chunks" in r for r in trace["trace"] if "proxy_scores" in r)


def test_budget_sweep(setup):
    config, _ = setup  # runs after test_pipeline_end_to_end: retrieval file and chunks exist
    path, runs = run_budget_sweep(config, max_chunks=2, progress=False)
    assert [(r["gpu_chunks"], r["proxy"]) for r in runs] == [(1, "none"), (1, "key_bounds"), (2, "none")]
    assert runs[-1]["fidelity_exact"] == 1.0  # the all-resident run is its own reference
    assert json.loads(path.read_text())["runs"] == runs


def test_corrupt_chunk_in_the_middle_of_kvblend_run_heals_in_one_run(tmp_path, monkeypatch, capsys):
    """A chunk file goes bad between build and decode: the run rebuilds it where the request finds it (counted as
    corrupt, built outside TTFT), finishes, and a decoding file made from other inputs is decoded again by eval."""
    import kvblend.pipeline as pipeline
    from kvblend.cli import main
    from kvblend.pipeline import decode_path, run_eval

    results, home = tmp_path / "results", tmp_path / "home"
    (tmp_path / "c.toml").write_text(f'home = "{home}"\nmax_new_tokens = 3\n')
    args = ["--config", str(tmp_path / "c.toml"), "--dataset", "toy", "--limit", "1", "--top-k", "2",
            "--retrieval-mode", "bm25", "--results-dir", str(results), "--start-tier", "disk", "--quiet"]
    real_decode = pipeline.run_decode
    corrupted, used_home = [], []

    def decode_after_damage(config, mode=None, engine=None, progress=True):
        if not corrupted:  # mid-run: the build is done, no answer has been given yet
            # the home the run resolved (KVBLEND_HOME, as CI sets it, wins over the TOML file)
            used_home.append(Path(config.home).expanduser())
            summary = json.loads(next((results / "kv_caches").glob("*.json")).read_text())
            victim = summary["placements"][0]["chunks"][1]["key"]
            tensor = next((used_home[0] / "chunks").rglob(f"{victim}.safetensors"))
            data = bytearray(tensor.read_bytes())
            data[-3] ^= 0x20
            tensor.write_bytes(bytes(data))
            corrupted.append(victim)
        return real_decode(config, mode=mode, engine=engine, progress=progress)

    monkeypatch.setattr(pipeline, "run_decode", decode_after_damage)
    assert main(["run", "--modes", "reuse", *args]) == 0, capsys.readouterr().err
    res = json.loads((results / "decoding" / "toy_reuse.json").read_text())
    row = res["samples"][0]
    assert corrupted and row["chunk_tiers"] == ["disk", "built (corrupt)"] and row["build_ms"] > 0
    assert row["num_output_tokens"] >= 1 and (results / "eval" / "toy_eval.json").is_file()

    # a decoding file made from other inputs (here: another --limit) is decoded again, not trusted
    path = decode_path(EngineConfig(dataset="toy", top_k=2, retrieval_mode="bm25", results_dir=str(results)), "reuse")
    doc = json.loads(path.read_text())
    doc["made_from"]["limit"] = 7
    path.write_text(json.dumps(doc))
    config = EngineConfig(home=str(used_home[0]), max_new_tokens=3, dataset="toy", limit=1, top_k=2, retrieval_mode="bm25",
                          results_dir=str(results), start_tier="disk")
    run_eval(config, ("reuse",), progress=False)
    assert json.loads(path.read_text())["made_from"]["limit"] == 1
