"""`kvblend residency`: retrieve N, keep K. Per sample, N candidate passages as chunks, a GPU budget of K chunks,
four arms through Engine.answer_speculative (greedy, blend mode, n-gram drafts):

  all_resident   every chunk resident, no proxy: the reference answer;
  static         the top K by retrieval score resident (pipeline/plan.py::plan_first_passages scores: the first K
                 passages), the rest placeholders never attended;
  promote        static's start, then decode-time promotions by the key-summary proxy (key_bounds: every query row
                 of each verification pass scores every chunk's summary bound; budget full: the least-attended
                 unpinned resident is demoted);
  look_promote   look before loading (the query's summary bounds swap placeholders in before the prefill that
                 makes the first token), then promote as above.

Per arm: the answer's token ids equal to all_resident's, the task score (the dataset metric, F1 on QA), TTFT,
promotions and demotions, bytes moved between tiers, peak resident chunk-KV bytes (+ the summaries of every
candidate, which stay resident), and the proxy's recall@K: the share of the all-resident model's query attention
mass (the query rows of an all-resident blend prefill, every layer and head, softmax over the whole prompt) on the
chunks resident when the first token is produced, over the mass of the oracle top-K by that mass.

Importing this module does not import torch (the CLI parser reads ResidencySettings).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

ARMS = ("all_resident", "static", "promote", "look_promote")


@dataclass(frozen=True)
class ResidencySettings:
    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str = "cpu"
    dataset: str = "musique_s"
    limit: int = 30
    offset: int = 0
    candidates: int = 10  # N passages per question as chunks
    gpu_chunks: int = 3  # K: the GPU budget in chunks
    passage_tokens: int = 0  # cut each passage to its first M tokens (0: whole passages)
    max_new_tokens: int = 24
    ratio: float = 0.15
    threshold: float = 0.1  # summary share (over all chunks) a placeholder needs to be promoted
    spec_k: int = 4
    out: str = "docs/results/quality/residency_smollm2_cpu.json"
    time_budget_s: float = 0.0  # stop starting new samples after this long (0: no limit)


def cut_passage(tokenizer, text: str, max_tokens: int) -> str:
    """The passage's first max_tokens tokens as text (the prompt is then tokenised once, as every arm sees it)."""
    if max_tokens <= 0:
        return text
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def sample_prompts(data, tokenizer, s: ResidencySettings):
    from kvblend.data.prompt import build_prompt

    out = []
    for sample in data.samples[s.offset:s.offset + s.limit if s.limit else None]:
        texts = [cut_passage(tokenizer, data.template.format_passage(p), s.passage_tokens)
                 for p in sample.passages[:s.candidates]]
        prompt = build_prompt(tokenizer, data.template.prefix, texts, data.template.format_query(sample.question))
        out.append((sample, prompt))
    return out


def chunk_ranges(prompt) -> list[tuple[int, int]]:
    a, out = len(prompt.prefix_ids), []
    for ids in prompt.chunk_ids:
        out.append((a, a + len(ids)))
        a += len(ids)
    return out


def query_attention_mass(engine, prompt, ratio: float) -> list[float]:
    """Per chunk, the all-resident blend's query attention mass (every query row, layer and head; softmax over
    the whole causal prompt), the oracle of the proxy's recall."""
    import torch

    with torch.inference_mode():
        return _query_attention_mass(engine, prompt, ratio)


def _query_attention_mass(engine, prompt, ratio: float) -> list[float]:
    import torch

    from kvblend.fusion.blend import prefill
    from kvblend.model.layers import forward_tokens

    model = engine.model
    chunks = [engine.ensure_chunk(ids, prefix_ids=prompt.prefix_ids) for ids in prompt.chunk_ids]
    res = prefill(engine.runner, prompt, chunks, mode="blend", ratio=ratio, check_layer=engine.config.check_layer,
                  selection=engine.selection)
    n, q0 = prompt.num_tokens, prompt.num_tokens - len(prompt.query_ids)
    res.state.truncate(q0)
    queries: list = []
    forward_tokens(model, res.state, list(prompt.query_ids), num_logits=0, queries_out=queries)
    group = model.shape.num_heads // model.shape.num_kv_heads
    future = torch.arange(n, device=model.device)[None] > torch.arange(q0, n, device=model.device)[:, None]
    mass = torch.zeros(len(prompt.chunk_ids))
    for layer, q in enumerate(queries):
        k = res.state.k[layer, :, :n].to(torch.float32).repeat_interleave(group, dim=0)
        logits = torch.einsum("htd,hnd->htn", q.to(torch.float32), k) * model.attn_scale
        p = torch.softmax(logits.masked_fill(future[None], float("-inf")), dim=-1).mean(dim=(0, 1)).cpu()
        for i, (a, b) in enumerate(chunk_ranges(prompt)):
            mass[i] += p[a:b].sum()
    res.state.release()
    return (mass / len(queries)).tolist()


def recall_at(resident: Sequence[int], mass: Sequence[float], k: int) -> float:
    """Mass on `resident` over the mass of the oracle top-k by mass."""
    top = sorted(mass, reverse=True)[:k]
    return float(sum(mass[i] for i in resident) / max(1e-12, sum(top)))


def arm_options(s: ResidencySettings, n: int) -> dict:
    from kvblend.engine import SpecOptions

    common = dict(drafter="ngram", mode="blend", ratio=s.ratio, k=s.spec_k, warm_start=False,
                  threshold=s.threshold, pinned_top=1)
    return {"all_resident": SpecOptions(gpu_chunks=n, proxy="none", **common),
            "static": SpecOptions(gpu_chunks=s.gpu_chunks, proxy="none", **common),
            "promote": SpecOptions(gpu_chunks=s.gpu_chunks, proxy="key_bounds", **common),
            "look_promote": SpecOptions(gpu_chunks=s.gpu_chunks, proxy="key_bounds", look=True, **common)}


def run_arm(engine, prompt, scores, options, params, mass: Sequence[float], k: int) -> dict[str, Any]:
    """One arm on one prompt: its answer ids, timings, moves, residency at the first token, recall@k."""
    moved0 = sum(engine.store.stats.bytes_moved.values())
    out, steps, trace, placement = engine.answer_speculative(prompt, None, scores, options, sampling=params)
    first = [s.index for s in placement.resident]
    if trace and trace[0].step == -1:  # a look round before the first token
        first = trace[0].gpu_chunks
    nbytes = [engine.store.stored_nbytes(s.key) for s in placement.slots]
    # the request's own resident chunk bytes (the store's GPU tier also holds other requests' unpinned chunks)
    peak = max([sum(nbytes[i] for i in t.gpu_chunks) for t in trace] + [sum(nbytes[i] for i in first)])
    return {"tokens": list(out.token_ids), "ttft_ms": out.ttft_ms, "resident_first": first,
            "recall": recall_at(first, mass, max(k, len(first))), "promotions": sum(len(t.promoted) for t in trace),
            "demotions": sum(len(t.demoted) for t in trace),
            "bytes_moved": sum(engine.store.stats.bytes_moved.values()) - moved0,
            "peak_chunk_bytes": peak, "peak_source": "measured", "chunk_bytes": nbytes,
            "all_chunk_bytes": sum(nbytes), "num_tokens": len(out.token_ids)}


def measure_sample(engine, data, sample, prompt, s: ResidencySettings) -> dict[str, Any]:
    from kvblend.eval.metrics import first_line, score_answer
    from kvblend.generation.sampling import SamplingParams
    from kvblend.quality.promotion import first_passage_scores

    n = len(prompt.chunk_ids)
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=0.0, stop_on_newline=True)
    t0 = time.perf_counter()
    mass = query_attention_mass(engine, prompt, s.ratio)  # builds every chunk (and its summary) once
    scores = first_passage_scores(n)
    arms = {}
    for name, o in arm_options(s, n).items():
        rec = run_arm(engine, prompt, scores, o, params, mass, s.gpu_chunks)
        rec["answer"] = first_line(engine.model.tokenizer.decode(rec["tokens"], skip_special_tokens=True))
        rec["score"] = score_answer(data.metric, rec["answer"], sample.answers) if sample.answers else None
        arms[name] = rec
    for rec in arms.values():
        rec["same_as_all_resident"] = rec["tokens"] == arms["all_resident"]["tokens"]
    summaries = [engine.summaries.get(lambda ids=ids: engine.ensure_chunk(ids, prefix_ids=prompt.prefix_ids),
                                      key.digest).nbytes for ids, key in zip(prompt.chunk_ids, engine.keys(prompt))]
    return {"sample_id": sample.sample_id, "num_chunks": n, "prompt_tokens": prompt.num_tokens,
            "attention_mass": [round(m, 5) for m in mass], "summary_bytes": summaries,
            "oracle_top": sorted(range(n), key=lambda i: -mass[i])[:s.gpu_chunks],
            "seconds": round(time.perf_counter() - t0, 2), "arms": arms}


def _mean(xs: Sequence[float]) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _median(xs: Sequence[float]) -> float | None:
    xs = sorted(float(x) for x in xs)
    return xs[len(xs) // 2] if xs else None


def aggregate(samples: Sequence[dict], k: int) -> dict[str, Any]:
    """Per arm means (medians for TTFT) over the samples, and the issue-18 ratios."""
    out: dict[str, Any] = {"n": len(samples), "arms": {}}
    for arm in ARMS:
        recs = [s["arms"][arm] for s in samples]
        out["arms"][arm] = {
            "same_as_all_resident": _mean([r["same_as_all_resident"] for r in recs]),
            "score": _mean([r["score"] for r in recs]), "recall_at_k": _mean([r["recall"] for r in recs]),
            "promotions_per_sample": _mean([r["promotions"] for r in recs]),
            "demotions_per_sample": _mean([r["demotions"] for r in recs]),
            "bytes_moved_per_sample": _mean([r["bytes_moved"] for r in recs]),
            "ttft_ms_median": _median([r["ttft_ms"] for r in recs]),
            "peak_chunk_bytes_per_sample": _mean([r["peak_chunk_bytes"] for r in recs])}
    a = out["arms"]
    static = a["static"]["same_as_all_resident"] or 0.0
    for arm in ("promote", "look_promote"):
        same = a[arm]["same_as_all_resident"] or 0.0
        out[f"recovery_{arm}"] = (same - static) / (1 - static) if static < 1 else None
    summ = _mean([sum(s["summary_bytes"]) for s in samples]) or 0.0
    allb = _mean([s["arms"]["all_resident"]["all_chunk_bytes"] for s in samples]) or 1.0
    out["summary_bytes_per_chunk"] = _mean([b for s in samples for b in s["summary_bytes"]])
    out["summary_fraction_of_kv"] = summ / allb
    out["gpu_bytes_ratio_look_promote_vs_all"] = (
        ((a["look_promote"]["peak_chunk_bytes_per_sample"] or 0.0) + summ) / allb)
    out["ttft_ratio_look_promote_vs_all"] = ((a["look_promote"]["ttft_ms_median"] or 0.0)
                                            / max(1e-9, a["all_resident"]["ttft_ms_median"] or 0.0))
    return out


def hardware(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_residency(s: ResidencySettings, progress=None) -> tuple[Path, dict]:
    """The sweep of the module docstring; the JSON document is rewritten after every sample (a run cut short
    keeps what it measured). progress(i, record): called after each sample."""
    from kvblend.config import EngineConfig
    from kvblend.data.datasets import load_dataset
    from kvblend.engine import Engine
    from kvblend.io import atomic_write_json
    from kvblend.model.registry import load_model

    model = load_model(s.model, s.dtype, s.device)
    data = load_dataset(s.dataset)
    prompts = sample_prompts(data, model.tokenizer, s)
    out, samples, t0 = Path(s.out), [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvblend-residency-") as home:
        config = EngineConfig(home=home, mode="blend", ratio=s.ratio, gpu_chunks=s.gpu_chunks, temperature=0.0,
                              max_new_tokens=s.max_new_tokens, gpu_budget="64GiB", cpu_budget="64GiB")
        engine = Engine(config, model=model)
        for i, (sample, prompt) in enumerate(prompts):
            if s.time_budget_s and time.perf_counter() - t0 > s.time_budget_s:
                log.warning("time budget of %.0f s spent: %d of %d samples measured", s.time_budget_s, i, len(prompts))
                break
            samples.append(measure_sample(engine, data, sample, prompt, s))
            doc = {"settings": asdict(s), "hardware": hardware(model.device), "model": model.name,
                   "summary_layers": list(engine.summaries.layers), "page_tokens": engine.summaries.page_tokens,
                   "aggregate": aggregate(samples, s.gpu_chunks), "samples": samples,
                   "wall_s": round(time.perf_counter() - t0, 1)}
            atomic_write_json(out, doc)
            if progress is not None:
                progress(i, samples[-1])
    return out, doc


def summary_entries(doc: dict, source: str) -> dict[str, dict]:
    """The summary keys this sweep measures (docs/results/quality/summary.json): Q3_promotion_recovery (the
    issue-18 definition: K of N, look before loading + promotions vs static top-K), the proxy's recall@K and the
    GPU bytes ratio."""
    from kvblend.bench.summary import entry

    agg, st = doc["aggregate"], doc["settings"]
    k, n = st["gpu_chunks"], st["candidates"]
    common = dict(n_samples=agg["n"], dataset=st["dataset"], model=doc["model"], device=doc["hardware"],
                  gpu_chunks=k, candidates=n, passage_tokens=st["passage_tokens"])
    out = {}
    if agg.get("recovery_look_promote") is not None:
        a = agg["arms"]
        out["Q3_promotion_recovery"] = entry(
            agg["recovery_look_promote"], 0.8, "higher", source, **common,
            metric=f"(same-as-all-resident, look+promote - static top-{k}) / (1 - static top-{k}), {k} of {n}",
            same_as_all_resident={arm: a[arm]["same_as_all_resident"] for arm in ARMS},
            score={arm: a[arm]["score"] for arm in ARMS}, recovery_promote_only=agg["recovery_promote"])
    out[f"Q3c_proxy_recall_k{k}"] = entry(agg["arms"]["look_promote"]["recall_at_k"], 0.9, "higher", source,
                                          **common, static_recall=agg["arms"]["static"]["recall_at_k"])
    out[f"Q3e_gpu_bytes_k{k}_vs_all"] = entry(agg["gpu_bytes_ratio_look_promote_vs_all"], 0.4, "lower", source,
                                              **common, summary_fraction_of_kv=agg["summary_fraction_of_kv"])
    return out


def markdown_table(doc: dict) -> str:
    """The per-arm table of a residency document (docs/RESIDENCY.md)."""
    agg = doc["aggregate"]
    rows = ["| arm | same as all-resident | task score (F1) | recall@K at first token | promotions / sample | "
            "demotions / sample | bytes moved / sample | peak chunk-KV bytes / sample | TTFT median (ms) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        a = agg["arms"][arm]
        rows.append(f"| {arm} | {a['same_as_all_resident']:.3f} | {a['score'] or 0:.3f} | {a['recall_at_k']:.3f} | "
                    f"{a['promotions_per_sample']:.2f} | {a['demotions_per_sample']:.2f} | "
                    f"{a['bytes_moved_per_sample'] / 2**20:.2f} MiB | {a['peak_chunk_bytes_per_sample'] / 2**20:.2f} MiB"
                    f" | {a['ttft_ms_median']:.0f} |")
    return "\n".join(rows)


def backfill_peaks(doc: dict, model) -> dict:
    """For a document written before run_arm recorded the request's own resident bytes: per arm, the peak set to
    the Residency's bound (the K largest chunks of the sample; all of them for all_resident), labelled
    peak_source "budget bound"; chunk sizes from the prompts' token counts. Re-aggregates."""
    from kvblend.data.datasets import load_dataset
    from kvblend.kvstore.builder import chunk_nbytes

    s = ResidencySettings(**doc["settings"])
    prompts = dict((x.sample_id, p) for x, p in sample_prompts(load_dataset(s.dataset), model.tokenizer, s))
    for rec in doc["samples"]:
        if all(r.get("peak_source") == "measured" for r in rec["arms"].values()):
            continue
        sizes = [chunk_nbytes(model, len(ids)) for ids in prompts[rec["sample_id"]].chunk_ids]
        for arm, r in rec["arms"].items():
            if r.get("peak_source") == "measured":
                continue
            k = len(sizes) if arm == "all_resident" else s.gpu_chunks
            r.update(chunk_bytes=sizes, peak_chunk_bytes=sum(sorted(sizes, reverse=True)[:k]),
                     peak_source="budget bound", all_chunk_bytes=sum(sizes))
    doc["aggregate"] = aggregate(doc["samples"], s.gpu_chunks)
    return doc
