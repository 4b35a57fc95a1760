"""`--dtype auto` on CPU: bf16 where the CPU multiplies bf16 matrices natively AND a quick probe shows it faster.

Some CPUs (AVX512-BF16, AMX) run a bf16 matmul several times faster than fp32; on the others bf16 is emulated
and several times slower. The decision therefore needs both a capability check (the `avx512_bf16` / `amx_bf16`
flags in /proc/cpuinfo, or torch's own oneDNN query) and a measurement: a few matmuls of the model's shape class
(a block of PROBE_TOKENS tokens through the MLP's up and down projections, the bulk of a prefill), timed in both
dtypes, interleaved, well under a second. bf16 is chosen only when it is clearly faster (by BF16_MARGIN).

The decision is made once per process and shape class (cached) and logged once. Explicit dtypes never probe;
on CUDA, auto is bf16 without probing (see kvblend.model.hf.resolve_dtype). Quality comparisons ask for
float32 explicitly and are not affected.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
PROBE_TOKENS = 512  # rows of the probe block: a prefill-sized chunk
DEFAULT_SHAPE = (576, 1536)  # (hidden, intermediate) of SmolLM2-135M, the default model
BF16_MARGIN = 0.9  # bf16 must take at most 90% of the fp32 time (timing noise on shared cores)
PROBE_BUDGET_S = 0.8  # stop repeating once this much time is spent


@dataclass(frozen=True, slots=True)
class CpuDtypeDecision:
    """What `--dtype auto` resolved to on this CPU, and why."""

    dtype: str  # "bfloat16" | "float32"
    reason: str
    bf16_flags: tuple[str, ...]  # bf16 matrix capabilities found
    fp32_ms: float | None = None  # probe time per repetition (None when the probe did not run)
    bf16_ms: float | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def cpu_bf16_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """bf16 matrix capabilities of this CPU: the BF16_CPU_FLAGS present in /proc/cpuinfo, plus "onednn_bf16"
    when torch's oneDNN reports native bf16 support. `cpuinfo` is the file's text (read when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    try:
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            found.append("onednn_bf16")
    except (AttributeError, RuntimeError):  # an older or stripped torch build: the cpuinfo flags decide
        pass
    return tuple(found)


def probe_matmul_ms(hidden: int, intermediate: int, tokens: int = PROBE_TOKENS,
                    budget_s: float = PROBE_BUDGET_S) -> tuple[float, float]:
    """Median time (ms) of one [tokens, hidden] x [hidden, intermediate] plus [tokens, intermediate] x
    [intermediate, hidden] matmul pair in fp32 and in bf16, timed interleaved. Returns (fp32_ms, bf16_ms)."""
    gen = torch.Generator().manual_seed(0)
    operands = {}
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(tokens, hidden, generator=gen).to(dt)
        up = torch.randn(hidden, intermediate, generator=gen).to(dt)
        down = torch.randn(intermediate, hidden, generator=gen).to(dt)
        operands[dt] = (x, up, down)

    def once(dt: torch.dtype) -> float:
        x, up, down = operands[dt]
        t0 = time.perf_counter()
        (x @ up) @ down
        return (time.perf_counter() - t0) * 1e3

    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    start = time.perf_counter()
    with torch.inference_mode():
        for dt in times:  # warm-up (oneDNN primitive creation), not counted
            once(dt)
        for i in range(9):
            for dt in times:
                times[dt].append(once(dt))
            if i >= 2 and time.perf_counter() - start > budget_s:
                break
    med = {dt: sorted(v)[len(v) // 2] for dt, v in times.items()}
    return med[torch.float32], med[torch.bfloat16]


def decide_cpu_dtype(flags: tuple[str, ...], probe: Callable[[], tuple[float, float]],
                     margin: float = BF16_MARGIN) -> CpuDtypeDecision:
    """The decision logic alone: fp32 without bf16 matrix support (the probe is not run), else bf16 iff the
    probe's bf16 time is at most `margin` x its fp32 time."""
    if not flags:
        return CpuDtypeDecision("float32", "no bf16 matrix support (avx512_bf16 / amx_bf16)", flags)
    fp32_ms, bf16_ms = probe()
    if bf16_ms <= margin * fp32_ms:
        return CpuDtypeDecision("bfloat16", f"bf16 probe {fp32_ms / bf16_ms:.1f}x faster than fp32", flags,
                                fp32_ms, bf16_ms)
    return CpuDtypeDecision("float32", f"bf16 probe not faster than fp32 ({bf16_ms:.2f} vs {fp32_ms:.2f} ms)",
                            flags, fp32_ms, bf16_ms)


_decisions: dict[tuple[int, int], CpuDtypeDecision] = {}
_lock = threading.Lock()


def auto_cpu_dtype(shape: tuple[int, int] | None = None) -> CpuDtypeDecision:
    """The process-wide `--dtype auto` decision on CPU for a (hidden, intermediate) shape class; the probe runs
    once per shape class and the decision is logged once."""
    key = tuple(shape) if shape else DEFAULT_SHAPE
    with _lock:
        if key not in _decisions:
            decision = decide_cpu_dtype(cpu_bf16_flags(), lambda: probe_matmul_ms(*key))
            timing = "" if decision.fp32_ms is None else \
                f" (probe {PROBE_TOKENS}x{key[0]}x{key[1]}: fp32 {decision.fp32_ms:.2f} ms, bf16 {decision.bf16_ms:.2f} ms)"
            log.info("--dtype auto on CPU -> %s: %s%s", decision.dtype, decision.reason, timing)
            _decisions[key] = decision
        return _decisions[key]


def clear_cache() -> None:
    """Forget the cached decisions (tests)."""
    with _lock:
        _decisions.clear()
