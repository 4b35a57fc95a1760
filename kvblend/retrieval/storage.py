"""Retrieval result files: JSON written atomically, validated on load.

Layout::

    {"dataset": str, "mode": str, "k": int, "scope": str, "created_at": ISO-8601 UTC str,
     "answer_recall_at_k": float | null,
     "samples": [{"sample_id": str, "passage_ids": [str], "scores": [float],
                  "titles": [str], "texts": [str]}, ...]}

Unknown extra fields are ignored on load.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kvblend.io import atomic_write_json
from kvblend.types import Retrieved

from .retriever import MODES, SCOPES, check_k, check_mode, check_scope

logger = logging.getLogger(__name__)

_REDO = "rerun retrieval to write it again"


class RetrievalFileError(ValueError):
    """A retrieval file is missing or invalid; the message is one line: file, problem, what to do."""


@dataclass(frozen=True, slots=True)
class RetrievalRun:
    """Contents of a retrieval file."""

    dataset: str
    mode: str
    k: int
    scope: str
    created_at: str
    answer_recall_at_k: float | None
    retrieved: tuple[Retrieved, ...]

    def by_sample_id(self) -> dict[str, Retrieved]:
        return {r.sample_id: r for r in self.retrieved}


def _retrieved_to_json(r: Retrieved) -> dict[str, Any]:
    n = len(r.passage_ids)
    titles = list(r.titles) if r.titles else [""] * n
    if not (len(r.scores) == len(r.texts) == len(titles) == n):
        raise ValueError(
            f"save_retrieval: sample {r.sample_id!r} has {n} passage_ids but {len(r.scores)} scores, "
            f"{len(r.texts)} texts and {len(titles)} titles; they must be the same length"
        )
    scores = [float(s) for s in r.scores]
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"save_retrieval: sample {r.sample_id!r} has a non-finite score")
    return {
        "sample_id": r.sample_id,
        "passage_ids": list(r.passage_ids),
        "scores": scores,
        "titles": titles,
        "texts": list(r.texts),
    }


def save_retrieval(
    path: str | os.PathLike[str],
    dataset_name: str,
    mode: str,
    k: int,
    scope: str,
    retrieved: Sequence[Retrieved],
    recall: float | None,
) -> Path:
    """Write a retrieval file atomically (kvblend.io: temp file in the same folder, fsync, rename).

    Creates the parent folder if needed; returns the path written. An existing file is replaced only
    once the new one is complete on disk.
    """
    check_mode(mode)
    check_scope(scope)
    k = check_k(k)
    if recall is not None and not (isinstance(recall, (int, float)) and math.isfinite(recall)):
        raise ValueError(f"save_retrieval: recall must be a finite number or None, got {recall!r}")
    doc = {
        "dataset": str(dataset_name),
        "mode": mode,
        "k": k,
        "scope": scope,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "answer_recall_at_k": None if recall is None else float(recall),
        "samples": [_retrieved_to_json(r) for r in retrieved],
    }
    path = atomic_write_json(path, doc)
    logger.info("wrote %d retrieval results to %s", len(doc["samples"]), path)
    return path


def _fail(path: Path, problem: str, remedy: str = _REDO) -> RetrievalFileError:
    return RetrievalFileError(" ".join(f"{path}: {problem}; {remedy}".split()))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    if key not in obj:
        raise _fail(path, f"{where} has no field {key!r}")
    value = obj[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        ok = False
    else:
        ok = isinstance(value, kind)
    if not ok:
        names = "/".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise _fail(path, f"{where} field {key!r} should be {names}, got {type(value).__name__}")
    return value


def _str_list(obj: dict[str, Any], key: str, where: str, path: Path) -> list[str]:
    values = _require(obj, key, list, where, path)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise _fail(path, f"{where} field {key!r} item {i} should be str, got {type(v).__name__}")
    return values


def load_retrieval(path: str | os.PathLike[str]) -> RetrievalRun:
    """Read and validate a file written by :func:`save_retrieval`.

    Raises RetrievalFileError (a ValueError, one-line message naming the file, the problem and what to
    do) when the file is missing or unreadable, is not strict JSON, or lacks a field or has one of the
    wrong type.
    """
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(path, "retrieval file not found", "run retrieval first or fix the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, f"cannot read retrieval file ({exc})", "check the path and permissions") from None
    try:
        doc = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as exc:
        raise _fail(path, f"not valid JSON ({exc})", f"the file is damaged; delete it and {_REDO}") from None
    if not isinstance(doc, dict):
        raise _fail(path, f"top level should be a JSON object, got {type(doc).__name__}")

    where = "retrieval file"
    dataset = _require(doc, "dataset", str, where, path)
    mode = _require(doc, "mode", str, where, path)
    if mode not in MODES:
        raise _fail(path, f"mode {mode!r} is not one of {', '.join(MODES)}")
    k = _require(doc, "k", int, where, path)
    if k < 1:
        raise _fail(path, f"k should be >= 1, got {k}")
    scope = _require(doc, "scope", str, where, path)
    if scope not in SCOPES:
        raise _fail(path, f"scope {scope!r} is not one of {', '.join(SCOPES)}")
    created_at = _require(doc, "created_at", str, where, path)
    recall = _require(doc, "answer_recall_at_k", (int, float, type(None)), where, path)
    samples = _require(doc, "samples", list, where, path)

    retrieved: list[Retrieved] = []
    for i, item in enumerate(samples):
        w = f"samples[{i}]"
        if not isinstance(item, dict):
            raise _fail(path, f"{w} should be an object, got {type(item).__name__}")
        sample_id = _require(item, "sample_id", str, w, path)
        passage_ids = _str_list(item, "passage_ids", w, path)
        scores = _require(item, "scores", list, w, path)
        for j, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise _fail(path, f"{w} field 'scores' item {j} should be a number, got {type(s).__name__}")
        titles = _str_list(item, "titles", w, path)
        texts = _str_list(item, "texts", w, path)
        lengths = {len(passage_ids), len(scores), len(titles), len(texts)}
        if len(lengths) != 1:
            raise _fail(
                path,
                f"{w} lists differ in length (passage_ids {len(passage_ids)}, scores {len(scores)}, "
                f"titles {len(titles)}, texts {len(texts)})",
            )
        retrieved.append(
            Retrieved(
                sample_id=sample_id,
                passage_ids=tuple(passage_ids),
                scores=tuple(float(s) for s in scores),
                texts=tuple(texts),
                titles=tuple(titles),
            )
        )
    return RetrievalRun(
        dataset=dataset,
        mode=mode,
        k=k,
        scope=scope,
        created_at=created_at,
        answer_recall_at_k=None if recall is None else float(recall),
        retrieved=tuple(retrieved),
    )
