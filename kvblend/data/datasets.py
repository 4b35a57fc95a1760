"""Dataset files -> Sample records, with the prompt template each dataset is evaluated with.

No tokenisation happens here. Supported shapes (see `SHAPES`):
  qa                list of {question, answers, ctxs: [{title, text}]} (CacheBlend musique_s / wikimqa_s),
                    as .json or as .jsonl (one object per line); answers are strings or alias lists
  samsum_fewshot    the same list shape whose ctxs are "Dialogue: ...\\nSummary: ..." examples (CacheBlend
                    samsum.json); question = the dialogue, answers = reference summaries
  samsum_dialogues  list of {id, dialogue, summary} (original SAMSum test split); each dialogue becomes a
                    sample whose passages are n_shots examples drawn (seeded) from the other dialogues
  toy               object {"0": str, ..., "query": str, "chunk_num": n} (CacheBlend inputs/1.json..10.json)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kvblend.errors import KvblendError
from kvblend.types import Passage, Sample

logger = logging.getLogger(__name__)

FILES_DIR = Path(__file__).resolve().parent / "files"
REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR_ENV = "KVBLEND_DATA_DIR"
MUSIQUE_SHA256 = "d679da1dad32b7f3645de9db0d7a1aaa7e679eb76ed48c02c4688137e5ce6674"

Metric = Literal["f1", "rougeL"]
SHAPES: tuple[str, ...] = ("qa", "samsum_fewshot", "samsum_dialogues", "toy")
KNOWN_DATASETS: tuple[str, ...] = ("musique_s", "wikimqa_s", "samsum", "toy")

_SUPPORTED = (
    "supported shapes: a list of {question, answers, ctxs: [{title, text}]} objects (.json or .jsonl), "
    "a list of {id, dialogue, summary} objects (SAMSum), "
    'or one toy object {"0": str, ..., "query": str, "chunk_num": int}'
)
_MISSING: Any = object()


class DatasetError(KvblendError, ValueError):
    """A dataset that cannot be loaded. The message is one line: "<file>: <where>: <problem>"."""

    def __init__(self, source: str | os.PathLike[str], problem: str, where: str | None = None) -> None:
        self.source = str(source)
        self.where = where
        self.problem = problem
        parts = [self.source, where, problem] if where else [self.source, problem]
        super().__init__(" ".join(": ".join(parts).splitlines()))


# ---------------------------------------------------------------------------------------------- prompts


def normalize_question(question: str) -> str:
    """CacheBlend's question normalisation: end with '?' and lower-case the first character."""
    question = question.strip()
    if not question:
        return question
    if not question.endswith("?"):
        question += "?"
    return question[0].lower() + question[1:]


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """Text pieces of a prompt: prefix, one formatted passage per chunk, then the query.

    passage_format may use {title} and {text}; query_format must use {question}.
    first_line_only: the answer is the first non-empty line of the generated text.
    normalize_question: apply `normalize_question` before formatting (CacheBlend QA prompts do).
    """

    prefix: str
    passage_format: str
    query_format: str
    first_line_only: bool
    normalize_question: bool = False

    def __post_init__(self) -> None:
        _check_fields(self.passage_format, {"title", "text"}, required=set(), what="passage_format")
        _check_fields(self.query_format, {"question"}, required={"question"}, what="query_format")

    def format_passage(self, passage: Passage) -> str:
        """Text of one passage chunk."""
        return self.passage_format.format(title=passage.title, text=passage.text)

    def format_query(self, question: str) -> str:
        """Text of the query piece (instruction + question)."""
        if self.normalize_question:
            question = normalize_question(question)
        return self.query_format.format(question=question)


def _check_fields(fmt: str, allowed: set[str], required: set[str], what: str) -> None:
    names = {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}
    if names - allowed or required - names:
        raise ValueError(
            f"{what} {fmt!r}: may use {sorted(allowed)}, must use {sorted(required)}, uses {sorted(names)}"
        )


QA_PREFIX = (
    "You will be asked a question after reading several passages. Please directly answer the question based on "
    "the given passages. Do NOT repeat the question. The answer should be within 5 words..\nPassages:\n"
)
QA_QUERY = (
    "\n\nAnswer the question directly based on the given passages. Do NOT repeat the question. "
    "The answer should be within 5 words. \nQuestion:{question}\nAnswer:"
)
MUSIQUE_TEMPLATE = PromptTemplate(QA_PREFIX, "{title}\n\n{text}\n\n", QA_QUERY, True, normalize_question=True)
WIKIMQA_TEMPLATE = MUSIQUE_TEMPLATE
SAMSUM_TEMPLATE = PromptTemplate(
    "Summarize the dialogue into a few short sentences. The following are some examples.\n\n",
    "{text}\n\n",
    "Dialogue: {question}\nSummary:",
    True,
)
TOY_TEMPLATE = PromptTemplate("", "{text}", "{question}", True)


SAMSUM_CONTEXT_TOKENS = 3400  # CacheBlend's samsum cap: middle few-shot examples are dropped beyond it


@dataclass(frozen=True, slots=True)
class _Spec:
    """Per-dataset policy, declared with the dataset: how to prompt, how long answers are, how to score, and
    the cap on chunk tokens per prompt (middle chunks dropped beyond it; 0 = none)."""

    template: PromptTemplate
    max_new_tokens: int
    metric: Metric
    max_context_tokens: int = 0


_SPECS: dict[str, _Spec] = {
    "qa": _Spec(MUSIQUE_TEMPLATE, 32, "f1"),
    "samsum_fewshot": _Spec(SAMSUM_TEMPLATE, 128, "rougeL", SAMSUM_CONTEXT_TOKENS),
    "samsum_dialogues": _Spec(SAMSUM_TEMPLATE, 128, "rougeL", SAMSUM_CONTEXT_TOKENS),
    "toy": _Spec(TOY_TEMPLATE, 32, "f1"),
}


@dataclass(frozen=True, slots=True)
class Dataset:
    """Loaded samples plus how to prompt and score them."""

    name: str
    samples: tuple[Sample, ...]
    template: PromptTemplate
    max_new_tokens: int
    metric: Metric
    source_path: Path
    shape: str = "qa"
    max_context_tokens: int = 0  # chunk tokens per prompt beyond which middle chunks are dropped (0 = no cap)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class RecordSource:
    """Where records come from (for error messages); JSONL sources also know each record's line number."""

    path: str
    line_numbers: tuple[int, ...] | None = None

    def where(self, index: int) -> str:
        if self.line_numbers is None:
            return f"record {index}"
        return f"line {self.line_numbers[index]} (record {index})"


def _read_text(path: Path, sha256: str | None = None) -> str:
    if not path.exists():
        raise DatasetError(path, "no such file")
    if not path.is_file():
        raise DatasetError(path, "not a regular file, expected a .json or .jsonl file")
    raw = path.read_bytes()
    if sha256 is not None:
        actual = hashlib.sha256(raw).hexdigest()
        if actual != sha256:
            raise DatasetError(path, f"sha256 mismatch: expected {sha256}, got {actual} (file modified or truncated)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DatasetError(
            path, f"not valid UTF-8: byte 0x{raw[err.start]:02x} at offset {err.start} (line {line})"
        ) from None
    if not text.strip():
        raise DatasetError(path, "file is empty, expected JSON data")
    return text


def read_json(path: str | os.PathLike[str], sha256: str | None = None) -> Any:
    """Parse a UTF-8 JSON file; every failure is a one-line DatasetError (with line/column for bad JSON)."""
    path = Path(path)
    text = _read_text(path, sha256)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(path, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def read_jsonl(path: str | os.PathLike[str]) -> tuple[list[Any], tuple[int, ...]]:
    """Parse a JSONL file (blank lines skipped); returns the records and the line number of each."""
    path = Path(path)
    records: list[Any] = []
    line_numbers: list[int] = []
    # split on "\n" only: str.splitlines() would also split inside JSON strings holding U+2028 etc.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DatasetError(path, f"invalid JSON at column {err.colno}: {err.msg}", f"line {number}") from None
        line_numbers.append(number)
    if not records:
        raise DatasetError(path, "file is empty, expected one JSON object per line")
    return records, tuple(line_numbers)


# ---------------------------------------------------------------------------------------------- shapes


def detect_shape(obj: Any, source: str | os.PathLike[str] = "<data>") -> str:
    """Name the shape (one of SHAPES) of parsed JSON data; DatasetError if it is none of them."""
    if isinstance(obj, dict):
        if "query" in obj or "chunk_num" in obj:
            return "toy"
        raise DatasetError(source, f"unknown dataset shape: an object with keys {_keys(obj)}; {_SUPPORTED}")
    if not isinstance(obj, list):
        raise DatasetError(source, f"unknown dataset shape: top-level {_describe(obj)}; {_SUPPORTED}")
    if not obj:
        raise DatasetError(source, "empty list: no records")
    first = obj[0]
    if not isinstance(first, dict):
        what = f"a list whose first item is {_describe(first)}"
        raise DatasetError(source, f"unknown dataset shape: {what}; {_SUPPORTED}")
    if "dialogue" in first:
        return "samsum_dialogues"
    if "question" in first or "ctxs" in first:
        return "samsum_fewshot" if _has_dialogue_ctxs(first) else "qa"
    raise DatasetError(source, f"unknown dataset shape: a list of objects with keys {_keys(first)}; {_SUPPORTED}")


def _has_dialogue_ctxs(record: dict[str, Any]) -> bool:
    ctxs = record.get("ctxs")
    if not isinstance(ctxs, list) or not ctxs:
        return False
    texts = [c.get("text") for c in ctxs if isinstance(c, dict)]
    return bool(texts) and all(isinstance(t, str) and t.lstrip().startswith("Dialogue:") for t in texts)


def _keys(obj: dict[str, Any]) -> str:
    keys = sorted(map(str, obj))
    return "[" + ", ".join(keys[:8]) + (", ...]" if len(keys) > 8 else "]")


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "nothing (field missing)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        if not value.strip():
            return f"blank string {value!r}" if value else "empty string"
        return f"string {value[:40] + '...' if len(value) > 40 else value!r}"
    if isinstance(value, list):
        return f"list of {len(value)} item(s)"
    if isinstance(value, dict):
        return f"object with keys {_keys(value)}"
    return type(value).__name__


def _bad_field(src: RecordSource, index: int | None, field: str, expected: str, value: Any) -> DatasetError:
    where = None if index is None else src.where(index)
    return DatasetError(src.path, f"field '{field}': expected {expected}, got {_describe(value)}", where)


def _text(rec: dict[str, Any], key: str, src: RecordSource, index: int | None, field: str | None = None) -> str:
    value = rec.get(key, _MISSING)
    if not isinstance(value, str) or not value.strip():
        raise _bad_field(src, index, field or key, "non-empty string", value)
    return value


def _as_object(rec: Any, src: RecordSource, index: int) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise DatasetError(src.path, f"expected an object, got {_describe(rec)}", src.where(index))
    return rec


def _answers(value: Any, src: RecordSource, index: int) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not value:
        raise _bad_field(src, index, "answers", "non-empty list of strings or of alias lists", value)
    out: list[tuple[str, ...]] = []
    for j, entry in enumerate(value):
        if isinstance(entry, str):
            entry, fields = [entry], [f"answers[{j}]"]
        elif isinstance(entry, list) and entry:
            fields = [f"answers[{j}][{k}]" for k in range(len(entry))]
        else:
            raise _bad_field(src, index, f"answers[{j}]", "string or non-empty list of strings", entry)
        for alias, field in zip(entry, fields, strict=True):
            if not isinstance(alias, str) or not alias.strip():
                raise _bad_field(src, index, field, "non-empty string", alias)
        out.append(tuple(entry))
    return tuple(out)


def _passages(value: Any, src: RecordSource, index: int, sample_id: str, strip: bool = False) -> tuple[Passage, ...]:
    if not isinstance(value, list) or not value:
        raise _bad_field(src, index, "ctxs", "non-empty list of {title, text} objects", value)
    out: list[Passage] = []
    for j, ctx in enumerate(value):
        if not isinstance(ctx, dict):
            raise _bad_field(src, index, f"ctxs[{j}]", "object {title, text}", ctx)
        text = _text(ctx, "text", src, index, field=f"ctxs[{j}].text")
        title = ctx.get("title", "")
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise _bad_field(src, index, f"ctxs[{j}].title", "string", title)
        out.append(Passage(f"{sample_id}/{j}", title, text.strip() if strip else text))
    return tuple(out)


# ---------------------------------------------------------------------------------------------- parsers


def parse_qa(records: list[Any], source: str | RecordSource, dataset: str) -> list[Sample]:
    """CacheBlend QA records -> samples; answers become a tuple of alias tuples."""
    src = source if isinstance(source, RecordSource) else RecordSource(str(source))
    samples = []
    for i, rec in enumerate(records):
        rec = _as_object(rec, src, i)
        sample_id = f"{dataset}/{i}"
        question = _text(rec, "question", src, i)
        answers = _answers(rec.get("answers", _MISSING), src, i)
        passages = _passages(rec.get("ctxs", _MISSING), src, i, sample_id)
        samples.append(Sample(sample_id, question, passages, answers, dataset))
    return samples


def parse_samsum_fewshot(records: list[Any], source: str | RecordSource, dataset: str) -> list[Sample]:
    """CacheBlend samsum records -> samples whose question is the bare dialogue.

    A question wrapped as "Dialogue: ...\\nSummary:" is unwrapped (the template adds the wrapper);
    example texts are stripped (the template adds the separators).
    """
    src = source if isinstance(source, RecordSource) else RecordSource(str(source))
    samples = []
    for i, rec in enumerate(records):
        rec = _as_object(rec, src, i)
        sample_id = f"{dataset}/{i}"
        dialogue = _unwrap_dialogue(_text(rec, "question", src, i))
        if not dialogue:
            raise _bad_field(src, i, "question", "a dialogue", rec["question"])
        answers = _answers(rec.get("answers", _MISSING), src, i)
        passages = _passages(rec.get("ctxs", _MISSING), src, i, sample_id, strip=True)
        samples.append(Sample(sample_id, dialogue, passages, answers, dataset))
    return samples


def _unwrap_dialogue(question: str) -> str:
    text = _clean(question)
    if text.startswith("Dialogue:"):
        text = text[len("Dialogue:") :]
    if text.endswith("Summary:"):
        text = text[: -len("Summary:")]
    return text.strip()


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def parse_samsum_dialogues(
    records: list[Any], source: str | RecordSource, dataset: str, n_shots: int = 5, seed: int = 0
) -> list[Sample]:
    """SAMSum {id, dialogue, summary} records -> few-shot samples.

    Sample i asks for dialogue i's summary; its passages are n_shots "Dialogue: ...\\nSummary: ..." examples
    drawn without replacement from the other dialogues, by a generator seeded with (seed, i), so a sample's
    examples do not depend on `limit`. Line breaks are normalised to "\\n" and texts stripped.
    """
    src = source if isinstance(source, RecordSource) else RecordSource(str(source))
    if n_shots < 0:
        raise ValueError(f"n_shots must be >= 0, got {n_shots}")
    rows = _dialogue_rows(records, src)
    if len(rows) <= n_shots:
        raise DatasetError(
            src.path,
            f"{len(rows)} dialogue(s) cannot give {n_shots} few-shot examples from other dialogues; "
            f"need at least {n_shots + 1}",
        )
    examples = [f"Dialogue: {dialogue}\nSummary: {summary}" for dialogue, summary in rows]
    samples = []
    for i, (dialogue, summary) in enumerate(rows):
        sample_id = f"{dataset}/{i}"
        shots = _pick_shots(len(rows), i, n_shots, seed)
        passages = tuple(Passage(f"{sample_id}/{j}", "", examples[k]) for j, k in enumerate(shots))
        samples.append(Sample(sample_id, dialogue, passages, ((summary,),), dataset))
    return samples


def _dialogue_rows(records: list[Any], src: RecordSource) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    first_index: dict[str, int] = {}
    for i, rec in enumerate(records):
        rec = _as_object(rec, src, i)
        raw_id = rec.get("id", _MISSING)
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
            raise _bad_field(src, i, "id", "non-empty string or integer", raw_id)
        if str(raw_id) in first_index:
            raise _bad_field(src, i, "id", f"a unique id (first used by record {first_index[str(raw_id)]})", raw_id)
        first_index[str(raw_id)] = i
        dialogue = _clean(_text(rec, "dialogue", src, i))
        summary = _clean(_text(rec, "summary", src, i))
        rows.append((dialogue, summary))
    return rows


def _pick_shots(num_rows: int, index: int, n_shots: int, seed: int) -> list[int]:
    # a str seed is hashed with sha512 by random.Random: stable across runs and Python versions
    rng = random.Random(f"kvblend/samsum/{seed}/{index}")
    return [k + 1 if k >= index else k for k in rng.sample(range(num_rows - 1), n_shots)]


def parse_toy(obj: Any, source: str | os.PathLike[str], dataset: str, index: int = 0) -> Sample:
    """One CacheBlend toy object -> one sample (no gold answers; the query holds the whole instruction)."""
    src = RecordSource(str(source))
    if not isinstance(obj, dict):
        raise DatasetError(src.path, f"expected a toy object, got {_describe(obj)}")
    num_chunks = obj.get("chunk_num", _MISSING)
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise _bad_field(src, None, "chunk_num", "positive integer", num_chunks)
    _check_toy_keys(obj, num_chunks, src)
    sample_id = f"{dataset}/{index}"
    passages = tuple(Passage(f"{sample_id}/{j}", "", _text(obj, str(j), src, None)) for j in range(num_chunks))
    query = _text(obj, "query", src, None)
    return Sample(sample_id, query, passages, (), dataset)


def _check_toy_keys(obj: dict[str, Any], num_chunks: int, src: RecordSource) -> None:
    numbered = {k for k in obj if _is_index(k)}
    expected = {str(j) for j in range(num_chunks)}
    if numbered != expected:
        missing = sorted(expected - numbered, key=int)
        extra = sorted(numbered - expected, key=int)
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        detail = "; ".join(parts)
        raise DatasetError(
            src.path,
            f'field \'chunk_num\': expected {num_chunks} chunk(s) under keys "0".."{num_chunks - 1}", '
            f"got {len(numbered)} numbered key(s) ({detail})",
        )
    unknown = sorted(set(obj) - numbered - {"query", "chunk_num"})
    if unknown:
        logger.debug("%s: ignoring keys %s", src.path, unknown)


# ---------------------------------------------------------------------------------------------- loading


def load_records(
    path: str | os.PathLike[str],
    dataset: str,
    shape: str | None = None,
    *,
    n_shots: int = 5,
    seed: int = 0,
    sha256: str | None = None,
) -> tuple[str, list[Sample]]:
    """Read one .json or .jsonl file, detect (or check) its shape and parse it; returns (shape, samples)."""
    path = Path(path)
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records, line_numbers = read_jsonl(path)
        src = RecordSource(str(path), line_numbers)
        shape = shape or detect_shape(records, path)
        if shape == "toy":
            raise DatasetError(path, "the toy shape is one JSON object per .json file, not supported in .jsonl")
    elif suffix == ".json":
        records = read_json(path, sha256)
        src = RecordSource(str(path))
        shape = shape or detect_shape(records, path)
    else:
        raise DatasetError(path, f"unsupported file extension {path.suffix!r}: expected .json or .jsonl")
    return shape, _parse(records, src, shape, dataset, n_shots, seed)


def _parse(records: Any, src: RecordSource, shape: str, dataset: str, n_shots: int, seed: int) -> list[Sample]:
    if shape == "toy":
        return [parse_toy(records, src.path, dataset)]
    if not isinstance(records, list) or not records:
        what = f"expected a non-empty list of records for shape {shape!r}, got {_describe(records)}"
        raise DatasetError(src.path, what)
    if shape == "qa":
        return parse_qa(records, src, dataset)
    if shape == "samsum_fewshot":
        return parse_samsum_fewshot(records, src, dataset)
    return parse_samsum_dialogues(records, src, dataset, n_shots=n_shots, seed=seed)


def _is_index(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _numeric_order(path: Path) -> tuple[bool, int, str]:
    return (not _is_index(path.stem), int(path.stem) if _is_index(path.stem) else 0, path.name)


def load_toy_dir(directory: str | os.PathLike[str], dataset: str) -> list[Sample]:
    """Every *.json toy file of a directory, in numeric order of the file names (1.json, 2.json, ..., 10.json)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.json"), key=_numeric_order)
    if not files:
        raise DatasetError(directory, "directory holds no .json toy files")
    samples = []
    for i, path in enumerate(files):
        obj = read_json(path)
        if detect_shape(obj, path) != "toy":
            raise DatasetError(path, 'expected a toy object {"0": str, ..., "query": str, "chunk_num": int}')
        samples.append(parse_toy(obj, path, dataset, index=i))
    return samples


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def _shared_dir() -> Path:
    return REPO_ROOT.parent / "shared" / "data"


def _env_dir() -> Path | None:
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


def _resolve_samsum() -> Path:
    env = _env_dir()
    candidates = [env / "samsum" / "samsum_test.json"] if env else []
    candidates.append(_shared_dir() / "samsum" / "samsum_test.json")
    found = _first_existing(candidates)
    if found is None:
        tried = ", ".join(map(str, candidates))
        raise DatasetError(
            "samsum",
            f"SAMSum test file not found (tried {tried}); SAMSum is CC BY-NC-ND 4.0 and not shipped with "
            f"kvblend: set {DATA_DIR_ENV} so that ${DATA_DIR_ENV}/samsum/samsum_test.json exists, "
            "or pass the file's path",
        )
    return found


def _resolve_wikimqa() -> Path:
    env = _env_dir()
    candidates = [env / "wikimqa_s.json"] if env else []
    candidates.append(_shared_dir() / "cacheblend_inputs" / "wikimqa_s.json")
    found = _first_existing(candidates)
    if found is None:
        tried = ", ".join(map(str, candidates))
        raise DatasetError(
            "wikimqa_s",
            "wikimqa_s.json is not shipped with kvblend (CacheBlend inputs/wikimqa_s.json): pass the "
            f"path to wikimqa_s.json, e.g. load_dataset('/path/to/wikimqa_s.json'), or put it at "
            f"${DATA_DIR_ENV}/wikimqa_s.json (tried {tried})",
        )
    return found


def dataset_name(name_or_path: str | os.PathLike[str]) -> str:
    """The one name a dataset goes by in file names and records, without reading it: a known name as is,
    a file by its stem ('data/foo.jsonl' -> 'foo'), a folder of toy files by its name."""
    if isinstance(name_or_path, str) and name_or_path in KNOWN_DATASETS:
        return name_or_path
    path = Path(name_or_path)
    return path.name if path.is_dir() or not path.suffix else path.stem


def _resolve(name_or_path: str | os.PathLike[str]) -> tuple[str, Path, str | None]:
    """-> (dataset name, path, expected sha256 or None)."""
    if isinstance(name_or_path, str) and name_or_path in KNOWN_DATASETS:
        if name_or_path == "musique_s":
            return "musique_s", FILES_DIR / "musique_s.json", MUSIQUE_SHA256
        if name_or_path == "toy":
            return "toy", FILES_DIR / "toy", None
        if name_or_path == "samsum":
            return "samsum", _resolve_samsum(), None
        return "wikimqa_s", _resolve_wikimqa(), None
    path = Path(name_or_path)
    if not path.exists():
        if isinstance(name_or_path, str) and not path.suffix and os.sep not in name_or_path:
            known = ", ".join(KNOWN_DATASETS)
            raise DatasetError(name_or_path, f"not a known dataset name ({known}) nor an existing file")
        raise DatasetError(path, "no such file")
    return dataset_name(path), path, None


def load_dataset(
    name_or_path: str | os.PathLike[str],
    limit: int | None = None,
    seed: int = 0,
    *,
    n_shots: int = 5,
    shape: str | None = None,
) -> Dataset:
    """Load a known dataset (KNOWN_DATASETS) or a .json/.jsonl file (shape detected from content).

    limit keeps the first `limit` samples; seed and n_shots only affect SAMSum dialogue files (few-shot
    examples); shape forces one of SHAPES instead of detecting it (e.g. "samsum_fewshot").
    A directory is read as toy files. Raises DatasetError (one-line message) on any bad input.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    name, path, sha256 = _resolve(name_or_path)
    if path.is_dir():
        detected, samples = "toy", load_toy_dir(path, name)
    else:
        detected, samples = load_records(path, name, shape, n_shots=n_shots, seed=seed, sha256=sha256)
    if limit is not None:
        samples = samples[:limit]
    spec = _SPECS[detected]
    logger.info("loaded %d samples of %s from %s (shape %s)", len(samples), name, path, detected)
    return Dataset(name, tuple(samples), spec.template, spec.max_new_tokens, spec.metric, path, detected,
                   spec.max_context_tokens)
