"""Shared fixtures: tiny random-weight models of the supported families (CPU, fp32)."""

from __future__ import annotations

import os

import pytest
import torch

from kvblend.model.hf import random_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def make_tiny(model_type: str = "llama", **overrides):
    kw = dict(TINY)
    if model_type == "qwen2":
        kw.update(use_sliding_window=False)
    kw.update(overrides)
    return random_model(kw, model_type=model_type, seed=0, name=f"tiny-{model_type}")


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture(scope="session")
def tiny_qwen2():
    return make_tiny("qwen2")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request):
    return make_tiny(request.param)
