"""Reading rows from where users keep preference data.

:func:`iter_rows` yields ``(place, row)`` pairs, where ``place`` names the file and line (or the
row index) for error messages, from:

- JSON (one array of objects), JSON lines (``.jsonl``, ``.ndjson``, or ``.json`` holding one
  object per line), CSV and Parquet files; JSON, JSON lines and CSV may be gzip-compressed (``.gz``);
- a folder of such files (read in sorted order, subfolders included);
- a folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict and a split);
- a Hugging Face hub dataset id, with a config name and a split (``datasets.load_dataset``).

Reading is bounded, so that a broken or hostile file ends in one clear error rather than in
exhausted memory, a hang or a raw traceback: lines are read in pieces of at most
:data:`MAX_LINE_CHARS` (a longer line is a bad row, never held whole), a single-document JSON file
holds at most :data:`MAX_JSON_DOCUMENT_CHARS`, a gzip file decompresses to at most
:data:`GZIP_MAX_RATIO` times its size (see :func:`gzip_limit`), and rows nested too deeply or
holding numbers too long to convert are bad rows.
"""

from __future__ import annotations

import codecs
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

# Limits on what one file may cost to read. Each is far above any real preference data and exists
# so that a broken or hostile file fails in seconds, naming the file and line.
MAX_LINE_CHARS = 64 << 20
"""The longest line read (a JSON-lines row, a CSV line): 64 Mi characters. Pairs over
``dataset.MAX_PAIR_CHARS`` (2 M characters) are dropped anyway, but JSON escapes take up to 12
characters for one of text and rows carry other columns, so every line that can still give a pair
fits. A longer line is a bad row (skippable): it is read in pieces of this size and dropped, never
held whole, so a 1.5 GB line costs the memory of 64 Mi characters."""
MAX_JSON_DOCUMENT_CHARS = 1 << 30
"""The largest single-document JSON file (one array), which is parsed whole: 1 Gi characters,
a few GB of memory once parsed. Larger data belongs in JSON lines, which are read row by row."""
GZIP_MAX_RATIO = 200
"""A gzip file may decompress to this many times its size on disk (or :data:`GZIP_MIN_BYTES`).
Text preference data compresses 3 to 5 times (the shipped HH-RLHF file 4.3, JSON lines 3.7);
deflate's ceiling is about 1030, reached only by repetition: a gzip bomb, which would otherwise be
decompressed for minutes or hours."""
GZIP_MIN_BYTES = 64 << 20
"""The decompressed size every gzip file may reach whatever its ratio (small, repetitive files)."""


class SourceError(ValueError):
    """A source that cannot be read at all (missing, unreadable, unsupported)."""


class RowError(ValueError):
    """A row that cannot be parsed (invalid JSON, not an object); skippable."""

    def __init__(self, place: str, message: str) -> None:
        self.place = place
        super().__init__(f"{place}: {message}")


Row = tuple[str, Any]


class TooMuchData(SourceError):
    """A gzip file that decompresses to more than its limit (:func:`gzip_limit`)."""


def gzip_limit(compressed_bytes: int) -> int:
    """How many bytes a gzip file of ``compressed_bytes`` may decompress to."""
    return max(GZIP_MIN_BYTES, GZIP_MAX_RATIO * compressed_bytes)


class _Capped(io.RawIOBase):
    """A binary stream that raises TooMuchData once more than ``limit`` bytes were read from it."""

    def __init__(self, inner: io.BufferedIOBase, limit: int, path: Path) -> None:
        super().__init__()
        self._inner, self._limit, self._path, self._read = inner, limit, path, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._inner.readinto(buffer)
        self._read += n
        if self._read > self._limit:
            raise TooMuchData(
                f"{self._path}: decompresses to more than {self._limit} bytes, over {GZIP_MAX_RATIO} times "
                "its size on disk (a gzip bomb?); decompress it and read the plain file if it is real data"
            )
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


def _open_binary(path: Path) -> io.BufferedIOBase:
    """The file's bytes, decompressed (within :func:`gzip_limit`) when it is gzip."""
    if path.name.endswith(".gz"):
        inner = gzip.open(path, "rb")
        return io.BufferedReader(_Capped(inner, gzip_limit(path.stat().st_size), path))  # type: ignore[arg-type]
    return open(path, "rb")


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: a byte order mark (Excel's "CSV UTF-8", Notepad) is not part of the data.
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", newline="")


def _lines(fh: io.TextIOBase, path: Path) -> Iterator[tuple[int, str | None]]:
    """``(line number, line)`` of a text file, each read with at most MAX_LINE_CHARS characters
    in memory; a longer line is ``(number, None)``, its rest skipped in pieces when asked for the
    next line. A gzip file over its limit is a TooMuchData naming the line."""
    lineno = reading = 0
    try:
        while True:
            reading = lineno + 1
            line = fh.readline(MAX_LINE_CHARS + 1)
            if not line:
                return
            lineno += 1
            if len(line) <= MAX_LINE_CHARS or line.endswith(("\n", "\r")):
                yield lineno, line
                continue
            yield lineno, None
            reading = lineno  # the rest of the long line
            while (rest := fh.readline(MAX_LINE_CHARS)) and not rest.endswith(("\n", "\r")):
                pass
    except TooMuchData as exc:
        place = f"{path}, line {reading}"
        raise TooMuchData(str(exc).replace(f"{path}: ", f"{place}: ", 1)) from None


def _too_long(place: str) -> RowError:
    return RowError(place, f"a line longer than {MAX_LINE_CHARS} characters (the limit, sources.MAX_LINE_CHARS)")


def _json_reason(exc: BaseException) -> str:
    """Why ``json.loads`` failed, in a few words (the place is added by the caller)."""
    if isinstance(exc, json.JSONDecodeError):
        # (Some messages end in "at" and expect the position after them.)
        return f"not valid JSON: {exc.msg}" + (f" column {exc.colno}" if exc.msg.endswith(" at") else "")
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply (lists or objects inside each other)"
    # An integer over Python's digit limit (sys.get_int_max_str_digits), without the advice to
    # raise the limit that the message goes on with.
    return f"a JSON integer too long to read ({str(exc).split('; use sys.')[0]})"


def _loads(text: str) -> Any:
    """``json.loads``; every way it fails on hostile text is a ValueError with a short reason."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(_json_reason(exc)) from None


def _first_char(path: Path) -> str:
    """The first character that is not white space ("" for a blank file), read in blocks."""
    with _open_text(path) as fh:
        while block := fh.read(1 << 16):
            if stripped := block.lstrip():
                return stripped[0]
    return ""


def _iter_json(path: Path) -> Iterator[Row]:
    head = _first_char(path)
    if not head:
        raise SourceError(f"{path}: the file is empty")
    if head == "[":
        yield from _iter_json_document(path)
        return
    with _open_text(path) as fh:
        for lineno, line in _lines(fh, path):
            place = f"{path}, line {lineno}"
            if line is None:
                yield place, _too_long(place)
                continue
            if not line.strip():
                continue
            try:
                row = _loads(line)
            except ValueError as exc:
                yield place, RowError(place, str(exc))
                continue
            yield place, row


def _iter_json_document(path: Path) -> Iterator[Row]:
    """The items of a file holding one JSON array, parsed whole (within MAX_JSON_DOCUMENT_CHARS)."""
    too_big = f"{path}: a single JSON document over {MAX_JSON_DOCUMENT_CHARS} characters; write it as JSON lines"
    if not path.name.endswith(".gz") and path.stat().st_size > 4 * MAX_JSON_DOCUMENT_CHARS:
        raise SourceError(too_big)  # more bytes than even 4-byte characters would need
    with _open_text(path) as fh:
        text = fh.read(MAX_JSON_DOCUMENT_CHARS + 1)
    if len(text) > MAX_JSON_DOCUMENT_CHARS:
        raise SourceError(too_big)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"{path}: {_json_reason(exc)}") from None
    del text
    for i, item in enumerate(items):
        yield f"{path}, item {i}", item


def _cell(value: str) -> Any:
    """CSV cells are strings; a cell holding a JSON list or object (messages) is decoded."""
    text = value.strip()
    if text[:1] in "[{":
        try:
            return _loads(text)
        except ValueError:  # not JSON (or not JSON this reader takes): the text itself
            return value
    return value


def _csv_lines(fh: io.TextIOBase, path: Path) -> Iterator[str]:
    for lineno, line in _lines(fh, path):
        if line is None:
            raise SourceError(str(_too_long(f"{path}, line {lineno}")))
        yield line


def _iter_csv(path: Path) -> Iterator[Row]:
    with _open_text(path) as fh:
        reader = csv.DictReader(_csv_lines(fh, path))
        try:
            if reader.fieldnames is None:
                raise SourceError(f"{path}: the file is empty")
            yield from _csv_rows(reader, path)
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit() (131072 characters)
            # (DictReader.line_num is updated only after a row was read: the reader's is current.)
            raise SourceError(f"{path}, line {reader.reader.line_num}: not valid CSV: {exc}") from None


def _csv_rows(reader: csv.DictReader, path: Path) -> Iterator[Row]:
    assert reader.fieldnames is not None
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
    """Offset of the first byte that is not UTF-8 in a (possibly gzip) file, read in blocks (a gzip
    file within its limit)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with _open_binary(path) as fh:
            while block := fh.read(1 << 20):
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    return offset - pending + exc.start
                offset += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:  # the file ends inside a character
        return offset - len(exc.object) + exc.start
    except (OSError, EOFError, zlib.error, SourceError):
        return None
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
