"""Content ids of model folders: the sha256 of the weights, recorded in meta.json."""

from __future__ import annotations

import json
from pathlib import Path

from sdpo_core.files import atomic_write_text
from sdpo_core.hashing import sha256_files


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 of the folder's safetensors files, in name order."""
    return sha256_files(sorted(Path(model_dir).glob("*.safetensors")))


def model_fingerprint(model_dir: str | Path) -> str:
    """A model folder's content id: the one its meta.json records, else computed."""
    meta = Path(model_dir) / "meta.json"
    if meta.is_file():
        recorded = json.loads(meta.read_text()).get("weights_sha256")
        if recorded:
            return recorded
    return weights_sha256(model_dir)


def record_fingerprint(model_dir: str | Path) -> str:
    """Write the weights' sha256 into meta.json; returns it."""
    meta_path = Path(model_dir) / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta["weights_sha256"] = weights_sha256(model_dir)
    atomic_write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta["weights_sha256"]
