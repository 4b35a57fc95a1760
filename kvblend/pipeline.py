"""The user pipeline: retrieve -> build -> decode -> eval, each step reading the previous step's file.

Files (under config.results_dir):
  retrieval/<dataset>_rag_<mode>_k<k>.json   ranked chunk ids, scores, texts per sample + answer-recall@k
  kv_caches/<dataset>_kv_top<k>.json         build summary: model, device, budgets, store stats, placements
  decoding/<dataset>_<mode>.json             answers, TTFT, TPOT, tokens, metric per sample
  eval/<dataset>_eval.json                   quality and fidelity to full prefill per mode
Every file is written atomically; the chunk store is content-addressed, so an interrupted build resumes
by skipping chunks already on disk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kvblend.config import EngineConfig
from kvblend.data.datasets import Dataset, load_dataset
from kvblend.errors import KvblendError
from kvblend.kvstore.tiers import atomic_write_json

log = logging.getLogger(__name__)


class PipelineError(KvblendError):
    pass


def dataset_label(config: EngineConfig) -> str:
    return Path(config.dataset).stem if ("/" in config.dataset or config.dataset.endswith(".json")) \
        else config.dataset


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


def _load(config: EngineConfig) -> Dataset:
    return load_dataset(config.dataset, limit=config.limit or None, seed=config.seed)


# retrieve -------------------------------------------------------------------------------------------
def run_retrieve(config: EngineConfig, progress: bool = True) -> tuple[Path, float | None]:
    from kvblend.retrieval import answer_recall_at_k, retrieve, save_retrieval

    data = _load(config)
    t0 = time.perf_counter()
    retrieved = retrieve(list(data.samples), config.retrieval_mode, config.top_k, config.retrieval_scope,
                         seed=config.seed, show_progress=progress)
    recall = answer_recall_at_k(list(data.samples), retrieved, config.top_k) if data.metric != "rougeL" else None
    path = paths(config)["retrieval"]
    save_retrieval(path, data.name, config.retrieval_mode, config.top_k, config.retrieval_scope, retrieved, recall)
    log.info("retrieved %d samples in %.1f s", len(retrieved), time.perf_counter() - t0)
    return path, recall


# build ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SamplePlan:
    """One sample's prompt ids and chunk texts, in retrieval order."""

    sample_id: str
    question: str
    answers: tuple[tuple[str, ...], ...]
    prompt: object  # PromptIds
    chunk_texts: tuple[str, ...]
    chunk_ids: tuple[str, ...]
    scores: tuple[float, ...]


def load_inputs(config: EngineConfig) -> tuple[Dataset, dict]:
    """The dataset and its retrieval results, checked against each other (before any model is loaded)."""
    from kvblend.retrieval import load_retrieval

    data = _load(config)
    path = paths(config)["retrieval"]
    if not path.is_file():
        raise PipelineError(f"{path}: retrieval file not found; run `kvblend retrieve` with the same --dataset, "
                            f"--retrieval-mode, --scope and --top-k first")
    run = load_retrieval(path)
    if (run.mode, run.k, run.scope) != (config.retrieval_mode, config.top_k, config.retrieval_scope):
        raise PipelineError(f"{path}: holds mode={run.mode} k={run.k} scope={run.scope}, but this run asks for "
                            f"mode={config.retrieval_mode} k={config.top_k} scope={config.retrieval_scope}; "
                            f"re-run `kvblend retrieve`")
    by_id = run.by_sample_id()
    for sample in data.samples:
        if sample.sample_id not in by_id:
            raise PipelineError(f"{path}: no retrieval for sample {sample.sample_id}; re-run `kvblend retrieve` "
                                f"with the same --dataset and --limit")
        if not by_id[sample.sample_id].texts:
            raise PipelineError(f"{path}: sample {sample.sample_id} has no retrieved chunks; re-run `kvblend retrieve`")
    return data, by_id


def plan_samples(config: EngineConfig, engine, data: Dataset, by_id: dict) -> list[SamplePlan]:
    from kvblend.types import Passage

    plans = []
    context = engine.model.shape.max_position_embeddings
    for sample in data.samples:
        r = by_id[sample.sample_id]
        titles = r.titles or ("",) * len(r.texts)
        texts = tuple(data.template.format_passage(Passage(pid, t, x))
                      for pid, t, x in zip(r.passage_ids, titles, r.texts))
        prompt = engine.prompt(data.template.prefix, texts, data.template.format_query(sample.question))
        needed = prompt.num_tokens + (config.max_new_tokens or data.max_new_tokens)
        if needed > context:
            raise PipelineError(f"sample {sample.sample_id}: prompt of {prompt.num_tokens} tokens + answer exceeds "
                                f"the {context}-token context of {engine.model.name}; lower --top-k or shorten "
                                f"the passages")
        plans.append(SamplePlan(sample.sample_id, sample.question, sample.answers, prompt, texts,
                                tuple(r.passage_ids), tuple(r.scores)))
    return plans


def _engine(config: EngineConfig):
    from kvblend.engine import Engine

    return Engine(config)


def run_build(config: EngineConfig, engine=None, progress: bool = True) -> Path:
    data, by_id = load_inputs(config)
    engine = engine or _engine(config)
    plans = plan_samples(config, engine, data, by_id)
    t0 = time.perf_counter()
    built = skipped = 0
    placements = []
    unique = {}
    for plan in plans:
        for ids, text in zip(plan.prompt.chunk_ids, plan.chunk_texts):
            unique.setdefault(engine.chunk_key(ids), (ids, text))
    for key, (ids, text) in tqdm(unique.items(), desc="building chunk KV", unit="chunk", disable=not progress):
        if key in engine.store:
            skipped += 1
            continue
        engine.ensure_chunk(ids, text)
        built += 1
    for plan in plans:
        keys = [engine.chunk_key(ids) for ids in plan.prompt.chunk_ids]
        placement = engine.store.place(keys, [len(i) for i in plan.prompt.chunk_ids], plan.scores,
                                       first_position=len(plan.prompt.prefix_ids), top_k=config.top_k_gpu)
        placements.append({
            "sample_id": plan.sample_id,
            "chunks": [{"chunk_id": cid, "key": s.key.digest, "tier": s.tier, "start": s.start,
                        "num_tokens": s.num_tokens, "score": s.score, "placeholder": s.is_placeholder}
                       for cid, s in zip(plan.chunk_ids, placement.slots)],
        })
        engine.store.release(placement)
    summary = {
        "retrieval_json": str(paths(config)["retrieval"]),
        "dataset": data.name, "model": engine.model.name, "model_fingerprint": engine.model.fingerprint,
        "dtype": str(engine.model.dtype).removeprefix("torch."), "device": str(engine.model.device),
        "top_k": config.top_k, "top_k_gpu": config.top_k_gpu, "num_samples": len(plans),
        "chunks_unique": len(unique), "chunks_built": built, "chunks_reused": skipped,
        "cache": engine.store.summary(), "store_dir": str(engine.store.disk.root),
        "elapsed_sec": round(time.perf_counter() - t0, 3), "placements": placements,
    }
    path = paths(config)["build"]
    atomic_write_json(path, summary)
    return path


# decode ---------------------------------------------------------------------------------------------
def _read_build_summary(config: EngineConfig) -> dict | None:
    """The build summary if present (decode builds missing chunks itself); PipelineError if corrupt."""
    import json

    path = paths(config)["build"]
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(summary, dict) or not isinstance(summary["model_fingerprint"], str) \
                or not isinstance(summary["placements"], list):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise PipelineError(f"{path}: corrupt build summary; delete it and re-run `kvblend build`") from None
    return summary


def run_decode(config: EngineConfig, mode: str | None = None, engine=None, progress: bool = True) -> Path:
    from kvblend.eval.metrics import first_line, score_answer

    mode = mode or config.mode
    data, by_id = load_inputs(config)
    summary = _read_build_summary(config)
    engine = engine or _engine(config)
    if summary is not None and summary.get("model_fingerprint") != engine.model.fingerprint:
        raise PipelineError(f"{paths(config)['build']}: built for model {summary.get('model_fingerprint')}, not "
                            f"{engine.model.fingerprint}; re-run `kvblend build` with this --model")
    plans = plan_samples(config, engine, data, by_id)
    sampling = engine.sampling(data.max_new_tokens)
    rows = []
    torch.manual_seed(config.seed)
    for plan in tqdm(plans, desc=f"decoding ({mode})", unit="sample", disable=not progress):
        out = engine.answer(plan.prompt, plan.chunk_texts, mode=mode, sampling=sampling)
        answer = first_line(out.text) if data.template.first_line_only else out.text.strip()
        score = score_answer(data.metric, answer, plan.answers) if plan.answers else None
        rows.append({
            "sample_id": plan.sample_id, "question": plan.question, "answer": answer, "raw_output": out.text,
            "gold": [list(a) for a in plan.answers], "metric": data.metric, "score": score,
            "ttft_ms": round(out.ttft_ms, 3), "tpot_ms": round(out.tpot_ms, 3),
            "num_output_tokens": len(out.token_ids), "output_ids": out.token_ids, "stop_reason": out.stop_reason,
            "prompt_tokens": out.blend.num_tokens, "recomputed_tokens": out.blend.num_recomputed,
            "chunk_ids": list(plan.chunk_ids),
        })
    scored = [r["score"] for r in rows if r["score"] is not None]
    result = {
        "dataset": data.name, "mode": mode, "ratio": config.ratio if mode == "blend" else (1.0 if mode == "full" else 0.0),
        "model": engine.model.name, "device": str(engine.model.device),
        "dtype": str(engine.model.dtype).removeprefix("torch."), "metric": data.metric,
        "mean_score": sum(scored) / len(scored) if scored else None,
        "mean_ttft_ms": sum(r["ttft_ms"] for r in rows) / max(1, len(rows)),
        "mean_tpot_ms": sum(r["tpot_ms"] for r in rows) / max(1, len(rows)),
        "samples": rows,
    }
    path = decode_path(config, mode)
    atomic_write_json(path, result)
    return path


# eval -----------------------------------------------------------------------------------------------
def run_eval(config: EngineConfig, modes: tuple[str, ...] = ("full", "reuse", "blend")) -> tuple[Path, list[dict]]:
    import json

    from kvblend.eval.metrics import best_em, fidelity, score_answer

    loaded = {}
    for mode in modes:
        p = decode_path(config, mode)
        if not p.is_file():
            continue
        try:
            loaded[mode] = json.loads(p.read_text(encoding="utf-8"))
            loaded[mode]["samples"][0]["answer"]  # noqa: B018 (shape check)
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
            raise PipelineError(f"{p}: corrupt or empty decoding file; re-run `kvblend decode --mode {mode}`") from None
    if not loaded:
        raise PipelineError(f"no decoding files for {dataset_label(config)} under {paths(config)['decode_dir']}; "
                            f"run `kvblend decode` first")
    full = {r["sample_id"]: r["answer"] for r in loaded.get("full", {}).get("samples", [])}
    table = []
    for mode, res in loaded.items():
        rows = res["samples"]
        metric = res.get("metric", "f1")
        golds = [tuple(tuple(a) for a in r.get("gold", [])) for r in rows]
        scores = [score_answer(metric, r["answer"], g) for r, g in zip(rows, golds) if g]
        ems = [best_em(r["answer"], g) for r, g in zip(rows, golds) if g] if metric != "rougeL" else []
        fid = [fidelity(r["answer"], full[r["sample_id"]]) for r in rows if r["sample_id"] in full]
        table.append({
            "mode": mode, "ratio": res.get("ratio"), "num_samples": len(rows), "metric": metric,
            "score": sum(scores) / len(scores) if scores else None,
            "em": sum(ems) / len(ems) if ems else None,
            "fidelity_exact": sum(f["exact"] for f in fid) / len(fid) if fid else None,
            "fidelity_rougeL": sum(f["rougeL"] for f in fid) / len(fid) if fid else None,
            "mean_ttft_ms": res.get("mean_ttft_ms"), "mean_tpot_ms": res.get("mean_tpot_ms"),
        })
    path = paths(config)["eval"]
    atomic_write_json(path, {"dataset": dataset_label(config), "modes": table})
    return path, table


def format_eval_table(table: list[dict]) -> str:
    full_ttft = next((r["mean_ttft_ms"] for r in table if r["mode"] == "full"), None)

    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    lines = ["| mode | ratio | n | score | EM | fidelity exact | fidelity Rouge-L | TTFT ms | TPOT ms | TTFT vs full |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        speed = f"{full_ttft / r['mean_ttft_ms']:.2f}x" if full_ttft and r["mean_ttft_ms"] else "-"
        lines.append(f"| {r['mode']} | {f(r['ratio'], '.2f')} | {r['num_samples']} | {f(r['score'])} ({r['metric']}) "
                     f"| {f(r['em'])} | {f(r['fidelity_exact'])} | {f(r['fidelity_rougeL'])} "
                     f"| {f(r['mean_ttft_ms'], '.0f')} | {f(r['mean_tpot_ms'], '.1f')} | {speed} |")
    return "\n".join(lines)
