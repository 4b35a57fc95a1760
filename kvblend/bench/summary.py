"""Target entries of a summary file (docs/results/bench/summary.json, docs/results/quality/summary.json).

Each entry: {"measured": x, "target": y, "better": "higher"|"lower", "met": bool, "device": "...",
"source": "<path of the full results>", ...extra}. Benchmarks write their own keys and leave the others
alone (read-merge-write, atomic), so several benchmarks share one summary file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
from pathlib import Path
from typing import Any

from kvblend.io import atomic_write_json

log = logging.getLogger(__name__)

BENCH_SUMMARY = Path("docs/results/bench/summary.json")
QUALITY_SUMMARY = Path("docs/results/quality/summary.json")


def git_sha(default: str | None = None) -> str | None:
    """The commit results are made from, recorded in every results file: $KVBLEND_GIT_SHA when set (the GPU
    machine gets a copy of the working tree, not the repository), else the checkout's HEAD, else the
    variable's placeholder value ("unknown") or `default`."""
    env = os.environ.get("KVBLEND_GIT_SHA", "")
    if env and env != "unknown":
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env or default


def entry(measured: float, target: float, better: str, source: str | Path, device: str = "", **extra: Any) -> dict:
    """One summary entry; `met` says whether measured is on the right side of target."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    measured = float(measured)
    if not math.isfinite(measured):
        raise ValueError(f"measured value must be finite, got {measured}")
    met = measured >= target if better == "higher" else measured <= target
    out = {"measured": round(measured, 4), "target": target, "better": better, "met": bool(met),
           "source": str(source)}
    if device:
        out["device"] = device
    out.update(extra)
    return out


def update_summary(path: str | Path, entries: dict[str, dict], retire: tuple[str, ...] = ()) -> Path:
    """Merge entries (key -> entry) into the summary file at path, keeping other keys but the retired ones (a
    benchmark's keys that a later definition replaced); atomic write."""
    path = Path(path)
    current: dict = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable (%s); starting a new summary", path, exc)
    current.update(entries)
    for key in retire:
        current.pop(key, None)
    atomic_write_json(path, dict(sorted(current.items())))
    return path
