"""Loading models safely: weights that do not match their config, and corrupt files, are refused
with the folder or file named, before anything trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sdpo_core.config import ModelConfig
from sdpo_core.model_io import ModelError, check_model_folder, load_model

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "stories260K"


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(MODEL_DIR, folder, ignore=shutil.ignore_patterns("source"))
    return folder


def test_the_shipped_model_loads_with_every_weight() -> None:
    check_model_folder(MODEL_DIR)
    load_model(ModelConfig(name_or_path=str(MODEL_DIR)))


def test_a_config_of_another_architecture_over_these_weights_is_refused(tmp_path: Path) -> None:
    """A GPT-2 config.json over Llama weights would leave every layer randomly initialised."""
    folder = _copy(tmp_path)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "n_embd": 64,
                "n_layer": 2,
                "n_head": 8,
                "vocab_size": 512,
                "n_positions": 256,
            }
        )  # fmt: skip
    )
    with pytest.raises(ModelError, match=r"weights do not match config\.json \(missing keys: \d+"):
        load_model(ModelConfig(name_or_path=str(folder)))


def test_a_config_with_other_sizes_is_refused(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1  # one more layer than the weights hold
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"weights do not match config\.json \(missing keys"):
        load_model(ModelConfig(name_or_path=str(folder)))
    config["num_hidden_layers"] -= 1
    config["hidden_size"] *= 2  # shapes that do not fit
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="cannot load the model|do not match"):
        load_model(ModelConfig(name_or_path=str(folder)))


def test_a_corrupt_safetensors_header_fails_the_folder_check(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"{garbage"  # inside the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"model\.safetensors: not a readable safetensors file"):
        check_model_folder(folder)


def test_a_config_json_that_is_not_json_fails_the_folder_check(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config\.json: not valid JSON"):
        check_model_folder(folder)


def test_a_full_disk_while_saving_a_model_is_one_clear_error_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import errno

    from sdpo_core.files import DiskFullError
    from sdpo_core.model_io import load_tokenizer, save_model

    cfg = ModelConfig(name_or_path=str(REPO / "models" / "stories260K"))
    model, tokenizer = load_model(cfg), load_tokenizer(cfg)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokenizer, "save_pretrained", full)
    with pytest.raises(DiskFullError, match="step-1"):
        save_model(model, tokenizer, tmp_path / "step-1", {})
    assert list(tmp_path.iterdir()) == []  # no partial folder, no target


def test_the_cli_reports_a_full_disk_with_how_to_resume(monkeypatch, capsys) -> None:
    import flows.cli
    from sdpo_core.files import DiskFullError

    def full(args):
        raise DiskFullError(28, "the disk is full while writing /x/step-1")

    monkeypatch.setattr(flows.cli, "_run", full)
    assert flows.cli.main(["run", "--config", "recipes/default.yaml"]) == 1
    err = capsys.readouterr().err
    assert "disk is full" in err and "run the same command again" in err
