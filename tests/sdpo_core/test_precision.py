"""Mixed precision (train.precision): fp32 master weights keep DPO's small updates; pure bf16
rounds them away; the reference is scored in the policy's precision so h starts at 0."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo_core.config import DataConfig, ModelConfig, RunConfig, SourceConfig, TrainConfig
from sdpo_core.data import load_source, write_pairs
from sdpo_core.precision import PRECISIONS, resolve_precision
from sdpo_core.records import ChunkInfo, TrainStepSpec
from sdpo_core.scores import save_scores, score_model
from sdpo_core.step import run_step

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "stories260K"


def test_auto_follows_model_dtype_and_the_device() -> None:
    def name(dtype: str, device: str, precision: str = "auto") -> str:
        return resolve_precision(TrainConfig(precision=precision), ModelConfig(dtype=dtype), device).name

    assert name("float32", "cpu") == "fp32"
    assert name("bfloat16", "cpu") == "bf16-mixed"
    assert name("float16", "cpu") == "fp16-mixed"
    assert name("float32", "cpu", "bf16-pure") == "bf16-pure"
    assert PRECISIONS["bf16-mixed"].master == torch.float32 and PRECISIONS["bf16-mixed"].compute == torch.bfloat16
    assert PRECISIONS["bf16-pure"].master == torch.bfloat16 and PRECISIONS["bf16-pure"].compute is None


def test_pure_bf16_with_a_small_learning_rate_warns() -> None:
    with pytest.warns(UserWarning, match="bf16-pure with learning rate 5e-07"):
        resolve_precision(TrainConfig(precision="bf16-pure", learning_rate=5e-7), ModelConfig(), "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_precision(TrainConfig(precision="bf16-mixed", learning_rate=5e-7), ModelConfig(), "cpu")


def _cfg(tmp_path: Path, model_dtype: str, precision: str, **train) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name_or_path=str(MODEL_DIR), dtype=model_dtype),
        data=DataConfig(sources=(SourceConfig(path="unused.jsonl"),), max_length=96, max_prompt_length=48),
        train=TrainConfig(precision=precision, device="cpu", micro_batch_size=8, warmup_ratio=0.0, **train),
    )


def _one_step(
    tmp_path: Path, cfg: RunConfig, ref_cfg: RunConfig | None = None, m0: Path = MODEL_DIR
) -> tuple[Path, dict]:
    """One optimizer step of the real train step on 8 real pairs from ``m0``; the reference scored
    by score_model under ``ref_cfg`` (default: the training config)."""
    pairs, _ = load_source(
        SourceConfig(path=str(REPO / "data/orca_dpo_pairs_validation_msfoundry.jsonl"), name="orca", max_pairs=8)
    )
    chunk_path = tmp_path / "chunk.jsonl"
    digest = write_pairs(pairs, chunk_path)
    ref_path = save_scores(score_model(ref_cfg or cfg, str(m0), chunk_path), tmp_path / "ref.safetensors")
    chunk = ChunkInfo(step=1, label="orca", path=str(chunk_path), size=len(pairs), content_hash=digest)
    spec = TrainStepSpec(
        config=cfg, chunk=chunk, ref_uri="models:/m/1", ref_scores=str(ref_path), ref_dir=str(m0),
        out_dir=str(tmp_path / "step-1"),
    )  # fmt: skip
    history: dict[int, dict] = {}
    result = run_step(spec, callback=lambda step, metrics: history.__setitem__(step, metrics))
    return Path(result.model_dir), history[1]


def _changed_share(model_dir: Path, m0_dir: Path) -> float:
    """Share of all weight elements that differ from M0's (compared in fp32)."""
    m0 = load_file(str(m0_dir / "model.safetensors"))
    step = load_file(str(model_dir / "model.safetensors"))
    changed = sum(int((step[k].float() != m0[k].float()).sum()) for k in m0)
    return changed / sum(v.numel() for v in m0.values())


def test_a_bf16_model_at_a_dpo_learning_rate_moves_almost_everywhere(tmp_path: Path) -> None:
    """A bf16 M0 (model.dtype=bfloat16; auto: bf16-mixed, fp32 master weights), one step at lr
    5e-7: the registered step model differs from M0 in most elements. Pure bf16 rounds the update
    away: few elements change."""
    from sdpo_core.model_io import load_model, load_tokenizer, save_model

    m0 = tmp_path / "m0-bf16"
    model_cfg = ModelConfig(name_or_path=str(MODEL_DIR), dtype="bfloat16")
    save_model(load_model(model_cfg), load_tokenizer(model_cfg), m0, {"step": 0})
    mixed_dir, _ = _one_step(tmp_path / "mixed", _cfg(tmp_path, "bfloat16", "auto", learning_rate=5e-7), m0=m0)
    assert load_file(str(mixed_dir / "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.float32
    mixed_share = _changed_share(mixed_dir, m0)
    with pytest.warns(UserWarning, match="round away"):
        pure_dir, _ = _one_step(tmp_path / "pure", _cfg(tmp_path, "bfloat16", "bf16-pure", learning_rate=5e-7), m0=m0)
    pure_share = _changed_share(pure_dir, m0)
    print(f"changed: bf16-mixed {mixed_share:.4f}, bf16-pure {pure_share:.4f}")
    assert mixed_share >= 0.5, mixed_share
    assert pure_share < 0.1, pure_share


def test_the_reference_scored_in_the_training_precision_starts_h_at_zero(tmp_path: Path) -> None:
    """abs_margin at the first update: the policy is the reference, so |h| is 0 when both are
    computed in one precision; a reference scored in fp32 for a bf16-mixed policy is not."""
    cfg = _cfg(tmp_path, "bfloat16", "auto")
    _, same = _one_step(tmp_path / "same", cfg)
    _, other = _one_step(tmp_path / "other", cfg, ref_cfg=_cfg(tmp_path, "float32", "fp32"))
    print(f"abs_margin at step 1: same precision {same['abs_margin']:.2e}, fp32 reference {other['abs_margin']:.2e}")
    assert same["abs_margin"] < 1e-3
    assert other["abs_margin"] > 10 * max(same["abs_margin"], 1e-4)


def test_fp16_mixed_trains_with_loss_scaling(tmp_path: Path) -> None:
    model_dir, metrics = _one_step(tmp_path, _cfg(tmp_path, "float32", "fp16-mixed"))
    weights = load_file(str(model_dir / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert weights["model.embed_tokens.weight"].dtype == torch.float32
    assert metrics["loss"] == pytest.approx(0.6931, abs=1e-2)  # h = 0 at the start: -log sigmoid(0)
