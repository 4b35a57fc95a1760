"""Retention of the chunk store on disk: leftovers of dead writers, expiry by age, `kvblend store gc`. Torch-free.

A chunk is two files under <store root>/<digest[:2]>/: <digest>.safetensors (the KV) and <digest>.json (its
sidecar, written last: the commit mark). Its last use is the sidecar's mtime (DiskTier.touch sets it), so expiry
survives restarts. Leftovers of a writer that died: temp files (`.<name>.pid<pid>.<random>.tmp`, kvblend.io)
whose writer is gone, and tensor files that never got their sidecar.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from kvblend.io import TMP_SUFFIX

log = logging.getLogger(__name__)

ORPHAN_GRACE_S = 60.0  # a tensor file younger than this may be a live writer's, between its two renames
_PID = re.compile(r"\.pid(\d+)\.")
_DIGEST = re.compile(r"[0-9a-f]{32}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # a leftover with our own pid is from an earlier process that had it (containers)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_write(path: Path, now: float) -> bool:
    if path.name.endswith(TMP_SUFFIX):
        m = _PID.search(path.name)
        if m is not None:
            return not _alive(int(m.group(1)))
        return now - path.stat().st_mtime > ORPHAN_GRACE_S  # written before writer pids were recorded
    if path.suffix == ".safetensors" and _DIGEST.fullmatch(path.stem):
        return not path.with_suffix(".json").exists() and now - path.stat().st_mtime > ORPHAN_GRACE_S
    return False


def sweep_dead_writes(root: Path) -> int:
    """Remove the temp files of writers that are gone and tensor files without a sidecar; how many were removed."""
    removed, now = 0, time.time()
    for path in Path(root).glob("*/.*" + TMP_SUFFIX):
        removed += _remove_if(path, now)
    for path in Path(root).glob("*/*.safetensors"):
        removed += _remove_if(path, now)
    if removed:
        log.warning("%s: removed %d files left by interrupted writes", root, removed)
    return removed


def _remove_if(path: Path, now: float) -> int:
    try:
        if _dead_write(path, now):
            path.unlink()
            return 1
    except FileNotFoundError:  # another sweeper or the writer itself got there first
        pass
    return 0


@dataclass(frozen=True, slots=True)
class GcResult:
    chunks: int  # chunks removed (sidecar + tensor)
    bytes: int  # bytes freed
    leftovers: int  # dead writers' files removed


def remove_chunk_files(meta: Path) -> int:
    """Remove one chunk (sidecar first, so no reader takes the tensor for committed); bytes freed."""
    freed = 0
    for path in (meta, meta.with_suffix(".safetensors")):
        try:
            freed += path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            pass
    return freed


def gc_chunks(root: Path, older_than_s: float, now: float | None = None) -> GcResult:
    """Remove every chunk under `root` (a store root, or a folder of store roots such as $KVBLEND_HOME/chunks)
    not used for `older_than_s` seconds, and the leftovers of dead writers."""
    root, now = Path(root), time.time() if now is None else now
    chunks = freed = leftovers = 0
    for meta in root.rglob("*.json"):
        if not _DIGEST.fullmatch(meta.stem):
            continue
        try:
            old = now - meta.stat().st_mtime > older_than_s
        except FileNotFoundError:
            continue
        if old:
            freed += remove_chunk_files(meta)
            chunks += 1
    stores = {p.parent.parent for pattern in ("*.safetensors", ".*" + TMP_SUFFIX) for p in root.rglob(pattern)}
    for store_root in stores:
        leftovers += sweep_dead_writes(store_root)
    return GcResult(chunks, freed, leftovers)
