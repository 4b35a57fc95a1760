"""Bad input through the CLI: one line on stderr naming the problem, non-zero exit, no traceback, and no
output file left behind. Runs in-process (the parser and every check run before any model is loaded,
except the context-length case, which uses the real default model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvblend.cli import main

HERE = Path(__file__).parent / "bad_inputs"
DATASET_FILES = sorted(p for p in (HERE / "datasets").iterdir() if p.name != "EXPECTED.json")
EXPECTED = json.loads((HERE / "datasets" / "EXPECTED.json").read_text())


def run_cli(args, capsys, results: Path) -> tuple[int, str]:
    code = main([*args, "--results-dir", str(results)] if args[0] not in ("budget", "demo") else args)
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_failure(code: int, err: str, results: Path, expect: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert expect.lower() in lines[0].lower(), lines[0]
    leftovers = [p for p in results.rglob("*") if p.is_file()] if results.exists() else []
    assert leftovers == [], leftovers


def test_corpus_is_large_enough():
    assert len(DATASET_FILES) + len(CASES) >= 30


@pytest.mark.parametrize("path", DATASET_FILES, ids=[p.name for p in DATASET_FILES])
def test_malformed_dataset_files(path, capsys, tmp_path):
    results = tmp_path / "results"
    code, err = run_cli(["retrieve", "--dataset", str(path), "--quiet"], capsys, results)
    assert_one_line_failure(code, err, results, EXPECTED[path.name])


def _write(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


def _model_folder(tmp: Path, config: dict) -> str:
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return str(folder)


LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512}

# (id, argv builder, expected substring)
CASES = [
    ("unknown_dataset_name", lambda t: ["retrieve", "--dataset", "nosuchset"], "nosuchset"),
    ("missing_dataset_file", lambda t: ["retrieve", "--dataset", str(t / "absent.json")], "no such file"),
    ("limit_zero", lambda t: ["retrieve", "--limit", "0"], "positive integer"),
    ("limit_text", lambda t: ["retrieve", "--limit", "ten"], "positive integer"),
    ("ratio_out_of_range", lambda t: ["decode", "--ratio", "1.5"], "[0, 1]"),
    ("top_k_negative", lambda t: ["retrieve", "--top-k", "-2"], "positive integer"),
    ("unknown_retrieval_mode", lambda t: ["retrieve", "--retrieval-mode", "magic"], "invalid choice"),
    ("unknown_decode_mode", lambda t: ["decode", "--mode", "turbo"], "invalid choice"),
    ("unknown_flag", lambda t: ["retrieve", "--frobnicate"], "unrecognized arguments"),
    ("bad_device", lambda t: ["retrieve", "--device", "tpu"], "device"),
    ("bad_dtype", lambda t: ["retrieve", "--dtype", "int3"], "dtype"),
    ("bad_gpu_budget", lambda t: ["build", "--gpu-budget", "lots"], "byte size"),
    ("bad_run_modes", lambda t: ["run", "--modes", "full,warp", "--dataset", "toy"], "--modes"),
    ("config_missing", lambda t: ["retrieve", "--config", str(t / "nope.toml")], "not found"),
    ("config_broken_toml", lambda t: ["retrieve", "--config", str(HERE / "cli" / "broken.toml")], "not valid toml"),
    ("config_unknown_key", lambda t: ["retrieve", "--config", str(HERE / "cli" / "unknown_key.toml")], "turbo"),
    ("config_wrong_type", lambda t: ["retrieve", "--config", str(HERE / "cli" / "wrong_type.toml")], "ratio"),
    ("config_non_utf8", lambda t: ["retrieve", "--config", str(HERE / "cli" / "non_utf8.toml")], "toml"),
    ("config_bad_mode", lambda t: ["retrieve", "--config", str(HERE / "cli" / "bad_mode.toml")], "mode"),
    # (build / decode without a retrieval file no longer fail: they retrieve first; tests/test_workflow.py)
    ("bad_start_tier", lambda t: ["decode", "--start-tier", "ssd"], "invalid choice"),
    ("gpu_chunks_negative", lambda t: ["decode", "--gpu-chunks", "-1"], "integer >= 0"),
    ("eval_without_decoding", lambda t: ["eval", "--dataset", "toy"], "no decoding files"),
    ("budget_unknown_model", lambda t: ["budget", "--model", "gpt-17"], "not a known preset"),
    ("budget_bad_memory", lambda t: ["budget", "--gpu-mem=-3GiB"], "byte size"),
    ("demo_unknown_model_folder", lambda t: ["demo", "--model", str(t / "no_model")], "neither a named model"),
    ("model_folder_without_config", lambda t: ["demo", "--model", str(t)], "no config.json"),
    ("unsupported_architecture", lambda t: ["demo", "--model", _model_folder(t, {**LLAMA, "model_type": "gpt2"})],
     "unsupported architecture"),
    ("unsupported_rope", lambda t: ["demo", "--model", _model_folder(
        t, {**LLAMA, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}})],
     "rope type 'yarn'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_cli_input(case, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KVBLEND_HOME", str(tmp_path / "home"))
    _, argv, expect = case
    results = tmp_path / "results"
    try:
        code, err = run_cli(argv(tmp_path), capsys, results)
    except SystemExit as exc:  # argparse usage errors
        code, err = exc.code, capsys.readouterr().err
    assert_one_line_failure(code, err, results, expect)


def _retrieval_file(results: Path, body: str) -> None:
    path = results / "retrieval" / "toy_rag_bm25_k5.json"
    path.parent.mkdir(parents=True)
    path.write_text(body)


@pytest.mark.parametrize("body,expect", [
    ("{broken", "unreadable"),
    ('{"dataset": "toy"}', "unreadable"),
    ('{"dataset": "toy", "mode": "bm25", "k": 5, "scope": "per_sample", "created_at": "x", '
     '"answer_recall_at_k": null, "samples": "many"}', "unreadable"),
    ('{"dataset": "toy", "mode": "dense", "k": 5, "scope": "per_sample", "created_at": "x", '
     '"answer_recall_at_k": null, "samples": []}', "made with mode=dense"),
], ids=["broken_json", "missing_fields", "samples_wrong_type", "mode_mismatch"])
def test_corrupt_retrieval_file_is_retrieved_again(body, expect, tmp_path, caplog):
    """A later stage does not stop on a bad retrieval file: it says what is wrong (one log line) and retrieves."""
    from kvblend.config import EngineConfig
    from kvblend.pipeline import load_inputs
    from kvblend.retrieval import load_retrieval

    results = tmp_path / "results"
    _retrieval_file(results, body)
    config = EngineConfig(dataset="toy", limit=1, retrieval_mode="bm25", results_dir=str(results))
    with caplog.at_level("WARNING"):
        data, by_id = load_inputs(config, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and expect in warnings[0].lower(), warnings
    run = load_retrieval(results / "retrieval" / "toy_rag_bm25_k5.json")
    assert run.mode == "bm25" and set(by_id) == {s.sample_id for s in data.samples} == {"toy/0"}


def test_corrupt_decoding_file(capsys, tmp_path):
    results = tmp_path / "results"
    p = results / "decoding" / "toy_full.json"
    p.parent.mkdir(parents=True)
    p.write_text('{"samples": []}')
    code = main(["eval", "--dataset", "toy", "--results-dir", str(results)])
    err = capsys.readouterr().err
    assert code == 1 and "corrupt or empty decoding file" in err and len(err.strip().splitlines()) == 1
    assert not (results / "eval").exists()


def test_passage_longer_than_context(capsys, tmp_path, monkeypatch):
    """A real model: the prompt check names the sample and the context size; nothing is written."""
    from kvblend.model.registry import DEFAULT_MODEL, NAMED_MODELS, converted_folder

    converted_folder(NAMED_MODELS[DEFAULT_MODEL])  # the one-time conversion (with its progress bar) first
    results = tmp_path / "results"
    long = " ".join(["word"] * 9000)
    data = _write(tmp_path, "long.json", json.dumps(
        [{"question": "q?", "answers": ["a"], "ctxs": [{"title": "", "text": long}]}]))
    assert main(["retrieve", "--dataset", data, "--results-dir", str(results), "--quiet"]) == 0
    written = {p for p in results.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = main(["build", "--dataset", data, "--results-dir", str(results), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "exceeds the 8192-token context" in err and len(err.strip().splitlines()) == 1, err
    assert {p for p in results.rglob("*") if p.is_file()} == written


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvblend.cli", "retrieve", "--dataset",
                           str(HERE / "datasets" / "broken_json.json"), "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
