"""Step 3 (speculative, the workflow's default): tiered speculative decoding with promotions.

The best config.gpu_chunks chunks start resident (default 2 of 5), the rest are CPU placeholders that the
proxy promotes. Writes decoding/<dataset>_spec_<drafter>_<proxy>_g<N>.json and the per-step trace
(decoding/speculative_trace.json)."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from kvblend.config import EngineConfig
from kvblend.io import atomic_write_json
from kvblend.pipeline.decode import answer_and_score, mean, timing_fields
from kvblend.pipeline.files import made_from, paths, spec_path
from kvblend.pipeline.plan import load_inputs, make_engine, plan_samples

log = logging.getLogger(__name__)


def _trace_rows(i: int, sample_id: str, steps, trace) -> list[dict]:
    rows = []
    by_step = {t.step: t for t in trace}
    if -1 in by_step:  # the warm-start round before the first token
        rows.append({"sample_index": i, "sample_id": sample_id, **by_step[-1].as_dict()})
    for j, step in enumerate(steps):
        row = {"sample_index": i, "sample_id": sample_id, "step": j, "drafted": step.drafted_ids,
               "accepted": step.num_accepted, "emitted": step.emitted_ids, "step_ms": round(step.step_ms, 3),
               "ngram_source_chunk": step.source_chunk}
        if j in by_step:
            row.update({k: v for k, v in by_step[j].as_dict().items() if k not in ("step", "drafted", "accepted")})
        rows.append(row)
    return rows


def run_speculative(config: EngineConfig, engine=None, draft=None, gpu_chunks: int | None = None,
                    proxy: str | None = None, progress: bool = True, trace_path: Path | None = None) -> Path:
    """Speculative decoding of every sample with `gpu_chunks` resident (default config.gpu_chunks) and `proxy`
    promotions (default config.proxy); returns the results file."""
    from kvblend.engine import SpecOptions
    from kvblend.generation.speculative import spec_stats
    from kvblend.model.registry import load_model

    options = SpecOptions.from_config(config, **{k: v for k, v in (("gpu_chunks", gpu_chunks), ("proxy", proxy))
                                                 if v is not None})
    data, by_id = load_inputs(config, progress)
    engine = engine or make_engine(config)
    if config.drafter == "model" and draft is None:
        draft = load_model(config.draft_model, config.dtype, config.device)
    if draft is not None and draft.shape.vocab_size != engine.model.shape.vocab_size:
        log.warning("draft vocab %d != target vocab %d", draft.shape.vocab_size, engine.model.shape.vocab_size)
    plans = plan_samples(config, engine, data, by_id)
    sampling = engine.sampling(data.max_new_tokens)
    if plans:
        engine.warm_up(plans[0].prompt, plans[0].chunk_texts)
    rows, trace_rows = [], []
    desc = f"speculative ({options.drafter}, {options.proxy}, {options.gpu_chunks} on GPU)"
    for i, plan in enumerate(tqdm(plans, desc=desc, unit="sample", disable=not progress)):
        out, steps, trace, placement = engine.answer_speculative(
            plan.prompt, plan.chunk_texts, plan.scores, options, draft_model=draft, sampling=sampling,
            start_tier=config.start_tier)
        answer, score = answer_and_score(data, plan, out.text)
        st = spec_stats(steps)
        trace_rows.extend(_trace_rows(i, plan.sample_id, steps, trace))
        promoted = [c for t in trace for c in t.promoted]
        rows.append({
            "sample_index": i, "sample_id": plan.sample_id, "answer": answer, "raw_output": out.text,
            "gold": [list(a) for a in plan.answers], "score": score, **timing_fields(out),
            "num_output_tokens": len(out.token_ids), "output_ids": out.token_ids,
            "acceptance_rate": st.acceptance_rate, "mean_accepted": st.mean_accepted, "num_steps": st.num_steps,
            "tokens_per_s": (len(out.token_ids) / (sum(out.token_ms) / 1e3)) if out.token_ms else None,
            "promotions": len(promoted), "promoted_chunks": promoted,
            "demotions": sum(len(t.demoted) for t in trace),
            "initial_gpu_chunks": [s.index for s in placement.resident],
            "initial_cpu_chunks": [s.index for s in placement.placeholders],
            "chunk_ids": list(plan.chunk_ids),
        })
    result = {
        "made_from": made_from(config),
        "dataset": data.name, "model": engine.model.name, "drafter": options.drafter,
        "draft_model": draft.name if draft is not None else None, "proxy": options.proxy,
        "gpu_chunks": options.gpu_chunks, "top_k": config.top_k, "threshold": options.threshold,
        "spec_k": options.k, "mode": config.mode, "ratio": config.ratio, "device": str(engine.model.device),
        "dtype": str(engine.model.dtype).removeprefix("torch."), "metric": data.metric,
        "start_tier": config.start_tier,
        "mean_score": mean(rows, "score"), "mean_ttft_ms": mean(rows, "ttft_ms"), "mean_tpot_ms": mean(rows, "tpot_ms"),
        "mean_fetch_ms": mean(rows, "fetch_ms"), "tokens_per_s": mean(rows, "tokens_per_s"),
        "acceptance_rate": mean(rows, "acceptance_rate"), "promotions_per_sample": mean(rows, "promotions"),
        "samples": rows,
    }
    path = spec_path(config, options.gpu_chunks, options.proxy)
    atomic_write_json(path, result)
    trace_path = trace_path or paths(config)["decode_dir"] / "speculative_trace.json"
    atomic_write_json(trace_path, {
        "config": {k: result[k] for k in ("dataset", "model", "drafter", "draft_model", "proxy", "gpu_chunks",
                                          "threshold", "spec_k", "start_tier")},
        "made_from": result["made_from"],
        "trace": trace_rows,
        "results": [{k: r[k] for k in ("sample_index", "sample_id", "answer", "ttft_ms", "tpot_ms", "fetch_ms",
                                       "chunk_tiers", "acceptance_rate", "promotions", "score",
                                       "initial_gpu_chunks", "initial_cpu_chunks")} for r in rows]})
    return path
