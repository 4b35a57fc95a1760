"""Server-side retrieval for `kvblend serve --corpus NAME|PATH`: one BM25 index over a passage pool.

NAME is a known dataset (its passages pooled over all samples, deduplicated on title + text, formatted with
the dataset's passage template, as the pipeline formats chunks). PATH is a dataset file of any shape
kvblend reads, or a plain corpus: a JSON array / JSONL lines of strings or {"title", "text"[, "id"]} objects.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kvblend.data.datasets import DatasetError
from kvblend.serve.protocol import Document

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Corpus:
    name: str
    documents: tuple[Document, ...]  # text already formatted as a chunk
    index: object  # kvblend.retrieval BM25Index

    def search(self, query: str, k: int) -> list[Document]:
        hits = self.index.search(query, min(k, len(self.documents)))
        return [Document(self.documents[i].text, self.documents[i].title, self.documents[i].doc_id, float(s))
                for i, s in hits]


def _plain_records(path: Path) -> list | None:
    """The records of a plain corpus file, or None when the file is a dataset of another shape."""
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            records = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"not valid JSON/JSONL ({str(exc).splitlines()[0]})") from None
    if not isinstance(records, list) or not records:
        return None
    plain = all(isinstance(r, str) or (isinstance(r, dict) and isinstance(r.get("text"), str)
                                       and "question" not in r and "ctxs" not in r) for r in records)
    return records if plain else None


def load_corpus(name_or_path: str) -> Corpus:
    from kvblend.data.datasets import load_dataset
    from kvblend.retrieval import BM25Index
    from kvblend.types import Passage

    path = Path(name_or_path)
    records = _plain_records(path) if path.is_file() else None
    docs: list[Document] = []
    if records is not None:
        for i, r in enumerate(records):
            if isinstance(r, str):
                r = {"text": r}
            title = r.get("title") or ""
            if not isinstance(title, str) or not r["text"].strip():
                raise DatasetError(path, f"record {i}: expected a non-empty 'text' and a string 'title'")
            text = f"{title}\n\n{r['text']}\n\n" if title else f"{r['text']}\n\n"
            docs.append(Document(text, title, str(r.get("id", f"{path.stem}/{i}"))))
        name = path.stem
    else:
        data = load_dataset(name_or_path)
        seen: set[tuple[str, str]] = set()
        for sample in data.samples:
            for p in sample.passages:
                if (p.title, p.text) not in seen:
                    seen.add((p.title, p.text))
                    docs.append(Document(data.template.format_passage(Passage(p.passage_id, p.title, p.text)),
                                         p.title, p.passage_id))
        name = data.name
    if not docs:
        raise DatasetError(name_or_path, "the corpus holds no passages")
    index = BM25Index(seed=0).build([Passage(d.doc_id, d.title, d.text) for d in docs])
    log.info("corpus %s: %d passages indexed (bm25)", name, len(docs))
    return Corpus(name, tuple(docs), index)
