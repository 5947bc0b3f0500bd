"""Atomic writes: a temporary file (or directory) in the same folder, then ``os.replace``."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` so readers see the old file or the whole new one.

    Creates missing parent folders. On any error the temporary file is removed and an
    existing ``path`` is left untouched; the error propagates. The file gets the permissions a
    plain ``open(path, "w")`` would give (``0o666`` minus the umask), not ``mkstemp``'s private
    ``0o600``: provenance and configs are read by other users of a shared cluster. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it (power loss, node crash)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def disk_full_errno(error: BaseException | None) -> int | None:
    """``errno.ENOSPC`` / ``errno.EDQUOT`` when ``error`` (or one it was raised from) is a full disk or quota, else None."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return seen.errno
        if "No space left on device" in str(seen):
            return errno.ENOSPC
        seen = seen.__cause__ or seen.__context__
    return None


def fsync_directory(path: str | Path) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) refuse fsync on directories; the rename itself still happened
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file under ``path`` and every directory, deepest first (before renaming it into place)."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(root)


def tree_bytes(path: str | Path) -> int:
    """Total size in bytes of the files under ``path`` (0 when it does not exist)."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files)


def _umask() -> int:
    """The process umask (read by setting and restoring it; ``os`` has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``path`` only when the block completes.

    Readers see the old directory or the whole new one; on an error the temporary directory is
    removed and an existing ``path`` is left untouched. The files are fsynced before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())
        fsync_tree(tmp)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
