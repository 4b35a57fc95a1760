"""Step 1: rank each question's passages (retrieval/<dataset>_rag_<mode>_k<k>.json), and the healing read of that
file by later steps: a file that is missing, unreadable, made with other settings or for other samples, or that
lacks some of the samples asked for, is retrieved again (logged) instead of stopping the run. A retrieval file that
already covers the samples asked for is never replaced by a smaller one."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kvblend.config import EngineConfig
from kvblend.data.datasets import Dataset, load_dataset
from kvblend.pipeline.files import paths

log = logging.getLogger(__name__)


def load_data(config: EngineConfig) -> Dataset:
    return load_dataset(config.dataset, limit=config.limit or None, seed=config.seed)


def run_retrieve(config: EngineConfig, progress: bool = True, data: Dataset | None = None) -> tuple[Path, float | None]:
    """Retrieve for every sample of the dataset (first --limit); writes the retrieval file atomically."""
    from kvblend.retrieval import answer_recall_at_k, retrieve, save_retrieval

    data = data or load_data(config)
    t0 = time.perf_counter()
    retrieved = retrieve(list(data.samples), config.retrieval_mode, config.top_k, config.retrieval_scope,
                         seed=config.seed, show_progress=progress)
    recall = answer_recall_at_k(list(data.samples), retrieved, config.top_k) if data.metric != "rougeL" else None
    path = paths(config)["retrieval"]
    save_retrieval(path, data.name, config.retrieval_mode, config.top_k, config.retrieval_scope, retrieved, recall)
    log.info("retrieved %d samples in %.1f s", len(retrieved), time.perf_counter() - t0)
    return path, recall


def stale_reason(config: EngineConfig, data: Dataset) -> str | None:
    """Why the retrieval file cannot serve these samples (None: it can)."""
    from kvblend.retrieval import load_retrieval

    path = paths(config)["retrieval"]
    if not path.is_file():
        return "not found"
    try:
        run = load_retrieval(path)
    except ValueError as exc:
        return f"unreadable ({str(exc).splitlines()[0]})"
    if (run.mode, run.k, run.scope) != (config.retrieval_mode, config.top_k, config.retrieval_scope):
        return f"made with mode={run.mode} k={run.k} scope={run.scope}"
    if run.dataset != data.name:
        return f"made for dataset {run.dataset!r}, not {data.name!r}"
    by_id = run.by_sample_id()
    missing = [s.sample_id for s in data.samples if s.sample_id not in by_id or not by_id[s.sample_id].texts]
    if missing:
        return f"lacks {len(missing)} of the {len(data.samples)} samples asked for (first: {missing[0]})"
    if config.retrieval_scope == "pooled" and set(by_id) != {s.sample_id for s in data.samples}:
        return f"pooled over {len(by_id)} samples, not these {len(data.samples)}"
    return None


def ensure_retrieval(config: EngineConfig, data: Dataset, progress: bool = True) -> dict:
    """The retrieval results by sample id for `data`, retrieving again first when the file cannot serve them."""
    from kvblend.retrieval import load_retrieval

    reason = stale_reason(config, data)
    path = paths(config)["retrieval"]
    if reason is not None:
        log.warning("%s: %s; retrieving for the %d samples asked for", path, reason, len(data.samples))
        run_retrieve(config, progress=progress, data=data)
    return load_retrieval(path).by_sample_id()
