"""sdpo's step in its two phases, timed apart: the reference pass (``score_pairs``) and the
training loop (``train_dpo``), on a benchmark size, a few repetitions in one process.

For comparing two versions of sdpo_core side by side: run it from each tree, alternating
processes (``PYTHONPATH=<tree> python -m benchmarks.step_phases``); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.dpo_step import build_model, real_pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20m")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from sdpo_core.config import LossConfig, TrainConfig
    from sdpo_core.logprobs import score_pairs
    from sdpo_core.train import for_device, train_dpo

    torch.manual_seed(0)
    model = build_model(args.size, torch.float32, "cpu")
    pairs = real_pairs(args.pairs, 192, 96, model.config.vocab_size)
    cfg = for_device(TrainConfig(micro_batch_size=args.batch_size, learning_rate=5e-4, warmup_ratio=0.1), "cpu")
    start_weights = {k: v.clone() for k, v in model.state_dict().items()}
    runs = []
    for _ in range(args.repeats):
        model.load_state_dict(start_weights)
        t0 = time.perf_counter()
        ref = score_pairs(model, pairs, 0, args.batch_size, cfg.logprob_chunk_rows, "cpu", cfg.shared_prompt)
        t1 = time.perf_counter()
        train_dpo(model, pairs, ref, 0, cfg, LossConfig(beta=0.1), "cpu")
        runs.append({"reference_s": t1 - t0, "train_s": time.perf_counter() - t1})
    print(json.dumps({"size": args.size, "pairs": args.pairs, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
