"""`--dtype auto` on CPU: the decision logic with the probe injected, the cache, and explicit dtypes bypassing it."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kvblend.model import dtype_probe
from kvblend.model.dtype_probe import CpuDtypeDecision, cpu_bf16_flags, decide_cpu_dtype
from kvblend.model.hf import resolve_dtype

CPU = torch.device("cpu")


def _probe_returning(fp32_ms: float, bf16_ms: float, calls: list):
    def probe():
        calls.append(1)
        return fp32_ms, bf16_ms
    return probe


def test_bf16_when_supported_and_faster():
    calls: list = []
    d = decide_cpu_dtype(("avx512_bf16",), _probe_returning(10.0, 3.4, calls))
    assert d.dtype == "bfloat16" and d.torch_dtype is torch.bfloat16
    assert calls == [1] and (d.fp32_ms, d.bf16_ms) == (10.0, 3.4)


def test_fp32_when_supported_but_bf16_slower_or_not_clearly_faster():
    calls: list = []
    assert decide_cpu_dtype(("amx_bf16",), _probe_returning(5.0, 30.0, calls)).dtype == "float32"
    assert decide_cpu_dtype(("amx_bf16",), _probe_returning(5.0, 4.9, calls)).dtype == "float32"  # within noise
    assert len(calls) == 2


def test_fp32_without_bf16_support_never_probes():
    def probe():
        raise AssertionError("the probe must not run on a CPU without bf16 matrix support")
    d = decide_cpu_dtype((), probe)
    assert d.dtype == "float32" and d.fp32_ms is None


def test_cpuinfo_flags_parsed():
    text = "processor : 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n"
    flags = cpu_bf16_flags(text)
    assert "avx512_bf16" in flags and "amx_bf16" not in flags


def test_auto_cpu_decided_once_per_process_and_logged_once(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("KVBLEND_HOME", str(tmp_path))
    dtype_probe.clear_cache()
    calls: list = []
    monkeypatch.setattr(dtype_probe, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    monkeypatch.setattr(dtype_probe, "probe_matmul_ms", lambda h, i: (calls.append((h, i)), (8.0, 2.0))[1])
    try:
        with caplog.at_level(logging.INFO, logger="kvblend.model.dtype_probe"):
            assert resolve_dtype("auto", CPU, (64, 128)) is torch.bfloat16
            assert resolve_dtype("auto", CPU, (64, 128)) is torch.bfloat16
        assert calls == [(64, 128)]
        assert sum("--dtype auto on CPU -> bfloat16" in r.getMessage() for r in caplog.records) == 1
        monkeypatch.setattr(dtype_probe, "probe_matmul_ms", lambda h, i: (calls.append((h, i)), (2.0, 8.0))[1])
        assert resolve_dtype("auto", CPU, (32, 96)) is torch.float32  # another shape class: probed again
        assert calls == [(64, 128), (32, 96)]
    finally:
        dtype_probe.clear_cache()


@pytest.mark.parametrize("name,expected", [("float32", torch.float32), ("fp32", torch.float32),
                                           ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                           ("float16", torch.float16)])
def test_explicit_dtypes_and_cuda_auto_bypass_the_probe(monkeypatch, name, expected):
    def boom(*a, **k):
        raise AssertionError("explicit dtypes and CUDA must not probe")
    monkeypatch.setattr(dtype_probe, "auto_cpu_dtype", boom)
    monkeypatch.setattr(dtype_probe, "probe_matmul_ms", boom)
    assert resolve_dtype(name, CPU) is expected
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16


def test_request_cost_counts_decode_rows(monkeypatch):
    """bf16 4x faster on prefill blocks but 300x slower on single rows (oneDNN threads on busy cores): fp32."""
    monkeypatch.setattr(dtype_probe, "probe_shapes_ms",
                        lambda *a: {"float32": (5.0, 0.05), "bfloat16": (1.25, 15.0)})
    fp32_ms, bf16_ms = dtype_probe.probe_matmul_ms(576, 1536)
    blocks = dtype_probe.REQUEST_PREFILL_TOKENS / dtype_probe.PROBE_TOKENS
    assert fp32_ms == pytest.approx(blocks * 5.0 + dtype_probe.REQUEST_DECODE_TOKENS * 0.05)
    assert decide_cpu_dtype(("avx512_bf16",), lambda: (fp32_ms, bf16_ms)).dtype == "float32"
    monkeypatch.setattr(dtype_probe, "probe_shapes_ms",
                        lambda *a: {"float32": (5.0, 0.05), "bfloat16": (1.25, 0.07)})
    assert decide_cpu_dtype(("avx512_bf16",), lambda: dtype_probe.probe_matmul_ms(576, 1536)).dtype == "bfloat16"


def test_real_probe_is_quick_and_positive():
    import time

    t0 = time.perf_counter()
    fp32_ms, bf16_ms = dtype_probe.probe_matmul_ms(64, 128, tokens=64)
    assert fp32_ms > 0 and bf16_ms > 0
    assert time.perf_counter() - t0 < 2.0
    assert isinstance(decide_cpu_dtype(cpu_bf16_flags(), lambda: (fp32_ms, bf16_ms)), CpuDtypeDecision)


def test_decision_kept_across_processes_until_it_expires(monkeypatch, tmp_path):
    monkeypatch.setenv("KVBLEND_HOME", str(tmp_path))
    monkeypatch.setattr(dtype_probe, "cpu_bf16_flags", lambda: ("amx_bf16",))
    calls: list = []
    monkeypatch.setattr(dtype_probe, "probe_matmul_ms", lambda h, i: (calls.append(1), (9.0, 3.0))[1])
    dtype_probe.clear_cache()
    try:
        assert dtype_probe.auto_cpu_dtype((64, 128)).dtype == "bfloat16" and calls == [1]
        kept = json.loads((tmp_path / dtype_probe.DECISIONS_FILE).read_text())
        assert [v["dtype"] for v in kept.values()] == ["bfloat16"]
        dtype_probe.clear_cache()  # a new process: the kept decision is used, no probe
        assert dtype_probe.auto_cpu_dtype((64, 128)).dtype == "bfloat16" and calls == [1]
        key = dtype_probe.machine_key((64, 128))
        kept[key]["decided_at"] -= dtype_probe.DECISION_TTL_S + 1  # expired: probed again
        (tmp_path / dtype_probe.DECISIONS_FILE).write_text(json.dumps(kept))
        dtype_probe.clear_cache()
        monkeypatch.setattr(dtype_probe, "probe_matmul_ms", lambda h, i: (calls.append(2), (3.0, 9.0))[1])
        assert dtype_probe.auto_cpu_dtype((64, 128)).dtype == "float32" and calls == [1, 2]
        (tmp_path / dtype_probe.DECISIONS_FILE).write_text("{corrupt")  # unreadable: probed, rewritten
        dtype_probe.clear_cache()
        assert dtype_probe.auto_cpu_dtype((64, 128)).dtype == "float32" and calls == [1, 2, 2]
        assert json.loads((tmp_path / dtype_probe.DECISIONS_FILE).read_text())[key]["dtype"] == "float32"
    finally:
        dtype_probe.clear_cache()
