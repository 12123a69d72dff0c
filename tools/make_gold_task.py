"""Build the gold-reward preference task: story openings, M0's completions, pairs by gold reward.

A repository-only tool (not installed with the package). From the repository root::

    HF_HUB_OFFLINE=1 python -m tools.make_gold_task            # writes data/gold/

Steps, all deterministic for a given ``--seed``:

1. Prompts: every combination of the story openings in :data:`OPENINGS` with the names, animals,
   places and things below, in a seeded order; the first ``--eval-prompts`` are held out for the
   win-rate evaluation (``eval_prompts.jsonl``), the next ``--train-prompts`` make the pairs.
2. Completions: ``--samples`` per training prompt from the model (default the shipped M0,
   ``models/stories260K``, run in float64) by :func:`sdpo_core.sampling.sample_completions`
   (fixed seeds).
3. Pairs: every two completions of a prompt whose gold rewards (:func:`sdpo_core.gold.gold_reward`)
   differ, the higher one chosen. A pair whose gold margin is at least ``--easy-margin`` goes to
   ``gold-easy.jsonl``, one below ``--hard-margin`` (and above zero) to ``gold-hard.jsonl``; ties
   and margins in between are dropped. Each source keeps at most ``--pairs-per-source`` pairs, at
   most ``--max-pairs-per-prompt`` of them from any one prompt, chosen in a seeded order.

Files are JSON lines in the ``scored`` format (``prompt``, ``chosen``, ``rejected``,
``score_chosen``, ``score_rejected``: the gold rewards), plus ``manifest.json``: the arguments,
the model's and the files' sha256 and the counts. Everything is written to a temporary folder
and renamed into place, so a failed run leaves the old files as they were.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdpo_core.gold import NEGATIVE, POSITIVE, WORDS_PER_UNIT, gold_reward
from sdpo_core.hashing import sha256_file

# Story openings in the style of TinyStories. {name}, {animal}, {place} and {thing} are filled in
# from the lists below; openings end where the model would go on (mid-sentence or after one).
OPENINGS = (
    "Once upon a time, there was a little {animal} named {name}.",
    "Once upon a time, there was a little {animal} named",
    "Once upon a time, {name} went to the {place}.",
    "Once upon a time, {name} found a {thing} at the {place}.",
    "One day, {name} went to the {place} with a {thing}.",
    "One day, {name} saw a {animal} in the {place}.",
    "One day, {name} and the {animal} went to the {place}. They",
    "{name} had a {thing}. Every day, {name}",
    "{name} lived in a small house near the {place}. One day,",
    "{name} wanted to play with the {thing}, but",
    "There was a {animal} who lived in the {place}. The {animal}",
    "In the {place}, a little {animal} named {name}",
    "{name} and the {animal} were in the {place}. {name} said,",
    "Once upon a time, in a big {place}, there lived a {animal}.",
    "{name} looked at the {thing} and",
    "Mom and {name} went to the {place} to find a {thing}.",
    "One morning, {name} woke up and saw a {animal}.",
    "The {animal} had a {thing}. It",
    "{name} walked to the {place}. On the way, {name}",
    "Once there was a {animal} who loved the {place}.",
)
NAMES = ("Tom", "Lily", "Ben", "Sue", "Max", "Mia", "Sam", "Anna", "Tim", "Lucy", "Jack", "Sara")
ANIMALS = ("dog", "cat", "bird", "bunny", "bear", "frog", "duck", "mouse", "fish", "lion")
PLACES = ("park", "garden", "forest", "beach", "house", "school", "pond", "farm")
THINGS = ("ball", "box", "toy", "kite", "book", "hat", "cake", "flower")


@dataclass(frozen=True)
class GoldTaskArgs:
    """What the task depends on (all written to the manifest)."""

    model: str = "models/stories260K"
    out: str = "data/gold"
    seed: int = 0
    train_prompts: int = 420
    eval_prompts: int = 100
    samples: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0
    easy_margin: float = 2.0
    hard_margin: float = 1.0
    pairs_per_source: int = 300
    max_pairs_per_prompt: int = 2
    batch_size: int = 256
    threads: int = 1


def prompts_by_opening() -> list[list[str]]:
    """For each opening, its distinct filled-in forms, sorted."""
    out = []
    for opening in OPENINGS:
        fills = {
            opening.format(name=name, animal=animal, place=place, thing=thing)
            for name, animal, place, thing in itertools.product(NAMES, ANIMALS, PLACES, THINGS)
        }
        out.append(sorted(fills))
    return out


def split_prompts(seed: int, n_train: int, n_eval: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out eval prompts): disjoint, distinct, in a seeded order.

    Each opening's forms are shuffled, then the openings take turns (one form of each, then the
    next), so that every opening is about equally common on both sides.
    """
    rng = random.Random(f"gold-prompts-{seed}")
    groups = prompts_by_opening()
    for group in groups:
        rng.shuffle(group)
    ordered = [p for layer in itertools.zip_longest(*groups) for p in layer if p is not None]
    ordered = list(dict.fromkeys(ordered))  # two openings never give one text; kept safe anyway
    if n_train + n_eval > len(ordered):
        raise ValueError(f"asked for {n_train} + {n_eval} prompts; there are {len(ordered)} distinct ones")
    return ordered[n_eval : n_eval + n_train], ordered[:n_eval]


@dataclass(frozen=True)
class Pair:
    """One labelled pair: a prompt and two of its completions, the higher gold reward chosen."""

    prompt: str
    chosen: str
    rejected: str
    score_chosen: float
    score_rejected: float

    @property
    def margin(self) -> float:
        return self.score_chosen - self.score_rejected

    def row(self) -> dict[str, Any]:
        """The pair as a row of the ``scored`` format."""
        return asdict(self)


def candidate_pairs(prompts: list[str], completions: list[list[str]]) -> list[Pair]:
    """Every two completions of a prompt with different gold rewards, the higher one chosen."""
    out = []
    for prompt, texts in zip(prompts, completions, strict=True):
        scores = [gold_reward(t) for t in texts]
        for i, j in itertools.combinations(range(len(texts)), 2):
            if scores[i] == scores[j] or texts[i] == texts[j]:
                continue  # a tie teaches no preference
            hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
            out.append(Pair(prompt, texts[hi], texts[lo], scores[hi], scores[lo]))
    return out


def select(pairs: list[Pair], limit: int, per_prompt: int, seed: str) -> list[Pair]:
    """At most ``limit`` pairs, at most ``per_prompt`` of one prompt, in a seeded order."""
    order = list(pairs)
    random.Random(seed).shuffle(order)
    taken: dict[str, int] = {}
    out = []
    for pair in order:
        if len(out) == limit:
            break
        if taken.get(pair.prompt, 0) < per_prompt:
            taken[pair.prompt] = taken.get(pair.prompt, 0) + 1
            out.append(pair)
    return out


def build_sources(
    args: GoldTaskArgs, prompts: list[str], completions: list[list[str]]
) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
    """The sources (name -> pairs) and the counts behind them."""
    candidates = candidate_pairs(prompts, completions)
    easy = [p for p in candidates if p.margin >= args.easy_margin]
    hard = [p for p in candidates if p.margin <= args.hard_margin]
    sources = {
        "gold-easy": select(easy, args.pairs_per_source, args.max_pairs_per_prompt, f"gold-easy-{args.seed}"),
        "gold-hard": select(hard, args.pairs_per_source, args.max_pairs_per_prompt, f"gold-hard-{args.seed}"),
    }
    for name, pairs in sources.items():
        if not pairs:
            raise ValueError(f"no pairs for {name}: use more --train-prompts or --samples, or other margins")
    rewards = [gold_reward(t) for texts in completions for t in texts]
    mean = sum(rewards) / len(rewards)
    counts = {
        "completions": len(rewards),
        "gold_of_completions": {
            "mean": round(mean, 4),
            "std": round((sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5, 4),
            "histogram": {f"{v:g}": rewards.count(v) for v in sorted(set(rewards))},
        },
        "candidate_pairs": len(candidates),
        "candidate_margins": {
            f"{m:g}": sum(p.margin == m for p in candidates) for m in sorted({p.margin for p in candidates})
        },
        "pairs": {name: len(pairs) for name, pairs in sources.items()},
        "mean_margin": {name: round(sum(p.margin for p in pairs) / len(pairs), 4) for name, pairs in sources.items()},
    }
    return sources, counts


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_task(
    args: GoldTaskArgs, sources: dict[str, list[Pair]], eval_prompts: list[str], counts: dict[str, Any]
) -> Path:
    """Write the sources, the eval prompts and the manifest into ``args.out``, replacing it whole."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.partial")
    aside = out.with_name(f".{out.name}.{uuid.uuid4().hex}.old")
    try:
        tmp.mkdir()
        files = {f"{name}.jsonl": _jsonl([p.row() for p in pairs]) for name, pairs in sources.items()}
        files["eval_prompts.jsonl"] = _jsonl([{"prompt": p} for p in eval_prompts])
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        model_weights = sorted(Path(args.model).glob("*.safetensors"))
        manifest = {
            "command": " ".join(["python -m tools.make_gold_task", *_cli_args(args)]),
            "args": asdict(args),
            "model_sha256": {f.name: sha256_file(f) for f in model_weights},
            "gold_reward": {
                "definition": f"(positive - negative) * {WORDS_PER_UNIT} / max(words, {WORDS_PER_UNIT})",
                "positive": sorted(POSITIVE),
                "negative": sorted(NEGATIVE),
            },
            "counts": counts,
            "files_sha256": {name: sha256_file(tmp / name) for name in sorted(files)},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            out.rename(aside)  # a folder cannot be renamed over a non-empty one
        try:
            tmp.rename(out)
        except OSError:
            if aside.exists() and not out.exists():
                aside.rename(out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    return out


def make_gold_task(args: GoldTaskArgs) -> dict[str, Any]:
    """Build the task into ``args.out``; return the counts."""
    import torch

    from sdpo_core.config import ModelConfig
    from sdpo_core.model_io import load_model, load_tokenizer
    from sdpo_core.sampling import sample_completions

    # The model is tiny: a forward is dominated by per-op overhead, which extra threads only
    # slow down on a shared machine (measured: one thread 3 ms a step, two threads 70 ms).
    torch.set_num_threads(args.threads)
    train_prompts, eval_prompts = split_prompts(args.seed, args.train_prompts, args.eval_prompts)
    cfg = ModelConfig(name_or_path=args.model)
    # float64: the model's logits then agree to ~1e-16 whatever the batch size, thread count or CPU
    # kernels, so no draw flips and the data is the same everywhere (in float32, 2 of 1680 samples
    # differed between batch sizes 5 and 256). It costs about 10% more time on this model.
    model, tokenizer = load_model(cfg, dtype=torch.float64), load_tokenizer(cfg)
    completions = sample_completions(
        model,
        tokenizer,
        train_prompts,
        n=args.samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    sources, counts = build_sources(args, train_prompts, completions)
    counts = {"train_prompts": len(train_prompts), "eval_prompts": len(eval_prompts), **counts}
    write_task(args, sources, eval_prompts, counts)
    return counts


def _cli_args(args: GoldTaskArgs) -> list[str]:
    """The command-line arguments that rebuild ``args`` (those not at their default)."""
    defaults = GoldTaskArgs()
    return [f"--{k.replace('_', '-')} {v}" for k, v in asdict(args).items() if getattr(defaults, k) != v]


def parse_args(argv: list[str] | None = None) -> GoldTaskArgs:
    """Command-line arguments, each defaulting to the shipped task's value."""
    defaults = GoldTaskArgs()
    parser = argparse.ArgumentParser(
        prog="python -m tools.make_gold_task", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    helps = {
        "model": "model folder to sample from (M0)",
        "out": "output folder (replaced whole)",
        "seed": "seed of the prompt order, the samples and the pair selection",
        "train_prompts": "prompts whose completions make the pairs",
        "eval_prompts": "held-out prompts for the win-rate evaluation",
        "samples": "completions sampled per training prompt",
        "max_new_tokens": "most new tokens per completion",
        "temperature": "sampling temperature (0: greedy)",
        "top_k": "sample among the k most likely tokens (0: all)",
        "easy_margin": "gold margin at or above which a pair is easy",
        "hard_margin": "gold margin at or below which a pair is hard",
        "pairs_per_source": "most pairs per source",
        "max_pairs_per_prompt": "most pairs of one prompt per source",
        "batch_size": "rows per forward pass while sampling (does not change the samples)",
        "threads": "torch CPU threads",
    }
    for key, value in asdict(defaults).items():
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=type(value), default=value, help=f"{helps[key]} (default: {value})"
        )
    ns = parser.parse_args(argv)
    args = GoldTaskArgs(**vars(ns))
    problems = [
        f"--{k.replace('_', '-')} must be at least 1"
        for k in ("train_prompts", "eval_prompts", "pairs_per_source", "max_pairs_per_prompt", "batch_size", "threads")
        if getattr(args, k) < 1
    ]
    if args.samples < 2:
        problems.append("--samples must be at least 2 (a pair needs two completions)")
    if not 0 < args.hard_margin < args.easy_margin:
        problems.append("need 0 < --hard-margin < --easy-margin")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    """Build the task; exit 2 on bad arguments or a model that cannot be loaded."""
    from sdpo_core.model_io import ModelError

    args = parse_args(argv)
    try:
        counts = make_gold_task(args)
    except (ModelError, ValueError) as exc:
        print(f"make_gold_task: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
