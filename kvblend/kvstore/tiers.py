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
import shutil
import struct
import time
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from kvblend.errors import ChunkCorruptError
from kvblend.io import atomic_write_bytes, json_bytes
from kvblend.kvstore.chunk_kv import LAYOUT, ChunkKV
from kvblend.kvstore.key import ChunkKey, token_hash
from kvblend.kvstore.retention import remove_chunk_files, sweep_dead_writes

log = logging.getLogger(__name__)

# what a damaged or truncated chunk file raises while it is read and checked
_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, struct.error)

FORMAT_VERSION = 1
FILE_MODE = 0o600  # chunk files hold what requests sent: readable by the server's user only
FREE_SPACE_RESERVE = 256 * 2**20  # the disk budget leaves this much of the filesystem free
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
    """Content-addressed files under root/<digest[:2]>/<digest>.{safetensors,json}, 0600 in 0700 folders.

    The sidecar JSON keeps the chunk's token ids and a SHA-256 of its text, not the text (unless store_text).
    The byte budget is capped by the filesystem's free space (less FREE_SPACE_RESERVE), so the store evicts its
    own chunks before the disk fills. At start-up the leftovers of dead writers are removed (leftovers_removed)."""

    def __init__(self, root: Path, budget_bytes: int, pin_memory: bool | None = None, store_text: bool = False,
                 chunk_shape: tuple[int, int, int] | None = None):
        """chunk_shape: (layers, kv heads, head dim) every stored chunk must have (None: not checked)."""
        self.root = Path(root)
        self.configured_budget_bytes = int(budget_bytes)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.store_text = store_text
        self.chunk_shape = tuple(chunk_shape) if chunk_shape is not None else None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self._sizes: dict[str, int] = {}
        self._nbytes: dict[str, int] = {}  # tensor bytes (what a memory tier will hold)
        self._atime: dict[str, float] = {}
        self._used = 0
        self._free: tuple[float, int] = (0.0, 0)  # (when measured, free bytes)
        self.leftovers_removed = sweep_dead_writes(self.root)
        for meta in self.root.glob("*/*.json"):
            try:
                info = json.loads(meta.read_text())
                self._index(meta.stem, int(info["file_bytes"]), int(info.get("nbytes", info["file_bytes"])),
                            meta.stat().st_mtime)
            except (ValueError, KeyError, TypeError, OSError):
                log.warning("%s: unreadable chunk metadata; it will be rebuilt when needed", meta)

    def _index(self, digest: str, file_bytes: int, nbytes: int, atime: float) -> None:
        self._used += file_bytes - self._sizes.get(digest, 0)
        self._sizes[digest], self._nbytes[digest], self._atime[digest] = file_bytes, nbytes, atime

    @property
    def used_bytes(self) -> int:
        return self._used

    def free_bytes(self) -> int:
        """Free bytes of the filesystem (measured at most once a second)."""
        when, free = self._free
        if time.monotonic() - when > 1.0:
            try:
                free = shutil.disk_usage(self.root).free
            except OSError:
                free = 0
            self._free = (time.monotonic(), free)
        return free

    @property
    def budget_bytes(self) -> int:
        """The configured budget, capped by what the filesystem can still take."""
        room = self._used + max(0, self.free_bytes() - FREE_SPACE_RESERVE)
        return min(self.configured_budget_bytes, room)

    def paths(self, digest: str) -> tuple[Path, Path]:
        d = self.root / digest[:2]
        return d / f"{digest}.safetensors", d / f"{digest}.json"

    def __contains__(self, digest: str) -> bool:
        return digest in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def lru_digests(self) -> list[str]:
        return sorted(self._sizes, key=lambda d: self._atime.get(d, 0.0))

    def _sidecar(self, chunk: ChunkKV, model_name: str, data: bytes) -> dict:
        k = chunk.key
        meta = {
            "format_version": FORMAT_VERSION,
            "key": {"model_fingerprint": k.model_fingerprint, "dtype": k.dtype, "token_hash": k.token_hash,
                    "salted": bool(k.salt), "digest": k.digest},
            "model_name": model_name,
            "text_sha256": hashlib.sha256(chunk.text.encode("utf-8", "surrogatepass")).hexdigest(),
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
        if self.store_text:
            meta["text"] = chunk.text
        return meta

    def encode(self, chunk: ChunkKV, model_name: str = "") -> tuple[bytes, dict]:
        """The chunk as this tier stores it: safetensors bytes and their sidecar (the remote tier stores the same)."""
        data = st_save({"kv": chunk.kv.detach().cpu().contiguous()}, metadata={"layout": LAYOUT})
        return data, self._sidecar(chunk, model_name, data)

    def save(self, chunk: ChunkKV, model_name: str = "") -> int:
        """Write the chunk (tensor file first, metadata JSON last as the commit mark); returns file bytes.
        OSError (a full disk, a quota) propagates with neither file left behind."""
        digest = chunk.key.digest
        data, meta = self.encode(chunk, model_name)
        tensor_path, meta_path = self.paths(digest)
        self._drop_pending(digest)  # a read started before this write must not be used
        try:
            tensor_path.parent.mkdir(mode=0o700, exist_ok=True)
            atomic_write_bytes(tensor_path, data, mode=FILE_MODE)
            atomic_write_bytes(meta_path, json_bytes(meta), mode=FILE_MODE)
        except OSError:
            self.remove(digest)
            raise
        self._index(digest, len(data), chunk.nbytes, time.time())
        return len(data)

    def nbytes(self, digest: str) -> int:
        """Tensor bytes of a stored chunk (the file's size when its metadata lacks them)."""
        return self._nbytes.get(digest, self._sizes.get(digest, 0))

    def touch(self, digest: str) -> None:
        """Mark the chunk recently used (disk LRU; the sidecar's mtime too, so expiry survives restarts)."""
        if digest in self._sizes:
            self._atime[digest] = now = time.time()
            try:
                os.utime(self.paths(digest)[1], (now, now))
            except OSError:
                pass

    def expired(self, max_age_s: float, now: float | None = None) -> list[str]:
        """Digests of the chunks not used for more than max_age_s seconds."""
        now = time.time() if now is None else now
        return [d for d, t in self._atime.items() if now - t > max_age_s]

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
        return self.verify(key, _read_file(tensor_path, self.pin_memory), meta), meta

    def verify(self, key: ChunkKey, buf: torch.Tensor, meta: dict) -> torch.Tensor:
        """The KV tensor of stored bytes `buf` (uint8) once they check out against their sidecar `meta` and the
        key (size, CRC-32 or SHA-256, digest, layout, shape, token ids, dtype); ValueError / KeyError / TypeError
        / struct.error when anything does not. The remote tier's reads are checked here too."""
        digest = key.digest
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
        self._check_against_key(key, kv, meta)
        return kv

    def _check_against_key(self, key: ChunkKey, kv: torch.Tensor, meta: dict) -> None:
        """The sidecar and the tensor agree with the key: token ids, dtype, the model's shape."""
        ids, sink = meta["token_ids"], meta["sink_ids"]
        if len(ids) != meta["num_tokens"] or token_hash(ids, sink) != key.token_hash:
            raise ValueError("its token ids are not the ones the chunk's key was made from")
        dtype = str(kv.dtype).removeprefix("torch.")
        if dtype != key.dtype or meta["tensor_dtype"] != key.dtype:
            raise ValueError(f"tensor dtype {dtype} is not the key's {key.dtype}")
        if kv.dim() != 5 or kv.shape[0] != 2:
            raise ValueError(f"tensor shape {list(kv.shape)} is not layout {LAYOUT}")
        if self.chunk_shape is not None and (kv.shape[1], kv.shape[2], kv.shape[4]) != self.chunk_shape:
            raise ValueError(f"tensor shape {list(kv.shape)} does not fit the model (layers, kv heads, head dim "
                             f"{self.chunk_shape})")

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
        self.touch(digest)
        return self.as_chunk(key, kv, meta)

    def read(self, key: ChunkKey) -> ChunkKV:
        """A verified read that changes nothing in the tier (safe from another thread): ChunkCorruptError when
        the file does not check out, which is left in place for load() to find and remove."""
        try:
            kv, meta = self._read_checked(key)
        except _READ_ERRORS as exc:
            raise ChunkCorruptError(f"{self.paths(key.digest)[0]}: unreadable or corrupt chunk file ({exc})") from None
        return self.as_chunk(key, kv, meta)

    @staticmethod
    def as_chunk(key: ChunkKey, kv: torch.Tensor, meta: dict) -> ChunkKV:
        """The ChunkKV of a verified tensor and its sidecar."""
        return ChunkKV(key=key, token_ids=tuple(meta["token_ids"]), kv=kv, rope_offset=int(meta["rope_offset"]),
                       sink_ids=tuple(meta["sink_ids"]), text=meta.get("text", ""))

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
        tensor_path, meta_path = self.paths(digest)
        remove_chunk_files(meta_path)
        tensor_path.unlink(missing_ok=True)
        self._used -= self._sizes.pop(digest, 0)
        self._nbytes.pop(digest, None)
        self._atime.pop(digest, None)
