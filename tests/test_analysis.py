"""kvblend analyze: a synthetic results/ tree in the pipeline's file formats -> PNGs + report.md; missing inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvblend.analysis.inputs import classify, read_results
from kvblend.analysis.report import SECTIONS, analyze
from kvblend.cli import main
from kvblend.retrieval.storage import save_retrieval
from kvblend.types import Retrieved

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IDS = ("musique_s/0", "musique_s/1")  # gold answers: "Exeter College", "Charles County"


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc), encoding="utf-8")


def _retrieval(root: Path, mode: str) -> None:
    # musique_s/0: the answer in the 2nd passage (bm25) or the 1st (dense); musique_s/1: in none of the 3
    first = mode == "dense"
    retrieved = [
        Retrieved(IDS[0], ("p0", "p1", "p2"), (3.0, 2.0, 1.0),
                  ("Exeter College was founded in 1314." if first else "A river.",
                   "A bridge." if first else "He studied at Exeter College, Oxford.", "A hill.")),
        Retrieved(IDS[1], ("p0", "p1", "p2"), (3.0, 2.0, 1.0), ("A town.", "A lake.", "A road.")),
    ]
    recall = 0.5
    save_retrieval(root / "retrieval" / f"musique_s_rag_{mode}_k3.json", "musique_s", mode, 3, "per_sample",
                   retrieved, recall)


def _decode_sample(i: int, answer: str, ttft: float) -> dict:
    return {"sample_id": IDS[i], "question": "q?", "answer": answer, "raw_output": answer,
            "gold": [["Exeter College"]] if i == 0 else [["Charles County"]], "metric": "f1",
            "score": 1.0 if answer in ("Exeter College", "Charles County") else 0.0, "ttft_ms": ttft,
            "tpot_ms": ttft / 50, "num_output_tokens": 4, "output_ids": [1, 2, 3, 4], "stop_reason": "eos",
            "prompt_tokens": 300, "recomputed_tokens": 40, "chunk_ids": ["p0", "p1", "p2"]}


def _decodes(root: Path) -> None:
    answers = {"full": ("Exeter College", "Charles County"), "reuse": ("Exeter College", "Maryland"),
               "blend": ("Exeter College", "Charles County, Maryland")}
    for j, (mode, (a0, a1)) in enumerate(answers.items()):
        samples = [_decode_sample(0, a0, 3000.0 / (j + 1)), _decode_sample(1, a1, 3400.0 / (j + 1))]
        _write(root / "decoding" / f"musique_s_{mode}.json", {
            "dataset": "musique_s", "mode": mode, "ratio": {"full": 1.0, "reuse": 0.0, "blend": 0.15}[mode],
            "model": "smollm2-135m-instruct", "device": "cpu", "dtype": "float32", "metric": "f1",
            "mean_score": None, "mean_ttft_ms": 0.0, "mean_tpot_ms": 0.0, "samples": samples})


def _spec(root: Path, gpu_chunks: int, proxy: str) -> None:
    rows = []
    for i in range(2):
        row = _decode_sample(i, ("Exeter College", "Charles County")[i], 900.0 + 100 * gpu_chunks)
        row.update({"sample_index": i, "acceptance_rate": 0.5, "mean_accepted": 1.0, "num_steps": 3,
                    "tokens_per_s": 5.0, "promotions": 2 if (i == 0 and proxy != "none") else 0,
                    "promoted_chunks": [2, 1] if (i == 0 and proxy != "none") else [], "demotions": 0,
                    "initial_gpu_chunks": list(range(gpu_chunks)), "fetch_ms": 12.5,  # newer fields
                    "chunk_tiers": ["gpu"] * gpu_chunks + ["cpu"] * (3 - gpu_chunks)})
        rows.append(row)
    _write(root / "decoding" / f"musique_s_spec_ngram_{proxy}_g{gpu_chunks}.json", {
        "dataset": "musique_s", "model": "smollm2-135m-instruct", "drafter": "ngram", "draft_model": None,
        "proxy": proxy, "gpu_chunks": gpu_chunks, "top_k": 3, "threshold": 0.3, "spec_k": 4, "mode": "blend",
        "ratio": 0.15, "device": "cpu", "dtype": "float32", "metric": "f1", "mean_score": 1.0,
        "mean_ttft_ms": 1000.0, "mean_tpot_ms": 20.0, "tokens_per_s": 5.0, "acceptance_rate": 0.5,
        "promotions_per_sample": 1.0, "samples": rows})


def _step(sample: int, step: int, accepted: int, promoted=(), requested=(), gpu=(0,), scores=None) -> dict:
    gpu = sorted(set(gpu))
    return {"sample_index": sample, "sample_id": IDS[sample], "step": step, "drafted": [5, 6, 7, 8][:accepted + 1],
            "accepted": accepted, "emitted": [5] * (accepted + 1), "step_ms": 20.0, "ngram_source_chunk": None,
            "proxy_scores": scores or {"0": 0.5, "1": 0.2, "2": 0.3}, "promoted": list(promoted),
            "requested": list(requested), "demoted": [], "gpu_chunks": gpu,
            "cpu_chunks": [c for c in range(3) if c not in gpu], "bytes_moved": 1000 * len(requested),
            "copy_ms": 0.5, "gpu_bytes": 4096}


def _trace(root: Path) -> None:
    # sample 0: chunk 2 promoted in the warm start; chunk 1 requested at step 1 and fused at step 2
    rows = [_step(0, 0, 1, gpu=(0, 2)), _step(0, 1, 2, requested=(1,), gpu=(0, 1, 2)),
            _step(0, 2, 0, promoted=(1,), gpu=(0, 1, 2)),
            {**_step(0, -1, 0, promoted=(2,), requested=(2,), gpu=(0, 2)), "drafted": [], "emitted": []},
            _step(1, 0, 3), _step(1, 1, 1)]
    for r in rows[3:4]:
        for key in ("step_ms", "ngram_source_chunk", "emitted"):
            r.pop(key, None)
    _write(root / "decoding" / "speculative_trace.json", {
        "config": {"dataset": "musique_s", "model": "smollm2-135m-instruct", "drafter": "ngram",
                   "draft_model": None, "proxy": "key_bounds", "gpu_chunks": 1, "threshold": 0.3, "spec_k": 4},
        "trace": rows,
        "results": [{"sample_index": i, "sample_id": IDS[i], "answer": "x", "ttft_ms": 900.0, "tpot_ms": 20.0,
                     "acceptance_rate": 0.5, "promotions": 2 - 2 * i, "score": 1.0} for i in range(2)]})


def _sweep(root: Path) -> None:
    runs = [{"gpu_chunks": g, "proxy": p, "score": 0.5 + 0.1 * g, "metric": "f1", "fidelity_exact": g / 3,
             "fidelity_rougeL": 0.5 + g / 6, "mean_ttft_ms": 800.0 + 100 * g, "mean_tpot_ms": 20.0 + g,
             "promotions_per_sample": 0.0 if p == "none" else 1.0, "acceptance_rate": 0.4}
            for g in (1, 2, 3) for p in (("none", "key_bounds") if g < 3 else ("none",))]
    _write(root / "decoding" / "musique_s_budget_sweep.json",
           {"dataset": "musique_s", "model": "smollm2-135m-instruct", "drafter": "ngram", "top_k": 3, "runs": runs})


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    for mode in ("bm25", "dense"):
        _retrieval(root, mode)
    _decodes(root)
    _spec(root, 1, "key_bounds")
    _spec(root, 3, "none")
    _trace(root)
    _sweep(root)
    _write(root / "eval" / "musique_s_eval.json", {"dataset": "musique_s", "modes": [
        {"mode": "full", "ratio": 1.0, "num_samples": 2, "metric": "f1", "score": 1.0, "em": 1.0,
         "fidelity_exact": 1.0, "fidelity_rougeL": 1.0, "mean_ttft_ms": 3200.0, "mean_tpot_ms": 64.0}]})
    _write(root / "kv_caches" / "musique_s_kv_top3.json", {"dataset": "musique_s", "placements": []})
    return root


def test_classify_recognises_each_file_kind(results):
    inputs = read_results(results)
    kinds = sorted(f.kind for f in inputs.files)
    assert kinds == sorted(["retrieval", "retrieval", "decode", "decode", "decode", "spec", "spec", "trace", "sweep",
                            "eval", "build"])
    assert classify({"hello": 1}) is None and classify([1, 2]) is None


def test_analyze_writes_figures_and_report(results, tmp_path):
    out = results / "analysis"
    assert main(["analyze", "--results", str(results), "--quiet"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["budget_sweep_musique_s.png", "latency_musique_s.png", "quality_musique_s.png",
                     "retrieval_recall.png", "timeline_musique_s_0.png", "timeline_musique_s_1.png"]
    for p in out.glob("*.png"):
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, p
    report = (out / "report.md").read_text()
    for section in SECTIONS:
        assert f"## {section}" in report, section
    for name in names:
        assert f"({name})" in report  # every figure is linked from the report
    # recall curve recomputed from the passages and musique_s's gold answers
    assert "| musique_s | bm25 | per_sample | 2 | 0.500 (k=3) | 0.000 | 0.500 | 0.500 |" in report
    assert "| musique_s | dense | per_sample | 2 | 0.500 (k=3) | 0.500 | 0.500 | 0.500 |" in report
    # fidelity to the full-prefill answers: reuse differs on sample 1, blend's answer contains full's
    assert "| reuse | 2 | 0.500 | f1 | 0.500 |" in report
    assert "| full | 2 | 1.000 | f1 | 1.000 | 1.000 |" in report
    # TTFT ratio full / blend: (3000+3400)/2 vs (1000+1133.3)/2 -> 3.00x
    assert "| blend@0.15 | 2 | 1,067 | 3.00x |" in report
    # the timeline table: warm-start promotion of chunk 2, chunk 1 requested at step 1 and fused at step 2
    assert "| musique_s/0 | 3 | [1, 2] | 2@warm, 1@1 | 2@warm, 1@2 |" in report
    assert "| 1 | key_bounds | 0.600 |" in report  # the sweep table
    assert "| spec ngram/key_bounds 1/3 on GPU | 2 | 1,000 | 3.20x | 12.5 |" in report  # fetch_ms inside TTFT
    assert "chunk_tiers=['gpu', 'cpu', 'cpu']" in report


def test_stale_figures_removed_and_missing_sections_noted(results):
    out = results / "analysis"
    analyze(results, out, progress=False)
    assert (out / "timeline_musique_s_1.png").is_file()
    for sub in ("decoding", "eval", "kv_caches"):
        for p in (results / sub).glob("*.json"):
            p.unlink()
    analysis = analyze(results, out, progress=False)
    assert sorted(p.name for p in out.glob("*.png")) == ["retrieval_recall.png"]
    assert set(analysis.missing) == {"decoding", "quality", "budget sweep", "promotion timelines"}
    report = (out / "report.md").read_text()
    assert "Not available: no decoding files" in report and "Not available: no speculative trace" in report
    assert "section 'promotion timelines': no inputs" in report


def test_missing_optional_fields_and_bad_files_do_not_crash(tmp_path):
    root = tmp_path / "results"
    _write(root / "decoding" / "musique_s_blend.json",  # no full run, no timings, no dtype
           {"dataset": "musique_s", "mode": "blend", "samples": [{"sample_id": IDS[0], "answer": "x"}]})
    _write(root / "decoding" / "speculative_trace.json",  # an older trace: no tier sets, no config
           {"trace": [{"sample_id": IDS[0], "step": 0, "accepted": 1}, {"sample_id": IDS[0], "step": 1}]})
    (root / "decoding" / "broken.json").write_text("{not json")
    _write(root / "decoding" / "other.json", {"something": "else"})
    _write(root / "retrieval" / "mine_rag_bm25_k2.json", {"dataset": "not-a-dataset", "mode": "bm25", "k": 2,
                                                           "scope": "per_sample", "answer_recall_at_k": 0.25,
                                                           "samples": [{"sample_id": "a"}]})
    analysis = analyze(root, root / "analysis", progress=False)
    report = analysis.report.read_text()
    assert "skipped decoding/broken.json: not readable JSON" in report
    assert "skipped decoding/other.json: not a kvblend result file" in report
    assert "no full-prefill decoding file" in report
    assert "no decoding file records TTFT or TPOT" in report and not (root / "analysis" / "latency_musique_s.png").exists()
    assert "records no GPU/CPU chunk sets for 1 samples" in report
    assert "curve not computed (dataset 'not-a-dataset' not loadable" in report
    assert (root / "analysis" / "timeline_musique_s_0.png").read_bytes().startswith(PNG_MAGIC)


def test_nothing_to_analyse_is_one_line_error_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "results"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    assert main(["analyze", "--results", str(empty)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no kvblend result files to analyse" in err[0]
    assert not (empty / "analysis").exists()
    assert main(["analyze", "--results", str(tmp_path / "absent")]) == 1
    assert "no such results folder" in capsys.readouterr().err


def test_cli_module_import_is_light():
    code = ("import sys, kvblend.analysis.cli; bad = [m for m in ('torch', 'matplotlib', 'transformers') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_analysis_script_env_overrides(results, tmp_path):
    out = tmp_path / "figures"
    env = {**os.environ, "KVBLEND": str(Path(sys.executable).parent / "kvblend"), "RESULTS_DIR": str(results),
           "OUT": str(out), "MAX_TIMELINES": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "analysis" / "run_analysis.sh"), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").is_file() and len(list(out.glob("timeline_*.png"))) == 1
    assert "timelines drawn for the first 1" in (out / "report.md").read_text()


def test_trace_without_promoter_uses_the_initial_placement(tmp_path):
    """proxy none: no chunk sets per step, but the results record the initial placement, which then holds."""
    from kvblend.analysis.tables import timelines

    def trace(initial_gpu):
        return {"config": {"dataset": "musique_s", "proxy": "none", "gpu_chunks": len(initial_gpu)},
                "trace": [{"sample_id": IDS[0], "step": j, "drafted": [1], "accepted": 1, "emitted": [1, 2]}
                          for j in range(2)],
                "results": [{"sample_id": IDS[0], "initial_gpu_chunks": initial_gpu,
                             "initial_cpu_chunks": [c for c in range(3) if c not in initial_gpu]}]}
    root = tmp_path / "results"
    _write(root / "decoding" / "speculative_trace.json", trace([0]))
    _write(root / "decoding" / "trace_all.json", trace([0, 1, 2]))
    notes: list[str] = []
    found = {t.trace_file: t for t in timelines(read_results(root), notes)}
    one = found["decoding/speculative_trace.json"]
    assert one.has_tiers and one.ever_cpu and one.num_chunks == 3
    assert [s["step"] for s in one.steps] == [-2, 0, 1]
    assert all(s["gpu_chunks"] == [0] and s["cpu_chunks"] == [1, 2] for s in one.steps)
    assert not found["decoding/trace_all.json"].ever_cpu
    assert notes == ["decoding/trace_all.json: every chunk was on the GPU at every step (no CPU placeholder), so no "
                     "promotion could happen; run speculative decoding with --gpu-chunks below --top-k"]
