"""Content-addressed chunk keys: model fingerprint + dtype + hash of the chunk's token ids (+ an isolation salt)."""

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
    """salt: the tenant's isolation salt ("" = the shared, unsalted namespace). Two keys that differ only in
    their salt name different entries, so tenants with different salts never share (or learn about) a chunk.
    The salt enters the digest only when set, so unsalted digests are those of stores written before salts."""

    model_fingerprint: str
    dtype: str
    token_hash: str
    salt: str = ""

    @property
    def digest(self) -> str:
        """File-name-safe id of the key (hex)."""
        text = f"{self.model_fingerprint}|{self.dtype}|{self.token_hash}"
        if self.salt:
            text += "|salt:" + hashlib.sha256(self.salt.encode("utf-8")).hexdigest()
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def __str__(self) -> str:
        return self.digest

    def __repr__(self) -> str:  # never print a tenant's salt
        return f"ChunkKey({self.model_fingerprint!r}, {self.dtype!r}, {self.token_hash!r}, salted={bool(self.salt)})"
