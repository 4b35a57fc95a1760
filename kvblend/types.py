"""Typed records passed between pipeline stages.

Data flow (no stage imports a later stage):
    data -> retrieval -> kvstore -> fusion (blend) -> generation -> eval
"""

from __future__ import annotations

from dataclasses import dataclass, field



@dataclass(frozen=True, slots=True)
class Passage:
    """One retrievable passage of a sample (text only; tokenisation happens in data.prompt)."""

    passage_id: str  # unique within its dataset, e.g. "musique_s/12/3"
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class Sample:
    """One question with its candidate passages and gold answers.

    answers: list of alias lists; a sample is answered correctly by any alias of any entry.
    For summarisation datasets (samsum) `answers` holds the reference summaries.
    """

    sample_id: str  # e.g. "musique_s/12"
    question: str
    passages: tuple[Passage, ...]
    answers: tuple[tuple[str, ...], ...] = ()
    dataset: str = ""


@dataclass(frozen=True, slots=True)
class Retrieved:
    """Ranked passages for one sample; scores are higher-is-better, same order as passage_ids."""

    sample_id: str
    passage_ids: tuple[str, ...]
    scores: tuple[float, ...]
    texts: tuple[str, ...]
    titles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PromptIds:
    """A prompt split into pieces, as token ids: [prefix] [chunk 1] ... [chunk n] [query]."""

    prefix_ids: tuple[int, ...]
    chunk_ids: tuple[tuple[int, ...], ...]
    query_ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.prefix_ids) + sum(len(c) for c in self.chunk_ids) + len(self.query_ids)

    def flat(self) -> list[int]:
        out = list(self.prefix_ids)
        for c in self.chunk_ids:
            out.extend(c)
        out.extend(self.query_ids)
        return out


@dataclass(frozen=True, slots=True)
class BlendStats:
    """What a blended prefill did: token counts per role and which chunk tokens were recomputed."""

    mode: str
    num_tokens: int
    num_chunk_tokens: int
    num_recomputed: int  # prefix + query + selected chunk tokens
    selected_positions: tuple[int, ...]  # global positions of the selected chunk tokens
    prefill_ms: float
    place_ms: float = 0.0  # KV buffer allocation + copying the cached chunks in, keys re-rotated (not a load)


@dataclass(slots=True)
class PrefillResult:
    """A prefilled request: its KV state (the buffer decoding continues in), the fp32 logits [V] at the last
    prompt position, and what the prefill did."""

    state: "KVState"  # kvblend.model.kv.KVState
    logits: "torch.Tensor"
    stats: BlendStats


@dataclass(slots=True)
class GenOutput:
    """Result of answering one prompt."""

    token_ids: list[int]
    text: str
    ttft_ms: float
    token_ms: list[float] = field(default_factory=list)  # wall time of each decode step after the first
    stop_reason: str = ""  # "eos" | "newline" | "length"
    blend: BlendStats | None = None
    # set by the Engine (kvblend/clock.py defines TTFT): per chunk, the tier it was fetched from ("gpu" | "cpu" |
    # "disk", or "built (missing)" / "built (corrupt)"); fetch time (inside TTFT); build time (outside TTFT)
    chunk_tiers: tuple[str, ...] = ()
    chunk_outcomes: tuple[str, ...] = ()  # per chunk: "hit" | "missing" | "corrupt" (empty for full prefill)
    fetch_ms: float = 0.0
    build_ms: float = 0.0

    @property
    def tpot_ms(self) -> float:
        return sum(self.token_ms) / len(self.token_ms) if self.token_ms else 0.0
