"""Loading and saving models: safetensors only, no remote code unless asked for."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from sdpo_core.config import ModelConfig
from sdpo_core.files import disk_full_error, is_disk_full

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelError(ValueError):
    """A model that cannot be loaded safely, naming the folder or id."""


def resolve_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_model_folder(path: Path) -> None:
    """Refuse a local model folder without safetensors weights (pickle weights can run code)."""
    if not path.is_dir():
        raise ModelError(f"{path}: model folder not found")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path / 'config.json'}: expected a JSON object")
    weights = sorted(path.glob("*.safetensors"))
    for file in weights:
        _check_safetensors_header(file)
    if weights:
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{path}: holds only pickle weights ({', '.join(pickles)}); sdpo loads safetensors only. "
            "Convert them with save_pretrained(..., safe_serialization=True) in an environment you trust."
        )
    raise ModelError(f"{path}: no *.safetensors weights found")


def _check_safetensors_header(file: Path) -> None:
    """Read a safetensors file's header (not its tensors): a corrupt one fails here, naming it,
    before anything is tracked, and not at the first load."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{file}: not a readable safetensors file ({exc})") from None


def _is_local(name_or_path: str) -> bool:
    """A path (it exists, or is written like one) rather than a hub id ``org/name``."""
    return (
        Path(name_or_path).expanduser().exists()
        or name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
    )


def check_model_source(cfg: ModelConfig) -> None:
    """Fail early, with the folder named, when a local model folder cannot be loaded safely."""
    if _is_local(cfg.name_or_path):
        check_model_folder(Path(cfg.name_or_path).expanduser())


def load_model(
    cfg: ModelConfig,
    name_or_path: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Any:
    """A causal LM from a local folder or hub id, with safetensors weights only, in ``dtype``
    (default ``model.dtype``; training and scoring pass the master weights' dtype)."""
    from transformers import AutoModelForCausalLM

    target = name_or_path or cfg.name_or_path
    if _is_local(target):
        check_model_folder(Path(target))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            target,
            use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code,
            dtype=dtype or getattr(torch, cfg.dtype),
            output_loading_info=True,
        )
    except (OSError, RuntimeError, ValueError) as exc:  # unreadable, or shapes that do not fit the config
        raise ModelError(f"{target}: cannot load the model: {str(exc)[:500]}") from None
    # Weights that do not match the config (another architecture's config.json over these
    # weights, say) would leave layers randomly initialised and train on noise: refuse.
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        listed = "; ".join(
            f"{k.replace('_', ' ')}: {len(v)} ({', '.join(map(str, list(v)[:3]))}, ...)" for k, v in problems.items()
        )
        raise ModelError(f"{target}: the weights do not match config.json ({listed})")
    return model.to(device)


def load_tokenizer(cfg: ModelConfig, name_or_path: str | None = None) -> Any:
    """The tokenizer of a local folder or hub id, with a pad id (EOS when it has none)."""
    from transformers import AutoTokenizer

    target = name_or_path or cfg.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(target, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{target}: cannot load the tokenizer: {exc}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    # Prompts and completions are tokenized whole, then truncated by our own rules
    # (sdpo_core.data.tokenize_pair); the tokenizer's length warning would be noise.
    tok.model_max_length = 1 << 30
    return tok


def pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id
    return pid if pid is not None else (tokenizer.eos_token_id or 0)


def save_model(model: Any, tokenizer: Any, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Save weights (safetensors), config, tokenizer and ``meta.json``; atomic via a temp folder.

    The folder is written under a unique temporary name beside ``out_dir`` (two processes saving
    at once do not mix their files) and renamed into place. A folder already there is moved
    aside first and removed only once the new one is in place, never deleted beforehand.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.partial")
    aside = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.old")
    try:
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        except Exception as exc:
            if is_disk_full(exc):  # a clear error, not retried (tasks.retries); the partial folder goes
                raise disk_full_error(out_dir, exc) from exc
            raise
        if out_dir.exists():
            out_dir.rename(aside)  # a folder cannot be renamed over a non-empty one
        try:
            tmp.rename(out_dir)
        except OSError:
            if aside.exists() and not out_dir.exists():
                aside.rename(out_dir)  # the old folder back in place
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    return out_dir
