"""Engine: orchestration only (prompt ids + chunk keys -> chunk store -> layout -> blended prefill -> decoding).

TTFT is defined in kvblend/clock.py and measured here for every path (answer, answer_speculative): the clock
starts when the request is handed in; building a missing or corrupt chunk is reported as build_ms, never inside
TTFT; fetching cached chunks from their tier is inside TTFT and reported as fetch_ms, with the tier each chunk
came from (GenOutput.chunk_tiers). Timed comparisons pass start_tier so that every mode starts with its chunks
on the same tier (Engine.stage).
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from kvblend.clock import RequestClock
from kvblend.config import EngineConfig
from kvblend.data.prompt import build_prompt, chunk_context_ids
from kvblend.errors import ChunkCorruptError, ConfigError
from kvblend.fusion.blend import prefill
from kvblend.fusion.layout import Placement, place
from kvblend.fusion.select import draft_attention_prior
from kvblend.generation.generate import NewlineDetector, generate
from kvblend.generation.sampling import SamplingParams
from kvblend.kvstore.builder import build_chunk_kv, chunk_key, chunk_nbytes, dtype_name
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.kvstore.key import ChunkKey
from kvblend.kvstore.residency import Residency
from kvblend.kvstore.store import ChunkKVStore, Fetched
from kvblend.kvstore.summary import ChunkSummary, SummaryStore, summary_layers
from kvblend.model.hf import DecoderModel
from kvblend.model.registry import kvblend_home, load_model
from kvblend.model.runner import attach_runner, elapsed_ms
from kvblend.types import GenOutput, PrefillResult, PromptIds
from kvblend.vocab import DRAFTERS, MODES, PROXIES, TIERS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpecOptions:
    """How a speculative answer runs (EngineConfig holds the defaults: SpecOptions.from_config)."""

    gpu_chunks: int = 2  # chunks resident on the GPU tier at the start (best by retrieval score)
    drafter: str = "ngram"  # ngram | model | none
    proxy: str = "key_bounds"  # draft_attention | key_bounds | ngram_source | none (never promote)
    threshold: float = 0.3  # proxy score that triggers a promotion
    k: int = 4  # drafted tokens per verification pass
    pinned_top: int = 1  # the best resident chunks that are never demoted
    warm_start: bool = True  # before the first token, promote what the prompt's last query points at
    look: bool = False  # look before loading: the query's summary bounds pick the resident chunks (key_bounds)
    mode: str | None = None  # prefill mode; None: config.mode ("blend" when that is "full" and chunks are staged)
    ratio: float | None = None  # blend ratio; None: config.ratio

    def __post_init__(self) -> None:
        if self.drafter not in DRAFTERS:
            raise ValueError(f"unknown drafter '{self.drafter}'; use one of {', '.join(DRAFTERS)}")
        if self.proxy not in PROXIES:
            raise ValueError(f"unknown proxy '{self.proxy}'; use one of {', '.join(PROXIES)}")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}'; use one of {', '.join(MODES)}")
        if self.look and self.proxy != "key_bounds":
            raise ValueError("look before loading scores the chunks' key summaries: it needs proxy key_bounds")

    @classmethod
    def from_config(cls, config: EngineConfig, **overrides) -> "SpecOptions":
        base = cls(gpu_chunks=config.gpu_chunks, drafter=config.drafter, proxy=config.proxy,
                   threshold=config.promote_threshold, k=config.spec_k)
        return replace(base, **overrides) if overrides else base


@dataclass(slots=True)
class StartedAnswer:
    """A request after its prefill (Engine.start_answer): decode from result, then Engine.finish_answer."""

    result: PrefillResult
    clock: RequestClock
    fetched: Sequence[Fetched] | None
    tiers: Sequence[str]
    build0: float
    keys: Sequence[ChunkKey] = ()  # the request's chunk keys (salt included)


class Engine:
    """Answers prompts made of a prefix, retrieved chunks and a query, reusing chunk KV per config.mode."""

    def __init__(self, config: EngineConfig, model: DecoderModel | None = None):
        self.config = config
        self.model = model if model is not None else load_model(config.model, config.dtype, config.device)
        self.runner = attach_runner(self.model, config.runtime)  # the runtime settings, handed over once
        home = Path(config.home).expanduser() if config.home else kvblend_home()
        safe = re.sub(r"[^A-Za-z0-9._@-]", "_", self.model.fingerprint)
        self.store = ChunkKVStore(
            home / "chunks" / safe / dtype_name(self.model.dtype),
            gpu_budget_bytes=config.budget_bytes("gpu"), cpu_budget_bytes=config.budget_bytes("cpu"),
            disk_budget_bytes=config.budget_bytes("disk"), device=self.model.device, model_name=self.model.name,
            remote=self._remote_tier(config),
            store_text=config.store_text, chunk_shape=(self.model.shape.num_layers, self.model.shape.num_kv_heads,
                                                       self.model.shape.head_dim),
        )
        self._check_budgets()
        # key summaries built with each chunk, in a tree parallel to the chunk files (kvstore/summary.py)
        self.summaries = SummaryStore(home / "summaries" / safe / dtype_name(self.model.dtype), self.model.device,
                                      summary_layers(self.model.shape.num_layers))
        tok = self.model.tokenizer
        # the fixed chunk context (chunk_sink auto / none / text); prefix contexts come with each prompt
        self.sink_ids = () if config.chunk_sink == "prefix" else chunk_context_ids(tok, config.chunk_sink)
        self.selection = config.selection
        self.newline = NewlineDetector(tok) if tok is not None else None
        self.warmed_up = False
        self._prefetcher: ThreadPoolExecutor | None = None  # Engine.prefetch's one worker thread
        self._draft: DecoderModel | None = None  # config.draft_model, loaded when a draft selection signal asks

    def _check_budgets(self) -> None:
        """A memory tier whose budget holds not even one token's KV of this model is a configuration error."""
        one_token = chunk_nbytes(self.model, 1)
        for tier in ("gpu", "cpu"):
            budget = self.store.budgets()[tier]
            if budget < one_token:
                raise ConfigError(f"{tier}_budget: {budget} bytes hold no chunk KV of {self.model.name} (one token "
                                  f"takes {one_token} bytes); raise --{tier}-budget")
    @staticmethod
    def _remote_tier(config: EngineConfig):
        """The shared remote chunk tier of config.remote_store, None without one."""
        if not config.remote_store:
            return None
        from kvblend.kvstore.remote import RemoteTier

        remote = RemoteTier(config.remote_store, config.budget_bytes("remote"), config.remote_ttl)
        if remote.ping():
            log.info("remote chunk store %s reachable", remote.url)
        return remote

    def draft_model(self) -> DecoderModel:
        """The draft model of config.draft_model (loaded once; same dtype and device settings as the target)."""
        if self._draft is None:
            if not self.config.draft_model:
                raise ValueError(f"score_on {self.config.score_on} needs a draft model (--draft-model)")
            self._draft = load_model(self.config.draft_model, self.config.dtype, self.config.device)
            attach_runner(self._draft, self.config.runtime)
        return self._draft

    def _prior(self, prompt: PromptIds, mode: str, draft: DecoderModel | None = None):
        """The draft model's attention over the prompt when the selection signal uses it (CacheClip), else None.
        Computed inside the request's clock: it is part of the blend's cost."""
        if mode != "blend" or not self.selection.needs_draft:
            return None
        return draft_attention_prior(draft or self.draft_model(), prompt.flat(), len(prompt.query_ids))

    def sampling(self, max_new_tokens: int | None = None) -> SamplingParams:
        c = self.config
        return SamplingParams(max_new_tokens=c.max_new_tokens or max_new_tokens or 32, temperature=c.temperature,
                              top_p=c.top_p, stop_on_newline=c.stop_on_newline, seed=c.seed)

    def prompt(self, prefix_text: str, chunk_texts: Sequence[str], query_text: str,
               trust_messages: bool = False) -> PromptIds:
        """Token ids of the prompt; special-token strings in chunks (and, unless trust_messages, in the prefix and
        query text) are plain text, never control tokens (kvblend/data/prompt.py)."""
        if self.model.tokenizer is None:
            raise ValueError(f"{self.model.name} has no tokenizer; pass token ids (PromptIds) instead of text")
        return build_prompt(self.model.tokenizer, prefix_text, chunk_texts, query_text, self.config.chat_template,
                            trust_messages)

    # chunks -----------------------------------------------------------------------------------------
    def chunk_context(self, prefix_ids: Sequence[int] | None = None) -> tuple[int, ...]:
        """Ids a chunk is prefilled after (config.chunk_sink); prefix_ids: the prompt's prefix, needed for
        chunk_sink 'prefix'."""
        if self.config.chunk_sink != "prefix":
            return self.sink_ids
        return chunk_context_ids(self.model.tokenizer, "prefix", prefix_ids)

    def chunk_key(self, token_ids: Sequence[int], prefix_ids: Sequence[int] | None = None,
                  salt: str = "") -> ChunkKey:
        """The chunk's content key: its token ids, the context it is prefilled after, the tenant's salt."""
        return chunk_key(self.model, token_ids, self.chunk_context(prefix_ids), salt)

    def _builder(self, token_ids: Sequence[int], text: str, prefix_ids: Sequence[int] | None = None,
                 salt: str = "", on_build: Callable[[], None] | None = None):
        """The builder of one chunk (prefilled alone after its context), for ChunkKVStore.get(build=...);
        on_build runs first (it may raise to stop the request, e.g. over a budget of build time)."""
        context = self.chunk_context(prefix_ids)

        def build() -> ChunkKV:
            if on_build is not None:
                on_build()
            chunk = build_chunk_kv(self.model, token_ids, context, text, salt)
            self.summaries.put(chunk)  # the summary is built with the chunk and stored beside it
            return chunk

        return build

    def ensure_chunk(self, token_ids: Sequence[int], text: str = "", tier: str = "disk",
                     prefix_ids: Sequence[int] | None = None, salt: str = "") -> ChunkKV:
        """The chunk's cached KV, built (prefilled after its context) and stored if missing or corrupt."""
        return self.store.get(self.chunk_key(token_ids, prefix_ids, salt), tier,
                              build=self._builder(token_ids, text, prefix_ids, salt)).chunk

    def _texts(self, prompt: PromptIds, chunk_texts: Sequence[str] | None) -> list[str]:
        return list(chunk_texts) if chunk_texts is not None else [""] * len(prompt.chunk_ids)

    def keys(self, prompt: PromptIds, chunk_texts: Sequence[str] | None = None, salt: str = "") -> list[ChunkKey]:
        """The prompt's chunk keys, in prompt order."""
        return [self.chunk_key(ids, prompt.prefix_ids, salt) for ids in prompt.chunk_ids]

    def stage(self, prompt: PromptIds, chunk_texts: Sequence[str] | None, tier: str,
              skip: Sequence[ChunkKey] = ()) -> None:
        """Before a timed comparison (outside every clock): build the prompt's missing chunks, then leave each
        with `tier` as its fastest tier, so that every mode of the comparison starts from the same tier.
        skip: chunks left where they are (those of a request in flight, when the next prompt is staged early)."""
        if tier not in TIERS:
            raise ValueError(f"unknown tier '{tier}'; use one of {', '.join(TIERS)}")
        skipped = {k.digest for k in skip}
        for ids, text in zip(prompt.chunk_ids, self._texts(prompt, chunk_texts)):
            key = self.chunk_key(ids, prompt.prefix_ids)
            if key.digest in skipped:
                continue
            build = self._builder(ids, text, prompt.prefix_ids)
            if key not in self.store:  # missing: build it (a stored file is verified when it is read, not here)
                self.store.get(key, "disk", build=build)
            try:
                self.store.stage(key, tier)
            except ChunkCorruptError:  # found corrupt while copying it up: rebuild, stage again
                self.store.get(key, "disk", build=build)
                self.store.stage(key, tier)

    def prefetch(self, prompt: PromptIds, chunk_texts: Sequence[str] | None = None,
                 keep: Sequence[ChunkKey] = ()) -> Future:
        """Start making the prompt's disk-only chunks resident on the CPU tier in the background (one worker
        thread per engine, so prefetches never overlap each other), while the caller goes on, e.g. decoding the
        request before it. The CPU budget and every pin hold; nothing in `keep` (the chunks of the request in
        flight) is evicted, nor prefetched (its request fetches those itself); what does not fit is skipped
        (ChunkKVStore.prefetch). The chunks' data is the same wherever they are found, so answers do not
        change; the request that follows records the tier it found each chunk on. Returns the Future of the
        keys made resident."""
        keys = self.keys(prompt, chunk_texts)
        skipped = {k.digest for k in keep}
        todo = [k for k in keys if k.digest not in skipped]
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="kvblend-prefetch")
        return self._prefetcher.submit(self.store.prefetch, todo, "cpu", list(keep))

    def warm_up(self, prompt: PromptIds, chunk_texts: Sequence[str] | None = None) -> None:
        """One uncounted short answer per engine and mode family (first-call costs off the clock): the prompt
        cut to its first chunk, full and blend, 2 tokens. The one warm-up rule of every timed comparison."""
        if self.warmed_up:
            return
        texts = self._texts(prompt, chunk_texts)
        short = PromptIds(prompt.prefix_ids, prompt.chunk_ids[:1], prompt.query_ids)
        sampling = replace(self.sampling(), max_new_tokens=2)
        for mode in ("full", "blend"):
            self.answer(short, texts[:1], mode=mode, sampling=sampling)
        self.warmed_up = True

    def _place(self, prompt: PromptIds, keys: Sequence[ChunkKey], scores: Sequence[float] | None,
               gpu_chunks: int) -> Placement:
        """The layout: the `gpu_chunks` best chunks by score (scores None: prompt order) resident."""
        scores = [0.0] * len(keys) if scores is None else list(scores)
        return place(keys, [len(i) for i in prompt.chunk_ids], scores, first_position=len(prompt.prefix_ids),
                     gpu_chunks=gpu_chunks)

    def _residency(self, prompt: PromptIds, texts: Sequence[str], placement: Placement,
                   gpu_chunks: int, salt: str = "", on_build: Callable[[], None] | None = None) -> Residency:
        """The request's placement and pins within gpu_chunks and the GPU byte budget; each chunk comes with its
        builder from this request's token ids, so a chunk found missing or corrupt (a promotion included) heals."""
        builders = [self._builder(ids, t, prompt.prefix_ids, salt, on_build)
                    for ids, t in zip(prompt.chunk_ids, texts)]
        nbytes = [chunk_nbytes(self.model, len(ids)) for ids in prompt.chunk_ids]
        return Residency(self.store, placement.slots, gpu_chunks, builders, nbytes)

    def _fetch(self, residency: Residency, clock: RequestClock) -> tuple[list[Fetched], list[ChunkKV | None]]:
        """Load each chunk to its tier through the request's Residency (resident ones to the GPU tier, pinned;
        placeholders to the CPU tier); fetch time goes to clock.fetch_ms, build time of missing/corrupt chunks is
        excluded from it."""
        t0 = time.perf_counter()
        keys = [s.key for s in residency.slots]
        # chunks only on disk: read + verify them in parallel threads while the loop below takes them in order
        self.store.disk.prefetch([k for k in keys if self.store.tier_of(k) == "disk"])
        fetched = [residency.load(i) for i in range(len(keys))]
        clock.fetch_ms += elapsed_ms(t0, self.model.device) - sum(f.build_ms for f in fetched)
        return fetched, [f.chunk if residency.is_resident(i) else None for i, f in enumerate(fetched)]

    def _start(self, prompt: PromptIds, chunk_texts: Sequence[str] | None, start_tier: str | None,
               salt: str = ""):
        """A request's start, shared by every answer path: texts, staging (before the clock), the clock, the
        store's build counter at the start (builds are reported apart from TTFT), the chunk keys."""
        texts = self._texts(prompt, chunk_texts)
        if start_tier is not None:
            self.stage(prompt, texts, start_tier)
        build0 = self.store.stats.build_ms
        clock = RequestClock()
        keys = self.keys(prompt, texts, salt)
        return texts, build0, clock, keys

    def _gather(self, keys: Sequence[ChunkKey], residency: Residency | None, clock: RequestClock):
        """(fetched or None, chunks or None, per-chunk tier labels): full prefill (no residency) computes every
        chunk, so it fetches nothing and records where each chunk happened to be; other modes load through the
        request's Residency."""
        if residency is None:
            return None, None, [self.store.tier_of(k) or "absent" for k in keys]
        fetched, chunks = self._fetch(residency, clock)
        return fetched, chunks, [self._tier_label(f) for f in fetched]

    def _annotate(self, out: GenOutput, clock: RequestClock, fetched: Sequence[Fetched] | None, tiers: Sequence[str],
                  build0: float) -> GenOutput:
        out.chunk_tiers = tuple(tiers)
        out.chunk_outcomes = tuple(f.outcome for f in fetched) if fetched is not None else ()
        out.fetch_ms = clock.fetch_ms
        out.build_ms = self.store.stats.build_ms - build0
        return out

    @staticmethod
    def _tier_label(got: Fetched) -> str:
        return got.found_tier if got.outcome == "hit" else f"built ({got.outcome})"

    # answers ----------------------------------------------------------------------------------------
    def answer(self, prompt: PromptIds, chunk_texts: Sequence[str] | None = None, mode: str | None = None,
               ratio: float | None = None, sampling: SamplingParams | None = None,
               on_token: Callable[[int], bool | None] | None = None, start_tier: str | None = None,
               scores: Sequence[float] | None = None, salt: str = "",
               on_build: Callable[[], None] | None = None) -> GenOutput:
        """Prefill (full / reuse / blend) and decode. TTFT as kvblend/clock.py defines it.
        GPU chunk budget: reuse and blend keep at most config.gpu_chunks chunks resident (the best by `scores`;
        None: prompt order), within the GPU tier's byte budget; the others are placeholders (their positions
        reserved, never attended: plain decoding promotes nothing). Full prefill computes every chunk.
        start_tier: stage every chunk on this tier first (before the clock), for comparisons.
        on_token: streaming callback, see generation.generate.generate. salt: the caller's isolation salt (its
        chunks are keyed apart from every other salt's, kvblend.kvstore.key.ChunkKey). on_build: called before each
        missing or corrupt chunk is built; it may raise to stop the request (chunks built so far stay stored)."""
        sampling = sampling or self.sampling()
        started = self.start_answer(prompt, chunk_texts, mode, ratio, sampling, start_tier, scores, salt, on_build)
        out = generate(self.model, started.result, sampling, started.clock.ttft_start(), self.newline,
                       on_token=on_token)
        return self.finish_answer(started, out)

    def start_answer(self, prompt: PromptIds, chunk_texts: Sequence[str] | None = None, mode: str | None = None,
                     ratio: float | None = None, sampling: SamplingParams | None = None,
                     start_tier: str | None = None, scores: Sequence[float] | None = None, salt: str = "",
                     on_build: Callable[[], None] | None = None) -> "StartedAnswer":
        """answer() up to its prefill (arguments as there): the prefilled state and logits, and what
        finish_answer() needs to annotate the decoded output (continuous batching decodes in between)."""
        c = self.config
        mode = mode or c.mode
        ratio = c.ratio if ratio is None else ratio
        sampling = sampling or self.sampling()
        texts, build0, clock, keys = self._start(prompt, chunk_texts, start_tier, salt)
        residency = None
        if mode != "full":
            residency = self._residency(prompt, texts, self._place(prompt, keys, scores, c.gpu_chunks), c.gpu_chunks,
                                        salt, on_build)
        with residency or nullcontext():  # every pin released after the prefill, an exception included
            fetched, chunks, tiers = self._gather(keys, residency, clock)
            resident = None
            if residency is not None and residency.placeholders:
                resident = [residency.is_resident(i) for i in range(len(keys))]
            result = prefill(self.runner, prompt, chunks, mode=mode, ratio=ratio, check_layer=c.check_layer,
                             selection=self.selection, extra_capacity=sampling.max_new_tokens, resident=resident,
                             prior=self._prior(prompt, mode))
        clock.build_ms = self.store.stats.build_ms - build0
        return StartedAnswer(result, clock, fetched, tiers, build0, keys)

    def finish_answer(self, started: "StartedAnswer", out: GenOutput) -> GenOutput:
        return self._annotate(out, started.clock, started.fetched, started.tiers, started.build0)

    def _spec_mode(self, o: SpecOptions, n: int) -> tuple[int, str, float, str | None]:
        """(gpu_chunks, prefill mode, ratio, proxy or None) of a speculative answer over n chunks."""
        c = self.config
        gpu_chunks = min(o.gpu_chunks, n)
        mode = o.mode or ("blend" if c.mode == "full" and gpu_chunks < n else c.mode)
        if mode == "full" and gpu_chunks < n:
            raise ValueError("placeholders need mode reuse or blend (full prefill computes every chunk)")
        ratio = c.ratio if o.ratio is None else o.ratio
        proxy = None if o.proxy == "none" or mode == "full" else o.proxy  # full: every chunk resident already
        return gpu_chunks, mode, ratio, proxy

    def _drafter(self, o: SpecOptions, prompt: PromptIds, draft_model: DecoderModel | None, extra: int):
        from kvblend.generation.drafters import ModelDrafter, NgramDrafter

        if o.drafter == "model":
            return ModelDrafter(draft_model, prompt, extra_capacity=extra)
        return NgramDrafter([list(ids) for ids in prompt.chunk_ids])

    def chunk_summaries(self, residency: Residency) -> dict[int, ChunkSummary]:
        """Every slot's key summary, device-resident (its file read and verified, or rebuilt from the chunk)."""
        return {s.index: self.summaries.get(lambda i=s.index: residency.read(i), s.key.digest)
                for s in residency.slots}

    def _promoter(self, o: SpecOptions, proxy: str, residency: Residency, placement: Placement, spec, probe):
        from kvblend.generation.promotion import Promoter

        ranked = sorted(placement.resident, key=lambda s: -s.score)
        summaries = self.chunk_summaries(residency) if proxy == "key_bounds" else None
        return Promoter(self.model, residency, proxy, threshold=o.threshold,
                        pinned=[s.index for s in ranked[:o.pinned_top]], drafter=spec, probe=probe,
                        summaries=summaries)

    def _look(self, prompt: PromptIds, residency: Residency, promoter, chunks: list) -> list[ChunkKV | None]:
        """Look before loading: the query rows, computed over the resident chunks alone (a reuse prefill: only
        prefix + query are computed), score every chunk's summary; Promoter.look swaps the best placeholders in
        within the Residency's budgets. Returns the chunks the blend then places (None: a placeholder)."""
        from kvblend.model.layers import forward_tokens

        n = len(prompt.chunk_ids)
        probe = prefill(self.runner, prompt, chunks, mode="reuse", resident=[c is not None for c in chunks])
        probe.state.truncate(prompt.num_tokens - len(prompt.query_ids))
        queries: list = []
        forward_tokens(self.model, probe.state, list(prompt.query_ids), num_logits=0, queries_out=queries)
        probe.state.release()
        rec = promoter.look(queries)
        if not rec.promoted and not rec.demoted:
            return chunks
        return [residency.read(i) if residency.is_resident(i) else None for i in range(n)]

    def answer_speculative(self, prompt: PromptIds, chunk_texts: Sequence[str] | None, scores: Sequence[float],
                           options: SpecOptions | None = None, *, draft_model: DecoderModel | None = None,
                           sampling: SamplingParams | None = None, start_tier: str | None = None):
        """Tiered speculative answer: the top options.gpu_chunks chunks (by score, within the GPU byte budget) are
        resident, the rest are CPU placeholders that options.proxy promotes during decoding ("none": never). The
        top options.pinned_top resident chunks are never demoted. The request's Residency holds placement and
        pins; every pin is released at the end. options.look: before the prefill, the query's bounds over every
        chunk's key summary swap placeholders in (Engine._look; the blend then runs over the new placement).
        TTFT as kvblend/clock.py defines it (a look or warm-start round included). Returns (GenOutput, steps, trace, placement), placement as the request started."""
        from kvblend.generation.speculative import speculative_generate

        o = options or SpecOptions.from_config(self.config)
        if o.drafter == "model" and draft_model is None:
            raise ValueError("drafter 'model' needs a draft model (--draft-model)")
        c = self.config
        gpu_chunks, mode, ratio, proxy = self._spec_mode(o, len(prompt.chunk_ids))
        sampling = sampling or self.sampling()
        texts, build0, clock, keys = self._start(prompt, chunk_texts, start_tier)
        placement = self._place(prompt, keys, scores, gpu_chunks)
        residency = None if mode == "full" else self._residency(prompt, texts, placement, gpu_chunks)
        placement = placement if residency is None else Placement(residency.slots)  # after the byte budget
        promoter = None
        with residency or nullcontext():  # every pin released at the end, an exception included
            fetched, chunks, tiers = self._gather(keys, residency, clock)
            extra = sampling.max_new_tokens + o.k + 2
            spec = self._drafter(o, prompt, draft_model, extra)
            probe: list | None = [] if proxy == "key_bounds" else None
            if proxy is not None:
                promoter = self._promoter(o, proxy, residency, placement, spec, probe)
                if o.look:
                    chunks = self._look(prompt, residency, promoter, chunks)
            result = prefill(self.runner, prompt, chunks, mode=mode, ratio=ratio, check_layer=c.check_layer,
                             selection=self.selection, extra_capacity=extra,
                             resident=[True] * len(keys) if chunks is None else [x is not None for x in chunks],
                             prior=self._prior(prompt, mode, draft_model))
            if promoter is not None and o.warm_start:
                logits = promoter.warm_start(result.state, prompt.flat(), prompt.num_tokens - len(prompt.query_ids))
                if logits is not None:
                    result.logits = logits
            clock.build_ms = self.store.stats.build_ms - build0
            out, steps = speculative_generate(self.model, result, spec, sampling, clock.ttft_start(),
                                              prompt_ids=prompt, k=0 if o.drafter == "none" else o.k,
                                              newline=self.newline, on_step=promoter, probe=probe)
        self._annotate(out, clock, fetched, tiers, build0)
        trace = promoter.trace if promoter is not None else []
        return out, steps, trace, placement
