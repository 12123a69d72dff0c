"""Reading rows from where users keep preference data.

:func:`iter_rows` yields ``(place, row)`` pairs, where ``place`` names the file and line (or the
row index) for error messages, from:

- JSON (one array of objects), JSON lines (``.jsonl``, ``.ndjson``, or ``.json`` holding one
  object per line), CSV and Parquet files; JSON, JSON lines and CSV may be gzip-compressed (``.gz``);
- a folder of such files (read in sorted order, subfolders included);
- a folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict and a split);
- a Hugging Face hub dataset id, with a config name and a split (``datasets.load_dataset``).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdpo_core.config import SourceConfig

SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet", ".json.gz", ".jsonl.gz", ".ndjson.gz", ".csv.gz")
# A missing path with one of these suffixes is a missing file, not a hub dataset id.
FILE_SUFFIXES = {
    ".json",
    ".jsonl",
    ".ndjson",
    ".csv",
    ".parquet",
    ".gz",
    ".txt",
    ".tsv",
    ".xlsx",
    ".xls",
    ".zip",
    ".arrow",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class SourceError(ValueError):
    """A source that cannot be read at all (missing, unreadable, unsupported)."""


class RowError(ValueError):
    """A row that cannot be parsed (invalid JSON, not an object); skippable."""

    def __init__(self, place: str, message: str) -> None:
        self.place = place
        super().__init__(f"{place}: {message}")


Row = tuple[str, Any]


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")  # type: ignore[return-value]
    # utf-8-sig: a byte order mark (Excel's "CSV UTF-8", Notepad) is not part of the data.
    return open(path, encoding="utf-8-sig", newline="")


def _iter_json(path: Path) -> Iterator[Row]:
    with _open_text(path) as fh:
        head = fh.read(1)
        while head and head.isspace():
            head = fh.read(1)
        if not head:
            raise SourceError(f"{path}: the file is empty")
        fh.seek(0)
        if head == "[":
            try:
                items = json.load(fh)
            except json.JSONDecodeError as exc:
                raise SourceError(
                    f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
                ) from None
            for i, item in enumerate(items):
                yield f"{path}, item {i}", item
            return
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{path}, line {lineno}", RowError(f"{path}, line {lineno}", f"not valid JSON: {exc.msg}")
                continue
            yield f"{path}, line {lineno}", row


def _cell(value: str) -> Any:
    """CSV cells are strings; a cell holding a JSON list or object (messages) is decoded."""
    text = value.strip()
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    return value


def _iter_csv(path: Path) -> Iterator[Row]:
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise SourceError(f"{path}: the file is empty")
        for row in reader:
            # DictReader counts physical lines: report the line the row ends on.
            place = f"{path}, line {reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                yield place, RowError(place, f"expected {len(reader.fieldnames)} columns")
                continue
            yield place, {k: _cell(v) for k, v in row.items()}


def _iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise SourceError(f"{path}: not a readable Parquet file: {exc}") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}, row {i}", row


def _iter_file(path: Path) -> Iterator[Row]:
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        yield from _iter_csv(path)
    elif name.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif name.endswith(tuple(s for s in SUFFIXES if ".json" in s)):
        yield from _iter_json(path)
    else:
        raise SourceError(f"{path}: unsupported file type (supported: {', '.join(SUFFIXES)})")


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _iter_dataset(ds: Any, label: str) -> Iterator[Row]:
    for i, row in enumerate(ds):
        yield f"{label}, row {i}", row


def _pick_split(ds: Any, source: SourceConfig, label: str) -> Any:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if source.split not in ds:
            raise SourceError(f"{label}: no split {source.split!r} (splits: {', '.join(ds)})")
        return ds[source.split]
    return ds


def iter_rows(source: SourceConfig) -> Iterator[Row]:
    """``(place, row)`` for every row of a source; a row that cannot be parsed is a RowError."""
    path = Path(source.path).expanduser()
    try:
        if path.is_file():
            yield from _iter_file(path)
        elif path.is_dir() and _is_saved_dataset(path):
            from datasets import load_from_disk

            yield from _iter_dataset(
                _pick_split(load_from_disk(str(path)), source, str(path)), f"{path} [{source.split}]"
            )
        elif path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.name.lower().endswith(SUFFIXES) and not _is_hidden(p, path)
            )
            if not files:
                raise SourceError(f"{path}: the folder holds no data files ({', '.join(SUFFIXES)})")
            for f in files:
                yield from _iter_file(f)
        elif HUB_ID.match(source.path) and Path(source.path).suffix.lower() not in FILE_SUFFIXES:
            yield from _iter_hub(source)
        else:
            raise SourceError(f"{path}: data file not found")
    except UnicodeDecodeError as exc:
        # The decoder's offset is within its current block: find the byte in the whole file.
        raise SourceError(f"{path}: not UTF-8 text ({exc.reason} at byte {_bad_utf8_offset(path)})") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise SourceError(f"{path}: broken gzip file: {exc}") from None
    except csv.Error as exc:
        raise SourceError(f"{path}: not valid CSV: {exc}") from None


def _bad_utf8_offset(path: Path) -> int | None:
    """Offset of the first byte that is not UTF-8 in a (possibly gzip) file."""
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return None


def _is_hidden(path: Path, root: Path) -> bool:
    """Hidden files and folders (.ipynb_checkpoints, macOS ._ files) are not data."""
    return any(part.startswith((".", "__")) for part in path.relative_to(root).parts)


def _iter_hub(source: SourceConfig) -> Iterator[Row]:
    """Rows of a hub dataset (``datasets.load_dataset``); honours HF_HUB_OFFLINE and HF_HOME."""
    from datasets import load_dataset

    label = f"hub dataset {source.path}" + (f" ({source.config_name})" if source.config_name else "")
    try:
        ds = load_dataset(source.path, source.config_name, split=source.split)
    except Exception as exc:  # network, missing dataset or split, offline mode: all end here
        raise SourceError(f"{label}: cannot load split {source.split!r}: {exc}") from None
    yield from _iter_dataset(ds, f"{label} [{source.split}]")
