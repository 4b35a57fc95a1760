"""`--dtype auto` on CPU: bf16 where the CPU multiplies bf16 matrices natively AND a quick probe shows it faster.

Some CPUs (AVX512-BF16, AMX) run a bf16 matmul several times faster than fp32; on the others bf16 is emulated
and several times slower. The decision therefore needs both a capability check (the `avx512_bf16` / `amx_bf16`
flags in /proc/cpuinfo, or torch's own oneDNN query) and a measurement: a few matmuls of the model's shape class
through the MLP's up and down projections, timed in both dtypes, interleaved, well under a second: a block of
PROBE_TOKENS rows (the shape of a prefill) and a single row (the shape of a decode step; bf16 GEMV can be much
slower than fp32's, e.g. when its oneDNN threads compete for busy cores). Each dtype's cost is that of a modelled
request, REQUEST_PREFILL_TOKENS of prefill plus REQUEST_DECODE_TOKENS decode steps; bf16 is chosen only when it is
clearly cheaper (by BF16_MARGIN).

The decision is made once per process and shape class (cached) and logged once. It is also kept for a day in
$KVBLEND_HOME/dtype_auto.json, keyed by CPU model, core and thread counts, torch version and shape class, so
the stages of one workflow (build, decode, ...) agree: the chunk store is per dtype, and a decode that picked
another dtype than its build would rebuild every chunk. Delete the file to probe again. Explicit dtypes never probe;
on CUDA, auto is bf16 without probing (see kvblend.model.hf.resolve_dtype). Quality comparisons ask for
float32 explicitly and are not affected.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvblend.home import kvblend_home

log = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
PROBE_TOKENS = 512  # rows of the probe block: a prefill-sized chunk
REQUEST_PREFILL_TOKENS = 2048  # the modelled request: a RAG prompt of a few chunks ...
REQUEST_DECODE_TOKENS = 64  # ... and a short answer
DEFAULT_SHAPE = (576, 1536)  # (hidden, intermediate) of SmolLM2-135M, the default model
BF16_MARGIN = 0.9  # bf16 must take at most 90% of the fp32 time (timing noise on shared cores)
PROBE_BUDGET_S = 0.8  # stop repeating once this much time is spent
DECISIONS_FILE = "dtype_auto.json"  # under $KVBLEND_HOME
DECISION_TTL_S = 24 * 3600  # a kept decision is probed again after this long


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
    """The modelled request's matmul cost (ms) in fp32 and in bf16: REQUEST_PREFILL_TOKENS / tokens blocks of
    [tokens, hidden] x [hidden, intermediate] x [intermediate, hidden] plus REQUEST_DECODE_TOKENS single rows
    through the same pair, each the median of interleaved timings. Returns (fp32_ms, bf16_ms)."""
    times = probe_shapes_ms(hidden, intermediate, tokens, budget_s)
    blocks = REQUEST_PREFILL_TOKENS / tokens
    cost = {dt: blocks * block + REQUEST_DECODE_TOKENS * row for dt, (block, row) in times.items()}
    log.debug("dtype probe: %s", {str(dt): (round(b, 3), round(r, 4)) for dt, (b, r) in times.items()})
    return cost["float32"], cost["bfloat16"]


def probe_shapes_ms(hidden: int, intermediate: int, tokens: int = PROBE_TOKENS,
                    budget_s: float = PROBE_BUDGET_S) -> dict[str, tuple[float, float]]:
    """Median ms of one up+down projection pair on a [tokens, hidden] block and on a single row, per dtype:
    {"float32": (block_ms, row_ms), "bfloat16": (block_ms, row_ms)}, timed interleaved."""
    gen = torch.Generator().manual_seed(0)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    operands = {}
    for name, dt in dtypes.items():
        x = torch.randn(tokens, hidden, generator=gen).to(dt)
        up = torch.randn(hidden, intermediate, generator=gen).to(dt)
        down = torch.randn(intermediate, hidden, generator=gen).to(dt)
        operands[name] = (x, x[:1].clone(), up, down)

    def once(name: str, row: bool) -> float:
        block, single, up, down = operands[name]
        x = single if row else block
        t0 = time.perf_counter()
        (x @ up) @ down
        return (time.perf_counter() - t0) * 1e3

    samples: dict[tuple[str, bool], list[float]] = {(n, r): [] for n in dtypes for r in (False, True)}
    start = time.perf_counter()
    with torch.inference_mode():
        for key in samples:  # warm-up (oneDNN primitive creation), not counted
            once(*key)
        for i in range(9):
            for key in samples:
                samples[key].append(once(*key))
            if i >= 2 and time.perf_counter() - start > budget_s:
                break
    med = {key: sorted(v)[len(v) // 2] for key, v in samples.items()}
    return {n: (med[(n, False)], med[(n, True)]) for n in dtypes}


def decide_cpu_dtype(flags: tuple[str, ...], probe: Callable[[], tuple[float, float]],
                     margin: float = BF16_MARGIN) -> CpuDtypeDecision:
    """The decision logic alone: fp32 without bf16 matrix support (the probe is not run), else bf16 iff the
    probe's bf16 time is at most `margin` x its fp32 time."""
    if not flags:
        return CpuDtypeDecision("float32", "no bf16 matrix support (avx512_bf16 / amx_bf16)", flags)
    fp32_ms, bf16_ms = probe()
    if bf16_ms <= margin * fp32_ms:
        return CpuDtypeDecision("bfloat16", f"bf16 probe {fp32_ms / bf16_ms:.1f}x cheaper than fp32", flags,
                                fp32_ms, bf16_ms)
    return CpuDtypeDecision("float32", f"bf16 probe not clearly cheaper than fp32 ({bf16_ms / fp32_ms:.2f}x its "
                            f"time)", flags, fp32_ms, bf16_ms)


_decisions: dict[tuple[int, int], CpuDtypeDecision] = {}
_lock = threading.Lock()


def _cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return "unknown cpu"


def machine_key(shape: tuple[int, int]) -> str:
    """What a kept decision is valid for: this CPU model, core and thread counts, torch version, shape class."""
    return (f"{_cpu_model()}|cores {os.cpu_count()}|threads {torch.get_num_threads()}|torch {torch.__version__}"
            f"|{shape[0]}x{shape[1]}")


def _decisions_path() -> Path:
    return kvblend_home() / DECISIONS_FILE


def _load_kept(key: str, now: float) -> CpuDtypeDecision | None:
    try:
        entry = json.loads(_decisions_path().read_text(encoding="utf-8"))[key]
        if now - float(entry["decided_at"]) > DECISION_TTL_S or entry["dtype"] not in ("float32", "bfloat16"):
            return None
        return CpuDtypeDecision(entry["dtype"], str(entry["reason"]), tuple(entry.get("bf16_flags", ())),
                                entry.get("fp32_ms"), entry.get("bf16_ms"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _keep(key: str, decision: CpuDtypeDecision, now: float) -> None:
    from kvblend.io import atomic_write_json

    path = _decisions_path()
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        kept = kept if isinstance(kept, dict) else {}
    except (OSError, ValueError):
        kept = {}
    kept[key] = {"dtype": decision.dtype, "reason": decision.reason, "bf16_flags": list(decision.bf16_flags),
                 "fp32_ms": decision.fp32_ms, "bf16_ms": decision.bf16_ms, "decided_at": now}
    try:
        atomic_write_json(path, kept)
    except OSError as exc:  # a read-only home only costs a probe per process
        log.debug("cannot keep the dtype decision in %s: %s", path, exc)


def auto_cpu_dtype(shape: tuple[int, int] | None = None) -> CpuDtypeDecision:
    """The `--dtype auto` decision on CPU for a (hidden, intermediate) shape class: kept per process, and for
    DECISION_TTL_S in $KVBLEND_HOME/dtype_auto.json; otherwise probed. Logged once per process."""
    shape = tuple(shape) if shape else DEFAULT_SHAPE
    with _lock:
        if shape not in _decisions:
            key, now = machine_key(shape), time.time()
            decision = _load_kept(key, now)
            source = f"kept in {_decisions_path()}"
            if decision is None:
                decision = decide_cpu_dtype(cpu_bf16_flags(), lambda: probe_matmul_ms(*shape))
                _keep(key, decision, now)
                source = "probed now"
            timing = "" if decision.fp32_ms is None else \
                (f"; matmuls of a {REQUEST_PREFILL_TOKENS}-token prefill + {REQUEST_DECODE_TOKENS} decode steps, "
                 f"hidden {shape[0]}, intermediate {shape[1]}: fp32 {decision.fp32_ms:.1f} ms, "
                 f"bf16 {decision.bf16_ms:.1f} ms")
            log.info("--dtype auto on CPU -> %s: %s (%s%s)", decision.dtype, decision.reason, source, timing)
            _decisions[shape] = decision
        return _decisions[shape]


def clear_cache() -> None:
    """Forget the decisions made in this process (tests; the kept file stays)."""
    with _lock:
        _decisions.clear()
