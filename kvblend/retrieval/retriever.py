"""Passage retrieval for RAG samples: BM25, dense MiniLM, their RRF fusion, and ColBERT-style MaxSim.

Modes (all scores are higher-is-better):

* ``bm25``    -- bm25s (Lucene BM25, k1=1.5, b=0.75) over a lowercase ``\\w+`` word tokenizer, with
  bm25s' English stopword list removed by default.
* ``dense``   -- cosine similarity of all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 norm,
  passages truncated to 256 word pieces like sentence-transformers does).
* ``both``    -- reciprocal rank fusion of the full ``bm25`` and ``dense`` rankings:
  ``score(p) = sum_m 1 / (RRF_K + rank_m(p))`` with 1-based ranks and ``RRF_K = 60`` (Cormack et al.,
  2009). The reported score is that RRF value.
* ``colbert`` -- late interaction: ``score(q, p) = sum_i max_j <q_i, p_j>`` over L2-normalised token
  embeddings with padding masked. With the bundled MiniLM this is an UNTRAINED stand-in for ColBERT;
  pass ``checkpoint=`` a local folder of a real ColBERT checkpoint to get the real thing
  (see :class:`kvblend.retrieval.encoders.TokenEncoder`).

The text indexed for a passage is ``title + "\\n" + text`` (just ``text`` when the title is empty).

Scopes of :func:`retrieve`:

* ``per_sample`` -- each question ranks only its own sample's passages (one index per sample).
* ``pooled``     -- one index over every passage of all samples, deduplicated on (title, text) keeping
  the first passage_id; every question searches the whole pool, so results may be other samples'
  passages.

Exact score ties are broken by a permutation seeded from ``seed`` (per sample: from ``seed`` and the
sample_id), never by the order of passages in the input file, so that passage order cannot leak into
the ranking (e.g. BM25 scores 0 for every passage sharing no word with the question).
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kvblend.types import Passage, Retrieved, Sample
from kvblend.vocab import RETRIEVAL_MODES, RETRIEVAL_SCOPES

from .encoders import SentenceEncoder, TokenEncoder

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = RETRIEVAL_MODES  # the one vocabulary (kvblend/vocab.py)
SCOPES: tuple[str, ...] = RETRIEVAL_SCOPES
RRF_K = 60

SeedLike = int | Sequence[int] | None

_WORD_RE = re.compile(r"\w+")


# --------------------------------------------------------------------------------------------- helpers


def passage_text(passage: Passage) -> str:
    """The text indexed and encoded for a passage: ``title\\ntext``, or ``text`` without a title."""
    return f"{passage.title}\n{passage.text}" if passage.title else passage.text


def _import_bm25s() -> Any:
    import bm25s

    # bm25s sets its own logger to DEBUG at import time; hand the decision back to the application.
    bm25s_logger = logging.getLogger("bm25s")
    if bm25s_logger.level == logging.DEBUG:
        bm25s_logger.setLevel(logging.NOTSET)
    return bm25s


def english_stopwords() -> frozenset[str]:
    """bm25s' English stopword list (the Lucene/Elasticsearch one)."""
    _import_bm25s()
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def simple_tokenize(text: str, stopwords: Iterable[str] = ()) -> list[str]:
    """Lowercased ``\\w+`` words of ``text`` minus ``stopwords``."""
    stop = stopwords if isinstance(stopwords, (set, frozenset)) else frozenset(stopwords)
    return [w for w in _WORD_RE.findall(text.lower()) if w not in stop]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown retrieval mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"unknown retrieval scope {scope!r}; use one of {', '.join(SCOPES)}")
    return scope


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def top_k(scores: np.ndarray, k: int, tie_key: np.ndarray | None = None) -> list[tuple[int, float]]:
    """The ``k`` best (index, score) pairs, best first; equal scores ordered by ascending ``tie_key``
    (default: index)."""
    scores = np.asarray(scores, dtype=np.float64)
    if tie_key is None:
        tie_key = np.arange(scores.shape[0])
    order = np.lexsort((tie_key, -scores))[: check_k(k)]
    return [(int(i), float(scores[i])) for i in order]


def rrf_scores(rankings: Sequence[Sequence[int]], n: int, k: int = RRF_K) -> np.ndarray:
    """Reciprocal rank fusion: ``out[d] = sum over rankings of 1 / (k + rank of d)``, ranks 1-based.

    Each ranking lists item indices best first; it may be partial (items absent from it add 0).
    """
    if k < 0:
        raise ValueError(f"RRF constant must be >= 0, got {k}")
    out = np.zeros(n, dtype=np.float64)
    for ranking in rankings:
        ranking = np.asarray(ranking, dtype=np.int64)
        if ranking.size and (ranking.min() < 0 or ranking.max() >= n):
            raise ValueError(f"ranking holds an index outside 0..{n - 1}")
        if np.unique(ranking).size != ranking.size:
            raise ValueError("a ranking lists the same item twice")
        out[ranking] += 1.0 / (k + np.arange(1, ranking.size + 1, dtype=np.float64))
    return out


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse rankings (item indices, best first) with RRF; returns (item, score) best first, ties by index."""
    items = [int(i) for r in rankings for i in r]
    if not items:
        return []
    n = max(items) + 1
    scores = rrf_scores(rankings, n, k)
    present = np.zeros(n, dtype=bool)
    present[items] = True
    return [(i, s) for i, s in top_k(scores, n) if present[i]]


def _tie_key(n: int, seed: SeedLike) -> np.ndarray:
    if seed is None:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)


# --------------------------------------------------------------------------------------------- indices


@runtime_checkable
class Retriever(Protocol):
    """An index over a fixed list of passages: ``build`` once, then ``search`` any number of queries.

    ``search`` returns up to ``k`` (passage index into the built list, score) pairs, best (highest score)
    first; ``scores`` gives the score of every passage for one query.
    """

    mode: str

    def build(self, passages: Sequence[Passage]) -> Retriever: ...

    def scores(self, query: str) -> np.ndarray: ...

    def search(self, query: str, k: int) -> list[tuple[int, float]]: ...

    def __len__(self) -> int: ...


class _Index:
    mode = ""

    def __init__(self, *, seed: SeedLike = None) -> None:
        self._seed = seed
        self._n = 0
        self._tie: np.ndarray | None = None

    def __len__(self) -> int:
        return self._n

    def build(self, passages: Sequence[Passage]) -> _Index:
        passages = list(passages)
        if not passages:
            raise ValueError(f"{self.mode} index: no passages to index; pass at least one Passage")
        t0 = time.perf_counter()
        self._build([passage_text(p) for p in passages])
        self._n = len(passages)
        self._tie = _tie_key(self._n, self._seed)
        logger.debug("built %s index over %d passages in %.3fs", self.mode, self._n, time.perf_counter() - t0)
        return self

    def _build(self, texts: list[str]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_built(self) -> None:
        if self._tie is None:
            raise RuntimeError(f"{self.mode} index: call build(passages) before searching")

    def scores(self, query: str) -> np.ndarray:
        self._check_built()
        return self._scores(query)

    def _scores(self, query: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def ranking(self, query: str) -> np.ndarray:
        """Every passage index, best first (ties broken like ``search``)."""
        scores = np.asarray(self.scores(query), dtype=np.float64)
        return np.lexsort((self._tie, -scores))

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        k = check_k(k)
        self._check_built()
        return top_k(self.scores(query), k, self._tie)


class BM25Index(_Index):
    """bm25s BM25 over :func:`simple_tokenize` words.

    stopwords: True for bm25s' English list, False for none, or an iterable of words.
    """

    mode = "bm25"

    def __init__(
        self,
        *,
        stopwords: bool | Iterable[str] = True,
        k1: float = 1.5,
        b: float = 0.75,
        seed: SeedLike = None,
    ) -> None:
        super().__init__(seed=seed)
        if stopwords is True:
            self._stop = english_stopwords()
        elif stopwords is False or stopwords is None:
            self._stop = frozenset()
        else:
            self._stop = frozenset(stopwords)
        self._k1, self._b = k1, b
        self._bm25: Any = None
        self._vocab: dict[str, int] = {}

    def _build(self, texts: list[str]) -> None:
        bm25s = _import_bm25s()
        corpus = [simple_tokenize(t, self._stop) for t in texts]
        self._bm25 = bm25s.BM25(k1=self._k1, b=self._b)
        self._bm25.index(corpus, show_progress=False)
        self._vocab = self._bm25.vocab_dict

    def _scores(self, query: str) -> np.ndarray:
        words = [w for w in simple_tokenize(query, self._stop) if w in self._vocab]
        if not words:
            return np.zeros(self._n, dtype=np.float32)
        return np.asarray(self._bm25.get_scores(words), dtype=np.float32)


class DenseIndex(_Index):
    """Cosine similarity of pooled sentence embeddings (:class:`SentenceEncoder`, MiniLM by default)."""

    mode = "dense"

    def __init__(self, encoder: SentenceEncoder | None = None, *, seed: SeedLike = None) -> None:
        super().__init__(seed=seed)
        self.encoder = encoder if encoder is not None else SentenceEncoder()
        self.embeddings = np.zeros((0, 0), dtype=np.float32)

    def _build(self, texts: list[str]) -> None:
        self.embeddings = self.encoder.encode(texts)

    def _scores(self, query: str) -> np.ndarray:
        return self.embeddings @ self.encoder.encode([query])[0]


class ColbertIndex(_Index):
    """Late interaction: ``sum_i max_j <q_i, d_j>`` over token embeddings (:class:`TokenEncoder`).

    With the default MiniLM model this is an UNTRAINED stand-in for ColBERT. ``checkpoint`` is a local
    folder of a real ColBERT (or other BERT-like) checkpoint. All passage token vectors are kept in one
    float32 matrix: about ``n_passages * 500 * 384 * 4`` bytes (~0.8 MB a passage) with MiniLM.
    """

    mode = "colbert"

    def __init__(
        self,
        encoder: TokenEncoder | None = None,
        *,
        checkpoint: str | None = None,
        seed: SeedLike = None,
    ) -> None:
        super().__init__(seed=seed)
        if encoder is not None and checkpoint is not None:
            raise ValueError("pass either encoder= or checkpoint= to ColbertIndex, not both")
        self.encoder = encoder if encoder is not None else TokenEncoder(checkpoint)
        self._matrix = np.zeros((0, 0), dtype=np.float32)
        self._starts = np.zeros(0, dtype=np.int64)

    def _build(self, texts: list[str]) -> None:
        docs = self.encoder.encode_docs(texts)
        lengths = np.array([d.shape[0] for d in docs], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._matrix = np.concatenate(docs, axis=0)

    def _scores(self, query: str) -> np.ndarray:
        q = self.encoder.encode_queries([query])[0]
        sim = q @ self._matrix.T  # (query tokens, all passage tokens)
        return np.maximum.reduceat(sim, self._starts, axis=1).sum(axis=0)


class FusionIndex(_Index):
    """Reciprocal rank fusion (constant ``rrf_k``, 60 by default) of the full rankings of ``components``."""

    mode = "both"

    def __init__(self, components: Sequence[_Index], *, rrf_k: int = RRF_K, seed: SeedLike = None) -> None:
        super().__init__(seed=seed)
        if not components:
            raise ValueError("FusionIndex needs at least one component index")
        self.components = list(components)
        self.rrf_k = rrf_k

    def _build(self, texts: list[str]) -> None:
        pass  # components are built in build()

    def build(self, passages: Sequence[Passage]) -> FusionIndex:
        passages = list(passages)
        for component in self.components:
            component.build(passages)
        super().build(passages)
        return self

    def _scores(self, query: str) -> np.ndarray:
        return rrf_scores([c.ranking(query) for c in self.components], self._n, self.rrf_k)


def make_retriever(
    mode: str,
    *,
    seed: SeedLike = None,
    checkpoint: str | None = None,
    stopwords: bool | Iterable[str] = True,
    dense_encoder: SentenceEncoder | None = None,
    colbert_encoder: TokenEncoder | None = None,
) -> _Index:
    """An unbuilt index for ``mode``; encoders passed in are shared (and so are their caches)."""
    check_mode(mode)
    if checkpoint is not None and mode != "colbert":
        raise ValueError(f"checkpoint= is only used by mode 'colbert', not {mode!r}")
    if mode == "bm25":
        return BM25Index(stopwords=stopwords, seed=seed)
    if mode == "dense":
        return DenseIndex(dense_encoder, seed=seed)
    if mode == "colbert":
        if colbert_encoder is None:
            colbert_encoder = TokenEncoder(checkpoint)
        elif checkpoint is not None:
            raise ValueError("pass either colbert_encoder= or checkpoint=, not both")
        return ColbertIndex(colbert_encoder, seed=seed)
    return FusionIndex(
        [BM25Index(stopwords=stopwords, seed=seed), DenseIndex(dense_encoder, seed=seed)], seed=seed
    )


# --------------------------------------------------------------------------------------------- retrieve


def _sample_seed(seed: int, sample_id: str) -> list[int]:
    return [int(seed), zlib.crc32(sample_id.encode("utf-8"))]


def _check_samples(samples: Sequence[Sample]) -> None:
    if not samples:
        raise ValueError("retrieve: no samples given; pass at least one Sample")
    seen_samples: set[str] = set()
    for s in samples:
        if s.sample_id in seen_samples:
            raise ValueError(f"retrieve: sample_id {s.sample_id!r} appears twice; sample ids must be unique")
        seen_samples.add(s.sample_id)
        if not s.passages:
            raise ValueError(f"retrieve: sample {s.sample_id!r} has no passages; drop it or add its passages")


def _pool(samples: Sequence[Sample]) -> list[Passage]:
    """Every passage once, deduplicated on (title, text) keeping the first passage_id; checks id clashes."""
    by_content: dict[tuple[str, str], Passage] = {}
    by_id: dict[str, tuple[tuple[str, str], str]] = {}
    for s in samples:
        for p in s.passages:
            key = (p.title, p.text)
            known = by_id.get(p.passage_id)
            if known is not None and known[0] != key:
                raise ValueError(
                    f"retrieve: passage_id {p.passage_id!r} names different passages in samples "
                    f"{known[1]!r} and {s.sample_id!r}; passage ids must be unique across the dataset"
                )
            by_id.setdefault(p.passage_id, (key, s.sample_id))
            by_content.setdefault(key, p)
    return list(by_content.values())


def _check_sample_ids(sample: Sample) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for p in sample.passages:
        key = (p.title, p.text)
        if seen.setdefault(p.passage_id, key) != key:
            raise ValueError(
                f"retrieve: sample {sample.sample_id!r} has two different passages with id "
                f"{p.passage_id!r}; passage ids must be unique"
            )


def _to_retrieved(sample: Sample, passages: Sequence[Passage], hits: list[tuple[int, float]]) -> Retrieved:
    chosen = [passages[i] for i, _ in hits]
    return Retrieved(
        sample_id=sample.sample_id,
        passage_ids=tuple(p.passage_id for p in chosen),
        scores=tuple(float(s) for _, s in hits),
        texts=tuple(p.text for p in chosen),
        titles=tuple(p.title for p in chosen),
    )


def retrieve(
    samples: Sequence[Sample],
    mode: str,
    k: int,
    scope: str = "per_sample",
    seed: int = 0,
    *,
    checkpoint: str | None = None,
    stopwords: bool | Iterable[str] = True,
    show_progress: bool | None = None,
    dense_encoder: SentenceEncoder | None = None,
    colbert_encoder: TokenEncoder | None = None,
) -> list[Retrieved]:
    """Rank passages for every sample's question; returns one :class:`Retrieved` per sample, in order.

    mode: ``bm25`` | ``dense`` | ``both`` | ``colbert`` (see the module docstring).
    k: passages kept per sample (fewer when the searched set is smaller).
    scope: ``per_sample`` (one index per sample over its own passages) or ``pooled`` (one index over
        all samples' passages, deduplicated on title+text keeping the first passage_id).
    seed: seeds the tie-breaking among equal scores (nothing else is random).
    checkpoint: local folder of a ColBERT/BERT-like checkpoint, for mode ``colbert`` only.
    dense_encoder / colbert_encoder: reuse encoders (and their per-text caches) across calls; by default
        fresh ones are made, so every passage and question is encoded exactly once per call.

    Raises ValueError (one line) for a bad mode, scope or k, no samples, a sample without passages, or
    passage ids that name two different passages.
    """
    check_mode(mode)
    check_scope(scope)
    k = check_k(k)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if checkpoint is not None and mode != "colbert":
        raise ValueError(f"checkpoint= is only used by mode 'colbert', not {mode!r}")
    samples = list(samples)
    _check_samples(samples)
    t0 = time.perf_counter()

    if mode in ("dense", "both") and dense_encoder is None:
        dense_encoder = SentenceEncoder(show_progress=show_progress)
    if mode == "colbert" and colbert_encoder is None:
        colbert_encoder = TokenEncoder(checkpoint, show_progress=show_progress)
    questions = [s.question for s in samples]

    def new_index(index_seed: SeedLike) -> _Index:
        return make_retriever(
            mode,
            seed=index_seed,
            stopwords=stopwords,
            dense_encoder=dense_encoder,
            colbert_encoder=colbert_encoder,
        )

    def prefetch(passages: Sequence[Passage]) -> None:
        # One batched (length-sorted) pass over every distinct text, so per-sample indices and the
        # per-question searches below only read the encoders' caches.
        texts = list(dict.fromkeys(passage_text(p) for p in passages))
        if dense_encoder is not None:
            dense_encoder.encode(texts)
            dense_encoder.encode(questions)
        if colbert_encoder is not None:
            colbert_encoder.encode_docs(texts)
            colbert_encoder.encode_queries(questions)

    out: list[Retrieved] = []
    if scope == "pooled":
        pool = _pool(samples)
        prefetch(pool)
        index = new_index(seed).build(pool)
        for s in samples:
            out.append(_to_retrieved(s, pool, index.search(s.question, k)))
        n_indexed = len(pool)
    else:
        for s in samples:
            _check_sample_ids(s)
        prefetch([p for s in samples for p in s.passages])
        n_indexed = 0
        for s in samples:
            index = new_index(_sample_seed(seed, s.sample_id)).build(s.passages)
            out.append(_to_retrieved(s, s.passages, index.search(s.question, k)))
            n_indexed += len(s.passages)
    logger.info(
        "retrieved top-%d for %d samples (mode=%s, scope=%s, %d passages indexed) in %.2fs",
        k,
        len(samples),
        mode,
        scope,
        n_indexed,
        time.perf_counter() - t0,
    )
    return out


# --------------------------------------------------------------------------------------------- recall


def normalize_answer_text(text: str) -> str:
    """Lowercase and collapse every run of whitespace to one space (stripped)."""
    return " ".join(text.lower().split())


def answer_recall_at_k(samples: Sequence[Sample], retrieved: Sequence[Retrieved], k: int) -> float | None:
    """Fraction of samples whose top-``k`` retrieved passages contain a gold answer.

    A sample counts as a hit when any alias of any of its ``answers`` entries, normalised (lowercase,
    whitespace collapsed), is a substring of its top-k passages' normalised ``title + text``
    concatenated; passages are joined with a newline, which normalised text never contains, so no alias
    can match across two passages. Samples without gold answers (no non-empty alias) are skipped and not
    counted; returns None when no sample has one. ``retrieved`` is matched to ``samples`` by sample_id;
    a sample with answers but no Retrieved raises ValueError.
    """
    k = check_k(k)
    by_id = {r.sample_id: r for r in retrieved}
    hits = counted = 0
    for s in samples:
        aliases = {
            normalize_answer_text(a)
            for entry in s.answers
            for a in ((entry,) if isinstance(entry, str) else entry)  # tolerate a flat list of str
        }
        aliases.discard("")
        if not aliases:
            continue
        r = by_id.get(s.sample_id)
        if r is None:
            raise ValueError(f"answer_recall_at_k: no retrieval result for sample {s.sample_id!r}")
        titles = r.titles if len(r.titles) == len(r.texts) else ("",) * len(r.texts)
        haystack = "\n".join(
            normalize_answer_text(f"{title} {text}" if title else text)
            for title, text in list(zip(titles, r.texts))[:k]
        )
        counted += 1
        hits += any(a in haystack for a in aliases)
    skipped = len(samples) - counted
    if skipped:
        logger.info(
            "answer_recall_at_k: skipped %d of %d samples without gold answers", skipped, len(samples)
        )
    return None if counted == 0 else hits / counted
