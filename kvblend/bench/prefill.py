"""`kvblend bench prefill`: TTFT of full / reuse / blend, three ways, side by side in one run.

  (a) prefill     kvblend's `prefill` alone, cached chunks resident on the compute device: full, reuse, blend at
                  each --ratios; on CUDA also blend@0.15 with the chunks in pinned host memory (the layer-wise
                  pipelined load), blend@0.15 / reuse with CUDA graphs off (the plain layer loop, for the before /
                  after), and a synchronised placement of the pinned chunks (host->device rate);
  (b) end to end  `Engine.answer` (first token sampled; TTFT as kvblend/clock.py defines it) with every chunk
                  staged on one tier before the clock: gpu, cpu (pinned on CUDA), disk_warm (files in the page
                  cache), disk_cold (files evicted from the page cache with posix_fadvise(DONTNEED) before each
                  call: a real read from the device); plus TTFT of blend vs the number of chunks per tier;
  (c) transformers' own forward of the same prompt ids (use_cache=True; logits_to_keep=1 where supported).
Cases run round-robin (one call of each per round), --warmup rounds uncounted, the device synchronised
around each call; median / p10 / p90 over --iters. One blend prefill is also split into stages (CUDA events).

Shapes: random-weight llama3-8b, qwen2.5-1.5b, smollm2-135m (real shapes; timing does not depend on weights),
tiny (tests); --real smollm2: the real SmolLM2-135M-Instruct weights and a musique_s demo prompt (5 passages).

Writes --out (default results/bench/prefill.json: git sha, device, versions, measured ceilings, every timing)
and, with --summary, the P* keys it measured into docs/results/bench/summary.json. --from-json FILE recomputes
the summary entries, tables and --plot figures from a JSON already measured (e.g. the H200 run,
docs/results/bench/prefill_h200.json), so the docs regenerate with one command.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from kvblend.bench.harness import mean_device_ms, percentile, results_header, round_robin, summarise, sync, utc_now
from kvblend.io import atomic_write_json
from kvblend.model.shape import PRESETS

log = logging.getLogger(__name__)

DEFAULT_OUT = "results/bench/prefill.json"
PLOT_DIR = "docs/results/bench"
# (model_type, config kwargs) of random-weight models of real shapes: the one shape type (kvblend/model/shape.py)
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    **{name: (PRESETS[preset].model_type, PRESETS[preset].hf_config())
       for name, preset in (("llama3-8b", "llama-3-8b"), ("llama3.1-8b", "llama-3.1-8b"),
                            ("qwen2.5-1.5b", "qwen2.5-1.5b"), ("smollm2-135m", "smollm2-135m"))},
    "tiny": ("llama", dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=256, max_position_embeddings=2048)),
}
TIERS = ("gpu", "cpu", "disk_warm", "disk_cold")
TARGETS = {  # key: (target, better, what); each measured only by the run its definition asks for
    "P1_8b_7k_plain_speedup": (5.5, "higher", "llama3-8b shape, 14 x 512 chunks GPU-resident, Engine.answer TTFT: "
                                              "full / plain CacheBlend blend@0.15"),
    "P1_8b_7k_default_speedup": (5.0, "higher", "same, the EngineConfig default variant"),
    "P1_8b_3k_default_speedup": (4.0, "higher", "llama3-8b shape, 6 x 512, default variant, e2e"),
    "P1_8b_32k_default_speedup": (4.5, "higher", "llama3.1-8b shape, 64 x 512, default variant, e2e"),
    "P1b_1p5b_7k_default_speedup": (4.0, "higher", "qwen2.5-1.5b shape, 14 x 512, default variant, e2e"),
    "P1c_smollm2_vs_hf": (4.0, "higher", "real SmolLM2, 10 musique_s passages: transformers forward / default "
                                         "blend e2e TTFT"),
    "P1d_full_vs_hf": (0.9, "lower", "kvblend full prefill / transformers forward, worse of the llama3-8b shape at "
                                     "14 x 512 and real SmolLM2"),
    "P0_baseline_consistency": (1.05, "lower", "e2e full / prefill-alone full, worst case of the run"),
    "P2_pinned_vs_gpu": (1.1, "lower", "llama3-8b shape 14 x 512 blend@0.15 prefill: chunks in pinned host memory "
                                       "/ on GPU"),
    "P2b_disk_vs_gpu": (1.5, "lower", "real SmolLM2, Engine.answer TTFT blend@0.15: chunks on disk (warm page "
                                      "cache) / on the GPU tier"),
    "P3_h2d_fraction": (0.85, "higher", "pinned chunk placement (copy + re-rotation, bytes / time) / the card's "
                                        "measured pinned host->device bandwidth"),
    "P6_cpu_speedup": (3.0, "higher", "CPU, real SmolLM2 fp32, Engine.answer TTFT on the demo prompt: "
                                      "full / blend@0.15"),
}
RETIRED = ("P1_8b_blend_speedup", "P1b_1p5b_blend_speedup", "P1c_smollm2_e2e_speedup")  # issue 8's keys
# (key, results label, chunks per prompt, e2e case) of the e2e speedups over full
E2E_SPEEDUPS = (("P1_8b_7k_plain_speedup", "llama3-8b", 14, "blend@gpu"),
                ("P1_8b_7k_default_speedup", "llama3-8b", 14, "blend_default_variant@gpu"),
                ("P1_8b_3k_default_speedup", "llama3-8b", 6, "blend_default_variant@gpu"),
                ("P1_8b_32k_default_speedup", "llama3.1-8b", 64, "blend_default_variant@gpu"),
                ("P1b_1p5b_7k_default_speedup", "qwen2.5-1.5b", 14, "blend_default_variant@gpu"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true",
                   help="short run: one small shape, 3 x 128-token chunks, blend@0.15 only, 3 timed rounds (2 end to "
                        "end, 1 for 2 chunks per tier)")
    p.add_argument("--shapes", default=None,
                   help=f"comma list of {', '.join(SHAPES)} or none (default: cuda llama3-8b,qwen2.5-1.5b,"
                        f"smollm2-135m; cpu smollm2-135m)")
    p.add_argument("--real", choices=("smollm2",), default=None, help="also the real SmolLM2 weights, demo prompt")
    p.add_argument("--real-passages", type=int, default=5,
                   help="musique_s passages of the real-weights prompt (default 5; 10 for P1c_smollm2_vs_hf)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="uncounted rounds (default 3; --quick 1)")
    p.add_argument("--chunks", type=int, default=None, help="chunks per prompt (default 6; --quick 3)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk (default 512; --quick 128)")
    p.add_argument("--prefix-tokens", type=int, default=32)
    p.add_argument("--query-tokens", type=int, default=64)
    p.add_argument("--ratios", default=None, help="blend ratios (default 0.05,0.15,0.3; --quick 0.15)")
    p.add_argument("--tiers", default=",".join(TIERS), help=f"end-to-end tiers ({', '.join(TIERS)})")
    p.add_argument("--chunk-counts", default=None,
                   help="chunks per prompt for TTFT vs number of chunks (256-token chunks; default 2,4,8,16; "
                        "--quick 2; empty: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="CUDA: torch.profiler of one blend prefill (graphs / plain)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    p.add_argument("--summary", nargs="?", const="docs/results/bench/summary.json", default=None,
                   help="write the P* entries this run measured into this summary (default path when no value)")
    p.add_argument("--source", default=None,
                   help="the path summary entries cite as their source (default: --out, or --from-json)")
    p.add_argument("--from-json", default=None,
                   help="no measuring: summary entries, tables, plots from this JSON (comma list: merged, same device)")
    p.add_argument("--merged-out", default=None, help="with --from-json: write the (merged) document here")
    p.add_argument("--plot", nargs="?", const=PLOT_DIR, default=None,
                   help=f"write the PNG figures to this folder (default {PLOT_DIR} when no value)")


# ----------------------------------------------------------------------------------------------- helpers
def _fail(msg: str) -> int:
    print(f"kvblend bench prefill: {msg}", file=sys.stderr)
    return 1


def env_info(device, header: dict[str, Any]) -> dict[str, Any]:
    """The run's machine: versions from the results header, CPU, threads; on CUDA the card and its ceilings."""
    import torch

    info: dict[str, Any] = {**{k: header[k] for k in ("python", "torch", "transformers")},
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_sms=p.multi_processor_count,
                    gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
        info["measured_ceilings"] = measure_ceilings(device)
    return info


def measure_ceilings(device) -> dict[str, float]:
    """The card's bf16 matmul rate and pinned host->device bandwidth, measured (events, 10 reps)."""
    import torch

    def timed(fn) -> float:  # seconds per call
        return mean_device_ms(fn, device, reps=10, warmup=3) / 1e3

    n = 8192
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = {"bf16_matmul_tflops": 2 * n**3 / timed(lambda: x @ x) / 1e12}
    del x
    dst = torch.empty(2**30, dtype=torch.uint8, device=device)
    host = torch.empty(2**30, dtype=torch.uint8).pin_memory()
    out["h2d_pinned_gbs"] = host.numel() / timed(lambda: dst.copy_(host, non_blocking=True)) / 1e9
    del dst, host
    torch.cuda.empty_cache()
    return out




def random_prompt(vocab: int, prefix: int, chunks: int, chunk_tokens: int, query: int, seed: int):
    import torch

    from kvblend.types import PromptIds

    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(0, vocab, (n,), generator=g).tolist())

    return PromptIds(ids(prefix), tuple(ids(chunk_tokens) for _ in range(chunks)), ids(query))


def evict_from_page_cache(paths) -> int:
    """Drop the files' pages from the page cache (clean pages; the store fsyncs its writes). Returns files done."""
    done = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            done += 1
        finally:
            os.close(fd)
    return done


# ------------------------------------------------------------------------------------------- measuring
def build_random(shape: str, device, dtype, seed: int):
    import torch

    from kvblend.model.hf import random_model

    model_type, kw = SHAPES[shape]
    with torch.device(device):
        model = random_model(dict(kw), model_type=model_type, seed=seed, dtype=dtype, name=shape)
    if model.device.type != device.type:
        model.hf_model.to(device)
        model.inv_freq = model.inv_freq.to(device)
    return model


def real_prompt(engine, num_chunks: int = 5):
    """The demo workload: musique_s sample 0, its first `num_chunks` passages as chunks."""
    from kvblend.data.datasets import load_dataset

    data = load_dataset("musique_s", limit=1)
    sample = data.samples[0]
    texts = [data.template.format_passage(p) for p in sample.passages[:num_chunks]]
    return engine.prompt(data.template.prefix, texts, data.template.format_query(sample.question)), texts


EVERY_CHUNK = 1 << 20  # gpu_chunks of the end-to-end engines: every chunk resident, as the blend timed here


def measure(model, prompt, texts, args, device, label: str, home: Path, real: bool) -> dict[str, Any]:
    """Every timing of one model and prompt: (a) prefill alone with its checks and stages, (b) end to end,
    the chunk-count sweep (random-weight shapes only)."""
    from kvblend.kvstore.builder import build_chunk_kv

    s = model.shape
    res: dict[str, Any] = {"label": label, "real_weights": real, "num_tokens": prompt.num_tokens,
                           "num_chunks": len(prompt.chunk_ids), "num_chunk_tokens": sum(map(len, prompt.chunk_ids)),
                           "model_shape": {k: getattr(s, k) for k in s.__slots__}, "errors": {}}
    r0 = 0.15 if 0.15 in args.ratios else args.ratios[0]
    res["blend_ratio_for_targets"] = r0
    chunks = [build_chunk_kv(model, ids) for ids in prompt.chunk_ids]
    sync(device)
    res["chunk_kv_mib"] = sum(c.nbytes for c in chunks) / 2**20
    cases, pinned, hf_forward = _prefill_cases(model, prompt, chunks, args.ratios, r0, device)
    res["checks"] = _prefill_checks(model, prompt, chunks, pinned, r0, hf_forward)
    times = round_robin(cases, args.warmup, args.iters, device)
    res["prefill"] = {k: summarise(v) for k, v in times.items()}
    for k, m in res["prefill"].items():
        if k.startswith("place_"):
            m["gbs"] = res["chunk_kv_mib"] * 2**20 / (m["median_ms"] / 1e3) / 1e9
    if args.profile and device.type == "cuda":
        res["profile"] = {name: profile_case(cases[name], device)
                          for name in (f"blend@{r0:g}", f"blend@{r0:g}_no_graphs")}
    res["stages_blend"] = _blend_stages(model, prompt, chunks, r0, args)
    answer_on, e2e_cases, warm = _e2e_cases(model, prompt, texts, args, home, label, r0)
    try:
        warm()
        res["e2e"] = {k: summarise(v) for k, v in round_robin(
            e2e_cases, min(args.warmup, 2), 2 if args.quick else max(3, args.iters // 2), device, _ttft).items()}
    except Exception as exc:  # noqa: BLE001 (recorded in the JSON, the rest of the run goes on)
        log.exception("end-to-end cases failed")
        res["errors"]["e2e"], res["e2e"] = f"{type(exc).__name__}: {exc}", {}
    if res["e2e"].get("full"):  # the e2e baseline must be the prefill-alone one plus the request's overhead
        ratio = res["e2e"]["full"]["median_ms"] / res["prefill"]["full"]["median_ms"]
        res["checks"]["e2e_full_vs_prefill_full"] = ratio
        if ratio > 1.05:
            log.warning("%s: end-to-end full is %.2fx the prefill-alone full (> 1.05)", label, ratio)
    res["chunks_sweep"] = _chunk_sweep(model, answer_on, args, device, res["errors"]) \
        if args.chunk_counts and model.tokenizer is None else {}
    return res


def _plain():
    from kvblend.config import SelectionPolicy

    return SelectionPolicy("k")


def _prefill_cases(model, prompt, chunks, ratios, r0: float, device):
    """(cases, pinned chunks or None, hf_forward): the prefill-alone cases, timed round robin. blend@r rows time
    plain CacheBlend (K deviation at check layer 1); *_default_selection rows the engine's default variant."""
    from dataclasses import replace

    import torch

    from kvblend.config import DEFAULT_SELECTION
    from kvblend.fusion.blend import prefill
    from kvblend.model.runner import ModelRunner, runner_of

    ids = torch.tensor(prompt.flat(), dtype=torch.long, device=device)
    fwd_params = __import__("inspect").signature(model.hf_model.forward).parameters
    hf_kwargs = {"use_cache": True, **({"logits_to_keep": 1} if "logits_to_keep" in fwd_params else {})}

    def hf_forward():
        with torch.inference_mode():
            return model.hf_model(input_ids=ids[None], **hf_kwargs).logits

    plain, runner = _plain(), runner_of(model)
    cases: dict[str, Callable[[], Any]] = {"hf_forward": hf_forward,
                                           "full": lambda: runner.full_prefill(prompt),
                                           "full_plain_loop": lambda: runner.full_prefill(prompt, static=False),
                                           "reuse": lambda: prefill(model, prompt, chunks, mode="reuse")}
    for r in ratios:
        cases[f"blend@{r:g}"] = (lambda r=r: prefill(model, prompt, chunks, mode="blend", ratio=r, selection=plain))
    if device.type != "cuda":
        return cases, None, hf_forward
    b = f"blend@{r0:g}"
    eager_front = ModelRunner(model, replace(runner.runtime, front_graph=False))  # same model, eager front
    for name, target, policy, recompute in (
            (b + "_no_graphs", model, plain, "plain"), (b + "_eager_front", eager_front, plain, None),
            (b + "_default_selection", model, DEFAULT_SELECTION, None),
            (b + "_default_selection_eager_front", eager_front, DEFAULT_SELECTION, None)):
        cases[name] = (lambda t=target, pol=policy, rc=recompute: prefill(
            t, prompt, chunks, mode="blend", ratio=r0, selection=pol, **({"recompute": rc} if rc else {})))
    cases["reuse_no_graphs"] = lambda: prefill(model, prompt, chunks, mode="reuse", recompute="plain")
    pinned = [c.to("cpu", pin=True) for c in chunks]
    sync(device)
    cases[b + "_pinned"] = lambda: prefill(model, prompt, pinned, mode="blend", ratio=r0, selection=plain)
    cases.update(_placement_cases(model, prompt, chunks, pinned))
    return cases, pinned, hf_forward


def _placement_cases(model, prompt, chunks, pinned) -> dict[str, Callable[[], Any]]:
    """Chunk placement alone (copy + re-rotation into a request's KV), from pinned host memory and from GPU."""
    from kvblend.fusion.placement import place_chunks
    from kvblend.model.kv import allocate_state

    starts, st = [], len(prompt.prefix_ids)
    for c in pinned:
        starts.append((c, st))
        st += c.num_tokens
    place_state = allocate_state(model, prompt.num_tokens)
    gpu_starts = [(c, b) for c, (_, b) in zip(chunks, starts)]
    return {"place_pinned": lambda: place_chunks(place_state, starts, model),
            "place_gpu": lambda: place_chunks(place_state, gpu_starts, model)}


def _prefill_checks(model, prompt, chunks, pinned, r0: float, hf_forward) -> dict[str, Any]:
    """Correctness on this device, before timing: graph path vs plain path, pinned vs resident, full vs hf."""
    import torch

    from kvblend.fusion.blend import prefill
    from kvblend.model.runner import runner_of

    plain = _plain()
    with torch.inference_mode():
        ref = prefill(model, prompt, chunks, mode="blend", ratio=r0, selection=plain, recompute="plain")
        got = prefill(model, prompt, chunks, mode="blend", ratio=r0, selection=plain)
        checks = {"blend_auto_vs_plain_max_abs_logit_diff": (got.logits - ref.logits).abs().max().item(),
                  "blend_auto_vs_plain_same_selection": got.stats.selected_positions == ref.stats.selected_positions,
                  "logit_scale_max_abs": ref.logits.abs().max().item()}
        if pinned is not None:
            pin_out = prefill(model, prompt, pinned, mode="blend", ratio=r0, selection=plain)
            checks["blend_pinned_vs_resident_max_abs_logit_diff"] = (pin_out.logits - got.logits).abs().max().item()
        full = runner_of(model).full_prefill(prompt)
        hf_last = hf_forward()[0, -1].float()
        checks["full_vs_hf_max_abs_logit_diff"] = (full.logits - hf_last).abs().max().item()
        checks["full_vs_hf_same_argmax"] = int(full.logits.argmax()) == int(hf_last.argmax())
    checks["graph_capture_failed"] = runner_of(model).graphs.failed
    return checks


def _blend_stages(model, prompt, chunks, r0: float, args) -> dict[str, Any]:
    """One blend prefill split into stages (medians over --iters, after --warmup)."""
    from kvblend.fusion.blend import prefill

    runs: list[dict] = []
    for i in range(args.warmup + args.iters):
        t: dict = {}
        prefill(model, prompt, chunks, mode="blend", ratio=r0, selection=_plain(), timings=t)
        if i >= args.warmup:
            runs.append(t)
    out: dict[str, Any] = {k: percentile([r[k] for r in runs], 50) for k in runs[0] if isinstance(runs[0][k], float)}
    out["recompute_path"] = runs[0].get("recompute_path")
    return out


def _ttft(out, _wall) -> float:
    return out.ttft_ms


def _e2e_engine(model, home: Path, r0: float, plain: bool):
    """An engine over `model` with every chunk GPU-resident; plain: plain CacheBlend selection (the blend@r
    rows), else the engine's default variant (what a user gets without flags)."""
    from kvblend.config import EngineConfig
    from kvblend.engine import Engine
    from kvblend.model.runner import runner_of

    runtime = runner_of(model).runtime
    extra = dict(chunk_sink="none" if model.tokenizer is None else "auto", score_on="k", select_layers=1,
                 select_first_tokens=0, check_layer=1) if plain else {}
    config = EngineConfig(home=str(home), gpu_budget="64GiB", cpu_budget="64GiB", disk_budget="200GiB",
                          mode="blend", ratio=r0, max_new_tokens=1, stop_on_newline=False, gpu_chunks=EVERY_CHUNK,
                          **{f: getattr(runtime, f) for f in ("cuda_graphs", "front_graph", "attention",
                                                              "flex_compile")}, **extra)
    return Engine(config, model=model)


def _e2e_cases(model, prompt, texts, args, home: Path, label: str, r0: float):
    """(answer_on, cases, warm_up): `Engine.answer` with every chunk staged on one tier before the clock."""
    from kvblend.generation.sampling import SamplingParams

    engine = _e2e_engine(model, home / label, r0, plain=True)
    default_engine = _e2e_engine(model, home / f"{label}-default", r0, plain=False)
    sampling = SamplingParams(max_new_tokens=1, stop_on_newline=False)

    def answer_on(p, ts, tier: str, mode: str, eng=engine) -> Callable[[], Any]:
        def run():
            if mode == "full":
                return eng.answer(p, ts, mode="full", sampling=sampling)
            eng.stage(p, ts, "disk" if tier.startswith("disk") else tier)
            if tier == "disk_cold":
                keys = [eng.chunk_key(c, p.prefix_ids) for c in p.chunk_ids]
                evict_from_page_cache([eng.store.disk.paths(k.digest)[0] for k in keys])
            return eng.answer(p, ts, mode=mode, ratio=r0 if mode == "blend" else None, sampling=sampling)
        return run

    cases = {"full": answer_on(prompt, texts, "gpu", "full")}
    for tier in args.tiers:
        for mode in ("reuse", "blend"):
            cases[f"{mode}@{tier}"] = answer_on(prompt, texts, tier, mode)
    cases["blend_default_variant@gpu"] = answer_on(prompt, texts, "gpu", "blend", eng=default_engine)

    def warm() -> None:
        engine.warm_up(prompt, texts)
        default_engine.warm_up(prompt, texts)
    return answer_on, cases, warm


def _chunk_sweep(model, answer_on, args, device, errors: dict) -> dict[str, Any]:
    """TTFT vs number of chunks per tier (256-token random chunks; blend at the target ratio)."""
    s, sweep = model.shape, {}
    for count in args.chunk_counts:
        p = random_prompt(s.vocab_size, args.prefix_tokens, count, 256, args.query_tokens, args.seed + count)
        if p.num_tokens + 2 > s.max_position_embeddings:
            continue
        sc = {"full": answer_on(p, None, "gpu", "full")}
        for tier in args.tiers:
            sc[f"blend@{tier}"] = answer_on(p, None, tier, "blend")
        try:
            got = round_robin(sc, 0 if args.quick else 1, 1 if args.quick else max(2, args.iters // 3), device, _ttft)
            sweep[str(count)] = {k: summarise(v) for k, v in got.items()}
        except Exception as exc:  # noqa: BLE001
            log.exception("chunk sweep failed")
            errors[f"sweep_{count}"] = f"{type(exc).__name__}: {exc}"
    return sweep


def profile_case(fn: Callable[[], Any], device, reps: int = 3, top: int = 15) -> dict[str, Any]:
    """torch.profiler over `reps` calls: device time per call and the top ops / kernels by self device time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync(device)
    rows = []
    for e in prof.key_averages():
        self_us = getattr(e, "self_device_time_total", None)
        if self_us is None:
            self_us = getattr(e, "self_cuda_time_total", 0.0)
        if self_us > 0:
            rows.append({"op": e.key[:120], "calls_per_iter": e.count / reps, "self_device_ms_per_iter": self_us / reps / 1e3})
    rows.sort(key=lambda r: -r["self_device_ms_per_iter"])
    kernels = [r for r in rows if not r["op"].startswith("aten::")]
    return {"device_ms_per_iter": sum(r["self_device_ms_per_iter"] for r in kernels), "top": rows[:top]}


# ---------------------------------------------------------------------------------------- summary + docs
def _med(d: dict, *path) -> float | None:
    for p in path:
        d = d.get(p) if isinstance(d, dict) else None
        if d is None:
            return None
    return d.get("median_ms") if isinstance(d, dict) else None


def summary_entries(doc: dict, source: str) -> dict[str, dict]:
    """The targets this results document measured (each only under the conditions its definition asks)."""
    from kvblend.bench.summary import entry

    device = doc.get("device", "")
    dev_label = doc.get("env", {}).get("gpu") or doc.get("env", {}).get("cpu") or device
    rows = [r for r in doc.get("results", []) if "prefill" in r]
    out: dict[str, dict] = {}

    def put(key: str, measured: float | None, **extra):
        if measured is None or not math.isfinite(measured):
            return
        target, better, what = TARGETS[key]
        out[key] = entry(measured, target, better, source, device=dev_label, what=what, **extra)

    def find(label: str, chunks: int | None = None) -> dict | None:
        return next((r for r in rows if r["label"] == label and chunks in (None, r["num_chunks"])), None)

    consistency = {f"{r['label']} x{r['num_chunks']}": _med(r, "e2e", "full") / _med(r, "prefill", "full")
                   for r in rows if _med(r, "e2e", "full")}
    if consistency:
        put("P0_baseline_consistency", max(consistency.values()), per_run=consistency)
    if device == "cuda" and doc.get("dtype") == "bfloat16":
        _cuda_entries(put, find, doc.get("env", {}).get("measured_ceilings", {}).get("h2d_pinned_gbs"))
    real = find("smollm2-real")
    if device == "cpu" and doc.get("dtype") == "float32" and real and real.get("e2e"):
        full, blend = _med(real, "e2e", "full"), _med(real, "e2e", "blend@gpu")
        if full and blend:
            put("P6_cpu_speedup", full / blend, full_ttft_ms=full, blend_ttft_ms=blend,
                torch_threads=doc.get("env", {}).get("torch_threads"))
    return out


def _cuda_entries(put, find, ceil: float | None) -> None:
    for key, label, chunks, case in E2E_SPEEDUPS:
        r = find(label, chunks)
        if r and _med(r, "e2e", case):
            put(key, _med(r, "e2e", "full") / _med(r, "e2e", case), full_ttft_ms=_med(r, "e2e", "full"),
                blend_ttft_ms=_med(r, "e2e", case), prefill_full_ms=_med(r, "prefill", "full"),
                hf_forward_ms=_med(r, "prefill", "hf_forward"))
    real = find("smollm2-real")
    if real and real.get("e2e") and real["num_chunks"] == 10:
        blend = _med(real, "e2e", "blend_default_variant@gpu")
        if blend:
            put("P1c_smollm2_vs_hf", _med(real, "prefill", "hf_forward") / blend, default_ttft_ms=blend,
                hf_forward_ms=_med(real, "prefill", "hf_forward"))
    if real and real.get("e2e") and _med(real, "e2e", "blend@disk_warm"):
        warm, blend = _med(real, "e2e", "blend@disk_warm"), _med(real, "e2e", "blend@gpu")
        put("P2b_disk_vs_gpu", warm / blend, disk_warm_ttft_ms=warm, gpu_ttft_ms=blend)
    ratios = {f"{r['label']} x{r['num_chunks']}": _med(r, "prefill", "full") / _med(r, "prefill", "hf_forward")
              for r in (find("llama3-8b", 14), real) if r}
    if ratios:
        put("P1d_full_vs_hf", max(ratios.values()), per_model=ratios)
    r = find("llama3-8b", 14)
    if r:
        b = f"blend@{r['blend_ratio_for_targets']:g}"
        pin = _med(r, "prefill", b + "_pinned")
        if pin:
            put("P2_pinned_vs_gpu", pin / _med(r, "prefill", b), pinned_ms=pin, gpu_ms=_med(r, "prefill", b))
        place = r["prefill"].get("place_pinned")
        if ceil and place:
            put("P3_h2d_fraction", place["gbs"] / ceil, placed_gbs=place["gbs"], card_pinned_gbs=ceil,
                chunk_kv_mib=r["chunk_kv_mib"])


def tables(doc: dict) -> str:
    lines = [f"device: {doc.get('env', {}).get('gpu') or doc.get('env', {}).get('cpu')} ({doc.get('device')}, "
             f"{doc.get('dtype')}), torch {doc.get('env', {}).get('torch')}, transformers "
             f"{doc.get('env', {}).get('transformers')}, git {doc.get('git_sha')}"]
    ceil = doc.get("env", {}).get("measured_ceilings")
    if ceil:
        lines.append(f"measured: bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s, pinned host->device "
                     f"{ceil['h2d_pinned_gbs']:.1f} GB/s")
    for r in doc.get("results", []):
        if "prefill" not in r:
            lines.append(f"\n{r.get('label')}: failed: {r.get('fatal', '')[-300:]}")
            continue
        full = r["prefill"]["full"]["median_ms"]
        lines.append(f"\n### {r['label']}: {r['num_tokens']} tokens ({r['num_chunks']} chunks, "
                     f"{r['num_chunk_tokens']} chunk tokens, {r['chunk_kv_mib']:.0f} MiB of chunk KV)\n")
        lines.append("(a) prefill alone, chunks resident\n")
        lines.append("| case | median ms | p10 | p90 | full / case |")
        lines.append("|---|---:|---:|---:|---:|")
        for k, m in r["prefill"].items():
            extra = f" ({m['gbs']:.1f} GB/s)" if "gbs" in m else ""
            speedup = "" if k.startswith("place") else f"{full / m['median_ms']:.2f}"
            lines.append(f"| {k}{extra} | {m['median_ms']:.2f} | {m['p10_ms']:.2f} | {m['p90_ms']:.2f} | {speedup} |")
        if r.get("e2e"):
            e_full = r["e2e"].get("full", {}).get("median_ms")
            lines.append("\n(b) end to end, `Engine.answer` TTFT, chunks staged on each tier\n")
            lines.append("| case | median ms | p10 | p90 | full / case |")
            lines.append("|---|---:|---:|---:|---:|")
            for k, m in r["e2e"].items():
                lines.append(f"| {k} | {m['median_ms']:.2f} | {m['p10_ms']:.2f} | {m['p90_ms']:.2f} | "
                             f"{e_full / m['median_ms']:.2f} |")
        st = r.get("stages_blend")
        if st:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in st.items() if isinstance(v, float))
            lines.append(f"\nstages of one blend@{r['blend_ratio_for_targets']:g} prefill (ms, "
                         f"{st.get('recompute_path')}): {parts}")
        for name, pr in r.get("profile", {}).items():
            lines.append(f"\nprofile {name}: device busy {pr['device_ms_per_iter']:.2f} ms per prefill; top by self "
                         f"device time: " + "; ".join(f"{x['op'][:60]} {x['self_device_ms_per_iter']:.2f} ms "
                                                      f"({x['calls_per_iter']:.0f}x)" for x in pr["top"][:10]))
        lines.append(f"\nchecks: {json.dumps(r.get('checks', {}))}")
        if r.get("errors"):
            lines.append(f"errors: {json.dumps(r['errors'])}")
    return "\n".join(lines)


def plot(doc: dict, folder: Path, tag: str) -> list[Path]:
    """The PNG figures of a results document: TTFT vs ratio, TTFT vs number of chunks, blend stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    results = [r for r in doc.get("results", []) if "prefill" in r]
    made: list[Path] = []
    for name, draw, rows in (("prefill_ttft_vs_ratio", _plot_ratio, results),
                             ("prefill_ttft_vs_chunks", _plot_chunks, [r for r in results if r.get("chunks_sweep")]),
                             ("prefill_stages", _plot_stages, results)):
        if not rows:
            continue
        fig = draw(plt, rows)
        fig.tight_layout()
        made.append(folder / f"{name}_{tag}.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


def _plot_ratio(plt, results: list[dict]):
    """TTFT vs ratio (prefill alone), one panel per model."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        pts = sorted((float(k.split("@")[1]), m["median_ms"]) for k, m in r["prefill"].items()
                     if k.startswith("blend@") and k.split("@")[1].replace(".", "").isdigit())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="blend")
        for k, style in (("full", "--"), ("reuse", ":"), ("hf_forward", "-.")):
            if k in r["prefill"]:
                ax.axhline(r["prefill"][k]["median_ms"], ls=style, color="gray", label=k)
        ax.set_title(r["label"], fontsize=9)
        ax.set_xlabel("blend ratio")
        ax.set_ylabel("prefill ms (median)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    return fig


def _plot_chunks(plt, results: list[dict]):
    """TTFT vs number of chunks, per tier, one panel per model."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        counts = sorted(int(c) for c in r["chunks_sweep"])
        for name in r["chunks_sweep"][str(counts[0])]:
            ax.plot(counts, [r["chunks_sweep"][str(c)][name]["median_ms"] for c in counts], "o-", label=name)
        ax.set_title(f"{r['label']}: Engine.answer TTFT", fontsize=9)
        ax.set_xlabel("chunks (256 tokens each)")
        ax.set_ylabel("TTFT ms (median)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    return fig


def _plot_stages(plt, results: list[dict]):
    """Stacked stages of one blend prefill per model, beside the (overlapped) chunk placement."""
    fig, ax = plt.subplots(figsize=(4.4 + 1.4 * len(results), 3.8))
    bottoms = [0.0] * len(results)
    for stage in ("place", "layers_before_check", "check_and_select", "recompute_layers", "lm_head", "copy_out"):
        vals = [float(r.get("stages_blend", {}).get(stage, 0.0)) for r in results]
        ax.bar(range(len(results)), vals, bottom=bottoms, label=stage)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    place = [float(r.get("stages_blend", {}).get("place_done", 0.0)) for r in results]
    ax.bar([i + 0.5 for i in range(len(results))], place, width=0.2, color="lightgray", hatch="//",
           label="chunk placement (side stream, overlaps\nthe layers below the check layer)")
    ax.set_xticks(range(len(results)), [r["label"] for r in results], fontsize=7, rotation=15)
    ax.set_ylabel("ms (median, device events)")
    ax.set_title("one blend prefill, by stage", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _finish(doc: dict, args, source: str) -> int:
    print(tables(doc))
    if args.summary:
        from kvblend.bench.summary import update_summary

        entries = summary_entries(doc, source)
        if entries:
            update_summary(args.summary, entries, retire=RETIRED)
        for k, e in entries.items():
            print(f"{k}: {e['measured']:.3f} (target {e['better']} {e['target']}; {'met' if e['met'] else 'missed'})")
        if not entries:
            print("no summary target is measured by this run's device / dtype / models")
    if args.plot:
        tag = "h200" if "H200" in str(doc.get("env", {}).get("gpu", "")) else doc.get("device", "run")
        for p in plot(doc, Path(args.plot), tag):
            print(f"wrote {p}")
    return 0


# ------------------------------------------------------------------------------------------------- main
def _from_json(args: argparse.Namespace) -> int:
    """--from-json: summary entries, tables and plots of results already measured (several files: merged)."""
    docs = []
    for path in [x for x in args.from_json.split(",") if x]:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return _fail(f"{path}: cannot be read as JSON ({exc})")
        if not isinstance(d, dict) or "results" not in d:
            return _fail(f"{path}: not a `kvblend bench prefill` results file")
        docs.append(d)
    doc = docs[0]
    if len(docs) > 1:  # runs of one device (e.g. random shapes, then the real weights) as one document
        if len({(d.get("device"), d.get("dtype"), d.get("env", {}).get("gpu")) for d in docs}) != 1:
            return _fail("--from-json files come from different devices or dtypes; pass one at a time")
        doc = dict(docs[0], results=[r for d in docs for r in d["results"]],
                   merged_from=[{"argv": d.get("argv"), "git_sha": d.get("git_sha"),
                                 "started_utc": d.get("started_utc")} for d in docs])
    if args.merged_out:
        atomic_write_json(Path(args.merged_out), doc)
        print(f"wrote {args.merged_out}")
    source = args.source or args.merged_out or args.from_json
    return _finish(doc, args, source)


def _check_args(args: argparse.Namespace) -> str | None:
    """Parse the comma lists and fill in the (--quick) defaults, in args; what is wrong with them, else None."""
    try:
        ratios = args.ratios if args.ratios is not None else ("0.15" if args.quick else "0.05,0.15,0.3")
        args.ratios = [float(x) for x in ratios.split(",") if x]
        counts = args.chunk_counts if args.chunk_counts is not None else ("2" if args.quick else "2,4,8,16")
        args.chunk_counts = [int(x) for x in counts.split(",") if x]
    except ValueError:
        return "--ratios and --chunk-counts take comma-separated numbers"
    if not args.ratios or any(not 0 <= r <= 1 for r in args.ratios):
        return "--ratios must be numbers in [0, 1]"
    args.tiers = [t for t in args.tiers.split(",") if t]
    bad = [t for t in args.tiers if t not in TIERS]
    if bad:
        return f"unknown tier(s) {', '.join(bad)}; use {', '.join(TIERS)}"
    args.iters = args.iters or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.iters < 1 or args.warmup < 0:
        return "--iters must be >= 1 and --warmup >= 0"
    args.chunks = args.chunks or (3 if args.quick else 6)
    args.chunk_tokens = args.chunk_tokens or (128 if args.quick else 512)
    return None


def _model_and_prompt(label: str, real: bool, device, dtype, args, tmp: str):
    """(model, prompt ids, chunk texts or None): the real SmolLM2 on the demo prompt, or a random shape."""
    if not real:
        model = build_random(label, device, dtype, args.seed)
        return model, random_prompt(model.shape.vocab_size, args.prefix_tokens, args.chunks, args.chunk_tokens,
                                    args.query_tokens, args.seed), None
    from kvblend.config import EngineConfig
    from kvblend.engine import Engine
    from kvblend.model.registry import load_model

    model = load_model("smollm2-135m-instruct", str(dtype).removeprefix("torch."), device.type)
    probe = Engine(EngineConfig(home=str(Path(tmp) / "probe"), device=device.type), model=model)
    prompt, texts = real_prompt(probe, args.real_passages)
    return model, prompt, texts


def _measure_all(doc: dict, todo: list[tuple[str, bool]], device, dtype, args, out: Path, runtime) -> None:
    """measure() every (label, real weights) in turn into doc["results"], writing `out` after each; each
    model runs with the runtime settings (RuntimeOptions) of load_config."""
    import torch
    from tqdm import tqdm

    from kvblend.model.runner import attach_runner

    with tempfile.TemporaryDirectory(prefix="kvblend-bench-") as tmp:
        for label, real in tqdm(todo, desc="bench prefill", unit="model", disable=len(todo) < 2):
            t0 = time.perf_counter()
            try:
                model, prompt, texts = _model_and_prompt(label, real, device, dtype, args, tmp)
                attach_runner(model, runtime)  # KVBLEND_CUDA_GRAPHS / _FRONT_GRAPH / _ATTENTION, via load_config
                res = measure(model, prompt, texts, args, device, label, Path(tmp), real)
            except Exception as exc:  # noqa: BLE001 (one model failing keeps what the others measured)
                import traceback

                log.error("%s failed: %s", label, exc)
                res = {"label": label, "fatal": traceback.format_exc()}
            res["wall_s"] = time.perf_counter() - t0
            doc["results"].append(res)
            atomic_write_json(out, doc)
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        return _from_json(args)
    problem = _check_args(args)
    if problem:
        return _fail(problem)
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda, but torch sees no CUDA device")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype_name]
    default_shapes = "smollm2-135m" if device.type == "cpu" or args.quick else "llama3-8b,qwen2.5-1.5b,smollm2-135m"
    shapes = [x for x in (args.shapes or default_shapes).split(",") if x and x != "none"]
    unknown = [x for x in shapes if x not in SHAPES]
    if unknown:
        return _fail(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")

    from kvblend.config import load_config

    runtime = load_config().runtime
    out = Path(args.out)
    header = results_header(device)
    doc: dict[str, Any] = {
        **header, "bench": "kvblend bench prefill", "argv": sys.argv[1:], "device": device.type,
        "dtype": dtype_name, "env": env_info(device, header),
        "config": {"iters": args.iters, "warmup": args.warmup, "prefix_tokens": args.prefix_tokens,
                   "chunks": args.chunks, "chunk_tokens": args.chunk_tokens, "query_tokens": args.query_tokens,
                   "ratios": args.ratios, "tiers": args.tiers, "chunk_counts": args.chunk_counts,
                   "check_layer": 1, "selection": "k deviation", "seed": args.seed,
                   "runtime": {f: getattr(runtime, f) for f in ("cuda_graphs", "front_graph", "attention",
                                                                  "flex_compile")},
                   "timing": "host clock, device synchronised before and after each call; cases round-robin; "
                             "e2e values are Engine.answer's TTFT; disk_cold = files evicted from the page cache "
                             "with posix_fadvise(DONTNEED) right before each call"},
        "results": [],
    }
    _measure_all(doc, [(s, False) for s in shapes] + ([("smollm2-real", True)] if args.real else []),
                 device, dtype, args, out, runtime)
    doc["finished_utc"] = utc_now()
    atomic_write_json(out, doc)
    print(f"wrote {out}")
    return _finish(doc, args, args.source or str(out))
