"""Tables, the Q* target entries and docs/QUALITY.md, from frontier results files (torch-free).

`kvblend frontier --report` reads every results/quality/frontier_*.json, copies them with their plots to
docs/results/quality/, writes the Q* keys of docs/results/quality/summary.json (through
kvblend.bench.summary.update_summary) and regenerates docs/QUALITY.md.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

from kvblend.quality.stats import diff_of_means, paired_ci, ratio_of_means
from kvblend.quality.variants import BASELINE, VARIANTS

log = logging.getLogger(__name__)

TARGET_RATIO = 0.15
TARGET_DATASETS = ("musique_s", "samsum")
TARGET_MODEL = "smollm2-135m-instruct"
TARGETS = {  # key: (target, better)
    "Q2_kl_ratio_vs_plain": (0.4, "lower"),
    "Q2b_fidelity_ratio_vs_plain": (2.0, "higher"),
    "Q1_score_gap": (0.01, "lower"),
}
Q3_KEY = "Q3b_frontier_promotion_recovery_2of5"  # Q3_promotion_recovery itself: kvblend residency (3 of 10)
Q3_TARGET = (0.9, "higher")  # fidelity with 2 of 5 chunks resident + promotions / with all 5 resident
Q3_GPU_CHUNKS = 2


def _f(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _cell(cell: dict | None, metric: str, spec: str = ".3f", ci: bool = False) -> str:
    if not cell or not cell.get(metric) or cell[metric].get("mean") is None:
        return "-"
    m = cell[metric]
    if ci and m.get("ci95") and None not in m["ci95"]:
        return f"{m['mean']:{spec}} [{m['ci95'][0]:{spec}}, {m['ci95'][1]:{spec}}]"
    return format(m["mean"], spec)


def _count(doc: dict, key: str, metric: str) -> str:
    vals = [s["runs"][key][metric] for s in doc["samples"] if key in s["runs"]]
    return f"{sum(bool(v) for v in vals)}/{len(vals)}" if vals else "-"


def frontier_table(doc: dict, ratios: Sequence[float] | None = None, variants: Sequence[str] | None = None) -> str:
    """Markdown table: one row per variant x ratio."""
    agg = doc["aggregate"]
    ratios = list(doc["ratios"] if ratios is None else ratios)
    variants = list(doc["variants"] if variants is None else variants)
    full = agg.get("full", {})
    lines = [f"full prefill: {full.get('n', 0)} samples, score "
             f"{_cell(full, 'score', ci=True) if full.get('score') else '-'}",
             "",
             "| variant | ratio | n | recompute | KL first [95% CI] | KL along answer | same ids | = full (norm.) "
             "| fidelity Rouge-L | score | prefill ms* |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        for r in ratios:
            key = f"{v}@{r:g}"
            cell = agg.get(key)
            if not cell:
                continue
            lines.append(f"| {v} | {r:g} | {cell['n']} | {_cell(cell, 'recompute')} | {_cell(cell, 'kl_first', '.4f', ci=True)} "
                         f"| {_cell(cell, 'kl_mean', '.4f')} | {_count(doc, key, 'same')} | {_count(doc, key, 'exact')} "
                         f"| {_cell(cell, 'fid_rougeL')} | {_cell(cell, 'score')} | {_cell(cell, 'prefill_ms', '.1f')} |")
    lines += ["", f"*prefill ms: mean over the samples measured on {full.get('timing_hardware', '?')} (eager "
              f"layers, fp32 on the H200 or the CPU); ratio 0 / 1 rows are reuse / full prefill."]
    return "\n".join(lines)


def _paired(doc: dict, a_key: str, b_key: str | None, metric: str) -> tuple[list[float], list[float]]:
    """Per-sample values of metric for run a_key and run b_key (b None: the full prefill's score)."""
    xs, ys = [], []
    for s in doc["samples"]:
        a = s["runs"].get(a_key)
        b = s["full"] if b_key is None else s["runs"].get(b_key)
        if a is None or b is None or a.get(metric) is None or b.get(metric) is None:
            continue
        xs.append(float(a[metric]))
        ys.append(float(b[metric]))
    return xs, ys


def target_entries(docs: dict[str, tuple[dict, str]], best: str, ratio: float = TARGET_RATIO) -> dict[str, dict]:
    """Q1/Q2/Q2b from {dataset: (frontier doc, source path)}: the worse dataset's value and its interval."""
    from kvblend.bench.summary import entry

    out: dict[str, dict] = {}
    b_key, p_key = f"{best}@{ratio:g}", f"{BASELINE}@{ratio:g}"
    per: dict[str, dict[str, tuple]] = {k: {} for k in TARGETS}
    for name, (doc, source) in docs.items():
        x, y = _paired(doc, b_key, p_key, "kl_first")
        if x:
            per["Q2_kl_ratio_vs_plain"][name] = (*paired_ci(x, y, ratio_of_means), len(x), source)
        x, y = _paired(doc, b_key, p_key, "exact")
        if x:
            per["Q2b_fidelity_ratio_vs_plain"][name] = (*paired_ci(x, y, ratio_of_means), len(x), source)
        best_scores, full_scores = _paired(doc, b_key, None, "score")
        if best_scores:  # gap = full prefill's mean score - the best variant's
            per["Q1_score_gap"][name] = (*paired_ci(full_scores, best_scores, diff_of_means), len(best_scores),
                                         source)
    for key, (target, better) in TARGETS.items():
        # a ratio over a baseline of 0 is infinite: that dataset gives no value (and the key is left out)
        vals = {d: v for d, v in per[key].items() if math.isfinite(v[0])}
        if len(vals) < len(docs) or not vals:
            continue
        pick = (max if better == "lower" else min)(vals, key=lambda d: vals[d][0])
        m, lo, hi, n, source = vals[pick]
        out[key] = entry(m, target, better, source, n_samples=n, ci95=[lo, hi], dataset=pick, ratio=ratio,
                         best_variant=best, baseline=BASELINE,
                         per_dataset={d: {"measured": round(v[0], 4), "ci95": [v[1], v[2]], "n_samples": v[3]}
                                      for d, v in vals.items()})
    return out


def q3_entry(docs: dict[str, tuple[dict, str]], variant: str, ratio: float = TARGET_RATIO,
             gpu_chunks: int = Q3_GPU_CHUNKS) -> dict[str, dict]:
    """Q3_KEY (the frontier's 2-of-5 promotion recovery) from {dataset: (frontier doc, source)}: fidelity (`= full` after normalisation)
    with `gpu_chunks` resident + promotions over fidelity with every chunk resident, `variant` at `ratio`,
    paired bootstrap interval; the worse of the datasets that have the measurement (per_dataset lists them,
    with the no-promotion contrast). {} when no dataset has it."""
    from kvblend.bench.summary import entry
    from kvblend.quality.promotion import promotion_key, recovery

    key = promotion_key(variant, ratio, gpu_chunks)
    per: dict[str, tuple] = {}
    for name, (doc, source) in docs.items():
        rec = recovery(doc["samples"], key, "promote", "exact")
        if rec is None or not math.isfinite(rec["mean"]):
            continue
        static = recovery(doc["samples"], key, "static", "exact")
        score = recovery(doc["samples"], key, "promote", "score")
        per[name] = (rec, static, score, source)
    if not per:
        return {}
    target, better = Q3_TARGET
    pick = min(per, key=lambda d: per[d][0]["mean"])
    rec, _, _, source = per[pick]

    def brief(r: dict | None) -> dict | None:
        return None if r is None else {"measured": round(r["mean"], 4), "ci95": r["ci95"], "n_samples": r["n"]}

    return {Q3_KEY: entry(rec["mean"], target, better, source, n_samples=rec["n"], ci95=rec["ci95"], dataset=pick,
                          ratio=ratio, variant=variant, gpu_chunks=gpu_chunks, metric="fidelity (= full prefill)",
                          per_dataset={d: {**brief(v[0]), "fidelity_promote": round(v[0]["arm_mean"], 4),
                                           "fidelity_all_resident": round(v[0]["all_resident_mean"], 4),
                                           "without_promotions": brief(v[1]), "score_ratio": brief(v[2])}
                                       for d, v in per.items()})}


def promotion_variants(docs: dict[str, tuple[dict, str]]) -> list[str]:
    """Variants with Q3 promotion records in these files, the most measured first."""
    from collections import Counter

    count: Counter = Counter()
    for doc, _ in docs.values():
        for sample in doc["samples"]:
            for key in sample.get("promotion") or {}:
                count[key.split("@")[0]] += 1
    return [v for v, _ in count.most_common()]


def promotion_table(doc: dict) -> str:
    """One row per promotion arm of every promotion key in the file, then the recovery ratios."""
    from kvblend.quality.promotion import ARMS

    agg = doc.get("promotion_aggregate") or {}
    lines = []
    for key, cell in agg.items():
        lines += [f"`{key}` (variant@ratio/resident chunks at the start):", "",
                  "| arm | n | = full (norm.) | same ids | fidelity Rouge-L | score | promotions / sample "
                  "| = all-resident answer |", "|---|---|---|---|---|---|---|---|"]
        for arm in ARMS:
            row = cell.get(arm) or {}
            vals = [s["promotion"][key]["arms"][arm] for s in doc["samples"]
                    if key in (s.get("promotion") or {}) and arm in s["promotion"][key]["arms"]]
            ex = sum(bool(v["exact"]) for v in vals)
            same = sum(bool(v["same"]) for v in vals)
            eq = sum(bool(v.get("same_as_all_resident")) for v in vals)
            lines.append(f"| {arm} | {row.get('n', 0)} | {ex}/{len(vals)} | {same}/{len(vals)} "
                         f"| {_cell(row, 'fid_rougeL')} | {_cell(row, 'score')} | {_cell(row, 'promotions', '.2f')} "
                         f"| {eq}/{len(vals)} |")
        lines.append("")
        for arm in ("promote", "static"):  # the recovery ratios aggregate_promotion computed with the file
            for metric, label in (("exact", "fidelity"), ("score", "score")):
                r = (cell.get("recovery") or {}).get(f"{arm}/{metric}")
                if r is not None:
                    lines.append(f"- {label} {arm} / all_resident: {r['mean']:.3f} [{r['ci95'][0]:.3f}, "
                                 f"{r['ci95'][1]:.3f}] (n {r['n']})")
        lines.append("")
    return "\n".join(lines)


def provenance_lines(doc: dict) -> list[str]:
    """The distinct git shas of the file's samples, with sample and run counts."""
    rows = doc.get("git_shas")
    if not rows:
        from kvblend.quality.provenance import sha_counts, with_provenance

        d = with_provenance(json.loads(json.dumps(doc)))
        rows = sha_counts(d["samples"], d["passes"])
    out = []
    for r in rows:
        note = f" ({r['inferred_samples']} inferred from the file: written before per-sample provenance)" \
            if r.get("inferred_samples") else ""
        out.append(f"- git `{r['git_sha']}`: {r['samples']} samples created, {r['runs']} runs computed{note}")
    return out


# datasets whose text may not be redistributed (SAMSum: CC BY-NC-ND): the docs copy drops generated answers
REDACT = ("samsum",)


def held_out(doc: dict, ratio: float = TARGET_RATIO) -> list[dict]:
    """Samples on which not every variant was measured at `ratio`: the default was picked by comparing all
    variants, so these samples (measured afterwards) played no part in picking it."""
    keys = [f"{v}@{ratio:g}" for v in doc["variants"]]
    return [s for s in doc["samples"] if not all(k in s["runs"] for k in keys)]


def held_out_table(doc: dict, best: str, ratio: float = TARGET_RATIO) -> str:
    """plain vs best at `ratio` on the held-out samples."""
    rows = []
    pool = held_out(doc, ratio)
    for v in (BASELINE, best):
        key = f"{v}@{ratio:g}"
        sel = [s for s in pool if f"{BASELINE}@{ratio:g}" in s["runs"] and f"{best}@{ratio:g}" in s["runs"]]
        if not sel:
            return ""
        runs = [s["runs"][key] for s in sel]
        kl = sum(r["kl_first"] for r in runs) / len(runs)
        ex = sum(bool(r["exact"]) for r in runs)
        sc = [r["score"] for r in runs if r.get("score") is not None]
        full = [s["full"]["score"] for s in sel if s["full"].get("score") is not None]
        rows.append(f"| {v} | {len(runs)} | {kl:.4f} | {ex}/{len(runs)} | {sum(sc) / max(1, len(sc)):.3f} "
                    f"| {sum(full) / max(1, len(full)):.3f} |")
    return "\n".join(["| variant | samples | KL first | = full (norm.) | score | full prefill score |",
                      "|---|---|---|---|---|---|", *rows])


def redacted(doc: dict) -> dict:
    """The doc without generated text or token ids (numbers only)."""
    out = json.loads(json.dumps(doc))
    for smp in out["samples"]:
        smp["full"].pop("answer", None)
        smp["full"].pop("tokens", None)
        for run in smp["runs"].values():
            run.pop("answer", None)
        for rec in (smp.get("promotion") or {}).values():
            for arm in rec.get("arms", {}).values():
                arm.pop("answer", None)
    out["redacted"] = "generated answers dropped: the dataset's licence forbids redistributing derivatives"
    return out


def load_docs(out_dir: str | Path) -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(Path(out_dir).glob("frontier_*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable frontier file ({exc})") from None
        if ".shard" in path.name or not doc.get("samples"):
            continue  # a worker's part (merged into the main file) or a run that measured nothing
        docs.append((path, doc))
    return docs


def default_variant() -> str:
    from kvblend.config import EngineConfig
    from kvblend.quality.variants import variant_of_config

    return variant_of_config(EngineConfig()) or BASELINE


def write_report(out_dir: str | Path, docs_dir: str | Path = "docs") -> list[str]:
    """Copy frontier files + plots to <docs>/results/quality/, write the Q* keys and <docs>/QUALITY.md."""
    from kvblend.bench.summary import update_summary
    from kvblend.io import atomic_write_json, atomic_write_text
    from kvblend.quality.plots import plot_frontier

    docs = load_docs(out_dir)
    if not docs:
        raise ValueError(f"no frontier_*.json in {out_dir}; run `kvblend frontier` first")
    dest = Path(docs_dir) / "results" / "quality"
    dest.mkdir(parents=True, exist_ok=True)
    copied: list[tuple[Path, dict]] = []
    for path, doc in docs:
        target = dest / path.name
        if doc["setup"]["dataset"] in REDACT:
            doc = redacted(doc)
            atomic_write_json(target, doc)
        elif path.resolve() != target.resolve():
            shutil.copyfile(path, target)
        plot_frontier(doc, target.with_suffix(""))
        copied.append((target, doc))
    best = default_variant()
    lines = []
    fp32 = {d["setup"]["dataset"]: (d, str(p)) for p, d in copied
            if d["setup"]["dtype"] == "float32" and d["setup"]["model"] == TARGET_MODEL
            and not d["setup"].get("offset") and d["setup"]["dataset"] in TARGET_DATASETS}
    entries = target_entries(fp32, best) if set(fp32) == set(TARGET_DATASETS) else {}
    q3 = q3_entry(fp32, best)
    for variant in promotion_variants(fp32) if not q3 else ():
        # the default has no promotion pass yet: report the variant that has one (the entry names it)
        q3 = q3_entry(fp32, variant)
        if q3:
            break
    entries.update(q3)
    if entries:
        update_summary(dest / "summary.json", entries)
        lines.append(f"wrote {dest / 'summary.json'}: " + ", ".join(
            f"{k} = {e['measured']} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]" for k, e in entries.items()))
    else:
        lines.append(f"no Q* keys: need fp32 {TARGET_MODEL} frontier files of {' and '.join(TARGET_DATASETS)} "
                     f"(Q3: a --promotion pass on either)")
    md = quality_markdown(copied, best, entries, Path(docs_dir))
    atomic_write_text(Path(docs_dir) / "QUALITY.md", md)
    lines.append(f"wrote {Path(docs_dir) / 'QUALITY.md'} from {len(copied)} frontier file(s)")
    return lines


def _variant_rows() -> list[str]:
    rows = ["| variant | precompute context | selection | extra work at ratio r (vs plain CacheBlend) |",
            "|---|---|---|---|"]
    for v in VARIANTS.values():
        sel = v.score_on + (f", first {v.select_first_tokens} tokens" if v.select_first_tokens else "") + \
            (f", narrowed over {v.select_layers} layers" if v.select_layers > 1 else "")
        extra = []
        if v.chunk_sink == "prefix":
            extra.append("chunk build prefills the prefix too (once per chunk, offline)")
        if v.chunk_sink == "text":
            extra.append("chunk build prefills a 3-token sink (offline)")
        if v.score_on in ("draft_attn", "k_draft_product"):
            extra.append("a draft model prefills the whole prompt (its |query| x N attention maps, every layer) "
                         "per request, before the blend")
        if v.score_on == "k_tail_product":
            extra.append("one (last 16 query tokens) x all-keys attention map per check layer (16 x N x heads)")
        elif v.score_on in ("attn", "k_attn_rank", "k_attn_product"):
            extra.append("one query x all-keys attention map at the check layer (|query| x N x heads)")
        if v.select_layers > 1:
            L = v.select_layers
            extra.append(f"check layers 1..{L} keep {L}r, ..., r of the chunk tokens (plain: r): "
                         f"+{L * (L - 1) // 2}r token-layers (at r = 0.15 on 30 layers: +{0.15 * L * (L - 1) / 2 / 30:.1%} "
                         f"of a full prefill, +{0.15 * L * (L - 1) / 2 / (1 + 0.15 * 29):.0%} of plain blend)")
        rows.append(f"| {v.name} | {v.chunk_sink} | {sel} | {'; '.join(extra) or 'none'} |")
    return rows


def _gaps(copied: list[tuple[Path, dict]], entries: dict | None = None, best: str = "") -> list[str]:
    """What the files do not cover yet (read off the data, not written by hand)."""
    from kvblend.quality.frontier import DEFAULT_RATIOS

    lines = []
    for _, doc in copied:
        s = doc["setup"]
        n = doc["aggregate"].get("full", {}).get("n", 0)
        missing = [f"{r:g}" for r in DEFAULT_RATIOS if f"{BASELINE}@{r:g}" not in doc["aggregate"]]
        label = f"{s['dataset']} {s['dtype']}" + (f" from #{s['offset']}" if s.get("offset") else "")
        if n < 50:
            lines.append(f"- {label}: {n} samples (the target asks for >= 50)")
        if missing:
            lines.append(f"- {label}: ratios {', '.join(missing)} not measured (the grid pass did not start "
                         f"before its deadline)")
    dtypes = {d["setup"]["dtype"] for _, d in copied}
    models = {d["setup"]["model"] for _, d in copied}
    if "bfloat16" not in dtypes:
        lines.append("- no bf16 run")
    if not any("qwen" in m.lower() for m in models):
        lines.append("- no Qwen2.5-Coder-1.5B run")
    q3 = {d["setup"]["dataset"]: sum(bool(s.get("promotion")) for s in d["samples"]) for _, d in copied
          if not d["setup"].get("offset") and d["setup"]["dtype"] == "float32"}
    if not any(q3.values()):
        lines.append(f"- `{Q3_KEY}` not measured (no --promotion pass)")
    q3_variant = ((entries or {}).get(Q3_KEY) or {}).get("variant")
    if q3_variant and q3_variant != best:
        lines.append(f"- `{Q3_KEY}` measured with {q3_variant}, not with the default {best} (no --promotion pass "
                     f"of the default yet)")
    for ds, n in q3.items():
        if 0 < n < 50:
            lines.append(f"- {ds}: `{Q3_KEY}` on {n} samples (the target asks for >= 50)")
    return ["## Gaps", "", *lines, ""] if lines else []


def quality_markdown(copied: list[tuple[Path, dict]], best: str, entries: dict, docs_dir: Path) -> str:
    out = ["# Answer quality: blend variants against full prefill",
           "",
           "Generated by `kvblend frontier --report` from the frontier files below (do not edit by hand).",
           "Each frontier file comes from one `kvblend frontier` command (recorded in the file and repeated here);",
           "every number is a mean over samples with a 95% percentile-bootstrap interval where shown.",
           "",
           "What is measured, per sample, on the same chunks (the first 5 passages) and prompt: the full-prefill",
           "reference (greedy answer T), then per variant x ratio: first-token KL(full || x); KL averaged along T",
           "(teacher-forced); whether x's greedy answer has the same token ids as full's (`same ids`) and equals it",
           "after SQuAD normalisation (`= full`); Rouge-L of x's answer to full's; the task score (word F1 for QA,",
           "Rouge-L for samsum); the fraction of chunk tokens recomputed; the prefill wall time. Ratio 0 is reuse",
           "and ratio 1 full prefill for every variant (tested in tests/test_quality.py).",
           "",
           f"Default (EngineConfig) variant: **{best}**; baseline: **{BASELINE}** (plain CacheBlend).",
           ""]
    if entries:
        out += ["## Targets (ratio 0.15, fp32, SmolLM2; worse of musique_s and samsum)", "",
                "| key | measured | 95% CI | target | met | n | dataset | per dataset |", "|---|---|---|---|---|---|---|---|"]
        for k, e in entries.items():
            per = "; ".join(f"{d} {v['measured']}" for d, v in e["per_dataset"].items())
            out.append(f"| `{k}` | {e['measured']} | [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] | {e['better']} "
                       f"{e['target']} | {e['met']} | {e['n_samples']} | {e['dataset']} | {per} |")
        out.append("")
        if Q3_KEY in entries:
            e = entries[Q3_KEY]
            out += [f"`{Q3_KEY}`: {e['variant']} at ratio {e['ratio']:g}, {e['gpu_chunks']} of the chunks resident "
                    "at the start + promotions (EngineConfig drafter and proxy) vs every chunk resident, greedy; "
                    "fidelity = answers equal to full prefill's after normalisation; per dataset (with the "
                    "no-promotion contrast):", ""]
            for d, v in e["per_dataset"].items():
                wo = v.get("without_promotions")
                out.append(f"- {d}: {v['measured']} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] (n {v['n_samples']}; "
                           f"fidelity {v['fidelity_promote']:.3f} vs {v['fidelity_all_resident']:.3f} all resident)"
                           + (f"; without promotions {wo['measured']} [{wo['ci95'][0]:.3f}, {wo['ci95'][1]:.3f}]"
                              if wo else ""))
            out.append("")
        else:
            out += [f"`{Q3_KEY}` (GPU budget 2 of 5 + promotions vs all 5 resident): no --promotion pass in "
                    "the files yet.", ""]
    out += ["## Variants and what they cost", "", *_variant_rows(), "",
            "The recompute fraction is the same r for every variant at ratio r (the first-token and narrowing",
            "variants spend the same final budget); the prefill ms column of each table is measured side by side.",
            ""]
    out += ["## How the files were made", "",
            "GPU passes (one command, `scripts/gpu/frontier_runs.sh` through `scripts/gpu/with_weights.sh`, 7 worker",
            "processes per dataset, each pass bounded by a deadline and resumable): pass 1 every variant at ratios",
            "0 / 0.15 / 1 on the first 50 samples (workers take every 7th sample, so the deadline leaves gaps), then",
            "the held-out and grid passes. Samples the GPU passes did not reach were resumed on the shared 2-core CPU",
            "(`kvblend frontier --device cpu --variants plain,prefix,prefix_product_narrow --ratios 0.15 --limit 50`)",
            "for as long as the session allowed; each sample records its hardware, and every table gives n per row.",
            "Regenerate this page: `kvblend frontier --report`.", ""]
    out += _gaps(copied, entries, best)
    for path, doc in copied:
        s = doc["setup"]
        rel = path.relative_to(docs_dir) if path.is_relative_to(docs_dir) else path
        stem = Path(rel).with_suffix("")
        held = f", samples from #{s['offset']}" if s.get("offset") else ""
        out += [f"## {s['dataset']}, {s['model']}, {s['dtype']}{held}", "",
                f"Hardware: {', '.join(doc.get('hardware_per_sample') or [doc.get('hardware', '?')])} "
                f"(per sample in the file); git {doc.get('git_sha') or '?'}; file `{rel}`.", "",
                "Commands (each a resumable pass over the same file, [where it ran]):", "",
                *[f"- `{c}`" for c in (doc.get("commands") or [doc.get("command", "")])], "",
                "Code versions (per sample, from the file):", "", *provenance_lines(doc), "",
                f"![KL vs ratio]({stem}_kl.png) ![fidelity vs ratio]({stem}_fidelity.png)", "",
                "At ratio 0.15, every variant:", "",
                frontier_table(doc, ratios=[0.15]), ""]
        table = held_out_table(doc, best)
        if table:
            ids = ", ".join(f"#{x['sample_id'].rsplit('/', 1)[-1]}" for x in held_out(doc))
            out += [f"Held-out check (samples {ids}: measured after the default was picked, on "
                    f"{', '.join(sorted({x.get('hardware', '?') for x in held_out(doc)}))}):", "", table, ""]
        ptable = promotion_table(doc)
        if ptable:
            out += [f"Promotion recovery ({Q3_KEY}; kvblend/quality/promotion.py):", "", ptable]
        main = [v for v in (BASELINE, "prefix", best) if v in doc["variants"]]
        out += ["Whole frontier of " + ", ".join(dict.fromkeys(main)) + ":", "",
                frontier_table(doc, variants=list(dict.fromkeys(main))), ""]
    return "\n".join(out) + "\n"
