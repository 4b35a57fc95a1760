"""The only module that reaches into transformers internals.

It loads a llama / mistral / qwen2 checkpoint with transformers and exposes the pieces kvblend's own
layer driver needs (embedding, per-layer norms and projections, MLP, final norm, LM head, RoPE
frequencies), so that fusion/ never touches a transformers module attribute.  Tested on
transformers 5.17 (GPU machine) and 5.24 (CPU machine).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvblend.errors import ModelError
from kvblend.model.shape import ModelShape  # noqa: F401 (the one shape type; re-exported for callers)

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE variants whose rotation composes (only the per-dimension frequencies change, no magnitude
# scaling), so cached keys can be re-rotated by a position delta.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: Any) -> dict:
    """RoPE settings as a dict with at least rope_type and rope_theta (v5 `rope_parameters`)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # older configs: rope_theta + rope_scaling
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return int(window) if window else None


def shape_from_config(config: Any, where: str = "config") -> ModelShape:
    """Check that kvblend can drive this architecture and return its shape; ModelError otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{where}: unsupported architecture '{model_type}'; kvblend supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    rope = rope_parameters(config)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ModelError(
            f"{where}: RoPE type '{rope['rope_type']}' is not supported (cached keys cannot be re-rotated "
            f"exactly); supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position_embeddings=config.max_position_embeddings,
        rope_type=rope["rope_type"],
        rope_theta=float(rope["rope_theta"]),
        sliding_window=_sliding_window(config),
        attention_bias=bool(getattr(config, "attention_bias", model_type == "qwen2")),
    )


@dataclass(frozen=True, slots=True)
class LayerModules:
    """One decoder layer's modules, as kvblend's layer driver calls them."""

    input_norm: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    post_norm: nn.Module
    mlp: nn.Module


@dataclass(frozen=True, slots=True)
class FusedLayer:
    """One layer's projections as one matmul each: QKV [Hq*D + 2*Hkv*D, hidden] and gate/up [2*I, hidden].

    Built once (at load, again only if the weights moved to another device or dtype). The modules'
    own q/k/v and gate/up parameters are views into these tensors, so there is one copy of the weights
    and transformers' forward keeps working on the same storage.
    """

    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down_proj: nn.Module
    act_fn: Any


class DecoderModel:
    """A loaded causal LM, taken apart for layer-by-layer driving.

    Shapes: hidden states are [T, hidden]; per-layer q is [H, T, D], k/v are [H_kv, T, D].
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any, name: str, fingerprint: str):
        hf_model.eval()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.name = name
        self.fingerprint = fingerprint
        self.shape = shape_from_config(hf_model.config, where=name)
        inner = hf_model.model
        self.embed_tokens: nn.Module = inner.embed_tokens
        self.final_norm: nn.Module = inner.norm
        self.lm_head: nn.Module = hf_model.lm_head
        self.layers = [
            LayerModules(
                input_norm=layer.input_layernorm,
                q_proj=layer.self_attn.q_proj,
                k_proj=layer.self_attn.k_proj,
                v_proj=layer.self_attn.v_proj,
                o_proj=layer.self_attn.o_proj,
                post_norm=layer.post_attention_layernorm,
                mlp=layer.mlp,
            )
            for layer in inner.layers
        ]
        self.attn_scale = float(inner.layers[0].self_attn.scaling)
        rotary = inner.rotary_emb
        self.rope_attention_scaling = float(rotary.attention_scaling)
        if self.rope_attention_scaling != 1.0:
            raise ModelError(f"{name}: RoPE attention scaling {self.rope_attention_scaling} != 1 is not supported")
        self.inv_freq = rotary.inv_freq.detach().to(torch.float32).clone()  # [D/2]
        self._mlp_modules = [layer.mlp for layer in inner.layers]
        self._fused: list[FusedLayer] = []
        self._fuse()

    def _fuse(self) -> None:
        """Concatenate each layer's q/k/v and gate/up weights (and biases) and make the modules' parameters
        views into them (one copy of the weights)."""
        def cat_as_views(mods: list[nn.Linear], attr: str) -> torch.Tensor | None:
            parts = [getattr(m, attr) for m in mods]
            if any(p is None for p in parts):
                return None
            fused = torch.cat([p.detach() for p in parts], dim=0)
            offset = 0
            for m, p in zip(mods, parts):
                view = fused[offset:offset + p.shape[0]]
                setattr(m, attr, nn.Parameter(view, requires_grad=False))
                offset += p.shape[0]
            return fused

        fused = []
        # never inference tensors (fusing can happen inside a prefill): transformers' forward must keep
        # working on these parameters outside inference mode
        with torch.inference_mode(False), torch.no_grad():
            for lm, mlp in zip(self.layers, self._mlp_modules):
                qkv_mods = [lm.q_proj, lm.k_proj, lm.v_proj]
                gu_mods = [mlp.gate_proj, mlp.up_proj]
                fused.append(FusedLayer(
                    qkv_weight=cat_as_views(qkv_mods, "weight"), qkv_bias=cat_as_views(qkv_mods, "bias"),
                    gate_up_weight=cat_as_views(gu_mods, "weight"), gate_up_bias=cat_as_views(gu_mods, "bias"),
                    down_proj=mlp.down_proj, act_fn=mlp.act_fn))
        self._fused = fused

    def fused_layer(self, layer: int) -> FusedLayer:
        """The layer's fused projections; rebuilt first if the model's weights were moved (e.g. .to(device))
        since they were fused (the modules' parameters then no longer share the fused storage)."""
        f = self._fused[layer]
        if self.layers[layer].q_proj.weight.data_ptr() != f.qkv_weight.data_ptr() or \
                self._mlp_modules[layer].gate_proj.weight.data_ptr() != f.gate_up_weight.data_ptr():
            self._fuse()
            f = self._fused[layer]
        return f

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.hf_model, "generation_config", None), self.hf_model.config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif eos:
                ids.update(int(e) for e in eos)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def hf_forward_logits(self, input_ids: torch.Tensor, cache: Any = None, position_ids: torch.Tensor | None = None):
        """transformers' own forward (reference for tests); returns (logits [T, V], cache)."""
        kwargs = {_cache_kwarg(self.hf_model): cache} if cache is not None else {}
        if position_ids is not None:
            position_ids = position_ids.to(self.device)
        out = self.hf_model(input_ids=input_ids[None].to(self.device), position_ids=position_ids, use_cache=True,
                            **kwargs)
        return out.logits[0], out.past_key_values


def _cache_kwarg(hf_model: nn.Module) -> str:
    """transformers 5.24 names the forward's cache argument `cache`; 5.17 `past_key_values`."""
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def kv_from_hf_cache(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (k, v) tensors, each [H_kv, T, D], from a transformers Cache object."""
    out = []
    for layer in cache.layers:
        out.append((layer.keys[0], layer.values[0]))
    return out


def hf_cache_from_kv(kv: list[tuple[torch.Tensor, torch.Tensor]], config: Any) -> Any:
    """A transformers DynamicCache holding the given per-layer (k, v) [H_kv, T, D] tensors."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(kv):
        cache.update(k[None].contiguous(), v[None].contiguous(), i)
    return cache


def resolve_dtype(dtype: str, device: torch.device, shape: tuple[int, int] | None = None) -> torch.dtype:
    """A dtype name -> torch dtype. "auto": bf16 on CUDA; on CPU bf16 only where the CPU has bf16 matrix support
    and a one-time probe with matmuls of the model's (hidden, intermediate) `shape` finds it faster, else fp32
    (kvblend.model.dtype_probe). Explicit names never probe."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        from kvblend.model.dtype_probe import auto_cpu_dtype

        return auto_cpu_dtype(shape).torch_dtype
    if dtype not in table:
        raise ModelError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    return table[dtype]


def load_hf_folder(folder: Path, dtype: torch.dtype, device: torch.device, name: str, fingerprint: str) -> DecoderModel:
    """Load a local Hugging Face checkpoint folder (config.json + safetensors + tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a model folder (no config.json); pass a Hugging Face checkpoint folder "
                         f"or a named model")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"{folder}/config.json: cannot be read ({str(exc).splitlines()[0]})") from None
    shape_from_config(config, where=str(folder))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading a converted folder takes seconds; keep stderr for errors
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
    ).to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError):
        tokenizer = None
        log.warning("%s: no tokenizer found; token ids only", folder)
    return DecoderModel(model, tokenizer, name=name, fingerprint=fingerprint)


def convert_gguf(gguf_path: Path, out_dir: Path, save_dtype: torch.dtype) -> None:
    """Dequantise a GGUF into a plain safetensors checkpoint folder (config, weights, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = gguf_path.parent, gguf_path.name
    log.info("converting %s (one-time, can take a minute)", gguf_path)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    shape_from_config(config, where=str(gguf_path))
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"{gguf_path}: conversion mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.to(save_dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def random_model(config_kwargs: dict, model_type: str = "llama", seed: int = 0, dtype=torch.float32,
                 tokenizer: Any = None, name: str = "random") -> DecoderModel:
    """A random-weight model of a given shape (tests and speed benchmarks; timing does not depend on weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **config_kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return DecoderModel(model, tokenizer, name=name, fingerprint=f"{name}-{model_type}-seed{seed}")
