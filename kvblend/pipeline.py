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


SAMSUM_CONTEXT_TOKENS = 3400  # CacheBlend's samsum cap: middle few-shot examples are dropped beyond it


def keep_within(lengths: list[int], cap: int) -> list[int]:
    """Indices kept when the middle items are dropped one by one until the total length fits `cap`
    (the first and last items go last); every index when cap <= 0."""
    keep = list(range(len(lengths)))
    while cap > 0 and len(keep) > 1 and sum(lengths[i] for i in keep) > cap:
        del keep[len(keep) // 2]
    return keep


def plan_samples(config: EngineConfig, engine, data: Dataset, by_id: dict) -> list[SamplePlan]:
    from kvblend.types import Passage

    plans = []
    context = engine.model.shape.max_position_embeddings
    cap = config.max_context_tokens or (SAMSUM_CONTEXT_TOKENS if data.metric == "rougeL" else 0)
    for sample in data.samples:
        r = by_id[sample.sample_id]
        titles = r.titles or ("",) * len(r.texts)
        texts = tuple(data.template.format_passage(Passage(pid, t, x))
                      for pid, t, x in zip(r.passage_ids, titles, r.texts))
        passage_ids, scores = tuple(r.passage_ids), tuple(r.scores)
        query = data.template.format_query(sample.question)
        prompt = engine.prompt(data.template.prefix, texts, query)
        keep = keep_within([len(c) for c in prompt.chunk_ids], cap)
        if len(keep) < len(texts):
            log.info("%s: dropped %d middle chunks to fit %d context tokens", sample.sample_id,
                     len(texts) - len(keep), cap)
            texts = tuple(texts[i] for i in keep)
            passage_ids, scores = tuple(passage_ids[i] for i in keep), tuple(scores[i] for i in keep)
            prompt = engine.prompt(data.template.prefix, texts, query)
        needed = prompt.num_tokens + (config.max_new_tokens or data.max_new_tokens)
        if needed > context:
            raise PipelineError(f"sample {sample.sample_id}: prompt of {prompt.num_tokens} tokens + answer exceeds "
                                f"the {context}-token context of {engine.model.name}; lower --top-k or shorten "
                                f"the passages")
        plans.append(SamplePlan(sample.sample_id, sample.question, sample.answers, prompt, texts,
                                passage_ids, scores))
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
            unique.setdefault(engine.chunk_key(ids, plan.prompt.prefix_ids), (ids, text, plan.prompt.prefix_ids))
    for key, (ids, text, prefix_ids) in tqdm(unique.items(), desc="building chunk KV", unit="chunk", disable=not progress):
        if key in engine.store:
            skipped += 1
            continue
        engine.ensure_chunk(ids, text, prefix_ids=prefix_ids)
        built += 1
    for plan in plans:
        keys = [engine.chunk_key(ids, plan.prompt.prefix_ids) for ids in plan.prompt.chunk_ids]
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
def _answer_and_score(data: Dataset, plan: SamplePlan, text: str) -> tuple[str, float | None]:
    """The answer per the dataset's template (first line for QA) and its metric (None without gold)."""
    from kvblend.eval.metrics import first_line, score_answer

    answer = first_line(text) if data.template.first_line_only else text.strip()
    return answer, score_answer(data.metric, answer, plan.answers) if plan.answers else None


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
        answer, score = _answer_and_score(data, plan, out.text)
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
def _token_encoder(config: EngineConfig):
    """Text -> token ids of the configured model's tokenizer (no special tokens), for the token-id F1."""
    from transformers import AutoTokenizer

    from kvblend.model.registry import resolve_model

    folder, _, _ = resolve_model(config.model)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return lambda text: tok(text, add_special_tokens=False)["input_ids"]


def run_eval(config: EngineConfig, modes: tuple[str, ...] = ("full", "reuse", "blend"),
             token_f1: bool = False) -> tuple[Path, list[dict]]:
    """Quality (F1/EM or Rouge-L) and fidelity to the full-prefill answers per mode. token_f1 adds the
    CacheBlend token-id F1 (its Yes/No collapse included) computed with the configured model's tokenizer."""
    import json

    from kvblend.eval.metrics import best_em, cacheblend_f1, fidelity, flatten_answers, score_answer

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


# speculative decode with promotions ------------------------------------------------------------------
def spec_label(config: EngineConfig, gpu_chunks: int, proxy: str) -> str:
    return f"{dataset_label(config)}_spec_{config.drafter}_{proxy}_g{gpu_chunks}"


def run_speculative(config: EngineConfig, engine=None, draft=None, gpu_chunks: int | None = None,
                    proxy: str | None = None, progress: bool = True, trace_path: Path | None = None) -> Path:
    """Tiered speculative decoding: top `gpu_chunks` resident, the rest CPU placeholders promoted by `proxy`.
    Writes decoding/<dataset>_spec_<drafter>_<proxy>_g<N>.json and the per-step trace."""
    from kvblend.generation.speculative import spec_stats
    from kvblend.model.registry import load_model

    gpu_chunks = config.top_k_gpu if gpu_chunks is None else gpu_chunks
    proxy = config.proxy if proxy is None else proxy
    data, by_id = load_inputs(config)
    engine = engine or _engine(config)
    if config.drafter == "model" and draft is None:
        draft = load_model(config.draft_model, config.dtype, config.device)
    if draft is not None and draft.shape.vocab_size != engine.model.shape.vocab_size:
        log.warning("draft vocab %d != target vocab %d", draft.shape.vocab_size, engine.model.shape.vocab_size)
    plans = plan_samples(config, engine, data, by_id)
    sampling = engine.sampling(data.max_new_tokens)
    rows, trace_rows = [], []
    for i, plan in enumerate(tqdm(plans, desc=f"speculative ({config.drafter}, {proxy}, {gpu_chunks} on GPU)",
                                  unit="sample", disable=not progress)):
        out, steps, trace, placement = engine.answer_speculative(
            plan.prompt, plan.chunk_texts, plan.scores, gpu_chunks=gpu_chunks, drafter=config.drafter,
            draft_model=draft, proxy=None if proxy == "none" else proxy, threshold=config.promote_threshold,
            k=config.spec_k, sampling=sampling)
        answer, score = _answer_and_score(data, plan, out.text)
        st = spec_stats(steps)
        by_step = {t.step: t for t in trace}
        for j, step in enumerate(steps):
            row = {"sample_index": i, "sample_id": plan.sample_id, "step": j, "drafted": step.drafted_ids,
                   "accepted": step.num_accepted, "emitted": step.emitted_ids, "step_ms": round(step.step_ms, 3),
                   "ngram_source_chunk": step.source_chunk}
            if j in by_step:
                row.update({k: v for k, v in by_step[j].as_dict().items() if k not in ("step", "drafted", "accepted")})
            trace_rows.append(row)
        if -1 in by_step:  # the warm-start round before the first token
            trace_rows.append({"sample_index": i, "sample_id": plan.sample_id, **by_step[-1].as_dict()})
        promoted = [c for t in trace for c in t.promoted]
        rows.append({
            "sample_index": i, "sample_id": plan.sample_id, "answer": answer, "raw_output": out.text,
            "gold": [list(a) for a in plan.answers],
            "score": score,
            "ttft_ms": round(out.ttft_ms, 3), "tpot_ms": round(out.tpot_ms, 3),
            "num_output_tokens": len(out.token_ids), "output_ids": out.token_ids,
            "acceptance_rate": st.acceptance_rate, "mean_accepted": st.mean_accepted, "num_steps": st.num_steps,
            "tokens_per_s": (len(out.token_ids) / (sum(out.token_ms) / 1e3)) if out.token_ms else None,
            "promotions": len(promoted), "promoted_chunks": promoted,
            "demotions": sum(len(t.demoted) for t in trace),
            "initial_gpu_chunks": [s.index for s in placement.resident],
            "chunk_ids": list(plan.chunk_ids),
        })
    scored = [r["score"] for r in rows if r["score"] is not None]
    mean = lambda key: (sum(r[key] for r in rows if r[key] is not None) /  # noqa: E731
                        max(1, sum(r[key] is not None for r in rows)))
    result = {
        "dataset": data.name, "model": engine.model.name, "drafter": config.drafter,
        "draft_model": draft.name if draft is not None else None, "proxy": proxy, "gpu_chunks": gpu_chunks,
        "top_k": config.top_k, "threshold": config.promote_threshold, "spec_k": config.spec_k,
        "mode": config.mode, "ratio": config.ratio, "device": str(engine.model.device),
        "dtype": str(engine.model.dtype).removeprefix("torch."), "metric": data.metric,
        "mean_score": sum(scored) / len(scored) if scored else None,
        "mean_ttft_ms": mean("ttft_ms"), "mean_tpot_ms": mean("tpot_ms"), "tokens_per_s": mean("tokens_per_s"),
        "acceptance_rate": mean("acceptance_rate"), "promotions_per_sample": mean("promotions"),
        "samples": rows,
    }
    path = paths(config)["decode_dir"] / f"{spec_label(config, gpu_chunks, proxy)}.json"
    atomic_write_json(path, result)
    trace_path = trace_path or paths(config)["decode_dir"] / "speculative_trace.json"
    atomic_write_json(trace_path, {"config": {k: result[k] for k in ("dataset", "model", "drafter", "draft_model",
                                                                     "proxy", "gpu_chunks", "threshold", "spec_k")},
                                   "trace": trace_rows,
                                   "results": [{k: r[k] for k in ("sample_index", "sample_id", "answer", "ttft_ms",
                                                                  "tpot_ms", "acceptance_rate", "promotions",
                                                                  "score")} for r in rows]})
    return path


def run_budget_sweep(config: EngineConfig, max_chunks: int | None = None, progress: bool = True) -> tuple[Path, list]:
    """For GPU budgets of 1..N chunks (N = max_chunks, default top_k: every retrieved chunk), with and without
    promotions: quality, fidelity to the N-chunk run (all resident by default), TTFT, TPOT, promotions.
    Writes decoding/<dataset>_budget_sweep.json."""
    import json

    from kvblend.eval.metrics import fidelity

    engine = _engine(config)
    n = max_chunks or config.top_k
    data, by_id = load_inputs(config)
    warm = plan_samples(config, engine, data, by_id)[0]  # one uncounted answer: first-call costs off the clock
    engine.answer_speculative(warm.prompt, warm.chunk_texts, warm.scores, gpu_chunks=n, drafter="none",
                              sampling=engine.sampling(4))
    runs = []
    ref_path = run_speculative(config, engine=engine, gpu_chunks=n, proxy="none", progress=progress)
    ref = json.loads(ref_path.read_text())
    ref_answers = {r["sample_id"]: r["answer"] for r in ref["samples"]}
    for g in range(1, n + 1):
        for proxy in ("none", config.proxy) if g < n else ("none",):
            if proxy == "none" and g == n:
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
    atomic_write_json(path, {"dataset": dataset_label(config), "model": engine.model.name,
                             "drafter": config.drafter, "top_k": config.top_k, "runs": runs})
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
