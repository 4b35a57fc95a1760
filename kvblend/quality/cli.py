"""`kvblend frontier`: flags and entry point (torch-free at import; the suite is imported inside run())."""

from __future__ import annotations

import argparse
import logging
import sys

from kvblend.argtypes import non_negative_int
from kvblend.quality.variants import VARIANTS, parse_variants

DEFAULT_RATIOS = "0,0.05,0.1,0.15,0.2,0.3,0.5,1.0"


def _ratios(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}")
    return sorted(set(values))


def _variants(text: str) -> list[str]:
    try:
        return parse_variants(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="musique_s", help="musique_s | samsum | wikimqa_s | toy | data file")
    p.add_argument("--model", default="smollm2-135m-instruct", help="named model or local HF folder")
    p.add_argument("--dtype", default="float32", help="float32 (quality comparisons) | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--limit", type=non_negative_int, default=0, help="first N samples (after --offset); 0 = all")
    p.add_argument("--offset", type=non_negative_int, default=0, help="skip the first N samples (held-out checks)")
    p.add_argument("--chunks", type=non_negative_int, default=5, help="first N passages of each sample as chunks")
    p.add_argument("--ratios", type=_ratios, default=_ratios(DEFAULT_RATIOS), help=f"default {DEFAULT_RATIOS}")
    p.add_argument("--variants", type=_variants, default=None,
                   help=f"'main' (default: plain, prefix and the EngineConfig default), 'all', or a "
                        f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=non_negative_int, default=0,
                   help="0 = the dataset's default (32 QA, 128 samsum)")
    p.add_argument("--out-dir", default="results/quality", help="where frontier_<dataset>_<model>_<dtype>.json goes")
    p.add_argument("--report", action="store_true",
                   help="no run: regenerate docs/QUALITY.md, its plots and docs/results/quality/summary.json "
                        "from the frontier files in --out-dir")
    p.add_argument("--docs-dir", default="docs", help="with --report: where QUALITY.md and results/quality/ go")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--jobs", type=non_negative_int, default=1,
                   help="worker processes sharing the samples (a GPU run is launch-bound: several processes "
                        "keep it busy); their shard files are merged into the one results file")
    p.add_argument("--deadline-s", dest="deadline_s", type=float, default=0.0,
                   help="start no new sample after this many seconds (0 = none); rerun to resume")
    p.add_argument("--promotion", action="store_true",
                   help="also measure Q3b_frontier_promotion_recovery_2of5 on the same samples: --promotion-variant at "
                        "--promotion-ratio decoded with --gpu-chunks of the chunks resident + promotions, with "
                        "every chunk resident, and with --gpu-chunks resident without promotions "
                        "(kvblend/quality/promotion.py)")
    p.add_argument("--promotion-variant", dest="promotion_variant", default="",
                   help="variant of the --promotion measurement (default: the EngineConfig default variant)")
    p.add_argument("--promotion-ratio", dest="promotion_ratio", type=float, default=0.15,
                   help="blend ratio of the --promotion measurement (default 0.15)")
    p.add_argument("--gpu-chunks", dest="gpu_chunks", type=non_negative_int, default=2,
                   help="chunks resident at the start in the --promotion measurement (default 2)")
    p.add_argument("--draft-model", dest="draft_model", default="",
                   help="named model or folder (same tokenizer) whose attention the draft-signal variants use "
                        "(CacheClip); the --model itself gives the signal's ceiling")
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)  # i/k, set by --jobs for its workers


def run(args: argparse.Namespace) -> int:
    if args.report:
        from kvblend.quality.report import write_report

        for line in write_report(args.out_dir, args.docs_dir):
            print(line)
        return 0
    if args.chunks < 1:
        print("kvblend frontier: error: --chunks must be >= 1", file=sys.stderr)
        return 2
    import os
    import time

    from kvblend.quality.frontier import FrontierSettings, run_frontier
    from kvblend.quality.report import frontier_table

    logging.getLogger("kvblend").setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    try:
        i, k = (int(x) for x in args.shard.split("/"))
        assert 0 <= i < k
    except (ValueError, AssertionError):
        print(f"kvblend frontier: error: --shard expects i/k with 0 <= i < k, got {args.shard!r}", file=sys.stderr)
        return 2
    if args.variants is None:
        args.variants = parse_variants("main")
    promotion = None
    if args.promotion:
        from kvblend.quality.report import default_variant

        name = args.promotion_variant or default_variant()
        if name not in VARIANTS:
            print(f"kvblend frontier: error: unknown --promotion-variant {name!r}; known: {', '.join(VARIANTS)}",
                  file=sys.stderr)
            return 2
        if not 0.0 < args.promotion_ratio < 1.0 or args.gpu_chunks < 1:
            print("kvblend frontier: error: --promotion needs 0 < --promotion-ratio < 1 and --gpu-chunks >= 1",
                  file=sys.stderr)
            return 2
        promotion = (name, args.promotion_ratio, args.gpu_chunks)
    started = float(os.environ.get("KVBLEND_FRONTIER_STARTED", time.time()))
    os.environ.setdefault("KVBLEND_FRONTIER_COMMAND", "kvblend frontier " + " ".join(
        a for a in sys.argv[2:] if not a.startswith("--shard")))
    s = FrontierSettings(dataset=args.dataset, model=args.model, dtype=args.dtype, device=args.device,
                         variants=args.variants, ratios=args.ratios, limit=args.limit, offset=args.offset,
                         chunks=args.chunks, max_new_tokens=args.max_new_tokens, out_dir=args.out_dir,
                         progress=not args.quiet and args.jobs <= 1, shard=(i, k),
                         deadline=started + args.deadline_s if args.deadline_s > 0 else 0.0, promotion=promotion,
                         draft_model=args.draft_model)
    if args.jobs > 1:
        path, doc = _run_jobs(args, s, started)
    else:
        path, doc = run_frontier(s)
    if k == 1:
        print(frontier_table(doc, ratios=list(s.ratios), variants=list(s.variants)))
    print(f"wrote {path}" + ("" if doc.get("complete") else " (incomplete: rerun to resume)"))
    return 0


def _run_jobs(args: argparse.Namespace, s, started: float):
    """Run args.jobs copies of this command, each on every jobs-th sample, then merge their files."""
    import os
    import subprocess

    from kvblend.data.datasets import load_dataset
    from kvblend.quality.frontier import merge_shards, output_path

    import torch

    from kvblend.model.hf import resolve_dtype

    device = torch.device("cuda" if s.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if s.device == "auto" else s.device))
    dtype = str(resolve_dtype(s.dtype, device)).removeprefix("torch.")
    name = load_dataset(s.dataset).name
    argv = [a for a in sys.argv[1:]]
    procs, shards = [], []
    env = dict(os.environ, KVBLEND_FRONTIER_STARTED=str(started))
    for i in range(args.jobs):
        cmd = [sys.executable, "-m", "kvblend.cli", *argv, "--jobs", "1", "--quiet", "--shard", f"{i}/{args.jobs}"]
        procs.append(subprocess.Popen(cmd, env=env))
        s.shard = (i, args.jobs)
        shards.append(output_path(s, name, dtype))
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    s.shard = (0, 1)
    out = output_path(s, name, dtype)
    doc = merge_shards([p for p in shards if p.is_file()], out)
    if failed:
        raise ValueError(f"frontier workers {failed} failed (their finished samples were merged into {out})")
    return out, doc
