"""Step 3 (plain): answer every sample with one mode (decoding/<dataset>_<mode>.json).

One decode path, shared with the demo: every answer of a comparison starts with its chunks staged on
config.start_tier (before the clock), after one uncounted warm-up per engine (Engine.warm_up); TTFT is the
engine's (kvblend/clock.py), and each row records the tier each chunk was fetched from and the fetch time.

Two TTFTs per sample (config.warm_ttft, `--no-warm` to skip): the cold one of the answer itself (chunks on the
start tier: `ttft_ms`), and a warm one (`ttft_warm_ms`): the same request again, one token, with its chunks
GPU-resident. Answers, scores and TPOT come from the cold pass only. Full prefill fetches nothing, so its warm
TTFT is its cold one (not measured twice).

Prefetch (config.prefetch, `--no-prefetch` to skip): with chunks starting on the disk tier, while sample i decodes
the next sample's chunks are staged on disk and then read into the CPU tier by one background thread
(Engine.prefetch; CPU budget and pins respected, nothing of sample i evicted). Sample i+1 then finds them there,
which its `chunk_tiers` record (and `prefetched_chunks` counts); a prefetch still running when sample i is done is
waited for before the next clock starts (`prefetch_wait_ms`, outside TTFT). `--no-prefetch` keeps every sample
truly cold. With start tier cpu or gpu every chunk is in memory when its sample starts: nothing to prefetch."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, replace
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


@dataclass(slots=True)
class Answered:
    """One sample's answer through the decode loop."""

    out: GenOutput  # the answer (cold: chunks on the start tier, or where a prefetch put them); quality from here
    warm: GenOutput | None = None  # first token again with the chunks GPU-resident (None: not measured)
    prefetched: int = 0  # chunks of this sample a prefetch made resident before its clock started
    prefetch_wait_ms: float = 0.0  # waiting for that prefetch to finish, before the clock (outside TTFT)


def decode_row(data: Dataset, plan: SamplePlan, got: Answered) -> dict:
    out, warm = got.out, got.warm
    answer, score = answer_and_score(data, plan, out.text)
    return {
        "sample_id": plan.sample_id, "question": plan.question, "answer": answer, "raw_output": out.text,
        "gold": [list(a) for a in plan.answers], "metric": data.metric, "score": score,
        **timing_fields(out),
        "ttft_warm_ms": round(warm.ttft_ms, 3) if warm is not None else None,
        "warm_chunk_tiers": list(warm.chunk_tiers) if warm is not None else None,
        "prefetched_chunks": got.prefetched, "prefetch_wait_ms": round(got.prefetch_wait_ms, 3),
        "num_output_tokens": len(out.token_ids), "output_ids": out.token_ids, "stop_reason": out.stop_reason,
        "prompt_tokens": out.blend.num_tokens, "recomputed_tokens": out.blend.num_recomputed,
        "chunk_ids": list(plan.chunk_ids),
    }


def _collect(pending) -> tuple[int, float]:
    """Wait for a prefetch: (chunks it made resident, ms waited). A failed prefetch is logged, never fatal: the
    request reads its chunks itself."""
    t0 = time.perf_counter()
    try:
        made = len(pending.result())
    except Exception:  # noqa: BLE001 (an optimisation failed; the store verbs keep it consistent)
        log.warning("prefetch failed; the next request reads its chunks itself", exc_info=True)
        made = 0
    return made, (time.perf_counter() - t0) * 1e3


def answer_plans(engine, plans: Sequence[SamplePlan], mode: str, sampling, start_tier: str, progress: bool = True,
                 warm: bool = False, prefetch: bool = False) -> list[Answered]:
    """The decode loop: each plan answered with `mode`, its chunks staged on `start_tier` first.
    warm: also time the first token again with the chunks GPU-resident (full prefill: its own TTFT).
    prefetch: with start_tier "disk", read the next plan's chunks into the CPU tier while this one decodes."""
    if plans:
        engine.warm_up(plans[0].prompt, plans[0].chunk_texts)
    prefetch = prefetch and start_tier == "disk" and len(plans) > 1
    first_token = replace(sampling, max_new_tokens=1)
    done: list[Answered] = []
    pending = None
    try:
        if prefetch:
            engine.stage(plans[0].prompt, plans[0].chunk_texts, start_tier)
        for i, plan in enumerate(tqdm(plans, desc=f"decoding ({mode})", unit="sample", disable=not progress)):
            made, waited = _collect(pending) if pending is not None else (0, 0.0)
            pending = None
            if prefetch and i + 1 < len(plans):
                nxt, in_flight = plans[i + 1], engine.keys(plan.prompt, plan.chunk_texts)
                # the next sample starts from the same tier as this one did (its chunks shared with this sample
                # stay where this sample leaves them), then its disk chunks go to the CPU tier in the background
                engine.stage(nxt.prompt, nxt.chunk_texts, start_tier, skip=in_flight)
                pending = engine.prefetch(nxt.prompt, nxt.chunk_texts, keep=in_flight)
            out = engine.answer(plan.prompt, plan.chunk_texts, mode=mode, sampling=sampling,
                                start_tier=None if prefetch else start_tier, scores=plan.scores)
            again = None
            if warm:
                again = out if mode == "full" else engine.answer(plan.prompt, plan.chunk_texts, mode=mode,
                                                                 sampling=first_token, start_tier="gpu",
                                                                 scores=plan.scores)
            done.append(Answered(out, again, made, waited))
    finally:
        if pending is not None:
            _collect(pending)
    return done


def mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def ttft_summary(rows: list[dict]) -> dict:
    """Mean and median of the cold (`ttft_ms`) and warm (`ttft_warm_ms`) TTFT over a decode file's rows; the warm
    figures are None unless every row has one (files written before the warm pass, or with --no-warm)."""
    has_warm = bool(rows) and all(r.get("ttft_warm_ms") is not None for r in rows)
    return {"mean_ttft_ms": mean(rows, "ttft_ms"), "median_ttft_ms": median(rows, "ttft_ms"),
            "mean_ttft_warm_ms": mean(rows, "ttft_warm_ms") if has_warm else None,
            "median_ttft_warm_ms": median(rows, "ttft_warm_ms") if has_warm else None}


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
    outs = answer_plans(engine, plans, mode, sampling, config.start_tier, progress, warm=config.warm_ttft,
                        prefetch=config.prefetch)
    rows = [decode_row(data, plan, got) for plan, got in zip(plans, outs)]
    ttft = ttft_summary(rows)
    result = {
        "made_from": made_from(config),
        "dataset": data.name, "mode": mode,
        "ratio": config.ratio if mode == "blend" else (1.0 if mode == "full" else 0.0),
        "model": engine.model.name, "device": str(engine.model.device),
        "dtype": str(engine.model.dtype).removeprefix("torch."), "metric": data.metric,
        "start_tier": config.start_tier, "warm_ttft": config.warm_ttft,
        "prefetch": config.prefetch and config.start_tier == "disk",
        "mean_score": mean(rows, "score"), **ttft, "mean_ttft_ms": ttft["mean_ttft_ms"] or 0.0,
        "mean_tpot_ms": mean(rows, "tpot_ms") or 0.0, "mean_fetch_ms": mean(rows, "fetch_ms") or 0.0,
        "samples": rows,
    }
    path = decode_path(config, mode)
    atomic_write_json(path, result)
    return path
