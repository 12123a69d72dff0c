"""train.carry_optimizer: AdamW's moments and one learning-rate schedule carried across sDPO steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sdpo_core.carry import MOMENTS_DIR, chain_schedule, load_moments, read_moments
from sdpo_core.checkpoint import Checkpoints
from sdpo_core.config import DataConfig, ModelConfig, RunConfig, SourceConfig, TrainConfig
from sdpo_core.data import load_source, write_pairs
from sdpo_core.fingerprint import model_fingerprint, weights_sha256
from sdpo_core.hashing import sha256_files
from sdpo_core.model_io import load_model
from sdpo_core.records import ChunkInfo, TrainStepResult, TrainStepSpec
from sdpo_core.scores import save_scores, score_model
from sdpo_core.step import run_step
from sdpo_core.train import lr_lambda

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "stories260K"
MODEL = ModelConfig(name_or_path=str(MODEL_DIR))
DATA = DataConfig(sources=(SourceConfig(path="unused.jsonl"),), max_length=96, max_prompt_length=48)
# 8 pairs, global batch 4: two optimizer steps per sDPO step; a warmup over half of the chain's
# four, so step 2 would warm up again if its schedule restarted.
TRAIN = TrainConfig(device="cpu", micro_batch_size=4, learning_rate=1e-2, warmup_ratio=0.5, min_lr_ratio=0.1)
CHAIN = chain_schedule([2, 2])  # [(0, 4), (2, 4)]
# Two to four real train steps each (about 2 s on 2 cores): out of the fast unit tier.
TRAINS = pytest.mark.integration


def _cfg(carry: bool, **train: Any) -> RunConfig:
    return RunConfig(model=MODEL, data=DATA, train=TRAIN.model_copy(update={"carry_optimizer": carry, **train}))


@pytest.fixture(scope="module")
def chunk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    pairs, _ = load_source(
        SourceConfig(path=str(REPO / "data/orca_dpo_pairs_validation_msfoundry.jsonl"), name="orca", max_pairs=8)
    )
    path = tmp_path_factory.mktemp("chunk") / "chunk.jsonl"
    return path, write_pairs(pairs, path)


def _step(
    tmp: Path,
    chunk: tuple[Path, str],
    step: int,
    ref_dir: Path,
    carry: bool,
    schedule: tuple[int, int],
    name: str,
    train: dict[str, Any] | None = None,
    **run: Any,
) -> TrainStepResult:
    cfg = _cfg(carry, **(train or {}))
    path, digest = chunk
    ref = save_scores(score_model(cfg, str(ref_dir), path), tmp / f"{name}.ref.safetensors")
    spec = TrainStepSpec(
        config=cfg,
        chunk=ChunkInfo(step=step, label="orca", path=str(path), size=8, content_hash=digest),
        ref_uri=f"models:/m/{step - 1}",
        ref_scores=str(ref),
        ref_dir=str(ref_dir),
        out_dir=str(tmp / name),
        schedule_offset=schedule[0],
        schedule_total=schedule[1],
    )
    return run_step(spec, **run)


@pytest.fixture(scope="module")
def step1(tmp_path_factory: pytest.TempPathFactory, chunk) -> TrainStepResult:
    """M1 trained with carry_optimizer, the first slice of the chain's schedule."""
    return _step(tmp_path_factory.mktemp("step1"), chunk, 1, MODEL_DIR, True, CHAIN[0], "step-1")


def test_chain_schedule_offsets_are_the_steps_before() -> None:
    assert chain_schedule([3, 1, 2]) == [(0, 6), (3, 6), (4, 6)]
    assert chain_schedule([5]) == [(0, 5)]


@TRAINS
def test_step_two_starts_from_step_ones_moments(tmp_path: Path, chunk, step1: TrainStepResult) -> None:
    m1 = Path(step1.model_dir)
    saved = read_moments(m1)
    assert saved is not None, "a carried step saves its optimizer state beside its model"
    # The moments are not weights: the fingerprint is that of the model's own safetensors.
    assert model_fingerprint(m1) == weights_sha256(m1) == sha256_files([m1 / "model.safetensors"])

    # Loaded into a fresh AdamW: exactly step 1's moments (not zeros) and step count, this step's lr.
    model = load_model(MODEL, str(m1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    load_moments(model, optimizer, saved)
    name, param = next(iter(model.named_parameters()))
    state = optimizer.state[param]
    torch.testing.assert_close(state["exp_avg"], saved["state"][name]["exp_avg"], rtol=0, atol=0)
    assert state["exp_avg"].abs().max() > 0 and state["exp_avg_sq"].abs().max() > 0
    assert float(state["step"]) == 2.0
    assert optimizer.param_groups[0]["lr"] == 0.5

    carried = _step(tmp_path, chunk, 2, m1, True, CHAIN[1], "carried")
    fresh = _step(tmp_path, chunk, 2, m1, False, (0, 0), "fresh")
    # Through training: the carried step's AdamW counted on from step 1's two updates.
    after = read_moments(carried.model_dir)
    assert after is not None and float(after["state"][name]["step"]) == 4.0
    # Same start, same first forward; the updates differ from the first one on.
    assert carried.history[0]["loss"] == pytest.approx(fresh.history[0]["loss"], abs=1e-6)
    a = load_file(str(Path(carried.model_dir) / "model.safetensors"))
    b = load_file(str(Path(fresh.model_dir) / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4
    assert carried.history[1]["loss"] != pytest.approx(fresh.history[1]["loss"], abs=1e-7)


@TRAINS
def test_the_schedule_runs_once_over_the_chain(tmp_path: Path, chunk, step1: TrainStepResult) -> None:
    step2 = _step(tmp_path, chunk, 2, Path(step1.model_dir), True, CHAIN[1], "step-2")
    logged = [h["learning_rate"] for h in step1.history + step2.history]
    factor = lr_lambda(4, TRAIN.warmup_ratio, TRAIN.min_lr_ratio)
    assert logged == pytest.approx([TRAIN.learning_rate * factor(i) for i in range(4)], rel=1e-9)
    # Restarted (the default), step 2 would warm up again from the first factor.
    assert logged[2] != pytest.approx(TRAIN.learning_rate * factor(0), rel=1e-6)


@TRAINS
def test_without_carry_nothing_changes(tmp_path: Path, chunk) -> None:
    default = _step(tmp_path, chunk, 1, MODEL_DIR, False, (0, 0), "default")
    assert not (Path(default.model_dir) / MOMENTS_DIR).exists(), "no optimizer state saved by default"
    assert read_moments(default.model_dir) is None
    factor = lr_lambda(2, TRAIN.warmup_ratio, TRAIN.min_lr_ratio)
    assert [h["learning_rate"] for h in default.history] == pytest.approx(
        [TRAIN.learning_rate * factor(i) for i in range(2)]
    )
    # carry_optimizer with a step's own schedule and no moments trains byte-identical weights.
    own = _step(tmp_path, chunk, 1, MODEL_DIR, True, (0, 0), "own")
    same = (Path(default.model_dir) / "model.safetensors").read_bytes()
    assert (Path(own.model_dir) / "model.safetensors").read_bytes() == same


@TRAINS
def test_a_resumed_step_restores_its_checkpoint_not_the_carried_moments(
    tmp_path: Path, chunk, step1: TrainStepResult
) -> None:
    m1 = Path(step1.model_dir)
    checkpoints = Checkpoints(tmp_path / "checkpoints", every=1)

    def crash(step: int, metrics: dict[str, float]) -> None:
        if step == 2:  # after optimizer step 1's checkpoint, before step 2's
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _step(tmp_path, chunk, 2, m1, True, CHAIN[1], "resumed", callback=crash, checkpoints=checkpoints)
    resumed = _step(tmp_path, chunk, 2, m1, True, CHAIN[1], "resumed", checkpoints=checkpoints)
    whole = _step(tmp_path, chunk, 2, m1, True, CHAIN[1], "whole")
    assert resumed.resumed_from == 1
    # The checkpoint held 3 AdamW updates (2 carried + 1); loading M1's moments over it would leave 3.
    moments = read_moments(resumed.model_dir)
    assert moments is not None and {float(s["step"]) for s in moments["state"].values()} == {4.0}
    a = load_file(str(Path(resumed.model_dir) / "model.safetensors"))
    b = load_file(str(Path(whole.model_dir) / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@TRAINS
def test_carry_under_fsdp_matches_one_process(tmp_path: Path, chunk, step1: TrainStepResult) -> None:
    """Under torchrun with FSDP every process loads the same whole moments and keeps its shard
    (each needs the whole weights to load them, not only process 0)."""
    fsdp = {"num_processes": 2, "parallelism": "fsdp"}
    m1 = _step(tmp_path, chunk, 1, MODEL_DIR, True, CHAIN[0], "fsdp-1", fsdp)
    m2 = _step(tmp_path, chunk, 2, Path(m1.model_dir), True, CHAIN[1], "fsdp-2", fsdp)
    one = _step(tmp_path, chunk, 2, Path(step1.model_dir), True, CHAIN[1], "one-2")
    moments = read_moments(m2.model_dir)
    assert moments is not None and {float(s["step"]) for s in moments["state"].values()} == {4.0}
    assert [h["learning_rate"] for h in m1.history + m2.history] == pytest.approx(
        [h["learning_rate"] for h in step1.history + one.history], rel=1e-9
    )
    a = load_file(str(Path(m2.model_dir) / "model.safetensors"))
    b = load_file(str(Path(one.model_dir) / "model.safetensors"))
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diffs > 1e-5).float().mean() < 1e-2  # float tolerance, as tests/sdpo_core/test_distributed.py


def test_carry_with_lora_is_refused() -> None:
    from sdpo_core.config import ConfigError, from_dict

    data = {"data": {"sources": [{"path": "a.jsonl"}]}}
    with pytest.raises(ConfigError, match=r"train\.carry_optimizer: needs full fine-tuning"):
        from_dict(data | {"train": {"carry_optimizer": True, "lora": {"r": 4}}})
