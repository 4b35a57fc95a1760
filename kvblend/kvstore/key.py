"""Content-addressed chunk keys: model fingerprint + dtype + hash of the chunk's token ids."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def token_hash(token_ids: Sequence[int], sink_ids: Sequence[int] = ()) -> str:
    """blake2b of the little-endian int64 bytes of (sink ids, separator, chunk ids); stable across runs."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(list(sink_ids), dtype="<i8").tobytes())
    h.update(b"|")
    h.update(np.asarray(list(token_ids), dtype="<i8").tobytes())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class ChunkKey:
    model_fingerprint: str
    dtype: str
    token_hash: str

    @property
    def digest(self) -> str:
        """File-name-safe id of the key (hex)."""
        h = hashlib.sha256(f"{self.model_fingerprint}|{self.dtype}|{self.token_hash}".encode())
        return h.hexdigest()[:32]

    def __str__(self) -> str:
        return self.digest
