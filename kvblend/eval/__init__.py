"""Evaluation: answer-quality metrics (pure functions, no torch)."""

from kvblend.eval.metrics import (
    best_em,
    best_f1,
    best_rouge_l,
    exact_match,
    f1_score,
    fidelity,
    first_line,
    normalize_answer,
    rouge_l,
    score_answer,
    token_f1,
)

__all__ = [
    "best_em",
    "best_f1",
    "best_rouge_l",
    "exact_match",
    "f1_score",
    "fidelity",
    "first_line",
    "normalize_answer",
    "rouge_l",
    "score_answer",
    "token_f1",
]
