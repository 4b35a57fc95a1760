"""The GPU chunk budget sweep: speculative decoding at 1..N resident chunks, with and without promotions
(decoding/<dataset>_budget_sweep.json)."""

from __future__ import annotations

import json
from pathlib import Path

from kvblend.config import EngineConfig
from kvblend.io import atomic_write_json
from kvblend.pipeline.files import dataset_label, made_from, paths
from kvblend.pipeline.plan import load_inputs, make_engine, plan_samples
from kvblend.pipeline.speculative import run_speculative


def run_budget_sweep(config: EngineConfig, max_chunks: int | None = None, progress: bool = True) -> tuple[Path, list]:
    """For GPU budgets of 1..N chunks (N = max_chunks, default top_k: every retrieved chunk), with and without
    promotions: quality, fidelity to the N-chunk run (all resident), TTFT, TPOT, promotions."""
    from kvblend.eval.metrics import fidelity

    engine = make_engine(config)
    n = max_chunks or config.top_k
    data, by_id = load_inputs(config, progress)
    plans = plan_samples(config, engine, data, by_id)
    if plans:
        engine.warm_up(plans[0].prompt, plans[0].chunk_texts)
    runs = []
    ref = json.loads(run_speculative(config, engine=engine, gpu_chunks=n, proxy="none", progress=progress).read_text())
    ref_answers = {r["sample_id"]: r["answer"] for r in ref["samples"]}
    for g in range(1, n + 1):
        for proxy in ("none", config.proxy) if g < n and config.proxy != "none" else ("none",):
            if g == n:
                res = ref
            else:
                res = json.loads(run_speculative(config, engine=engine, gpu_chunks=g, proxy=proxy,
                                                 progress=progress).read_text())
            fid = [fidelity(r["answer"], ref_answers[r["sample_id"]]) for r in res["samples"]]
            runs.append({"gpu_chunks": g, "proxy": proxy, "score": res["mean_score"], "metric": res["metric"],
                         "fidelity_exact": sum(f["exact"] for f in fid) / len(fid),
                         "fidelity_rougeL": sum(f["rougeL"] for f in fid) / len(fid),
                         "mean_ttft_ms": res["mean_ttft_ms"], "mean_tpot_ms": res["mean_tpot_ms"],
                         "promotions_per_sample": res["promotions_per_sample"],
                         "acceptance_rate": res["acceptance_rate"]})
    path = paths(config)["decode_dir"] / f"{dataset_label(config)}_budget_sweep.json"
    atomic_write_json(path, {"made_from": made_from(config), "dataset": dataset_label(config),
                             "model": engine.model.name, "drafter": config.drafter, "top_k": config.top_k,
                             "start_tier": config.start_tier, "runs": runs})
    return path, runs


def format_sweep_table(runs: list) -> str:
    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    lines = ["| GPU chunks | promotions by | score | fidelity exact | fidelity Rouge-L | TTFT ms | TPOT ms | "
             "promotions/sample | acceptance |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['gpu_chunks']} | {r['proxy']} | {f(r['score'])} | {f(r['fidelity_exact'])} | "
                     f"{f(r['fidelity_rougeL'])} | {f(r['mean_ttft_ms'], '.0f')} | {f(r['mean_tpot_ms'], '.1f')} | "
                     f"{f(r['promotions_per_sample'], '.2f')} | {f(r['acceptance_rate'], '.2f')} |")
    return "\n".join(lines)
