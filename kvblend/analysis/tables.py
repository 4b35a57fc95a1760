"""The numbers behind each figure, computed from the result documents (kvblend.analysis.inputs).

Each function returns plain rows (dicts) and appends to `notes` what it had to skip, so the report can say it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from kvblend.analysis.inputs import Inputs, ResultFile, mean, number

log = logging.getLogger(__name__)


# retrieval ------------------------------------------------------------------------------------------
def _gold_by_sample(dataset: str, cache: dict) -> dict | None:
    """sample_id -> gold answers of a dataset loadable by name or path (None when it cannot be loaded)."""
    if dataset not in cache:
        from kvblend.data.datasets import load_dataset

        try:
            data = load_dataset(dataset)
            cache[dataset] = {s.sample_id: s.answers for s in data.samples}
        except Exception as exc:  # noqa: BLE001 (any loader failure only drops the recall curve)
            log.info("dataset %s not loadable for the recall curve: %s", dataset, exc)
            cache[dataset] = None
    return cache[dataset]


def recall_rows(inputs: Inputs, notes: list[str]) -> list[dict]:
    """Per retrieval file: dataset, mode, scope, k, samples, the file's answer-recall@k, and recall@1..k
    recomputed from the ranked passages and the dataset's gold answers (when the dataset can be loaded)."""
    from kvblend.retrieval.retriever import answer_recall_at_k
    from kvblend.types import Retrieved, Sample

    rows, golds = [], {}
    for f in inputs.of("retrieval"):
        d = f.doc
        k = int(number(d.get("k")) or 0)
        samples = [s for s in d.get("samples", []) if isinstance(s, dict) and "sample_id" in s]
        row = {"file": inputs.rel(f.path), "dataset": f.dataset, "mode": str(d.get("mode", "?")),
               "scope": str(d.get("scope", "per_sample")), "k": k, "num_samples": len(samples),
               "recall_at_k": number(d.get("answer_recall_at_k")), "curve": {}}
        gold = _gold_by_sample(f.dataset, golds) if samples and k else None
        if gold is None and samples:
            notes.append(f"{row['file']}: recall@1..{k} curve not computed (dataset {f.dataset!r} not loadable "
                         f"here for its gold answers); only the file's recall@{k} is shown")
        elif gold is not None:
            retrieved, with_gold = [], []
            for s in samples:
                if s["sample_id"] not in gold:
                    continue
                texts = tuple(str(t) for t in s.get("texts", []))
                titles = tuple(str(t) for t in s.get("titles", [])) if len(s.get("titles", [])) == len(texts) else ()
                retrieved.append(Retrieved(s["sample_id"], tuple(map(str, s.get("passage_ids", texts))),
                                           tuple(float(x) for x in s.get("scores", [0.0] * len(texts))), texts, titles))
                with_gold.append(Sample(sample_id=s["sample_id"], question="", passages=(),
                                        answers=gold[s["sample_id"]]))
            missing = len(samples) - len(retrieved)
            if missing:
                notes.append(f"{row['file']}: {missing} samples not in dataset {f.dataset!r}; left out of the curve")
            if with_gold:
                for j in range(1, k + 1):
                    value = answer_recall_at_k(with_gold, retrieved, j)
                    if value is not None:
                        row["curve"][j] = value
        rows.append(row)
    return sorted(rows, key=lambda r: (r["dataset"], r["scope"], r["k"], r["mode"]))


# decoding runs ----------------------------------------------------------------------------------------
@dataclass
class Run:
    """One decoding file (plain mode or speculative), reduced to what the figures need."""

    file: str
    dataset: str
    label: str
    kind: str  # decode | spec
    doc: dict
    samples: list[dict]
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    fetch_ms: list[float] = field(default_factory=list)  # inside TTFT: chunks brought to the GPU tier (newer files)
    score: float | None = None
    metric: str = "?"
    fidelity_exact: float | None = None
    fidelity_rougeL: float | None = None
    dtype: str = "?"
    model: str = "?"

    @property
    def mean_ttft_ms(self) -> float | None:
        return mean(self.ttft_ms) if self.ttft_ms else number(self.doc.get("mean_ttft_ms"))

    @property
    def mean_fetch_ms(self) -> float | None:
        return mean(self.fetch_ms) if self.fetch_ms else number(self.doc.get("mean_fetch_ms"))

    @property
    def mean_tpot_ms(self) -> float | None:
        return mean(self.tpot_ms) if self.tpot_ms else number(self.doc.get("mean_tpot_ms"))


def run_label(f: ResultFile) -> str:
    d = f.doc
    if f.kind == "spec":
        g, k = d.get("gpu_chunks", "?"), d.get("top_k", "?")
        return f"spec {d.get('drafter', '?')}/{d.get('proxy', '?')} {g}/{k} on GPU"
    mode = str(d.get("mode", "?"))
    ratio = number(d.get("ratio"))
    return f"{mode}@{ratio:g}" if mode == "blend" and ratio is not None else mode


def _spec_sort_key(r: Run):
    d = r.doc
    return (1, str(d.get("drafter")), str(d.get("proxy")), number(d.get("gpu_chunks")) or 0)


def decoding_runs(inputs: Inputs, notes: list[str]) -> dict[str, list[Run]]:
    """dataset -> its runs (plain modes first: full, reuse, blend; then speculative), each with quality and
    fidelity to the same dataset's full-prefill answers (same sample ids) when a full run exists."""
    from kvblend.eval.metrics import fidelity

    by_dataset: dict[str, list[Run]] = defaultdict(list)
    for f in inputs.of("decode") + inputs.of("spec"):
        samples = [s for s in f.doc.get("samples", []) if isinstance(s, dict)]
        if not samples:
            notes.append(f"skipped {inputs.rel(f.path)}: no samples")
            continue
        run = Run(file=inputs.rel(f.path), dataset=f.dataset, label=run_label(f), kind=f.kind, doc=f.doc,
                  samples=samples, metric=str(f.doc.get("metric", "?")), dtype=str(f.doc.get("dtype", "?")),
                  model=str(f.doc.get("model", "?")))
        run.ttft_ms = [v for v in (number(s.get("ttft_ms")) for s in samples) if v is not None]
        run.tpot_ms = [v for v in (number(s.get("tpot_ms")) for s in samples) if v is not None]
        run.fetch_ms = [v for v in (number(s.get("fetch_ms")) for s in samples) if v is not None]
        run.score = mean(s.get("score") for s in samples)
        if run.score is None:
            run.score = number(f.doc.get("mean_score"))
        by_dataset[f.dataset].append(run)
    out = {}
    order = {"full": 0, "reuse": 1, "blend": 2}
    for dataset, runs in by_dataset.items():
        runs.sort(key=lambda r: (0, order.get(str(r.doc.get("mode")), 3), r.label) if r.kind == "decode"
                  else _spec_sort_key(r))
        fulls = [r for r in runs if r.kind == "decode" and r.doc.get("mode") == "full"]
        if len(fulls) > 1:
            notes.append(f"{dataset}: {len(fulls)} full-prefill runs; fidelity is measured against {fulls[0].file}")
        if not fulls:
            notes.append(f"{dataset}: no full-prefill decoding file; fidelity to full prefill not available "
                         f"(run `kvblend decode --mode full`)")
        else:
            ref = fulls[0]
            ref_answers = {s.get("sample_id"): s.get("answer") for s in ref.samples}
            for r in runs:
                if r.model != ref.model:
                    notes.append(f"{r.file}: model {r.model} differs from the full run's {ref.model}; "
                                 f"no fidelity")
                    continue
                pairs = [(str(s.get("answer", "")), str(ref_answers[s.get("sample_id")]))
                         for s in r.samples if s.get("sample_id") in ref_answers and "answer" in s]
                if pairs:
                    fid = [fidelity(a, b) for a, b in pairs]
                    r.fidelity_exact = sum(bool(x["exact"]) for x in fid) / len(fid)
                    r.fidelity_rougeL = sum(float(x["rougeL"]) for x in fid) / len(fid)
        dtypes = sorted({r.dtype for r in runs})
        if len(dtypes) > 1:
            notes.append(f"{dataset}: runs decoded in different dtypes ({', '.join(dtypes)}): quality and "
                         f"fidelity compare dtype as well as mode")
        elif dtypes and dtypes[0] not in ("float32", "?"):
            notes.append(f"{dataset}: runs decoded in {dtypes[0]}, not float32 (quality comparisons are meant "
                         f"to be fp32: pass --dtype float32)")
        out[dataset] = runs
    return out


# budget sweep ---------------------------------------------------------------------------------------
@dataclass
class Sweep:
    source: str  # the sweep file, or "speculative runs" when derived
    dataset: str
    title: str
    runs: list[dict]  # {gpu_chunks, proxy, score, fidelity_rougeL, fidelity_exact, mean_ttft_ms, mean_tpot_ms, ...}


def sweeps(inputs: Inputs, runs_by_dataset: dict[str, list[Run]], notes: list[str]) -> list[Sweep]:
    """Budget sweeps: each sweep file, or, for a dataset without one, the speculative runs of one drafter at
    two or more GPU budgets (fidelity then to the run with every chunk resident and no promotions)."""
    from kvblend.eval.metrics import fidelity

    out = []
    for f in inputs.of("sweep"):
        runs = [r for r in f.doc["runs"] if number(r.get("gpu_chunks")) is not None]
        if not runs:
            notes.append(f"skipped {inputs.rel(f.path)}: no runs with a GPU budget")
            continue
        title = f"{f.dataset}, {f.doc.get('model', '?')}, {f.doc.get('drafter', '?')} drafts, top-{f.doc.get('top_k', '?')}"
        out.append(Sweep(inputs.rel(f.path), f.dataset, title, runs))
    swept = {s.dataset for s in out}
    for dataset, runs in runs_by_dataset.items():
        if dataset in swept:
            continue
        groups: dict[tuple, list[Run]] = defaultdict(list)
        for r in runs:
            if r.kind == "spec":
                groups[(r.doc.get("drafter"), r.model, r.doc.get("top_k"))].append(r)
        for (drafter, model, k), group in groups.items():
            budgets = {number(r.doc.get("gpu_chunks")) for r in group}
            if len(budgets) < 2:
                continue
            top = max(b for b in budgets if b is not None)
            ref = next((r for r in group if number(r.doc.get("gpu_chunks")) == top
                        and r.doc.get("proxy") == "none"), None)
            ref_answers = {s.get("sample_id"): s.get("answer") for s in ref.samples} if ref else {}
            rows = []
            for r in group:
                fid = [fidelity(str(s.get("answer", "")), str(ref_answers[s.get("sample_id")]))
                       for s in r.samples if s.get("sample_id") in ref_answers]
                rows.append({"gpu_chunks": number(r.doc.get("gpu_chunks")), "proxy": str(r.doc.get("proxy")),
                             "score": r.score, "metric": r.metric,
                             "fidelity_exact": sum(bool(x["exact"]) for x in fid) / len(fid) if fid else None,
                             "fidelity_rougeL": sum(float(x["rougeL"]) for x in fid) / len(fid) if fid else None,
                             "mean_ttft_ms": r.mean_ttft_ms, "mean_tpot_ms": r.mean_tpot_ms,
                             "promotions_per_sample": mean(s.get("promotions") for s in r.samples),
                             "acceptance_rate": mean(s.get("acceptance_rate") for s in r.samples)})
            notes.append(f"{dataset}: no budget-sweep file; the sweep is assembled from {len(group)} speculative "
                         f"runs ({drafter} drafts) at GPU budgets {sorted(int(b) for b in budgets if b is not None)}")
            out.append(Sweep("speculative runs", dataset, f"{dataset}, {model}, {drafter} drafts, top-{k}",
                             sorted(rows, key=lambda x: (x["gpu_chunks"], x["proxy"]))))
    return out


# promotion timelines ----------------------------------------------------------------------------------
@dataclass
class Timeline:
    trace_file: str
    dataset: str
    sample_id: str
    config: dict
    num_chunks: int
    steps: list[dict]  # ordered: the warm-start round (step -1) first, then the passes
    has_tiers: bool
    result: dict  # the trace's per-sample result row, or {}
    spec_sample: dict  # the matching speculative run's sample row (chunk_tiers, fetch_ms, ...) or {}

    @property
    def promotions(self) -> list[tuple[int, int]]:
        return [(s["step"], c) for s in self.steps for c in s.get("promoted", [])]

    @property
    def requests(self) -> list[tuple[int, int]]:
        return [(s["step"], c) for s in self.steps for c in s.get("requested", [])]

    @property
    def ever_cpu(self) -> bool:
        return any(s.get("cpu_chunks") for s in self.steps)


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)] \
        if isinstance(values, list) else []


START_STEP = -2  # the placement before anything ran (the warm-start round is step -1)


def _start_step(first: dict, result: dict, spec: dict, num_chunks: int) -> dict:
    """The chunk placement before the first recorded step: the recorded initial GPU chunks when the files hold
    them, else undone from the first step (its GPU set minus what it fused or requested, plus what it demoted)."""
    initial = result.get("initial_gpu_chunks", spec.get("initial_gpu_chunks"))
    if isinstance(initial, list):
        gpu = set(_ints(initial))
    else:
        gpu = (set(first["gpu_chunks"]) - set(first["promoted"]) - set(first["requested"])) | set(first["demoted"])
    return {"step": START_STEP, "gpu_chunks": sorted(gpu), "cpu_chunks": [c for c in range(num_chunks) if c not in gpu],
            "promoted": [], "requested": [], "demoted": [], "accepted": 0, "drafted": [], "emitted": []}


def timelines(inputs: Inputs, notes: list[str]) -> list[Timeline]:
    spec_samples = {}
    for f in inputs.of("spec"):
        d = f.doc
        for s in d.get("samples", []):
            if isinstance(s, dict):
                key = (f.dataset, d.get("drafter"), d.get("proxy"), d.get("gpu_chunks"), s.get("sample_id"))
                spec_samples[key] = s
    out = []
    for f in inputs.of("trace"):
        config = f.doc.get("config") if isinstance(f.doc.get("config"), dict) else {}
        rows = [r for r in f.doc["trace"] if isinstance(r, dict) and r.get("sample_id") is not None
                and number(r.get("step")) is not None]
        if not rows:
            notes.append(f"skipped {inputs.rel(f.path)}: no trace rows with a sample id and step")
            continue
        results = {r.get("sample_id"): r for r in f.doc.get("results", []) if isinstance(r, dict)}
        by_sample: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            step = dict(r)
            step["step"] = int(number(r["step"]))
            for key in ("promoted", "requested", "demoted", "gpu_chunks", "cpu_chunks"):
                step[key] = _ints(r.get(key, []))
            by_sample[str(r["sample_id"])].append(step)
        for sample_id, steps in by_sample.items():
            steps.sort(key=lambda s: s["step"])
            has_tiers = any("gpu_chunks" in r or "cpu_chunks" in r for r in rows if str(r["sample_id"]) == sample_id)
            spec = spec_samples.get((f.dataset, config.get("drafter"), config.get("proxy"), config.get("gpu_chunks"),
                                     sample_id), {})
            chunk_ids = spec.get("chunk_ids") if isinstance(spec.get("chunk_ids"), list) else []
            seen = {c for s in steps for key in ("gpu_chunks", "cpu_chunks", "promoted", "requested", "demoted")
                    for c in s[key]}
            seen |= {int(c) for s in steps for c in (s.get("proxy_scores") or {}) if str(c).lstrip("-").isdigit()}
            result = results.get(sample_id, {})
            initial = result.get("initial_gpu_chunks", spec.get("initial_gpu_chunks"))
            if isinstance(initial, list):
                seen |= set(_ints(initial)) | set(_ints(result.get("initial_cpu_chunks", [])))
            num_chunks = max([len(chunk_ids)] + [c + 1 for c in seen] + [0])
            if not has_tiers and isinstance(initial, list):
                # no promoter (proxy none) records no chunk sets: the placement stays the initial one throughout
                gpu = sorted(set(_ints(initial)))
                for step in steps:
                    step["gpu_chunks"], step["cpu_chunks"] = gpu, [c for c in range(num_chunks) if c not in gpu]
                has_tiers = True
            if has_tiers:
                steps.insert(0, _start_step(steps[0], result, spec, num_chunks))
            out.append(Timeline(inputs.rel(f.path), f.dataset, sample_id, config, num_chunks, steps, has_tiers,
                                results.get(sample_id, {}), spec))
        mine = [t for t in out if t.trace_file == inputs.rel(f.path)]
        if any(not t.has_tiers for t in mine):
            notes.append(f"{inputs.rel(f.path)}: records no GPU/CPU chunk sets for "
                         f"{sum(not t.has_tiers for t in mine)} samples (nor their initial placement); their "
                         f"timelines show tokens only")
        elif not any(t.ever_cpu for t in mine):
            notes.append(f"{inputs.rel(f.path)}: every chunk was on the GPU at every step (no CPU placeholder), so "
                         f"no promotion could happen; run speculative decoding with --gpu-chunks below --top-k")
    return out
