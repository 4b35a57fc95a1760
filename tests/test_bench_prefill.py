"""`kvblend bench prefill`: the quick run on a tiny random model writes a complete JSON; summary entries are
derived only under the conditions their definitions ask; bad input gets one line and exit status 1."""

from __future__ import annotations

import argparse
import json

import pytest

from kvblend.bench import prefill as bench
from kvblend.bench.harness import HEADER_KEYS


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def test_quick_bench_on_a_tiny_model_writes_every_field(tmp_path, capsys):
    out = tmp_path / "results" / "prefill.json"
    args = parse(["--device", "cpu", "--quick", "--shapes", "tiny", "--iters", "1", "--warmup", "0", "--ratios",
                  "0.15,0.5", "--chunk-counts", "2", "--tiers", "gpu,cpu,disk_warm,disk_cold", "--chunks", "2",
                  "--chunk-tokens", "24", "--prefix-tokens", "4", "--query-tokens", "6", "--out", str(out),
                  "--plot", str(tmp_path / "plots")])
    assert bench.run(args) == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["dtype"] == "float32" and doc["git_sha"]
    assert {"torch", "transformers", "python"} <= set(doc["env"])
    assert HEADER_KEYS <= set(doc) and doc["env"]["torch"] == doc["torch"]  # the harness's results header
    (res,) = doc["results"]
    assert res["label"] == "tiny" and res["num_tokens"] == 4 + 2 * 24 + 6 and not res["errors"]
    for case in ("hf_forward", "full", "reuse", "blend@0.15", "blend@0.5"):
        m = res["prefill"][case]
        assert m["n"] == 1 and m["p10_ms"] <= m["median_ms"] <= m["p90_ms"] and m["median_ms"] > 0
    for case in ("full", "reuse@gpu", "blend@gpu", "blend@cpu", "blend@disk_warm", "blend@disk_cold"):
        assert res["e2e"][case]["median_ms"] > 0
    assert set(res["chunks_sweep"]["2"]) == {"full", "blend@gpu", "blend@cpu", "blend@disk_warm", "blend@disk_cold"}
    assert {"place", "layers_before_check", "check_and_select", "recompute_layers", "lm_head"} <= set(res["stages_blend"])
    assert res["checks"]["blend_auto_vs_plain_max_abs_logit_diff"] == 0.0  # plain is the CPU path
    assert res["checks"]["full_vs_hf_max_abs_logit_diff"] < 1e-4 and res["checks"]["full_vs_hf_same_argmax"]
    assert len(list((tmp_path / "plots").glob("*.png"))) == 3
    assert "(a) prefill alone" in capsys.readouterr().out


def _doc(device: str, dtype: str, label: str, full: float, blend: float, chunks: int = 6,
         e2e_full: float | None = None) -> dict:
    m = (lambda ms: {"median_ms": ms})
    return {"device": device, "dtype": dtype, "env": {}, "results": [{
        "label": label, "blend_ratio_for_targets": 0.15, "chunk_kv_mib": 1.0, "num_chunks": chunks,
        "prefill": {"full": m(full), "blend@0.15": m(blend), "hf_forward": m(full)},
        "e2e": {"full": m(e2e_full or full), "blend@gpu": m(blend), "blend_default_variant@gpu": m(2 * blend)}}]}


def test_summary_entries_only_where_defined():
    cpu = bench.summary_entries(_doc("cpu", "float32", "smollm2-real", 900.0, 300.0), "x.json")
    assert set(cpu) == {"P6_cpu_speedup", "P0_baseline_consistency"} and cpu["P6_cpu_speedup"]["measured"] == 3.0
    assert cpu["P6_cpu_speedup"]["met"] and cpu["P6_cpu_speedup"]["source"] == "x.json"
    assert set(bench.summary_entries(_doc("cpu", "float32", "tiny", 900.0, 300.0), "x.json")) == \
        {"P0_baseline_consistency"}
    gpu = bench.summary_entries(_doc("cuda", "bfloat16", "qwen2.5-1.5b", 30.0, 5.0, chunks=14, e2e_full=33.0), "y")
    assert set(gpu) == {"P1b_1p5b_7k_default_speedup", "P0_baseline_consistency"}
    assert gpu["P1b_1p5b_7k_default_speedup"]["measured"] == 3.3 and not gpu["P1b_1p5b_7k_default_speedup"]["met"]
    assert gpu["P0_baseline_consistency"]["measured"] == pytest.approx(1.1) and not gpu["P0_baseline_consistency"]["met"]
    assert bench.summary_entries(_doc("cuda", "bfloat16", "qwen2.5-1.5b", 30.0, 5.0, chunks=6), "y").keys() == \
        {"P0_baseline_consistency"}  # the 1.5B key is defined on 14 x 512 only
    eight = bench.summary_entries(_doc("cuda", "bfloat16", "llama3-8b", 200.0, 40.0, chunks=14), "z")
    assert eight["P1_8b_7k_plain_speedup"]["measured"] == 5.0 and eight["P1_8b_7k_default_speedup"]["measured"] == 2.5
    assert eight["P1d_full_vs_hf"]["measured"] == 1.0 and not eight["P1d_full_vs_hf"]["met"]


def test_retired_keys_leave_the_summary(tmp_path):
    from kvblend.bench.summary import update_summary

    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"P1_8b_blend_speedup": {"measured": 1}, "P7_tpot_ms": {"measured": 2}}))
    update_summary(path, {"P1_8b_7k_plain_speedup": {"measured": 3}}, retire=bench.RETIRED)
    assert set(json.loads(path.read_text())) == {"P7_tpot_ms", "P1_8b_7k_plain_speedup"}


@pytest.mark.parametrize("argv,msg", [
    (["--ratios", "0.1,2"], "--ratios must be numbers in [0, 1]"),
    (["--ratios", "abc"], "comma-separated numbers"),
    (["--tiers", "gpu,tape"], "unknown tier(s) tape"),
    (["--shapes", "gpt5"], "unknown shape(s) gpt5"),
    (["--from-json", "/nonexistent/prefill.json"], "cannot be read as JSON"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys, argv, msg):
    assert bench.run(parse(["--device", "cpu", "--out", str(tmp_path / "p.json"), *argv])) == 1
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err
    assert not (tmp_path / "p.json").exists()
