"""The pipeline's stages as functions of files: what each Prefect task calls.

Each stage reads its inputs from paths and writes its outputs under a folder, so a stage can run
in another process or on another machine than the one before it. Models are local folders here;
finding them in the registry is the caller's business.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdpo_core import data as data_mod
from sdpo_core.checkpoint import Checkpoints
from sdpo_core.config import RunConfig
from sdpo_core.evaluate import Scores, gamma, preference_metrics, self_reward_accuracy
from sdpo_core.logprobs import score_pairs
from sdpo_core.model_io import load_model, load_tokenizer, pad_id, resolve_device, save_model
from sdpo_core.partition import Partition, needs_m0_scores, partition_pairs
from sdpo_core.train import MetricsCallback, TrainResult, for_device, train_dpo


@dataclass(frozen=True)
class PreparedData:
    """The normalised train and held-out eval pairs, written as JSON lines."""

    train_path: str
    eval_path: str
    train_hash: str
    eval_hash: str
    counts: dict[str, dict]
    """Per source: rows read, pairs kept, dropped by reason, train and eval pairs, lengths."""
    report_path: str = ""
    """data_report.json: the full data report (what ``sdpo data inspect`` prints)."""


@dataclass(frozen=True)
class ChunkInfo:
    """One step's data chunk on disk."""

    step: int
    label: str
    path: str
    size: int
    content_hash: str
    m0_accuracy: float | None


def prepare_data(cfg: RunConfig, out_dir: Path) -> PreparedData:
    """Read and validate every source, hold out the eval split; write train.jsonl, eval.jsonl
    and data_report.json (what was read, kept and dropped, by source and reason)."""
    tokenizer = load_tokenizer(cfg.model)
    train, evals, report = data_mod.build_dataset(cfg, tokenizer)
    out_dir = Path(out_dir)
    train_hash = data_mod.write_pairs(train, out_dir / "train.jsonl")
    eval_hash = data_mod.write_pairs(evals, out_dir / "eval.jsonl")
    report_path = out_dir / "data_report.json"
    report_path.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
    counts = {r.name: {k: v for k, v in r.to_json().items() if k != "sample"} for r in report.sources}
    return PreparedData(
        str(out_dir / "train.jsonl"), str(out_dir / "eval.jsonl"), train_hash, eval_hash, counts, str(report_path)
    )


def model_fingerprint(model_dir: str | Path) -> str:
    """A content id of a model's weights: from its meta.json, or the sha256 of its safetensors."""
    model_dir = Path(model_dir)
    meta = model_dir / "meta.json"
    if meta.is_file():
        recorded = json.loads(meta.read_text()).get("weights_sha256")
        if recorded:
            return recorded
    return weights_sha256(model_dir)


def weights_sha256(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scores_key(cfg: RunConfig, fingerprint: str, pairs_path: str | Path) -> str:
    """Cache key of a model's scores of a data file: model, data and tokenization settings."""
    parts = {
        "model": fingerprint,
        "data": _file_hash(Path(pairs_path)),
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "dtype": cfg.model.dtype,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _save_scores(scores: Scores, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique: runs may share the cache
    save_file({k: v.contiguous() for k, v in scores.items()}, str(tmp))
    tmp.replace(path)


def load_scores(path: str | Path) -> Scores:
    return load_file(str(path))


def score_file(cfg: RunConfig, model_dir: str, pairs_path: str, cache_dir: Path) -> str:
    """Forward-only log-probs of every pair of a file under a model, cached by content.

    Returns the path of a safetensors file with ``chosen``, ``rejected``, ``chosen_tokens`` and
    ``rejected_tokens`` (N,), in the file's pair order.
    """
    out = Path(cache_dir) / f"{scores_key(cfg, model_fingerprint(model_dir), pairs_path)}.safetensors"
    if out.is_file():
        return str(out)
    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model, model_dir)
    model = load_model(cfg.model, model_dir, device)
    pairs = data_mod.tokenize_pairs(data_mod.read_pairs(Path(pairs_path)), tokenizer, cfg.data)
    scores = score_pairs(
        model,
        pairs,
        pad_id(tokenizer),
        cfg.train.eval_batch_size,
        cfg.train.logprob_chunk_rows,
        device,
        for_device(cfg.train, device).shared_prompt,
    )
    _save_scores(scores, out)
    return str(out)


def partition(cfg: RunConfig, prepared: PreparedData, m0_dir: str, out_dir: Path, cache_dir: Path) -> list[ChunkInfo]:
    """Split the training pairs into the steps' chunks; write each as JSON lines, and partition.json.

    For by_source and easy_to_hard, M0 scores the whole training set once (cached); its scores
    of each chunk are stored in the cache too, under the key :func:`score_file` uses, so step 1's
    reference log-probs are not computed again. partition.json (see :func:`partition_record`)
    records the strategy, M0's accuracy per source and each chunk's pair ids, in order.
    """
    train = data_mod.read_pairs(Path(prepared.train_path))
    p = cfg.partition
    accuracy = None
    m0_scores = None
    gammas = None
    if needs_m0_scores(p.strategy):
        m0_scores = load_scores(score_file(cfg, m0_dir, prepared.train_path, cache_dir))
        assert len(m0_scores["chosen"]) == len(train), "scores follow the training file row for row"
        accuracy = source_accuracy(train, m0_scores, p.accuracy)
        gammas = gamma(m0_scores, p.accuracy).tolist()
    split = partition_pairs(train, p, accuracy, gammas, min_pairs=cfg.data.min_pairs_per_step)
    position = {pair.id: i for i, pair in enumerate(train)}
    fingerprint = model_fingerprint(m0_dir)
    infos = []
    for chunk in split.chunks:
        path = Path(out_dir) / f"step-{chunk.step}.jsonl"
        digest = data_mod.write_pairs(chunk.pairs, path)
        if m0_scores is not None:
            idx = torch.tensor([position[pair.id] for pair in chunk.pairs])
            cached = Path(cache_dir) / f"{scores_key(cfg, fingerprint, path)}.safetensors"
            if not cached.is_file():
                _save_scores({k: v[idx] for k, v in m0_scores.items()}, cached)
        infos.append(ChunkInfo(chunk.step, chunk.label, str(path), len(chunk.pairs), digest, chunk.m0_accuracy))
    record = partition_record(cfg, infos, split, accuracy, len(train))
    (Path(out_dir) / PARTITION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return infos


PARTITION_FILE = "partition.json"
"""The partition's record, in the chunks folder beside the step-<t>.jsonl files."""


def source_accuracy(pairs: list[data_mod.PreferencePair], scores: Scores, form: str) -> dict[str, float]:
    """M0's reward accuracy (share of gamma > 0) per source, in order of first appearance.

    ``scores`` holds M0's scores of ``pairs``, row for row.
    """
    rows: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        rows.setdefault(pair.source, []).append(i)
    return {
        source: self_reward_accuracy({k: v[torch.tensor(idx)] for k, v in scores.items()}, form)
        for source, idx in rows.items()
    }


def partition_record(
    cfg: RunConfig, infos: list[ChunkInfo], split: Partition, accuracy: dict[str, float] | None, num_train: int
) -> dict:
    """What partition.json holds: the settings, M0's accuracy per source (when computed), each
    chunk's step, label, size, content hash and pair ids in order, and the unused pairs."""
    p = cfg.partition
    return {
        "strategy": p.strategy,
        "seed": p.seed,
        "num_steps": len(infos),
        # Whole numbers are pair counts: record them as integers.
        "sizes": [int(x) if float(x).is_integer() else x for x in p.sizes] if p.sizes is not None else None,
        "accuracy_form": p.accuracy,
        "m0_accuracy": accuracy,
        "train_pairs": num_train,
        "unused_pairs": len(split.unused),
        "unused_pair_ids": [pair.id for pair in split.unused],
        "chunks": [
            {
                "step": info.step,
                "label": info.label,
                "size": info.size,
                "content_hash": info.content_hash,
                "m0_accuracy": info.m0_accuracy,
                "file": Path(info.path).name,
                "pair_ids": [pair.id for pair in chunk.pairs],
            }
            for info, chunk in zip(infos, split.chunks, strict=True)
        ],
    }


def train_step(
    cfg: RunConfig,
    step: int,
    ref_dir: str,
    chunk: ChunkInfo,
    ref_scores_path: str,
    out_dir: Path,
    callback: MetricsCallback | None = None,
    meta: dict | None = None,
    checkpoints: Checkpoints | None = None,
) -> tuple[str, TrainResult]:
    """Train M(step) from M(step-1) on the chunk; save it (safetensors + meta.json) to out_dir.

    With ``checkpoints`` the step saves checkpoints as it goes and continues from the newest one
    if there is one (see :func:`checkpoint_dir`). With ``train.num_processes > 1`` the step runs
    under torchrun (sdpo_core.distributed) and its metrics reach ``callback`` when it has finished.
    """
    base_meta = {"step": step, "chunk": asdict(chunk), "config_hash": cfg.hash(), **(meta or {})}
    with checkpoints.exclusive() if checkpoints is not None else contextlib.nullcontext():
        return _train_step(cfg, ref_dir, chunk, ref_scores_path, Path(out_dir), callback, base_meta, checkpoints)


def _train_step(
    cfg: RunConfig,
    ref_dir: str,
    chunk: ChunkInfo,
    ref_scores_path: str,
    out_dir: Path,
    callback: MetricsCallback | None,
    base_meta: dict,
    checkpoints: Checkpoints | None,
) -> tuple[str, TrainResult]:
    if cfg.train.num_processes > 1:
        from sdpo_core import distributed

        job = distributed.job_for(cfg, ref_dir, chunk, ref_scores_path, Path(out_dir), base_meta, checkpoints)
        history = distributed.launch(
            job, Path(out_dir).with_name(Path(out_dir).name + ".job.json"), cfg.train.num_processes
        )
        for i, metrics in enumerate(history, start=1):
            if callback is not None:
                callback(i, metrics)
        result = TrainResult(len(history), history[-1]["loss"] if history else float("nan"), history)
        return str(out_dir), result
    device = resolve_device(cfg.train.device)
    policy, tokenizer, result = train_from(cfg, ref_dir, chunk.path, ref_scores_path, device, callback, checkpoints)
    return str(save_step_model(policy, tokenizer, Path(out_dir), base_meta, result)), result


# Settings that change where or how fast a step runs, or what is logged, but not what it learns:
# changing them on a rerun still continues the step from its checkpoint.
OPERATIONAL_TRAIN_KEYS = (
    "checkpoint_every", "device", "num_threads", "eval_batch_size", "deployment", "num_processes",
    "distributed_backend", "parallelism", "gradient_checkpointing",
)  # fmt: skip


def training_hash(cfg: RunConfig) -> str:
    """A content id of what a train step learns from: the config without tracking, storage and
    the operational train settings."""
    data = cfg.to_dict()
    data.pop("tracking", None)
    data.pop("storage", None)
    for key in OPERATIONAL_TRAIN_KEYS:
        data["train"].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def checkpoint_dir(cfg: RunConfig, chunk: ChunkInfo, ref_dir: str | Path, root: str | Path) -> Path:
    """The checkpoint folder of a train step: one per run name, training settings, chunk
    content and reference weights.

    A rerun of the same pipeline finds the same folder, so an unfinished step continues; a
    change to what the step learns from (see :func:`training_hash`) gives a new one.
    """
    ids = f"{training_hash(cfg)}|{chunk.content_hash}|{model_fingerprint(ref_dir)}"
    return Path(root) / f"{cfg.run_name}-step-{chunk.step}-{hashlib.sha256(ids.encode()).hexdigest()[:16]}"


def train_from(
    cfg: RunConfig,
    ref_dir: str,
    chunk_path: str,
    ref_scores_path: str,
    device: torch.device,
    callback: MetricsCallback | None = None,
    checkpoints: Checkpoints | None = None,
) -> tuple[Any, Any, TrainResult]:
    """Load M(t-1) as the policy (sDPO: it starts from the reference) and train it on the chunk.

    Used in-process and by each torchrun process (sdpo_core.distributed).
    """
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    tokenizer = load_tokenizer(cfg.model, ref_dir)
    policy = load_model(cfg.model, ref_dir, device)
    pairs = data_mod.tokenize_pairs(data_mod.read_pairs(Path(chunk_path)), tokenizer, cfg.data)
    ref = load_scores(ref_scores_path)
    result = train_dpo(policy, pairs, ref, pad_id(tokenizer), cfg.train, cfg.loss, device, callback, checkpoints)
    return policy, tokenizer, result


def save_step_model(policy: Any, tokenizer: Any, out_dir: Path, meta: dict, result: TrainResult) -> Path:
    """Save a trained step model with its meta.json (including the weights' sha256)."""
    saved = save_model(
        policy, tokenizer, out_dir, meta | {"optimizer_steps": result.optimizer_steps, "final_loss": result.final_loss}
    )
    record_fingerprint(saved)
    return saved


def record_fingerprint(model_dir: Path) -> str:
    """Write the weights' sha256 into meta.json (a model folder's content id)."""
    meta_path = Path(model_dir) / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta["weights_sha256"] = weights_sha256(Path(model_dir))
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta["weights_sha256"]


def evaluate_step(
    cfg: RunConfig,
    model_eval_scores: str,
    m0_eval_scores: str,
    prev_eval_scores: str,
    ref_chunk_scores: str,
) -> dict[str, float]:
    """Per-step metrics (all computed from cached scores).

    On the held-out split: reward accuracy and mean margin of Mt with M0 as the reference, the
    same with M(t-1) as the reference, and Mt's mean gamma. On the step's chunk: the mean gamma
    of its reference M(t-1), the quantity of the paper's Fig. 2.
    """
    mt, m0, prev = load_scores(model_eval_scores), load_scores(m0_eval_scores), load_scores(prev_eval_scores)
    beta = cfg.loss.beta
    vs_m0 = preference_metrics(mt, m0, beta)
    vs_prev = preference_metrics(mt, prev, beta)
    return {
        "eval/reward_accuracy_vs_m0": vs_m0["reward_accuracy"],
        "eval/reward_margin_vs_m0": vs_m0["reward_margin"],
        "eval/reward_accuracy_vs_prev": vs_prev["reward_accuracy"],
        "eval/reward_margin_vs_prev": vs_prev["reward_margin"],
        "eval/gamma": vs_m0["gamma"],
        "chunk/ref_gamma": float(gamma(load_scores(ref_chunk_scores)).mean()),
    }
