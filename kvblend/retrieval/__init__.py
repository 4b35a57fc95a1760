"""Retrieval stage: rank each sample's candidate passages for its question.

Public API::

    retrieve(samples, mode, k, scope="per_sample", seed=0, ...) -> list[Retrieved]
    answer_recall_at_k(samples, retrieved, k) -> float | None
    save_retrieval(path, dataset_name, mode, k, scope, retrieved, recall) -> Path
    load_retrieval(path) -> RetrievalRun            # raises RetrievalFileError (a ValueError)
    make_retriever(mode, ...) -> index with build(passages) / search(query, k) / scores(query)

Modes: bm25, dense (all-MiniLM-L6-v2), both (RRF of the two, k=60), colbert (MaxSim over token
embeddings; with MiniLM an UNTRAINED stand-in for ColBERT). Importing this package does not import
torch or transformers; the encoders load them on first use.
"""

from .encoders import EncoderLoadError, SentenceEncoder, TokenEncoder, default_model_path
from .retriever import (
    MODES,
    RRF_K,
    SCOPES,
    BM25Index,
    ColbertIndex,
    DenseIndex,
    FusionIndex,
    Retriever,
    answer_recall_at_k,
    make_retriever,
    normalize_answer_text,
    passage_text,
    reciprocal_rank_fusion,
    retrieve,
    rrf_scores,
    simple_tokenize,
)
from .storage import RetrievalFileError, RetrievalRun, load_retrieval, save_retrieval

__all__ = [
    "MODES",
    "RRF_K",
    "SCOPES",
    "BM25Index",
    "ColbertIndex",
    "DenseIndex",
    "EncoderLoadError",
    "FusionIndex",
    "RetrievalFileError",
    "RetrievalRun",
    "Retriever",
    "SentenceEncoder",
    "TokenEncoder",
    "answer_recall_at_k",
    "default_model_path",
    "load_retrieval",
    "make_retriever",
    "normalize_answer_text",
    "passage_text",
    "reciprocal_rank_fusion",
    "retrieve",
    "rrf_scores",
    "save_retrieval",
    "simple_tokenize",
]
