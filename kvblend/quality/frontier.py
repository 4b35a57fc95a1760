"""The quality frontier: every variant x ratio against full prefill, on the same chunks and prompts.

Per sample: the full-prefill reference (first-token distribution, greedy answer T, and its distributions
along T, teacher-forced); then for each variant x ratio a blended prefill from chunk caches precomputed in
the variant's context, and
  kl_first    KL(full || x) of the first answer token;
  kl_mean     KL(full || x) averaged over the positions of T (teacher-forced: x sees T's tokens too);
  same        x's greedy answer has the same token ids as full's;
  exact       x's answer equals full's after SQuAD normalisation;  fid_rougeL  Rouge-L to full's answer;
  score       the task metric against gold (word F1 for QA, Rouge-L for samsum);
  recompute   fraction of chunk tokens recomputed;  prefill_ms  wall time of the blended prefill.
x's greedy answer is read off the teacher-forced pass up to the first token where its argmax leaves T, then
decoded on from there (identical to greedy decoding from x's prefill, without re-decoding the shared start).
Ratio 0 is reuse and ratio 1 full prefill for every selection signal (tests/test_quality.py), so they are
computed once per precompute context and shared by the variants that use it.

Results are written atomically after every sample and a rerun resumes: samples and runs already in the
file are kept, missing ones computed.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from kvblend.data.prompt import build_prompt, chunk_context_ids
from kvblend.eval.metrics import compare_to_full, first_line, score_answer
from kvblend.fusion.blend import prefill
from kvblend.fusion.select import DRAFT_SIGNALS, SelectionPolicy, draft_attention_prior
from kvblend.generation.generate import NewlineDetector, Stopper
from kvblend.generation.sampling import SamplingParams
from kvblend.bench.summary import git_sha
from kvblend.io import atomic_write_json
from kvblend.kvstore.builder import build_chunk_kv
from kvblend.model.hf import DecoderModel
from kvblend.model.kv import KVState
from kvblend.model.layers import forward_tokens
from kvblend.model.runner import elapsed_ms, runner_of
from kvblend.quality.provenance import (PROVENANCE, merge_passes, merge_record, new_pass, sha_counts,
                                        with_provenance)
from kvblend.quality.stats import mean_ci
from kvblend.quality.variants import VARIANTS, without_draft
from kvblend.types import PromptIds

log = logging.getLogger(__name__)

SCHEMA = 1
DEFAULT_RATIOS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
METRICS = ("kl_first", "kl_mean", "same", "exact", "fid_rougeL", "score", "recompute", "prefill_ms")


@dataclass(slots=True)
class FrontierSettings:
    dataset: str = "musique_s"
    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str = "auto"
    variants: list[str] = field(default_factory=lambda: without_draft(list(VARIANTS)))
    ratios: list[float] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    limit: int = 0  # 0 = every sample
    offset: int = 0  # skip the first `offset` samples (held-out checks)
    chunks: int = 5  # first N passages of each sample
    max_new_tokens: int = 0  # 0 = the dataset's default
    check_layer: int = 1
    out_dir: str = "results/quality"
    progress: bool = True
    shard: tuple[int, int] = (0, 1)  # (i, k): this process takes samples i, i+k, i+2k, ... (kvblend frontier --jobs)
    deadline: float = 0.0  # time.time() after which no new sample is started (0 = none); the file stays resumable
    promotion: tuple[str, float, int] | None = None  # Q3 (variant, ratio, gpu_chunks): quality/promotion.py
    draft_model: str = ""  # named model or folder whose attention the draft signals use (CacheClip)


def run_key(variant: str, ratio: float) -> str:
    return f"{variant}@{ratio:g}"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name if os.sep in text else text)


def output_path(s: FrontierSettings, dataset_label: str, dtype_label: str, shard: bool = True) -> Path:
    tail = f"_from{s.offset}" if s.offset else ""
    i, k = s.shard
    part = f".shard{i}of{k}" if shard and k > 1 else ""
    return Path(s.out_dir) / f"frontier_{safe_name(dataset_label)}_{safe_name(s.model)}_{dtype_label}{tail}{part}.json"


# ---------------------------------------------------------------------------------------------- decoding


def _greedy(model: DecoderModel, state: KVState, first: int, stop: Stopper) -> tuple[list[int], int | None]:
    """Greedy decoding from `first` (the next token, not yet in the cache). Returns (answer ids, stop token
    when it was an end-of-sequence id)."""
    token = first
    while not stop.push(token, state.length):
        token = int(forward_tokens(model, state, [token])[-1].argmax())
    return stop.tokens, (token if stop.reason == "eos" else None)


def _forced_logp(model: DecoderModel, state: KVState, first_logits: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """log-probabilities [len(target), V] (fp32) of each position of `target`, teacher-forced after the prompt."""
    rows = [first_logits.to(torch.float32)[None]]
    if len(target) > 1:
        rows.append(forward_tokens(model, state, list(target[:-1])).to(torch.float32))
    return torch.cat(rows).log_softmax(dim=-1)


@dataclass(slots=True)
class Reference:
    """Full prefill of one prompt: its answer ids, the target T (answer + EOS when it stopped on one) and
    the log-probabilities along T."""

    tokens: list[int]
    target: list[int]
    logp: torch.Tensor
    stop_reason: str
    prefill_ms: float


def reference(model: DecoderModel, prompt: PromptIds, params: SamplingParams,
              newline: NewlineDetector | None) -> Reference:
    t0 = time.perf_counter()  # a private state, eager layers: the same arithmetic as compare()
    state, logits = runner_of(model).forward(prompt.flat(), params.max_new_tokens + 1, static=False)
    prefill_ms = elapsed_ms(t0, model.device)
    n = prompt.num_tokens
    stop = Stopper(model, params, model.eos_token_ids(), state.capacity, newline)
    tokens, eos = _greedy(model, state, int(logits.argmax()), stop)
    tokens = list(tokens)
    target = tokens + ([eos] if eos is not None else [])
    state.truncate(n)
    logp = _forced_logp(model, state, logits, target)
    return Reference(tokens, target, logp, stop.reason or "", prefill_ms)


def compare(model: DecoderModel, prompt: PromptIds, ref: Reference, chunks, mode: str, ratio: float,
            policy: SelectionPolicy, params: SamplingParams, newline: NewlineDetector | None,
            check_layer: int = 1, prior: torch.Tensor | None = None) -> dict[str, Any]:
    """One blended prefill against the reference: KLs, its greedy answer ids, recompute fraction, time."""
    n = prompt.num_tokens
    res = prefill(model, prompt, chunks if mode != "full" else None, mode=mode, ratio=ratio,
                  check_layer=check_layer, selection=policy, extra_capacity=params.max_new_tokens + 1,
                  recompute="plain", prior=prior)  # eager layers: the same arithmetic on CPU and CUDA, no graph captures
    logp = _forced_logp(model, res.state, res.logits, ref.target)
    kl = (ref.logp.exp() * (ref.logp - logp)).sum(dim=-1).clamp_min(0.0)
    target = torch.tensor(ref.target, device=logp.device)
    off = (logp.argmax(dim=-1) != target).nonzero()
    if off.numel() == 0:
        tokens, diverge = list(ref.tokens), None
    else:
        j = int(off[0, 0])
        res.state.truncate(n + j)
        stop = Stopper(model, params, model.eos_token_ids(), res.state.capacity, newline)
        for i, t in enumerate(ref.target[:j]):
            if stop.push(t, n + i):  # cannot happen: the reference went on after these tokens
                raise AssertionError("the reference answer stops before its own end")
        tokens, _ = _greedy(model, res.state, int(logp[j].argmax()), stop)
        tokens, diverge = list(tokens), j
    st = res.stats
    return {
        "kl_first": float(kl[0]), "kl_mean": float(kl.mean()), "tokens": tokens, "diverge_at": diverge,
        "recompute": (len(st.selected_positions) / st.num_chunk_tokens) if mode == "blend" and st.num_chunk_tokens
        else (1.0 if mode == "full" else 0.0),
        "prefill_ms": st.prefill_ms,
    }


# ---------------------------------------------------------------------------------------------- samples


def _answer_text(model: DecoderModel, tokens: Sequence[int], first_line_only: bool) -> str:
    if model.tokenizer is None:
        return " ".join(str(t) for t in tokens)
    text = model.tokenizer.decode(list(tokens), skip_special_tokens=True)
    return first_line(text) if first_line_only else text.strip()


def evaluate_prompt(model: DecoderModel, prompt: PromptIds, variants: Sequence[str], ratios: Sequence[float],
                    params: SamplingParams, *, first_line_only: bool = True, metric: str | None = None,
                    answers: Any = None, done: dict | None = None, check_layer: int = 1,
                    newline: NewlineDetector | None = None, promotion: tuple[str, float, int] | None = None,
                    done_promotion: dict | None = None, pass_id: str = "",
                    draft: DecoderModel | None = None) -> dict[str, Any]:
    """Every variant x ratio on one prompt. done: runs already measured (kept). promotion: (variant, ratio,
    gpu_chunks) of the Q3 measurement (quality/promotion.py), added under record["promotion"][key] unless
    done_promotion has it. pass_id: recorded in every run (and promotion record) computed now. Returns the
    sample record."""
    runs: dict[str, dict] = dict(done or {})
    todo = [(v, r) for v in variants for r in ratios if run_key(v, r) not in runs]
    t0 = time.perf_counter()
    ref = reference(model, prompt, params, newline)
    full_answer = _answer_text(model, ref.tokens, first_line_only)
    record: dict[str, Any] = {
        "num_tokens": prompt.num_tokens, "num_chunk_tokens": sum(len(c) for c in prompt.chunk_ids),
        "num_chunks": len(prompt.chunk_ids),
        "full": {"answer": full_answer, "tokens": ref.tokens, "stop": ref.stop_reason,
                 "score": score_answer(metric, full_answer, answers) if metric and answers else None,
                 "prefill_ms": ref.prefill_ms},
    }
    caches: dict[str, list] = {}
    shared: dict[tuple[str, float], dict] = {}  # (context, 0 or 1) -> result: selection plays no part there
    prior = None  # the draft model's attention over the prompt, for the draft signals (computed once)
    if draft is not None and any(VARIANTS[name].score_on in DRAFT_SIGNALS for name, _ in todo):
        prior = draft_attention_prior(draft, prompt.flat(), len(prompt.query_ids))
    for name, ratio in todo:
        v = VARIANTS[name]
        if v.chunk_sink not in caches:
            ctx = chunk_context_ids(model.tokenizer, v.chunk_sink, prompt.prefix_ids)
            caches[v.chunk_sink] = [build_chunk_kv(model, ids, ctx) for ids in prompt.chunk_ids]
        mode = "reuse" if ratio <= 0 else ("full" if ratio >= 1 else "blend")
        key = (v.chunk_sink if mode == "reuse" else "", ratio)
        if mode != "blend" and key in shared:
            out = dict(shared[key])
        else:
            policy = SelectionPolicy(v.score_on, v.select_first_tokens, v.select_layers)
            if policy.needs_draft and prior is None:
                raise ValueError(f"variant {name} needs a draft model (kvblend frontier --draft-model)")
            out = compare(model, prompt, ref, caches[v.chunk_sink], mode, ratio, policy, params, newline,
                          check_layer, prior=prior)
            if mode != "blend":
                shared[key] = out
        answer = _answer_text(model, out["tokens"], first_line_only)
        runs[run_key(name, ratio)] = {
            "kl_first": out["kl_first"], "kl_mean": out["kl_mean"], "answer": answer,
            **compare_to_full(out["tokens"], ref.tokens, answer, full_answer, metric, answers),
            "diverge_at": out["diverge_at"], "recompute": out["recompute"], "prefill_ms": out["prefill_ms"],
            **({"pass": pass_id} if pass_id else {}),
            **({"draft_model": draft.name} if VARIANTS[name].score_on in DRAFT_SIGNALS and draft is not None else {}),
        }
    record["runs"] = runs
    if promotion is not None or done_promotion:
        from kvblend.quality.promotion import measure_promotion, promotion_key

        promos = dict(done_promotion or {})
        if promotion is not None and promotion_key(*promotion) not in promos:
            variant, ratio, gpu_chunks = promotion
            rec = measure_promotion(model, prompt, ref.tokens, full_answer, params, variant, ratio, gpu_chunks,
                                    check_layer, answer_text=lambda ids: _answer_text(model, ids, first_line_only),
                                    metric=metric, answers=answers)
            promos[promotion_key(*promotion)] = {**rec, **({"pass": pass_id} if pass_id else {})}
        record["promotion"] = promos
    record["seconds"] = time.perf_counter() - t0
    return record


def timing_hardware(samples: list[dict]) -> str:
    """The hardware most samples were measured on: prefill times are averaged over those samples only."""
    from collections import Counter

    counts = Counter(s.get("hardware", "?") for s in samples)
    return counts.most_common(1)[0][0] if counts else "?"


def aggregate(samples: list[dict], variants: Sequence[str], ratios: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% bootstrap interval of every metric per variant x ratio (samples that have the run);
    prefill_ms only over the samples measured on timing_hardware()."""
    table: dict[str, Any] = {}
    full_scores = [s["full"]["score"] for s in samples if s["full"].get("score") is not None]
    m, lo, hi = mean_ci(full_scores)
    hw = timing_hardware(samples)
    table["full"] = {"score": {"mean": m, "ci95": [lo, hi]} if full_scores else None, "n": len(samples),
                     "timing_hardware": hw}
    for v in variants:
        for r in ratios:
            have = [s for s in samples if run_key(v, r) in s["runs"]]
            rows = [s["runs"][run_key(v, r)] for s in have]
            if not rows:
                continue
            cell: dict[str, Any] = {"n": len(rows)}
            for metric in METRICS:
                use = [x for x, smp in zip(rows, have) if metric != "prefill_ms" or smp.get("hardware", hw) == hw]
                vals = [float(x[metric]) for x in use if x.get(metric) is not None]
                if vals:
                    m, lo, hi = mean_ci(vals)
                    cell[metric] = {"mean": m, "ci95": [lo, hi]}
            table[run_key(v, r)] = cell
    return table


def _clean_json(obj: Any) -> Any:
    """NaN/inf -> None, so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    return obj


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sample_prompts(data, tokenizer, s: FrontierSettings, context_limit: int):
    """(sample, prompt) for the selected samples: the first `chunks` passages, samsum capped like the pipeline."""
    from kvblend.pipeline import keep_within

    cap = data.max_context_tokens  # the pipeline's cap (samsum: CacheBlend's 3400 chunk tokens)
    end = s.offset + s.limit if s.limit else None
    out = []
    for sample in data.samples[s.offset:end]:
        texts = [data.template.format_passage(p) for p in sample.passages[: s.chunks]]
        query = data.template.format_query(sample.question)
        prompt = build_prompt(tokenizer, data.template.prefix, texts, query)
        keep = keep_within([len(c) for c in prompt.chunk_ids], cap)
        if len(keep) < len(texts):
            prompt = build_prompt(tokenizer, data.template.prefix, [texts[i] for i in keep], query)
        if prompt.num_tokens + (s.max_new_tokens or data.max_new_tokens) + 1 > context_limit:
            raise ValueError(f"sample {sample.sample_id}: {prompt.num_tokens} prompt tokens + answer exceed the "
                             f"model context of {context_limit}; use fewer --chunks")
        out.append((sample, prompt))
    return out


def sample_done(rec: dict | None, s: FrontierSettings) -> bool:
    """Whether a sample record already holds every run (and the promotion record) this pass asks for."""
    if not rec:
        return False
    if not all(run_key(v, r) in rec.get("runs", {}) for v in s.variants for r in s.ratios):
        return False
    if s.promotion is not None:
        from kvblend.quality.promotion import promotion_key

        return promotion_key(*s.promotion) in (rec.get("promotion") or {})
    return True


def _same_setup(doc: dict | None, setup: dict, path: Path) -> dict | None:
    if doc and doc.get("setup") != setup:
        log.warning("%s: written with other settings; not resumed from", path)
        return None
    return with_provenance(doc) if doc else None


def run_frontier(s: FrontierSettings) -> tuple[Path, dict]:
    """Run (or resume) the frontier; returns the results file and its contents.

    A worker of --jobs (s.shard k > 1) resumes from the merged results file as well as its own shard file, so
    a rerun with only the merged file at hand (a fresh machine, shard files removed) goes on with the samples
    the merged file lacks instead of recomputing the ones it has."""
    from tqdm import tqdm

    from kvblend.data.datasets import load_dataset
    from kvblend.kvstore.builder import dtype_name
    from kvblend.model.registry import load_model

    unknown = [v for v in s.variants if v not in VARIANTS]
    if s.promotion is not None and s.promotion[0] not in VARIANTS:
        unknown.append(s.promotion[0])
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    bad = [r for r in s.ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise ValueError(f"ratios must be in [0, 1], got {bad}")
    if s.offset < 0 or s.limit < 0 or s.chunks < 1:
        raise ValueError("offset and limit must be >= 0 and chunks >= 1")
    data = load_dataset(s.dataset)
    model = load_model(s.model, s.dtype, s.device)
    needs_draft = [v for v in s.variants if VARIANTS[v].score_on in DRAFT_SIGNALS]
    if needs_draft and not s.draft_model:
        raise ValueError(f"variant(s) {', '.join(needs_draft)} need a draft model: pass --draft-model")
    draft = None
    if needs_draft:  # the target as its own draft: the signal's ceiling (the draft reads the prompt in full)
        draft = model if s.draft_model == s.model else load_model(s.draft_model, s.dtype, s.device)
    if model.tokenizer is None:
        raise ValueError(f"{s.model} has no tokenizer; the frontier needs one to build prompts")
    dtype_label = dtype_name(model.dtype)
    path = output_path(s, data.name, dtype_label)
    merged_path = output_path(s, data.name, dtype_label, shard=False)
    pairs = sample_prompts(data, model.tokenizer, s, model.shape.max_position_embeddings)
    params = SamplingParams(max_new_tokens=s.max_new_tokens or data.max_new_tokens, temperature=0.0,
                            stop_on_newline=True)
    setup = {"dataset": data.name, "model": s.model, "fingerprint": model.fingerprint, "dtype": dtype_label,
             "chunks": s.chunks, "max_new_tokens": params.max_new_tokens, "offset": s.offset,
             "check_layer": s.check_layer, "metric": data.metric}
    i, k = s.shard
    mine = pairs[i::k]
    old = _same_setup(read_results(path), setup, path)
    merged = _same_setup(read_results(merged_path), setup, merged_path) if merged_path != path else None
    bases = [d for d in (merged, old) if d]  # oldest first: a worker's own shard file is newer than the merge
    variants = list(dict.fromkeys([*(v for d in bases for v in d["variants"]), *s.variants]))
    ratios = sorted(set([*(r for d in bases for r in d["ratios"]), *s.ratios]))
    by_id: dict[str, dict] = {}
    ids = {smp.sample_id for smp, _ in mine}
    for d in bases:
        for r in d["samples"]:
            if d is old or r["sample_id"] in ids:  # from the merged file: only this worker's samples
                by_id[r["sample_id"]] = merge_record(by_id.get(r["sample_id"]), r)
    order = {smp.sample_id: j for j, smp in enumerate(data.samples)}
    newline = NewlineDetector(model.tokenizer)
    doc: dict[str, Any] = {}
    complete = True
    hw_here = hardware(model.device)
    command = os.environ.get("KVBLEND_FRONTIER_COMMAND", "")
    here = f"{command} [{hw_here}]"
    started = float(os.environ.get("KVBLEND_FRONTIER_STARTED") or time.time())
    this_pass = new_pass(command, git_sha(""), hw_here, started)
    passes = merge_passes(*(d["passes"] for d in bases), [this_pass])
    commands = list(dict.fromkeys([*(c for d in bases for c in (d.get("commands") or
                                                             [f"{d.get('command', '')} [{d.get('hardware', '?')}]"])),
                                   here]))

    def write(done: bool) -> None:
        samples = sorted(by_id.values(), key=lambda r: order.get(r["sample_id"], len(order)))
        doc.clear()
        hw = sorted({r.get("hardware", "?") for r in samples})
        doc.update({
            "schema": SCHEMA, "setup": setup, "complete": done, "hardware_per_sample": hw,
            "variants": {v: asdict(VARIANTS[v]) for v in variants}, "ratios": ratios,
            "device": str(model.device), "hardware": hw_here,
            "git_sha": this_pass["git_sha"], "git_shas": sha_counts(samples, passes), "torch": torch.__version__,
            "command": command, "commands": commands, "passes": passes,
            "aggregate": aggregate(samples, variants, ratios), "samples": samples,
        })
        if any(smp.get("promotion") for smp in samples):
            from kvblend.quality.promotion import aggregate_promotion

            doc["promotion_aggregate"] = aggregate_promotion(samples)
        atomic_write_json(path, _clean_json(doc))

    bar = tqdm(mine, desc=f"frontier {data.name}", unit="sample", disable=not s.progress)
    for sample, prompt in bar:
        rec = by_id.get(sample.sample_id)
        if sample_done(rec, s):
            continue
        if s.deadline and time.time() > s.deadline:
            log.warning("deadline reached: %s stops before %s (rerun to resume)", path.name, sample.sample_id)
            complete = False
            break
        out = evaluate_prompt(model, prompt, s.variants, s.ratios, params,
                              first_line_only=data.template.first_line_only, metric=data.metric,
                              answers=sample.answers, done=rec["runs"] if rec else None,
                              check_layer=s.check_layer, newline=newline, promotion=s.promotion,
                              done_promotion=rec.get("promotion") if rec else None, pass_id=this_pass["id"],
                              draft=draft)
        if rec and rec.get("hardware", hw_here) != hw_here:
            out["hardware_new_runs"] = hw_here
        created = {k: rec[k] for k in PROVENANCE if k in rec} if rec else \
            {"pass": this_pass["id"], "git_sha": this_pass["git_sha"], "command": command, "hardware": hw_here}
        by_id[sample.sample_id] = {"sample_id": sample.sample_id, **created, **out}
        write(False)
    write(complete)
    if k == 1:
        plot_quietly(doc, path)
    return path, doc


def read_results(path: Path) -> dict | None:
    """A frontier results file, or None if there is none (ValueError if it is unreadable)."""
    import json

    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable results file ({exc}); move it away to start over") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a frontier results file of schema {SCHEMA}; move it away to start over")
    return doc


def plot_quietly(doc: dict, path: Path) -> None:
    try:
        from kvblend.quality.plots import plot_frontier

        plot_frontier(doc, path.with_suffix(""))
    except ImportError as exc:  # matplotlib missing (e.g. a bare GPU box): plots come from `frontier --report`
        log.warning("no plots (%s)", exc)


def merge_shards(paths: Sequence[Path], out: Path) -> dict:
    """One results file from shard files of the same setup and the results file already at `out` (samples
    ordered by sample index). Records of one sample are merged run by run (merge_record: shards are newer);
    passes and command histories are the union of every file's."""
    docs = [with_provenance(d) for d in (read_results(p) for p in paths) if d is not None]
    if not docs:
        raise ValueError(f"no shard results to merge into {out}")
    setup = docs[0]["setup"]
    if any(d["setup"] != setup for d in docs):
        raise ValueError(f"shards of {out.name} were run with different settings")
    old = read_results(out)
    old = with_provenance(old) if old and old["setup"] == setup else None
    sources = ([old] if old else []) + docs
    samples: dict[str, dict] = {}
    for d in sources:
        for r in d["samples"]:
            samples[r["sample_id"]] = merge_record(samples.get(r["sample_id"]), r)
    variants = list(dict.fromkeys(v for d in sources for v in d["variants"]))
    ratios = sorted({r for d in sources for r in d["ratios"]})
    passes = merge_passes(*(d.get("passes") for d in sources))

    def index(sid: str) -> tuple[int, str]:
        tail = sid.rsplit("/", 1)[-1]
        return (int(tail), sid) if tail.isdigit() else (1 << 30, sid)

    ordered = sorted(samples.values(), key=lambda r: index(r["sample_id"]))
    doc = dict(docs[0])
    doc.update({"complete": all(d["complete"] for d in docs),
                "variants": {v: asdict(VARIANTS[v]) for v in variants}, "ratios": ratios,
                "hardware_per_sample": sorted({r.get("hardware", "?") for r in ordered}),
                "commands": list(dict.fromkeys(c for d in sources for c in (d.get("commands") or []))),
                "passes": passes, "git_shas": sha_counts(ordered, passes),
                "aggregate": aggregate(ordered, variants, ratios), "samples": ordered})
    doc.pop("promotion_aggregate", None)
    if any(smp.get("promotion") for smp in ordered):
        from kvblend.quality.promotion import aggregate_promotion

        doc["promotion_aggregate"] = aggregate_promotion(ordered)
    atomic_write_json(out, _clean_json(doc))
    plot_quietly(doc, out)
    return doc
