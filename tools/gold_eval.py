"""Gold-reward win rate of a model's samples against a base model's, on held-out prompts.

A repository-only tool (not installed with the package), for checking a trained model by hand;
from the repository root::

    HF_HUB_OFFLINE=1 python -m tools.gold_eval <model folder> [--base models/stories260K]

Both models continue every prompt of ``--prompts`` (default ``data/gold/eval_prompts.jsonl``)
``--samples`` times with the same seeds (:func:`sdpo_core.sampling.sample_completions`), and the
i-th sample of the model meets the i-th sample of the base (:func:`sdpo_core.gold.gold_win_rate`).
Printed as JSON: the win rate with a 95% interval from a bootstrap over prompts, and the mean gold
reward of each side.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sdpo_core.experiment_config import read_gold_prompts
from sdpo_core.gold import gold_reward, gold_win_rate


def bootstrap_interval(groups: list[list[float]], seed: int) -> tuple[float, float]:
    """95% interval of the mean outcome over prompts (each prompt's samples stay together), by
    the project's bootstrap (sdpo_core.bootstrap), as the experiment reports its win rates."""
    import numpy as np

    from sdpo_core.bootstrap import interval

    found = interval(np.asarray([sum(g) / len(g) for g in groups]), seed=seed)
    return found.low, found.high


def gold_eval(model_dir: str, base_dir: str, prompts: list[str], samples: int, seed: int, **kw: Any) -> dict[str, Any]:
    """Sample both models on the prompts and compare them by gold reward."""
    import torch

    from sdpo_core.config import ModelConfig
    from sdpo_core.model_io import load_model, load_tokenizer
    from sdpo_core.sampling import sample_completions

    texts = {}
    for side, folder in (("model", model_dir), ("base", base_dir)):
        cfg = ModelConfig(name_or_path=folder)
        # float64, as tools.make_gold_task samples: results independent of batching and kernels.
        model = load_model(cfg, dtype=torch.float64)
        texts[side] = sample_completions(model, load_tokenizer(cfg), prompts, n=samples, seed=seed, **kw)
    groups = [gold_win_rate(m, b) for m, b in zip(texts["model"], texts["base"], strict=True)]
    flat = [x for g in groups for x in g]
    low, high = bootstrap_interval(groups, seed)
    return {
        "model": model_dir,
        "base": base_dir,
        "prompts": len(prompts),
        "samples_per_prompt": samples,
        "win_rate": round(sum(flat) / len(flat), 4),
        "win_rate_95ci": [round(low, 4), round(high, 4)],
        "wins_ties_losses": [flat.count(1.0), flat.count(0.5), flat.count(0.0)],
        "mean_gold": {
            side: round(sum(gold_reward(t) for g in texts[side] for t in g) / len(flat), 4) for side in texts
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Print the comparison as JSON; exit 2 on bad input."""
    import torch

    from sdpo_core.model_io import ModelError

    parser = argparse.ArgumentParser(prog="python -m tools.gold_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model folder to evaluate")
    parser.add_argument("--base", default="models/stories260K", help="base model folder (default: M0)")
    parser.add_argument("--prompts", default="data/gold/eval_prompts.jsonl", help="JSON lines with 'prompt'")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (default: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="default: 48, as the task's completions")
    parser.add_argument("--seed", type=int, default=1, help="sampling and bootstrap seed (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.max_new_tokens < 1 or args.threads < 1:
        parser.error("--samples, --max-new-tokens and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        prompts = read_gold_prompts(args.prompts)
        result = gold_eval(
            args.model, args.base, prompts, args.samples, args.seed, max_new_tokens=args.max_new_tokens, batch_size=256
        )
    except (ModelError, ValueError) as exc:
        print(f"gold_eval: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
