"""The one atomic write helper and the one hashing helper."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from sdpo_core.files import DiskFullError, atomic_path, atomic_write_bytes, atomic_write_text, is_disk_full
from sdpo_core.hashing import sha256_bytes, sha256_file, sha256_files, sha256_json


def test_write_creates_the_folder_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    assert atomic_write_text(target, "héllo\n") == target
    assert target.read_bytes() == "héllo\n".encode()
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_target_untouched_when_the_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk gone"), atomic_path(target) as tmp:
        tmp.write_text("half of the ne")
        raise RuntimeError("disk gone")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # the temporary file is removed


def test_no_target_when_the_first_write_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError), atomic_path(tmp_path / "new.txt") as tmp:
        tmp.write_text("x")
        raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_never_leave_a_partial_file(tmp_path: Path) -> None:
    """Threads write whole, distinct payloads to one file while a reader keeps reading it: every
    read is one whole payload, and the end state is one of them with no temporary file left."""
    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * (256 << 10) for i in range(8)]  # 256 KiB each: a write takes a while
    atomic_write_bytes(target, payloads[0])
    start = threading.Barrier(len(payloads) + 1)
    seen: set[bytes] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(data: bytes) -> None:
        start.wait()
        try:
            for _ in range(20):
                atomic_write_bytes(target, data)
        except BaseException as exc:  # a thread's exception would otherwise only be printed
            errors.append(exc)

    def read() -> None:
        start.wait()
        while not stop.is_set():
            seen.add(target.read_bytes())

    writers = [threading.Thread(target=write, args=(p,)) for p in payloads]
    reader = threading.Thread(target=read)
    for t in [*writers, reader]:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert errors == [], "writers got in each other's way"
    assert seen <= set(payloads), "a reader saw a partial or mixed file"
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


def test_sha256_files_is_hashlib_over_the_concatenation(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"first" * 300_000)  # over one 1 MiB read block
    b.write_bytes(b"second")
    expected = hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()
    assert sha256_files([a, b]) == expected
    assert sha256_files([b, a]) != expected  # the order given is the order hashed
    assert sha256_file(a) == hashlib.sha256(a.read_bytes()).hexdigest() == sha256_files([a])
    assert sha256_files([]) == hashlib.sha256(b"").hexdigest()


def test_sha256_bytes_and_json() -> None:
    assert sha256_bytes(b"abc") == sha256_bytes("abc") == hashlib.sha256(b"abc").hexdigest()
    one = {"b": 1, "a": {"y": [1, 2], "x": None}}
    other = {"a": {"x": None, "y": [1, 2]}, "b": 1}
    assert sha256_json(one) == sha256_json(other)
    assert sha256_json(one) == hashlib.sha256(json.dumps(one, sort_keys=True).encode()).hexdigest()
    assert sha256_json({"a": [1, 2]}) != sha256_json({"a": [2, 1]})  # lists keep their order


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "quota")])
def test_a_full_disk_is_a_clear_error_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    """The write fails half-way with ENOSPC (EDQUOT): the half-written temporary file is removed,
    the old file stays, and the error names the target and says the disk is full."""
    target = tmp_path / "runs" / "x" / "partition.json"
    target.parent.mkdir(parents=True)
    target.write_text("old")

    def fill_then_fail(self: Path, data: bytes) -> int:
        with open(self, "wb") as fh:
            fh.write(data[:3])  # a partial file, as a disk filling mid-write leaves one
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_bytes", fill_then_fail)
    with pytest.raises(DiskFullError) as caught:
        atomic_write_text(target, "the new, longer content")
    assert str(target) in str(caught.value) and words in str(caught.value)
    assert caught.value.errno == code and is_disk_full(caught.value)
    assert sorted(p.name for p in target.parent.iterdir()) == ["partition.json"]
    assert target.read_text() == "old"


def test_disk_full_is_found_however_a_library_wraps_it() -> None:
    """safetensors (Rust) words ENOSPC in its own exception, without an errno."""
    assert is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"))
    assert is_disk_full(RuntimeError("I/O error: Disk quota exceeded (os error 122)"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad value"))
