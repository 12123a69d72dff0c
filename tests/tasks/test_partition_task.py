"""The partition task on the tiny real model: the orders M0's scores give, partition.json, the
scores cache, and no scoring for the strategies that do not need M0.

The task's function runs directly (``.fn``) with the registry stubbed: M0 is the local model
folder, and the parent run's client only records what is logged to it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from prefect.logging import disable_run_logger

import tasks.scores
import tasks.tracking
from sdpo_core.config import DataConfig, ModelConfig, PartitionConfig, RunConfig, SourceConfig, TrainConfig
from sdpo_core.data import PreferencePair, load_source, read_pairs, tokenize_pairs, write_pairs
from sdpo_core.evaluate import gamma
from sdpo_core.logprobs import score_pairs
from sdpo_core.model_io import load_model, load_tokenizer, pad_id
from sdpo_core.partition import PARTITION_FILE
from sdpo_core.records import ChunkInfo, PreparedData
from sdpo_core.scores import load_scores
from tasks.context import RunContext
from tasks.data import partition
from tasks.scores import scores_path

REPO = Path(__file__).resolve().parents[2]
MODEL = str(REPO / "models" / "stories260K")
DATA = REPO / "data"
M0_URI = "models:/m/1"
# Pairs per source, chosen so that M0's (summed) reward accuracies differ: orca 0/4, mix 2/6, hh 2/5.
REAL_SOURCES = [
    ("orca", DATA / "orca_dpo_pairs_validation_msfoundry.jsonl", 4),
    ("mix", DATA / "llamafactory_dpo_en_demo.json", 6),
    ("hh", DATA / "hh-rlhf_helpful-base_test.jsonl.gz", 5),
]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the tiny model (as in tests/sdpo_core/conftest.py): more only
    oversubscribe a small machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real_pairs() -> list[PreferencePair]:
    """15 real pairs, sources in recipe order and rows in file order, as prepare_data writes them."""
    pairs: list[PreferencePair] = []
    for name, path, n in REAL_SOURCES:
        loaded, _ = load_source(SourceConfig(path=str(path), name=name, max_pairs=n))
        pairs.extend(loaded)
    return pairs


class TrackingStub:
    """Stands in for the MLflow client: records what is logged to which run."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, str]] = []

    def log_artifact(self, run_id: str, path: str) -> None:
        self.logged.append((run_id, path))


@pytest.fixture
def registry(monkeypatch) -> TrackingStub:
    """M0 at M0_URI is the local model folder; the tracking client is a stub."""
    stub = TrackingStub()

    def fetch_for(ctx: RunContext, uri: str) -> tuple[str, str]:
        assert uri == M0_URI, f"the task fetched {uri}, not the M0 it was given"
        return MODEL, "1"

    monkeypatch.setattr(tasks.tracking, "fetch_for", fetch_for)
    monkeypatch.setattr(tasks.tracking, "client", lambda uri: stub)
    return stub


def _run_cfg(**partition) -> RunConfig:
    # A RunConfig checks its values when built: it needs at least one source (the task reads the
    # prepared training file, not the sources).
    return RunConfig(
        model=ModelConfig(name_or_path=MODEL),
        data=DataConfig(sources=(SourceConfig(path="data/x.jsonl"),), max_length=96, max_prompt_length=48),
        partition=PartitionConfig(**partition),
        train=TrainConfig(device="cpu", eval_batch_size=16),
    )


def _context(root: Path) -> RunContext:
    return RunContext(
        root=str(root),
        run_dir=str(root / "run"),
        tracking_uri="unused",
        experiment_id="0",
        parent_run_id="p",
        model_name="m",
    )


def _m0_scores(cfg: RunConfig, pairs: list[PreferencePair]) -> dict[str, torch.Tensor]:
    """M0's scores, computed here with score_pairs directly (not through the task's cache)."""
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    tokenized = tokenize_pairs(pairs, tokenizer, cfg.data)
    return score_pairs(model, tokenized, pad_id(tokenizer), cfg.train.eval_batch_size)


def _task(
    cfg: RunConfig, pairs: list[PreferencePair], root: Path, registry: TrackingStub
) -> tuple[list[ChunkInfo], dict, RunContext]:
    """Run the partition task on a training file of ``pairs``; (chunk infos, partition.json, context).

    Checks that partition.json was logged, once, to the parent run.
    """
    ctx = _context(root)
    train_path = Path(ctx.run_dir) / "data" / "train.jsonl"
    digest = write_pairs(pairs, train_path)
    prepared = PreparedData(
        train_path=str(train_path),
        eval_path=str(Path(ctx.run_dir) / "data" / "eval.jsonl"),
        train_hash=digest,
        eval_hash="",
        counts={},
    )
    before = len(registry.logged)
    with disable_run_logger():
        infos = partition.fn(cfg, ctx, prepared, M0_URI)
    record_path = Path(ctx.run_dir) / "chunks" / PARTITION_FILE
    assert registry.logged[before:] == [("p", str(record_path))], "partition.json is logged to the parent run"
    assert all(isinstance(i, ChunkInfo) for i in infos)
    return infos, json.loads(record_path.read_text()), ctx


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("form", ["sum", "mean"])
def test_by_source_order_from_m0_on_the_real_model(real_pairs, tmp_path: Path, registry, form: str) -> None:
    cfg = _run_cfg(strategy="by_source", accuracy=form)
    g = gamma(_m0_scores(cfg, real_pairs), form)
    accuracy = {}
    for name, _, _ in REAL_SOURCES:
        mask = torch.tensor([p.source == name for p in real_pairs])
        accuracy[name] = float((g[mask] > 0).float().mean())
    assert len(set(accuracy.values())) == 3, f"the fixture needs distinct accuracies, got {accuracy}"
    expected = sorted(accuracy, key=lambda s: -accuracy[s])

    infos, record, _ = _task(cfg, real_pairs, tmp_path, registry)
    assert [i.label for i in infos] == expected
    assert [i.m0_accuracy for i in infos] == pytest.approx([accuracy[s] for s in expected])
    assert record["m0_accuracy"] == pytest.approx(accuracy)
    assert list(record["m0_accuracy"]) == [name for name, _, _ in REAL_SOURCES], "in recipe order"
    assert record["accuracy_form"] == form
    for info, chunk in zip(infos, record["chunks"], strict=True):
        assert chunk["pair_ids"] == [p.id for p in real_pairs if p.source == info.label]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("form", ["sum", "mean"])
def test_easy_to_hard_order_from_m0_on_the_real_model(real_pairs, tmp_path: Path, registry, form: str) -> None:
    cfg = _run_cfg(strategy="easy_to_hard", num_steps=3, accuracy=form)
    g = gamma(_m0_scores(cfg, real_pairs), form).tolist()
    expected = sorted(range(len(real_pairs)), key=lambda i: -g[i])
    ranked = [g[i] for i in expected]
    assert min(a - b for a, b in zip(ranked, ranked[1:], strict=False)) > 1e-3, "no near-ties to flip"

    infos, record, _ = _task(cfg, real_pairs, tmp_path, registry)
    assert [i.label for i in infos] == ["easy_to_hard-1", "easy_to_hard-2", "easy_to_hard-3"]
    assert [i.size for i in infos] == [5, 5, 5]
    ordered = [pid for chunk in record["chunks"] for pid in chunk["pair_ids"]]
    assert ordered == [real_pairs[i].id for i in expected]
    for info, t in zip(infos, range(3), strict=True):
        assert info.m0_accuracy == pytest.approx(sum(x > 0 for x in ranked[5 * t : 5 * t + 5]) / 5)


@pytest.mark.usefixtures("one_thread")
def test_partition_task_end_to_end(real_pairs, tmp_path: Path, registry, monkeypatch) -> None:
    """easy_to_hard with counts (6, 5) of 15 pairs: partition.json lists each chunk's pairs in
    order and the 4 unused ones; every training pair is in exactly one of them; step 1's M0
    scores are in the cache under the scores key, so scoring step 1's reference is a cache hit."""
    cfg = _run_cfg(strategy="easy_to_hard", sizes=(6.0, 5.0), seed=3)  # as the config holds them
    infos, record, ctx = _task(cfg, real_pairs, tmp_path, registry)

    assert [(i.step, i.label, i.size) for i in infos] == [(1, "easy_to_hard-1", 6), (2, "easy_to_hard-2", 5)]
    assert {k: record[k] for k in ("strategy", "seed", "num_steps", "sizes", "train_pairs", "unused_pairs")} == {
        "strategy": "easy_to_hard",
        "seed": 3,
        "num_steps": 2,
        "sizes": [6, 5],
        "train_pairs": 15,
        "unused_pairs": 4,
    }
    assert all(isinstance(n, int) for n in record["sizes"]), "counts are recorded as integers"
    assert set(record["m0_accuracy"]) == {"orca", "mix", "hh"}
    for info, chunk in zip(infos, record["chunks"], strict=True):
        on_disk = read_pairs(Path(info.path))
        assert Path(info.path).parent == Path(ctx.run_dir) / "chunks"
        assert chunk["pair_ids"] == [p.id for p in on_disk]
        assert (chunk["step"], chunk["label"], chunk["size"]) == (info.step, info.label, info.size)
        assert chunk["content_hash"] == info.content_hash == content_hash_of_file(Path(info.path))
        assert chunk["file"] == Path(info.path).name
    listed = [pid for chunk in record["chunks"] for pid in chunk["pair_ids"]] + record["unused_pair_ids"]
    assert sorted(listed) == sorted(p.id for p in real_pairs), "each training pair exactly once"

    # Step 1's reference log-probs: the scores cache finds them and scores nothing.
    step1 = infos[0]
    cached = scores_path(cfg, ctx, str(MODEL), step1.path)
    assert ctx.cache_dir == tmp_path / "cache" / "logps"
    assert cached.is_file()

    def no_scoring(*args, **kwargs):
        raise AssertionError("step 1's M0 scores should come from the cache")

    with monkeypatch.context() as m:
        m.setattr(tasks.scores, "score_model", no_scoring)
        m.setattr("sdpo_core.scores.score_pairs", no_scoring)
        assert tasks.scores.cached_scores(cfg, ctx, MODEL, step1.path) == (cached, False)
    direct = _m0_scores(cfg, read_pairs(Path(step1.path)))
    for k, v in load_scores(cached).items():
        torch.testing.assert_close(v, direct[k], atol=1e-4, rtol=1e-5)


def test_random_task_does_not_score(real_pairs, tmp_path: Path, registry, monkeypatch) -> None:
    """random and sequential do not need M0's scores: nothing is scored, nothing cached."""

    def no_scoring(*args, **kwargs):
        raise AssertionError("random and sequential do not need M0's scores")

    monkeypatch.setattr(tasks.scores, "cached_scores", no_scoring)
    monkeypatch.setattr(tasks.scores, "score_model", no_scoring)
    monkeypatch.setattr("sdpo_core.scores.score_pairs", no_scoring)
    for strategy in ("random", "sequential"):
        root = tmp_path / strategy
        infos, record, ctx = _task(_run_cfg(strategy=strategy, num_steps=3, seed=5), real_pairs, root, registry)
        assert [i.label for i in infos] == [f"{strategy}-{t}" for t in (1, 2, 3)]
        assert [i.m0_accuracy for i in infos] == [None, None, None]
        assert record["m0_accuracy"] is None and record["unused_pairs"] == 0
        assert not ctx.cache_dir.exists()
    sequential = [pid for chunk in record["chunks"] for pid in chunk["pair_ids"]]
    assert sequential == [p.id for p in real_pairs], "sequential: the training file's order"


def content_hash_of_file(path: Path) -> str:
    """write_pairs' hash: the first 16 hex digits of the sha256 of the file's text."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
