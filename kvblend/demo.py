"""The `make demo` job: full vs reuse vs blend on the first musique_s samples with the default model."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tqdm import tqdm

from kvblend.config import EngineConfig
from kvblend.data.datasets import load_dataset
from kvblend.engine import Engine
from kvblend.eval.metrics import best_f1, first_line
from kvblend.types import Sample

log = logging.getLogger(__name__)

MODES = ("full", "reuse", "blend")


@dataclass(frozen=True, slots=True)
class DemoRow:
    sample_id: str
    question: str
    gold: str
    mode: str
    answer: str
    f1: float
    same_as_full: bool
    ttft_ms: float
    num_tokens: int
    num_recomputed: int


def _pieces(engine: Engine, sample: Sample, template, num_chunks: int):
    passages = sample.passages[:num_chunks]
    texts = [template.format_passage(p) for p in passages]
    prompt = engine.prompt(template.prefix, texts, template.format_query(sample.question))
    return prompt, texts


def run_demo(config: EngineConfig, dataset: str = "musique_s", num_samples: int = 3, num_chunks: int = 5,
             engine: Engine | None = None, progress: bool = True) -> list[DemoRow]:
    """Build the chunk caches, then answer each sample with every mode; returns one row per (sample, mode)."""
    data = load_dataset(dataset, limit=num_samples)
    engine = engine or Engine(config)
    prompts = [_pieces(engine, s, data.template, num_chunks) for s in data.samples]
    total = sum(len(p.chunk_ids) for p, _ in prompts)
    with tqdm(total=total, desc="building chunk KV", unit="chunk", disable=not progress) as bar:
        for prompt, texts in prompts:
            for ids, text in zip(prompt.chunk_ids, texts):
                engine.ensure_chunk(ids, text, prefix_ids=prompt.prefix_ids)
                bar.update()
    sampling = engine.sampling(data.max_new_tokens)
    # one uncounted warm-up so the first timed answer does not pay one-time costs
    engine.answer(prompts[0][0], prompts[0][1], mode="full", sampling=sampling)
    rows: list[DemoRow] = []
    jobs = [(s, p, m) for s, p in zip(data.samples, prompts) for m in MODES]
    for sample, (prompt, texts), mode in tqdm(jobs, desc="answering", unit="answer", disable=not progress):
        out = engine.answer(prompt, texts, mode=mode, sampling=sampling)
        answer = first_line(out.text)
        full_answer = next((r.answer for r in rows if r.sample_id == sample.sample_id and r.mode == "full"), answer)
        gold = sample.answers[0][0] if sample.answers and sample.answers[0] else ""
        rows.append(DemoRow(sample.sample_id, sample.question, gold, mode, answer,
                            best_f1(answer, sample.answers), answer == full_answer, out.ttft_ms,
                            out.blend.num_tokens, out.blend.num_recomputed))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    header = "| sample | gold | mode | answer | F1 | = full | TTFT ms | recomputed |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ans = r.answer.replace("|", "\\|")[:60]
        lines.append(f"| {r.sample_id} | {r.gold[:30]} | {r.mode} | {ans} | {r.f1:.2f} | "
                     f"{'yes' if r.same_as_full else 'no'} | {r.ttft_ms:.0f} | {r.num_recomputed}/{r.num_tokens} |")
    by_mode = {m: [r for r in rows if r.mode == m] for m in MODES}
    lines.append("")
    lines.append("| mode | mean F1 | answers = full | mean TTFT ms | TTFT vs full |")
    lines.append("|---|---|---|---|---|")
    full_ttft = sum(r.ttft_ms for r in by_mode["full"]) / max(1, len(by_mode["full"]))
    for m, rs in by_mode.items():
        if not rs:
            continue
        ttft = sum(r.ttft_ms for r in rs) / len(rs)
        lines.append(f"| {m} | {sum(r.f1 for r in rs) / len(rs):.3f} | {sum(r.same_as_full for r in rs)}/{len(rs)} "
                     f"| {ttft:.0f} | {full_ttft / ttft:.2f}x |")
    return "\n".join(lines)
