"""Shared fixtures: tiny random-weight models of the supported families (CPU, fp32)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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


def make_tiny_folder(out: Path, **overrides) -> Path:
    """A 2-layer random llama saved as a Hugging Face folder with the real SmolLM2 tokenizer files (prompts built
    from text); overrides: config values (hidden_size 64, 4 / 2 heads, context 8192 by default)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvblend.model.registry import NAMED_MODELS, converted_folder

    src = converted_folder(NAMED_MODELS["smollm2-135m-instruct"])
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=True)
    kw.update(overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kw), dtype=torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture(scope="session")
def tiny_qwen2():
    return make_tiny("qwen2")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request):
    return make_tiny(request.param)


def start_redis(folder: Path) -> RedisServer:
    """A RedisServer, or a pytest skip when the binary is not installed (.ci/run installs it)."""
    from kvblend.serve.process import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server; .ci/run installs it)")
    return RedisServer(folder)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()
