"""Q3_promotion_recovery on the frontier's samples: a blend variant decoded with only `gpu_chunks` of the
chunks resident plus promotions, against the same variant with every chunk resident.

Per sample (the frontier's prompt: the first 5 passages as chunks, greedy, the suite's max new tokens), three
arms through the engine's public speculative path (Engine.answer_speculative with SpecOptions, the EngineConfig
defaults for drafter, proxy, threshold and draft length):

  all_resident   every chunk resident (no placeholders, no proxy): the reference arm;
  promote        the top `gpu_chunks` chunks resident, the others CPU placeholders promoted by the proxy
                 (default key_bounds, with the warm-start round before the first token);
  static         the same residents, no proxy: the placeholders stay masked (the contrast: what promotion buys).

Which chunks start resident follows the engine's rule (fusion/layout.place: best by score), with the scores the
pipeline gives first passages (pipeline/plan.py::plan_first_passages: 1 - i/n, so passages in retrieval order
and the first `gpu_chunks` are resident). Each arm's greedy answer is compared with the full-prefill reference
exactly as the frontier compares a run (`same` token ids, `exact` after SQuAD normalisation, Rouge-L, task
score); `same_as_all_resident` compares it with the all_resident arm's answer. Speculative decoding is lossless
under greedy verification, so all_resident is the variant's own greedy blend answer.
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable, Sequence

import numpy as np

from kvblend.eval.metrics import compare_to_full
from kvblend.quality.stats import mean_ci, paired_ci, ratio_of_means
from kvblend.quality.variants import VARIANTS

ARMS = ("all_resident", "promote", "static")
ARM_METRICS = ("same", "exact", "fid_rougeL", "score", "promotions", "same_as_all_resident")
DEFAULT_GPU_CHUNKS = 2
DEFAULT_RATIO = 0.15


def promotion_key(variant: str, ratio: float, gpu_chunks: int = DEFAULT_GPU_CHUNKS) -> str:
    return f"{variant}@{ratio:g}/gpu{gpu_chunks}"


def first_passage_scores(num_chunks: int) -> tuple[float, ...]:
    """The scores pipeline/plan.py::plan_first_passages gives a sample's first passages (retrieval order)."""
    return tuple(1.0 - i / max(1, num_chunks) for i in range(num_chunks))


def measure_promotion(model, prompt, ref_tokens: Sequence[int], full_answer: str, params, variant: str,
                      ratio: float, gpu_chunks: int = DEFAULT_GPU_CHUNKS, check_layer: int = 1, *,
                      answer_text: Callable[[Sequence[int]], str], metric: str | None = None,
                      answers: Any = None) -> dict[str, Any]:
    """The three arms on one prompt (a throwaway chunk store under a temporary home). Returns the record."""
    from kvblend.config import EngineConfig
    from kvblend.engine import Engine, SpecOptions
    from kvblend.fusion.select import SelectionPolicy
    from kvblend.vocab import SCORE_ON

    v = VARIANTS[variant]
    n = len(prompt.chunk_ids)
    scores = first_passage_scores(n)
    with tempfile.TemporaryDirectory(prefix="kvblend-q3-") as home:
        # score_on: a frontier-only signal (fusion/select.py EXTRA_SIGNALS) is not an EngineConfig value yet; the
        # engine's public `selection` attribute then carries the variant's policy (set for every variant below)
        config = EngineConfig(home=home, chunk_sink=v.chunk_sink, mode="blend", ratio=ratio, check_layer=check_layer,
                              score_on=v.score_on if v.score_on in SCORE_ON else "k",
                              select_first_tokens=v.select_first_tokens, select_layers=v.select_layers,
                              gpu_chunks=gpu_chunks, temperature=0.0)
        engine = Engine(config, model=model)
        engine.selection = SelectionPolicy(v.score_on, v.select_first_tokens, v.select_layers)
        options = {
            "all_resident": SpecOptions.from_config(config, gpu_chunks=n, proxy="none", mode="blend", ratio=ratio),
            "promote": SpecOptions.from_config(config, gpu_chunks=gpu_chunks, mode="blend", ratio=ratio),
            "static": SpecOptions.from_config(config, gpu_chunks=gpu_chunks, proxy="none", mode="blend",
                                                   ratio=ratio),
        }
        arms: dict[str, dict] = {}
        tokens_of: dict[str, list[int]] = {}
        for name, o in options.items():
            out, steps, trace, placement = engine.answer_speculative(prompt, None, scores, o, sampling=params)
            tokens = list(out.token_ids)
            tokens_of[name] = tokens
            answer = answer_text(tokens)
            arms[name] = {
                "answer": answer, **compare_to_full(tokens, ref_tokens, answer, full_answer, metric, answers),
                "resident": [s.index for s in placement.resident],
                "promotions": sum(len(t.promoted) for t in trace),
                "promoted": [c for t in trace for c in t.promoted],
                "demotions": sum(len(t.demoted) for t in trace),
                "num_tokens": len(tokens),
            }
    for name in ARMS:
        arms[name]["same_as_all_resident"] = tokens_of[name] == tokens_of["all_resident"]
    return {"variant": variant, "ratio": ratio, "gpu_chunks": gpu_chunks, "num_chunks": n,
            "drafter": options["promote"].drafter, "proxy": options["promote"].proxy,
            "threshold": options["promote"].threshold, "spec_k": options["promote"].k,
            "resident_rule": "first passages in retrieval order (plan_first_passages scores 1 - i/n)",
            "arms": arms}


def _arm_values(samples: Sequence[dict], key: str, arm: str, metric: str) -> list[float]:
    out = []
    for s in samples:
        rec = (s.get("promotion") or {}).get(key)
        if rec and rec["arms"].get(arm, {}).get(metric) is not None:
            out.append(float(rec["arms"][arm][metric]))
    return out


def paired_arms(samples: Sequence[dict], key: str, arm: str, base: str, metric: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for s in samples:
        rec = (s.get("promotion") or {}).get(key)
        if not rec:
            continue
        a, b = rec["arms"].get(arm, {}), rec["arms"].get(base, {})
        if a.get(metric) is None or b.get(metric) is None:
            continue
        xs.append(float(a[metric]))
        ys.append(float(b[metric]))
    return xs, ys


def recovery(samples: Sequence[dict], key: str, arm: str = "promote", metric: str = "exact") -> dict | None:
    """mean(metric of arm) / mean(metric of all_resident) over the samples that have both, with a paired
    95% bootstrap interval; None without samples or when the all-resident mean is 0."""
    x, y = paired_arms(samples, key, arm, "all_resident", metric)
    if not x or float(np.mean(y)) == 0.0:
        return None
    m, lo, hi = paired_ci(x, y, ratio_of_means)
    return {"mean": m, "ci95": [lo, hi], "n": len(x), "arm_mean": float(np.mean(x)), "all_resident_mean": float(np.mean(y))}


def aggregate_promotion(samples: Sequence[dict]) -> dict[str, Any]:
    """Per promotion key: per arm the mean and interval of every metric; the recovery ratios (fidelity =
    `exact`, and the task score) of both 2-resident arms over all_resident."""
    keys = list(dict.fromkeys(k for s in samples for k in (s.get("promotion") or {})))
    out: dict[str, Any] = {}
    for key in keys:
        cell: dict[str, Any] = {}
        for arm in ARMS:
            row: dict[str, Any] = {"n": len(_arm_values(samples, key, arm, "exact"))}
            for metric in ARM_METRICS:
                vals = _arm_values(samples, key, arm, metric)
                if vals:
                    m, lo, hi = mean_ci(vals)
                    row[metric] = {"mean": m, "ci95": [lo, hi]}
            cell[arm] = row
        cell["recovery"] = {f"{arm}/{metric}": recovery(samples, key, arm, metric)
                            for arm in ("promote", "static") for metric in ("exact", "score")}
        out[key] = cell
    return out
