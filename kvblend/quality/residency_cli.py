"""`kvblend residency`: flags and entry point (torch-free at import; kvblend/quality/residency.py runs it)."""

from __future__ import annotations

import argparse
import logging

from kvblend.argtypes import non_negative_int

SUMMARY = "docs/results/quality/summary.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kvblend.quality.residency import ResidencySettings as S

    p.add_argument("--model", default=S.model, help="named model or local HF folder")
    p.add_argument("--dtype", default=S.dtype)
    p.add_argument("--device", default=S.device, help="cpu | cuda")
    p.add_argument("--dataset", default=S.dataset)
    p.add_argument("--limit", type=non_negative_int, default=S.limit, help="first N samples (0: all)")
    p.add_argument("--offset", type=non_negative_int, default=S.offset)
    p.add_argument("--candidates", type=non_negative_int, default=S.candidates, help="passages per question")
    p.add_argument("--gpu-chunks", dest="gpu_chunks", type=non_negative_int, default=S.gpu_chunks,
                   help="GPU budget in chunks (K)")
    p.add_argument("--passage-tokens", dest="passage_tokens", type=non_negative_int, default=S.passage_tokens,
                   help="cut each passage to its first M tokens (0: whole passages)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=non_negative_int, default=S.max_new_tokens)
    p.add_argument("--ratio", type=float, default=S.ratio, help="blend recompute ratio")
    p.add_argument("--spec-k", dest="spec_k", type=non_negative_int, default=S.spec_k, help="drafts per pass")
    p.add_argument("--threshold", type=float, default=S.threshold, help="summary share needed to promote")
    p.add_argument("--time-budget", dest="time_budget_s", type=float, default=S.time_budget_s,
                   help="seconds after which no new sample starts (0: none)")
    p.add_argument("--out", default=S.out, help="JSON result file")
    p.add_argument("--backfill", default="", help="FILE[,MORE...]: instead of running, merge the samples of MORE "
                   "(runs continued with --offset) into FILE and re-aggregate it (peaks of samples run before the "
                   "per-request peak was recorded: the budget bound)")
    p.add_argument("--summary", default="", help=f"also write the Q3 keys into this summary file (e.g. {SUMMARY})")


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from kvblend.bench.summary import update_summary
    from kvblend.quality.residency import ResidencySettings, markdown_table, run_residency, summary_entries

    s = ResidencySettings(**{f.name: getattr(args, f.name) for f in fields(ResidencySettings)})
    logging.getLogger("kvblend").setLevel(logging.INFO)

    def progress(i, rec):
        same = {a: int(r["same_as_all_resident"]) for a, r in rec["arms"].items()}
        print(f"sample {i + 1}: {rec['prompt_tokens']} tokens, {rec['seconds']} s, same={same}", flush=True)

    if args.backfill:
        path, doc = _backfill(args.backfill)
    else:
        path, doc = run_residency(s, progress)
    agg = doc["aggregate"]
    print(f"wrote {path} ({agg['n']} samples)")
    for arm, a in agg["arms"].items():
        print(f"  {arm:13s} same {a['same_as_all_resident']:.3f}  score {a['score'] or 0:.3f}  recall@K "
              f"{a['recall_at_k']:.3f}  promotions {a['promotions_per_sample']:.2f}  moved "
              f"{a['bytes_moved_per_sample'] / 2**20:.1f} MiB  TTFT {a['ttft_ms_median']:.0f} ms")
    print(markdown_table(doc))
    if args.summary:
        entries = summary_entries(doc, str(path))
        update_summary(args.summary, entries)
        print(f"wrote {args.summary}: " + ", ".join(f"{k} = {e['measured']}" for k, e in entries.items()))
    return 0


def _backfill(paths: str):
    import json
    from pathlib import Path

    from kvblend.io import atomic_write_json
    from kvblend.model.registry import load_model
    from kvblend.quality.residency import backfill_peaks

    path, *more = paths.split(",")
    doc = json.loads(Path(path).read_text())
    for extra in more:
        other = json.loads(Path(extra).read_text())
        seen = {r["sample_id"] for r in doc["samples"]}
        doc["samples"] += [r for r in other["samples"] if r["sample_id"] not in seen]
        doc.setdefault("merged_from", []).append({"file": extra, "settings": other["settings"],
                                                  "wall_s": other.get("wall_s")})
    doc = backfill_peaks(doc, load_model(doc["settings"]["model"], doc["settings"]["dtype"], "cpu"))
    atomic_write_json(path, doc)
    return Path(path), doc
