"""Step 2: prefill every retrieved chunk once into the chunk store (kv_caches/<dataset>_kv_top<k>.json).

Each chunk is read back verified: a chunk whose file is missing or corrupt is built again, so an interrupted or
damaged store heals in one run. The summary records the planned placement of every sample (the best
config.gpu_chunks chunks resident, the rest CPU placeholders), the store statistics and what it was made from."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm

from kvblend.config import EngineConfig
from kvblend.fusion.layout import place
from kvblend.io import atomic_write_json
from kvblend.pipeline.files import made_from, paths
from kvblend.pipeline.plan import load_inputs, make_engine, plan_samples

log = logging.getLogger(__name__)


def run_build(config: EngineConfig, engine=None, progress: bool = True) -> Path:
    data, by_id = load_inputs(config, progress)
    engine = engine or make_engine(config)
    plans = plan_samples(config, engine, data, by_id)
    t0 = time.perf_counter()
    unique: dict = {}
    for plan in plans:
        for ids, text in zip(plan.prompt.chunk_ids, plan.chunk_texts):
            key = engine.chunk_key(ids, plan.prompt.prefix_ids)
            unique.setdefault(key, (ids, text, plan.prompt.prefix_ids))
    outcomes = {"hit": 0, "missing": 0, "corrupt": 0}
    for key, (ids, text, prefix_ids) in tqdm(unique.items(), desc="building chunk KV", unit="chunk",
                                             disable=not progress):
        got = engine.store.get(key, "disk", build=engine._builder(ids, text, prefix_ids))  # verified read
        outcomes[got.outcome] += 1
    if outcomes["corrupt"]:
        log.warning("%d corrupt chunk files were rebuilt", outcomes["corrupt"])
    placements = []
    for plan in plans:
        keys = [engine.chunk_key(ids, plan.prompt.prefix_ids) for ids in plan.prompt.chunk_ids]
        placement = place(keys, [len(i) for i in plan.prompt.chunk_ids], plan.scores,
                          first_position=len(plan.prompt.prefix_ids), gpu_chunks=config.gpu_chunks)
        placements.append({
            "sample_id": plan.sample_id,
            "chunks": [{"chunk_id": cid, "key": s.key.digest, "tier": s.tier, "start": s.start,
                        "num_tokens": s.num_tokens, "score": s.score, "placeholder": s.is_placeholder}
                       for cid, s in zip(plan.chunk_ids, placement.slots)],
        })
    summary = {
        "made_from": made_from(config),
        "retrieval_json": str(paths(config)["retrieval"]),
        "dataset": data.name, "model": engine.model.name, "model_fingerprint": engine.model.fingerprint,
        "dtype": str(engine.model.dtype).removeprefix("torch."), "device": str(engine.model.device),
        "top_k": config.top_k, "gpu_chunks": config.gpu_chunks, "num_samples": len(plans),
        "chunks_unique": len(unique), "chunks_built": outcomes["missing"] + outcomes["corrupt"],
        "chunks_reused": outcomes["hit"], "chunks_corrupt_rebuilt": outcomes["corrupt"],
        "cache": engine.store.summary(), "store_dir": str(engine.store.disk.root),
        "elapsed_sec": round(time.perf_counter() - t0, 3), "placements": placements,
    }
    path = paths(config)["build"]
    atomic_write_json(path, summary)
    return path
