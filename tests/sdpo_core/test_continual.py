"""The pure part of continual sDPO (sdpo_core.continual, sdpo_core.lineage): walking the chain,
which batches are new, overlap and held-out drops, the base guard, rollback plans, the lineage
table and plot."""

from __future__ import annotations

import pytest

from sdpo_core.continual import (
    BATCH_FILE,
    BATCH_SHA256,
    BatchFile,
    ChainError,
    ChainLink,
    check_same_base,
    new_pairs,
    parse_step,
    rollback_plan,
    unseen_batches,
    walk_chain,
)
from sdpo_core.lineage import format_lineage, lineage_plot, lineage_row
from sdpo_core.pairs import PreferencePair

M0_TAGS = {"sdpo.step": "0", "sdpo.weights_sha256": "w" * 64, "sdpo.tokenizer_sha256": "t" * 64}


def registry(**versions: dict[str, str]):
    """A lookup over {version: tags}, as tasks.continual.find_chain gives walk_chain."""
    return lambda v: (versions[f"v{v}"], f"run-{v}") if f"v{v}" in versions else None


def step(n: int, ref: str, **extra: str) -> dict[str, str]:
    return {"sdpo.step": str(n), "sdpo.reference_version": ref, **extra}


def test_walk_chain_follows_references_back_to_m0():
    lookup = registry(v1=M0_TAGS, v2=step(1, "1"), v5=step(2, "2"), v3=step(2, "2"), v6=step(3, "5"))
    chain = walk_chain("m", "6", lookup)
    assert [(link.step, link.version) for link in chain] == [(0, "1"), (1, "2"), (2, "5"), (3, "6")]
    assert chain[2].run_id == "run-5" and chain[3].reference_version == "5"


def test_walk_chain_refuses_foreign_and_broken_chains():
    with pytest.raises(ChainError, match="its final version was not registered by the sDPO pipeline"):
        walk_chain("m", "1", registry(v1={"owner": "someone"}))
    with pytest.raises(ChainError, match="version 1, reference of version 2,"):
        walk_chain("m", "2", registry(v1={}, v2=step(1, "1")))
    with pytest.raises(ChainError, match="which is step 2, not step 1"):
        walk_chain("m", "3", registry(v2=step(2, "1"), v3=step(2, "2")))
    with pytest.raises(ChainError, match="version 7 of the chain is not in the registry"):
        walk_chain("m", "2", registry(v2=step(1, "7")))
    with pytest.raises(ChainError, match="lacks the tag"):
        walk_chain("m", "2", registry(v1={"sdpo.step": "0"}, v2=step(1, "1")))


def test_check_same_base_names_what_differs():
    m0 = ChainLink(0, "1", {**M0_TAGS, "sdpo.source_model": "models/a"})
    check_same_base("m", m0, "w" * 64, "t" * 64, "models/a")  # the same: no error
    with pytest.raises(ChainError, match="its tokenizer or chat template differs") as exc:
        check_same_base("m", m0, "w" * 64, "x" * 64, "models/b")
    assert "weights" not in str(exc.value) and "'models/b'" in str(exc.value) and "M0 is version 1" in str(exc.value)
    with pytest.raises(ChainError, match="its weights differ and its tokenizer"):
        check_same_base("m", m0, "v" * 64, "x" * 64, "models/b")


def batch(name: str, sha: str) -> BatchFile:
    return BatchFile(name, f"/w/{name}", f"/w/{name}", sha)


def test_unseen_batches_are_those_no_step_recorded_in_name_order():
    chain = [ChainLink(0, "1", M0_TAGS), ChainLink(1, "2", {BATCH_FILE: "a.jsonl", BATCH_SHA256: "aaa"})]
    files = [batch("c.jsonl", "ccc"), batch("a.jsonl", "aaa"), batch("b.jsonl", "bbb")]
    assert [f.name for f in unseen_batches(files, chain)] == ["b.jsonl", "c.jsonl"]
    # A renamed copy of a trained file has the same bytes: not new.
    assert unseen_batches([batch("renamed.jsonl", "aaa")], chain) == []
    # An edited file (same name, other bytes) is read again.
    assert [f.sha256 for f in unseen_batches([batch("a.jsonl", "aa2")], chain)] == ["aa2"]


def pair(i: int, source: str = "batch", prompt: str = "") -> PreferencePair:
    return PreferencePair(prompt or f"prompt {i}", f"good {i}", f"bad {i}", source)


def test_new_pairs_drop_trained_and_held_out_pairs_and_count_them():
    trained = {pair(0, "orca").content_key, pair(1, "orca").content_key}  # trained under another source name
    evals = [pair(2, "heldout"), pair(99, "heldout", prompt="prompt 3")]  # pair 3 shares a held-out prompt
    got = new_pairs([pair(i) for i in range(6)], trained, evals)
    assert [p.chosen for p in got.pairs] == ["good 4", "good 5"]
    assert (got.overlap, got.in_eval) == (2, 2)
    nothing = new_pairs([pair(0), pair(1)], trained, evals)
    assert nothing.pairs == [] and nothing.overlap == 2


def test_rollback_plan():
    chain = [ChainLink(0, "1"), ChainLink(1, "2"), ChainLink(2, "4"), ChainLink(3, "7")]
    target, abandoned = rollback_plan("m", chain, 1)
    assert target.version == "2" and [a.version for a in abandoned] == ["4", "7"]
    for bad, message in ((3, "is step-3 already"), (5, "no step-5"), (0, "keeps at least step-1")):
        with pytest.raises(ChainError, match=message):
            rollback_plan("m", chain, bad)
    assert parse_step("step-2") == 2 and parse_step("4") == 4
    with pytest.raises(ValueError, match="not a step"):
        parse_step("final")


def test_lineage_rows_table_and_plot(tmp_path):
    links = [
        ChainLink(0, "1", {**M0_TAGS, "sdpo.source_model": "models/x", "sdpo.run": "r"}),
        ChainLink(
            1,
            "2",
            step(
                1,
                "1",
                **{
                    "sdpo.chunk.source": "orca",
                    "sdpo.chunk.size": "20",
                    "sdpo.chunk.content_hash": "h1",
                    "sdpo.eval/reward_accuracy_vs_m0": "0.75",
                    "sdpo.eval/gamma": "-3.5",
                    "sdpo.run": "r",
                },
            ),
        ),  # fmt: skip
        ChainLink(
            2,
            "5",
            step(
                2,
                "2",
                **{
                    BATCH_FILE: "day-2.jsonl",
                    BATCH_SHA256: "ab" * 32,
                    "sdpo.batch.pairs": "7",
                    "sdpo.batch.overlap_dropped": "3",
                    "sdpo.batch.eval_dropped": "1",
                    "sdpo.eval/reward_accuracy_vs_m0": "0.8",
                    "sdpo.eval/gamma": "1.25",
                    "sdpo.run": "r",
                },
            ),
        ),  # fmt: skip
    ]
    rows = [lineage_row(link) for link in links]
    assert {k: rows[1][k] for k in ("batch", "pairs", "hash", "reference")} == {
        "batch": "orca",
        "pairs": 20,
        "hash": "h1",
        "reference": "1",
    }
    assert rows[2]["batch"] == "day-2.jsonl" and rows[2]["pairs"] == 7 and rows[2]["dropped"] == "3/1"
    assert rows[2]["hash"] == "ab" * 8 and rows[2]["eval/reward_accuracy_vs_m0"] == 0.8
    table = format_lineage(rows).splitlines()
    assert table[0].split()[:3] == ["step", "version", "batch"]
    assert table[4].split()[:7] == ["2", "5", "day-2.jsonl", "7", "ab" * 8, "3/1", "2"]
    assert "0.800" in table[4] and "1.25" in table[4]
    png = lineage_plot(rows, tmp_path / "lineage.png", "chain")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["lineage.png"], "written atomically, no temporary left"
