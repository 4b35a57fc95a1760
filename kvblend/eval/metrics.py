"""Answer-quality metrics: SQuAD-normalised word F1 / EM, Rouge-L (stemmed), fidelity to a reference run.

Pure functions over strings (or token ids); no torch. Word-level F1 follows the SQuAD / LongBench convention;
`token_f1` / `cacheblend_f1` reproduce the original CacheBlend scripts' token-id variant and are kept only as
an option for comparing with published numbers.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

Answers = str | Sequence[str] | Sequence[Sequence[str]]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop ASCII punctuation, drop articles (a/an/the), squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_line(text: str) -> str:
    """The first non-empty line of a generation, stripped ("" when there is none)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _overlap_f1(pred: Sequence[Hashable], gold: Sequence[Hashable]) -> float:
    if not pred or not gold:
        # SQuAD v2 convention: two empty answers agree, one empty answer scores 0
        return float(len(pred) == len(gold))
    num_same = sum((Counter(pred) & Counter(gold)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred)
    recall = num_same / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, gold: str) -> float:
    """Word-level F1 between normalised prediction and gold answer (bag of words)."""
    return _overlap_f1(normalize_answer(pred).split(), normalize_answer(gold).split())


def exact_match(pred: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def flatten_answers(answers: Answers) -> list[str]:
    """All aliases of all gold entries: accepts "a", ["a", "b"], [["a", "a2"], ["b"]] or Sample.answers."""
    if isinstance(answers, str):
        return [answers]
    flat: list[str] = []
    for entry in answers:
        if isinstance(entry, str):
            flat.append(entry)
        else:
            flat.extend(entry)
    if not flat:
        raise ValueError("no gold answers to score against")
    return flat


def best_f1(pred: str, aliases: Answers) -> float:
    """Max word F1 over every alias of every gold entry."""
    return max(f1_score(pred, gold) for gold in flatten_answers(aliases))


def best_em(pred: str, aliases: Answers) -> float:
    """Max exact match over every alias of every gold entry."""
    return max(exact_match(pred, gold) for gold in flatten_answers(aliases))


def token_f1(pred_ids: Sequence[int], gold_ids: Sequence[int]) -> float:
    """F1 over token-id multisets (the CacheBlend scripts' variant; ids of the normalised texts, no BOS)."""
    return _overlap_f1(list(pred_ids), list(gold_ids))


def cacheblend_parse_generation(text: str) -> str:
    """The original scripts' answer parsing: first line, then "Yes..." -> "Yes" and "No..." -> "No".

    Kept only to reproduce published numbers: it also turns "Norway" or "Nobel Prize" into "No".
    """
    text = text.lstrip("\n").split("\n")[0]
    words = text.split()
    if text.startswith(("Yes", "yes")):
        return "Yes"
    if words and words[0].startswith(("No", "no")):
        return "No"
    return text


def cacheblend_f1(pred: str, gold: str, encode: Callable[[str], Sequence[int]]) -> float:
    """CacheBlend's F1: parse_generation + SQuAD normalisation + token-id F1.

    `encode` maps text to token ids WITHOUT special tokens (the original dropped the BOS id).
    """
    pred_ids = encode(normalize_answer(cacheblend_parse_generation(pred)))
    gold_ids = encode(normalize_answer(gold))
    return token_f1(pred_ids, gold_ids)


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer  # imported lazily: pulls in nltk

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: str, ref: str) -> float:
    """Rouge-L F-measure with Porter stemming (rouge-score package; its tokeniser keeps only [a-z0-9])."""
    return float(_rouge_scorer().score(ref, pred)["rougeL"].fmeasure)


def best_rouge_l(pred: str, refs: Answers) -> float:
    """Max Rouge-L over every reference (or alias)."""
    return max(rouge_l(pred, ref) for ref in flatten_answers(refs))


def score_answer(metric: str, pred: str, answers: Answers) -> float:
    """Dataset metric by name: "f1" -> best_f1, "em" -> best_em, "rougeL" -> best_rouge_l."""
    if metric == "f1":
        return best_f1(pred, answers)
    if metric == "em":
        return best_em(pred, answers)
    if metric == "rougeL":
        return best_rouge_l(pred, answers)
    raise ValueError(f"unknown metric {metric!r}: expected 'f1', 'em' or 'rougeL'")


def fidelity(answer: str, full_answer: str) -> dict[str, bool | float]:
    """How close an answer is to the full-prefill answer: exact (equal after strip) and Rouge-L F."""
    exact = answer.strip() == full_answer.strip()
    return {"exact": exact, "rougeL": 1.0 if exact else rouge_l(answer, full_answer)}


def compare_to_full(tokens, full_tokens, answer: str, full_answer: str, metric: str | None = None,
                    answers=None) -> dict:
    """An answer against the full-prefill reference, as the quality frontier records it: `same` token ids,
    `exact` (the same ids, or equal after SQuAD normalisation), `fid_rougeL` (Rouge-L to the full answer) and
    the task `score` (None without a metric and gold answers)."""
    same = list(tokens) == list(full_tokens)
    return {"same": same, "exact": same or normalize_answer(answer) == normalize_answer(full_answer),
            "fid_rougeL": fidelity(answer, full_answer)["rougeL"],
            "score": score_answer(metric, answer, answers) if metric and answers else None}
