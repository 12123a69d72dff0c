"""Reading a llama2.c checkpoint (legacy "version 0" format) as Hugging Face Llama weights.

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
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HEADER_FORMAT = "<7i"
HEADER_BYTES = struct.calcsize(HEADER_FORMAT)  # 28
FLOAT_BYTES = 4
# First four bytes of llama2.c's versioned export formats ("ak42" as a little-endian uint32).
VERSIONED_MAGIC = 0x616B3432


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


def require_file(path: Path, what: str) -> Path:
    """``path`` as a Path; FileNotFoundError naming it and ``what`` it should be if it is no file."""
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
    checkpoint = require_file(checkpoint, "llama2.c checkpoint")
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
