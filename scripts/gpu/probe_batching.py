"""Continuous batching at the engine level (no HTTP: the GPU machine has no uvicorn): N requests of the
musique_s workload (5 passages each, blend@0.15), decoded one at a time (Engine.answer) vs admitted into one
ContinuousBatch (prefill one per step, as the server's worker does). Greedy outputs compared. Prints a table,
writes JSON to argv[1]. usage: python3 scripts/gpu/probe_batching.py OUT.json [N] [MAX_TOKENS]
"""

from __future__ import annotations

import json
import sys
import time

import torch

from kvblend.config import EngineConfig
from kvblend.data.datasets import load_dataset
from kvblend.engine import Engine
from kvblend.generation.batch import ContinuousBatch
from kvblend.generation.sampling import SamplingParams
from kvblend.model.slots import DecodeSlots


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    max_new = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    engine = Engine(EngineConfig(home=sys.argv[4] if len(sys.argv) > 4 else "/tmp/kvblend-gpu/home-batch", dtype="bfloat16" if torch.cuda.is_available() else "float32", device="auto",
                                 max_new_tokens=max_new, stop_on_newline=False))
    data = load_dataset("musique_s", limit=n)
    reqs = []
    for s in data.samples[:n]:
        texts = [data.template.format_passage(p) for p in s.passages[:5]]
        reqs.append((engine.prompt(data.template.prefix, texts, data.template.format_query(s.question)), texts))
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_on_newline=False)
    for p, t in reqs:  # build every chunk and warm every graph first
        engine.answer(p, t, sampling=params)
    _sync()
    t0 = time.perf_counter()
    alone = [engine.answer(p, t, sampling=params) for p, t in reqs]
    _sync()
    alone_s = time.perf_counter() - t0
    slots = DecodeSlots(engine.runner, n, 8192)
    batch = ContinuousBatch(engine.model, slots, engine.newline)
    res: dict = {}

    def run_batched() -> float:
        t1, todo = time.perf_counter(), list(enumerate(reqs))
        while todo or batch.running:
            if todo and batch.has_room:
                i, (p, t) = todo.pop(0)
                st = engine.start_answer(p, t, sampling=params)
                batch.add(st.result, params, st.clock.ttft_start(), lambda out, i=i: res.__setitem__(i, out))
            batch.step()
        _sync()
        return time.perf_counter() - t1

    run_batched()  # capture the slots' step graph
    res.clear()
    batched_s = run_batched()
    tokens = sum(len(o.token_ids) for o in alone)
    same = sum(res[i].token_ids == alone[i].token_ids for i in range(n))
    out = {"requests": n, "max_new_tokens": max_new, "tokens": tokens, "one_at_a_time_s": alone_s,
           "batched_s": batched_s, "throughput_ratio": alone_s / batched_s, "same_tokens": same,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "ttft_alone_ms": [o.ttft_ms for o in alone],
           "ttft_batched_ms": [res[i].ttft_ms for i in range(n)]}
    print(f"| requests | tokens | one at a time s | batched s | ratio | same greedy tokens |")
    print(f"| {n} | {tokens} | {alone_s:.3f} | {batched_s:.3f} | {alone_s / batched_s:.2f} | {same}/{n} |")
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
