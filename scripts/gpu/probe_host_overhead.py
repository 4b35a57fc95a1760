"""Where a small model's blend prefill spends its wall time on the GPU: host launches vs device work vs syncs.

PYTHONPATH=. python3 scripts/gpu/probe_host_overhead.py --device cuda --out $OUT/host_probe.json
Per shape and case: wall ms (synchronised), device-busy ms (sum of kernel time), CPU ms inside prefill's
launch calls, the number of kernel launches, and the host<->device synchronisations (memcpy DtoH, stream and
device syncs) with the ops that caused them. Writes a chrome trace of one blend call per shape next to --out.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import time
from pathlib import Path

import torch

from kvblend.bench.prefill import build_random, random_prompt
from kvblend.fusion.blend import prefill
from kvblend.fusion.select import SelectionPolicy
from kvblend.kvstore.builder import build_chunk_kv


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="qwen2.5-1.5b,smollm2-135m")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out: dict = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    for shape in a.shapes.split(","):
        model = build_random(shape, dev, dtype, 0)
        ct = 512 if model.shape.max_position_embeddings > 4000 else 128
        prompt = random_prompt(model.shape.vocab_size, 32, 6, ct, 64, 0)
        chunks = [build_chunk_kv(model, ids) for ids in prompt.chunk_ids]
        default = SelectionPolicy(signal="k_attn_product", layers=3)
        cases = {
            "full": lambda: prefill(model, prompt, None, mode="full"),
            "reuse": lambda: prefill(model, prompt, chunks, mode="reuse"),
            "blend@0.15": lambda: prefill(model, prompt, chunks, mode="blend", ratio=0.15),
            "blend@0.15_default_selection": lambda: prefill(model, prompt, chunks, mode="blend", ratio=0.15,
                                                            selection=default),
            "blend@0.15_eager_front": lambda: prefill(model, prompt, chunks, mode="blend", ratio=0.15),
            "blend@0.15_default_selection_eager_front": lambda: prefill(model, prompt, chunks, mode="blend",
                                                                        ratio=0.15, selection=default),
        }
        res = {}
        os.environ["KVBLEND_FRONT_GRAPH"] = "1"
        for label, pol in (("k", None), ("default", default)):  # the graph front selects what the eager loop does
            ra = prefill(model, prompt, chunks, mode="blend", ratio=0.15, selection=pol, recompute="plain")
            rb = prefill(model, prompt, chunks, mode="blend", ratio=0.15, selection=pol)
            same = ra.stats.selected_positions == rb.stats.selected_positions
            overlap = len(set(ra.stats.selected_positions) & set(rb.stats.selected_positions)) / max(
                1, len(ra.stats.selected_positions))
            diff = (ra.logits - rb.logits).abs().max().item()
            res[f"check_{label}"] = {"same_selection": same, "selection_overlap": overlap, "max_logit_diff": diff,
                                     "same_argmax": bool(ra.logits.argmax() == rb.logits.argmax())}
            print(f"{shape:14s} check {label:8s} graph front vs eager: same selection {same} "
                  f"(overlap {overlap:.3f}), max|logit diff| {diff:.3g}", flush=True)
        for name, fn in cases.items():
            os.environ["KVBLEND_FRONT_GRAPH"] = "0" if "eager_front" in name else "1"
            for _ in range(3):
                fn()
            sync()
            walls, stages = [], []
            for _ in range(a.iters):
                t = {}
                sync()
                t0 = time.perf_counter()
                prefill(model, prompt, chunks if name != "full" else None, mode=name.split("@")[0],
                        ratio=0.15, selection=default if "default" in name else None, timings=t)
                sync()
                walls.append((time.perf_counter() - t0) * 1e3)
                stages.append(t)
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                sync()
            if name in ("blend@0.15", "blend@0.15_default_selection"):
                trace = Path(a.out).with_name(f"trace_{shape}_{name.replace('@', '_')}.json")
                prof.export_chrome_trace(str(trace))
                with open(trace, "rb") as f, gzip.open(str(trace) + ".gz", "wb") as g:
                    g.write(f.read())
                trace.unlink()
            launches = 0
            launch_cpu = 0.0
            kernel_ms = 0.0
            syncs: dict[str, int] = {}
            for e in prof.events():
                k = e.name
                if k in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"):
                    launches += 1
                    launch_cpu += e.cpu_time_total / 1e3
                if k in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy",
                         "cudaEventSynchronize", "aten::item", "aten::_local_scalar_dense", "aten::nonzero",
                         "aten::tolist", "cudaGraphLaunch"):
                    syncs[k] = syncs.get(k, 0) + 1
                dt = getattr(e, "device_type", None)
                if dt is not None and str(dt).endswith("CUDA"):
                    kernel_ms += getattr(e, "device_time", getattr(e, "cuda_time", 0.0)) / 1e3
            keys = sorted({k for s in stages for k in s if isinstance(s[k], float)})
            res[name] = {"wall_ms_median": statistics.median(walls), "wall_ms": walls,
                         "stages_median": {k: statistics.median([s[k] for s in stages if k in s]) for k in keys},
                         "profile_launches": launches, "profile_launch_cpu_ms": launch_cpu,
                         "profile_kernel_ms": kernel_ms, "profile_sync_like_calls": syncs}
            print(f"{shape:14s} {name:30s} wall {res[name]['wall_ms_median']:7.2f} ms  kernels {kernel_ms:6.2f} ms  "
                  f"launches {launches:4d} ({launch_cpu:5.2f} ms cpu)  syncs {syncs}", flush=True)
            print("    stages", {k: round(v, 2) for k, v in res[name]["stages_median"].items()}, flush=True)
        out[shape] = res
        torch.cuda.empty_cache()
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
