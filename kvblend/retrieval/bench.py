"""Answer-recall@k of every retrieval mode and scope on a CacheBlend-style JSON file (a quick benchmark).

    python -m kvblend.retrieval.bench [--file musique_s.json] [--n 50] [--k 5] [--modes bm25,dense]

Reads ``[{question, answers: [str] | [[str]], ctxs: [{title, text}]}]`` directly (no kvblend.data
dependency) and prints recall and wall time per (mode, scope). By default every run starts with fresh
encoders (cold per-text caches); with --share-encoders the runs after the first reuse encoded texts.
Model weights stay loaded between runs, so the first run that needs them also pays the load time.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from kvblend.types import Passage, Sample

from .retriever import MODES, SCOPES, answer_recall_at_k, retrieve

logger = logging.getLogger(__name__)

DEFAULT_FILE = "/work/shared/data/cacheblend_inputs/musique_s.json"


def load_cacheblend_json(path: str | Path, limit: int | None = None, name: str | None = None) -> list[Sample]:
    """Samples from a CacheBlend input file; ids are ``{name}/{i}`` and ``{name}/{i}/{j}``."""
    path = Path(path)
    name = name or path.stem
    rows = json.loads(path.read_text(encoding="utf-8"))
    samples = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        answers = tuple(
            (a,) if isinstance(a, str) else tuple(a) for a in row.get("answers", [])
        )
        passages = tuple(
            Passage(f"{name}/{i}/{j}", c.get("title", "") or "", c.get("text", "") or "")
            for j, c in enumerate(row["ctxs"])
        )
        samples.append(Sample(f"{name}/{i}", row["question"], passages, answers, name))
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=DEFAULT_FILE)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--scopes", default=",".join(SCOPES))
    ap.add_argument("--dense-max-length", type=int, default=None)
    ap.add_argument("--share-encoders", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    from .encoders import SentenceEncoder, TokenEncoder

    shared = {}

    samples = load_cacheblend_json(args.file, args.n)
    rows = []
    for mode in args.modes.split(","):
        for scope in args.scopes.split(","):
            t0 = time.perf_counter()
            if not args.share_encoders or not shared:
                shared = {
                    "dense_encoder": SentenceEncoder(max_length=args.dense_max_length, show_progress=False),
                    "colbert_encoder": TokenEncoder(show_progress=False),
                }
            kw = {}
            if mode in ("dense", "both"):
                kw["dense_encoder"] = shared["dense_encoder"]
            if mode == "colbert":
                kw["colbert_encoder"] = shared["colbert_encoder"]
            retrieved = retrieve(samples, mode, args.k, scope=scope, show_progress=False, **kw)
            secs = time.perf_counter() - t0
            recall = answer_recall_at_k(samples, retrieved, args.k)
            rows.append((mode, scope, recall, secs))
            print(f"{mode:8s} {scope:11s} recall@{args.k}={recall:.3f}  {secs:7.1f}s", flush=True)
    # "original order": the first k passages as listed in the file, a reference point.
    from kvblend.types import Retrieved

    first = []
    for s in samples:
        head = s.passages[: args.k]
        first.append(
            Retrieved(
                s.sample_id,
                tuple(p.passage_id for p in head),
                (0.0,) * len(head),
                tuple(p.text for p in head),
                tuple(p.title for p in head),
            )
        )
    print(f"{'file order':20s} recall@{args.k}={answer_recall_at_k(samples, first, args.k):.3f}")
    print(f"| mode | scope | answer-recall@{args.k} | seconds |\n|---|---|---|---|")
    for mode, scope, recall, secs in rows:
        print(f"| {mode} | {scope} | {recall:.3f} | {secs:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
