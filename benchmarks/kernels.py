"""Two choices inside sdpo's train step, measured side by side: ``python -m benchmarks.kernels``.

- ``attention``: the second call of split attention (:mod:`sdpo_core.attention`) as a square
  causal call over prompt + rejected against the rejected queries alone with a (B, 1, R, L)
  mask, forward and backward, GQA (8 query heads, 4 key/value heads, 64 wide), for several
  prompt and rejected lengths P and R. Which one sdpo uses depends on the device
  (``attention.RECTANGLE_DEVICES``).
- ``adamw``: one AdamW step over the parameter shapes of ``benchmarks.dpo_step``'s 20M model, with torch's
  default (a loop over parameters on a CPU), ``foreach=True`` and ``fused=True``.

Each case alternates its variants, after a warm-up, and reports the median time in milliseconds
and the ratio. Writes JSON (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# (pairs B, prompt P, rejected R): the benchmark's default rows (192 tokens) up to 1024-token rows.
ATTENTION_CASES = ((8, 96, 96), (4, 192, 192), (2, 384, 384), (1, 512, 512), (1, 256, 768), (1, 768, 256))
HEADS, KV_HEADS, HEAD_DIM = 8, 4, 64


def timed(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each variant over ``rounds`` alternating calls, after one warm-up each."""
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}


def attention_case(b: int, p: int, r: int, device: str, rounds: int) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(0)
    length = p + r

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=gen).requires_grad_()

    q_all, q_rejected = leaf(b, HEADS, length, HEAD_DIM), leaf(b, HEADS, r, HEAD_DIM)
    k, v = leaf(b, KV_HEADS, length, HEAD_DIM), leaf(b, KV_HEADS, length, HEAD_DIM)
    # Rejected query j sees keys 0 .. P + j, as split attention's mask says.
    mask = torch.ones(r, length, dtype=torch.bool, device=device).tril(diagonal=p).expand(b, 1, r, length)

    def square() -> None:
        F.scaled_dot_product_attention(q_all, k, v, is_causal=True, enable_gqa=True).sum().backward()

    def rectangle() -> None:
        F.scaled_dot_product_attention(q_rejected, k, v, attn_mask=mask, enable_gqa=True).sum().backward()

    ms = timed({"square": square, "rectangle": rectangle}, rounds)
    return {"pairs": b, "prompt": p, "rejected": r, **ms, "square_over_rectangle": ms["square"] / ms["rectangle"]}


def adamw_case(device: str, rounds: int) -> dict[str, Any]:
    from benchmarks.dpo_step import build_model

    # The parameter shapes of the DPO step benchmark's 20M model, built on the meta device (no memory).
    shapes = [p.shape for p in build_model("20m", torch.float32, "meta").parameters()]
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen)) for s in shapes]
    for param in params:
        param.grad = torch.randn(param.shape, device=device, generator=gen)
    optimizers = {
        "default": torch.optim.AdamW(params, lr=1e-4),
        "foreach": torch.optim.AdamW(params, lr=1e-4, foreach=True),
        "fused": torch.optim.AdamW(params, lr=1e-4, fused=True),
    }
    ms = timed({name: opt.step for name, opt in optimizers.items()}, rounds)
    return {"parameters": sum(p.numel() for p in params), **ms, "default_over_fused": ms["default"] / ms["fused"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7, help="alternating calls per variant; the median is reported")
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    args = parser.parse_args(argv)

    attention = [attention_case(b, p, r, args.device, args.rounds) for b, p, r in ATTENTION_CASES]
    adamw = adamw_case(args.device, args.rounds)
    results = {
        "command": "python -m benchmarks.kernels " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "attention": attention,
        "adamw": adamw,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"{'B':>3} {'P':>5} {'R':>5} {'square ms':>10} {'rectangle ms':>13} {'square/rect':>12}")
    for case in attention:
        print(
            f"{case['pairs']:>3} {case['prompt']:>5} {case['rejected']:>5} {case['square']:>10.1f} "
            f"{case['rectangle']:>13.1f} {case['square_over_rectangle']:>12.2f}"
        )
    print(
        f"\nAdamW step, {adamw['parameters'] / 1e6:.1f}M parameters: default {adamw['default']:.1f} ms, "
        f"foreach {adamw['foreach']:.1f} ms, fused {adamw['fused']:.1f} ms "
        f"(default / fused {adamw['default_over_fused']:.2f}x); JSON: {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
