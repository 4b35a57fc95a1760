"""The bench harness (kvblend/bench/harness.py): percentiles as numpy computes them, round-robin timing loops
that count only the rounds after the warm-up and synchronise the device around every call, and the results
header every benchmark writes. No test here depends on how long anything takes."""

from __future__ import annotations

import math
import random
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvblend.bench import harness


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_percentile_matches_numpy(n):
    rng = random.Random(n)
    values = [rng.uniform(-5, 50) for _ in range(n)]
    for q in (0, 1, 10, 25, 50, 90, 99, 100, 33.3):
        assert harness.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-12)


def test_percentile_refuses_no_values_and_q_outside_0_100():
    with pytest.raises(ValueError, match="no values"):
        harness.percentile([], 50)
    with pytest.raises(ValueError, match="q must be"):
        harness.percentile([1.0], 101)
    assert harness.percentile(iter([3.0, 1.0, 2.0]), 50) == 2.0  # any iterable, order does not matter


def test_median_skips_nan():
    assert harness.median([1.0, float("nan"), 3.0]) == 2.0
    assert math.isnan(harness.median([float("nan")])) and math.isnan(harness.median([]))


def test_summarise_and_distribution_keys_and_values():
    s = harness.summarise([4.0, 1.0, 3.0, 2.0])
    assert s == {"median_ms": 2.5, "p10_ms": pytest.approx(1.3), "p90_ms": pytest.approx(3.7), "min_ms": 1.0,
                 "n": 4, "all_ms": [4.0, 1.0, 3.0, 2.0]}
    values = list(range(1, 101))
    d = harness.distribution(values)
    assert set(d) == {"p50", "p90", "p99", "mean"} and d["mean"] == 50.5
    assert d["p99"] == pytest.approx(np.percentile(values, 99))
    assert harness.distribution([]) == {"p50": None, "p90": None, "p99": None, "mean": None}


def _counting_cases(log: list[str], names=("a", "b")):
    counts = dict.fromkeys(names, 0)

    def case(name):
        def fn():
            counts[name] += 1
            log.append(name)
            return counts[name]
        return fn

    return {n: case(n) for n in names}


def test_round_robin_counts_only_rounds_after_warmup_and_alternates_cases():
    log: list[str] = []
    got = harness.round_robin(_counting_cases(log), warmup=2, iters=3, device=torch.device("cpu"),
                              value=lambda out, _ms: out)
    assert got == {"a": [3, 4, 5], "b": [3, 4, 5]}  # calls 1 and 2 of each case were the warm-up
    assert log == ["a", "b"] * 5
    walls = harness.round_robin(_counting_cases([]), warmup=0, iters=2, device="cpu")
    assert all(len(v) == 2 and all(ms >= 0 for ms in v) for v in walls.values())
    with pytest.raises(ValueError):
        harness.round_robin(_counting_cases([]), warmup=0, iters=0, device="cpu")


def test_cuda_path_synchronises_before_and_after_every_call(monkeypatch):
    log: list[str] = []
    device = SimpleNamespace(type="cuda")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d: log.append("sync") if d is device else 1 / 0)
    harness.round_robin(_counting_cases(log), warmup=1, iters=1, device=device)
    assert log == ["sync", "a", "sync", "sync", "b", "sync"] * 2


def test_cpu_path_never_touches_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: pytest.fail("synchronised a CPU run"))
    log: list[str] = []
    harness.round_robin(_counting_cases(log), warmup=1, iters=1, device=torch.device("cpu"))
    out, ms = harness.timed_ms(lambda: "x", "cpu")
    assert out == "x" and ms >= 0 and log == ["a", "b", "a", "b"]


def test_mean_device_ms_runs_warmup_then_reps_on_cpu():
    calls = []
    ms = harness.mean_device_ms(lambda: calls.append(1), "cpu", reps=4, warmup=2)
    assert len(calls) == 6 and ms >= 0


def test_results_header_fields(monkeypatch):
    monkeypatch.setenv("KVBLEND_GIT_SHA", "abc123")
    h = harness.results_header(torch.device("cpu"), argv=["kvblend", "bench", "prefill", "--out", "a b.json"])
    assert set(h) == harness.HEADER_KEYS == {"command", "git_sha", "python", "torch", "transformers", "device_name",
                                             "started_utc"}
    assert h["git_sha"] == "abc123" and h["torch"] == torch.__version__ and h["transformers"]
    assert h["command"] == "kvblend bench prefill --out 'a b.json'"
    assert h["device_name"].startswith("cpu (")
    time.strptime(h["started_utc"], harness.TIME_FORMAT)
    assert harness.results_header()["device_name"].startswith("cpu (")  # no device: the host CPU
