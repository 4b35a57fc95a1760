#!/usr/bin/env python3
"""Attention of a blend's recompute set: SDPA with a dense boolean mask vs FlexAttention with a block mask
built from positions (kvblend/model/attention.py), on the real head shapes.

Per shape (Llama-3-8B 32/8 heads, Qwen2.5-1.5B 12/2, SmolLM2 9/3; head_dim 128/128/64) and case:
  sparse   r=557 sorted query positions (prefix 32 + query 64 + 461 random chunk tokens) over N=3168 keys;
  holes    the same with a 512-row placeholder chunk (invalid keys);
  bucket   the CUDA-graph bucket of layer_graphs: 576 rows (19 pad rows first, at mask position 0) over
           3328 keys (keys >= 3168 invalid).
it times (CUDA events, median of --iters): the dense mask build + SDPA, and per flex compile mode (static /
dynamic, see attention.py) the first call (compile), the block-mask build and the kernel; checks max |diff|
of each against an fp32 reference (and flex against SDPA); on CUDA it also captures the block-mask build +
flex in a CUDA graph and checks the replay. Prints a table, writes JSON to --out.

  PYTHONPATH=. python3 bench/attention_kernels.py --device cuda --out $OUT/attn.json
  PYTHONPATH=. python3 bench/attention_kernels.py --device cpu --quick --out /tmp/attn.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kvblend.bench.harness import module_version, results_header  # noqa: E402
from kvblend.model import attention as A  # noqa: E402

SHAPES = {  # name: (q heads, kv heads, head_dim)
    "llama3-8b": (32, 8, 128),
    "qwen2.5-1.5b": (12, 2, 128),
    "smollm2": (9, 3, 64),
}


def positions(n: int, r: int, prefix: int, query: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted positions: the prefix, the query, and random chunk tokens in between (r in all)."""
    middle = torch.randperm(n - prefix - query, generator=gen)[: r - prefix - query].sort().values + prefix
    return torch.cat([torch.arange(prefix), middle, torch.arange(n - query, n)])


def make_case(case: str, n: int, r: int, dev, gen):
    """(q_pos [rows], num_keys, valid or None, kv_rows): the mask inputs of one case."""
    prefix, query, hole = min(32, r // 8), min(64, r // 4), min(512, n // 6)
    if case == "bucket":
        n_pad, r_pad = -(-n // 256) * 256, -(-r // 64) * 64
        pos = positions(n, r, prefix, query, gen)
        q_pos = torch.cat([torch.zeros(r_pad - r, dtype=torch.long), pos])  # pad rows: key 0 only
        valid = torch.arange(n_pad) < n
        return q_pos.to(dev), n_pad, valid.to(dev), n_pad
    pos = positions(n, r, prefix, query, gen)
    valid = None
    if case == "holes":
        valid = torch.ones(n, dtype=torch.bool)
        lo = prefix + (n - prefix - query) // 3
        valid[lo: lo + hole] = False
        keep = ~((pos >= lo) & (pos < lo + hole))  # placeholder rows are never recomputed
        pos = pos[keep]
        valid = valid.to(dev)
    return pos.to(dev), n, valid, n


class Timer:
    def __init__(self, dev: torch.device):
        self.dev = dev

    def __call__(self, fn, iters: int, warmup: int = 2) -> float:
        """Median milliseconds of fn() (device time on CUDA)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)


def graphs_so_far() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def capture_check(q, k, v, q_pos, num_keys, valid, scale, mode) -> dict:
    """Capture block-mask build + flex over static inputs in a CUDA graph; replay after changing the static
    positions in place; compare with eager SDPA. Returns {ok, max_abs_diff | error}."""
    try:
        static_pos = q_pos.clone()
        static_valid = (valid if valid is not None else torch.ones(num_keys, dtype=torch.bool,
                                                                   device=q.device)).clone()
        os.environ[A.COMPILE_ENV] = mode

        def step():
            m = A.build_mask(static_pos, num_keys, static_valid, "flex")
            return A.masked_attention(q, k, v, static_pos, num_keys, static_valid, scale, mask=m)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = step()
        new_pos = torch.minimum(q_pos + 1, torch.full_like(q_pos, num_keys - 1))  # other positions, same shape
        static_pos.copy_(new_pos)
        g.replay()
        torch.cuda.synchronize()
        ref = A.masked_attention(q, k, v, new_pos, num_keys, static_valid, scale, kernel="sdpa")
        return {"ok": True, "max_abs_diff_vs_sdpa": float((out.float() - ref.float()).abs().max())}
    except Exception as exc:  # report, do not stop the benchmark
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def run(args) -> dict:
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    timer = Timer(dev)
    gen = torch.Generator().manual_seed(0)
    shapes = {s: SHAPES[s] for s in args.shapes.split(",")} if not args.quick else {"tiny": (4, 2, 16)}
    n, r = (args.keys, args.rows) if not args.quick else (300, 120)
    modes = args.modes.split(",")
    cases = args.cases.split(",")
    rows, t_begin = [], time.perf_counter()
    for shape, (h, h_kv, d) in shapes.items():
        scale = d ** -0.5
        for case in cases:
            q_pos, num_keys, valid, kv_rows = make_case(case, n, r, dev, gen)
            rq = q_pos.shape[0]
            q = torch.randn(h, rq, d, generator=gen).to(dev, dtype)
            k = torch.randn(h_kv, kv_rows + 64, d, generator=gen).to(dev, dtype)  # a state with spare capacity
            v = torch.randn(h_kv, kv_rows + 64, d, generator=gen).to(dev, dtype)
            row = {"shape": shape, "case": case, "heads": h, "kv_heads": h_kv, "head_dim": d, "rows": rq,
                   "keys": num_keys, "dtype": args.dtype}
            with torch.inference_mode():
                ref = A.masked_attention(q.float(), k.float(), v.float(), q_pos, num_keys, valid, scale,
                                         kernel="sdpa")
                dense = A.dense_mask(q_pos, num_keys, valid)
                sdpa_out = A.masked_attention(q, k, v, q_pos, num_keys, valid, scale,
                                              mask=A.AttnMask(q_pos, num_keys, valid, "sdpa", dense=dense))
                row["sdpa_dense"] = {
                    "mask_build_ms": timer(lambda: A.dense_mask(q_pos, num_keys, valid), args.iters),
                    "kernel_ms": timer(lambda: F.scaled_dot_product_attention(
                        q[None], k[None, :, :num_keys], v[None, :, :num_keys], attn_mask=dense[None, None],
                        scale=scale, enable_gqa=True), args.iters),
                    "max_abs_diff_vs_fp32": float((sdpa_out.float() - ref).abs().max()),
                }
                for mode in modes:
                    if time.perf_counter() - t_begin > args.budget_s:
                        row[f"flex_{mode}"] = {"skipped": f"over the {args.budget_s:.0f} s budget"}
                        continue
                    os.environ[A.COMPILE_ENV] = mode
                    entry: dict = {}
                    try:
                        g0 = graphs_so_far()
                        mask = A.build_mask(q_pos, num_keys, valid, "flex")
                        timer.sync()
                        t = time.perf_counter()
                        out = A._flex(q, k, v, num_keys, scale, mask)
                        timer.sync()
                        entry["first_call_s"] = time.perf_counter() - t
                        entry["compiled_graphs"] = graphs_so_far() - g0
                        entry["mask_build_ms"] = timer(lambda: A.build_mask(q_pos, num_keys, valid, "flex"),
                                                       args.iters)
                        entry["kernel_ms"] = timer(lambda: A._flex(q, k, v, num_keys, scale, mask), args.iters)
                        blk = A.block_structure(q_pos, num_keys, valid)
                        entry["blocks_full"], entry["blocks_partial"] = int(blk[0].sum()), int(blk[1].sum())
                        entry["blocks_total"] = blk[0].numel()
                        entry["max_abs_diff_vs_fp32"] = float((out.float() - ref).abs().max())
                        entry["max_abs_diff_vs_sdpa"] = float((out.float() - sdpa_out.float()).abs().max())
                    except Exception as exc:
                        entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    row[f"flex_{mode}"] = entry
            if dev.type == "cuda" and not args.no_capture and "error" not in row.get(f"flex_{modes[0]}", {}):
                with torch.inference_mode():
                    row["cuda_graph_capture"] = capture_check(q, k, v, q_pos, num_keys, valid, scale, modes[0])
            rows.append(row)
            print_row(row, modes)
    return {
        **results_header(dev),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "triton": module_version("triton"),
        "keys": n, "rows": r, "iters": args.iters, "wall_s": time.perf_counter() - t_begin,
        "total_compiled_graphs": graphs_so_far(),
        "results": rows,
    }


HEADER = (f"{'shape':<13} {'case':<7} {'rows':>5} {'keys':>5} {'kernel':<13} {'first s':>8} {'graphs':>6} "
          f"{'mask ms':>8} {'attn ms':>8} {'full/part/all':>14} {'|d| fp32':>9} {'|d| sdpa':>9}")


def print_row(row: dict, modes) -> None:
    if print_row.first:
        print(HEADER)
        print_row.first = False
    s = row["sdpa_dense"]
    lead = f"{row['shape']:<13} {row['case']:<7} {row['rows']:>5} {row['keys']:>5}"
    print(f"{lead} {'sdpa-dense':<13} {'':>8} {'':>6} {s['mask_build_ms']:>8.3f} {s['kernel_ms']:>8.3f} "
          f"{'':>14} {s['max_abs_diff_vs_fp32']:>9.2e} {'':>9}")
    for mode in modes:
        e = row.get(f"flex_{mode}", {})
        if "kernel_ms" not in e:
            print(f"{lead} {'flex-' + mode:<13} {e.get('error') or e.get('skipped')}")
            continue
        blocks = f"{e['blocks_full']}/{e['blocks_partial']}/{e['blocks_total']}"
        print(f"{lead} {'flex-' + mode:<13} {e['first_call_s']:>8.2f} {e['compiled_graphs']:>6} "
              f"{e['mask_build_ms']:>8.3f} {e['kernel_ms']:>8.3f} {blocks:>14} {e['max_abs_diff_vs_fp32']:>9.2e} "
              f"{e['max_abs_diff_vs_sdpa']:>9.2e}")
    if "cuda_graph_capture" in row:
        print(f"{lead} cuda-graph capture of mask build + flex: {row['cuda_graph_capture']}")
    sys.stdout.flush()


print_row.first = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--cases", default="sparse,holes,bucket")
    p.add_argument("--modes", default=None, help="flex compile modes (default static,dynamic on CUDA; static on CPU)")
    p.add_argument("--keys", type=int, default=3168)
    p.add_argument("--rows", type=int, default=557)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=100.0, help="skip further flex compiles after this")
    p.add_argument("--no-capture", action="store_true", help="skip the CUDA-graph capture check")
    p.add_argument("--quick", action="store_true", help="tiny shape (CPU smoke test)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.modes = args.modes or ("static,dynamic" if cuda else "static")
    if args.quick:
        args.iters = min(args.iters, 3)
    torch.manual_seed(0)
    result = run(args)
    print(f"total {result['wall_s']:.1f} s, {result['total_compiled_graphs']} compiled graphs, "
          f"torch {result['torch']}, triton {result['triton']}, {result['device']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
