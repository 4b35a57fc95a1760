#!/usr/bin/env python3
"""TTFT (prefill time) benchmark: kvblend's engine in modes full / reuse / blend against transformers' forward.

Random-weight models of real shapes (timing does not depend on the weights) built with
kvblend.model.hf.random_model under the target device as torch's default device (so an 8B model is
initialised on the GPU in seconds). Workload like the CacheBlend reference numbers: a prefix, N chunks
of T random token ids and a query. Each chunk's KV is built once with build_chunk_kv (untimed); then,
round-robin over the modes (so they are measured side by side under the same clocks), every mode is
warmed up and timed `--iters` times with the device synchronised before and after each call.

Modes timed per shape:
  hf_full        transformers' own forward of the whole prompt (use_cache=True, logits at every position)
  hf_full_last   the same with logits_to_keep=1 (only the last position through the LM head)
  full           kvblend prefill, mode full
  reuse          kvblend prefill, mode reuse (cached chunks on the compute device)
  blend@R        kvblend prefill, mode blend, ratio R (cached chunks on the compute device)
  reuse_pinned, blend@R_pinned   (CUDA only) the same with the cached chunks in pinned host memory
  kv_load, kv_load_pinned        allocate the KV buffer + place/re-rotate every cached chunk, synchronised
                                 (the part of prefill that PrefillResult.stats.place_ms times on the host)

Writes a JSON (atomically) and prints a markdown table. Usage (from the repository root):
  PYTHONPATH=. python bench/bench_prefill.py --device cuda --shapes llama3-8b,qwen2.5-1.5b --dtype bfloat16
  PYTHONPATH=. python bench/bench_prefill.py --device cpu --shapes smollm2-135m --dtype float32 --iters 3 \
      --chunks 3 --chunk-tokens 256
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvblend.fusion.blend import _place_chunk, prefill  # noqa: E402
from kvblend.model.runner import allocate_state  # noqa: E402
from kvblend.kvstore.builder import build_chunk_kv  # noqa: E402
from kvblend.kvstore.chunk_kv import ChunkKV  # noqa: E402
from kvblend.model.hf import DecoderModel, random_model  # noqa: E402
from kvblend.types import PromptIds  # noqa: E402

log = logging.getLogger("bench_prefill")

# (model_type, config kwargs). Real shapes; weights are random.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-8b": ("llama", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5)),
    "qwen2.5-1.5b": ("qwen2", dict(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        intermediate_size=8960, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
        use_sliding_window=False)),
    "smollm2-135m": ("llama", dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5)),
}
EXPECTED_THETA = {k: v[1]["rope_parameters"]["rope_theta"] for k, v in SHAPES.items()}

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------- helpers
def git_info() -> dict[str, Any]:
    sha = os.environ.get("KVBLEND_GIT_SHA")
    dirty = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip() or sha
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                            capture_output=True, text=True, check=True, timeout=10).stdout
        dirty = bool(st.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # the device machine gets the working tree without .git: the sha comes from KVBLEND_GIT_SHA
    return {"git_sha": sha, "git_dirty_tracked": dirty}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_sms=p.multi_processor_count,
                    gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
        try:
            info["measured_ceilings"] = measure_ceilings(device)
        except Exception as exc:  # noqa: BLE001
            info["measured_ceilings"] = f"failed: {type(exc).__name__}: {exc}"
    return info


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """The two ceilings on this card, measured (METHOD.md): bf16 matmul rate, device and host->device copy."""
    def timed(fn, reps=10):
        for _ in range(3):
            fn()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        torch.cuda.synchronize(device)
        return a.elapsed_time(b) / reps / 1e3  # s

    out: dict[str, float] = {}
    n = 8192
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out["bf16_matmul_tflops"] = 2 * n**3 / timed(lambda: x @ y) / 1e12
    del x, y
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    out["d2d_copy_gbs_read_plus_write"] = 2 * src.numel() / timed(lambda: dst.copy_(src)) / 1e9
    host = torch.empty(2**30, dtype=torch.uint8).pin_memory()
    out["h2d_pinned_gbs"] = host.numel() / timed(lambda: dst.copy_(host, non_blocking=True)) / 1e9
    del src, dst, host
    torch.cuda.empty_cache()
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pct(xs: list[float], q: float) -> float:
    """Percentile by linear interpolation between order statistics (numpy's default)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarise(ms: list[float]) -> dict[str, Any]:
    return {"median_ms": pct(ms, 50), "p10_ms": pct(ms, 10), "p90_ms": pct(ms, 90), "min_ms": min(ms),
            "mean_ms": sum(ms) / len(ms), "n": len(ms), "all_ms": [round(x, 4) for x in ms]}


def atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ------------------------------------------------------------------------------------------ the model
def build_model(shape_name: str, device: torch.device, dtype: torch.dtype, seed: int) -> DecoderModel:
    model_type, kw = SHAPES[shape_name]
    t0 = time.perf_counter()
    # torch's default device: parameters are created (and initialised, N(0, 0.02)) directly on the device
    with torch.device(device):
        model = random_model(dict(kw), model_type=model_type, seed=seed, dtype=dtype, name=shape_name)
    if model.device.type != device.type:  # a transformers version that ignores the default device
        log.warning("%s: built on %s, moving to %s", shape_name, model.device, device)
        model.hf_model.to(device)
    sync(device)
    log.info("%s: built in %.1f s on %s (%s), %.2f B params", shape_name, time.perf_counter() - t0,
             model.device, model.dtype, sum(p.numel() for p in model.hf_model.parameters()) / 1e9)
    if abs(model.shape.rope_theta - EXPECTED_THETA[shape_name]) > 1e-3:
        log.warning("%s: rope_theta %s != expected %s (config kwargs not understood by this transformers)",
                    shape_name, model.shape.rope_theta, EXPECTED_THETA[shape_name])
    return model


def make_prompt(vocab: int, prefix: int, chunks: int, chunk_tokens: int, query: int, seed: int) -> PromptIds:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(0, vocab, (n,), generator=g).tolist())

    return PromptIds(ids(prefix), tuple(ids(chunk_tokens) for _ in range(chunks)), ids(query))


# --------------------------------------------------------------------------------------- FLOP model
def useful_flops(model: DecoderModel, n: int, recompute: list[int] | None, kind: str, check_layer: int = 1,
                 lm_head_tokens: int = 1) -> float:
    """Matmul FLOPs the mode needs (what it must compute, not what a masked SDPA spends on masked keys).

    kind: full (kvblend: last layer's attention/MLP only for the last token), hf (every token in every
    layer), reuse / blend (per the engine's schedule; `recompute` = sorted recomputed positions).
    """
    s = model.shape
    hq, hkv, d, hid = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.head_dim, s.hidden_size
    qkv = 2 * hid * (hq + 2 * hkv)
    rest = 2 * hq * hid + 2 * 3 * hid * s.intermediate_size

    def attn(positions) -> float:  # QK^T + PV over keys 0..p
        return 4.0 * s.num_heads * d * sum(p + 1 for p in positions)

    every = range(n)
    total = 0.0
    for layer in range(s.num_layers):
        if kind in ("full", "hf") or (kind == "blend" and layer < check_layer):
            a, b = every, every
        elif kind == "blend" and layer == check_layer:
            a, b = every, recompute
        else:
            a, b = recompute, recompute
        if layer == s.num_layers - 1 and kind != "hf":
            b = [n - 1]
        total += qkv * len(a) + attn(b) + rest * len(b)
    return total + 2.0 * hid * s.vocab_size * lm_head_tokens


# --------------------------------------------------------------------------------------------- bench
def bench_shape(shape_name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    res: dict[str, Any] = {"shape": shape_name, "errors": {}}
    model = build_model(shape_name, device, dtype, args.seed)
    s = model.shape
    res["model_shape"] = {k: getattr(s, k) for k in s.__slots__}
    res["params_b"] = sum(p.numel() for p in model.hf_model.parameters()) / 1e9
    res["kv_bytes_per_token"] = s.num_layers * s.num_kv_heads * s.head_dim * 2 * torch.finfo(dtype).bits // 8
    prompt = make_prompt(s.vocab_size, args.prefix_tokens, args.chunks, args.chunk_tokens, args.query_tokens,
                         args.seed)
    n = prompt.num_tokens
    res["num_tokens"] = n
    res["num_chunk_tokens"] = args.chunks * args.chunk_tokens

    t0 = time.perf_counter()
    chunks = [build_chunk_kv(model, c) for c in prompt.chunk_ids]
    sync(device)
    res["build_chunk_kv_s"] = time.perf_counter() - t0
    res["chunk_kv_mib"] = sum(c.nbytes for c in chunks) / 2**20

    pinned: list[ChunkKV] | None = None
    if device.type == "cuda" and not args.no_pinned:
        try:
            pinned = [c.to("cpu", pin=True) for c in chunks]
            sync(device)
            res["pinned_is_pinned"] = all(p.kv.is_pinned() for p in pinned)
        except Exception as exc:  # noqa: BLE001
            res["errors"]["pinned_copy"] = f"{type(exc).__name__}: {exc}"
            pinned = None

    ids = torch.tensor(prompt.flat(), dtype=torch.long, device=device)
    hf_fwd_params = inspect.signature(model.hf_model.forward).parameters

    def hf_forward(keep_last: bool) -> Callable[[], Any]:
        kwargs: dict[str, Any] = {"use_cache": True}
        if keep_last and "logits_to_keep" in hf_fwd_params:
            kwargs["logits_to_keep"] = 1

        def run():
            with torch.inference_mode():
                return model.hf_model(input_ids=ids[None], **kwargs).logits
        return run

    def kv_load(src: list[ChunkKV]) -> Callable[[], Any]:
        def run():
            with torch.inference_mode():
                state = allocate_state(model, n)
                start = len(prompt.prefix_ids)
                for ck in src:
                    _place_chunk(state, ck, start, model)
                    start += ck.num_tokens
                return state
        return run

    cases: dict[str, Callable[[], Any]] = {
        "hf_full": hf_forward(False),
        "hf_full_last": hf_forward(True),
        "full": lambda: prefill(model, prompt, None, mode="full"),
        "reuse": lambda: prefill(model, prompt, chunks, mode="reuse"),
    }
    for r in args.ratios:
        cases[f"blend@{r:g}"] = (lambda r=r: prefill(model, prompt, chunks, mode="blend", ratio=r))
    cases["kv_load"] = kv_load(chunks)
    if pinned is not None:
        cases["reuse_pinned"] = lambda: prefill(model, prompt, pinned, mode="reuse")
        r0 = args.ratios[0]
        cases[f"blend@{r0:g}_pinned"] = lambda: prefill(model, prompt, pinned, mode="blend", ratio=r0)
        cases["kv_load_pinned"] = kv_load(pinned)

    # first call of each case: a check that it runs, finite logits, and its stats
    outs: dict[str, Any] = {}
    for name, fn in list(cases.items()):
        try:
            out = fn()
            sync(device)
            if hasattr(out, "stats"):
                if not bool(torch.isfinite(out.logits).all()):
                    raise RuntimeError("non-finite logits")
                outs[name] = out.stats
            elif name.startswith("hf"):
                if not bool(torch.isfinite(out[0, -1]).all()):
                    raise RuntimeError("non-finite logits")
                outs[name] = out[0, -1].float()
            del out
        except Exception as exc:  # noqa: BLE001 - one failing case must not sink the whole device call
            tb = traceback.format_exc()
            log.error("%s / %s failed:\n%s", shape_name, name, tb)
            res["errors"][name] = tb.strip().splitlines()[-1] + " | " + " || ".join(
                line.strip() for line in tb.strip().splitlines()[-8:-1])
            del cases[name]

    # sanity: kvblend full vs transformers' logits at the last position (bf16 rounding differs)
    if "hf_full" in outs and "full" in cases:
        ref = outs["hf_full"]
        got = prefill(model, prompt, None, mode="full").logits.float()
        res["full_vs_hf_rel_err"] = float((got - ref).norm() / ref.norm())
        res["full_vs_hf_argmax_equal"] = bool(got.argmax() == ref.argmax())

    # timing: warm-up rounds, then timed rounds; in each round every case runs once (side by side)
    times: dict[str, list[float]] = {k: [] for k in cases}
    host_load: dict[str, list[float]] = {k: [] for k in cases}
    for rnd in range(args.warmup + args.iters):
        for name, fn in cases.items():
            sync(device)
            t = time.perf_counter()
            out = fn()
            sync(device)
            dt = (time.perf_counter() - t) * 1e3
            if rnd >= args.warmup:
                times[name].append(dt)
                if hasattr(out, "stats"):
                    host_load[name].append(out.stats.place_ms)
            del out
    metrics: dict[str, Any] = {}
    for name, ms in times.items():
        m = summarise(ms)
        st = outs.get(name)
        if hasattr(st, "num_recomputed"):
            m["num_recomputed"] = st.num_recomputed
            m["recompute_fraction"] = st.num_recomputed / n
            m["stats_kv_load_ms_median"] = pct(host_load[name], 50)  # host clock, not synchronised
            recompute = sorted(set(range(len(prompt.prefix_ids))) | set(range(n - len(prompt.query_ids), n))
                               | set(st.selected_positions))
            kind = st.mode
            m["useful_tflop"] = useful_flops(model, n, recompute, kind) / 1e12
        elif name == "hf_full":
            m["useful_tflop"] = useful_flops(model, n, None, "hf", lm_head_tokens=n) / 1e12
        elif name == "hf_full_last":
            m["useful_tflop"] = useful_flops(model, n, None, "hf", lm_head_tokens=1) / 1e12
        if "useful_tflop" in m:
            m["achieved_tflops"] = m["useful_tflop"] / (m["median_ms"] / 1e3)
        metrics[name] = m
    for base in ("full", "hf_full", "hf_full_last"):
        if base in metrics:
            b = metrics[base]["median_ms"]
            for name, m in metrics.items():
                if not name.startswith("kv_load"):
                    m[f"speedup_vs_{base}"] = b / m["median_ms"]
    for name, m in metrics.items():  # how much of the 1/ratio and the FLOP ceilings is reached
        if name.startswith("blend@") and "full" in metrics:
            ratio = float(name.split("@")[1].split("_")[0])
            m["ceiling_1_over_ratio"] = 1.0 / ratio
            m["fraction_of_1_over_ratio"] = m["speedup_vs_full"] / m["ceiling_1_over_ratio"]
            m["ceiling_flops"] = metrics["full"]["useful_tflop"] / m["useful_tflop"]
            m["fraction_of_flop_ceiling"] = m["speedup_vs_full"] / m["ceiling_flops"]
    res["metrics"] = metrics
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    if args.profile and device.type == "cuda" and shape_name in args.profile_shapes:
        res["profile"] = {}
        for name in args.profile_modes:
            if name in cases:
                try:
                    res["profile"][name] = profile_case(cases[name], device, args, metrics[name]["median_ms"])
                except Exception as exc:  # noqa: BLE001
                    res["errors"][f"profile:{name}"] = f"{type(exc).__name__}: {exc}"
    if device.type == "cuda" and args.race_probe:
        try:
            res["pinned_copy_race_probe"] = race_probe(chunks[-1], device)
        except Exception as exc:  # noqa: BLE001
            res["errors"]["race_probe"] = f"{type(exc).__name__}: {exc}"

    del model, chunks, pinned, cases, outs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return res


def _dev_time(evt: Any, attr: str) -> float:
    for a in (attr.replace("cuda", "device"), attr):
        v = getattr(evt, a, None)
        if v is not None:
            return float(v)
    return 0.0


def profile_case(fn: Callable[[], Any], device: torch.device, args: argparse.Namespace, median_ms: float) -> dict:
    """torch.profiler over `args.profile_iters` calls: top ops by device time, GPU busy time, kernel count."""
    from torch.profiler import ProfilerActivity, profile

    reps = args.profile_iters
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync(device)
    ka = prof.key_averages()
    rows = []
    for e in ka:
        dt = _dev_time(e, "cuda_time_total")
        sdt = _dev_time(e, "self_cuda_time_total")
        if dt > 0 or sdt > 0:
            rows.append({"op": e.key, "calls_per_iter": e.count / reps, "device_ms_per_iter": dt / 1e3 / reps,
                         "self_device_ms_per_iter": sdt / 1e3 / reps,
                         "cpu_ms_per_iter": e.cpu_time_total / 1e3 / reps})
    top_total = sorted(rows, key=lambda r: -r["device_ms_per_iter"])[: args.profile_top]
    top_self = sorted(rows, key=lambda r: -r["self_device_ms_per_iter"])[: args.profile_top]
    # kernels: device-side events
    kernel_us, kernels = 0.0, 0
    try:
        from torch.autograd import DeviceType

        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                kernels += 1
                kernel_us += e.time_range.elapsed_us()
    except Exception:  # noqa: BLE001
        kernels, kernel_us = -1, sum(r["self_device_ms_per_iter"] for r in rows) * 1e3 * reps
    try:
        table = ka.table(sort_by="cuda_time_total", row_limit=args.profile_top)
    except Exception:  # noqa: BLE001
        table = ka.table(sort_by="device_time_total", row_limit=args.profile_top)
    busy_ms = kernel_us / 1e3 / reps
    return {"iters": reps, "top_by_total_device_time": top_total, "top_by_self_device_time": top_self,
            "device_busy_ms_per_iter": busy_ms, "device_events_per_iter": kernels / reps if kernels >= 0 else None,
            "busy_fraction_of_median_wall": busy_ms / median_ms, "table": table}


def race_probe(chunk: ChunkKV, device: torch.device) -> dict:
    """ChunkKV.to('cpu', pin=True) from CUDA copies with non_blocking=True into pinned memory and returns
    without synchronising: a host read right after can see rows the DMA has not written yet."""
    seen = []
    for _ in range(5):
        sync(device)
        c = chunk.to("cpu", pin=True)
        tail_early = c.kv.reshape(-1)[-4096:].clone()  # the end of the buffer is written last
        sync(device)
        tail_late = c.kv.reshape(-1)[-4096:].clone()
        seen.append(not torch.equal(tail_early, tail_late))
        del c
    return {"runs": len(seen), "host_read_before_copy_done": sum(seen),
            "meaning": "count of runs in which a host read right after ChunkKV.to('cpu', pin=True) differed "
                       "from the value after synchronize (0 = no race observed)"}


# ---------------------------------------------------------------------------------------------- output
def markdown(results: list[dict]) -> str:
    lines = ["| shape | tokens | case | recomputed | median ms | p10 | p90 | x vs kvblend full | x vs HF full "
             "| useful TFLOP | TFLOP/s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for name, m in res.get("metrics", {}).items():
            rec = f"{m['num_recomputed']} ({100 * m['recompute_fraction']:.1f}%)" if "num_recomputed" in m else ""
            fmt = (lambda k, f="{:.2f}": f.format(m[k]) if k in m else "")
            lines.append(f"| {res['shape']} | {res['num_tokens']} | {name} | {rec} | {m['median_ms']:.2f} | "
                         f"{m['p10_ms']:.2f} | {m['p90_ms']:.2f} | {fmt('speedup_vs_full')} | "
                         f"{fmt('speedup_vs_hf_full')} | {fmt('useful_tflop', '{:.1f}')} | "
                         f"{fmt('achieved_tflops', '{:.0f}')} |")
    lines.append("")
    lines.append("| shape | blend case | x vs full | 1/ratio ceiling | reached | FLOP ceiling | reached | "
                 "stats.place_ms (host, median) |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for res in results:
        for name, m in res.get("metrics", {}).items():
            if "ceiling_1_over_ratio" in m:
                lines.append(f"| {res['shape']} | {name} | {m['speedup_vs_full']:.2f} | "
                             f"{m['ceiling_1_over_ratio']:.2f} | {100 * m['fraction_of_1_over_ratio']:.0f}% | "
                             f"{m['ceiling_flops']:.2f} | {100 * m['fraction_of_flop_ceiling']:.0f}% | "
                             f"{m['stats_kv_load_ms_median']:.2f} |")
    for res in results:
        for name, p in res.get("profile", {}).items():
            lines.append("")
            lines.append(f"profile {res['shape']} {name}: device busy {p['device_busy_ms_per_iter']:.2f} ms/iter "
                         f"({100 * p['busy_fraction_of_median_wall']:.0f}% of the median wall time), "
                         f"{p['device_events_per_iter']} device events/iter")
            for key in ("top_by_total_device_time", "top_by_self_device_time"):
                lines.append(f"{key}:")
                lines.append("| op | calls/iter | device ms/iter (total) | self device ms/iter | CPU ms/iter |")
                lines.append("|---|---:|---:|---:|---:|")
                for r in p[key]:
                    lines.append(f"| {r['op'][:80]} | {r['calls_per_iter']:.1f} | {r['device_ms_per_iter']:.3f} | "
                                 f"{r['self_device_ms_per_iter']:.3f} | {r['cpu_ms_per_iter']:.3f} |")
        if res.get("errors"):
            lines.append("")
            lines.append(f"errors {res['shape']}: {json.dumps(res['errors'], indent=1)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shapes", default="llama3-8b,qwen2.5-1.5b")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--query-tokens", type=int, default=64)
    ap.add_argument("--prefix-tokens", type=int, default=32)
    ap.add_argument("--ratios", default="0.15,0.3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-pinned", action="store_true", help="skip the pinned-host-memory chunk cases (cuda)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--profile-shapes", default="llama3-8b")
    ap.add_argument("--profile-modes", default="blend@0.15,full")
    ap.add_argument("--profile-iters", type=int, default=3)
    ap.add_argument("--profile-top", type=int, default=10)
    ap.add_argument("--no-race-probe", dest="race_probe", action="store_false")
    ap.add_argument("--out", default=None, help="JSON path (default docs/results/bench_prefill_<device>.json)")
    args = ap.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.profile_shapes = [x for x in args.profile_shapes.split(",") if x]
    args.profile_modes = [x for x in args.profile_modes.split(",") if x]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    shapes = [x for x in args.shapes.split(",") if x]
    unknown = [x for x in shapes if x not in SHAPES]
    if unknown:
        print(f"error: unknown shape(s) {unknown}; known: {', '.join(SHAPES)}", file=sys.stderr)
        return 1
    out = Path(args.out or f"docs/results/bench_prefill_{device.type}.json")

    doc: dict[str, Any] = {
        "bench": "bench/bench_prefill.py", "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        **git_info(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "env": env_info(device),
        "config": {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "iters": args.iters,
                   "warmup": args.warmup, "prefix_tokens": args.prefix_tokens, "chunks": args.chunks,
                   "chunk_tokens": args.chunk_tokens, "query_tokens": args.query_tokens, "ratios": args.ratios,
                   "seed": args.seed, "check_layer": 1, "score_on": "k", "timing": "host perf_counter with "
                   "device synchronize before and after each call; cases interleaved round-robin"},
        "model_shapes": {k: {"model_type": SHAPES[k][0], **SHAPES[k][1]} for k in shapes},
        "results": [],
    }
    for shape in shapes:
        t0 = time.perf_counter()
        try:
            res = bench_shape(shape, args, device, dtype)
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            log.error("%s failed:\n%s", shape, tb)
            res = {"shape": shape, "fatal": tb}
        res["wall_s"] = time.perf_counter() - t0
        doc["results"].append(res)
        atomic_write_json(out, doc)  # after every shape, so a later failure keeps what was measured
    doc["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_json(out, doc)
    table = markdown([r for r in doc["results"] if "metrics" in r])
    print("env:", json.dumps(doc["env"]))
    print(table)
    for r in doc["results"]:
        if "fatal" in r:
            print(f"\nFATAL {r['shape']}:\n{r['fatal']}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
