"""A sample's prompt, as token ids, from its retrieved chunks (or, for the demo, its first passages)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvblend.config import EngineConfig
from kvblend.data.datasets import Dataset
from kvblend.pipeline.files import PipelineError
from kvblend.pipeline.retrieve import ensure_retrieval, load_data
from kvblend.types import Passage, PromptIds, Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SamplePlan:
    """One sample's prompt ids and chunk texts, in retrieval order."""

    sample_id: str
    question: str
    answers: tuple[tuple[str, ...], ...]
    prompt: PromptIds
    chunk_texts: tuple[str, ...]
    chunk_ids: tuple[str, ...]
    scores: tuple[float, ...]


def load_inputs(config: EngineConfig, progress: bool = True) -> tuple[Dataset, dict]:
    """The dataset and retrieval results covering every sample of it (retrieved again when the retrieval file
    cannot serve them), before any model is loaded."""
    data = load_data(config)
    return data, ensure_retrieval(config, data, progress=progress)


def keep_within(lengths: list[int], cap: int) -> list[int]:
    """Indices kept when the middle items are dropped one by one until the total length fits `cap`
    (the first and last items go last); every index when cap <= 0."""
    keep = list(range(len(lengths)))
    while cap > 0 and len(keep) > 1 and sum(lengths[i] for i in keep) > cap:
        del keep[len(keep) // 2]
    return keep


def _plan(config: EngineConfig, engine, data: Dataset, sample: Sample, passages: list[Passage],
          scores: tuple[float, ...]) -> SamplePlan:
    cap = config.max_context_tokens or data.max_context_tokens
    texts = tuple(data.template.format_passage(p) for p in passages)
    passage_ids = tuple(p.passage_id for p in passages)
    query = data.template.format_query(sample.question)
    prompt = engine.prompt(data.template.prefix, texts, query)
    keep = keep_within([len(c) for c in prompt.chunk_ids], cap)
    if len(keep) < len(texts):
        log.info("%s: dropped %d middle chunks to fit %d context tokens", sample.sample_id, len(texts) - len(keep), cap)
        texts = tuple(texts[i] for i in keep)
        passage_ids, scores = tuple(passage_ids[i] for i in keep), tuple(scores[i] for i in keep)
        prompt = engine.prompt(data.template.prefix, texts, query)
    context = engine.model.shape.max_position_embeddings
    needed = prompt.num_tokens + (config.max_new_tokens or data.max_new_tokens)
    if needed > context:
        raise PipelineError(f"sample {sample.sample_id}: prompt of {prompt.num_tokens} tokens + answer exceeds the "
                            f"{context}-token context of {engine.model.name}; lower --top-k or shorten the passages")
    return SamplePlan(sample.sample_id, sample.question, sample.answers, prompt, texts, passage_ids, scores)


def plan_samples(config: EngineConfig, engine, data: Dataset, by_id: dict) -> list[SamplePlan]:
    """Prompts from the retrieved chunks, in retrieval order, under the dataset's context cap."""
    plans = []
    for sample in data.samples:
        r = by_id[sample.sample_id]
        titles = r.titles or ("",) * len(r.texts)
        passages = [Passage(pid, t, x) for pid, t, x in zip(r.passage_ids, titles, r.texts)]
        plans.append(_plan(config, engine, data, sample, passages, tuple(r.scores)))
    return plans


def plan_first_passages(config: EngineConfig, engine, data: Dataset, num_chunks: int) -> list[SamplePlan]:
    """Prompts from each sample's first `num_chunks` passages (no retrieval; scores decrease in order)."""
    return [_plan(config, engine, data, s, list(s.passages[:num_chunks]),
                  tuple(1.0 - i / max(1, num_chunks) for i in range(min(num_chunks, len(s.passages)))))
            for s in data.samples]


def make_engine(config: EngineConfig):
    from kvblend.engine import Engine

    return Engine(config)
