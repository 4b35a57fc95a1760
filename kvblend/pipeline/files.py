"""Stage files: where each stage writes, what each records it was made from, and how a stage tells a stale input.

Files (under config.results_dir), each written atomically once its stage has finished:
  retrieval/<dataset>[_pooled]_rag_<mode>_k<k>.json   ranked chunk ids, scores, texts per sample + answer-recall@k
  kv_caches/<dataset>_kv_top<k>.json                  build summary: model, store stats, placements per sample
  decoding/<dataset>_<mode>.json                      answers, TTFT (+ chunk_tiers, fetch_ms), TPOT per sample
  decoding/<dataset>_spec_<drafter>_<proxy>_g<N>.json speculative runs; decoding/speculative_trace.json
  decoding/<dataset>_budget_sweep.json                quality / TTFT per GPU chunk budget, with and without promotions
  eval/<dataset>_eval.json                            quality and fidelity to full prefill per mode
Every stage file but the retrieval file holds `made_from` (dataset, limit, top_k, retrieval mode and scope, model,
dtype); a stage whose input was made from something else redoes that input instead of using it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kvblend.config import EngineConfig
from kvblend.data.datasets import dataset_name
from kvblend.errors import KvblendError

log = logging.getLogger(__name__)

# what a stage file must agree on with the configuration reading it
MADE_FROM_KEYS = ("dataset", "limit", "top_k", "retrieval_mode", "retrieval_scope", "model", "dtype")


class PipelineError(KvblendError):
    pass


def dataset_label(config: EngineConfig) -> str:
    """The dataset's name in file names and records (kvblend.data.datasets.dataset_name)."""
    return dataset_name(config.dataset)


def paths(config: EngineConfig) -> dict[str, Path]:
    root, name, k = Path(config.results_dir), dataset_label(config), config.top_k
    scope = "" if config.retrieval_scope == "per_sample" else f"_{config.retrieval_scope}"
    return {
        "retrieval": root / "retrieval" / f"{name}{scope}_rag_{config.retrieval_mode}_k{k}.json",
        "build": root / "kv_caches" / f"{name}_kv_top{k}.json",
        "decode_dir": root / "decoding",
        "eval": root / "eval" / f"{name}_eval.json",
    }


def decode_path(config: EngineConfig, mode: str) -> Path:
    return paths(config)["decode_dir"] / f"{dataset_label(config)}_{mode}.json"


def spec_label(config: EngineConfig, gpu_chunks: int, proxy: str) -> str:
    return f"{dataset_label(config)}_spec_{config.drafter}_{proxy}_g{gpu_chunks}"


def spec_path(config: EngineConfig, gpu_chunks: int, proxy: str) -> Path:
    return paths(config)["decode_dir"] / f"{spec_label(config, gpu_chunks, proxy)}.json"


def made_from(config: EngineConfig) -> dict:
    """What a stage file is made from (recorded in it, compared by the stage that reads it)."""
    return {"dataset": dataset_label(config), "limit": config.limit, "top_k": config.top_k,
            "retrieval_mode": config.retrieval_mode, "retrieval_scope": config.retrieval_scope,
            "model": config.model, "dtype": config.dtype}


def mismatch(recorded: object, config: EngineConfig, keys: tuple[str, ...] = MADE_FROM_KEYS) -> str | None:
    """None when a stage file's made_from matches the configuration, else what differs (one line)."""
    if not isinstance(recorded, dict):
        return "it does not record what it was made from"
    want = made_from(config)
    diff = [f"{k}={recorded.get(k)!r} (want {want[k]!r})" for k in keys if recorded.get(k) != want[k]]
    return ", ".join(diff) if diff else None


def read_stage_file(path: Path, redo: str) -> dict:
    """A stage file's JSON object; PipelineError (one line, naming what to re-run) if it is corrupt."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise TypeError
    except (ValueError, TypeError, UnicodeDecodeError, OSError):
        raise PipelineError(f"{path}: corrupt or unreadable; delete it and re-run `{redo}`") from None
    return doc
