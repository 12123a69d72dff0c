"""Content ids of model folders: the sha256 of the weights, recorded in meta.json."""

from __future__ import annotations

import hashlib
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


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
"""The files a Hugging Face tokenizer is read from (vocabulary, settings, chat template)."""


def tokenizer_sha256(model_dir: str | Path) -> str:
    """sha256 of the folder's tokenizer files that exist, each named in the hash: the same
    weights under another tokenizer or chat template tokenize, and so score, pairs differently."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            data = path.read_bytes()
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()
