"""kvblend command line. Only this module (and bench/) prints; errors are one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from kvblend.errors import KvblendError

log = logging.getLogger("kvblend")

EXIT_USAGE = 2
EXIT_ERROR = 1


class CliError(KvblendError):
    pass


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="named model (default smollm2-135m-instruct) or local HF folder")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16 (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvblend", description="RAG inference with CacheBlend chunk KV reuse")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="full vs reuse vs blend on the first musique_s samples")
    _add_model_args(demo)
    demo.add_argument("--samples", type=_positive_int, default=3)
    demo.add_argument("--chunks", type=_positive_int, default=5, help="first N passages of each sample as chunks")
    demo.add_argument("--ratio", type=_ratio, default=None, help="blend recompute ratio (default 0.15)")
    demo.add_argument("--out", default=None, help="also write the rows as JSON here")

    budget = sub.add_parser("budget", help="KV bytes per token and how many tokens/chunks fit in a GPU")
    budget.add_argument("--model", default="smollm2-135m-instruct",
                        help="preset (llama-3-8b, qwen2.5-7b, mistral-7b, smollm2-135m, ...) or folder with config.json")
    budget.add_argument("--gpu-mem", default="80GiB", help="GPU memory, e.g. 80GiB, 141GB")
    budget.add_argument("--dtype", default="bfloat16", help="KV dtype: bfloat16 | float16 | float32 | fp8")
    budget.add_argument("--weights-dtype", default=None, help="weights dtype (default: the KV dtype)")
    budget.add_argument("--workspace", type=float, default=0.1, help="workspace fraction of GPU memory (min 1 GiB)")
    budget.add_argument("--chunk-tokens", type=_positive_int, default=512)
    budget.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from kvblend.config import EngineConfig
    from kvblend.demo import format_table, run_demo

    overrides = {k: v for k, v in (("model", args.model), ("dtype", args.dtype), ("device", args.device),
                                   ("ratio", args.ratio)) if v is not None}
    config = EngineConfig(**overrides)
    t0 = time.perf_counter()
    rows = run_demo(config, num_samples=args.samples, num_chunks=args.chunks)
    print(format_table(rows))
    print(f"\n{len(rows) // 3} samples x 3 modes, {time.perf_counter() - t0:.0f} s; blend ratio {config.ratio}, "
          f"model {config.model}")
    if args.out:
        from dataclasses import asdict

        from kvblend.kvstore.tiers import atomic_write_json

        atomic_write_json(Path(args.out), {"config": config.as_dict(), "rows": [asdict(r) for r in rows]})
    return 0


def cmd_budget(args: argparse.Namespace) -> int:
    from kvblend.budget import plan_budget, resolve_dims
    from kvblend.config import format_bytes, parse_bytes

    dims = resolve_dims(args.model)
    plan = plan_budget(dims, parse_bytes(args.gpu_mem, "--gpu-mem"), args.dtype, args.workspace,
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


COMMANDS = {"demo": cmd_demo, "budget": cmd_budget}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
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
