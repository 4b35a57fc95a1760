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
from kvblend.model.shape import PRESETS, ModelShape, from_config_dict
from kvblend.vocab import DTYPE_ALIASES, DTYPE_BYTES


def _dtype_bytes(dtype: str) -> int:
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPE_BYTES:
        raise ConfigError(f"dtype: expected one of {', '.join([*DTYPE_ALIASES, 'fp8', 'int8'])}, got {dtype!r}")
    return DTYPE_BYTES[name]


def resolve_shape(model: str) -> ModelShape:
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
    return from_config_dict(config, path.parent.name)


def kv_bytes_per_token(d: ModelShape, dtype: str = "bfloat16") -> int:
    return d.num_layers * d.num_kv_heads * d.head_dim * 2 * _dtype_bytes(dtype)


def num_parameters(d: ModelShape) -> int:
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


def plan_budget(d: ModelShape, gpu_bytes: int, dtype: str = "bfloat16", workspace_fraction: float = 0.1,
                min_workspace_bytes: int = 1 << 30, chunk_tokens: int = 512,
                weights_dtype: str | None = None) -> BudgetPlan:
    """How many KV tokens and chunks fit after the weights and a workspace of
    max(min_workspace_bytes, workspace_fraction x GPU memory)."""
    if not 0 <= workspace_fraction < 1:
        raise ConfigError(f"workspace fraction must be in [0, 1), got {workspace_fraction}")
    if chunk_tokens < 1:
        raise ConfigError(f"chunk tokens must be >= 1, got {chunk_tokens}")
    per_token = kv_bytes_per_token(d, dtype)
    weights = num_parameters(d) * _dtype_bytes(weights_dtype or dtype)
    workspace = max(min_workspace_bytes, int(workspace_fraction * gpu_bytes))
    available = max(0, gpu_bytes - weights - workspace)
    max_tokens = available // per_token
    return BudgetPlan(d.name, dtype, gpu_bytes, weights, workspace, available, per_token, max_tokens,
                      chunk_tokens, max_tokens // chunk_tokens)
