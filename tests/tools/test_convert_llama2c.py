"""Tests for the llama2.c -> Hugging Face converter and the shipped stories260K model."""

# HF_HUB_OFFLINE must be set before anything imports huggingface_hub.
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tools.convert_llama2c import convert_llama2c
from tools.llama2c_checkpoint import HEADER_BYTES, read_header, read_llama2c_arrays

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "stories260K"
SOURCE_BIN = SHIPPED / "source" / "stories260K.bin"
SOURCE_TOK = SHIPPED / "source" / "tok512.model"
KNOWN_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with"
)
NEW_TOKENS = 60  # the known text is about 50 tokens


def _greedy_from_bos(folder: Path, max_new_tokens: int = NEW_TOKENS) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[tokenizer.bos_token_id]])  # (1, 1)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_llama2c(SOURCE_BIN, SOURCE_TOK, tmp_path_factory.mktemp("stories260K"))


def test_fresh_conversion_reproduces_known_text(converted: Path) -> None:
    assert sorted(p.name for p in converted.iterdir()) == [
        "config.json",
        "conversion.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    text = _greedy_from_bos(converted)
    assert text.startswith(KNOWN_TEXT), text


def test_shipped_folder_equals_fresh_conversion(converted: Path) -> None:
    shipped, fresh = load_file(SHIPPED / "model.safetensors"), load_file(converted / "model.safetensors")
    assert shipped.keys() == fresh.keys()
    for name, tensor in fresh.items():
        assert shipped[name].dtype == torch.float32
        assert torch.equal(shipped[name], tensor), name

    def config(folder: Path) -> dict:
        data = json.loads((folder / "config.json").read_text())
        data.pop("transformers_version", None)
        return data

    assert config(SHIPPED) == config(converted)
    assert config(SHIPPED)["tie_word_embeddings"] is True
    record = json.loads((SHIPPED / "conversion.json").read_text())
    assert record["sources"] == json.loads((converted / "conversion.json").read_text())["sources"]
    assert record["sources"]["checkpoint"]["sha256"] == (
        "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"
    )
    assert _greedy_from_bos(SHIPPED).startswith(KNOWN_TEXT)


def test_shipped_tokenizer_needs_no_sentencepiece(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # any import of it now fails
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    assert tokenizer.chat_template is None
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    ids = tokenizer("Once upon a time")["input_ids"]
    assert ids[0] == 1 and 2 not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Once upon a time"
    # SentencePiece's normalisation: extra spaces dropped, digits split one by one.
    assert tokenizer("  Tom  had 12 ")["input_ids"] == tokenizer("Tom had 12")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("12")["input_ids"]) == ["<s>", "\u2581", "1", "2"]


def _llama2c_reference_logits(tokens: list[int]) -> np.ndarray:
    """Logits of llama2.c's own forward pass (interleaved RoPE from the file's tables), float64."""
    header, arrays = read_llama2c_arrays(SOURCE_BIN)
    a = {name: t.double().numpy() for name, t in arrays.items()}
    seq, hd = len(tokens), header.head_dim
    n_h, n_kv = header.n_heads, header.n_kv_heads
    cos, sin = a["freq_cis_real"][:seq, None, :], a["freq_cis_imag"][:seq, None, :]  # (T, 1, hd/2)

    def rmsnorm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w

    def rope(v: np.ndarray, heads: int) -> np.ndarray:
        pairs = v.reshape(seq, heads, hd // 2, 2)  # (T, heads, hd/2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return np.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).reshape(seq, heads, hd)

    x = a["token_embedding"][tokens]  # (T, dim)
    causal = np.triu(np.full((seq, seq), -np.inf), 1)  # (T, T)
    for i in range(header.n_layers):
        h = rmsnorm(x, a["rms_att"][i])
        q = rope(h @ a["wq"][i].T, n_h)  # (T, H, hd)
        k = np.repeat(rope(h @ a["wk"][i].T, n_kv), n_h // n_kv, axis=1)  # (T, H, hd)
        v = np.repeat((h @ a["wv"][i].T).reshape(seq, n_kv, hd), n_h // n_kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + causal  # (H, T, T)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", probs, v).reshape(seq, -1) @ a["wo"][i].T
        h = rmsnorm(x, a["rms_ffn"][i])
        gate = h @ a["w1"][i].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ a["w3"][i].T)) @ a["w2"][i].T
    return rmsnorm(x, a["rms_final"]) @ a["token_embedding"].T  # (T, vocab)


def test_logits_match_llama2c_forward() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED).eval()
    tokens = tokenizer("Once upon a time, there was a big dog named Max.")["input_ids"]
    with torch.no_grad():
        hf = model(torch.tensor([tokens])).logits[0].double().numpy()  # (T, vocab)
    np.testing.assert_allclose(hf, _llama2c_reference_logits(tokens), atol=1e-4, rtol=1e-4)


def test_truncated_checkpoint_raises_naming_file(tmp_path: Path) -> None:
    data = SOURCE_BIN.read_bytes()
    for size in (len(data) - 4, 20):
        truncated = tmp_path / f"truncated_{size}.bin"
        truncated.write_bytes(data[:size])
        with pytest.raises(ValueError, match=re.escape(str(truncated))):
            convert_llama2c(truncated, SOURCE_TOK, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        read_header(tmp_path / "missing.bin")
    versioned = tmp_path / "v1.bin"
    versioned.write_bytes(struct.pack("<Ii", 0x616B3432, 1) + bytes(248))  # llama2.c export v1
    with pytest.raises(ValueError, match="version 1"):
        read_header(versioned)
    not_spm = tmp_path / "bad.model"
    not_spm.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=re.escape(str(not_spm))):
        convert_llama2c(SOURCE_BIN, not_spm, tmp_path / "out")


def test_negative_vocab_size_means_separate_classifier(tmp_path: Path) -> None:
    header = read_header(SOURCE_BIN)
    data = SOURCE_BIN.read_bytes()
    vocab_dim = header.vocab_size * header.dim
    embedding = np.frombuffer(data, dtype="<f4", count=vocab_dim, offset=HEADER_BYTES)  # (vocab * dim,)
    wcls = (embedding * 2).astype("<f4")
    fields = list(struct.unpack("<7i", data[:HEADER_BYTES]))
    fields[5] = -fields[5]  # vocab_size < 0: the file ends with its own classifier
    untied = tmp_path / "untied.bin"
    untied.write_bytes(struct.pack("<7i", *fields) + data[HEADER_BYTES:] + wcls.tobytes())

    out = convert_llama2c(untied, SOURCE_TOK, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    weights = load_file(out / "model.safetensors")
    expected_cls = torch.from_numpy(wcls.reshape(header.vocab_size, header.dim))  # (vocab, dim)
    assert torch.equal(weights["lm_head.weight"], expected_cls)
    shipped_embedding = load_file(SHIPPED / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(weights["model.embed_tokens.weight"], shipped_embedding)
