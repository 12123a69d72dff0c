"""LoRA for a train step (``train.lora``), through peft.

At step t the policy is M(t-1) with a fresh adapter on the configured linear layers; only the
adapter trains. The reference log-probs were computed from M(t-1) beforehand, so no second model
is held in memory. After the step, ``registered_as: merged`` merges the adapter,
W' = W + (alpha / r) B A, and saves the full model; ``registered_as: adapter`` saves only the
adapter (peft's ``adapter_config.json`` and ``adapter_model.safetensors``) with its base recorded
in ``meta.json``: the base's registry URI and the sha256 of the files that version holds. Whatever
loads such a folder merges it into its base first (:func:`resolve_adapter`; the registry side,
which fetches the bases, is ``tasks.tracking.full_model_dir``: every registry download goes
through it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdpo_core.config import LoraConfig, ModelConfig
from sdpo_core.fingerprint import model_fingerprint, record_fingerprint, weights_sha256
from sdpo_core.model_io import ModelError, load_model, load_tokenizer, save_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_KEY = "adapter_base"
"""meta.json's record of an adapter's base: {"uri": models:/name/version, "weights_sha256": ...}."""
MERGED_KEY = "merged_from"
"""meta.json's record, in a merged folder, of the adapter it was made from."""


def with_adapter(model: Any, cfg: LoraConfig, seed: int = 0) -> Any:
    """``model`` with a fresh LoRA adapter (B = 0, so it computes what ``model`` did); only the
    adapter's parameters require gradients. ``cfg.r == 0`` returns ``model`` as it is.

    A is drawn from its own seeded generator state (``seed``), whatever the process's random
    state: every torchrun process, and a rerun, starts from the same adapter."""
    if cfg.r == 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(model, peft_cfg)
    except ValueError as exc:  # no module of the model matches target_modules
        from sdpo_core.train import TrainingError

        raise TrainingError(f"train.lora.target_modules {list(cfg.target_modules)}: {exc}") from None


def merged(model: Any) -> Any:
    """The plain model with its adapter merged into the weights (a model without one as it is)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def is_adapter(folder: str | Path) -> bool:
    """Whether a model folder holds a LoRA adapter (peft's files) rather than full weights."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def _meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return meta


def registered_sha256(folder: str | Path) -> str:
    """The content id of the files the registry holds for this folder's model: for a folder
    merged from an adapter, the adapter's; else the weights' (recorded in meta.json)."""
    made_from = _meta(Path(folder)).get(MERGED_KEY)
    return made_from["adapter_sha256"] if isinstance(made_from, dict) else model_fingerprint(folder)


@dataclass(frozen=True)
class AdapterBase:
    """The model an adapter was trained on."""

    uri: str
    """Its registry version, ``models:/<name>/<version>``."""
    weights_sha256: str
    """The sha256 of that version's files (:func:`registered_sha256`)."""


def base_record(base_uri: str, base_dir: str | Path) -> dict[str, str]:
    """What an adapter's meta.json records about the base it was trained on (``base_dir``, the
    local folder of ``base_uri``)."""
    return {"uri": base_uri, "weights_sha256": registered_sha256(base_dir)}


def adapter_base(folder: str | Path) -> AdapterBase:
    """The base an adapter folder records; a folder without a usable record, or whose adapter
    weights are not safetensors, is refused, naming it."""
    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ModelError(f"{folder}: a LoRA adapter without {ADAPTER_WEIGHTS} (sdpo loads safetensors only)")
    record = _meta(folder).get(BASE_KEY)
    if not (isinstance(record, dict) and isinstance(record.get("uri"), str) and record.get("weights_sha256")):
        raise ModelError(
            f"{folder / 'meta.json'}: a LoRA adapter must record its base ({BASE_KEY}: uri, weights_sha256)"
        )
    if not record["uri"].startswith("models:/") or "@" in record["uri"]:
        raise ModelError(f"{folder / 'meta.json'}: {BASE_KEY}.uri must be a registry version, got {record['uri']!r}")
    return AdapterBase(record["uri"], str(record["weights_sha256"]))


def save_adapter(model: Any, tokenizer: Any, out_dir: Path, meta: dict[str, Any], base: dict[str, str]) -> Path:
    """Save only the adapter of a peft model (safetensors), its tokenizer, and meta.json with its
    base (:func:`base_record`); atomic as :func:`sdpo_core.model_io.save_model`."""
    if not hasattr(model, "peft_config"):
        raise ValueError("registering an adapter needs a model with one (train.lora.r > 0)")
    return save_model(model, tokenizer, out_dir, meta | {BASE_KEY: base})


def merge_adapter(adapter_dir: str | Path, base_dir: str | Path, base_sha256: str, out_dir: str | Path) -> Path:
    """Merge an adapter into its base and save the full model (with meta.json) to ``out_dir``.

    Args:
        adapter_dir: the adapter's folder (:func:`save_adapter`).
        base_dir: a full model folder of its base (itself merged, when the base is an adapter).
        base_sha256: the sha256 of the files the registry holds for the base, computed by the
            caller from what it fetched; it must be the one the adapter records, or the adapter
            would be applied to weights it was not trained on.
        out_dir: where the merged model goes.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base = adapter_base(adapter_dir)
    if base_sha256 != base.weights_sha256:
        raise ModelError(
            f"{adapter_dir}: a LoRA adapter trained on {base.uri} with sha256 {base.weights_sha256[:16]}..., but "
            f"that version now holds {base_sha256[:16]}...: another model (a registry recreated, a version "
            "replaced); refusing to merge it into weights it was not trained on"
        )
    meta = _meta(adapter_dir)
    dtype_name = str(meta.get("dtype", "torch.float32")).removeprefix("torch.")
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise ModelError(f"{adapter_dir / 'meta.json'}: unknown dtype {meta.get('dtype')!r}")
    # Remote code is never run to merge: the registry's folders do not choose what executes.
    cfg = ModelConfig(name_or_path=str(base_dir))
    model = load_model(cfg, str(base_dir), "cpu", dtype)
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).merge_and_unload()
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(f"{adapter_dir}: cannot apply the LoRA adapter to {base.uri}: {str(exc)[:500]}") from None
    made_from = {"adapter_sha256": weights_sha256(adapter_dir), "base_uri": base.uri}
    meta = {k: v for k, v in meta.items() if k not in (BASE_KEY, "weights_sha256")} | {MERGED_KEY: made_from}
    saved = save_model(model, load_tokenizer(cfg, str(adapter_dir)), out_dir, meta)
    record_fingerprint(saved)
    return saved


def resolve_adapter(folder: Path, fetch_stored: Callable[[str], Path], merged_root: Path) -> Path:
    """A full model folder for ``folder``: the folder itself, or, for an adapter, its merge into
    the base it records, made once under ``merged_root`` (keyed by the adapter's and the base's
    content).

    The base comes from ``fetch_stored(uri)``, which returns a registry version's files as stored
    (raising ModelError when the registry lacks it); it must hold the files the adapter was
    trained on (their sha256, else ModelError), and is resolved the same way, so a chain of
    adapters (each step registered as one) ends at a full model.
    """
    if not is_adapter(folder):
        return folder
    base = adapter_base(folder)
    out = merged_root / f"{weights_sha256(folder)[:16]}-{base.weights_sha256[:16]}"
    if (out / "config.json").is_file():  # made before, after the base's files were checked
        return out
    stored = fetch_stored(base.uri)
    base_full = resolve_adapter(stored, fetch_stored, merged_root)
    return merge_adapter(folder, base_full, weights_sha256(stored), out)


def lineage_tags(folder: str | Path) -> dict[str, str]:
    """Registry tags of how a step model folder is stored: full weights, or an adapter with the
    base version it is merged into on load and the sha256 that base must hold."""
    if not is_adapter(folder):
        return {"sdpo.weights": "full"}
    base = adapter_base(folder)
    return {
        "sdpo.weights": "adapter",
        "sdpo.adapter_base": base.uri,
        "sdpo.adapter_base_version": base.uri.rsplit("/", 1)[-1],
        "sdpo.adapter_base_sha256": base.weights_sha256,
    }
