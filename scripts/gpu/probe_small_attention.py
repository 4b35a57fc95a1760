"""Attention of T <= 16 query rows over a whole KV buffer with a per-row mask: which formulation is cheapest
on this GPU? (issue 17 item 3: captured verification steps of T >= 2 rows cost 1.8x a one-row step.)

Each variant is captured 30 times in one CUDA graph (as the 30 layers of a step) and replayed; per-call
microseconds (median of 20 replays). Errors vs an fp32 reference. Prints a table, writes JSON to argv[1].
"""

from __future__ import annotations

import json
import sys
from statistics import median

import torch
import torch.nn.functional as F

SHAPES = {"smollm2": (9, 3, 64, 4352), "qwen1.5b": (12, 2, 128, 4352), "llama8b": (32, 8, 128, 8448)}
TS = (1, 2, 4, 8, 16)


def sdpa_dense(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask[None, None], scale=scale,
                                          enable_gqa=True)[0]


def sdpa_bias(q, k, v, mask, scale):
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias[None, None], scale=scale,
                                          enable_gqa=True)[0]


def sdpa_rows_batch(q, k, v, mask, scale):
    t = q.shape[1]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[:, :, None], k[None].expand(t, -1, -1, -1),
                                         v[None].expand(t, -1, -1, -1), attn_mask=mask[:, None, None],
                                         scale=scale, enable_gqa=True)  # [T, H, 1, D]
    return out[:, :, 0].transpose(0, 1)


def _grouped(q, k):
    h, t, d = q.shape
    g = h // k.shape[0]
    return q.reshape(k.shape[0], g * t, d), g


def manual(q, k, v, mask, scale, fp32: bool):
    h, t, d = q.shape
    qg, g = _grouped(q, k)
    if fp32:
        s = torch.matmul(qg.float(), k.float().transpose(1, 2)) * scale
    else:
        s = torch.matmul(qg, k.transpose(1, 2)).float() * scale
    s = s.view(k.shape[0], g, t, -1).masked_fill(~mask, float("-inf"))
    p = s.softmax(-1).to(v.dtype).view(k.shape[0], g * t, -1)
    return torch.matmul(p, v).view(h, t, d)


VARIANTS = {"sdpa_dense": sdpa_dense, "sdpa_bias": sdpa_bias, "sdpa_rows_batch": sdpa_rows_batch,
            "manual_bf16": lambda *a: manual(*a, fp32=False), "manual_fp32": lambda *a: manual(*a, fp32=True)}


def time_graph(fn, reps=30) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    ts = []
    for i in range(25):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        if i >= 5:
            ts.append(a.elapsed_time(b) * 1e3 / reps)
    return median(ts)


def main() -> None:
    torch.manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "us_per_call": {}, "max_err": {}}
    for name, (h, hkv, d, n) in SHAPES.items():
        k = torch.randn(hkv, n, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(hkv, n, d, device="cuda", dtype=torch.bfloat16)
        valid_len = n - 1200
        for t in TS:
            q = torch.randn(h, t, d, device="cuda", dtype=torch.bfloat16)
            pos = torch.arange(valid_len - t, valid_len, device="cuda")
            mask = torch.arange(n, device="cuda")[None, :] <= pos[:, None]
            ref = manual(q.float(), k.float(), v.float(), mask, d ** -0.5, fp32=True)
            for vname, fn in VARIANTS.items():
                key = f"{name} T={t} {vname}"
                try:
                    out = fn(q, k, v, mask, d ** -0.5)
                    res["max_err"][key] = (out.float() - ref).abs().max().item()
                    res["us_per_call"][key] = time_graph(lambda: fn(q, k, v, mask, d ** -0.5))
                except Exception as exc:  # noqa: BLE001
                    res["us_per_call"][key] = f"{type(exc).__name__}: {str(exc)[:120]}"
    print("| shape | T | " + " | ".join(VARIANTS) + " |")
    for name in SHAPES:
        for t in TS:
            cells = []
            for vname in VARIANTS:
                x = res["us_per_call"][f"{name} T={t} {vname}"]
                e = res["max_err"].get(f"{name} T={t} {vname}")
                cells.append(f"{x:.1f} ({e:.1e})" if isinstance(x, float) else x[:40])
            print(f"| {name} | {t} | " + " | ".join(cells) + " |")
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
