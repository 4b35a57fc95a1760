"""`kvblend bench <name>`: each benchmark lives in kvblend/bench/<name>.py with add_arguments(parser) and
run(args) -> exit code. Importing this module (to build the CLI) must not import torch."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "prefill": ("kvblend.bench.prefill", "TTFT of full / reuse / blend, per tier, vs transformers"),
    "decode": ("kvblend.bench.decode", "TPOT: target alone, speculative, transformers generate, promotions"),
    "serve": ("kvblend.bench.serve", "load test of `kvblend serve` (Zipf-popular documents), full vs blend"),
}


def available() -> dict[str, object]:
    mods = {}
    for name, (module, _help) in BENCHMARKS.items():
        try:
            mods[name] = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
                raise
    return mods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, parser_class=type(parser))
    for name, mod in available().items():
        p = sub.add_parser(name, help=BENCHMARKS[name][1])
        mod.add_arguments(p)
        p.set_defaults(bench_run=mod.run)


def run(args: argparse.Namespace) -> int:
    if args.bench == "serve" and getattr(args, "replicas", 0):  # the scale-out run (kvblend/bench/scale_out.py)
        from kvblend.bench.scale_out import run_scale_out

        return run_scale_out(args)
    return args.bench_run(args)
