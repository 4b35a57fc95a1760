"""EngineConfig: every knob with its default, validated once in __post_init__."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, fields

from kvblend.errors import ConfigError
from kvblend.vocab import (ATTENTION_KERNELS, CHUNK_SINKS, DEFAULT_MODEL, DEFAULT_RATIO, DRAFTERS, DTYPES,
                            FLEX_COMPILE_MODES, MODES, PROXIES, RETRIEVAL_MODES, RETRIEVAL_SCOPES, SCORE_ON,
                            SELECTION_SIGNALS, TIERS)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str, what: str = "size") -> int:
    """'80GiB', '512MB', '1.5 GB', 1024 -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a byte size like 80GiB, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{what}: must be >= 0, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what}: expected a byte size like 80GiB, 512MB or 1048576, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _alts(names) -> str:
    """('a', 'b', 'c') -> 'a, b or c' (for error messages)."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


REMOTE_SCHEMES = ("redis", "rediss", "unix")  # what the redis client reads; a Valkey server speaks the same protocol


def check_remote_url(url: str) -> str:
    """The remote store URL if it reads as redis://HOST:PORT[/DB] (rediss://, unix:///path too) or is
    empty; ConfigError otherwise. Whether a server answers there is the remote tier's business."""
    from urllib.parse import urlsplit

    if not url:
        return url
    what = f"remote_store: expected redis://HOST:PORT[/DB], got {url!r}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        raise ConfigError(what + " (bad port)") from None
    if parts.scheme not in REMOTE_SCHEMES:
        raise ConfigError(what + f" (scheme must be {_alts(REMOTE_SCHEMES)})")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(what + " (unix:// needs a socket path)")
        return url
    if not parts.hostname:
        raise ConfigError(what + " (no host)")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(what + f" (database '{db}' is not a number)")
    return url


@dataclass(frozen=True, slots=True)
class SelectionPolicy:
    """How a blended prefill picks the chunk tokens it recomputes (kvblend/fusion/select.py): the signal,
    each chunk's first tokens always kept (EPIC), and progressive narrowing over `layers` check layers.
    The field defaults are plain CacheBlend (LMCache's K deviation); kvblend's default variant is
    DEFAULT_SELECTION (what BlendOptions and EngineConfig start from)."""

    signal: str = "k"
    first_tokens: int = 0
    layers: int = 1

    def __post_init__(self) -> None:
        if self.signal not in SELECTION_SIGNALS:
            raise ValueError(f"unknown selection signal '{self.signal}'; use one of {', '.join(SELECTION_SIGNALS)}")
        if not isinstance(self.first_tokens, int) or self.first_tokens < 0:
            raise ValueError(f"first_tokens must be an integer >= 0, got {self.first_tokens!r}")
        if not isinstance(self.layers, int) or self.layers < 1:
            raise ValueError(f"layers must be an integer >= 1, got {self.layers!r}")

    @property
    def needs_attention(self) -> bool:
        return self.signal in ("attn", "k_attn_rank", "k_attn_product", "k_tail_product")

    @property
    def needs_draft(self) -> bool:
        return self.signal in ("draft_attn", "k_draft_product")

    def budget(self, step: int, num_steps: int, ratio: float, num_chunk_tokens: int) -> int:
        """Chunk tokens kept after check step `step` of `num_steps`: (num_steps - step) x ratio of them, so
        the last step keeps exactly ceil(ratio x chunk tokens) and a ratio of 0 or 1 is kept at every step."""
        frac = 1.0 if ratio >= 1.0 else min(1.0, ratio * (num_steps - step))
        return num_to_select(num_chunk_tokens, frac)


def num_to_select(num_tokens: int, ratio: float) -> int:
    """ceil(ratio * num_tokens), so ratio 1.0 selects every token and ratio 0 none."""
    return min(num_tokens, max(0, math.ceil(ratio * num_tokens - 1e-9)))


# the default variant ("prefix_epic_product_narrow5" of docs/QUALITY.md: first 8 tokens of each chunk + K
# deviation x query attention, narrowed over 5 check layers); the one spelling of the default selection
DEFAULT_SELECTION = SelectionPolicy(signal="k_attn_product", first_tokens=8, layers=5)


@dataclass(frozen=True, slots=True)
class BlendOptions:
    """How one prefill reuses cached chunks: mode (full | reuse | blend), the recomputed fraction, the first
    check layer and the selection policy. Defaults = EngineConfig's."""

    mode: str = "blend"
    ratio: float = DEFAULT_RATIO
    check_layer: int = 1
    selection: SelectionPolicy = DEFAULT_SELECTION

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}'; use one of {', '.join(MODES)}")
        if not (isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio <= 1.0):
            raise ValueError(f"ratio must be a number in [0, 1], got {self.ratio!r}")


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """How the model runner executes (handed to kvblend.model.runner.ModelRunner when it is built; the
    environment is read only by load_config: KVBLEND_CUDA_GRAPHS, KVBLEND_FRONT_GRAPH, KVBLEND_ATTENTION,
    KVBLEND_FLEX_COMPILE). Results are identical whatever the choice; only speed differs."""

    cuda_graphs: bool = True  # on CUDA: the blend front, the recompute layers and decode steps as CUDA graphs
    front_graph: bool = True  # the blend front in static shapes (one graph); False: the eager front
    attention: str = "auto"  # masked-attention kernel: auto (= sdpa) | sdpa | flex (model/attention.py)
    flex_compile: str = "auto"  # flex only: auto (static on CPU, dynamic on CUDA) | static | dynamic
    max_graphs: int = 24  # captured graphs kept per runner (least recently used dropped), one memory pool

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention: expected {_alts(ATTENTION_KERNELS)}, got {self.attention!r}")
        if self.flex_compile not in FLEX_COMPILE_MODES:
            raise ValueError(f"flex_compile: expected {_alts(FLEX_COMPILE_MODES)}, got {self.flex_compile!r}")
        if not isinstance(self.max_graphs, int) or self.max_graphs < 1:
            raise ValueError(f"max_graphs: expected an integer >= 1, got {self.max_graphs!r}")


@dataclass(slots=True)
class EngineConfig:
    # model
    model: str = DEFAULT_MODEL  # named model or local Hugging Face folder
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    home: str = ""  # KVBLEND_HOME (converted models, chunk store); "" = $KVBLEND_HOME or ~/.cache/kvblend
    # prompt
    chat_template: bool = True  # wrap prefix...query in the tokenizer's chat template when it has one
    # defaults of the next four: the best variant of docs/QUALITY.md ("prefix_epic_product_narrow5": lowest
    # first-token KL on samsum, tied on musique_s, held-out samples included); plain CacheBlend
    # is chunk_sink auto, score_on k, select_first_tokens 0, select_layers 1
    chunk_sink: str = "prefix"  # what each chunk is prefilled after (rows dropped): auto (BOS if the tokenizer adds one) | none | prefix (the prompt's shared prefix) | text (a fixed short sink text)
    # blending
    mode: str = "blend"  # full | reuse | blend
    ratio: float = DEFAULT_RATIO  # fraction of chunk tokens recomputed in blend mode (LMCache default)
    check_layer: int = 1
    score_on: str = DEFAULT_SELECTION.signal  # selection signal: k | v deviation (LMCache | original CacheBlend), attn (query attention), k_attn_rank, k_attn_product, draft_attn | k_draft_product (a draft model's attention, CacheClip; needs draft_model)
    select_first_tokens: int = DEFAULT_SELECTION.first_tokens  # each chunk's first N tokens always recomputed (EPIC), inside the ratio budget
    select_layers: int = DEFAULT_SELECTION.layers  # progressive narrowing over this many check layers (N x ratio, ..., 1 x ratio)
    # generation
    max_new_tokens: int = 0  # 0 = the dataset's default (32 for QA, 128 for samsum)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop_on_newline: bool = True
    seed: int = 0
    # chunk store
    gpu_budget: str = "4GiB"
    cpu_budget: str = "16GiB"
    disk_budget: str = "50GiB"  # capped by the filesystem's free space at run time
    store_text: bool = False  # keep each chunk's text in its sidecar (default: token ids and a hash only)
    remote_store: str = ""  # redis://HOST:PORT[/DB] (Redis or Valkey): the chunk tier shared by processes and replicas; "" = none
    remote_budget: str = "64GiB"  # bytes of chunk KV the remote tier may hold (least recently used evicted)
    remote_ttl: int = 604800  # seconds an unused remote chunk lives (0 = no expiry)
    gpu_chunks: int = 2  # chunks resident on the GPU tier (best by retrieval score); the rest are CPU placeholders
    start_tier: str = "cpu"  # tier every chunk is staged on before each timed answer of a comparison: gpu | cpu | disk
    warm_ttft: bool = True  # decode/run: also time each first token with the chunks GPU-resident (a 2nd prefill)
    prefetch: bool = True  # decode/run, start_tier disk: next sample's chunks read into the CPU tier during a decode
    # speculative decoding with promotion (decode --speculative)
    drafter: str = "ngram"  # ngram | model | none
    draft_model: str = ""  # named model or folder for drafter=model (same tokenizer as the target)
    proxy: str = "key_bounds"  # draft_attention | key_bounds | ngram_source | none
    promote_threshold: float = 0.3  # proxy share of chunk attention that triggers a promotion
    spec_k: int = 4  # drafted tokens per verification pass
    # pipeline
    dataset: str = "musique_s"  # known name (musique_s, wikimqa_s, samsum, toy) or a data file path
    limit: int = 0  # 0 = every sample
    retrieval_mode: str = "both"  # bm25 | dense | both (hybrid, RRF) | colbert
    retrieval_scope: str = "per_sample"  # per_sample | pooled
    top_k: int = 5  # retrieved chunks per question
    max_context_tokens: int = 0  # cap on chunk tokens (middle chunks dropped); 0 = dataset default (samsum 3400)
    results_dir: str = "results"
    # runtime (RuntimeOptions: speed only, never results)
    cuda_graphs: bool = True  # CUDA graphs for the blend front, recompute layers and decode steps (CUDA only)
    front_graph: bool = True  # the blend front in static shapes (one CUDA graph); false: the eager front
    attention: str = "auto"  # masked-attention kernel: auto (sdpa) | sdpa | flex
    flex_compile: str = "auto"  # FlexAttention compile mode: auto | static | dynamic

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.mode in MODES, f"mode: expected {_alts(MODES)}, got {self.mode!r}")
        need(isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio <= 1.0,
             f"ratio: expected a number in [0, 1], got {self.ratio!r}")
        need(isinstance(self.check_layer, int) and self.check_layer >= 1,
             f"check_layer: expected an integer >= 1, got {self.check_layer!r}")
        need(self.score_on in SCORE_ON, f"score_on: expected {_alts(SCORE_ON)}, got {self.score_on!r}")
        need(isinstance(self.select_first_tokens, int) and self.select_first_tokens >= 0,
             f"select_first_tokens: expected an integer >= 0, got {self.select_first_tokens!r}")
        need(isinstance(self.select_layers, int) and self.select_layers >= 1,
             f"select_layers: expected an integer >= 1, got {self.select_layers!r}")
        need(self.dtype in DTYPES, f"dtype: expected auto, float32, bfloat16 or float16, got {self.dtype!r}")
        need(self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"),
             f"device: expected auto, cpu or cuda, got {self.device!r}")
        need(self.chunk_sink in CHUNK_SINKS, f"chunk_sink: expected {_alts(CHUNK_SINKS)}, got {self.chunk_sink!r}")
        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
             f"max_new_tokens: expected an integer >= 0 (0 = dataset default), got {self.max_new_tokens!r}")
        need(isinstance(self.temperature, (int, float)) and self.temperature >= 0,
             f"temperature: expected a number >= 0, got {self.temperature!r}")
        need(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
             f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        need(isinstance(self.gpu_chunks, int) and self.gpu_chunks >= 0,
             f"gpu_chunks: expected an integer >= 0, got {self.gpu_chunks!r}")
        need(self.start_tier in TIERS, f"start_tier: expected {_alts(TIERS)}, got {self.start_tier!r}")
        need(isinstance(self.seed, int), f"seed: expected an integer, got {self.seed!r}")
        need(self.drafter in DRAFTERS, f"drafter: expected {_alts(DRAFTERS)}, got {self.drafter!r}")
        need(self.drafter != "model" or bool(self.draft_model), "drafter 'model' needs draft_model (--draft-model)")
        need(self.score_on not in ("draft_attn", "k_draft_product") or bool(self.draft_model),
             f"score_on {self.score_on} needs draft_model (--draft-model): the draft's attention is the signal")
        need(self.proxy in PROXIES, f"proxy: expected {_alts(PROXIES)}, got {self.proxy!r}")
        need(self.proxy != "draft_attention" or self.drafter == "model",
             "proxy 'draft_attention' needs drafter 'model' (the draft attends to every chunk)")
        need(isinstance(self.promote_threshold, (int, float)) and 0 <= self.promote_threshold <= 1,
             f"promote_threshold: expected a number in [0, 1], got {self.promote_threshold!r}")
        need(isinstance(self.spec_k, int) and self.spec_k >= 0, f"spec_k: expected an integer >= 0, got {self.spec_k!r}")
        need(isinstance(self.limit, int) and self.limit >= 0, f"limit: expected an integer >= 0, got {self.limit!r}")
        need(isinstance(self.max_context_tokens, int) and self.max_context_tokens >= 0,
             f"max_context_tokens: expected an integer >= 0, got {self.max_context_tokens!r}")
        need(isinstance(self.top_k, int) and self.top_k >= 1, f"top_k: expected an integer >= 1, got {self.top_k!r}")
        need(self.retrieval_mode in RETRIEVAL_MODES,
             f"retrieval_mode: expected {_alts(RETRIEVAL_MODES)}, got {self.retrieval_mode!r}")
        need(self.retrieval_scope in RETRIEVAL_SCOPES,
             f"retrieval_scope: expected {_alts(RETRIEVAL_SCOPES)}, got {self.retrieval_scope!r}")
        for name in ("gpu_budget", "cpu_budget", "disk_budget", "remote_budget"):
            parse_bytes(getattr(self, name), name)
        check_remote_url(self.remote_store)
        need(isinstance(self.remote_ttl, int) and self.remote_ttl >= 0,
             f"remote_ttl: expected an integer >= 0 (seconds; 0 = no expiry), got {self.remote_ttl!r}")
        try:
            self.runtime
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def selection(self) -> SelectionPolicy:
        return SelectionPolicy(self.score_on, self.select_first_tokens, self.select_layers)

    @property
    def blend(self) -> BlendOptions:
        return BlendOptions(self.mode, self.ratio, self.check_layer, self.selection)

    @property
    def runtime(self) -> RuntimeOptions:
        return RuntimeOptions(cuda_graphs=self.cuda_graphs, front_graph=self.front_graph,
                              attention=self.attention, flex_compile=self.flex_compile)

    def budget_bytes(self, tier: str) -> int:
        return parse_bytes(getattr(self, f"{tier}_budget"), f"{tier}_budget")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def as_dict(self) -> dict:
        return asdict(self)


ENV_PREFIX = "KVBLEND_"


def _coerce(name: str, value: object, kind: type, source: str) -> object:
    """Convert a file or environment value to the field's type; ConfigError naming the source."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: {name}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: {name}: expected an integer, got {value!r}")
        try:
            return int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise ConfigError(f"{source}: {name}: expected an integer, got {value!r}") from None
    if kind is float:
        try:
            return float(value) if not isinstance(value, bool) else _raise()
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {name}: expected a number, got {value!r}") from None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"{source}: {name}: expected a string, got {value!r}")
    return str(value)


def _raise() -> float:
    raise ValueError


def _field_types() -> dict[str, type]:
    table = {"int": int, "float": float, "bool": bool, "str": str}
    return {f.name: table[str(f.type)] for f in fields(EngineConfig)}


# old setting names still accepted (with one deprecation log line) in TOML files and KVBLEND_* variables
DEPRECATED_KEYS = {"top_k_gpu": "gpu_chunks", "max_gpu_chunks": "gpu_chunks"}


def _current_name(key: str, source: str) -> str:
    new = DEPRECATED_KEYS.get(key)
    if new is None:
        return key
    logging.getLogger(__name__).warning("%s: setting '%s' is deprecated; it is now called '%s'", source, key, new)
    return new


def load_config(path: str | None = None, flags: dict | None = None, environ: dict | None = None) -> EngineConfig:
    """Defaults < TOML file < KVBLEND_<FIELD> environment variables < flags (None values are ignored)."""
    import os
    import tomllib
    from pathlib import Path

    types = _field_types()
    values: dict[str, object] = {}
    if path:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid TOML ({str(exc).splitlines()[0]})") from None
        data = data.get("kvblend", data) if isinstance(data.get("kvblend"), dict) else data
        for key, value in data.items():
            key = _current_name(key, str(p))
            if key not in types:
                raise ConfigError(f"{p}: unknown key '{key}'; known keys: {', '.join(types)}")
            values[key] = _coerce(key, value, types[key], str(p))
    env = os.environ if environ is None else environ
    for old, new in DEPRECATED_KEYS.items():
        var = ENV_PREFIX + old.upper()
        if var in env and env[var] != "" and (ENV_PREFIX + new.upper()) not in env:
            values[_current_name(old, f"environment {var}")] = _coerce(new, env[var], types[new], f"environment {var}")
    for name, kind in types.items():
        var = ENV_PREFIX + name.upper()
        if var in env and env[var] != "":
            values[name] = _coerce(name, env[var], kind, f"environment {var}")
    for name, value in (flags or {}).items():
        if value is not None:
            if name not in types:
                raise ConfigError(f"unknown setting '{name}'")
            values[name] = value
    return EngineConfig(**values)
