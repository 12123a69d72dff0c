"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer in the project goes through :func:`atomic_path`: it writes a temporary file with a
unique name beside the target (runs may share a folder, so a fixed name would let two writers
clobber each other's half-written file) and renames it over the target. The target is never
deleted first, so a crash between the two leaves the old file in place.

A full disk (or quota) is not a transient failure: the temporary file is removed and the write
raises :class:`DiskFullError`, naming the target and saying what is wrong, which the task retries
(tasks.retries.is_transient) leave alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How libraries that do their own I/O (safetensors in Rust, for instance) word ENOSPC and EDQUOT
# when they wrap it in an exception of their own without an errno.
_DISK_FULL_MARKERS = (
    "No space left on device", "Disk quota exceeded", "os error 28", "os error 122", "StorageFull", "QuotaExceeded",
)  # fmt: skip


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full; retrying will not help."""


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, is ENOSPC or EDQUOT."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS):
            return True
        if any(marker in str(exc) for marker in _DISK_FULL_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: str | Path, exc: BaseException) -> DiskFullError:
    """The clear error for a write of ``path`` that ``exc`` (a disk-full failure) stopped."""
    code = next(
        (e.errno for e in (exc, exc.__cause__) if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS),
        errno.ENOSPC,
    )
    what = "the disk quota is exceeded" if code == errno.EDQUOT else "the disk is full"
    return DiskFullError(
        code, f"{path}: cannot write, {what} (nothing was left half-written); free some space and run again"
    )


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit, rename it over ``path``.

    The parent folder is created. On an exception the temporary file is removed and the target
    is left as it was; a full disk raises :class:`DiskFullError` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full_error(path, exc) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))
