"""`kvblend analyze`: results/ -> results/analysis/*.png + report.md.

Sections: answer-recall@k per retrieval mode; TTFT and TPOT per mode; quality and fidelity per mode; the
budget sweep; per-sample promotion timelines. A section whose inputs are missing says so (and how to make
them) instead of failing; only a results folder with nothing recognisable at all is an error.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from kvblend.analysis import tables
from kvblend.analysis.inputs import read_results
from kvblend.errors import KvblendError
from kvblend.io import atomic_write_text

log = logging.getLogger(__name__)

REPORT = "report.md"
# the figures analyze writes; earlier ones of these names that this run did not redraw are removed
FIGURE_PATTERNS = ("retrieval_recall.png", "latency_*.png", "quality_*.png", "budget_sweep_*.png", "timeline_*.png")
SECTIONS = ("Inputs", "Retrieval: answer-recall@k per retrieval mode", "TTFT and TPOT per mode",
            "Quality and fidelity per mode", "Budget sweep", "Promotion timelines", "Notes")


class AnalysisError(KvblendError):
    pass


@dataclass
class Analysis:
    out_dir: Path
    report: Path
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # sections without inputs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "x"


def _f(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def analyze(results_dir: Path, out_dir: Path, max_timelines: int = 12, progress: bool = True) -> Analysis:
    """Read every result file under results_dir; write the figures and report.md into out_dir."""
    if not results_dir.is_dir():
        raise AnalysisError(f"{results_dir}: no such results folder; run the workflow first "
                            f"(scripts/retrieval/run_retrieval.sh, build_kv_cache.sh, decoding/run_speculative_decode.sh)")
    inputs = read_results(results_dir, exclude=out_dir)
    if not inputs.files:
        raise AnalysisError(f"{results_dir}: no kvblend result files to analyse (expected retrieval/, decoding/, "
                            f"kv_caches/ or eval/ JSON); run the workflow first")
    notes = list(inputs.notes)
    result = Analysis(out_dir=out_dir, report=out_dir / REPORT)

    recall = tables.recall_rows(inputs, notes)
    runs = tables.decoding_runs(inputs, notes)
    sweeps = tables.sweeps(inputs, runs, notes)
    lines_all = tables.timelines(inputs, notes)

    from kvblend.analysis import plots  # matplotlib, only once there is something to draw

    jobs = []  # (description, callable) so that one progress bar covers every figure
    if recall:
        jobs.append(("recall", lambda: plots.plot_recall(recall, out_dir / "retrieval_recall.png")))
    timed = {d: [r for r in rs if r.ttft_ms or r.tpot_ms or r.mean_ttft_ms is not None] for d, rs in runs.items()}
    for dataset, rs in runs.items():
        if timed[dataset]:
            jobs.append((f"{dataset} latency", lambda d=dataset, r=timed[dataset]: plots.plot_latency(
                d, r, out_dir / f"latency_{_slug(d)}.png")))
        else:
            notes.append(f"{dataset}: no decoding file records TTFT or TPOT; no latency figure")
        jobs.append((f"{dataset} quality", lambda d=dataset, r=rs: plots.plot_quality(
            d, r, out_dir / f"quality_{_slug(d)}.png")))
    for i, sw in enumerate(sweeps):
        jobs.append((f"sweep {sw.dataset}", lambda s=sw, i=i: plots.plot_sweep(
            s, out_dir / f"budget_sweep_{_slug(s.dataset)}{'' if i == 0 else f'_{i}'}.png")))
    shown: list[tables.Timeline] = []
    per_trace: dict[str, int] = {}
    for t in lines_all:
        per_trace[t.trace_file] = per_trace.get(t.trace_file, 0) + 1
        if per_trace[t.trace_file] <= max_timelines:
            shown.append(t)
    for trace_file, count in per_trace.items():
        if count > max_timelines:
            notes.append(f"{trace_file}: {count} samples; timelines drawn for the first {max_timelines} "
                         f"(--max-timelines)")
    multi_trace = len(per_trace) > 1
    timeline_png = {}
    for t in shown:
        stem = _slug(Path(t.trace_file).stem) + "_" if multi_trace else ""
        png = out_dir / f"timeline_{stem}{_slug(t.sample_id)}.png"
        timeline_png[id(t)] = png
        jobs.append((f"timeline {t.sample_id}", lambda t=t, p=png: plots.plot_timeline(t, p)))

    out_dir.mkdir(parents=True, exist_ok=True)
    stale = {p for pattern in FIGURE_PATTERNS for p in out_dir.glob(pattern)}
    for _, job in tqdm(jobs, desc="analysis figures", unit="figure", disable=not progress or len(jobs) < 4):
        result.figures.append(job())
    for path in sorted(stale - set(result.figures)):  # figures of an earlier analysis with other inputs
        path.unlink(missing_ok=True)
        log.info("removed stale figure %s", path)

    def img(path: Path) -> str:
        return f"![{path.stem}]({path.name})"

    md = [f"# kvblend analysis of `{results_dir}`", "",
          f"Written {datetime.now(timezone.utc).isoformat(timespec='seconds')} by `kvblend analyze`; "
          f"{len(inputs.files)} result files read, {len(result.figures)} figures.", ""]

    md += ["## Inputs", ""]
    rows = []
    for kind in ("retrieval", "build", "decode", "spec", "trace", "sweep", "eval"):
        for f in inputs.of(kind):
            made = f.doc.get("made_from") if isinstance(f.doc.get("made_from"), dict) else {}
            mode = made.get("retrieval_mode", f.doc.get("mode") if kind == "retrieval" else None)
            rows.append([f"`{inputs.rel(f.path)}`", kind, f.dataset, str(made.get("limit", "-")),
                         str(made.get("top_k", f.doc.get("k", f.doc.get("top_k", "-")))), str(mode or "-"),
                         str(made.get("model", f.doc.get("model", "-"))), str(f.doc.get("dtype", made.get("dtype", "-")))])
    md += _table(["file", "kind", "dataset", "limit", "top-k", "retrieval", "model", "dtype"], rows)
    md += ["", "limit / top-k / retrieval: what the file records it was made from (`made_from`), '-' where it "
           "does not record it.", ""]
    for f in inputs.of("build"):
        d = f.doc
        md.append(f"- build `{inputs.rel(f.path)}`: {d.get('num_samples', '?')} samples, "
                  f"{d.get('chunks_built', '?')} chunks built, {d.get('chunks_reused', '?')} already stored, "
                  f"{d.get('gpu_chunks', d.get('top_k_gpu', '?'))} of {d.get('top_k', '?')} chunks on the GPU tier "
                  f"per sample, {d.get('dtype', '?')} on {d.get('device', '?')}, {d.get('elapsed_sec', '?')} s")
    md.append("")

    md += ["## Retrieval: answer-recall@k per retrieval mode", ""]
    if recall:
        kmax = max(r["k"] for r in recall)
        md += _table(["dataset", "mode", "scope", "samples", "recall@k (file)"] + [f"@{j}" for j in range(1, kmax + 1)],
                     [[r["dataset"], r["mode"], r["scope"], str(r["num_samples"]), f"{_f(r['recall_at_k'])} (k={r['k']})"]
                      + [_f(r["curve"].get(j)) for j in range(1, kmax + 1)] for r in recall])
        md += ["", "answer-recall@k: fraction of questions with a gold answer string in the top-k passages; the "
               "@1..@k columns are recomputed from the ranked passages and the dataset's gold answers.", "",
               img(out_dir / "retrieval_recall.png"), ""]
    else:
        result.missing.append("retrieval")
        md += ["Not available: no retrieval files (run `scripts/retrieval/run_retrieval.sh` or `kvblend retrieve`; "
               "`RETRIEVAL_MODE=bm25|dense|both|colbert` for each mode to compare).", ""]

    md += ["## TTFT and TPOT per mode", ""]
    if runs:
        for dataset, rs in runs.items():
            md += [f"### {dataset}", ""]
            full_ttft = next((r.mean_ttft_ms for r in rs if r.kind == "decode" and r.doc.get("mode") == "full"), None)
            rows = []
            for r in rs:
                speed = f"{full_ttft / r.mean_ttft_ms:.2f}x" if full_ttft and r.mean_ttft_ms else "-"
                rows.append([r.label, str(len(r.samples)), _f(r.mean_ttft_ms, ",.0f"), speed,
                             _f(r.mean_fetch_ms, ",.1f"), str(r.doc.get("start_tier", "-")), _f(r.mean_tpot_ms, ".1f"),
                             r.model, r.dtype, str(r.doc.get("device", "?")), f"`{r.file}`"])
            md += _table(["run", "n", "mean TTFT ms", "TTFT full / run", "of which fetch ms", "start tier",
                          "mean TPOT ms", "model", "dtype", "device", "file"], rows)
            md += ["", img(out_dir / f"latency_{_slug(dataset)}.png") if timed[dataset] else "(no timings)", ""]
    else:
        result.missing.append("decoding")
        md += ["Not available: no decoding files (run `scripts/decoding/run_speculative_decode.sh`, and "
               "`SPECULATIVE=0 MODE=full|reuse|blend` for the plain modes).", ""]

    md += ["## Quality and fidelity per mode", ""]
    if runs:
        for dataset, rs in runs.items():
            md += [f"### {dataset}", ""]
            md += _table(["run", "n", "score", "metric", "fidelity exact", "fidelity Rouge-L"],
                         [[r.label, str(len(r.samples)), _f(r.score), r.metric, _f(r.fidelity_exact),
                           _f(r.fidelity_rougeL)] for r in rs])
            md += ["", "Fidelity: the run's answer against the full-prefill answer to the same question (exact "
                   "match; Rouge-L F).", "", img(out_dir / f"quality_{_slug(dataset)}.png"), ""]
    evals = inputs.of("eval")
    for f in evals:
        md += [f"`kvblend eval` table `{inputs.rel(f.path)}` ({f.dataset}):", ""]
        md += _table(["mode", "ratio", "n", "score", "EM", "fidelity exact", "fidelity Rouge-L", "TTFT ms", "TPOT ms"],
                     [[str(r.get("mode")), _f(tables.number(r.get("ratio")), ".2f"), _f(tables.number(r.get("num_samples")), ".0f"),
                       f"{_f(tables.number(r.get('score')))} ({r.get('metric', '?')})", _f(tables.number(r.get("em"))),
                       _f(tables.number(r.get("fidelity_exact"))), _f(tables.number(r.get("fidelity_rougeL"))),
                       _f(tables.number(r.get("mean_ttft_ms")), ",.0f"), _f(tables.number(r.get("mean_tpot_ms")), ".1f")]
                      for r in f.doc["modes"] if isinstance(r, dict)])
        md.append("")
    if not runs and not evals:
        result.missing.append("quality")
        md += ["Not available: no decoding files and no `kvblend eval` table.", ""]

    md += ["## Budget sweep", ""]
    if sweeps:
        for i, sw in enumerate(sweeps):
            md += [f"### {sw.title}", "", f"Source: `{sw.source}`.", ""]
            md += _table(["GPU chunks", "promotions by", "score", "fidelity exact", "fidelity Rouge-L", "TTFT ms",
                          "TPOT ms", "promotions/sample", "acceptance"],
                         [[_f(r.get("gpu_chunks"), ".0f"), str(r.get("proxy")), _f(tables.number(r.get("score"))),
                           _f(tables.number(r.get("fidelity_exact"))), _f(tables.number(r.get("fidelity_rougeL"))),
                           _f(tables.number(r.get("mean_ttft_ms")), ",.0f"), _f(tables.number(r.get("mean_tpot_ms")), ".1f"),
                           _f(tables.number(r.get("promotions_per_sample")), ".2f"),
                           _f(tables.number(r.get("acceptance_rate")), ".2f")] for r in sw.runs])
            name = f"budget_sweep_{_slug(sw.dataset)}{'' if i == 0 else f'_{i}'}.png"
            md += ["", "Fidelity here: against the run with every chunk resident and no promotions.", "",
                   img(out_dir / name), ""]
    else:
        result.missing.append("budget sweep")
        md += ["Not available: no budget-sweep file and no speculative runs at two or more GPU budgets (run "
               "`SWEEP=1 bash scripts/run_token_budget_test.sh`).", ""]

    md += ["## Promotion timelines", ""]
    if lines_all:
        md += ["Per sample and decode step: which chunks the target attends to on the GPU tier, which are CPU "
               "placeholders (rows masked), when a promotion was requested (copy started) and when it was fused "
               "into the KV (attended from that pass on), the proxy's scores against the threshold, and drafted "
               "vs accepted tokens.", ""]
        rows = []
        for t in lines_all:
            res, spec = t.result, t.spec_sample
            extra = []
            for key in ("chunk_tiers", "fetch_ms"):
                value = spec.get(key, res.get(key))
                if value is not None:
                    extra.append(f"{key}={value}")
            initial_cpu = t.steps[0]["cpu_chunks"] if t.has_tiers and t.steps else "?"
            rows.append([f"`{t.trace_file}`", t.sample_id, str(len([s for s in t.steps if s["step"] >= 0])),
                         str(initial_cpu), ", ".join(f"{c}@{_step_label(s)}" for s, c in t.requests) or "-",
                         ", ".join(f"{c}@{_step_label(s)}" for s, c in t.promotions) or "-",
                         _f(tables.number(res.get("acceptance_rate")), ".2f"),
                         repr(str(res.get("answer", spec.get("answer", ""))))[:60] + (" " + "; ".join(extra) if extra else "")])
        md += _table(["trace", "sample", "passes", "CPU chunks at start", "requested (chunk@step)",
                      "fused (chunk@step)", "acceptance", "answer"], rows)
        md.append("")
        for t in shown:
            md += [f"### {t.sample_id} (`{t.trace_file}`)", "", img(timeline_png[id(t)]), ""]
    else:
        result.missing.append("promotion timelines")
        md += ["Not available: no speculative trace (run `scripts/decoding/run_speculative_decode.sh`, which writes "
               "`decoding/speculative_trace.json`).", ""]

    md += ["## Notes", ""]
    for section in result.missing:
        notes.append(f"section '{section}': no inputs (see above)")
    md += [f"- {n}" for n in notes] if notes else ["- none: every input was read."]
    md.append("")
    result.notes = notes
    atomic_write_text(result.report, "\n".join(md))
    log.info("wrote %s and %d figures", result.report, len(result.figures))
    return result


def _step_label(step: int) -> str:
    return {-2: "start", -1: "warm"}.get(step, str(step))
