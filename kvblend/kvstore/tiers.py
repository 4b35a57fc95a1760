"""Tiers hold bytes; store.py decides what goes where.

MemoryTier: chunks resident on one device (the GPU tier on CUDA; CPU memory, pinned when CUDA is
present, for the CPU tier). On a machine without CUDA the GPU tier lives in CPU memory with its own
byte budget, so placement, eviction and promotion behave exactly as they would on a GPU.
DiskTier: one safetensors file + one metadata JSON per chunk, written atomically, verified on load.

Disk loads are built for the critical path of a request: the tensor file is read straight into pinned host
memory when CUDA is present (one read, no intermediate bytes object; the copy to the GPU from there is
asynchronous), checked with CRC-32 (zlib, ~7 GB/s on one core, the GIL released) against the metadata
instead of SHA-256 (~2 GB/s; still written for provenance and used for files without a CRC), and several
chunks can be read and checked in parallel threads (`prefetch`). A file that fails any check is never used:
it is removed and ChunkCorruptError raised, as before. `read` is the same verified read without any change to
the tier (for ChunkKVStore.prefetch's background thread, which makes the chunks of the next request resident
in memory); a file it finds corrupt is left for `load` to remove.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from kvblend.errors import ChunkCorruptError
from kvblend.io import atomic_write_bytes, atomic_write_json
from kvblend.kvstore.chunk_kv import LAYOUT, ChunkKV
from kvblend.kvstore.key import ChunkKey

log = logging.getLogger(__name__)

# what a damaged or truncated chunk file raises while it is read and checked
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, struct.error)

FORMAT_VERSION = 1
LOAD_THREADS = max(1, min(8, os.cpu_count() or 1))  # parallel chunk reads + checks (prefetch)

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _read_file(path: Path, pin: bool) -> torch.Tensor:
    """The whole file as a uint8 tensor, read straight into pinned memory when `pin`."""
    with open(path, "rb", buffering=0) as f:
        size = f.seek(0, 2)
        f.seek(0)
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        view = memoryview(buf.numpy()).cast("B")
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    return buf[:got]


def _parse_safetensors(buf: torch.Tensor, name: str = "kv") -> tuple[torch.Tensor, dict]:
    """A view of tensor `name` inside a safetensors file held in buf (uint8), and the file's metadata."""
    raw = buf.numpy()
    if raw.size < 8:
        raise ValueError("file too short for a safetensors header")
    (hlen,) = struct.unpack("<Q", raw[:8].tobytes())
    if 8 + hlen > raw.size:
        raise ValueError("safetensors header runs past the end of the file")
    header = json.loads(raw[8:8 + hlen].tobytes())
    info = header[name]
    dtype = _ST_DTYPES[info["dtype"]]
    a, b = info["data_offsets"]
    start = 8 + hlen
    if start + b > raw.size or b < a:
        raise ValueError("tensor data runs past the end of the file")
    data = buf[start + a:start + b]
    if (start + a) % torch.empty((), dtype=dtype).element_size():
        data = data.clone()  # unaligned (not written by kvblend): copy once
    shape = [int(x) for x in info["shape"]]
    return data.view(dtype).view(shape), header.get("__metadata__", {})


def encode_chunk(chunk: ChunkKV, model_name: str = "") -> tuple[bytes, dict]:
    """A chunk as stored (on disk and in the remote tier): safetensors bytes and their metadata (sizes, SHA-256
    and CRC-32 of the bytes, key, token ids, layout)."""
    data = st_save({"kv": chunk.kv.detach().cpu().contiguous()}, metadata={"layout": LAYOUT})
    meta = {
        "format_version": FORMAT_VERSION,
        "key": {"model_fingerprint": chunk.key.model_fingerprint, "dtype": chunk.key.dtype,
                "token_hash": chunk.key.token_hash, "digest": chunk.key.digest},
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
        "file_crc32": zlib.crc32(data),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return data, meta


def verify_chunk(buf: torch.Tensor, meta: dict, digest: str) -> torch.Tensor:
    """The KV tensor of stored bytes `buf` (uint8) once they check out against `meta` (size, CRC-32 or SHA-256,
    key digest, layout, shape); ValueError / KeyError / TypeError / struct.error when anything does not."""
    if buf.numel() != meta["file_bytes"]:
        raise ValueError(f"truncated: {buf.numel()} of {meta['file_bytes']} bytes")
    raw = memoryview(buf.numpy())
    if "file_crc32" in meta:
        if zlib.crc32(raw) != meta["file_crc32"]:
            raise ValueError("crc32 mismatch")
    elif hashlib.sha256(raw).hexdigest() != meta["file_sha256"]:
        raise ValueError("sha256 mismatch")
    if meta["key"]["digest"] != digest or meta["layout"] != LAYOUT:
        raise ValueError("metadata does not match the requested key")
    kv, _ = _parse_safetensors(buf)
    if list(kv.shape) != meta["shape"] or kv.shape[3] != meta["num_tokens"]:
        raise ValueError(f"tensor shape {list(kv.shape)} does not match metadata")
    return kv


def chunk_from_meta(key: ChunkKey, kv: torch.Tensor, meta: dict) -> ChunkKV:
    """The ChunkKV of verified tensor `kv` with the token ids, sink and offset its metadata records."""
    return ChunkKV(key=key, token_ids=tuple(meta["token_ids"]), kv=kv, rope_offset=int(meta["rope_offset"]),
                   sink_ids=tuple(meta["sink_ids"]), text=meta.get("text", ""))


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

    def nbytes(self, digest: str) -> int:
        return self._items[digest].nbytes

    def remove(self, digest: str) -> ChunkKV:
        chunk = self._items.pop(digest)
        self.used_bytes -= chunk.nbytes
        return chunk

    def lru_digests(self) -> list[str]:
        return list(self._items)


class DiskTier:
    """Content-addressed files under root/<digest[:2]>/<digest>.{safetensors,json}."""

    def __init__(self, root: Path, budget_bytes: int, pin_memory: bool | None = None):
        self.root = Path(root)
        self.budget_bytes = int(budget_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self._sizes: dict[str, int] = {}
        self._nbytes: dict[str, int] = {}  # tensor bytes (what a memory tier will hold)
        self._atime: dict[str, float] = {}
        for meta in self.root.glob("*/*.json"):
            try:
                info = json.loads(meta.read_text())
                self._sizes[meta.stem] = int(info["file_bytes"])
                self._nbytes[meta.stem] = int(info.get("nbytes", info["file_bytes"]))
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
        data, meta = encode_chunk(chunk, model_name)
        tensor_path, meta_path = self.paths(digest)
        self._drop_pending(digest)  # a read started before this write must not be used
        atomic_write_bytes(tensor_path, data)
        atomic_write_json(meta_path, meta)
        self._sizes[digest] = len(data)
        self._nbytes[digest] = chunk.nbytes
        self._atime[digest] = time.time()
        return len(data)

    def nbytes(self, digest: str) -> int:
        """Tensor bytes of a stored chunk (the file's size when its metadata lacks them)."""
        return self._nbytes.get(digest, self._sizes.get(digest, 0))

    def touch(self, digest: str) -> None:
        """Mark the chunk recently used (disk LRU)."""
        if digest in self._sizes:
            self._atime[digest] = time.time()

    def prefetch(self, keys) -> None:
        """Start reading and checking these chunks in background threads; load() then takes the result.
        Keys not on disk are ignored."""
        for key in keys:
            digest = key.digest
            if digest in self._sizes and digest not in self._pending:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="kvblend-disk")
                self._pending[digest] = self._pool.submit(self._read_checked, key)

    def _read_checked(self, key: ChunkKey) -> tuple[torch.Tensor, dict]:
        """Read and verify; returns (kv, meta); raises ValueError/OSError/KeyError/TypeError when corrupt."""
        digest = key.digest
        tensor_path, meta_path = self.paths(digest)
        meta = json.loads(meta_path.read_text())
        buf = _read_file(tensor_path, self.pin_memory)
        kv = verify_chunk(buf, meta, digest)
        return kv, meta

    def load(self, key: ChunkKey) -> ChunkKV:
        """Read and verify a chunk; ChunkCorruptError (files removed) when anything does not check out."""
        digest = key.digest
        tensor_path, _ = self.paths(digest)
        pending = self._pending.pop(digest, None)
        try:
            kv, meta = pending.result() if pending is not None else self._read_checked(key)
        except _READ_ERRORS as exc:
            self.remove(digest)
            raise ChunkCorruptError(f"{tensor_path}: corrupt chunk file ({exc}); removed, it will be rebuilt") from None
        self._atime[digest] = time.time()
        return self._chunk(key, kv, meta)

    def read(self, key: ChunkKey) -> ChunkKV:
        """A verified read that changes nothing in the tier (safe from another thread): ChunkCorruptError when
        the file does not check out, which is left in place for load() to find and remove."""
        try:
            kv, meta = self._read_checked(key)
        except _READ_ERRORS as exc:
            raise ChunkCorruptError(f"{self.paths(key.digest)[0]}: unreadable or corrupt chunk file ({exc})") from None
        return self._chunk(key, kv, meta)

    @staticmethod
    def _chunk(key: ChunkKey, kv: torch.Tensor, meta: dict) -> ChunkKV:
        return chunk_from_meta(key, kv, meta)

    def _drop_pending(self, digest: str) -> None:
        pending = self._pending.pop(digest, None)
        if pending is not None:
            pending.cancel()
            try:
                pending.result()
            except BaseException:  # noqa: BLE001 (a read of a file being replaced or removed: its outcome is moot)
                pass

    def remove(self, digest: str) -> None:
        self._drop_pending(digest)
        for p in self.paths(digest):
            p.unlink(missing_ok=True)
        self._sizes.pop(digest, None)
        self._nbytes.pop(digest, None)
        self._atime.pop(digest, None)
