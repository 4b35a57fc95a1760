"""Metrics: hand-computed SQuAD F1/EM, Rouge-L with stemming, answer parsing, fidelity."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvblend.eval import metrics
from kvblend.eval.metrics import (
    best_em,
    best_f1,
    best_rouge_l,
    cacheblend_f1,
    cacheblend_parse_generation,
    exact_match,
    f1_score,
    fidelity,
    first_line,
    flatten_answers,
    normalize_answer,
    rouge_l,
    score_answer,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("An apple a day, keeps THE doctor away.", "apple day keeps doctor away"),
        ("Jean-Paul's", "jeanpauls"),  # SQuAD drops punctuation, it does not split on it
        ("  theatre  ", "theatre"),  # "the" is removed only as a whole word
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_norway_is_not_no() -> None:
    assert f1_score("Norway", "No") == 0.0
    assert exact_match("Norway", "No") == 0.0
    assert best_f1("Norway", [["No"]]) == 0.0
    assert best_em("Norway", (("No",),)) == 0.0


def test_f1_hand_computed() -> None:
    # pred [quick, brown, fox] vs gold [quick, brown, dog]: 2 common, P = R = 2/3
    assert f1_score("The quick brown fox.", "quick brown dog") == pytest.approx(2 / 3)
    # multiset overlap: pred [x, y, y, z], gold [y, y, y] -> 2 common, P = 2/4, R = 2/3, F1 = 4/7
    assert f1_score("x y y z", "y y y") == pytest.approx(4 / 7)
    assert f1_score("Exeter College", "exeter college.") == 1.0
    assert f1_score("Paris", "London") == 0.0


def test_f1_empty_answers() -> None:
    assert f1_score("", "") == 1.0
    assert f1_score("!!!", "the") == 1.0  # both normalise to nothing
    assert f1_score("the", "answer") == 0.0
    assert f1_score("answer", "") == 0.0


def test_exact_match_ignores_articles_punctuation_case() -> None:
    assert exact_match("The Beatles.", "beatles") == 1.0
    assert exact_match("a  Beatles", "the beatles!") == 1.0
    assert exact_match("Beatles band", "Beatles") == 0.0


def test_best_over_aliases_of_all_entries() -> None:
    answers = (("Tom Hanks", "Thomas Hanks"), ("Hanks",))
    # vs "Thomas Hanks": P = 2/3, R = 1 -> 0.8; vs "Hanks": 0.5; vs "Tom Hanks": 0.4
    assert best_f1("Thomas J. Hanks", answers) == pytest.approx(0.8)
    assert best_em("thomas hanks", answers) == 1.0
    assert best_em("Hanks!", answers) == 1.0
    assert best_em("Tom", answers) == 0.0
    assert best_f1("Paris", ["London", "paris"]) == 1.0
    assert best_f1("Paris", "Paris") == 1.0  # a bare string is one answer, not a list of characters


def test_flatten_answers() -> None:
    assert flatten_answers([["a", "b"], "c", ("d",)]) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="no gold answers"):
        best_f1("x", ())
    with pytest.raises(ValueError, match="no gold answers"):
        best_em("x", [[]])


def test_token_f1() -> None:
    assert token_f1([1, 2, 3], [2, 3, 4]) == pytest.approx(2 / 3)
    assert token_f1([5, 5, 6], [5]) == pytest.approx(0.5)  # P = 1/3, R = 1
    assert token_f1([], []) == 1.0
    assert token_f1([1], []) == 0.0


def test_cacheblend_variant_reproduces_the_no_collapse() -> None:
    assert cacheblend_parse_generation("\nNorway is the answer\nmore") == "No"
    assert cacheblend_parse_generation("yes, it is") == "Yes"
    assert cacheblend_parse_generation("\n\nExeter College\nblah") == "Exeter College"
    assert cacheblend_parse_generation("") == ""

    def encode(text: str) -> list[int]:  # stand-in tokenizer: one id per word
        return [sum(map(ord, word)) for word in text.split()]

    assert cacheblend_f1("Norway", "No", encode) == 1.0  # the defect the word-level F1 avoids
    assert cacheblend_f1("Exeter College", "the Exeter college", encode) == 1.0
    assert f1_score("Norway", "No") == 0.0


def test_rouge_l_uses_stemming() -> None:
    # stemmed tokens: [the, cat, are, run] vs [a, cat, run]; LCS 2, P = 2/4, R = 2/3 -> F = 4/7
    assert rouge_l("the cats are running", "a cat runs") == pytest.approx(4 / 7)
    assert rouge_l("police kill the gunman", "police killed the gunman") == pytest.approx(1.0)
    # LCS of [the, gunman, kill, police] and [police, kill, the, gunman] is 2: P = R = 1/2
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    assert rouge_l("", "something") == 0.0


def test_rouge_l_without_stemming_would_differ() -> None:
    from rouge_score import rouge_scorer

    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    # unstemmed [the, cats, are, running] vs [a, cat, runs] share no token
    assert plain.score("a cat runs", "the cats are running")["rougeL"].fmeasure == 0.0
    assert rouge_l("the cats are running", "a cat runs") > 0.5


def test_best_rouge_l_and_score_answer() -> None:
    refs = (("Amanda will bring cookies.",), ("Jerry buys milk.",))
    assert best_rouge_l("Jerry buys milk", refs) == pytest.approx(1.0)
    assert score_answer("rougeL", "Jerry buys milk", refs) == pytest.approx(1.0)
    assert score_answer("f1", "Thomas Hanks", [["Tom Hanks"]]) == pytest.approx(0.5)
    assert score_answer("em", "the Tom Hanks", [["Tom Hanks"]]) == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        score_answer("bleu", "x", ["x"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\n\n  Paris \nFrance", "Paris"),
        ("answer", "answer"),
        ("\r\n Exeter College\r\nmore", "Exeter College"),
        ("   \n\t\n", ""),
        ("", ""),
    ],
)
def test_first_line(text: str, expected: str) -> None:
    assert first_line(text) == expected


def test_fidelity() -> None:
    assert fidelity("Exeter College", "Exeter College") == {"exact": True, "rougeL": 1.0}
    assert fidelity(" Exeter College\n", "Exeter College") == {"exact": True, "rougeL": 1.0}
    result = fidelity("the cats are running", "a cat runs")
    assert result["exact"] is False
    assert result["rougeL"] == pytest.approx(4 / 7)
    assert fidelity("", "") == {"exact": True, "rougeL": 1.0}


def test_metrics_module_does_not_import_torch() -> None:
    tree = ast.parse(Path(metrics.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported
    assert "transformers" not in imported
