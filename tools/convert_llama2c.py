"""Convert a llama2.c checkpoint (legacy "version 0" format) to a Hugging Face Llama folder.

The weights are read by :mod:`tools.llama2c_checkpoint` (the file format and the rotary
permutation are described there), loaded strictly into ``LlamaForCausalLM`` and saved as
safetensors.

The SentencePiece tokenizer (``.model``) is converted to a ``tokenizers`` fast
tokenizer that reproduces SentencePiece's normalisation (dummy prefix, removal of
extra spaces, digit splitting, byte fallback), is checked against SentencePiece on
sample sentences, and is saved as ``tokenizer.json`` so that loading it at run time
needs neither ``sentencepiece`` nor network access.

A one-off tool, not part of training; from the repository root::

    python -m tools.convert_llama2c stories260K.bin tok512.model models/stories260K
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sdpo_core.files import atomic_write_text
from sdpo_core.hashing import sha256_file
from tools.llama2c_checkpoint import Llama2cHeader, llama2c_to_hf_state_dict, read_llama2c_arrays, require_file

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

    tokenizer_model = require_file(tokenizer_model, "SentencePiece tokenizer model")
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

    checkpoint = require_file(Path(checkpoint), "llama2.c checkpoint")
    tokenizer_model = require_file(Path(tokenizer_model), "SentencePiece tokenizer model")
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
        "converter": "tools.convert_llama2c",
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
    atomic_write_text(out_dir / CONVERSION_FILE, json.dumps(record, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: ``python -m tools.convert_llama2c SRC.bin TOK.model OUT_DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.convert_llama2c",
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
