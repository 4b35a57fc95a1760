"""The seed-compatible wrapper scripts honour their environment overrides and write the expected files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    kvblend = Path(sys.executable).parent / "kvblend"
    full_env = {**os.environ, "KVBLEND": str(kvblend), "KVBLEND_HOME": str(tmp_path / "home"), **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / script)], env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_token_budget_script_env_overrides(tmp_path):
    proc = run_script("run_token_budget_test.sh", {"MODEL": "qwen2.5-7b", "GPU_MEM": "141GB"}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "57344 (56.0 KiB)" in proc.stdout and "131.3 GiB" in proc.stdout


def test_retrieval_script_env_overrides(tmp_path):
    results = tmp_path / "results"
    proc = run_script("retrieval/run_retrieval.sh", {"DATASET": "toy", "TOP_K": "3", "LIMIT": "2",
                                                     "RESULTS_DIR": str(results)}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((results / "retrieval" / "toy_rag_both_k3.json").read_text())
    assert data["k"] == 3 and len(data["samples"]) == 2


def test_script_bad_override_is_one_line(tmp_path):
    proc = run_script("build_kv_cache.sh", {"DATASET": "toy", "TOP_K": "zero", "RESULTS_DIR": str(tmp_path)},
                      tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--top-k" in proc.stderr
