"""Datasets: files -> Sample records plus the prompt template and metric to use (no tokenisation here)."""

from kvblend.data.datasets import (
    KNOWN_DATASETS,
    SHAPES,
    Dataset,
    DatasetError,
    PromptTemplate,
    detect_shape,
    load_dataset,
    normalize_question,
)

__all__ = [
    "KNOWN_DATASETS",
    "SHAPES",
    "Dataset",
    "DatasetError",
    "PromptTemplate",
    "detect_shape",
    "load_dataset",
    "normalize_question",
]
