"""`kvblend analyze [--results results] [--out results/analysis]` (plugged into kvblend/cli.py).

Importing this module must stay cheap and torch-free: the kvblend parser is built on every call."""

from __future__ import annotations

import argparse
from pathlib import Path


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default=None,
                        help="results folder to read (default: $KVBLEND_RESULTS_DIR or results)")
    parser.add_argument("--out", default=None, help="output folder for the PNGs and report.md "
                                                    "(default: <results>/analysis)")
    parser.add_argument("--max-timelines", dest="max_timelines", type=_count, default=12,
                        help="promotion timelines drawn per trace file (default 12)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import os

    from kvblend.analysis.report import analyze

    results = Path(args.results or os.environ.get("KVBLEND_RESULTS_DIR") or "results")
    out = Path(args.out) if args.out else results / "analysis"
    analysis = analyze(results, out, max_timelines=args.max_timelines, progress=not args.quiet)
    print(f"wrote {analysis.report} and {len(analysis.figures)} figures under {out}")
    for section in analysis.missing:
        print(f"  no inputs for: {section} (see the report's notes)")
    return 0
