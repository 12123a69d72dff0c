"""LoRA per step (train.lora): only the adapter trains, and the registered model is the merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo_core.config import DataConfig, LoraConfig, LossConfig, ModelConfig, RunConfig, SourceConfig, TrainConfig
from sdpo_core.data import load_source, tokenize_pairs, write_pairs
from sdpo_core.lora import merged, with_adapter
from sdpo_core.model_io import load_model, load_tokenizer, pad_id
from sdpo_core.records import ChunkInfo, TrainStepSpec
from sdpo_core.scores import save_scores, score_model
from sdpo_core.step import run_step
from sdpo_core.train import train_dpo

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "stories260K"
MODEL = ModelConfig(name_or_path=str(MODEL_DIR))
DATA = DataConfig(sources=(SourceConfig(path="unused.jsonl"),), max_length=96, max_prompt_length=48)
LORA = LoraConfig(r=4, alpha=8.0)


def _pairs():
    pairs, _ = load_source(
        SourceConfig(path=str(REPO / "data/orca_dpo_pairs_validation_msfoundry.jsonl"), name="orca", max_pairs=8)
    )
    return pairs


def test_only_the_adapter_trains_and_the_merge_is_base_plus_scaled_ba() -> None:
    tokenizer = load_tokenizer(MODEL)
    base = load_model(MODEL)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    policy = with_adapter(base, LORA)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    pairs = tokenize_pairs(_pairs(), tokenizer, DATA)
    ref = {"chosen": torch.zeros(len(pairs)) - 50.0, "rejected": torch.zeros(len(pairs)) - 50.0}
    cfg = TrainConfig(micro_batch_size=8, learning_rate=1e-2, warmup_ratio=0.0)
    train_dpo(policy, pairs, ref, pad_id(tokenizer), cfg, LossConfig(), "cpu")
    grads = {n: p.grad for n, p in policy.named_parameters() if not p.requires_grad}
    assert all(g is None for g in grads.values()), "no gradient reaches a frozen weight"

    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    assert b.abs().max() > 0, "the adapter trained (B starts at zero)"
    expected = before["model.layers.0.self_attn.q_proj.weight"] + (LORA.alpha / LORA.r) * (b @ a)
    plain = merged(policy)
    torch.testing.assert_close(plain.model.layers[0].self_attn.q_proj.weight.detach(), expected)
    state = plain.state_dict()
    assert not any("lora_" in k for k in state), "the merged model is a plain model"
    untouched = "model.layers.0.mlp.up_proj.weight"  # not a target module
    assert torch.equal(state[untouched], before[untouched])


def test_a_lora_step_saves_a_plain_model_that_differs_only_in_the_targets(tmp_path: Path) -> None:
    cfg = RunConfig(
        model=MODEL,
        data=DATA,
        train=TrainConfig(device="cpu", micro_batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, lora=LORA),
    )
    chunk_path = tmp_path / "chunk.jsonl"
    digest = write_pairs(_pairs(), chunk_path)
    ref = save_scores(score_model(cfg, str(MODEL_DIR), chunk_path), tmp_path / "ref.safetensors")
    spec = TrainStepSpec(
        config=cfg,
        chunk=ChunkInfo(step=1, label="orca", path=str(chunk_path), size=8, content_hash=digest),
        ref_uri="models:/m/1",
        ref_scores=str(ref),
        ref_dir=str(MODEL_DIR),
        out_dir=str(tmp_path / "step-1"),
    )
    result = run_step(spec)
    m0 = load_file(str(MODEL_DIR / "model.safetensors"))
    step = load_file(str(Path(result.model_dir) / "model.safetensors"))
    assert step.keys() == m0.keys(), "full weights, under the base model's names"
    changed = {k for k in m0 if not torch.equal(m0[k], step[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in LORA.target_modules for k in changed), changed
    load_model(MODEL, result.model_dir)  # the next step loads it as any model


def test_lora_settings_are_checked() -> None:
    from sdpo_core.config import ConfigError, from_dict

    data = {"data": {"sources": [{"path": "a.jsonl"}]}}
    with pytest.raises(ConfigError, match=r"train\.lora\.r: must be 0 \(off\) or more"):
        from_dict(data | {"train": {"lora": {"r": -1}}})
    with pytest.raises(ConfigError, match=r"LoRA under FSDP is not supported"):
        from_dict(data | {"train": {"lora": {"r": 4}, "parallelism": "fsdp", "num_processes": 2}})


def _adapter_step(tmp_path: Path, step: int, ref_uri: str, ref_dir: Path) -> Path:
    """One LoRA step from ``ref_dir`` registered as an adapter; returns its folder."""
    cfg = RunConfig(
        model=MODEL,
        data=DATA,
        train=TrainConfig(
            device="cpu", micro_batch_size=8, learning_rate=1e-2, warmup_ratio=0.0,
            lora=LORA.model_copy(update={"registered_as": "adapter"}),
        ),
    )  # fmt: skip
    chunk_path = tmp_path / f"chunk-{step}.jsonl"
    digest = write_pairs(_pairs(), chunk_path)
    ref = save_scores(score_model(cfg, str(ref_dir), chunk_path), tmp_path / f"ref-{step}.safetensors")
    spec = TrainStepSpec(
        config=cfg,
        chunk=ChunkInfo(step=step, label="orca", path=str(chunk_path), size=8, content_hash=digest),
        ref_uri=ref_uri,
        ref_scores=str(ref),
        ref_dir=str(ref_dir),
        out_dir=str(tmp_path / f"step-{step}"),
    )
    return Path(run_step(spec).model_dir)


def _delta(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """(alpha / r) B A of every adapted weight, under the base model's weight names."""
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            out[name] = (LORA.alpha / LORA.r) * (b @ a)
    return out


def test_adapter_steps_chain_and_load_merged_into_their_bases(tmp_path: Path) -> None:
    from sdpo_core.lora import lineage_tags, resolve_adapter

    step1 = _adapter_step(tmp_path, 1, "models:/m/1", MODEL_DIR)
    assert {p.name for p in step1.glob("*.safetensors")} == {"adapter_model.safetensors"}, "only the adapter"
    assert not list(step1.glob("*.bin")), "safetensors only"
    stored = {"models:/m/1": MODEL_DIR, "models:/m/2": step1}  # what a registry would hand back
    merged1 = resolve_adapter(step1, stored.__getitem__, tmp_path / "merged")
    step2 = _adapter_step(tmp_path, 2, "models:/m/2", merged1)  # step 2 trains from M1, merged
    tags = lineage_tags(step2)
    assert tags["sdpo.weights"] == "adapter" and tags["sdpo.adapter_base_version"] == "2"
    from sdpo_core.fingerprint import weights_sha256

    assert tags["sdpo.adapter_base_sha256"] == weights_sha256(step1), "the base's stored files: step 1's adapter"
    assert lineage_tags(MODEL_DIR) == {"sdpo.weights": "full"}

    # A fresh cache resolves the whole chain: M2 = M0 + (alpha/r) B1 A1 + (alpha/r) B2 A2.
    merged2 = resolve_adapter(step2, stored.__getitem__, tmp_path / "fresh")
    m0 = load_file(str(MODEL_DIR / "model.safetensors"))
    got = load_file(str(merged2 / "model.safetensors"))
    d1, d2 = _delta(step1), _delta(step2)
    assert d1.keys() == d2.keys() and d1 and all(k in m0 for k in d1)
    for key, value in m0.items():
        expected = value + d1[key] + d2[key] if key in d1 else value
        torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-6, msg=key)
    assert any(d2[k].abs().max() > 0 for k in d2), "step 2's adapter trained"
    load_model(MODEL, str(merged2))  # a plain model folder


def test_an_adapter_is_refused_without_its_base_or_over_other_weights(tmp_path: Path) -> None:
    from sdpo_core.lora import resolve_adapter
    from sdpo_core.model_io import ModelError, save_model

    step1 = _adapter_step(tmp_path, 1, "models:/m/1", MODEL_DIR)

    def missing(uri: str) -> Path:
        raise ModelError(f"{uri}: not in the registry")

    with pytest.raises(ModelError, match=r"models:/m/1: not in the registry"):
        resolve_adapter(step1, missing, tmp_path / "merged")
    other = load_model(MODEL)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    other_dir = save_model(other, load_tokenizer(MODEL), tmp_path / "other", {})
    with pytest.raises(ModelError, match=r"trained on models:/m/1 with sha256 .* now holds"):
        resolve_adapter(step1, {"models:/m/1": other_dir}.__getitem__, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir()), "nothing half-made"
