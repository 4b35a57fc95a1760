"""One vocabulary for the names users choose from: modes, drafters, proxies, dtypes, retrieval settings.

Torch-free, so config validation, argparse choices and the budget calculator import it without loading torch.
Each `Literal` is the type; the tuple beside it (its arguments) feeds validation and CLI choices.
"""

from __future__ import annotations

from typing import Literal, get_args

DEFAULT_MODEL = "smollm2-135m-instruct"

BlendMode = Literal["full", "reuse", "blend"]
MODES: tuple[str, ...] = get_args(BlendMode)

# selection signal of a blended prefill (kvblend/fusion/select.py): K / V deviation, the query's attention, both
ScoreOn = Literal["k", "v", "attn", "k_attn_rank", "k_attn_product", "draft_attn", "k_draft_product"]
SCORE_ON: tuple[str, ...] = get_args(ScoreOn)

# selection signals beyond SCORE_ON that the selection understands (quality-frontier candidates; a signal moves
# to SCORE_ON, and so becomes an EngineConfig / CLI choice, once it wins)
EXTRA_SIGNALS: tuple[str, ...] = ("k_tail_product",)
SELECTION_SIGNALS: tuple[str, ...] = (*SCORE_ON, *EXTRA_SIGNALS)

DEFAULT_RATIO = 0.15  # fraction of chunk tokens a blend recomputes (LMCache's default); the one spelling

AttentionKernel = Literal["auto", "sdpa", "flex"]
ATTENTION_KERNELS: tuple[str, ...] = get_args(AttentionKernel)
FlexCompile = Literal["auto", "static", "dynamic"]
FLEX_COMPILE_MODES: tuple[str, ...] = get_args(FlexCompile)

DrafterName = Literal["ngram", "model", "none"]
DRAFTERS: tuple[str, ...] = get_args(DrafterName)

ProxyName = Literal["draft_attention", "key_bounds", "ngram_source", "none"]
PROXIES: tuple[str, ...] = get_args(ProxyName)

RetrievalMode = Literal["bm25", "dense", "both", "colbert"]
RETRIEVAL_MODES: tuple[str, ...] = get_args(RetrievalMode)

RetrievalScope = Literal["per_sample", "pooled"]
RETRIEVAL_SCOPES: tuple[str, ...] = get_args(RetrievalScope)

Tier = Literal["gpu", "cpu", "disk"]
TIERS: tuple[str, ...] = get_args(Tier)
# the shared tier behind disk (kvblend/kvstore/remote.py): chunks are found there, never staged there
REMOTE_TIER = "remote"
HIT_TIERS: tuple[str, ...] = (*TIERS, REMOTE_TIER)  # where a chunk read can be answered from

# what each chunk is prefilled after (rows dropped): auto = BOS if the tokenizer adds one, none, the prompt's
# shared prefix, or a fixed short sink text (kvblend/data/prompt.py::chunk_context_ids)
ChunkSink = Literal["auto", "none", "prefix", "text"]
CHUNK_SINKS: tuple[str, ...] = get_args(ChunkSink)

# dtype names: every accepted spelling -> the canonical torch attribute name; "auto" is decided at run time
DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}
DTYPES: tuple[str, ...] = ("auto", *DTYPE_ALIASES)
# bytes per element, for KV budgets (fp8 / int8 only as a planning figure: kvblend computes in the above)
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1}


def canonical_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16'; 'auto' stays; KeyError for unknown names."""
    return name if name == "auto" else DTYPE_ALIASES[name]


def dtype_bytes(name: str) -> int:
    return DTYPE_BYTES[DTYPE_ALIASES.get(name, name)]
