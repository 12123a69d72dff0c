"""Content ids: sha256 of bytes, of JSON-able data, of a file, of a set of files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BLOCK = 1 << 20


def sha256_bytes(data: bytes | str) -> str:
    """Hex sha256 of bytes (a string is hashed as UTF-8)."""
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def sha256_json(value: Any) -> str:
    """Hex sha256 of ``value`` as canonical JSON (sorted keys): equal data, equal id."""
    return sha256_bytes(json.dumps(value, sort_keys=True))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    return sha256_files([path])


def sha256_files(paths: Iterable[str | Path]) -> str:
    """Hex sha256 of the files' bytes, one after the other in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda handle=handle: handle.read(BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()
