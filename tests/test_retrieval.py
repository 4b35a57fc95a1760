"""Tests of kvblend.retrieval (CPU; the MiniLM model is loaded once per module)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvblend.retrieval import (
    MODES,
    RRF_K,
    BM25Index,
    ColbertIndex,
    DenseIndex,
    FusionIndex,
    RetrievalFileError,
    Retriever,
    SentenceEncoder,
    TokenEncoder,
    answer_recall_at_k,
    load_retrieval,
    make_retriever,
    reciprocal_rank_fusion,
    retrieve,
    rrf_scores,
    save_retrieval,
    simple_tokenize,
)
from kvblend.retrieval.retriever import _Index
from kvblend.types import Passage, Retrieved, Sample

REPO = Path(__file__).resolve().parents[1]


def P(pid: str, text: str, title: str = "") -> Passage:
    return Passage(pid, title, text)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def dense_encoder() -> SentenceEncoder:
    return SentenceEncoder(show_progress=False)


@pytest.fixture(scope="module")
def token_encoder() -> TokenEncoder:
    return TokenEncoder(show_progress=False)


@pytest.fixture
def two_samples() -> list[Sample]:
    a = Sample(
        "toy/0",
        "Which river flows through the city of Zaragoza?",
        (
            P("toy/0/0", "The Ebro river flows through Zaragoza, the capital of Aragon."),
            P("toy/0/1", "Tomatoes are rich in vitamin C and grow in warm climates."),
            P("toy/0/2", "Shared boilerplate passage about nothing in particular."),
        ),
        (("Ebro",),),
        "toy",
    )
    b = Sample(
        "toy/1",
        "Who composed the opera Tosca?",
        (
            P("toy/1/0", "Giacomo Puccini composed the opera Tosca, first staged in Rome in 1900."),
            P("toy/1/1", "Glaciers carve U-shaped valleys over thousands of years."),
            P("toy/1/2", "Shared boilerplate passage about nothing in particular."),
        ),
        (("Puccini", "Giacomo Puccini"),),
        "toy",
    )
    return [a, b]


# ------------------------------------------------------------------------------------------ bm25


def test_simple_tokenize_lowercases_and_drops_stopwords():
    assert simple_tokenize("The Cat's HAT, 42!") == ["the", "cat", "s", "hat", "42"]
    assert simple_tokenize("The Cat", {"the"}) == ["cat"]


def test_bm25_ranks_passage_with_rare_query_words_first():
    passages = [
        P("p0", "The weather today is sunny and the weather tomorrow is sunny too."),
        P("p1", "A quokka is a small marsupial found on Rottnest Island."),
        P("p2", "The island has a ferry and the weather is mild."),
        P("p3", "Sunny weather brings tourists to the island every summer."),
    ]
    index = BM25Index(seed=0).build(passages)
    assert isinstance(index, Retriever)
    hits = index.search("Where does the quokka live on the island?", k=3)
    assert hits[0][0] == 1
    assert len(hits) == 3
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    # k larger than the index returns every passage
    assert len(index.search("island", k=50)) == 4
    # a query sharing no word scores 0 everywhere instead of crashing
    assert np.all(index.scores("xylophone zzz") == 0)


def test_bm25_stopwords_optional():
    passages = [P("a", "the the the the cat"), P("b", "a dog")]
    with_stop = BM25Index(stopwords=True).build(passages)
    without = BM25Index(stopwords=False).build(passages)
    assert np.all(with_stop.scores("the") == 0)  # "the" is a stopword: nothing to match
    assert without.scores("the")[0] > 0


def test_ties_broken_by_seeded_permutation_not_file_order():
    passages = [P(f"p{i}", f"word{i}") for i in range(30)]
    order = lambda seed: [i for i, _ in BM25Index(seed=seed).build(passages).search("nothing matches", 30)]
    assert order(7) == order(7)
    assert sorted(order(7)) == list(range(30))
    assert order(7) != list(range(30))
    assert order(7) != order(8)
    assert [i for i, _ in BM25Index(seed=None).build(passages).search("nothing", 30)] == list(range(30))


# ------------------------------------------------------------------------------------------ dense


def test_dense_ranks_paraphrase_above_unrelated(dense_encoder):
    passages = [
        P("u", "The central bank raised interest rates by half a percentage point on Tuesday."),
        P("p", "Step-by-step instructions for making a loaf of bread in your own kitchen."),
        P("v", "Volcanic eruptions can disrupt air travel across entire continents."),
    ]
    index = DenseIndex(dense_encoder, seed=0).build(passages)
    hits = index.search("How do I bake bread at home?", k=3)
    assert hits[0][0] == 1
    scores = index.scores("How do I bake bread at home?")
    assert scores[1] > scores[0] + 0.2 and scores[1] > scores[2] + 0.2
    emb = index.embeddings
    assert emb.dtype == np.float32 and emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_dense_embedding_independent_of_batch_padding(dense_encoder):
    short = "A short sentence."
    long = "A much longer sentence that forces padding of the short one when both share a batch. " * 3
    alone = SentenceEncoder(show_progress=False).encode([short])[0]
    batched = SentenceEncoder(show_progress=False, batch_size=8).encode([long, short])[1]
    np.testing.assert_allclose(alone, batched, atol=1e-5)


# ------------------------------------------------------------------------------------------ colbert


def test_colbert_stand_in_ranks_relevant_first_and_masks_padding(token_encoder):
    assert not token_encoder.is_colbert_checkpoint
    passages = [
        P("a", "Penguins are flightless birds that live in the Southern Hemisphere."),
        P("b", "The Treaty of Westphalia ended the Thirty Years' War in 1648."),
        P("c", "Spreadsheets organise numbers in rows and columns."),
    ]
    index = ColbertIndex(token_encoder, seed=0).build(passages)
    assert index.search("When did the Thirty Years War end?", 3)[0][0] == 1
    # Token vectors are unit length, special tokens and padding are not among them, and a text's
    # vectors do not depend on what else shares its (padded) batch.
    short = "Penguins swim."
    fresh = TokenEncoder(show_progress=False)
    together = fresh.encode_docs([passages[1].text * 3, short])[1]
    alone = TokenEncoder(show_progress=False).encode_docs([short])[0]
    pieces = [t for t in token_encoder.backbone.tokenizer.tokenize(short) if t != "."]
    assert together.shape == alone.shape == (len(pieces), 384)  # no CLS, SEP, "." or padding rows
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-5)


def test_colbert_maxsim_math():
    class FakeTokens:
        def __init__(self):
            self.docs = {
                "d0": np.array([[1, 0], [0, 1]], np.float32),
                "d1": np.array([[0.6, 0.8]], np.float32),
            }

        def encode_docs(self, texts):
            return [self.docs[t] for t in texts]

        def encode_queries(self, texts):
            return [np.array([[1, 0], [0.6, 0.8]], np.float32) for _ in texts]

    index = ColbertIndex(FakeTokens()).build([P("0", "d0"), P("1", "d1")])  # type: ignore[arg-type]
    # d0: max(1, 0) + max(0.6, 0.8) = 1.8 ; d1: 0.6 + 1.0 = 1.6
    np.testing.assert_allclose(index.scores("q"), [1.8, 1.6], atol=1e-6)


def _tiny_colbert_checkpoint(folder: Path):
    """A random 1-layer BERT + ColBERT linear projection, with MiniLM's tokenizer, in HF_ColBERT layout."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    from kvblend.retrieval import default_model_path

    src = default_model_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    cfg.save_pretrained(folder)
    state = {f"bert.{k}": v.contiguous() for k, v in model.state_dict().items()}
    state["linear.weight"] = torch.randn(8, 32)
    save_file(state, str(folder / "model.safetensors"))
    return model


def test_colbert_checkpoint_folder_uses_projection_and_query_augmentation(tmp_path, two_samples):
    import torch

    original = _tiny_colbert_checkpoint(tmp_path)
    enc = TokenEncoder(tmp_path, query_maxlen=16, doc_maxlen=64, show_progress=False)
    assert enc.is_colbert_checkpoint
    # the bert.* weights really were loaded (not left random)
    ids = torch.tensor([[101, 2000, 2001, 102]])
    with torch.no_grad():
        ref = original(input_ids=ids).last_hidden_state
        got = enc.backbone.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, ref)
    q = enc.encode_queries(["who composed tosca"])[0]
    assert q.shape == (16, 8)  # padded with [MASK] to query_maxlen, all vectors scored, 8-d projection
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    d = enc.encode_docs(["Puccini, composer."])[0]
    assert d.shape[1] == 8 and d.shape[0] <= 7  # CLS [D] puccini composer SEP (punctuation dropped)
    out = retrieve(two_samples, "colbert", 2, checkpoint=str(tmp_path))
    assert [len(r.passage_ids) for r in out] == [2, 2]


def test_bad_checkpoint_folder_is_a_clear_error(tmp_path):
    from kvblend.retrieval import EncoderLoadError

    with pytest.raises(EncoderLoadError, match="not a local model folder"):
        TokenEncoder(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ fusion


def test_rrf_math_on_hand_made_rankings():
    fused = reciprocal_rank_fusion([[0, 1, 2], [2, 0, 1]])
    expected = {0: 1 / 61 + 1 / 62, 1: 1 / 62 + 1 / 63, 2: 1 / 63 + 1 / 61}
    assert [i for i, _ in fused] == [0, 2, 1]
    for i, s in fused:
        assert s == pytest.approx(expected[i], abs=1e-15)
    # partial rankings: items missing from a ranking add nothing
    np.testing.assert_allclose(rrf_scores([[3, 1], [1]], n=4, k=10), [0, 1 / 12 + 1 / 11, 0, 1 / 11])
    assert RRF_K == 60
    with pytest.raises(ValueError):
        rrf_scores([[0, 0]], n=2)


class _Fixed(_Index):
    mode = "fixed"

    def __init__(self, scores, **kw):
        super().__init__(**kw)
        self._fixed = np.asarray(scores, dtype=np.float64)

    def _build(self, texts):
        assert len(texts) == len(self._fixed)

    def _scores(self, query):
        return self._fixed


def test_fusion_index_fuses_full_rankings():
    passages = [P(str(i), f"t{i}") for i in range(4)]
    a = _Fixed([0.9, 0.1, 0.5, 0.3])  # ranking 0, 2, 3, 1
    b = _Fixed([0.0, 0.8, 0.7, 0.9])  # ranking 3, 1, 2, 0
    index = FusionIndex([a, b]).build(passages)
    scores = index.scores("q")
    expected = [1 / 61 + 1 / 64, 1 / 64 + 1 / 62, 1 / 62 + 1 / 63, 1 / 63 + 1 / 61]
    np.testing.assert_allclose(scores, expected)
    assert [i for i, _ in index.search("q", 2)] == [3, 0]


# ------------------------------------------------------------------------------------------ scopes


def test_per_sample_scope_only_returns_own_passages(two_samples):
    out = retrieve(two_samples, "bm25", 3, scope="per_sample")
    assert [r.sample_id for r in out] == ["toy/0", "toy/1"]
    for s, r in zip(two_samples, out):
        assert set(r.passage_ids) <= {p.passage_id for p in s.passages}
    assert out[0].passage_ids[0] == "toy/0/0"
    assert out[1].passage_ids[0] == "toy/1/0"
    assert out[1].texts[0].startswith("Giacomo Puccini") and out[1].titles == ("", "", "")


def test_pooled_scope_searches_every_sample_and_deduplicates(two_samples):
    # sample 0 asks about Tosca: only sample 1 has the answer passage
    asks_other = Sample("toy/2", "Which opera did Puccini compose that premiered in Rome?",
                        (P("toy/2/0", "Unrelated text on glaciology."),), (("Tosca",),), "toy")
    samples = [*two_samples, asks_other]
    pooled = retrieve(samples, "bm25", 10, scope="pooled")
    per = retrieve(samples, "bm25", 10, scope="per_sample")
    assert pooled[2].passage_ids[0] == "toy/1/0"  # a passage of another sample
    assert per[2].passage_ids == ("toy/2/0",)
    # the duplicated boilerplate passage is indexed once, under its first passage_id
    assert len(pooled[0].passage_ids) == 6
    assert "toy/1/2" not in pooled[0].passage_ids and "toy/0/2" in pooled[0].passage_ids
    assert all(len(set(r.passage_ids)) == len(r.passage_ids) for r in pooled)


def test_colliding_passage_ids_are_rejected(two_samples):
    clash = Sample("toy/9", "q", (P("toy/0/0", "a different text under a reused id"),), (), "toy")
    with pytest.raises(ValueError, match="passage_id 'toy/0/0'"):
        retrieve([*two_samples, clash], "bm25", 2, scope="pooled")
    twice = Sample("toy/8", "q", (P("x", "one"), P("x", "two")), (), "toy")
    with pytest.raises(ValueError, match="two different passages"):
        retrieve([twice], "bm25", 2, scope="per_sample")


@pytest.mark.parametrize("scope", ["per_sample", "pooled"])
def test_every_mode_runs_in_both_scopes(two_samples, scope, dense_encoder, token_encoder):
    for mode in MODES:
        out = retrieve(two_samples, mode, 2, scope=scope,
                       dense_encoder=dense_encoder, colbert_encoder=token_encoder)
        assert len(out) == 2
        for r in out:
            assert len(r.passage_ids) == len(r.scores) == len(r.texts) == len(r.titles) == 2
            assert r.scores[0] >= r.scores[1]
        assert out[0].passage_ids[0] == "toy/0/0", mode
        assert out[1].passage_ids[0] == "toy/1/0", mode
        assert answer_recall_at_k(two_samples, out, 1) == 1.0


def test_each_text_is_encoded_once_per_call(two_samples, monkeypatch):
    enc = SentenceEncoder(show_progress=False)
    calls: list[list[str]] = []
    real = enc._encode_missing
    monkeypatch.setattr(enc, "_encode_missing", lambda texts: (calls.append(list(texts)), real(texts)))
    retrieve(two_samples, "both", 2, scope="per_sample", dense_encoder=enc)
    encoded = [t for c in calls for t in c]
    assert len(encoded) == len(set(encoded))
    assert "Shared boilerplate passage about nothing in particular." in encoded
    assert len(encoded) == 5 + 2  # 5 distinct passage texts + 2 questions


def test_make_retriever_modes():
    assert isinstance(make_retriever("bm25"), BM25Index)
    assert isinstance(make_retriever("both"), FusionIndex)
    with pytest.raises(ValueError, match="only used by mode 'colbert'"):
        make_retriever("dense", checkpoint="/nowhere")


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "3"])
def test_bad_k_is_a_one_line_value_error(two_samples, k):
    with pytest.raises(ValueError, match="k must be an integer >= 1") as exc:
        retrieve(two_samples, "bm25", k)
    assert "\n" not in str(exc.value)


def test_bad_mode_scope_and_empty_inputs(two_samples):
    with pytest.raises(ValueError, match="unknown retrieval mode 'splade'"):
        retrieve(two_samples, "splade", 2)
    with pytest.raises(ValueError, match="unknown retrieval scope"):
        retrieve(two_samples, "bm25", 2, scope="global")
    with pytest.raises(ValueError, match="no samples"):
        retrieve([], "bm25", 2)
    with pytest.raises(ValueError, match="has no passages"):
        retrieve([Sample("e/0", "q", ())], "bm25", 2)
    with pytest.raises(ValueError, match="no passages to index"):
        BM25Index().build([])
    with pytest.raises(ValueError, match="only used by mode 'colbert'"):
        retrieve(two_samples, "bm25", 2, checkpoint="/x")
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        retrieve(two_samples, "bm25", 2, seed=-1)


# ------------------------------------------------------------------------------------------ recall


def _ret(sid, *texts, titles=()):
    n = len(texts)
    return Retrieved(sid, tuple(f"{sid}/{i}" for i in range(n)), tuple(float(-i) for i in range(n)),
                     tuple(texts), tuple(titles))


def test_answer_recall_at_k_hand_made():
    samples = [
        Sample("s0", "q", (), (("New   York City",),)),
        Sample("s1", "q", (), (("nope",), ("Exeter College", "Exeter"))),
        Sample("s2", "q", (), (("Paris",),)),
        Sample("s3", "q", (), ()),  # no gold answers: skipped
        Sample("s4", "q", (), (("Boston Harbor",),)),
    ]
    retrieved = [
        _ret("s0", "He moved to new york\n city in 1990.", "x"),
        _ret("s1", "a", "b", "educated at exeter college, oxford"),
        _ret("s2", "London", "Berlin"),
        _ret("s3", "anything"),
        _ret("s4", "it sailed into boston", "harbor at dawn"),  # alias spans two passages: no hit
    ]
    assert answer_recall_at_k(samples, retrieved, 1) == pytest.approx(1 / 4)
    assert answer_recall_at_k(samples, retrieved, 3) == pytest.approx(2 / 4)
    # titles count too
    t = [_ret("s2", "a city", titles=("Paris",))]
    assert answer_recall_at_k([samples[2]], t, 1) == 1.0
    assert answer_recall_at_k([samples[3]], retrieved, 5) is None
    with pytest.raises(ValueError, match="no retrieval result"):
        answer_recall_at_k(samples, retrieved[:1], 1)


# ------------------------------------------------------------------------------------------ save/load


def _sample_results() -> list[Retrieved]:
    return [
        Retrieved("d/0", ("d/0/1", "d/0/0"), (2.5, 1.25), ("text b", "text a ünïcode"), ("B", "A")),
        Retrieved("d/1", ("d/1/0",), (0.5,), ("only",), ("",)),
    ]


def test_save_load_round_trip_and_atomic(tmp_path):
    path = tmp_path / "sub" / "retrieval.json"
    save_retrieval(path, "musique_s", "both", 2, "pooled", _sample_results(), 0.5)
    assert sorted(p.name for p in path.parent.iterdir()) == ["retrieval.json"]  # no temp file left
    run = load_retrieval(path)
    assert (run.dataset, run.mode, run.k, run.scope) == ("musique_s", "both", 2, "pooled")
    assert run.answer_recall_at_k == 0.5
    assert run.retrieved == tuple(_sample_results())
    assert run.created_at.endswith("+00:00")
    doc = json.loads(path.read_text())
    assert set(doc) == {"dataset", "mode", "k", "scope", "created_at", "answer_recall_at_k", "samples"}
    assert set(doc["samples"][0]) == {"sample_id", "passage_ids", "scores", "titles", "texts"}
    save_retrieval(path, "musique_s", "bm25", 1, "per_sample", [], None)
    assert load_retrieval(path).answer_recall_at_k is None


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    save_retrieval(path, "ds", "bm25", 2, "per_sample", _sample_results(), 1.0)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("kvblend.io.os.fsync", boom)  # fails mid-write, after the temp file exists
    with pytest.raises(OSError, match="disk full"):
        save_retrieval(path, "ds", "dense", 2, "per_sample", _sample_results(), 0.0)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown retrieval mode"):
        save_retrieval(tmp_path / "x.json", "ds", "nope", 2, "pooled", [], None)
    bad = [Retrieved("d/0", ("a", "b"), (1.0,), ("t", "u"))]
    with pytest.raises(ValueError, match="same length"):
        save_retrieval(tmp_path / "x.json", "ds", "bm25", 2, "pooled", bad, None)
    assert not (tmp_path / "x.json").exists()


def _valid_doc() -> dict:
    return {
        "dataset": "ds", "mode": "bm25", "k": 2, "scope": "pooled", "created_at": "2026-01-01T00:00:00+00:00",
        "answer_recall_at_k": 0.5,
        "samples": [
            {"sample_id": "s", "passage_ids": ["a"], "scores": [1.0], "titles": [""], "texts": ["t"]}
        ],
    }


def _mutate(doc: dict, where: str, value) -> dict:
    target = doc["samples"][0] if where.startswith("s.") else doc
    key = where.removeprefix("s.")
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    return doc


@pytest.mark.parametrize(
    "where,value,match",
    [
        ("dataset", KeyError, "has no field 'dataset'"),
        ("mode", KeyError, "has no field 'mode'"),
        ("k", KeyError, "has no field 'k'"),
        ("scope", KeyError, "has no field 'scope'"),
        ("created_at", KeyError, "has no field 'created_at'"),
        ("answer_recall_at_k", KeyError, "has no field 'answer_recall_at_k'"),
        ("samples", KeyError, "has no field 'samples'"),
        ("s.sample_id", KeyError, r"samples\[0\] has no field 'sample_id'"),
        ("s.texts", KeyError, r"samples\[0\] has no field 'texts'"),
        ("k", "2", "field 'k' should be int, got str"),
        ("k", True, "field 'k' should be int, got bool"),
        ("k", 0, "k should be >= 1"),
        ("mode", "splade", "mode 'splade' is not one of"),
        ("scope", "all", "scope 'all' is not one of"),
        ("dataset", 3, "field 'dataset' should be str"),
        ("answer_recall_at_k", "high", "field 'answer_recall_at_k' should be int/float/NoneType"),
        ("samples", {}, "field 'samples' should be list, got dict"),
        ("s.scores", ["1.0"], "'scores' item 0 should be a number"),
        ("s.passage_ids", [1], "'passage_ids' item 0 should be str"),
        ("s.titles", ["", ""], "lists differ in length"),
    ],
)
def test_load_rejects_bad_fields(tmp_path, where, value, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_mutate(_valid_doc(), where, value)))
    with pytest.raises(RetrievalFileError, match=match) as exc:
        load_retrieval(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(path)) and "rerun retrieval" in msg


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "retrieval file not found"),
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"k": NaN}', "not valid JSON"),
        ("[1, 2]", "top level should be a JSON object"),
        ('{"samples": [3]}', "has no field 'dataset'"),
    ],
)
def test_load_rejects_missing_or_broken_files(tmp_path, content, match):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RetrievalFileError, match=match) as exc:
        load_retrieval(path)
    assert isinstance(exc.value, ValueError)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_load_rejects_non_object_sample(tmp_path):
    doc = _valid_doc()
    doc["samples"] = [3]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(RetrievalFileError, match=r"samples\[0\] should be an object"):
        load_retrieval(path)


# ------------------------------------------------------------------------------------------ hygiene


def test_import_is_light():
    code = (
        "import sys, kvblend.retrieval; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env=env)
