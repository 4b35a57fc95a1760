"""The `make demo` job: the decode path (kvblend.pipeline.decode) on the first 3 musique_s samples, their first
5 passages as chunks, with full, reuse and blend. Every answer starts with its chunks on config.start_tier
(staged before the clock); TTFT is the engine's (kvblend/clock.py). Reuse and blend are timed a second time with
their chunks GPU-resident (the warm TTFT: one token, nothing to fetch; the decode loop's warm pass, shared with
`kvblend run`), so both figures sit side by side. No prefetch: with `--start-tier disk` every answer is cold."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvblend.config import EngineConfig
from kvblend.data.datasets import load_dataset
from kvblend.engine import Engine
from kvblend.eval.metrics import best_f1
from kvblend.pipeline.decode import answer_and_score, answer_plans
from kvblend.pipeline.plan import plan_first_passages
from kvblend.vocab import MODES

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DemoRow:
    sample_id: str
    question: str
    gold: str
    mode: str
    answer: str
    f1: float
    same_as_full: bool
    ttft_ms: float  # chunks starting on config.start_tier
    warm_ttft_ms: float  # chunks GPU-resident (full prefill fetches nothing: its own TTFT)
    fetch_ms: float
    chunk_tiers: tuple[str, ...]
    warm_chunk_tiers: tuple[str, ...]  # where the warm run found each chunk ("gpu" unless it had to be rebuilt)
    num_tokens: int
    num_recomputed: int


def run_demo(config: EngineConfig, dataset: str = "musique_s", num_samples: int = 3, num_chunks: int = 5,
             engine: Engine | None = None, progress: bool = True) -> list[DemoRow]:
    """Answer each sample with every mode through the decode loop; one row per (sample, mode)."""
    data = load_dataset(dataset, limit=num_samples)
    engine = engine or Engine(config)
    plans = plan_first_passages(config, engine, data, num_chunks)
    sampling = engine.sampling(data.max_new_tokens)
    outs = {mode: answer_plans(engine, plans, mode, sampling, config.start_tier, progress, warm=True)
            for mode in MODES}
    rows: list[DemoRow] = []
    for i, (sample, plan) in enumerate(zip(data.samples, plans)):
        full_answer = answer_and_score(data, plan, outs["full"][i].out.text)[0]
        gold = sample.answers[0][0] if sample.answers and sample.answers[0] else ""
        for mode in MODES:
            out, warm = outs[mode][i].out, outs[mode][i].warm
            answer = answer_and_score(data, plan, out.text)[0]
            rows.append(DemoRow(sample.sample_id, sample.question, gold, mode, answer, best_f1(answer, sample.answers),
                                answer == full_answer, out.ttft_ms, warm.ttft_ms, out.fetch_ms, out.chunk_tiers,
                                warm.chunk_tiers, out.blend.num_tokens, out.blend.num_recomputed))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    header = "| sample | gold | mode | answer | F1 | = full | TTFT ms | warm TTFT ms | fetch ms | recomputed |"
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ans = r.answer.replace("|", "\\|")[:60]
        lines.append(f"| {r.sample_id} | {r.gold[:30]} | {r.mode} | {ans} | {r.f1:.2f} | "
                     f"{'yes' if r.same_as_full else 'no'} | {r.ttft_ms:.0f} | {r.warm_ttft_ms:.0f} | {r.fetch_ms:.1f} | "
                     f"{r.num_recomputed}/{r.num_tokens} |")
    by_mode = {m: [r for r in rows if r.mode == m] for m in MODES}
    lines.append("")
    lines.append("| mode | mean F1 | answers = full | mean TTFT ms | TTFT vs full | chunks fetched from | "
                 "warm TTFT ms (chunks GPU-resident) | warm vs full |")
    lines.append("|---|---|---|---|---|---|---|---|")
    full_ttft = sum(r.ttft_ms for r in by_mode["full"]) / max(1, len(by_mode["full"]))
    for m, rs in by_mode.items():
        if not rs:
            continue
        ttft = sum(r.ttft_ms for r in rs) / len(rs)
        warm = sum(r.warm_ttft_ms for r in rs) / len(rs)
        tiers = sorted({t for r in rs for t in r.chunk_tiers}) if m != "full" else ["- (full prefill)"]
        lines.append(f"| {m} | {sum(r.f1 for r in rs) / len(rs):.3f} | {sum(r.same_as_full for r in rs)}/{len(rs)} "
                     f"| {ttft:.0f} | {full_ttft / ttft:.2f}x | {', '.join(tiers)} | {warm:.0f} | "
                     f"{full_ttft / warm:.2f}x |")
    return "\n".join(lines)
