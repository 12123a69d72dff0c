"""The hand check of a trained model against M0 by gold reward (tools/gold_eval.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdpo_core.experiment_config import read_gold_prompts as read_prompts
from tools.gold_eval import bootstrap_interval, main


def test_read_prompts_names_a_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert read_prompts(str(good)) == ["a", "b"]
    for text, message in (
        ('{"prompt": "a"}\nnot json\n', r"p\.jsonl, line 2: expected"),
        ('{"prompt": 3}\n', "line 1: expected"),
    ):
        good.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_prompts(str(good))
    good.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(str(good))


def test_bootstrap_interval_on_known_cases() -> None:
    assert bootstrap_interval([[1.0, 1.0], [1.0]], seed=0) == (1.0, 1.0)
    # Half the prompts won, half lost, 100 prompts: the mean's sd is 0.05, the interval about +-0.1.
    low, high = bootstrap_interval([[1.0]] * 50 + [[0.0]] * 50, seed=0)
    assert 0.38 < low < 0.42 and 0.58 < high < 0.62


def test_missing_prompts_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models/stories260K", "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err
