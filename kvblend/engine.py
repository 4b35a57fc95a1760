"""Engine: orchestration only (prompt ids -> chunk store -> blended prefill -> decoding)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Callable, Sequence

from kvblend.config import EngineConfig
from kvblend.data.prompt import build_prompt, chunk_context_ids
from kvblend.fusion.blend import prefill
from kvblend.fusion.select import SelectionPolicy
from kvblend.generation.generate import NewlineDetector, generate
from kvblend.generation.sampling import SamplingParams
from kvblend.kvstore.builder import build_chunk_kv, chunk_key, dtype_name
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.kvstore.key import ChunkKey
from kvblend.kvstore.store import ChunkKVStore
from kvblend.model.hf import DecoderModel
from kvblend.model.registry import kvblend_home, load_model
from kvblend.types import GenOutput, PromptIds

DRAFTERS = ("ngram", "model", "none")

log = logging.getLogger(__name__)


class Engine:
    """Answers prompts made of a prefix, retrieved chunks and a query, reusing chunk KV per config.mode."""

    def __init__(self, config: EngineConfig, model: DecoderModel | None = None):
        self.config = config
        self.model = model if model is not None else load_model(config.model, config.dtype, config.device)
        home = Path(config.home).expanduser() if config.home else kvblend_home()
        safe = re.sub(r"[^A-Za-z0-9._@-]", "_", self.model.fingerprint)
        self.store = ChunkKVStore(
            home / "chunks" / safe / dtype_name(self.model.dtype),
            gpu_budget_bytes=config.budget_bytes("gpu"), cpu_budget_bytes=config.budget_bytes("cpu"),
            disk_budget_bytes=config.budget_bytes("disk"), device=self.model.device, model_name=self.model.name,
        )
        tok = self.model.tokenizer
        # the fixed chunk context (chunk_sink auto / none / text); prefix contexts come with each prompt
        self.sink_ids = () if config.chunk_sink == "prefix" else chunk_context_ids(tok, config.chunk_sink)
        self.selection = SelectionPolicy(config.score_on, config.select_first_tokens, config.select_layers)
        self.newline = NewlineDetector(tok) if tok is not None else None

    def sampling(self, max_new_tokens: int | None = None) -> SamplingParams:
        c = self.config
        return SamplingParams(max_new_tokens=c.max_new_tokens or max_new_tokens or 32, temperature=c.temperature,
                              top_p=c.top_p, stop_on_newline=c.stop_on_newline, seed=c.seed)

    def prompt(self, prefix_text: str, chunk_texts: Sequence[str], query_text: str) -> PromptIds:
        if self.model.tokenizer is None:
            raise ValueError(f"{self.model.name} has no tokenizer; pass token ids (PromptIds) instead of text")
        return build_prompt(self.model.tokenizer, prefix_text, chunk_texts, query_text, self.config.chat_template)

    def chunk_context(self, prefix_ids: Sequence[int] | None = None) -> tuple[int, ...]:
        """Ids a chunk is prefilled after (config.chunk_sink); prefix_ids: the prompt's prefix, needed for
        chunk_sink 'prefix'."""
        if self.config.chunk_sink != "prefix":
            return self.sink_ids
        return chunk_context_ids(self.model.tokenizer, "prefix", prefix_ids)

    def chunk_key(self, token_ids: Sequence[int], prefix_ids: Sequence[int] | None = None) -> ChunkKey:
        return chunk_key(self.model, token_ids, self.chunk_context(prefix_ids))

    def _builder(self, token_ids: Sequence[int], text: str, prefix_ids: Sequence[int] | None = None):
        context = self.chunk_context(prefix_ids)
        return lambda: build_chunk_kv(self.model, token_ids, context, text)

    def ensure_chunk(self, token_ids: Sequence[int], text: str = "", tier: str = "disk",
                     prefix_ids: Sequence[int] | None = None) -> ChunkKV:
        """The chunk's cached KV, built (prefilled after its context) and stored if missing or corrupt."""
        return self.store.get_or_build(self.chunk_key(token_ids, prefix_ids),
                                       self._builder(token_ids, text, prefix_ids), tier)

    def answer(self, prompt: PromptIds, chunk_texts: Sequence[str] | None = None, mode: str | None = None,
               ratio: float | None = None, sampling: SamplingParams | None = None,
               on_token: Callable[[int], bool | None] | None = None) -> GenOutput:
        """Prefill (full / reuse / blend) and decode. TTFT counts from here, chunk fetches included.
        on_token: streaming callback, see generation.generate.generate."""
        c = self.config
        mode = mode or c.mode
        ratio = c.ratio if ratio is None else ratio
        sampling = sampling or self.sampling()
        texts = list(chunk_texts) if chunk_texts is not None else [""] * len(prompt.chunk_ids)
        t_start = time.perf_counter()
        chunks: list[ChunkKV] = []
        keys = [self.chunk_key(ids, prompt.prefix_ids) for ids in prompt.chunk_ids] if mode != "full" else []
        for key in keys:
            self.store.pin(key)
        try:
            for ids, text, key in zip(prompt.chunk_ids, texts, keys):
                chunks.append(self.store.get_or_build(key, self._builder(ids, text, prompt.prefix_ids), tier="gpu"))
            result = prefill(self.model, prompt, chunks if mode != "full" else None, mode=mode, ratio=ratio,
                             check_layer=c.check_layer, selection=self.selection,
                             extra_capacity=sampling.max_new_tokens)
        finally:
            for key in keys:
                self.store.unpin(key)
        return generate(self.model, result, sampling, t_start, self.newline, on_token=on_token)

    def answer_speculative(self, prompt: PromptIds, chunk_texts: Sequence[str], scores: Sequence[float], *,
                           gpu_chunks: int, drafter: str = "ngram", draft_model: DecoderModel | None = None,
                           proxy: str | None = None, threshold: float = 0.3, k: int = 4, pinned_top: int = 1,
                           mode: str | None = None, ratio: float | None = None,
                           sampling: SamplingParams | None = None, warm_start: bool = True):
        """Tiered speculative answer: the top `gpu_chunks` chunks (by score) are resident, the rest are CPU
        placeholders; `proxy` promotes placeholders during decoding (None: never). The top `pinned_top`
        resident chunks are never demoted. warm_start: before the first token, promote what the prompt's last
        query already points at and recompute the query. Returns (GenOutput, steps, trace, placement)."""
        from kvblend.generation.drafters import ModelDrafter, NgramDrafter
        from kvblend.generation.promotion import Promoter
        from kvblend.generation.speculative import speculative_generate

        if drafter not in DRAFTERS:
            raise ValueError(f"unknown drafter '{drafter}'; use one of {', '.join(DRAFTERS)}")
        if drafter == "model" and draft_model is None:
            raise ValueError("drafter 'model' needs a draft model (--draft-model)")
        c = self.config
        mode = mode or ("blend" if c.mode == "full" else c.mode)
        ratio = c.ratio if ratio is None else ratio
        sampling = sampling or self.sampling()
        n = len(prompt.chunk_ids)
        gpu_chunks = min(gpu_chunks, n)
        if gpu_chunks == n and c.mode == "full":
            mode = "full"
        keys = [self.chunk_key(ids, prompt.prefix_ids) for ids in prompt.chunk_ids]
        for ids, text in zip(prompt.chunk_ids, chunk_texts):
            self.ensure_chunk(ids, text, prefix_ids=prompt.prefix_ids)
        t_start = time.perf_counter()
        placement = self.store.place(keys, [len(i) for i in prompt.chunk_ids], scores,
                                     first_position=len(prompt.prefix_ids), top_k=gpu_chunks)
        resident = [not s.is_placeholder for s in placement.slots]
        promoter = None
        try:
            chunks = [self.store.get(s.key, "gpu") if r else None for s, r in zip(placement.slots, resident)]
            extra = sampling.max_new_tokens + k + 2
            result = prefill(self.model, prompt, chunks if mode != "full" else None, mode=mode, ratio=ratio,
                             check_layer=c.check_layer, selection=self.selection, extra_capacity=extra,
                             resident=resident)
            if drafter == "model":
                spec = ModelDrafter(draft_model, prompt, extra_capacity=extra)
            else:
                spec = NgramDrafter([list(ids) for ids in prompt.chunk_ids])
            probe: list | None = [] if proxy == "key_bounds" else None
            if proxy is not None:
                ranked = sorted((s for s in placement.resident), key=lambda s: -s.score)
                promoter = Promoter(self.model, self.store, placement.slots, proxy, threshold=threshold,
                                    max_gpu_chunks=gpu_chunks, pinned=[s.index for s in ranked[:pinned_top]],
                                    drafter=spec, probe=probe)
                if warm_start:
                    logits = promoter.warm_start(result.state, prompt.flat(),
                                                 prompt.num_tokens - len(prompt.query_ids))
                    if logits is not None:
                        result.logits = logits
            out, steps = speculative_generate(self.model, result, spec, sampling, t_start, prompt_ids=prompt,
                                              k=0 if drafter == "none" else k, newline=self.newline,
                                              on_step=promoter, probe=probe)
        finally:
            if promoter is not None:
                promoter.release()
            else:
                self.store.release(placement)
        trace = promoter.trace if promoter is not None else []
        return out, steps, trace, placement
