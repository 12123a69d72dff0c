"""Convert a llama2.c checkpoint (legacy "version 0" format) to a Hugging Face Llama.

Andrej Karpathy's llama2.c writes its models as one flat binary file:

* A header of seven little-endian ``int32``: ``dim``, ``hidden_dim``, ``n_layers``,
  ``n_heads``, ``n_kv_heads``, ``vocab_size``, ``seq_len``. A positive ``vocab_size``
  means the output layer shares the token embedding; a negative one means a separate
  classifier matrix is stored at the end of the file (its absolute value is the
  vocabulary size).
* Then little-endian ``float32`` arrays, with ``head_dim = dim / n_heads`` and
  ``kv_dim = n_kv_heads * head_dim``, in this order::

      token_embedding  (vocab, dim)
      rms_att          (n_layers, dim)
      wq               (n_layers, dim, dim)
      wk               (n_layers, kv_dim, dim)
      wv               (n_layers, kv_dim, dim)
      wo               (n_layers, dim, dim)
      rms_ffn          (n_layers, dim)
      w1               (n_layers, hidden_dim, dim)    # gate_proj
      w2               (n_layers, dim, hidden_dim)    # down_proj
      w3               (n_layers, hidden_dim, dim)    # up_proj
      rms_final        (dim,)
      freq_cis_real    (seq_len, head_dim / 2)        # RoPE tables, recomputed by HF
      freq_cis_imag    (seq_len, head_dim / 2)
      wcls             (vocab, dim)                   # only when vocab_size < 0

  Every linear weight is stored as ``(out_features, in_features)``, which is the
  layout of ``torch.nn.Linear.weight``, so no transposes are needed.

llama2.c applies rotary embeddings to interleaved pairs of a head's channels
``(0, 1), (2, 3), ...`` while Hugging Face's Llama rotates the two halves
``(i, i + head_dim / 2)``. The rows of ``wq`` and ``wk`` are therefore permuted per
head (see :func:`permute_rotary_rows`); all other weights map one to one.

The newer llama2.c export formats (version 1 and 2, starting with the magic
``"ak42"``) are not handled and are rejected with a clear error.

The SentencePiece tokenizer (``.model``) is converted to a ``tokenizers`` fast
tokenizer that reproduces SentencePiece's normalisation (dummy prefix, removal of
extra spaces, digit splitting, byte fallback), is checked against SentencePiece on
sample sentences, and is saved as ``tokenizer.json`` so that loading it at run time
needs neither ``sentencepiece`` nor network access.

Usage::

    python -m sdpo_core.convert_llama2c stories260K.bin tok512.model models/stories260K
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdpo_core.hashing import sha256_file

HEADER_FORMAT = "<7i"
HEADER_BYTES = struct.calcsize(HEADER_FORMAT)  # 28
FLOAT_BYTES = 4
# First four bytes of llama2.c's versioned export formats ("ak42" as a little-endian uint32).
VERSIONED_MAGIC = 0x616B3432

RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_PIECES = ("<unk>", "<s>", "</s>")

# Sentences the converted tokenizer must encode exactly like SentencePiece.
TOKENIZER_CHECK_SENTENCES = (
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside in the park.",
    'Tom said, "I have 123 red balls!"',
    "  Two  spaces, a tab\tand a\nnew line.  ",
    "Caf\u00e9 \u4f60\u597d \U0001f642",
    "",
)

WEIGHTS_FILE = "model.safetensors"
CONVERSION_FILE = "conversion.json"


@dataclass(frozen=True)
class Llama2cHeader:
    """The header of a legacy llama2.c checkpoint.

    Attributes:
        dim: Model (residual stream) width.
        hidden_dim: Feed-forward inner width.
        n_layers: Number of transformer blocks.
        n_heads: Number of query heads.
        n_kv_heads: Number of key/value heads (grouped-query attention).
        vocab_size: Vocabulary size (always positive here).
        seq_len: Maximum sequence length the model was trained with.
        shared_classifier: Whether the output layer reuses the token embedding.
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Total width of the key (or value) projection."""
        return self.n_kv_heads * self.head_dim

    def array_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the float32 arrays, in file order.

        Returns:
            ``(name, shape)`` pairs, the RoPE tables and the optional classifier included.
        """
        L, d, h, kv = self.n_layers, self.dim, self.hidden_dim, self.kv_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("token_embedding", (self.vocab_size, d)),
            ("rms_att", (L, d)),
            ("wq", (L, d, d)),
            ("wk", (L, kv, d)),
            ("wv", (L, kv, d)),
            ("wo", (L, d, d)),
            ("rms_ffn", (L, d)),
            ("w1", (L, h, d)),
            ("w2", (L, d, h)),
            ("w3", (L, h, d)),
            ("rms_final", (d,)),
            ("freq_cis_real", (self.seq_len, self.head_dim // 2)),
            ("freq_cis_imag", (self.seq_len, self.head_dim // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (self.vocab_size, d)))
        return shapes

    def expected_file_size(self) -> int:
        """Size in bytes a checkpoint with this header must have."""
        n_floats = sum(int(np.prod(shape)) for _, shape in self.array_shapes())
        return HEADER_BYTES + FLOAT_BYTES * n_floats


def _require_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    return path


def read_header(checkpoint: Path) -> Llama2cHeader:
    """Read and validate the header of a legacy llama2.c checkpoint.

    Args:
        checkpoint: Path to the ``.bin`` file.

    Returns:
        The parsed header.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The header is malformed or describes a different file size.
    """
    checkpoint = _require_file(checkpoint, "llama2.c checkpoint")
    size = checkpoint.stat().st_size
    with open(checkpoint, "rb") as handle:
        raw = handle.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ValueError(
            f"{checkpoint}: too short for a llama2.c checkpoint ({size} bytes, header needs {HEADER_BYTES})"
        )
    if struct.unpack("<I", raw[:4])[0] == VERSIONED_MAGIC:
        version = struct.unpack("<i", raw[4:8])[0]
        raise ValueError(
            f"{checkpoint}: llama2.c export version {version} (magic 'ak42'); "
            "only the legacy version 0 format is supported"
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = struct.unpack(HEADER_FORMAT, raw)
    fields = {
        "dim": dim,
        "hidden_dim": hidden_dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "|vocab_size|": abs(vocab_size),
        "seq_len": seq_len,
    }
    bad = [f"{name}={value}" for name, value in fields.items() if value <= 0]
    if bad:
        raise ValueError(f"{checkpoint}: invalid llama2.c header, non-positive {', '.join(bad)}")
    if dim % n_heads or (dim // n_heads) % 2:
        raise ValueError(
            f"{checkpoint}: invalid llama2.c header, dim={dim} is not n_heads={n_heads} times an even head size"
        )
    if n_heads % n_kv_heads:
        raise ValueError(
            f"{checkpoint}: invalid llama2.c header, n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}"
        )
    header = Llama2cHeader(
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=abs(vocab_size),
        seq_len=seq_len,
        shared_classifier=vocab_size > 0,
    )
    expected = header.expected_file_size()
    if size != expected:
        raise ValueError(
            f"{checkpoint}: file size {size} bytes does not match its llama2.c header "
            f"(expected {expected} bytes for {header}); truncated, or not a legacy llama2.c checkpoint"
        )
    return header


def permute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a query/key projection from interleaved to half-split RoPE.

    Within each head, llama2.c rotates channel pairs ``(2i, 2i + 1)``; Hugging Face
    rotates ``(i, i + head_dim / 2)``. Row ``2i + j`` of a head moves to ``j * head_dim / 2 + i``.

    Args:
        weight: ``(n_heads * head_dim, in_features)`` projection weight.
        n_heads: Number of heads the rows are split into.

    Returns:
        The permuted weight, same shape, contiguous.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (
        weight.view(n_heads, head_dim // 2, 2, in_features)  # (heads, pair i, member j, in)
        .transpose(1, 2)  # (heads, j, i, in)
        .reshape(out_features, in_features)
        .contiguous()
    )


def read_llama2c_arrays(checkpoint: Path) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Read every float32 array of a legacy llama2.c checkpoint.

    Args:
        checkpoint: Path to the ``.bin`` file.

    Returns:
        The header and a dict from llama2.c array name to a float32 tensor shaped as
        listed by :meth:`Llama2cHeader.array_shapes`.
    """
    header = read_header(checkpoint)
    flat = np.fromfile(checkpoint, dtype="<f4", offset=HEADER_BYTES)  # (n_floats,)
    arrays: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in header.array_shapes():
        count = int(np.prod(shape))
        chunk = flat[offset : offset + count].astype(np.float32).reshape(shape)
        arrays[name] = torch.from_numpy(chunk.copy())
        offset += count
    if offset != flat.size:  # guarded by read_header's size check
        raise ValueError(f"{checkpoint}: {flat.size - offset} unexpected trailing floats")
    return header, arrays


def llama2c_to_hf_state_dict(header: Llama2cHeader, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map llama2.c arrays to a ``LlamaForCausalLM`` state dict.

    Args:
        header: The checkpoint's header.
        arrays: Output of :func:`read_llama2c_arrays`.

    Returns:
        A state dict with every key of ``LlamaForCausalLM`` (``lm_head.weight`` included).
    """
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": arrays["token_embedding"],  # (vocab, dim)
        "model.norm.weight": arrays["rms_final"],  # (dim,)
    }
    for i in range(header.n_layers):
        prefix = f"model.layers.{i}"
        state[f"{prefix}.input_layernorm.weight"] = arrays["rms_att"][i]  # (dim,)
        state[f"{prefix}.self_attn.q_proj.weight"] = permute_rotary_rows(arrays["wq"][i], header.n_heads)
        state[f"{prefix}.self_attn.k_proj.weight"] = permute_rotary_rows(arrays["wk"][i], header.n_kv_heads)
        state[f"{prefix}.self_attn.v_proj.weight"] = arrays["wv"][i]  # (kv_dim, dim)
        state[f"{prefix}.self_attn.o_proj.weight"] = arrays["wo"][i]  # (dim, dim)
        state[f"{prefix}.post_attention_layernorm.weight"] = arrays["rms_ffn"][i]  # (dim,)
        state[f"{prefix}.mlp.gate_proj.weight"] = arrays["w1"][i]  # (hidden, dim)
        state[f"{prefix}.mlp.down_proj.weight"] = arrays["w2"][i]  # (dim, hidden)
        state[f"{prefix}.mlp.up_proj.weight"] = arrays["w3"][i]  # (hidden, dim)
    state["lm_head.weight"] = arrays["token_embedding"] if header.shared_classifier else arrays["wcls"]
    return {name: tensor.contiguous() for name, tensor in state.items()}


def build_config(header: Llama2cHeader) -> Any:
    """The ``LlamaConfig`` matching a llama2.c header.

    Args:
        header: The checkpoint's header.

    Returns:
        A ``transformers.LlamaConfig``.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_dim,
        hidden_act="silu",
        max_position_embeddings=header.seq_len,
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        tie_word_embeddings=header.shared_classifier,
        dtype="float32",
    )


def build_model(header: Llama2cHeader, state: dict[str, torch.Tensor]) -> Any:
    """Instantiate ``LlamaForCausalLM`` and load the converted weights strictly.

    Args:
        header: The checkpoint's header.
        state: Output of :func:`llama2c_to_hf_state_dict`.

    Returns:
        The model in eval mode, float32.
    """
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(build_config(header)).to(torch.float32)
    model.load_state_dict(state, strict=True)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if header.shared_classifier and not tied:
        raise RuntimeError("lm_head is not tied to embed_tokens although tie_word_embeddings=True")
    return model.eval()


def _read_spm_proto(tokenizer_model: Path) -> Any:
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(tokenizer_model.read_bytes())
    except DecodeError as exc:
        raise ValueError(f"{tokenizer_model}: not a SentencePiece model ({exc})") from None
    return proto


def _validate_spm(tokenizer_model: Path, proto: Any, vocab_size: int | None) -> None:
    from sentencepiece import sentencepiece_model_pb2

    problems = []
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        problems.append("model type is not BPE")
    if not proto.trainer_spec.byte_fallback:
        problems.append("no byte fallback")
    norm = proto.normalizer_spec
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"normalization rule {norm.name!r} is not 'identity'")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces is off")
    pieces = tuple(p.piece for p in proto.pieces[: len(SPECIAL_PIECES)])
    if pieces != SPECIAL_PIECES:
        problems.append(f"first pieces are {pieces}, expected {SPECIAL_PIECES}")
    if vocab_size is not None and len(proto.pieces) != vocab_size:
        problems.append(f"{len(proto.pieces)} pieces but the checkpoint has vocab_size {vocab_size}")
    if problems:
        raise ValueError(f"{tokenizer_model}: unsupported SentencePiece model: {'; '.join(problems)}")


def build_tokenizer(tokenizer_model: Path, model_max_length: int, vocab_size: int | None = None) -> Any:
    """Convert a SentencePiece BPE model to a Hugging Face fast tokenizer.

    The BPE vocabulary and merges come from transformers' own slow-to-fast conversion
    (``LlamaTokenizer.from_pretrained`` on a folder holding the ``.model``). The
    normaliser, pre-tokeniser and decoder are then set to follow the model's
    SentencePiece ``normalizer_spec`` and ``split_digits``, and the post-processor
    adds BOS (never EOS), as llama2.c and ``sentencepiece`` with ``add_bos`` do.

    Args:
        tokenizer_model: Path to the SentencePiece ``.model`` file.
        model_max_length: Longest sequence the model accepts.
        vocab_size: When given, the number of pieces the model must have.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (the ``TokenizersBackend`` class).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The SentencePiece model is of a kind this converter does not reproduce.
    """
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    tokenizer_model = _require_file(tokenizer_model, "SentencePiece tokenizer model")
    proto = _read_spm_proto(tokenizer_model)
    _validate_spm(tokenizer_model, proto, vocab_size)

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(tokenizer_model, Path(tmp) / "tokenizer.model")
        slow_converted = LlamaTokenizer.from_pretrained(tmp, local_files_only=True, legacy=False)
        backend = slow_converted.backend_tokenizer  # tokenizers.Tokenizer: BPE with byte fallback

    norm = proto.normalizer_spec
    steps = []
    if norm.remove_extra_whitespaces:
        # SentencePiece drops leading/trailing spaces and squeezes runs of spaces (not tabs/newlines).
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    steps.append(normalizers.Replace(" ", "\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True) if proto.trainer_spec.split_digits else None
    decode_steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        # SentencePiece removes all leading whitespace of a decoded text, not just one space.
        decode_steps.append(decoders.Strip(content=" ", left=1 << 30))
    backend.decoder = decoders.Sequence(decode_steps)
    bos = SPECIAL_PIECES[BOS_ID]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=SPECIAL_PIECES[UNK_ID],
        bos_token=bos,
        eos_token=SPECIAL_PIECES[EOS_ID],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def check_tokenizer(
    tokenizer: Any, tokenizer_model: Path, sentences: tuple[str, ...] = TOKENIZER_CHECK_SENTENCES
) -> None:
    """Check that a converted tokenizer encodes and decodes like SentencePiece.

    Args:
        tokenizer: The Hugging Face tokenizer.
        tokenizer_model: The SentencePiece ``.model`` it was converted from.
        sentences: Texts to compare on.

    Raises:
        ValueError: The two disagree on some sentence.
    """
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    if processor.get_piece_size() != len(tokenizer):
        raise ValueError(
            f"{tokenizer_model}: SentencePiece has {processor.get_piece_size()} pieces, "
            f"the converted tokenizer {len(tokenizer)}"
        )
    for text in sentences:
        expected = processor.encode(text, add_bos=True, add_eos=False)
        got = tokenizer(text)["input_ids"]
        if got != expected:
            raise ValueError(
                f"{tokenizer_model}: converted tokenizer encodes {text!r} as {got}, sentencepiece as {expected}"
            )
        decoded = tokenizer.decode(got, skip_special_tokens=True)
        if decoded != processor.decode(expected):
            raise ValueError(f"{tokenizer_model}: converted tokenizer decodes {text!r} as {decoded!r}")


def convert_llama2c(checkpoint: Path, tokenizer_model: Path, out_dir: Path) -> Path:
    """Convert a legacy llama2.c checkpoint and its SentencePiece tokenizer to a HF folder.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors``,
    ``tokenizer.json``, ``tokenizer_config.json`` and ``conversion.json`` into
    ``out_dir`` (created if needed; other files in it are left alone).

    Args:
        checkpoint: The llama2.c ``.bin`` weights (version 0 format).
        tokenizer_model: The SentencePiece ``.model`` the checkpoint was trained with.
        out_dir: Output folder.

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: An input file does not exist.
        ValueError: An input file is malformed or the two do not fit together.
    """
    import transformers

    checkpoint = _require_file(Path(checkpoint), "llama2.c checkpoint")
    tokenizer_model = _require_file(Path(tokenizer_model), "SentencePiece tokenizer model")
    out_dir = Path(out_dir)

    header, arrays = read_llama2c_arrays(checkpoint)
    model = build_model(header, llama2c_to_hf_state_dict(header, arrays))
    tokenizer = build_tokenizer(tokenizer_model, model_max_length=header.seq_len, vocab_size=header.vocab_size)
    check_tokenizer(tokenizer, tokenizer_model)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / WEIGHTS_FILE).is_file():
        raise RuntimeError(f"{out_dir}: save_pretrained wrote no {WEIGHTS_FILE}")

    record = {
        "converter": "sdpo_core.convert_llama2c",
        "source_format": "llama2.c legacy checkpoint (version 0)",
        "sources": {
            "checkpoint": {"file": checkpoint.name, "sha256": sha256_file(checkpoint)},
            "tokenizer_model": {"file": tokenizer_model.name, "sha256": sha256_file(tokenizer_model)},
        },
        "header": asdict(header),
        "rotary_permutation": "wq/wk rows per head: interleaved pairs -> halves",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }
    (out_dir / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: ``python -m sdpo_core.convert_llama2c SRC.bin TOK.model OUT_DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m sdpo_core.convert_llama2c",
        description="Convert a llama2.c legacy checkpoint and its SentencePiece tokenizer "
        "to a Hugging Face Llama folder.",
    )
    parser.add_argument("checkpoint", type=Path, help="llama2.c .bin weights (legacy version 0 format)")
    parser.add_argument("tokenizer_model", type=Path, help="SentencePiece .model file")
    parser.add_argument("out_dir", type=Path, help="output folder")
    args = parser.parse_args(argv)
    try:
        out = convert_llama2c(args.checkpoint, args.tokenizer_model, args.out_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
