"""Chunk key summaries: a small stand-in for a chunk's keys that lets a query bound its attention to the chunk
without the chunk's KV on the GPU (Quest-style pages).

A summary holds, for a few layers and every kv head, the per-dimension min and max of the chunk's cached keys
over each page of PAGE_TOKENS tokens: kmin / kmax [layers, H_kv, pages, D] in the chunk's dtype (a min or max
of stored values is a stored value, so nothing is rounded). The keys are the cached ones: post-RoPE at the
chunk-local positions rope_offset.. . A chunk placed at prompt row `start` has its keys rotated by
delta = start - rope_offset (model/rope.py rerotate); RoPE is a rotation R(delta) per dimension pair, so for a
query q at its prompt position, q . R(delta) k = (R(-delta) q) . k. Scoring therefore rotates the *query* back
into the chunk's cached frame and bounds it against the stored box: the bound

    ub(q, page) = sum_d max(q'_d * kmin_d, q'_d * kmax_d),  q' = R(-delta) q

is >= q . k for every key of the page at its placed position, whatever the placement (no re-summarising per
prompt). The bound of a chunk is the largest page bound.

On disk a summary is one safetensors file keyed by its chunk's digest, in a tree parallel to the chunk store's
(<home>/summaries/<model>/<dtype>/<digest[:2]>/<digest>.ksum.safetensors, so the chunk tree keeps its one
tensor file + one JSON per chunk; tensors kmin,
kmax; metadata: the chunk digest, layers, page size, rope offset, token count, CRC-32 of the tensor bytes),
verified when read; a summary that fails verification is removed and rebuilt from the chunk's KV
(SummaryStore.get), never fatal. Summaries are read-only once built.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kvblend.io import atomic_write_bytes
from kvblend.kvstore.chunk_kv import ChunkKV
from kvblend.model.rope import rerotate

log = logging.getLogger(__name__)

PAGE_TOKENS = 16
SUMMARY_VERSION = 1
SUFFIX = ".ksum.safetensors"


def summary_layers(num_layers: int) -> tuple[int, ...]:
    """The layers a summary covers by default: every layer from the second third of the stack on (early layers
    attend by position, not content), every other one."""
    first = max(1, num_layers // 3)
    return tuple(range(first, num_layers, 2))


@dataclass(frozen=True, slots=True)
class ChunkSummary:
    digest: str  # the chunk's key digest
    layers: tuple[int, ...]
    page_tokens: int
    rope_offset: int  # the chunk's cached positions start here (ChunkKV.rope_offset)
    num_tokens: int
    kmin: torch.Tensor  # [len(layers), H_kv, pages, D]
    kmax: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.kmin.numel() * self.kmin.element_size()

    def to(self, device: torch.device | str) -> "ChunkSummary":
        return ChunkSummary(self.digest, self.layers, self.page_tokens, self.rope_offset, self.num_tokens,
                            self.kmin.to(device), self.kmax.to(device))


def summarize(chunk: ChunkKV, layers: Sequence[int], page_tokens: int = PAGE_TOKENS) -> ChunkSummary:
    """The summary of a chunk's cached keys at `layers` (the chunk's tensors are only read)."""
    k = chunk.k[list(layers)]  # [Ls, H, T, D]
    t = k.shape[2]
    pages = -(-t // page_tokens)
    pad = pages * page_tokens - t
    if pad:  # repeat the last key: padding never widens a box
        k = torch.cat([k, k[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
    k = k.reshape(k.shape[0], k.shape[1], pages, page_tokens, k.shape[-1])
    return ChunkSummary(chunk.key.digest, tuple(int(x) for x in layers), page_tokens, chunk.rope_offset,
                        chunk.num_tokens, k.amin(dim=3).contiguous(), k.amax(dim=3).contiguous())


def chunk_bounds(queries: Sequence[torch.Tensor], summary: ChunkSummary, start: int, inv_freq: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Upper bounds [len(summary.layers), H, T] of the scaled attention logit q . k * scale of each query row
    over every key of the chunk placed at prompt row `start`. queries: per model layer [H, T, D], post-RoPE at
    their prompt positions (H a multiple of the summary's kv heads: grouped-query attention)."""
    out = []
    delta = start - summary.rope_offset
    for i, layer in enumerate(summary.layers):
        q = rerotate(queries[layer].to(torch.float32), -delta, inv_freq)  # into the chunk's cached frame
        group = q.shape[0] // summary.kmin.shape[1]
        kmin = summary.kmin[i].to(device=q.device, dtype=torch.float32).repeat_interleave(group, dim=0)
        kmax = summary.kmax[i].to(device=q.device, dtype=torch.float32).repeat_interleave(group, dim=0)
        qq = q[:, :, None, :]  # [H, T, 1, D] against [H, 1, P, D]
        ub = torch.maximum(qq * kmin[:, None], qq * kmax[:, None]).sum(-1).amax(-1)  # [H, T]
        out.append(ub * scale)
    return torch.stack(out)


# -- on disk ------------------------------------------------------------------------------------------------
def _crc(kmin: torch.Tensor, kmax: torch.Tensor) -> int:
    crc = zlib.crc32(kmin.contiguous().view(torch.uint8).numpy().tobytes())
    return zlib.crc32(kmax.contiguous().view(torch.uint8).numpy().tobytes(), crc)


def summary_bytes(s: ChunkSummary) -> bytes:
    kmin, kmax = s.kmin.cpu().contiguous(), s.kmax.cpu().contiguous()
    meta = {"version": str(SUMMARY_VERSION), "digest": s.digest, "layers": json.dumps(list(s.layers)),
            "page_tokens": str(s.page_tokens), "rope_offset": str(s.rope_offset), "num_tokens": str(s.num_tokens),
            "crc32": str(_crc(kmin, kmax))}
    return st_save({"kmin": kmin, "kmax": kmax}, metadata=meta)


def parse_summary(data: bytes, chunk: ChunkKV, layers: Sequence[int], page_tokens: int) -> ChunkSummary:
    """A stored summary, verified against its chunk and the layers and page size asked for; ValueError (or a
    parse error) when anything does not match."""
    tensors = st_load(data)
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    kmin, kmax = tensors["kmin"], tensors["kmax"]
    if int(meta["version"]) != SUMMARY_VERSION or meta["digest"] != chunk.key.digest:
        raise ValueError("summary of another chunk or format version")
    if tuple(json.loads(meta["layers"])) != tuple(layers) or int(meta["page_tokens"]) != page_tokens:
        raise ValueError("summary of other layers or page size")
    if int(meta["rope_offset"]) != chunk.rope_offset or int(meta["num_tokens"]) != chunk.num_tokens:
        raise ValueError("summary of another placement of the chunk")
    pages = -(-chunk.num_tokens // page_tokens)
    shape = (len(layers), chunk.k.shape[1], pages, chunk.k.shape[-1])
    if tuple(kmin.shape) != shape or tuple(kmax.shape) != shape or kmin.dtype != chunk.kv.dtype:
        raise ValueError(f"summary tensors {tuple(kmin.shape)} do not fit the chunk ({shape})")
    if _crc(kmin, kmax) != int(meta["crc32"]):
        raise ValueError("crc32 mismatch")
    return ChunkSummary(chunk.key.digest, tuple(layers), page_tokens, chunk.rope_offset, chunk.num_tokens,
                        kmin, kmax)


@dataclass(slots=True)
class SummaryStats:
    built: int = 0  # summaries computed from a chunk's KV (new chunk, or a stored one missing or failing checks)
    loaded: int = 0  # read from disk and verified
    corrupt: int = 0  # stored summaries that failed verification (removed, rebuilt)
    disk_errors: int = 0  # summaries the disk could not take (kept in memory only)

    def as_dict(self) -> dict:
        return {"built": self.built, "loaded": self.loaded, "corrupt": self.corrupt, "disk_errors": self.disk_errors}


class SummaryStore:
    """Summaries of a chunk store's chunks: files under `root` (a tree parallel to the chunk store's disk root),
    and a device-resident copy of every summary asked for (they are small: see nbytes)."""

    def __init__(self, root: Path, device: torch.device | str, layers: Sequence[int],
                 page_tokens: int = PAGE_TOKENS):
        self.root, self.device = Path(root), torch.device(device)
        self.layers, self.page_tokens = tuple(int(x) for x in layers), int(page_tokens)
        self.stats = SummaryStats()
        self._on_device: dict[str, ChunkSummary] = {}

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}{SUFFIX}"

    @property
    def nbytes(self) -> int:
        """Bytes of the device-resident summaries."""
        return sum(s.nbytes for s in self._on_device.values())

    def put(self, chunk: ChunkKV) -> ChunkSummary:
        """Summarise a chunk (at build time) and store the summary beside it; a disk that cannot take it is
        logged and the summary kept in memory."""
        s = summarize(chunk, self.layers, self.page_tokens)
        self.stats.built += 1
        try:
            atomic_write_bytes(self.path(chunk.key.digest), summary_bytes(s), mode=0o600)
        except OSError as exc:
            self.stats.disk_errors += 1
            log.warning("summary of chunk %s not written (%s); kept in memory", chunk.key, exc)
        s = s.to(self.device)
        self._on_device[chunk.key.digest] = s
        return s

    def _load(self, chunk: ChunkKV) -> ChunkSummary | None:
        path = self.path(chunk.key.digest)
        if not path.exists():
            return None
        try:
            s = parse_summary(path.read_bytes(), chunk, self.layers, self.page_tokens)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, RuntimeError) as exc:
            self.stats.corrupt += 1
            log.warning("summary %s failed verification (%s); rebuilding it from the chunk", path, exc)
            path.unlink(missing_ok=True)
            return None
        self.stats.loaded += 1
        return s

    def get(self, chunk_of: Callable[[], ChunkKV], digest: str) -> ChunkSummary:
        """The device-resident summary of chunk `digest`; chunk_of() gives the chunk (from whatever tier it is
        on) when the summary must be read from disk (verified against it) or rebuilt."""
        got = self._on_device.get(digest)
        if got is not None:
            return got
        chunk = chunk_of()
        loaded = self._load(chunk)
        if loaded is None:
            return self.put(chunk)
        loaded = loaded.to(self.device)
        self._on_device[digest] = loaded
        return loaded

    def drop(self, digest: str) -> None:
        """Forget the device copy (the file stays)."""
        self._on_device.pop(digest, None)
