"""Find and read the result files under results/, recognised by their content, never crashing on a missing field.

Every JSON file under the results folder (the analysis output folder excepted) is classified by the keys it
holds, so renamed files, files from older runs and files of formats that gained fields are all read:

  retrieval   {"mode", "k", "scope", "samples", "answer_recall_at_k"}     (kvblend retrieve)
  build       {"placements", ...}                                        (kvblend build)
  decode      {"mode", "samples": [{"ttft_ms", ...}]}, no "drafter"      (kvblend decode)
  spec        {"drafter", "proxy", "gpu_chunks", "samples"}              (kvblend decode --speculative)
  trace       {"trace": [per step rows], "config"?, "results"?}          (speculative_trace.json)
  sweep       {"runs": [{"gpu_chunks", "proxy", ...}]}                   (kvblend budget --sweep)
  eval        {"modes": [{"mode", ...}]}                                 (kvblend eval)

What cannot be read (bad JSON, unknown shape, a required field missing) becomes a note for the report.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("retrieval", "build", "decode", "spec", "trace", "sweep", "eval")


@dataclass
class ResultFile:
    path: Path
    kind: str
    doc: dict

    @property
    def dataset(self) -> str:
        value = self.doc.get("dataset")
        if not value and isinstance(self.doc.get("config"), dict):
            value = self.doc["config"].get("dataset")
        return str(value) if value else "?"


@dataclass
class Inputs:
    root: Path
    files: list[ResultFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # files skipped and why

    def of(self, kind: str) -> list[ResultFile]:
        return [f for f in self.files if f.kind == kind]

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def classify(doc: Any) -> str | None:
    """The kind of a result document (see the module docstring), or None if it is none of them."""
    if not isinstance(doc, dict):
        return None
    samples = doc.get("samples")
    if isinstance(doc.get("trace"), list):
        return "trace"
    if isinstance(doc.get("runs"), list) and all(isinstance(r, dict) and "gpu_chunks" in r for r in doc["runs"]):
        return "sweep"
    if isinstance(doc.get("modes"), list) and all(isinstance(r, dict) and "mode" in r for r in doc["modes"]):
        return "eval"
    if isinstance(doc.get("placements"), list):
        return "build"
    if isinstance(samples, list) and "k" in doc and "scope" in doc:
        return "retrieval"
    if isinstance(samples, list) and "drafter" in doc:
        return "spec"
    if isinstance(samples, list) and "mode" in doc:
        return "decode"
    return None


def number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing fields, null, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def mean(values) -> float | None:
    vals = [v for v in (number(x) for x in values) if v is not None]
    return sum(vals) / len(vals) if vals else None


def read_results(root: Path, exclude: Path | None = None) -> Inputs:
    """Every recognised result file under `root` (recursively; `exclude` and hidden files skipped)."""
    inputs = Inputs(root=root)
    exclude = exclude.resolve() if exclude is not None else None
    unknown: list[str] = []
    for path in sorted(root.rglob("*.json")):
        resolved = path.resolve()
        if exclude is not None and (resolved == exclude or exclude in resolved.parents):
            continue
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # temp files of atomic writes
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            inputs.notes.append(f"skipped {inputs.rel(path)}: not readable JSON ({str(exc).splitlines()[0][:80]})")
            continue
        kind = classify(doc)
        if kind is None:
            unknown.append(inputs.rel(path))
            continue
        inputs.files.append(ResultFile(path, kind, doc))
    if unknown:  # e.g. bench/ or quality/ (frontier) files, which have reports of their own
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        inputs.notes.append(f"skipped {shown}: not a kvblend result file of a kind analysed here")
    log.info("read %d result files under %s (%s)", len(inputs.files), root,
             ", ".join(f"{k}: {len(inputs.of(k))}" for k in KINDS if inputs.of(k)))
    return inputs
