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

from kvblend.fusion.blend import forward_tokens, prefill  # noqa: E402
from kvblend.kvstore.builder import build_chunk_kv  # noqa: E402


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
    print("FAILURES", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
