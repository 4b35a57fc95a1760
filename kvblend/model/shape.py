"""One model-shape type (torch-free): what the layer driver, the token budget calculator and the benchmarks'
random-weight models of real shapes need to know about an architecture.

`model.hf.shape_from_config` fills it from a loaded transformers config (and checks kvblend can drive it);
`from_config_dict` fills it from a config.json dict without transformers; `PRESETS` holds the published shapes
of well-known checkpoints; `ModelShape.hf_config()` gives the kwargs of a transformers config of that shape.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvblend.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    model_type: str = "llama"
    max_position_embeddings: int = 8192
    rope_type: str = "default"
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    name: str = ""
    rms_norm_eps: float = 1e-5
    rope_scaling: tuple[tuple[str, float], ...] = ()  # extra rope_parameters (e.g. llama3's factor, ...)

    def hf_config(self) -> dict:
        """Keyword arguments of a transformers config of this shape (random-weight models for benchmarks)."""
        kw = dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                  num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                  head_dim=self.head_dim, intermediate_size=self.intermediate_size, vocab_size=self.vocab_size,
                  max_position_embeddings=self.max_position_embeddings,
                  tie_word_embeddings=self.tie_word_embeddings, rms_norm_eps=self.rms_norm_eps,
                  rope_parameters={"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                                   **dict(self.rope_scaling)})
        if self.model_type == "qwen2":
            kw["use_sliding_window"] = self.sliding_window is not None
        elif self.attention_bias:
            kw["attention_bias"] = True
        return kw


def _preset(name: str, model_type: str, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
            inter: int, vocab: int, tied: bool, bias: bool, context: int, theta: float, eps: float) -> ModelShape:
    return ModelShape(layers, hidden, heads, kv_heads, head_dim, inter, vocab, tied, bias, model_type, context,
                      "default", theta, None, name, eps)


# Published config.json shapes, so budgets can be planned and benchmarks run without downloading anything.
PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _preset("llama-3-8b", "llama", 32, 4096, 32, 8, 128, 14336, 128256, False, False, 8192, 500000.0, 1e-5),
        _preset("llama-3-70b", "llama", 80, 8192, 64, 8, 128, 28672, 128256, False, False, 8192, 500000.0, 1e-5),
        _preset("mistral-7b", "mistral", 32, 4096, 32, 8, 128, 14336, 32000, False, False, 32768, 1000000.0, 1e-5),
        _preset("qwen2.5-7b", "qwen2", 28, 3584, 28, 4, 128, 18944, 152064, False, True, 32768, 1000000.0, 1e-6),
        _preset("qwen2.5-1.5b", "qwen2", 28, 1536, 12, 2, 128, 8960, 151936, True, True, 32768, 1000000.0, 1e-6),
        _preset("qwen2.5-coder-1.5b-instruct", "qwen2", 28, 1536, 12, 2, 128, 8960, 151936, True, True, 32768,
                1000000.0, 1e-6),
        _preset("qwen2.5-coder-0.5b-instruct", "qwen2", 24, 896, 14, 2, 64, 4864, 151936, True, True, 32768,
                1000000.0, 1e-6),
        _preset("smollm2-135m-instruct", "llama", 30, 576, 9, 3, 64, 1536, 49152, True, False, 8192, 100000.0, 1e-5),
    )
}
# Llama-3.1-8B: 128K positions through llama3 RoPE scaling (its published config.json)
PRESETS["llama-3.1-8b"] = replace(
    _preset("llama-3.1-8b", "llama", 32, 4096, 32, 8, 128, 14336, 128256, False, False, 131072, 500000.0, 1e-5),
    rope_type="llama3", rope_scaling=(("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                                      ("original_max_position_embeddings", 8192)))
PRESETS["llama3.1-8b"] = PRESETS["llama-3.1-8b"]
PRESETS["smollm2-135m"] = PRESETS["smollm2-135m-instruct"]
PRESETS["llama3-8b"] = PRESETS["llama-3-8b"]


def from_config_dict(config: dict, name: str) -> ModelShape:
    """The shape of a config.json dict (no transformers needed); ConfigError when a field is missing."""
    try:
        heads = int(config["num_attention_heads"])
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        return ModelShape(
            name=name,
            model_type=str(config.get("model_type", "llama")),
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=int(config["hidden_size"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            max_position_embeddings=int(config.get("max_position_embeddings") or 0),
            rope_type=str(rope.get("rope_type", rope.get("type", "default"))),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: config.json lacks or mistypes field {exc}; is this a decoder LM config?") from None
