"""kvblend command line. Only this module (and bench/) prints; errors are one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from kvblend.argtypes import duration as _duration
from kvblend.argtypes import non_negative_int as _non_negative_int
from kvblend.argtypes import positive_int as _positive_int
from kvblend.argtypes import ratio as _ratio
from kvblend.errors import KvblendError
from kvblend.vocab import DRAFTERS, MODES, PROXIES, RETRIEVAL_MODES, RETRIEVAL_SCOPES, TIERS

log = logging.getLogger("kvblend")

EXIT_USAGE = 2
EXIT_ERROR = 1


class CliError(KvblendError):
    pass


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="named model (default smollm2-135m-instruct) or local HF folder")
    p.add_argument("--dtype", default=None,
                   help="auto (bf16 on CUDA; on CPU bf16 only where a probe finds it faster) | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N]")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not usage + message."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_pipeline_args(p: argparse.ArgumentParser, mode: bool = False) -> None:
    _add_model_args(p)
    p.add_argument("--config", default=None, help="TOML config file (flags > KVBLEND_* env > file > defaults)")
    p.add_argument("--dataset", default=None, help="musique_s | wikimqa_s | samsum | toy | path to a data file")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N samples only")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--top-k", dest="top_k", type=_positive_int, default=None, help="retrieved chunks per question")
    p.add_argument("--retrieval-mode", dest="retrieval_mode", choices=RETRIEVAL_MODES, default=None,
                   help="default both (hybrid BM25 + dense, RRF)")
    p.add_argument("--scope", dest="retrieval_scope", choices=RETRIEVAL_SCOPES, default=None)
    p.add_argument("--results-dir", dest="results_dir", default=None)
    p.add_argument("--gpu-chunks", "--top-k-gpu", dest="gpu_chunks", type=_non_negative_int, default=None,
                   help="chunks resident on the GPU tier, best by retrieval score (default 2); the rest are CPU "
                        "placeholders that speculative decoding promotes (--top-k-gpu: old name)")
    p.add_argument("--start-tier", dest="start_tier", choices=TIERS, default=None,
                   help="tier every chunk is staged on before each timed answer, the same for every mode "
                        "(default cpu)")
    p.add_argument("--no-warm", dest="warm_ttft", action="store_const", const=False, default=None,
                   help="decode/run: skip the warm TTFT pass (each sample's first token again with its chunks "
                        "GPU-resident, beside the cold TTFT from --start-tier; costs a second prefill per sample)")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_const", const=False, default=None,
                   help="decode/run with --start-tier disk: do not read the next sample's chunks into the CPU tier "
                        "while one decodes (every sample's TTFT then truly cold)")
    p.add_argument("--remote-store", dest="remote_store", default=None,
                   help="redis://HOST:PORT[/DB]: a Redis / Valkey server as a shared chunk tier behind local disk")
    p.add_argument("--gpu-budget", dest="gpu_budget", default=None, help="e.g. 4GiB")
    p.add_argument("--cpu-budget", dest="cpu_budget", default=None)
    p.add_argument("--ratio", type=_ratio, default=None, help="blend recompute ratio (default 0.15)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=_positive_int, default=None)
    p.add_argument("--max-context-tokens", dest="max_context_tokens", type=_positive_int, default=None,
                   help="drop middle chunks beyond this many chunk tokens (default: samsum 3400, others none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_blend_args(p)
    if mode:
        p.add_argument("--mode", choices=MODES, default=None)


def _add_blend_args(p: argparse.ArgumentParser) -> None:
    """How chunks are precomputed and which tokens a blend recomputes (docs/QUALITY.md compares them)."""
    from kvblend.vocab import CHUNK_SINKS, SCORE_ON

    p.add_argument("--chunk-sink", dest="chunk_sink", choices=CHUNK_SINKS, default=None,
                   help="what each chunk is prefilled after: auto (BOS) | none | prefix (the prompt's shared "
                        "prefix) | text (a fixed short sink text); part of the chunk's store key")
    p.add_argument("--score-on", dest="score_on", choices=SCORE_ON, default=None,
                   help="blend selection signal: k | v deviation, attn (query attention), k_attn_rank, k_attn_product")
    p.add_argument("--select-first-tokens", dest="select_first_tokens", type=int, default=None,
                   help="always recompute each chunk's first N tokens (EPIC), inside the ratio budget")
    p.add_argument("--select-layers", dest="select_layers", type=_positive_int, default=None,
                   help="progressive narrowing over N check layers (N x ratio ... 1 x ratio)")


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", choices=DRAFTERS, default=None, help="speculative drafter")
    p.add_argument("--draft-model", dest="draft_model", default=None, help="draft model for --drafter model")
    p.add_argument("--proxy", choices=PROXIES, default=None,
                   help="relevance proxy that promotes CPU chunks (none: never promote)")
    p.add_argument("--threshold", dest="promote_threshold", type=_ratio, default=None,
                   help="proxy score that triggers a promotion (default 0.3)")
    p.add_argument("--spec-k", dest="spec_k", type=_non_negative_int, default=None,
                   help="drafted tokens per pass (default 4)")


PIPELINE_FLAGS = ("model", "dtype", "device", "dataset", "limit", "seed", "top_k", "retrieval_mode",
                  "retrieval_scope", "results_dir", "gpu_chunks", "start_tier", "warm_ttft", "prefetch", "gpu_budget",
                  "cpu_budget", "ratio", "max_new_tokens", "max_context_tokens", "mode", "chunk_sink", "score_on",
                  "select_first_tokens", "select_layers", "drafter", "draft_model", "proxy", "promote_threshold",
                  "spec_k", "remote_store")


def _config_from_args(args: argparse.Namespace):
    from kvblend.config import load_config

    return load_config(args.config, {k: getattr(args, k, None) for k in PIPELINE_FLAGS})


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="kvblend", description="RAG inference with CacheBlend chunk KV reuse")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    _add_pipeline_args(sub.add_parser("retrieve", help="rank each question's chunks; writes results/retrieval/"))
    _add_pipeline_args(sub.add_parser("build", help="prefill every retrieved chunk once into the chunk store"))
    decode = sub.add_parser("decode", help="answer every sample (full | reuse | blend), or --speculative")
    _add_pipeline_args(decode, mode=True)
    decode.add_argument("--speculative", action="store_true",
                        help="speculative decoding with --gpu-chunks chunks resident (default 2) and proxy promotions")
    decode.add_argument("--trace-out", default=None, help="trace file (default results/decoding/speculative_trace.json)")
    _add_spec_args(decode)
    evaluate = sub.add_parser("eval", help="quality and fidelity table from the decoding files")
    _add_pipeline_args(evaluate)
    evaluate.add_argument("--token-f1", action="store_true",
                          help="also the CacheBlend token-id F1 (with its Yes/No collapse; for comparison only)")
    run = sub.add_parser("run", help="retrieve + build + decode (full, reuse, blend) + eval")
    _add_pipeline_args(run)
    run.add_argument("--modes", default="full,reuse,blend", help="comma-separated decode modes")

    store = sub.add_parser("store", help="the chunk store on disk: gc")
    store_sub = store.add_subparsers(dest="store_command", required=True, parser_class=OneLineParser)
    gc = store_sub.add_parser("gc", help="remove chunks unused for longer than --older-than, and dead writers' files")
    gc.add_argument("--older-than", dest="older_than", type=_duration, required=True,
                    help="e.g. 7d, 12h, 30m (a chunk's last use is its sidecar's mtime)")
    gc.add_argument("--home", default=None, help="kvblend home (default $KVBLEND_HOME or ~/.cache/kvblend)")

    demo = sub.add_parser("demo", help="full vs reuse vs blend on the first musique_s samples")
    _add_model_args(demo)
    demo.add_argument("--samples", type=_positive_int, default=3)
    demo.add_argument("--chunks", type=_positive_int, default=5, help="first N passages of each sample as chunks")
    demo.add_argument("--ratio", type=_ratio, default=None, help="blend recompute ratio (default 0.15)")
    demo.add_argument("--start-tier", dest="start_tier", choices=TIERS, default=None,
                      help="tier every chunk is staged on before each timed answer (default cpu)")
    demo.add_argument("--out", default=None, help="also write the rows as JSON here")

    budget = sub.add_parser("budget", help="KV bytes per token and how many tokens/chunks fit in a GPU",
                            conflict_handler="resolve")
    budget.add_argument("--model", default="smollm2-135m-instruct",
                        help="preset (llama-3-8b, qwen2.5-7b, mistral-7b, smollm2-135m, ...) or folder with config.json")
    budget.add_argument("--gpu-mem", default="80GiB", help="GPU memory, e.g. 80GiB, 141GB")
    budget.add_argument("--dtype", default="bfloat16", help="KV dtype: bfloat16 | float16 | float32 | fp8")
    budget.add_argument("--weights-dtype", default=None, help="weights dtype (default: the KV dtype)")
    budget.add_argument("--workspace", type=float, default=0.1, help="workspace fraction of GPU memory (min 1 GiB)")
    budget.add_argument("--chunk-tokens", type=_positive_int, default=512)
    budget.add_argument("--json", action="store_true", help="print JSON instead of a table")
    budget.add_argument("--sweep", action="store_true",
                        help="decode at GPU budgets of 1..--top-k chunks, with and without promotions (uses "
                             "the pipeline flags below; --model is then the engine model)")
    _add_pipeline_args(budget)
    _add_spec_args(budget)
    for name, (module, text) in PLUGGED.items():
        mod = _plugged(module)
        if mod is not None:
            mod.add_arguments(sub.add_parser(name, help=text))
    return parser


# subcommands whose flags and code live in their own package: add_arguments(parser), run(args) -> exit code;
# importing the module must not import torch (the parser is built on every call)
PLUGGED = {
    "bench": ("kvblend.bench.cli", "benchmarks: prefill | decode | serve (JSON under results/bench/)"),
    "frontier": ("kvblend.quality.cli", "quality frontier: KL / fidelity / score vs recompute ratio per variant"),
    "residency": ("kvblend.quality.residency_cli", "retrieve N, keep K resident: static vs promote vs look+promote"),
    "serve": ("kvblend.serve.cli", "OpenAI-compatible HTTP server reusing chunk KV across requests"),
    "analyze": ("kvblend.analysis.cli", "plots and a report from results/ into results/analysis/"),
}


def _plugged(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise
        return None


def cmd_demo(args: argparse.Namespace) -> int:
    from kvblend.config import EngineConfig
    from kvblend.demo import format_table, run_demo

    overrides = {k: v for k, v in (("model", args.model), ("dtype", args.dtype), ("device", args.device),
                                   ("ratio", args.ratio), ("start_tier", args.start_tier)) if v is not None}
    config = EngineConfig(**overrides)
    t0 = time.perf_counter()
    rows = run_demo(config, num_samples=args.samples, num_chunks=args.chunks)
    print(format_table(rows))
    print(f"\n{len(rows) // 3} samples x 3 modes, {time.perf_counter() - t0:.0f} s; blend ratio {config.ratio}, "
          f"model {config.model}; every answer started with its chunks on the {config.start_tier} tier")
    if args.out:
        from dataclasses import asdict

        from kvblend.io import atomic_write_json

        atomic_write_json(Path(args.out), {"config": config.as_dict(), "rows": [asdict(r) for r in rows]})
    return 0


def cmd_budget(args: argparse.Namespace) -> int:
    from kvblend.budget import plan_budget, resolve_shape
    from kvblend.config import format_bytes, parse_bytes

    if args.sweep:
        from kvblend.pipeline import format_sweep_table, run_budget_sweep

        config = _config_from_args(args)
        path, runs = run_budget_sweep(config, progress=not args.quiet)
        print(format_sweep_table(runs))
        print(f"\nwrote {path}")
        return 0
    dims = resolve_shape(args.model or "smollm2-135m-instruct")
    plan = plan_budget(dims, parse_bytes(args.gpu_mem, "--gpu-mem"), args.dtype or "bfloat16", args.workspace,
                       chunk_tokens=args.chunk_tokens, weights_dtype=args.weights_dtype)
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(plan), indent=1))
        return 0
    rows = [
        ("model", plan.model),
        ("shape", f"{dims.num_layers} layers x {dims.num_kv_heads} kv heads x {dims.head_dim} head dim"),
        ("KV dtype", plan.dtype),
        ("KV bytes / token", f"{plan.kv_bytes_per_token} ({format_bytes(plan.kv_bytes_per_token)})"),
        ("GPU memory", format_bytes(plan.gpu_bytes)),
        ("weights", format_bytes(plan.weights_bytes)),
        ("workspace", format_bytes(plan.workspace_bytes)),
        ("KV memory available", format_bytes(plan.kv_bytes_available)),
        ("max KV tokens", f"{plan.max_tokens:,}"),
        (f"max chunks of {plan.chunk_tokens} tokens", f"{plan.max_chunks:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from kvblend.pipeline import run_retrieve

    config = _config_from_args(args)
    path, recall = run_retrieve(config, progress=not args.quiet)
    rec = "n/a (needs short gold answers: not for summaries or unlabelled samples)" if recall is None \
        else f"{recall:.3f}"
    print(f"wrote {path}; answer-recall@{config.top_k} ({config.retrieval_mode}, {config.retrieval_scope}) = {rec}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from kvblend.pipeline import run_build

    config = _config_from_args(args)
    path = run_build(config, progress=not args.quiet)
    summary = json.loads(path.read_text())
    print(f"wrote {path}: {summary['chunks_built']} chunks built, {summary['chunks_reused']} already stored, "
          f"{summary['elapsed_sec']:.1f} s")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from kvblend.pipeline import run_decode, run_speculative

    config = _config_from_args(args)
    if args.speculative:
        path = run_speculative(config, progress=not args.quiet,
                               trace_path=Path(args.trace_out) if args.trace_out else None)
        res = json.loads(path.read_text())
        score = "-" if res["mean_score"] is None else f"{res['mean_score']:.3f}"
        print(f"wrote {path}: mean {res['metric']} {score}, TTFT {res['mean_ttft_ms']:.0f} ms, "
              f"TPOT {res['mean_tpot_ms']:.1f} ms, acceptance {res['acceptance_rate']:.2f}, "
              f"promotions/sample {res['promotions_per_sample']:.2f}")
        return 0
    path = run_decode(config, progress=not args.quiet)
    res = json.loads(path.read_text())
    score = "-" if res["mean_score"] is None else f"{res['mean_score']:.3f}"
    warm = res.get("mean_ttft_warm_ms")
    warm = "" if warm is None else f", warm (chunks GPU-resident) {warm:.0f} ms"
    print(f"wrote {path}: mean {res['metric']} {score}, mean TTFT cold ({res['start_tier']} tier) "
          f"{res['mean_ttft_ms']:.0f} ms{warm}, TPOT {res['mean_tpot_ms']:.1f} ms")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kvblend.pipeline import format_eval_table, run_eval

    config = _config_from_args(args)
    path, table = run_eval(config, token_f1=args.token_f1)
    print(format_eval_table(table))
    if args.token_f1:
        for row in table:
            value = row["token_f1_cacheblend"]
            print(f"{row['mode']}: CacheBlend token-id F1 = {'-' if value is None else f'{value:.3f}'}")
    print(f"\nwrote {path}")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from kvblend.home import kvblend_home
    from kvblend.kvstore.retention import gc_chunks

    root = (Path(args.home).expanduser() if args.home else kvblend_home()) / "chunks"
    if not root.is_dir():
        raise CliError(f"{root}: no chunk store here (nothing to collect); pass --home")
    result = gc_chunks(root, args.older_than)
    print(f"{root}: removed {result.chunks} chunks unused for over {args.older_than:g} s ({result.bytes} bytes) "
          f"and {result.leftovers} files of interrupted writes")
    return 0


def _run_files(config, modes) -> list[Path]:
    """Every results file `kvblend run` may rewrite (restored as they were when the run fails)."""
    from kvblend.pipeline import decode_path, paths

    p = paths(config)
    return [p["retrieval"], p["build"], p["eval"], *(decode_path(config, m) for m in modes)]


def cmd_run(args: argparse.Namespace) -> int:
    from kvblend.engine import Engine
    from kvblend.io import Rollback
    from kvblend.pipeline import format_eval_table, load_inputs, paths, run_build, run_decode, run_eval

    config = _config_from_args(args)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise CliError(f"--modes: expected a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    progress = not args.quiet
    engine = Engine(config)  # a model that cannot load fails here, before any results file is touched
    lines = []
    with Rollback(_run_files(config, modes)):  # a failed run leaves every results file as it was
        load_inputs(config, progress)  # retrieves only when the retrieval file cannot serve these samples
        lines.append(f"retrieve: {paths(config)['retrieval']} covers the {config.limit or 'all'} samples asked for")
        lines.append(f"build: wrote {run_build(config, engine=engine, progress=progress)}")
        for mode in modes:
            lines.append(f"decode: wrote {run_decode(config, mode=mode, engine=engine, progress=progress)}")
        path, table = run_eval(config, modes, engine=engine, progress=progress)
    print("\n".join(lines))
    print(format_eval_table(table))
    print(f"\neval: wrote {path}")
    return 0


COMMANDS = {"demo": cmd_demo, "budget": cmd_budget, "retrieve": cmd_retrieve, "build": cmd_build,
            "decode": cmd_decode, "eval": cmd_eval, "run": cmd_run, "store": cmd_store}


def _quiet_progress() -> None:
    """--quiet: no progress bar anywhere, the model's weight loading and conversion included (tqdm and the
    Hugging Face libraries read these at import time, so before they are imported)."""
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if getattr(args, "quiet", False):
        _quiet_progress()
    try:
        if args.command in PLUGGED:
            return _plugged(PLUGGED[args.command][0]).run(args)
        return COMMANDS[args.command](args)
    except (KvblendError, ValueError, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"kvblend {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"kvblend {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
