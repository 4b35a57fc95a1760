"""Token budget calculator against hand-computed values and against real parameter counts."""

from __future__ import annotations

import pytest

from conftest import make_tiny
from kvblend.budget import kv_bytes_per_token, num_parameters, plan_budget
from kvblend.model.shape import PRESETS, from_config_dict
from kvblend.cli import main
from kvblend.config import parse_bytes

KiB, GiB = 1024, 1024**3


@pytest.mark.parametrize("name,expected", [("llama-3-8b", 128 * KiB), ("qwen2.5-7b", 56 * KiB),
                                           ("smollm2-135m", 22.5 * KiB), ("mistral-7b", 128 * KiB)])
def test_kv_bytes_per_token_bf16(name, expected):
    assert kv_bytes_per_token(PRESETS[name], "bfloat16") == expected
    assert kv_bytes_per_token(PRESETS[name], "float32") == 2 * expected


def test_parameter_counts_match_published_sizes():
    assert num_parameters(PRESETS["llama-3-8b"]) == 8_030_261_248
    assert num_parameters(PRESETS["qwen2.5-7b"]) == 7_615_616_512
    assert num_parameters(PRESETS["smollm2-135m"]) == 134_515_008


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_parameter_count_matches_a_real_model(model_type):
    model = make_tiny(model_type)
    dims = from_config_dict(model.hf_model.config.to_dict(), "tiny")
    real = sum(p.numel() for p in model.hf_model.parameters())
    assert num_parameters(dims) == real


def test_plan_llama3_8b_on_80gib():
    plan = plan_budget(PRESETS["llama-3-8b"], 80 * GiB, "bfloat16")
    weights = 8_030_261_248 * 2
    workspace = 8 * GiB
    assert plan.weights_bytes == weights and plan.workspace_bytes == workspace
    assert plan.max_tokens == (80 * GiB - weights - workspace) // (128 * KiB)
    assert plan.max_chunks == plan.max_tokens // 512
    tiny = plan_budget(PRESETS["llama-3-8b"], 16 * GiB, "bfloat16")
    assert tiny.max_tokens == 0 and tiny.kv_bytes_available == 0  # weights alone do not fit


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GiB and parse_bytes("1.5 GB") == 1_500_000_000 and parse_bytes(7) == 7
    for bad in ("eighty", "80XB", "-1GiB", True):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_budget_cli_table_and_errors(capsys, tmp_path):
    assert main(["budget", "--model", "llama-3-8b", "--gpu-mem", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "131072 (128.0 KiB)" in out and "max KV tokens" in out
    assert main(["budget", "--model", "nope", "--gpu-mem", "80GiB"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a known preset" in err
    assert main(["budget", "--gpu-mem", "lots"]) == 1
    assert "byte size" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2}')
    assert main(["budget", "--model", str(tmp_path)]) == 1
    assert "config.json lacks" in capsys.readouterr().err


def test_keep_within_drops_middle_chunks_first():
    from kvblend.pipeline import keep_within

    assert keep_within([100, 100, 100, 100, 100], 350) == [0, 1, 4]
    assert keep_within([100, 100, 100], 0) == [0, 1, 2]  # no cap
    assert keep_within([500, 600], 100) == [0]  # never below one chunk
    assert keep_within([10, 20, 30], 60) == [0, 1, 2]
