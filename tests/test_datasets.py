"""Dataset loaders: shipped files, synthetic files of every shape, and malformed inputs."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from kvblend.data import datasets
from kvblend.data.datasets import (
    MUSIQUE_TEMPLATE,
    SAMSUM_TEMPLATE,
    TOY_TEMPLATE,
    Dataset,
    DatasetError,
    PromptTemplate,
    detect_shape,
    load_dataset,
    normalize_question,
)
from kvblend.errors import KvblendError
from kvblend.types import Passage, Sample

BAD_DIR = Path(__file__).parent / "bad_inputs" / "datasets"
EXPECTED_ERRORS: dict[str, str] = json.loads((BAD_DIR / "EXPECTED.json").read_text(encoding="utf-8"))
SHARED = datasets.REPO_ROOT.parent / "shared" / "data"
SAMSUM_SHARED = SHARED / "samsum" / "samsum_test.json"
needs_samsum = pytest.mark.skipif(not SAMSUM_SHARED.is_file(), reason="shared SAMSum test file not present")


def _qa(question: str, answers: Any, texts: list[str]) -> dict[str, Any]:
    ctxs = [{"title": f"T{j}", "text": t} for j, t in enumerate(texts)]
    return {"question": question, "answers": answers, "ctxs": ctxs}


def _write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _dialogues(n: int) -> list[dict[str, str]]:
    return [
        {"id": str(100 + i), "dialogue": f"Ann: hi {i}\r\nBob: bye {i}", "summary": f"Ann greets Bob {i}.\n"}
        for i in range(n)
    ]


@pytest.fixture(autouse=True)
def _no_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)


# ---------------------------------------------------------------------------------------------- musique_s


def test_musique_shipped_file() -> None:
    ds = load_dataset("musique_s")
    assert (ds.name, len(ds), ds.metric, ds.max_new_tokens, ds.shape) == ("musique_s", 150, "f1", 32, "qa")
    assert ds.source_path == datasets.FILES_DIR / "musique_s.json"
    assert hashlib.sha256(ds.source_path.read_bytes()).hexdigest() == datasets.MUSIQUE_SHA256
    first = ds.samples[0]
    assert first.sample_id == "musique_s/0" and first.dataset == "musique_s"
    assert first.question == "Where was the author of Hannibal and Scipio educated at?"
    assert first.answers == (("Exeter College",),)
    assert len(first.passages) == 10
    assert [p.passage_id for p in first.passages[:2]] == ["musique_s/0/0", "musique_s/0/1"]
    assert all(len(s.passages) == 10 and len(s.answers) == 1 for s in ds)
    assert ds.samples[149].passages[9].passage_id == "musique_s/149/9"
    assert len({p.passage_id for s in ds for p in s.passages}) == 1500


def test_musique_matches_shared_copy_when_present() -> None:
    shared = SHARED / "cacheblend_inputs" / "musique_s.json"
    if not shared.is_file():
        pytest.skip("shared CacheBlend inputs not present")
    assert shared.read_bytes() == (datasets.FILES_DIR / "musique_s.json").read_bytes()


def test_musique_prompt_matches_cacheblend_text() -> None:
    ds = load_dataset("musique_s", limit=1)
    sample = ds.samples[0]
    template = ds.template
    assert template is MUSIQUE_TEMPLATE and template.first_line_only
    assert template.prefix == (
        "You will be asked a question after reading several passages. Please directly answer the question based "
        "on the given passages. Do NOT repeat the question. The answer should be within 5 words..\nPassages:\n"
    )
    passage = sample.passages[0]
    assert template.format_passage(passage) == f"{passage.title}\n\n{passage.text}\n\n"
    assert template.format_query(sample.question) == (
        "\n\nAnswer the question directly based on the given passages. Do NOT repeat the question. The answer "
        "should be within 5 words. \nQuestion:where was the author of Hannibal and Scipio educated at?\nAnswer:"
    )


def test_limit_and_frozen() -> None:
    ds = load_dataset("musique_s", limit=3)
    assert [s.sample_id for s in ds] == ["musique_s/0", "musique_s/1", "musique_s/2"]
    assert len(load_dataset("musique_s", limit=0)) == 0
    assert len(load_dataset("musique_s", limit=1000)) == 150
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="limit"):
        load_dataset("musique_s", limit=-1)


def test_musique_sha256_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "MUSIQUE_SHA256", "0" * 64)
    with pytest.raises(DatasetError, match=r"sha256 mismatch: expected 0{64}, got d679da1d") as info:
        load_dataset("musique_s")
    assert "musique_s.json" in str(info.value)


# ---------------------------------------------------------------------------------------------- QA shape


def test_qa_answers_strings_and_alias_lists(tmp_path: Path) -> None:
    records = [
        _qa("Who wrote Hamlet", ["Shakespeare", "William Shakespeare"], ["Hamlet is a play.", "By Shakespeare."]),
        _qa("Where?", [["Paris", "City of Light"], ["France"]], ["Paris is in France."]),
        _qa("Mixed?", ["a", ["b", "c"]], ["text"]),
    ]
    ds = load_dataset(_write_json(tmp_path / "myqa.json", records))
    assert (ds.name, ds.shape, ds.metric, ds.template) == ("myqa", "qa", "f1", MUSIQUE_TEMPLATE)
    assert ds.samples[0].answers == (("Shakespeare",), ("William Shakespeare",))
    assert ds.samples[1].answers == (("Paris", "City of Light"), ("France",))
    assert ds.samples[2].answers == (("a",), ("b", "c"))
    assert ds.samples[0].passages == (
        Passage("myqa/0/0", "T0", "Hamlet is a play."),
        Passage("myqa/0/1", "T1", "By Shakespeare."),
    )
    assert ds.samples[1] == Sample(
        "myqa/1",
        "Where?",
        (Passage("myqa/1/0", "T0", "Paris is in France."),),
        (("Paris", "City of Light"), ("France",)),
        "myqa",
    )


def test_qa_title_optional_or_null(tmp_path: Path) -> None:
    records = [{"question": "q?", "answers": ["a"], "ctxs": [{"text": "one"}, {"title": None, "text": "two", "id": 7}]}]
    ds = load_dataset(_write_json(tmp_path / "notitle.json", records))
    assert [p.title for p in ds.samples[0].passages] == ["", ""]


def test_wikimqa_not_shipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(datasets, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / "data"))
    with pytest.raises(DatasetError, match=r"pass the path to wikimqa_s\.json") as info:
        load_dataset("wikimqa_s")
    assert "\n" not in str(info.value)


def test_wikimqa_from_data_dir_and_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    records = [_qa("Who directed X?", [["John Smith", "J. Smith"]], ["X was directed by John Smith."])] * 2
    path = _write_json(tmp_path / "wikimqa_s.json", records)
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path))
    ds = load_dataset("wikimqa_s")
    assert (ds.name, len(ds), ds.max_new_tokens, ds.metric) == ("wikimqa_s", 2, 32, "f1")
    assert ds.template == datasets.WIKIMQA_TEMPLATE
    assert ds.samples[1].answers == (("John Smith", "J. Smith"),)
    assert load_dataset(path).samples == ds.samples


def test_qa_jsonl_matches_json(tmp_path: Path) -> None:
    records = [_qa(f"Question {i}?", [f"answer {i}"], [f"passage {i}a", f"passage {i}b"]) for i in range(3)]
    json_ds = load_dataset(_write_json(tmp_path / "set.json", records))
    lines = [json.dumps(records[0]), "", json.dumps(records[1]), "   ", json.dumps(records[2]), ""]
    (tmp_path / "set.jsonl").write_text("\n".join(lines), encoding="utf-8")
    jsonl_ds = load_dataset(tmp_path / "set.jsonl")
    assert jsonl_ds.samples == json_ds.samples
    assert jsonl_ds.shape == "qa"


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    good = json.dumps(_qa("q?", ["a"], ["t"]))
    bad = json.dumps(_qa("q?", ["a"], [""]))
    (tmp_path / "x.jsonl").write_text(f"{good}\n\n{good}\n{bad}\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"x\.jsonl: line 4 \(record 2\): field 'ctxs\[0\]\.text'"):
        load_dataset(tmp_path / "x.jsonl")


def test_jsonl_text_with_unicode_line_separator(tmp_path: Path) -> None:
    record = _qa("q?", ["a"], ["before\u2028after"])
    (tmp_path / "u.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_dataset(tmp_path / "u.jsonl").samples[0].passages[0].text == "before\u2028after"


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([_qa("q?", ["a"], ["t"])]).encode())
    assert len(load_dataset(path)) == 1


# ---------------------------------------------------------------------------------------------- SAMSum


def test_samsum_dialogues_few_shot(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "dialogues.json", _dialogues(8))
    ds = load_dataset(path, n_shots=3)
    assert (ds.shape, ds.metric, ds.max_new_tokens, ds.template) == ("samsum_dialogues", "rougeL", 128, SAMSUM_TEMPLATE)
    assert len(ds) == 8
    examples = {f"Dialogue: Ann: hi {i}\nBob: bye {i}\nSummary: Ann greets Bob {i}.": i for i in range(8)}
    for i, sample in enumerate(ds):
        assert sample.sample_id == f"dialogues/{i}"
        assert sample.question == f"Ann: hi {i}\nBob: bye {i}"  # \r\n normalised
        assert sample.answers == ((f"Ann greets Bob {i}.",),)  # stripped
        assert [p.passage_id for p in sample.passages] == [f"dialogues/{i}/{j}" for j in range(3)]
        shots = [examples[p.text] for p in sample.passages]
        assert i not in shots and len(set(shots)) == 3


def test_samsum_shots_are_seeded_and_independent_of_limit(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "d.json", _dialogues(30))
    full = load_dataset(path)
    assert load_dataset(path).samples == full.samples
    assert load_dataset(path, limit=4).samples == full.samples[:4]
    other = load_dataset(path, seed=1)
    assert [s.passages for s in other] != [s.passages for s in full]
    assert [s.question for s in other] == [s.question for s in full]
    assert all(len(s.passages) == 5 for s in full)


def test_samsum_zero_shots(tmp_path: Path) -> None:
    ds = load_dataset(_write_json(tmp_path / "d.json", _dialogues(1)), n_shots=0)
    assert ds.samples[0].passages == ()


def test_samsum_known_name_from_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "samsum").mkdir()
    _write_json(tmp_path / "samsum" / "samsum_test.json", _dialogues(7))
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path))
    ds = load_dataset("samsum", limit=2)
    assert (ds.name, len(ds), ds.source_path) == ("samsum", 2, tmp_path / "samsum" / "samsum_test.json")
    assert ds.samples[1].sample_id == "samsum/1"


def test_samsum_missing_gives_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(datasets, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / "nothing"))
    with pytest.raises(DatasetError) as info:
        load_dataset("samsum")
    message = str(info.value)
    assert "\n" not in message
    assert "CC BY-NC-ND" in message and "KVBLEND_DATA_DIR" in message
    assert str(tmp_path / "nothing" / "samsum" / "samsum_test.json") in message


@needs_samsum
def test_samsum_shared_file() -> None:
    ds = load_dataset("samsum")
    assert (len(ds), ds.shape, ds.metric, ds.max_new_tokens) == (819, "samsum_dialogues", "rougeL", 128)
    assert ds.source_path.resolve() == SAMSUM_SHARED.resolve()
    first = ds.samples[0]
    assert first.question.startswith("Hannah: Hey, do you have Betty's number?")
    assert first.answers == (("Hannah needs Betty's number but Amanda doesn't have it. She needs to contact Larry.",),)
    assert all(len(s.passages) == 5 for s in ds)
    assert not any("\r" in s.question or "\r" in p.text for s in ds for p in s.passages)
    for sample in ds.samples[:50]:
        assert all(p.text.startswith("Dialogue: ") and "\nSummary: " in p.text for p in sample.passages)
        assert all(not p.text.startswith(f"Dialogue: {sample.question}\nSummary:") for p in sample.passages)


@needs_samsum
def test_samsum_jsonl_copy_gives_the_same_samples() -> None:
    coi = SHARED / "samsum" / "samsum_test_CoI.jsonl"
    if not coi.is_file():
        pytest.skip("CoI SAMSum copy not present")
    from_json = load_dataset(SAMSUM_SHARED, limit=100)
    from_jsonl = load_dataset(coi, limit=100)
    assert [(s.question, s.answers) for s in from_jsonl] == [(s.question, s.answers) for s in from_json]


def test_cacheblend_samsum_shape(tmp_path: Path) -> None:
    records = [
        {
            "question": "Dialogue: Ann: are you coming?\nBob: yes\nSummary: ",
            "answers": ["Bob is coming."],
            "ctxs": [
                {"title": "", "text": "Dialogue: Cy: hi\nSummary: Cy says hi.\n\n"},
                {"title": "", "text": "Dialogue: Di: bye\nSummary: Di leaves."},
            ],
        },
        {
            "question": "Ann: lunch?\nBob: sure",
            "answers": [["Lunch."]],
            "ctxs": [{"text": "Dialogue: E: x\nSummary: y"}],
        },
    ]
    ds = load_dataset(_write_json(tmp_path / "samsum.json", records))
    assert (ds.shape, ds.metric, ds.max_new_tokens, ds.template) == ("samsum_fewshot", "rougeL", 128, SAMSUM_TEMPLATE)
    assert ds.samples[0].question == "Ann: are you coming?\nBob: yes"
    assert ds.samples[1].question == "Ann: lunch?\nBob: sure"
    assert ds.samples[0].passages[0].text == "Dialogue: Cy: hi\nSummary: Cy says hi."
    assert ds.samples[0].answers == (("Bob is coming.",),)
    assert ds.template.format_query(ds.samples[0].question) == "Dialogue: Ann: are you coming?\nBob: yes\nSummary:"


def test_shape_override(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "fewshot.json", [_qa("Ann: hi\nBob: yo", ["They greet."], ["Example one."])])
    assert load_dataset(path).shape == "qa"
    forced = load_dataset(path, shape="samsum_fewshot")
    assert (forced.shape, forced.metric, forced.samples[0].question) == ("samsum_fewshot", "rougeL", "Ann: hi\nBob: yo")
    with pytest.raises(ValueError, match="shape must be one of"):
        load_dataset(path, shape="csv")
    with pytest.raises(DatasetError, match="expected a toy object"):
        load_dataset(path, shape="toy")


def test_samsum_prompt_template() -> None:
    assert SAMSUM_TEMPLATE.prefix == (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
    )
    example = Passage("s/0/0", "", "Dialogue: a\nSummary: b")
    assert SAMSUM_TEMPLATE.format_passage(example) == "Dialogue: a\nSummary: b\n\n"
    assert SAMSUM_TEMPLATE.format_query("A: hi") == "Dialogue: A: hi\nSummary:"


# ---------------------------------------------------------------------------------------------- toy


def test_toy_shipped_files() -> None:
    ds = load_dataset("toy")
    assert (ds.name, len(ds), ds.shape, ds.template, ds.max_new_tokens) == ("toy", 10, "toy", TOY_TEMPLATE, 32)
    for i, sample in enumerate(ds):
        raw = json.loads((datasets.FILES_DIR / "toy" / f"{i + 1}.json").read_text(encoding="utf-8"))
        assert sample.sample_id == f"toy/{i}"
        assert sample.question == raw["query"]
        assert sample.answers == ()
        assert [p.text for p in sample.passages] == [raw[str(j)] for j in range(raw["chunk_num"])]
        assert [p.passage_id for p in sample.passages] == [f"toy/{i}/{j}" for j in range(raw["chunk_num"])]
    assert ds.template.format_passage(ds.samples[0].passages[0]) == ds.samples[0].passages[0].text
    assert ds.template.format_query(ds.samples[0].question) == ds.samples[0].question


def test_toy_files_match_shared_copies_when_present() -> None:
    src = SHARED / "cacheblend_inputs"
    if not src.is_dir():
        pytest.skip("shared CacheBlend inputs not present")
    for i in range(1, 11):
        assert (src / f"{i}.json").read_bytes() == (datasets.FILES_DIR / "toy" / f"{i}.json").read_bytes()


def test_toy_single_file_and_directory(tmp_path: Path) -> None:
    toy = {"1": "\n\nsecond", "0": "\n\nfirst", "query": "\n\nQuestion: who?\nAnswer:", "chunk_num": 2}
    single = load_dataset(_write_json(tmp_path / "3.json", toy))
    assert (single.name, single.samples[0].sample_id) == ("3", "3/0")
    assert [p.text for p in single.samples[0].passages] == ["\n\nfirst", "\n\nsecond"]
    folder = tmp_path / "mytoys"
    folder.mkdir()
    for n in (10, 2, 1):
        _write_json(folder / f"{n}.json", dict(toy, query=f"query {n}"))
    ds = load_dataset(folder)
    assert [s.question for s in ds] == ["query 1", "query 2", "query 10"]
    assert [s.sample_id for s in ds] == ["mytoys/0", "mytoys/1", "mytoys/2"]


def test_toy_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no \.json toy files"):
        load_dataset(tmp_path)
    _write_json(tmp_path / "1.json", [_qa("q?", ["a"], ["t"])])
    with pytest.raises(DatasetError, match=r"1\.json: expected a toy object"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------- shapes and errors


def test_detect_shape() -> None:
    assert detect_shape([_qa("q?", ["a"], ["t"])]) == "qa"
    fewshot = {"question": "q", "answers": ["a"], "ctxs": [{"text": "Dialogue: x\nSummary: y"}]}
    assert detect_shape([fewshot]) == "samsum_fewshot"
    assert detect_shape([{"id": "1", "dialogue": "a", "summary": "b"}]) == "samsum_dialogues"
    assert detect_shape({"0": "a", "query": "q", "chunk_num": 1}) == "toy"
    with pytest.raises(DatasetError, match="unknown dataset shape: an object with keys"):
        detect_shape({"input": "x", "context": "y"}, "longbench.json")
    with pytest.raises(DatasetError, match=r"^<data>: unknown dataset shape: top-level string"):
        detect_shape("text")
    with pytest.raises(DatasetError, match="empty list"):
        detect_shape([])


def test_dataset_error_is_one_line_value_error() -> None:
    err = DatasetError("a\nb.json", "bad\r\nthing", "record 3")
    assert isinstance(err, ValueError) and isinstance(err, KvblendError)
    assert str(err) == "a b.json: record 3: bad thing"
    assert (err.source, err.where, err.problem) == ("a\nb.json", "record 3", "bad\r\nthing")


def test_missing_file_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.json: no such file"):
        load_dataset(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="musique: not a known dataset name"):
        load_dataset("musique")


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_malformed_inputs(name: str) -> None:
    path = BAD_DIR / name
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{path}: "), message
    assert EXPECTED_ERRORS[name] in message, message


def test_every_malformed_file_has_an_expectation() -> None:
    files = {p.name for p in BAD_DIR.iterdir()} - {"EXPECTED.json"}
    assert files == set(EXPECTED_ERRORS)
    assert len(files) >= 15


# ---------------------------------------------------------------------------------------------- templates


def test_prompt_template_validation() -> None:
    with pytest.raises(ValueError, match="query_format"):
        PromptTemplate("", "{text}", "no placeholder", True)
    with pytest.raises(ValueError, match="passage_format"):
        PromptTemplate("", "{body}", "{question}", True)
    template = PromptTemplate("P:", "[{title}] {text}", "Q: {question}", False)
    assert template.format_passage(Passage("x/0/0", "T", "body {braces}")) == "[T] body {braces}"
    assert template.format_query("What is {x}") == "Q: What is {x}"


def test_normalize_question() -> None:
    assert normalize_question("Where was he born") == "where was he born?"
    assert normalize_question("who?") == "who?"
    assert normalize_question("  ") == ""
    assert MUSIQUE_TEMPLATE.format_query("Who").endswith("\nQuestion:who?\nAnswer:")


def test_dataset_record_fields() -> None:
    names = [f.name for f in dataclasses.fields(Dataset)]
    assert names[:6] == ["name", "samples", "template", "max_new_tokens", "metric", "source_path"]
    assert [f.name for f in dataclasses.fields(PromptTemplate)][:4] == [
        "prefix",
        "passage_format",
        "query_format",
        "first_line_only",
    ]


def test_datasets_module_does_no_tokenisation() -> None:
    tree = ast.parse(Path(datasets.__file__).read_text(encoding="utf-8"))
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {"torch", "transformers", "pickle"} & {m.split(".")[0] for m in modules if m}
