"""Why does a captured verification step of T >= 2 tokens cost more than a one-token step? (issue 17 item 3)

Times the device time of a captured step of T tokens (CUDA events around the replay, median of 20) on the
real SmolLM2 (bf16) over a ~3.2K-token prefilled state, for each SDPA backend forced at capture time
(default choice, efficient, cudnn, math) and for the flex kernel; profiles T=1 and T=8 of the default
(top kernels by device time). Prints a table, writes JSON to argv[1].
usage (GPU, with weights): python3 scripts/gpu/probe_step_cost.py $OUT/step_cost.json
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import replace
from statistics import median

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvblend.bench.prefill import real_prompt
from kvblend.config import EngineConfig
from kvblend.engine import Engine
from kvblend.model.registry import load_model
from kvblend.model.runner import ModelRunner

TS = (1, 2, 4, 8, 9, 16)


def step_times(runner: ModelRunner, prompt, ctx) -> dict:
    pre = runner.full_prefill(prompt, 64)
    dec = runner.decoder(pre.state, graphs=True)
    base, out = pre.state.length, {}
    with torch.inference_mode():
        for t in TS:
            ids = list(prompt.query_ids[:1]) * t
            with ctx():
                dec.launch(ids)  # capture under the forced backend
            dev = []
            for i in range(25):
                pre.state.truncate(base)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                torch.cuda._sleep(2_000_000)
                a.record()
                dec.launch(ids)
                b.record()
                torch.cuda.synchronize()
                if i >= 5:
                    dev.append(a.elapsed_time(b))
            out[t] = median(dev)
            pre.state.truncate(base)
    return out


def profile(runner: ModelRunner, prompt, t: int, top: int = 12) -> list:
    from torch.profiler import ProfilerActivity, profile as prof_

    pre = runner.full_prefill(prompt, 64)
    dec = runner.decoder(pre.state, graphs=False)
    base = pre.state.length
    ids = list(prompt.query_ids[:1]) * t
    with torch.inference_mode():
        dec.launch(ids)
        pre.state.truncate(base)
        torch.cuda.synchronize()
        with prof_(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                dec.launch(ids)
                pre.state.truncate(base)
            torch.cuda.synchronize()
    rows = [(e.key[:90], e.count / 3, getattr(e, "self_device_time_total", 0) / 3 / 1e3) for e in p.key_averages()]
    rows = [r for r in rows if r[2] > 0]
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def main() -> None:
    model = load_model("smollm2-135m-instruct", "bfloat16", "cuda")
    engine = Engine(EngineConfig(home="/tmp/kvblend-gpu/home-probe"), model=model)
    prompt, _ = real_prompt(engine)
    base_rt = engine.runner.runtime if hasattr(engine, "runner") else None
    res: dict = {"num_tokens": prompt.num_tokens, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    forced = {"default": contextlib.nullcontext,
              "efficient": lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]),
              "cudnn": lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]),
              "math": lambda: sdpa_kernel([SDPBackend.MATH])}
    from kvblend.config import RuntimeOptions
    rt = base_rt or RuntimeOptions()
    for name, ctx in forced.items():
        try:
            res[name] = step_times(ModelRunner(model, rt), prompt, ctx)
        except Exception as exc:  # noqa: BLE001
            res[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        res["flex"] = step_times(ModelRunner(model, replace(rt, attention="flex")), prompt, contextlib.nullcontext)
    except Exception as exc:  # noqa: BLE001
        res["flex"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    res["profile_eager_T1"] = profile(ModelRunner(model, rt), prompt, 1)
    res["profile_eager_T8"] = profile(ModelRunner(model, rt), prompt, 8)
    print(f"captured step device ms, real SmolLM2 bf16, {prompt.num_tokens} prompt tokens")
    print("| backend | " + " | ".join(f"T={t}" for t in TS) + " | T=8 / T=1 |")
    for name in (*forced, "flex"):
        v = res[name]
        if isinstance(v, dict):
            print(f"| {name} | " + " | ".join(f"{v[t]:.3f}" for t in TS) + f" | {v[8] / v[1]:.2f} |")
        else:
            print(f"| {name} | {v} |")
    for k in ("profile_eager_T1", "profile_eager_T8"):
        print(k)
        for r in res[k]:
            print(f"  {r[2]:.3f} ms  x{r[1]:.0f}  {r[0]}")
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
