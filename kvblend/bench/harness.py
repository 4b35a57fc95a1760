"""The one bench harness of `kvblend bench prefill | decode | serve`: device sync, timing loops, percentiles and
the header every results file starts with.

Timing: `timed_ms` and `round_robin` read the host clock with the device synchronised before and after each
call (wall time of the call, queued device work included); `mean_device_ms` times a batch of calls with CUDA
events (device time; the host clock on CPU). Warm-up calls run the same way and are never counted.

Percentiles interpolate linearly between the closest ranks (numpy's default method). Importing this module does
not import torch; `sync` and the CUDA paths import it when called.
"""

from __future__ import annotations

import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kvblend.bench.summary import git_sha

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# the fields of results_header(), at the top level of every results file
HEADER_KEYS = frozenset({"command", "git_sha", "python", "torch", "transformers", "device_name", "started_utc"})


def _is_cuda(device) -> bool:
    return getattr(device, "type", device) == "cuda"


def sync(device) -> None:
    """Wait for the work queued on `device` (a torch.device or its type name); nothing to wait for off CUDA."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) of values, linear between closest ranks (numpy.percentile's default)."""
    s = sorted(values)
    if not s:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Iterable[float]) -> float:
    """Median of the values that are not NaN; NaN when none is left."""
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


def summarise(ms: Sequence[float]) -> dict[str, Any]:
    """Timings in ms as {"median_ms", "p10_ms", "p90_ms", "min_ms", "n", "all_ms"} (prefill's per-case entry)."""
    return {"median_ms": percentile(ms, 50), "p10_ms": percentile(ms, 10), "p90_ms": percentile(ms, 90),
            "min_ms": min(ms), "n": len(ms), "all_ms": [round(x, 4) for x in ms]}


def distribution(values: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float | None]:
    """{"p50": .., "p90": .., "p99": .., "mean": ..} of values (serve's per-metric entry); None for no values."""
    out: dict[str, float | None] = {f"p{q}": percentile(values, q) if values else None for q in qs}
    out["mean"] = statistics.fmean(values) if values else None
    return out


def timed_ms(fn: Callable[[], Any], device) -> tuple[Any, float]:
    """(fn(), wall ms of the call), the device synchronised before and after it."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def round_robin(cases: dict[str, Callable[[], Any]], warmup: int, iters: int, device,
                value: Callable[[Any, float], float] | None = None) -> dict[str, list[float]]:
    """Every case once per round, `warmup` uncounted rounds then `iters` counted ones; per case the counted
    rounds' wall ms (`timed_ms`), or value(output, wall ms) when given (e.g. a TTFT the output carries)."""
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got {warmup}, {iters}")
    times: dict[str, list[float]] = {k: [] for k in cases}
    for rnd in range(warmup + iters):
        for name, fn in cases.items():
            out, dt = timed_ms(fn, device)
            if rnd >= warmup:
                times[name].append(value(out, dt) if value else dt)
            del out
    return times


def mean_device_ms(fn: Callable[[], Any], device, reps: int = 10, warmup: int = 3) -> float:
    """Mean ms per call over `reps` back-to-back calls after `warmup` uncounted ones: CUDA events around the
    batch on CUDA (device time), the host clock around it, synchronised, elsewhere."""
    for _ in range(warmup):
        fn()
    if not _is_cuda(device):
        _, ms = timed_ms(lambda: [fn() for _ in range(reps)], device)
        return ms / reps
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(device)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    sync(device)
    return start.elapsed_time(end) / reps


def device_name(device) -> str:
    """The GPU's name on CUDA; on CPU the processor and torch's thread count."""
    import torch

    if _is_cuda(device):
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def module_version(module: str) -> str | None:
    """`module`'s __version__, None when it is not installed."""
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def utc_now() -> str:
    """The current UTC time as results files write it (started_utc, finished_utc)."""
    return time.strftime(TIME_FORMAT, time.gmtime())


def results_header(device=None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The fields every results file starts with: the command that ran (`argv`, default sys.argv), the commit
    (git_sha; "unknown" outside a checkout without $KVBLEND_GIT_SHA), python, torch and transformers versions,
    device_name (`device`'s; the host CPU when None) and started_utc. Benches add their own keys beside these."""
    return {"command": shlex.join(sys.argv if argv is None else argv), "git_sha": git_sha("unknown"),
            "python": platform.python_version(), "torch": module_version("torch"),
            "transformers": module_version("transformers"), "device_name": device_name(device or "cpu"),
            "started_utc": utc_now()}
