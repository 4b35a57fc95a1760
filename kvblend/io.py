"""Atomic file writes: a temp file in the same folder, fsync, then rename over the target.

A reader never sees a partial file, and a failed write leaves the previous file untouched. A temp file is named
`.<target name>.pid<writer pid>.<random>.tmp`, so a writer that died (SIGKILL, power loss) can be told from a live
one and its leftovers removed (kvblend.kvstore.retention.sweep_dead_writes). `Rollback` keeps a multi-file job (a
`kvblend run`) from leaving some of its files rewritten and others not when it fails.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def temp_prefix(path: Path) -> str:
    return f".{path.name}.pid{os.getpid()}."


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """mode: the file's permission bits (0o644 for results other users of the machine read; the chunk store
    writes 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: object) -> bytes:
    """JSON (indent 1, UTF-8, no NaN/Infinity), newline-terminated."""
    return (json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def atomic_write_json(path: str | Path, obj: object, mode: int = 0o644) -> Path:
    return atomic_write_bytes(path, json_bytes(obj), mode)


class Rollback:
    """`with Rollback(paths):` a job that rewrites several files either leaves all of them rewritten or, when it
    raises, every one as it was before (a file that did not exist is removed again). The previous versions are
    kept as hard links beside the files while the job runs (`.<name>.rollback`) and removed at the end."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self._saved: dict[Path, Path | None] = {}

    def _backup(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.rollback")

    def __enter__(self) -> "Rollback":
        try:
            for path in self.paths:
                backup = self._backup(path)
                if backup.exists():
                    backup.unlink()
                if path.is_file():
                    os.link(path, backup)
                    self._saved[path] = backup
                else:
                    self._saved[path] = None
        except BaseException:
            self.__exit__(None, None, None)  # drop the backups made so far
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for path, backup in self._saved.items():
            try:
                if exc_type is None:
                    if backup is not None:
                        backup.unlink(missing_ok=True)
                elif backup is not None:
                    if path.exists() and os.path.samefile(backup, path):
                        backup.unlink()  # not rewritten (and rename() between two links of one file does nothing)
                    else:
                        os.replace(backup, path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as err:  # the job's own error is the one to report
                log.warning("%s: could not be restored (%s)", path, err)
        if exc_type is not None:
            log.info("the job failed: %d result files restored as they were", len(self._saved))
