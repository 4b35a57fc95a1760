"""Step 3 (plain): answer every sample with one mode (decoding/<dataset>_<mode>.json).

One decode path, shared with the demo: every answer of a comparison starts with its chunks staged on
config.start_tier (before the clock), after one uncounted warm-up per engine (Engine.warm_up); TTFT is the
engine's (kvblend/clock.py), and each row records the tier each chunk was fetched from and the fetch time."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from kvblend.config import EngineConfig
from kvblend.data.datasets import Dataset
from kvblend.io import atomic_write_json
from kvblend.pipeline.files import PipelineError, decode_path, made_from, mismatch, paths, read_stage_file
from kvblend.pipeline.plan import SamplePlan, load_inputs, make_engine, plan_samples
from kvblend.types import GenOutput

log = logging.getLogger(__name__)


def answer_and_score(data: Dataset, plan: SamplePlan, text: str) -> tuple[str, float | None]:
    """The answer per the dataset's template (first line for QA) and its metric (None without gold)."""
    from kvblend.eval.metrics import first_line, score_answer

    answer = first_line(text) if data.template.first_line_only else text.strip()
    return answer, score_answer(data.metric, answer, plan.answers) if plan.answers else None


def timing_fields(out: GenOutput) -> dict:
    """The per-sample timing record every decode file shares (TTFT as kvblend/clock.py defines it)."""
    return {"ttft_ms": round(out.ttft_ms, 3), "tpot_ms": round(out.tpot_ms, 3),
            "fetch_ms": round(out.fetch_ms, 3), "build_ms": round(out.build_ms, 3),
            "chunk_tiers": list(out.chunk_tiers)}


def decode_row(data: Dataset, plan: SamplePlan, out: GenOutput) -> dict:
    answer, score = answer_and_score(data, plan, out.text)
    return {
        "sample_id": plan.sample_id, "question": plan.question, "answer": answer, "raw_output": out.text,
        "gold": [list(a) for a in plan.answers], "metric": data.metric, "score": score,
        **timing_fields(out),
        "num_output_tokens": len(out.token_ids), "output_ids": out.token_ids, "stop_reason": out.stop_reason,
        "prompt_tokens": out.blend.num_tokens, "recomputed_tokens": out.blend.num_recomputed,
        "chunk_ids": list(plan.chunk_ids),
    }


def answer_plans(engine, plans: Sequence[SamplePlan], mode: str, sampling, start_tier: str,
                 progress: bool = True) -> list[GenOutput]:
    """The decode loop: each plan answered with `mode`, its chunks staged on `start_tier` first."""
    if plans:
        engine.warm_up(plans[0].prompt, plans[0].chunk_texts)
    outs = []
    for plan in tqdm(plans, desc=f"decoding ({mode})", unit="sample", disable=not progress):
        outs.append(engine.answer(plan.prompt, plan.chunk_texts, mode=mode, sampling=sampling, start_tier=start_tier))
    return outs


def mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _note_build_summary(config: EngineConfig) -> None:
    """The build summary is informative only (decode builds the chunks it lacks, outside TTFT): say when it is
    stale or unreadable, never stop on it."""
    path = paths(config)["build"]
    if not path.is_file():
        return
    try:
        diff = mismatch(read_stage_file(path, "kvblend build").get("made_from"), config)
    except PipelineError as exc:
        diff = str(exc)
    if diff:
        log.warning("%s was made from other inputs (%s); chunks it lacks are built now, outside TTFT", path, diff)


def run_decode(config: EngineConfig, mode: str | None = None, engine=None, progress: bool = True) -> Path:
    mode = mode or config.mode
    data, by_id = load_inputs(config, progress)
    _note_build_summary(config)
    engine = engine or make_engine(config)
    plans = plan_samples(config, engine, data, by_id)
    sampling = engine.sampling(data.max_new_tokens)
    torch.manual_seed(config.seed)
    outs = answer_plans(engine, plans, mode, sampling, config.start_tier, progress)
    rows = [decode_row(data, plan, out) for plan, out in zip(plans, outs)]
    result = {
        "made_from": made_from(config),
        "dataset": data.name, "mode": mode,
        "ratio": config.ratio if mode == "blend" else (1.0 if mode == "full" else 0.0),
        "model": engine.model.name, "device": str(engine.model.device),
        "dtype": str(engine.model.dtype).removeprefix("torch."), "metric": data.metric,
        "start_tier": config.start_tier,
        "mean_score": mean(rows, "score"), "mean_ttft_ms": mean(rows, "ttft_ms") or 0.0,
        "mean_tpot_ms": mean(rows, "tpot_ms") or 0.0, "mean_fetch_ms": mean(rows, "fetch_ms") or 0.0,
        "samples": rows,
    }
    path = decode_path(config, mode)
    atomic_write_json(path, result)
    return path
