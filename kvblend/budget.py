"""Token budget calculator: exact KV bytes per token and how many tokens / chunks fit in a GPU.

KV bytes per token = layers x kv_heads x head_dim x 2 (K and V) x dtype bytes (GQA counted by kv_heads).
Weights are counted from the config (embeddings, attention with optional biases, gated MLP, norms,
untied LM head). Available KV memory = GPU memory - weights - workspace (activations, allocator slack).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvblend.errors import ConfigError

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "fp8": 1, "int8": 1}


@dataclass(frozen=True, slots=True)
class ModelDims:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False


# Architecture shapes of well-known checkpoints (from their published config.json), so budgets can be
# planned without downloading anything.
PRESETS: dict[str, ModelDims] = {
    d.name: d
    for d in (
        ModelDims("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256),
        ModelDims("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256),
        ModelDims("llama-3-70b", 80, 8192, 64, 8, 128, 28672, 128256),
        ModelDims("mistral-7b", 32, 4096, 32, 8, 128, 14336, 32000),
        ModelDims("qwen2.5-7b", 28, 3584, 28, 4, 128, 18944, 152064, attention_bias=True),
        ModelDims("qwen2.5-1.5b", 28, 1536, 12, 2, 128, 8960, 151936, True, True),
        ModelDims("qwen2.5-coder-1.5b-instruct", 28, 1536, 12, 2, 128, 8960, 151936, True, True),
        ModelDims("qwen2.5-coder-0.5b-instruct", 24, 896, 14, 2, 64, 4864, 151936, True, True),
        ModelDims("smollm2-135m-instruct", 30, 576, 9, 3, 64, 1536, 49152, True),
    )
}
PRESETS["smollm2-135m"] = PRESETS["smollm2-135m-instruct"]


def dims_from_config(config: dict, name: str) -> ModelDims:
    try:
        heads = int(config["num_attention_heads"])
        return ModelDims(
            name=name,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=int(config["hidden_size"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: config.json lacks or mistypes field {exc}; is this a decoder LM config?") from None


def resolve_dims(model: str) -> ModelDims:
    """A preset name, or a folder / config.json path."""
    key = model.lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"model '{model}': not a known preset ({', '.join(sorted(PRESETS))}) nor a folder with "
                          f"config.json")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return dims_from_config(config, path.parent.name)


def kv_bytes_per_token(d: ModelDims, dtype: str = "bfloat16") -> int:
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype: expected one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return d.num_layers * d.num_kv_heads * d.head_dim * 2 * DTYPE_BYTES[dtype]


def num_parameters(d: ModelDims) -> int:
    q = d.num_heads * d.head_dim
    kv = d.num_kv_heads * d.head_dim
    attn = d.hidden_size * (q + 2 * kv) + q * d.hidden_size + (q + 2 * kv if d.attention_bias else 0)
    mlp = 3 * d.hidden_size * d.intermediate_size
    per_layer = attn + mlp + 2 * d.hidden_size
    embed = d.vocab_size * d.hidden_size
    return embed + d.num_layers * per_layer + d.hidden_size + (0 if d.tie_word_embeddings else embed)


@dataclass(frozen=True, slots=True)
class BudgetPlan:
    model: str
    dtype: str
    gpu_bytes: int
    weights_bytes: int
    workspace_bytes: int
    kv_bytes_available: int
    kv_bytes_per_token: int
    max_tokens: int
    chunk_tokens: int
    max_chunks: int


def plan_budget(d: ModelDims, gpu_bytes: int, dtype: str = "bfloat16", workspace_fraction: float = 0.1,
                min_workspace_bytes: int = 1 << 30, chunk_tokens: int = 512,
                weights_dtype: str | None = None) -> BudgetPlan:
    """How many KV tokens and chunks fit after the weights and a workspace of
    max(min_workspace_bytes, workspace_fraction x GPU memory)."""
    if not 0 <= workspace_fraction < 1:
        raise ConfigError(f"workspace fraction must be in [0, 1), got {workspace_fraction}")
    if chunk_tokens < 1:
        raise ConfigError(f"chunk tokens must be >= 1, got {chunk_tokens}")
    per_token = kv_bytes_per_token(d, dtype)
    weights = num_parameters(d) * DTYPE_BYTES[weights_dtype or dtype]
    workspace = max(min_workspace_bytes, int(workspace_fraction * gpu_bytes))
    available = max(0, gpu_bytes - weights - workspace)
    max_tokens = available // per_token
    return BudgetPlan(d.name, dtype, gpu_bytes, weights, workspace, available, per_token, max_tokens,
                      chunk_tokens, max_tokens // chunk_tokens)
