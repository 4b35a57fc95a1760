"""Tiers hold bytes; store.py decides what goes where.

MemoryTier: chunks resident on one device (the GPU tier on CUDA; CPU memory, pinned when CUDA is
present, for the CPU tier). On a machine without CUDA the GPU tier lives in CPU memory with its own
byte budget, so placement, eviction and promotion behave exactly as they would on a GPU.
DiskTier: one safetensors file + one metadata JSON per chunk, written atomically, verified on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvblend.errors import ChunkCorruptError
from kvblend.io import atomic_write_bytes, atomic_write_json
from kvblend.kvstore.chunk_kv import LAYOUT, ChunkKV
from kvblend.kvstore.key import ChunkKey

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class MemoryTier:
    """Chunks resident on `device`, in LRU order (oldest first)."""

    def __init__(self, name: str, device: torch.device, budget_bytes: int, pin_memory: bool = False):
        self.name = name
        self.device = device
        self.budget_bytes = int(budget_bytes)
        self.pin_memory = pin_memory
        self.used_bytes = 0
        self._items: OrderedDict[str, ChunkKV] = OrderedDict()

    def __contains__(self, digest: str) -> bool:
        return digest in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, digest: str) -> ChunkKV:
        self._items.move_to_end(digest)
        return self._items[digest]

    def put(self, chunk: ChunkKV) -> ChunkKV:
        assert chunk.key.digest not in self._items
        assert self.used_bytes + chunk.nbytes <= self.budget_bytes, "store must make room first"
        local = chunk.to(self.device, pin=self.pin_memory)
        self._items[chunk.key.digest] = local
        self.used_bytes += local.nbytes
        return local

    def remove(self, digest: str) -> ChunkKV:
        chunk = self._items.pop(digest)
        self.used_bytes -= chunk.nbytes
        return chunk

    def lru_digests(self) -> list[str]:
        return list(self._items)


class DiskTier:
    """Content-addressed files under root/<digest[:2]>/<digest>.{safetensors,json}."""

    def __init__(self, root: Path, budget_bytes: int):
        self.root = Path(root)
        self.budget_bytes = int(budget_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[str, int] = {}
        self._atime: dict[str, float] = {}
        for meta in self.root.glob("*/*.json"):
            try:
                self._sizes[meta.stem] = int(json.loads(meta.read_text())["file_bytes"])
                self._atime[meta.stem] = meta.stat().st_mtime
            except (ValueError, KeyError, OSError):
                log.warning("%s: unreadable chunk metadata; it will be rebuilt when needed", meta)

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def paths(self, digest: str) -> tuple[Path, Path]:
        d = self.root / digest[:2]
        return d / f"{digest}.safetensors", d / f"{digest}.json"

    def __contains__(self, digest: str) -> bool:
        return digest in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def lru_digests(self) -> list[str]:
        return sorted(self._sizes, key=lambda d: self._atime.get(d, 0.0))

    def save(self, chunk: ChunkKV, model_name: str = "") -> int:
        """Write the chunk (tensor file first, metadata JSON last as the commit mark); returns file bytes."""
        digest = chunk.key.digest
        data = st_save({"kv": chunk.kv.detach().cpu().contiguous()}, metadata={"layout": LAYOUT})
        tensor_path, meta_path = self.paths(digest)
        meta = {
            "format_version": FORMAT_VERSION,
            "key": {"model_fingerprint": chunk.key.model_fingerprint, "dtype": chunk.key.dtype,
                    "token_hash": chunk.key.token_hash, "digest": digest},
            "model_name": model_name,
            "text": chunk.text,
            "token_ids": list(chunk.token_ids),
            "num_tokens": chunk.num_tokens,
            "sink_ids": list(chunk.sink_ids),
            "rope_offset": chunk.rope_offset,
            "layout": LAYOUT,
            "layout_doc": "kv[0]=K (after RoPE, chunk-local positions from rope_offset), kv[1]=V; "
                          "each [layers, kv_heads, tokens, head_dim]",
            "shape": list(chunk.kv.shape),
            "tensor_dtype": str(chunk.kv.dtype).removeprefix("torch."),
            "nbytes": chunk.nbytes,
            "file_bytes": len(data),
            "file_sha256": hashlib.sha256(data).hexdigest(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_bytes(tensor_path, data)
        atomic_write_json(meta_path, meta)
        self._sizes[digest] = len(data)
        self._atime[digest] = time.time()
        return len(data)

    def load(self, key: ChunkKey) -> ChunkKV:
        """Read and verify a chunk; ChunkCorruptError (files removed) when anything does not check out."""
        digest = key.digest
        tensor_path, meta_path = self.paths(digest)
        try:
            meta = json.loads(meta_path.read_text())
            data = tensor_path.read_bytes()
            if len(data) != meta["file_bytes"]:
                raise ValueError(f"truncated: {len(data)} of {meta['file_bytes']} bytes")
            if hashlib.sha256(data).hexdigest() != meta["file_sha256"]:
                raise ValueError("sha256 mismatch")
            if meta["key"]["digest"] != digest or meta["layout"] != LAYOUT:
                raise ValueError("metadata does not match the requested key")
            kv = st_load(data)["kv"]
            if list(kv.shape) != meta["shape"] or kv.shape[3] != meta["num_tokens"]:
                raise ValueError(f"tensor shape {list(kv.shape)} does not match metadata")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.remove(digest)
            raise ChunkCorruptError(f"{tensor_path}: corrupt chunk file ({exc}); removed, it will be rebuilt") from None
        self._atime[digest] = time.time()
        return ChunkKV(key=key, token_ids=tuple(meta["token_ids"]), kv=kv, rope_offset=int(meta["rope_offset"]),
                       sink_ids=tuple(meta["sink_ids"]), text=meta.get("text", ""))

    def remove(self, digest: str) -> None:
        for p in self.paths(digest):
            p.unlink(missing_ok=True)
        self._sizes.pop(digest, None)
        self._atime.pop(digest, None)
