"""Equivalence checks on CUDA (run on the GPU machine: torch 2.11, transformers 5.17).

Prints one line per check; exits non-zero if any fails. Uses random-weight tiny models in fp32.
"""

from __future__ import annotations

import sys

import torch
import transformers

sys.path.insert(0, "tests")
from conftest import make_tiny  # noqa: E402
from test_blend import hf_full_logits, hf_naive_reuse_logits, random_prompt  # noqa: E402

from kvblend.fusion.blend import prefill, promote_chunk  # noqa: E402
from kvblend.kvstore.builder import build_chunk_kv  # noqa: E402
from kvblend.model.layers import forward_tokens  # noqa: E402


def decode_checks(model_type: str) -> int:
    """CUDA-graph-captured decode (model/steps.py) against the plain layer loop, fp32, on CUDA:
    step logits, greedy generate, greedy n-gram speculation, and a promotion mid-answer with placeholders."""
    from kvblend.generation.drafters import NgramDrafter
    from kvblend.generation.generate import generate
    from kvblend.generation.sampling import SamplingParams
    from kvblend.generation.speculative import speculative_generate
    from kvblend.model.runner import runner_of

    failures = 0

    def report(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{model_type:6s} cuda {name:34s} {detail} {'ok' if ok else 'FAIL'}")

    model = make_tiny(model_type)
    model.hf_model.to("cuda")
    model.inv_freq = model.inv_freq.to("cuda")
    prompt = random_prompt(model.shape.vocab_size, seed=7)
    a = prefill(model, prompt, mode="full", extra_capacity=20)
    b = prefill(model, prompt, mode="full", extra_capacity=20)
    ptr = b.state.k.data_ptr()
    runner = runner_of(model).decoder(b.state, graphs=True)
    report("prefill state decoded in place", b.state.buffer is not None and b.state.k.data_ptr() == ptr,
           "(no copy into a decode buffer)")
    err = 0.0
    for ids in ([3], [4, 5, 6], [7]):
        got = runner.logits(ids).clone()
        err = max(err, (got - forward_tokens(model, a.state, ids)).abs().max().item())
    report("captured step == plain step", err < 1e-4, f"max|diff| {err:.2e}")
    made = runner_of(model).arena.allocated
    for _ in range(3):  # requests one after another reuse the static buffers (and their graphs)
        generate(model, prefill(model, prompt, mode="full", extra_capacity=20), SamplingParams(max_new_tokens=4),
                 0.0, graphs=True)
    report("static buffers reused across requests", runner_of(model).arena.allocated <= made + 1,
           f"{runner_of(model).arena.allocated} buffers, {runner_of(model).graphs.count()} graphs")
    params = SamplingParams(max_new_tokens=24, stop_on_newline=False)
    plain = generate(model, prefill(model, prompt, mode="full", extra_capacity=30), params, 0.0, graphs=False)
    graphs = generate(model, prefill(model, prompt, mode="full", extra_capacity=30), params, 0.0, graphs=True)
    report("generate: graphs == plain", graphs.token_ids == plain.token_ids, f"{len(plain.token_ids)} tokens")
    pre = prefill(model, prompt, mode="full", extra_capacity=40)
    spec, _ = speculative_generate(model, pre, NgramDrafter(prompt.chunk_ids), params, 0.0, prompt_ids=prompt, k=6,
                                   graphs=True)
    report("speculative (graphs) == generate", spec.token_ids == plain.token_ids)
    chunks = [build_chunk_kv(model, c) for c in prompt.chunk_ids]
    start = len(prompt.prefix_ids) + len(prompt.chunk_ids[0])
    resident = [i != 1 for i in range(len(chunks))]
    outs = []
    for use in (False, True):
        def on_step(step, state):
            if step == 2:
                promote_chunk(model, state, chunks[1], start)
        pre = prefill(model, prompt, [c if r else None for c, r in zip(chunks, resident)], mode="reuse",
                      resident=resident, extra_capacity=40)
        out, _ = speculative_generate(model, pre, NgramDrafter(prompt.chunk_ids), params, 0.0, prompt_ids=prompt,
                                      k=3, on_step=on_step, graphs=use)
        outs.append(out.token_ids)
    first = next((i for i, (x, y) in enumerate(zip(*outs)) if x != y), None)
    report("promotion mid-answer: graphs == plain", outs[0] == outs[1],
           "" if first is None else f"first differing token {first} of {len(outs[0])}: {outs[0][first-1:first+2]} vs "
                                    f"{outs[1][first-1:first+2]}")
    return failures


def prefill_checks(model_type: str, device: str) -> int:
    """The fast prefill paths against the plain layer loop, fp32: CUDA-graph recompute layers (on CPU: the
    padded computation they capture), graph replay for a second prompt of the same bucket, a placeholder,
    chunks in pinned host memory (layer-wise pipelined load) and the disk tier's pinned read."""
    import tempfile
    from pathlib import Path

    from kvblend.kvstore.tiers import DiskTier

    failures = 0
    fast = "graph" if device == "cuda" else "padded"

    def report(name: str, err: float, tol: float = 1e-4, extra: bool = True) -> None:
        nonlocal failures
        ok = err < tol and extra
        failures += not ok
        print(f"{model_type:6s} {device:4s} {name:40s} max|diff| {err:.2e} {'ok' if ok else 'FAIL'}")

    model = make_tiny(model_type)
    model.hf_model.to(device)
    model.inv_freq = model.inv_freq.to(device)
    for seed in (21, 22):  # the second prompt replays the graphs the first one captured
        prompt = random_prompt(model.shape.vocab_size, seed=seed)
        chunks = [build_chunk_kv(model, c) for c in prompt.chunk_ids]
        for mode, ratio in (("reuse", 0.0), ("blend", 0.15), ("blend", 0.5), ("blend", 1.0)):
            a = prefill(model, prompt, chunks, mode=mode, ratio=ratio, recompute="plain", extra_capacity=4)
            b = prefill(model, prompt, chunks, mode=mode, ratio=ratio, recompute=fast, extra_capacity=4)
            err = max((a.logits - b.logits).abs().max().item(), (a.state.k - b.state.k).abs().max().item(),
                      (a.state.v - b.state.v).abs().max().item())
            report(f"{fast} == plain {mode}@{ratio:g} seed {seed}", err,
                   extra=a.stats.selected_positions == b.stats.selected_positions and a.state.k.shape == b.state.k.shape)
        resident = [True, False] + [True] * (len(chunks) - 2)
        kw = dict(mode="blend", ratio=0.3, extra_capacity=4, resident=resident)
        a = prefill(model, prompt, chunks, recompute="plain", **kw)
        b = prefill(model, prompt, chunks, recompute=fast, **kw)
        report(f"{fast} == plain, placeholder, seed {seed}", (a.logits - b.logits).abs().max().item())
        if device == "cuda":
            pinned = [c.to("cpu", pin=True) for c in chunks]
            for mode in ("reuse", "blend"):
                a = prefill(model, prompt, chunks, mode=mode, ratio=0.3)
                b = prefill(model, prompt, pinned, mode=mode, ratio=0.3)
                err = max((a.logits - b.logits).abs().max().item(), (a.state.k - b.state.k).abs().max().item())
                report(f"pinned (pipelined) == resident {mode}", err, tol=1e-6)
    # the captured full prefill (padded at the end, causal; the runner's path where it measured faster) == the
    # plain loop, two prompts of one bucket (the second replays the first one's graph)
    from kvblend.model.runner import ModelRunner

    captured = ModelRunner(model, static_eager=device != "cuda")
    for seed in (41, 42):
        ids = random_prompt(model.shape.vocab_size, seed=seed).flat()[:150 + seed - 41]
        ref_state, ref = ModelRunner(model).forward(ids, 4, static=False)
        with torch.inference_mode():
            state = captured.new_state(len(ids) + 4, static=True)
            got = captured._full_captured(state, ids, fast)
        n = len(ids)
        report(f"full {fast} == plain loop, seed {seed}", max((got - ref).abs().max().item(),
               (state.k[:, :, :n] - ref_state.k[:, :, :n]).abs().max().item()))
    # the static-shape blend front (fusion/front_graph.py, one CUDA graph on CUDA) == the eager front, for the
    # selection policies it implements, on a 6-layer model (narrowing over 3 check layers leaves recompute layers)
    from kvblend.fusion.select import SelectionPolicy

    model6 = make_tiny(model_type, num_hidden_layers=6)
    model6.hf_model.to(device)
    model6.inv_freq = model6.inv_freq.to(device)
    policies = (SelectionPolicy("k"), SelectionPolicy("attn"), SelectionPolicy("k_attn_product", layers=3),
                SelectionPolicy("k_attn_product", first_tokens=2, layers=3))
    for seed in (31, 32):  # the second prompt (another length, same bucket) replays the first one's graphs
        prompt = random_prompt(model6.shape.vocab_size, seed=seed, chunk_lens=(90, 71 + seed - 31, 100),
                               prefix_len=13, query_len=26)
        chunks = [build_chunk_kv(model6, c) for c in prompt.chunk_ids]
        for pol in policies:
            for ratio in (0.15, 0.5):
                a = prefill(model6, prompt, chunks, ratio=ratio, selection=pol, recompute="plain", extra_capacity=4)
                b = prefill(model6, prompt, chunks, ratio=ratio, selection=pol, recompute=fast, extra_capacity=4)
                n = prompt.num_tokens
                err = max((a.logits - b.logits).abs().max().item(),
                          (a.state.k[:, :, :n] - b.state.k[:, :, :n]).abs().max().item())
                report(f"front {fast} == eager {pol.signal} l{pol.layers} f{pol.first_tokens} @{ratio:g} s{seed}", err,
                       extra=a.stats.selected_positions == b.stats.selected_positions)
    with tempfile.TemporaryDirectory() as tmp:
        disk = DiskTier(Path(tmp), 1 << 30)
        disk.save(chunks[0])
        disk.prefetch([chunks[0].key])
        got = disk.load(chunks[0].key)
        report("disk load (pinned read, crc32) == chunk", (got.kv.to(device) - chunks[0].kv).abs().max().item(),
               tol=1e-12, extra=got.kv.is_pinned() == torch.cuda.is_available())  # pinned wherever CUDA is
    return failures


def main() -> int:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}")
    failures = 0
    for model_type in ("llama", "qwen2"):
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            model = make_tiny(model_type)
            model.hf_model.to(device)
            model.inv_freq = model.inv_freq.to(device)
            prompt = random_prompt(model.shape.vocab_size, seed=5)
            chunks = [build_chunk_kv(model, c) for c in prompt.chunk_ids]
            ref = hf_full_logits(model, prompt)
            checks = {
                "blend@1.0 == HF full": prefill(model, prompt, chunks, mode="blend", ratio=1.0).logits,
                "full == HF full": prefill(model, prompt, mode="full").logits,
            }
            for name, got in checks.items():
                err = (got - ref).abs().max().item()
                ok = err < 1e-4
                failures += not ok
                print(f"{model_type:6s} {device:4s} {name:22s} max|diff| {err:.2e} {'ok' if ok else 'FAIL'}")
            reuse = prefill(model, prompt, chunks, mode="reuse", extra_capacity=2).logits
            err = (reuse - hf_naive_reuse_logits(model, prompt)).abs().max().item()
            failures += err >= 1e-4
            print(f"{model_type:6s} {device:4s} {'reuse == HF naive':22s} max|diff| {err:.2e} {'ok' if err < 1e-4 else 'FAIL'}")
            out = prefill(model, prompt, mode="full", extra_capacity=2)
            step = forward_tokens(model, out.state, [3])[0]
            ref2, _ = model.hf_forward_logits(torch.tensor(prompt.flat() + [3], device=device))
            err = (step - ref2[-1]).abs().max().item()
            failures += err >= 1e-4
            print(f"{model_type:6s} {device:4s} {'decode step == HF':22s} max|diff| {err:.2e} {'ok' if err < 1e-4 else 'FAIL'}")
    for model_type in ("llama", "qwen2"):
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            failures += prefill_checks(model_type, device)
    if torch.cuda.is_available():
        for model_type in ("llama", "qwen2"):
            failures += decode_checks(model_type)
    print("FAILURES", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
