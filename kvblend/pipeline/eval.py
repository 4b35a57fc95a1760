"""Step 4: quality (F1/EM or Rouge-L) and fidelity to the full-prefill answers per mode (eval/<dataset>_eval.json),
with the cold TTFT (chunks on the start tier) and the warm TTFT (chunks GPU-resident) side by side, mean and
median each (`ttft_cold_ms`, `ttft_warm_ms`; a decoding file without warm figures, written before they existed or
with --no-warm, shows '-').

A decoding file made from other inputs (dataset, limit, top-k, retrieval, model) is decoded again first."""

from __future__ import annotations

import logging
from pathlib import Path

from kvblend.config import EngineConfig
from kvblend.io import atomic_write_json
from kvblend.pipeline.files import PipelineError, dataset_label, decode_path, mismatch, paths, read_stage_file
from kvblend.vocab import MODES

log = logging.getLogger(__name__)


def _token_encoder(config: EngineConfig):
    """Text -> token ids of the configured model's tokenizer (no special tokens), for the token-id F1."""
    from transformers import AutoTokenizer

    from kvblend.model.registry import resolve_model

    folder, _, _ = resolve_model(config.model)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


def _load_decodes(config: EngineConfig, modes: tuple[str, ...], engine=None, progress: bool = True) -> dict:
    from kvblend.pipeline.decode import run_decode

    loaded = {}
    for mode in modes:
        p = decode_path(config, mode)
        if not p.is_file():
            continue
        doc = read_stage_file(p, f"kvblend decode --mode {mode}")
        rows = doc.get("samples")
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "answer" in r for r in rows):
            raise PipelineError(f"{p}: corrupt or empty decoding file; re-run `kvblend decode --mode {mode}`")
        diff = mismatch(doc.get("made_from"), config)
        if diff:
            log.warning("%s was made from other inputs (%s); decoding %s again", p, diff, mode)
            if engine is None:
                from kvblend.pipeline.plan import make_engine

                engine = make_engine(config)
            doc = read_stage_file(run_decode(config, mode=mode, engine=engine, progress=progress), "kvblend decode")
        loaded[mode] = doc
    return loaded


def run_eval(config: EngineConfig, modes: tuple[str, ...] = MODES, token_f1: bool = False, engine=None,
             progress: bool = True) -> tuple[Path, list[dict]]:
    """Quality and fidelity to the full-prefill answers per mode. token_f1 adds the CacheBlend token-id F1
    (its Yes/No collapse included) computed with the configured model's tokenizer."""
    from kvblend.eval.metrics import best_em, cacheblend_f1, fidelity, flatten_answers, score_answer
    from kvblend.pipeline.decode import ttft_summary

    loaded = _load_decodes(config, modes, engine, progress)
    if not loaded:
        raise PipelineError(f"no decoding files for {dataset_label(config)} under {paths(config)['decode_dir']}; "
                            f"run `kvblend decode` first")
    full = {r["sample_id"]: r["answer"] for r in loaded.get("full", {}).get("samples", [])}
    encode = _token_encoder(config) if token_f1 else None
    table = []
    for mode, res in loaded.items():
        rows = res["samples"]
        metric = res.get("metric", "f1")
        golds = [tuple(tuple(a) for a in r.get("gold", [])) for r in rows]
        scores = [score_answer(metric, r["answer"], g) for r, g in zip(rows, golds) if g]
        ems = [best_em(r["answer"], g) for r, g in zip(rows, golds) if g] if metric != "rougeL" else []
        fid = [fidelity(r["answer"], full[r["sample_id"]]) for r in rows if r["sample_id"] in full]
        tok = [max(cacheblend_f1(r.get("raw_output", r["answer"]), a, encode) for a in flatten_answers(g))
               for r, g in zip(rows, golds) if g] if encode is not None and metric != "rougeL" else []
        table.append({
            "mode": mode, "ratio": res.get("ratio"), "num_samples": len(rows), "metric": metric,
            "score": sum(scores) / len(scores) if scores else None,
            "em": sum(ems) / len(ems) if ems else None,
            "token_f1_cacheblend": sum(tok) / len(tok) if tok else None,
            "fidelity_exact": sum(f["exact"] for f in fid) / len(fid) if fid else None,
            "fidelity_rougeL": sum(f["rougeL"] for f in fid) / len(fid) if fid else None,
            **_ttft_columns(res, ttft_summary(rows)), "mean_tpot_ms": res.get("mean_tpot_ms"),
            "mean_fetch_ms": res.get("mean_fetch_ms"), "start_tier": res.get("start_tier"),
            "prefetch": bool(res.get("prefetch")),
        })
    path = paths(config)["eval"]
    atomic_write_json(path, {"dataset": dataset_label(config), "modes": table})
    return path, table


def _ttft_columns(res: dict, summary: dict) -> dict:
    """The eval row's TTFT fields: cold and warm, mean and median, from the decoding file's rows (old files: the
    cold mean it recorded, no warm); `mean_ttft_ms` stays the cold mean, as before."""
    cold_mean = summary["mean_ttft_ms"] if summary["mean_ttft_ms"] is not None else res.get("mean_ttft_ms")
    return {"ttft_cold_ms": {"mean": cold_mean, "median": summary["median_ttft_ms"]},
            "ttft_warm_ms": {"mean": summary["mean_ttft_warm_ms"], "median": summary["median_ttft_warm_ms"]},
            "mean_ttft_ms": cold_mean}


def format_eval_table(table: list[dict]) -> str:
    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    def ttft(r: dict, which: str) -> dict:  # eval files written before the warm figures: cold mean only
        got = r.get(f"ttft_{which}_ms")
        return got if isinstance(got, dict) else {"mean": r.get("mean_ttft_ms") if which == "cold" else None,
                                                  "median": None}

    def vs(full: float | None, x: float | None) -> str:
        return f"{full / x:.2f}x" if full and x else "-"

    full = next((r for r in table if r["mode"] == "full"), None)
    full_cold, full_warm = (ttft(full, "cold")["mean"], ttft(full, "warm")["mean"]) if full else (None, None)
    lines = ["| mode | ratio | n | score | EM | fidelity exact | fidelity Rouge-L | TTFT cold ms mean / median "
             "| TTFT warm ms mean / median | fetch ms | TPOT ms | cold vs full | warm vs full |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        cold, warm = ttft(r, "cold"), ttft(r, "warm")
        lines.append(f"| {r['mode']} | {f(r['ratio'], '.2f')} | {r['num_samples']} | {f(r['score'])} ({r['metric']}) "
                     f"| {f(r['em'])} | {f(r['fidelity_exact'])} | {f(r['fidelity_rougeL'])} "
                     f"| {f(cold['mean'], '.0f')} / {f(cold['median'], '.0f')} "
                     f"| {f(warm['mean'], '.0f')} / {f(warm['median'], '.0f')} "
                     f"| {f(r.get('mean_fetch_ms'), '.1f')} | {f(r['mean_tpot_ms'], '.1f')} "
                     f"| {vs(full_cold, cold['mean'])} | {vs(full_warm, warm['mean'])} |")
    tiers = {r.get("start_tier") for r in table}
    if len(tiers) == 1 and None not in tiers:
        tier = tiers.pop()
        lines.append(f"\ncold: every mode started with its chunks on the {tier} tier"
                     + ("; after the first sample, chunks a prefetch had read into the cpu tier during the previous "
                        "sample's decode were found there (chunk_tiers; --no-prefetch for all-cold)"
                        if any(r.get("prefetch") for r in table) else "")
                     + "; warm: the same request, chunks GPU-resident (full prefill fetches nothing: warm = cold)")
    return "\n".join(lines)
