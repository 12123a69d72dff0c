"""The gold-task builder (tools/make_gold_task.py) and the shipped data/gold/ it wrote."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from sdpo_core.config import SourceConfig
from sdpo_core.dataset import load_source
from sdpo_core.gold import gold_reward
from sdpo_core.hashing import sha256_file
from tools.make_gold_task import (
    OPENINGS,
    GoldTaskArgs,
    Pair,
    build_sources,
    candidate_pairs,
    main,
    parse_args,
    prompts_by_opening,
    select,
    split_prompts,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "data" / "gold"
SOURCES = ("gold-easy", "gold-hard")


def _read(source: Path, name: str):
    return load_source(SourceConfig(path=str(source), name=name, format="scored"))


def _prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


def test_prompts_are_distinct_disjoint_seeded_and_balanced() -> None:
    train, held_out = split_prompts(0, 200, 40)
    assert len(set(train)) == 200 and len(set(held_out)) == 40
    assert not set(train) & set(held_out)
    assert split_prompts(0, 200, 40) == (train, held_out)
    assert split_prompts(1, 200, 40) != (train, held_out)
    # The openings take turns: of 240 prompts, the opening with only 10 forms (one slot: the
    # animal) gives all 10, the other 19 openings 12 or 13 each.
    groups = [set(g) for g in prompts_by_opening()]
    assert len(groups) == len(OPENINGS) == 20
    used = [len(g & set(train + held_out)) for g in groups]
    assert [u for u, g in zip(used, groups, strict=True) if len(g) == 10] == [10]
    assert {u for u, g in zip(used, groups, strict=True) if len(g) > 10} == {12, 13}
    with pytest.raises(ValueError, match="distinct ones"):
        split_prompts(0, 10**6, 1)


def test_candidate_pairs_drop_ties_and_choose_the_higher_gold() -> None:
    texts = [["He was happy.", "He was sad.", "The end.", "Happy fun friends."]]
    pairs = candidate_pairs(["p"], texts)
    # gold: 1, -1, 0, 3: all six pairs differ.
    assert len(pairs) == 6
    assert all(p.score_chosen > p.score_rejected for p in pairs)
    assert all(p.score_chosen == gold_reward(p.chosen) and p.score_rejected == gold_reward(p.rejected) for p in pairs)
    assert candidate_pairs(["p"], [["happy", "fun", "The end."]]) == [
        Pair("p", "happy", "The end.", 1.0, 0.0),
        Pair("p", "fun", "The end.", 1.0, 0.0),
    ]  # "happy" against "fun" is a tie: dropped


def test_select_caps_per_prompt_and_in_all() -> None:
    pairs = [Pair(f"p{i % 3}", f"c{i}", "r", 1.0, 0.0) for i in range(12)]
    chosen = select(pairs, limit=5, per_prompt=2, seed="s")
    assert len(chosen) == 5
    assert max(Counter(p.prompt for p in chosen).values()) == 2
    assert select(pairs, limit=5, per_prompt=2, seed="s") == chosen
    assert len(select(pairs, limit=100, per_prompt=1, seed="s")) == 3


def test_sources_split_by_margin() -> None:
    args = GoldTaskArgs(pairs_per_source=100, max_pairs_per_prompt=10)
    texts = [["happy", "The end.", "happy fun", "sad sad"]]  # gold 1, 0, 2, -2
    sources, counts = build_sources(args, ["p"], texts)
    assert sorted(p.score_chosen - p.score_rejected for p in sources["gold-easy"]) == [2, 2, 3, 4]
    assert sorted(p.score_chosen - p.score_rejected for p in sources["gold-hard"]) == [1, 1]
    assert counts["candidate_pairs"] == 6 and counts["pairs"] == {"gold-easy": 4, "gold-hard": 2}
    with pytest.raises(ValueError, match="no pairs for gold-easy"):
        build_sources(args, ["p"], [["happy", "The end."]])


@pytest.mark.integration  # samples from the model twice: seconds
def test_tiny_build_is_deterministic_and_readable_by_the_pipeline(tmp_path: Path) -> None:
    argv = ["--train-prompts", "12", "--eval-prompts", "3", "--samples", "4", "--max-new-tokens", "24"]
    argv += ["--pairs-per-source", "8", "--seed", "3", "--model", str(REPO / "models" / "stories260K")]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b"), "--batch-size", "5"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["eval_prompts.jsonl", "gold-easy.jsonl", "gold-hard.jsonl", "manifest.json"]
    for name in names[:-1]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["counts"]["train_prompts"] == 12 and manifest["args"]["seed"] == 3
    assert "--seed 3" in manifest["command"]
    held_out = _prompts(tmp_path / "a" / "eval_prompts.jsonl")
    assert len(held_out) == 3
    for source in SOURCES:
        pairs, report = _read(tmp_path / "a" / f"{source}.jsonl", source)
        assert 0 < len(pairs) == report.rows <= 8 and not report.dropped
        assert not {p.prompt for p in pairs} & set(held_out)
        assert manifest["files_sha256"][f"{source}.jsonl"] == sha256_file(tmp_path / "a" / f"{source}.jsonl")


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--samples", "1"], ["--easy-margin", "1", "--hard-margin", "1"], ["--train-prompts", "0"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert not out.exists()


def test_shipped_task_matches_its_manifest_and_the_gold_reward() -> None:
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    for name, digest in manifest["files_sha256"].items():
        assert sha256_file(SHIPPED / name) == digest, f"{name} changed since it was built"
    assert manifest["args"] == {**GoldTaskArgs().__dict__}, "shipped with other arguments than the defaults"
    held_out = set(_prompts(SHIPPED / "eval_prompts.jsonl"))
    assert len(held_out) == manifest["args"]["eval_prompts"]
    rows = {s: [json.loads(line) for line in (SHIPPED / f"{s}.jsonl").read_text().splitlines()] for s in SOURCES}
    for source in SOURCES:
        pairs, report = _read(SHIPPED / f"{source}.jsonl", source)
        assert len(pairs) == report.rows == manifest["args"]["pairs_per_source"] and not report.dropped
        assert not {p.prompt for p in pairs} & held_out
        for row in rows[source]:
            # The labels are the reward as defined today: a changed lexicon needs rebuilt data.
            assert row["score_chosen"] == gold_reward(row["chosen"])
            assert row["score_rejected"] == gold_reward(row["rejected"])
    margins = {s: {r["score_chosen"] - r["score_rejected"] for r in rows[s]} for s in SOURCES}
    assert min(margins["gold-easy"]) >= 2 and margins["gold-hard"] == {1.0}
