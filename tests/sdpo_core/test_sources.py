"""Reading rows from where users keep preference data: every file type, folders, save_to_disk, the hub.

The fixtures are the small hand-written files in tests/data (see its README); Parquet files and
save_to_disk folders are written into tmp_path by the tests themselves.
"""

from __future__ import annotations

import gzip
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from sdpo_core.config import SourceConfig
from sdpo_core.data import DataError, load_source
from sdpo_core.sources import RowError, SourceError, iter_rows

DATA = Path(__file__).resolve().parents[1] / "data"


def _rows(path: Path | str, **kw: Any) -> list[tuple[str, Any]]:
    return list(iter_rows(SourceConfig(path=str(path), name="s", **kw)))


def _places(path: Path | str, **kw: Any) -> list[str]:
    return [place for place, _ in _rows(path, **kw)]


# ---------------------------------------------------------------------------------------------
# Every file type, with the place of each row


@pytest.mark.parametrize(
    ("name", "unit", "numbers"),
    [
        ("standard.jsonl", "line", [1, 2, 3, 4, 5, 6]),
        ("conversational.json", "item", [0, 1, 2]),
        ("implicit_hh.jsonl.gz", "line", [1, 2, 3]),
        ("implicit_messages.jsonl", "line", [1, 2, 3]),
        ("openai.jsonl", "line", [1, 2, 3]),
        ("sharegpt.json", "item", [0, 1, 2]),
        ("scored.jsonl", "line", [1, 2, 3, 4, 5]),
        ("custom_columns.jsonl", "line", [1, 2, 3]),
        # Header on line 1; the third row's quoted cell spans lines 4-5: a row is placed on the
        # line it ends on (sdpo_core.sources._iter_csv).
        ("pairs.csv", "line", [2, 3, 5, 6]),
        ("pairs.csv.gz", "line", [2, 3, 5, 6]),
    ],
)
def test_every_file_type_yields_objects_with_their_places(name: str, unit: str, numbers: list[int]) -> None:
    path = DATA / name
    rows = _rows(path)
    assert [place for place, _ in rows] == [f"{path}, {unit} {n}" for n in numbers]
    assert all(isinstance(row, dict) for _, row in rows)


def test_gzip_csv_reads_like_the_plain_file() -> None:
    """pairs.csv.gz is `gzip -n pairs.csv`: the same rows, with the .gz file's name in the places."""
    plain, zipped = _rows(DATA / "pairs.csv"), _rows(DATA / "pairs.csv.gz")
    assert [row for _, row in plain] == [row for _, row in zipped]
    assert zipped[0][0] == f"{DATA / 'pairs.csv.gz'}, line 2"


def test_gzip_jsonl_rows() -> None:
    (_, first), *_ = _rows(DATA / "implicit_hh.jsonl.gz")
    assert set(first) == {"chosen", "rejected"}
    assert first["chosen"].startswith("\n\nHuman: What are some good ways to save money on groceries?")


def test_csv_cells_json_decoded_quoted_and_multiline() -> None:
    rows = [row for _, row in _rows(DATA / "pairs.csv")]
    assert rows[0] == {
        "prompt": "What is the freezing point of water in Fahrenheit?",
        "chosen": "32 degrees Fahrenheit.",
        "rejected": "0 degrees Fahrenheit.",
    }
    # A cell holding a JSON list of messages is decoded.
    assert rows[1]["prompt"] == [
        {"role": "system", "content": "Reply in one word."},
        {"role": "user", "content": "What colour is a ripe banana?"},
    ]
    # Quoted cells keep their commas and line breaks.
    assert rows[2]["prompt"] == "Write a two-line poem, with a comma, about rain."
    assert rows[2]["chosen"] == "Soft rain on the roof,\na lullaby for the town."


def test_csv_cell_that_only_looks_like_json_stays_text(tmp_path: Path) -> None:
    path = tmp_path / "wiki.csv"
    path.write_text('prompt,chosen,rejected\n"[citation needed] Who?",{Me},[]\n', encoding="utf-8")
    ((place, row),) = _rows(path)
    assert place == f"{path}, line 2"
    assert row == {"prompt": "[citation needed] Who?", "chosen": "{Me}", "rejected": []}


def test_csv_row_with_missing_cells_is_a_row_error(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\nonly a prompt\nd,e,f\n", encoding="utf-8")
    rows = _rows(path)
    assert [place for place, _ in rows] == [f"{path}, line {n}" for n in (2, 3, 4)]
    bad = rows[1][1]
    assert isinstance(bad, RowError) and bad.place == f"{path}, line 3"
    assert "expected 3 columns" in str(bad)
    assert rows[2][1] == {"prompt": "d", "chosen": "e", "rejected": "f"}


def test_invalid_json_line_is_a_row_error_and_reading_goes_on() -> None:
    path = DATA / "dirty.jsonl"
    rows = _rows(path)
    # 12 lines, line 5 blank (skipped but counted).
    assert [place for place, _ in rows] == [f"{path}, line {n}" for n in (1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12)]
    errors = [(place, row) for place, row in rows if isinstance(row, RowError)]
    assert [place for place, _ in errors] == [f"{path}, line 7"]
    assert str(errors[0][1]).startswith(f"{path}, line 7: not valid JSON")
    assert rows[-1][1]["chosen"] == "Au."


def test_json_array_broken_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": oops}\n]\n', encoding="utf-8")
    with pytest.raises(SourceError, match=rf"{path}: not valid JSON \(line 3, column 14\)"):
        _rows(path)


def test_dot_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d", "chosen": "e", "rejected": "f"}\n'
    )
    assert _places(path) == [f"{path}, line 1", f"{path}, line 2"]


# ---------------------------------------------------------------------------------------------
# Parquet


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


PARQUET_ROWS = [
    {
        "prompt": [{"role": "user", "content": "What is the tallest mountain on Earth?"}],
        "chosen": [{"role": "assistant", "content": "Mount Everest."}],
        "rejected": [{"role": "assistant", "content": "Mont Blanc."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Be concise."},
            {"role": "user", "content": "Name a string instrument."},
        ],
        "chosen": [{"role": "assistant", "content": "The violin."}],
        "rejected": [{"role": "assistant", "content": "The trumpet."}],
    },
]


def test_parquet_rows_keep_nested_messages(tmp_path: Path) -> None:
    path = _write_parquet(tmp_path / "prefs.parquet", PARQUET_ROWS)
    rows = _rows(path)
    assert [place for place, _ in rows] == [f"{path}, row 0", f"{path}, row 1"]
    assert [row for _, row in rows] == PARQUET_ROWS


def test_broken_parquet_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(SourceError, match=rf"{path}: not a readable Parquet file"):
        _rows(path)


# ---------------------------------------------------------------------------------------------
# Folders


def test_folder_is_read_in_sorted_order_with_subfolders() -> None:
    """mixed/: 01_chat.jsonl, 02_nested/more.json, 03_sheet.csv; notes.txt is not a data file."""
    folder = DATA / "mixed"
    assert _places(folder) == [
        f"{folder / '01_chat.jsonl'}, line 1",
        f"{folder / '01_chat.jsonl'}, line 2",
        f"{folder / '02_nested' / 'more.json'}, item 0",
        f"{folder / '03_sheet.csv'}, line 2",
        f"{folder / '03_sheet.csv'}, line 3",
    ]


def test_folder_order_does_not_follow_creation_order(tmp_path: Path) -> None:
    for name in ("c.jsonl", "a/b.jsonl", "b.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps({"prompt": name, "chosen": "x", "rejected": "y"}) + "\n")
    assert [row["prompt"] for _, row in _rows(tmp_path)] == ["a/b.jsonl", "b.jsonl", "c.jsonl"]


def test_folder_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(SourceError, match=rf"{tmp_path}: the folder holds no data files"):
        _rows(tmp_path)


# ---------------------------------------------------------------------------------------------
# datasets' save_to_disk

TRAIN = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."} for i in range(3)]
TEST = [{"prompt": "Held-out question?", "chosen": "Right.", "rejected": "Wrong."}]


def test_save_to_disk_dataset(tmp_path: Path) -> None:
    from datasets import Dataset

    folder = tmp_path / "ds"
    Dataset.from_list(TRAIN).save_to_disk(str(folder))
    rows = _rows(folder)
    assert [place for place, _ in rows] == [f"{folder} [train], row {i}" for i in range(3)]
    assert [row for _, row in rows] == TRAIN


@pytest.fixture
def dataset_dict(tmp_path: Path) -> Path:
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(TRAIN), "test": Dataset.from_list(TEST)}).save_to_disk(str(folder))
    return folder


def test_save_to_disk_dataset_dict_split_selection(dataset_dict: Path) -> None:
    assert [row for _, row in _rows(dataset_dict)] == TRAIN
    rows = _rows(dataset_dict, split="test")
    assert rows == [(f"{dataset_dict} [test], row 0", TEST[0])]


def test_save_to_disk_missing_split(dataset_dict: Path) -> None:
    with pytest.raises(SourceError) as info:
        _rows(dataset_dict, split="validation")
    assert str(info.value) == f"{dataset_dict}: no split 'validation' (splits: train, test)"


# ---------------------------------------------------------------------------------------------
# Sources that cannot be read: each error names the source


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "prefs.jsonl"
    with pytest.raises(SourceError, match=rf"^{missing}: data file not found$"):
        _rows(missing)
    with pytest.raises(DataError, match=rf"^{missing}: data file not found$"):
        load_source(SourceConfig(path=str(missing), name="s"))


@pytest.mark.parametrize("name", ["prefs.txt", "prefs.xlsx", "prefs.tsv.gz"])
def test_unsupported_suffix(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("prompt\tchosen\trejected\n")
    with pytest.raises(SourceError, match=rf"{path}: unsupported file type \(supported: .*\.jsonl.*\.csv\.gz"):
        _rows(path)


@pytest.mark.parametrize(
    ("name", "content"), [("e.jsonl", ""), ("e.json", " \n\n "), ("e.csv", ""), ("e.jsonl.gz", "")]
)
def test_empty_file(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(content.encode()))
    else:
        path.write_text(content)
    with pytest.raises(SourceError, match=rf"^{path}: the file is empty$"):
        _rows(path)


def test_hub_id_offline_names_the_id_and_opens_no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/conftest.py sets HF_HUB_OFFLINE=1; a connection attempt would be recorded here."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    with pytest.raises(SourceError) as info:
        _rows("someone/helpful-prefs", split="test", config_name="en")
    msg = str(info.value)
    assert msg.startswith("hub dataset someone/helpful-prefs (en): cannot load split 'test'")
    assert attempts == []


def test_invalid_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "Café?", "chosen": "Oui.", "rejected": "Non."}\n'.encode("latin-1"))
    with pytest.raises(SourceError, match=rf"^{path}: not UTF-8 text \(invalid continuation byte at byte 15\)$"):
        _rows(path)


def test_invalid_utf8_late_in_a_large_file_names_the_right_byte(tmp_path: Path) -> None:
    line = json.dumps({"prompt": "x" * 80, "chosen": "y", "rejected": "z"}) + "\n"
    data = bytearray((line * 200).encode())
    assert len(data) > 10_000
    data[10_000] = 0xFF
    path = tmp_path / "big.jsonl"
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"at byte 10000\)"):
        _rows(path)


def _gzipped(rows: int = 200) -> bytes:
    text = "".join(json.dumps({"prompt": f"p{i} " * 40, "chosen": "c", "rejected": "r"}) + "\n" for i in range(rows))
    return gzip.compress(text.encode(), mtime=0)


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        ("not gzip", "Not a gzipped file"),
        ("truncated", "Compressed file ended before the end-of-stream marker was reached"),
        ("bad crc", "CRC check failed"),
    ],
)
def test_broken_gzip_is_a_clear_error(tmp_path: Path, damage: str, detail: str) -> None:
    data = bytearray(_gzipped())
    if damage == "not gzip":
        data = bytearray(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[-6] ^= 0xFF  # inside the CRC32 of the trailer
    path = tmp_path / "prefs.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=rf"^{path}: broken gzip file: {detail}"):
        _rows(path)


def test_corrupted_gzip_stream_is_a_clear_error(tmp_path: Path) -> None:
    data = bytearray(_gzipped())
    for i in range(40, 60):  # the middle of the deflate stream
        data[i] ^= 0xFF
    path = tmp_path / "prefs.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=rf"^{path}: broken gzip file"):
        _rows(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        pytest.param("excel.csv", "prompt,chosen,rejected\nHi?,Hello.,Go away.\n", id="csv"),
        pytest.param("notepad.jsonl", '{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}\n', id="jsonl"),
    ],
)
def test_utf8_byte_order_mark_is_ignored(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8-sig")
    ((_, row),) = _rows(path)
    assert row == {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
