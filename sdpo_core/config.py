"""Run configuration: frozen dataclasses, YAML recipes and ``key.sub=value`` overrides.

Every field carries a docstring (the string literal under it); ``describe()`` turns them into the
CLI help. Loading collects every problem in a recipe (unknown keys, wrong types, bad values) and
reports them together in one :class:`ConfigError`, each naming its key.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DataFormat = Literal["auto", "standard", "conversational", "implicit", "hh", "openai", "sharegpt", "scored"]
SourceUse = Literal["split", "train", "eval"]
COLUMN_ROLES = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")
PartitionStrategy = Literal["by_source", "random", "easy_to_hard", "sequential"]
AccuracyForm = Literal["sum", "mean"]
LossName = Literal["sigmoid", "ipo", "hinge", "dpop"]
Parallelism = Literal["ddp", "fsdp"]


class ConfigError(ValueError):
    """One or more problems in a configuration; the message lists each, naming its key."""

    def __init__(self, problems: list[str], origin: str | None = None) -> None:
        self.problems = problems
        where = f" in {origin}" if origin else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")


@dataclass(frozen=True)
class SourceConfig:
    """One preference data source."""

    path: str
    """A file (JSON array, JSON lines, CSV, Parquet; .gz compressed JSON, JSON lines or CSV), a
    folder of such files, a folder written by datasets' save_to_disk, or a Hugging Face hub
    dataset id."""
    name: str = ""
    """Name of the source, used for by_source chunks and in reports (default: the file stem)."""
    format: DataFormat = "auto"
    """Row format: standard (prompt/chosen/rejected strings), conversational (TRL's message
    lists), implicit (only chosen/rejected; the prompt is their shared start; hh is an alias),
    openai (input.messages, preferred_output, non_preferred_output), sharegpt (conversations,
    chosen, rejected), scored (chosen/rejected with ratings; ties dropped), or auto (detected from
    the first row)."""
    split: str = "train"
    """Split to read from a hub dataset or a save_to_disk DatasetDict."""
    config_name: str | None = None
    """Configuration (subset) name of a hub dataset."""
    columns: dict[str, str] | None = None
    """Column mapping for any other schema: {prompt, chosen, rejected, score_chosen,
    score_rejected} -> the source's column names."""
    max_pairs: int | None = None
    """Read at most this many usable pairs (the first ones in file order); None for all."""
    sample: int | None = None
    """Keep a seeded random sample of this many pairs (after validation); None keeps all."""
    weight: float = 1.0
    """Mixing weight of the source's training pairs: 2 repeats each pair twice, 0.5 keeps a seeded
    half (a rate per source, as in data mixtures)."""
    use: SourceUse = "split"
    """split: hold out data.eval_fraction for evaluation, train on the rest; train: train on all;
    eval: evaluate on all, never train."""


@dataclass(frozen=True)
class ModelConfig:
    """The initial model M0."""

    name_or_path: str = "models/stories260K"
    """A local Hugging Face model folder (safetensors weights) or a hub id."""
    trust_remote_code: bool = False
    """Allow model code from the model folder or hub to run. Off unless you trust the source."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype for training and scoring."""


@dataclass(frozen=True)
class DataConfig:
    """Preference data: sources, prompt formatting, lengths and the held-out split."""

    sources: tuple[SourceConfig, ...] = ()
    """The sources, each with path, name, format and max_pairs."""
    eval_fraction: float = 0.1
    """Share of each source's pairs held out for evaluation; never trained on."""
    eval_max_pairs: int = 64
    """Cap on held-out pairs per source."""
    max_length: int = 256
    """Max tokens of prompt plus completion; completions are cut at the end."""
    max_prompt_length: int = 128
    """Max prompt tokens; longer prompts keep their end (the most recent turns)."""
    seed: int = 0
    """Seed of the held-out split, the per-source samples and the weights' subsampling."""
    skip_bad_rows: bool = False
    """False: a row that cannot be parsed or lacks a field stops the run, naming the file and
    line. True: such rows are skipped and counted by reason."""
    long_prompts: Literal["truncate", "drop"] = "truncate"
    """Prompts over max_prompt_length: truncate (keep the end) or drop the pair (counted)."""
    min_pairs_per_step: int = 1
    """Fewest training pairs a step may have; a run whose data leaves fewer stops before training."""


@dataclass(frozen=True)
class PartitionConfig:
    """How the training pairs are split into the steps D1..DT."""

    strategy: PartitionStrategy = "by_source"
    """by_source: one chunk per source, ordered easy to hard by M0's reward accuracy
    (sDPO, section 3.2); random: chunks of the pooled, shuffled pairs (the paper's ablation);
    easy_to_hard: the pooled pairs ordered by M0's gamma, highest (easiest) first, then cut
    (a pair-level curriculum, future work in the paper); sequential: the pooled pairs in the
    order given (sources in recipe order, rows in file order), then cut."""
    num_steps: int | None = None
    """T, the number of steps (1 is plain DPO). by_source: the number of sources (None means
    that); the other strategies: None means 2, or the number of ``sizes``."""
    sizes: tuple[float, ...] | None = None
    """Explicit chunk sizes for random, easy_to_hard and sequential: pair counts (whole numbers,
    summing to at most the training pairs) or fractions (summing to 1). None: equal chunks."""
    accuracy: AccuracyForm = "sum"
    """M0's reward accuracy per source: share of pairs with gamma > 0, where gamma uses summed
    completion log-probs (sum) or mean per-token log-probs (mean, length-normalised). The same
    form orders pairs for easy_to_hard."""
    seed: int = 0
    """Seed of the random strategy's shuffle."""


@dataclass(frozen=True)
class LossConfig:
    """The DPO-family loss (see sdpo_core.losses)."""

    name: LossName = "sigmoid"
    """sigmoid (DPO), ipo, hinge, dpop (DPO-Positive)."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward, beta in the DPO paper."""
    label_smoothing: float = 0.0
    """Conservative DPO: assumed share of flipped labels (sigmoid only), in [0, 0.5)."""
    dpop_lambda: float = 50.0
    """DPO-Positive's lambda: weight of the penalty when the chosen log-prob falls below the reference."""
    nll_weight: float = 0.0
    """Weight of an extra NLL term on the chosen completion (mean per token), as in RPO; 0 disables."""


@dataclass(frozen=True)
class TrainConfig:
    """One DPO step's optimisation."""

    epochs: int = 1
    """Passes over the step's chunk."""
    micro_batch_size: int = 8
    """Pairs per forward/backward pass."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch_size * grad_accum_steps."""
    learning_rate: float = 5e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_ratio: float = 0.1
    """Share of optimizer steps with linear warmup; then cosine decay to min_lr_ratio."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of the cosine, as a share of the peak."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    seed: int = 0
    """Seed of shuffling and initialisation; a CPU run with the same seed repeats exactly."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    shared_prompt: Literal["auto"] | bool = "auto"
    """Compute each pair's prompt once for both completions (one row [prompt|chosen|rejected])
    instead of two padded rows; the log-probs are the same. Attention is split in two calls per
    layer (prompt + chosen, causal; the rejected tokens over prompt + rejected) for models that
    dispatch it through transformers' attention interface, a 4-D mask for others (eager, sdpa;
    set false for other implementations). auto is true on a CPU and false on a GPU, where it
    measured slower than padded rows, split attention included (benchmarks/results/gpu)."""
    max_pass_tokens: Literal["auto"] | int | None = "auto"
    """Padded tokens per forward/backward pass: each micro-batch is cut into length-sorted passes
    of at most this many tokens (2 x pairs x longest row). Same update, less padding and less
    activation memory; None runs each micro-batch in one pass. auto is 1024 on a CPU and None
    on a GPU."""
    gradient_checkpointing: bool = False
    """Keep only each decoder layer's input during the forward and recompute the layer in the
    backward pass (torch's non-reentrant activation checkpointing, through transformers): far
    less activation memory for about one more forward pass of compute. Split attention is
    recomputed with its own layout, so the shared-prompt layout keeps it."""
    logprob_chunk_rows: int = 2048
    """Completion tokens per chunk of the output projection and log-softmax."""
    eval_batch_size: int = 16
    """Pairs per batch when scoring (reference log-probs, evaluation)."""
    checkpoint_every: int = 25
    """Save a checkpoint of the train step (weights, optimizer, scheduler, data position, random
    states) every this many optimizer steps, and after the last; 0 saves only after the last. A
    rerun of the same pipeline continues an unfinished step from its newest checkpoint."""
    deployment: str | None = None
    """Run each train step as a run of this Prefect deployment (``flow/deployment``, e.g.
    sdpo_train_step/sdpo-train-step on a GPU work pool) and wait for it; None trains in-process."""
    num_processes: int = 1
    """Data-parallel processes for a train step; above 1 the step runs under torchrun, each
    process on its share of every micro-batch (one per GPU, or CPU processes with gloo)."""
    distributed_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: auto is nccl on GPUs, gloo on CPUs."""
    parallelism: Parallelism = "ddp"
    """With num_processes above 1: ddp keeps a whole copy of the model in every process and
    all-reduces gradients once per optimizer step (torch's DistributedDataParallel); fsdp shards
    parameters, gradients and optimizer state across the processes (torch's fully_shard, one unit
    per decoder layer; gradients are reduce-scattered every pass, so they stay sharded), for
    models whose training state does not fit one GPU. The update is the same."""
    num_threads: int | None = None
    """torch CPU threads; None keeps torch's default."""


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking and registry."""

    tracking_uri: str | None = None
    """MLflow tracking URI; None uses SQLite in the workspace (or MLFLOW_TRACKING_URI if set)."""
    experiment: str = "sdpo"
    """MLflow experiment name."""
    artifact_location: str | None = None
    """Where a new experiment keeps its artifacts (every step's model): a folder, or
    ``s3://bucket/prefix`` (boto3; endpoint from MLFLOW_S3_ENDPOINT_URL, credentials from the
    environment). None: the workspace's mlartifacts/ with a local store, else the server's default.
    Uploads to S3 are verified (size and checksum) before a model version points to them."""
    registered_model: str = "sdpo-model"
    """Registered model whose versions are the step models; aliases step-<t> and final."""


@dataclass(frozen=True)
class StorageConfig:
    """Where the run's intermediate files live besides the workspace."""

    uri: str | None = None
    """``s3://bucket/prefix``: every file one stage hands to another (data splits, chunks,
    partition, cached log-probs, reports) is uploaded there, verified, and downloaded by a stage
    that does not find it locally, so steps can run on other machines. None: the workspace only."""
    credentials_block: str | None = None
    """A Prefect block holding the S3 credentials, region and endpoint, ``<block-type-slug>/<name>``
    (``s3-credentials/prod``, or prefect-aws's ``aws-credentials/<name>``): read when the pipeline
    and each train step start, its values win over the environment's for every S3 upload and
    download (boto3 and MLflow). None: boto3's usual chain (environment, config files)."""


@dataclass(frozen=True)
class RunConfig:
    """A stepwise DPO run."""

    run_name: str = "sdpo"
    """Name of the pipeline run (MLflow parent run, Prefect flow run, workspace folder)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The initial model M0."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference data."""
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    """How the data is split into steps."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The DPO-family loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation of each step."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Artifact storage for intermediate files (S3)."""

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-able data."""
        return _plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """A short content hash of the resolved config."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf option, for the CLI help."""
    rows: list[tuple[str, str, str]] = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    default_obj = cls(path="") if cls is SourceConfig else cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(describe(hint, key + "."))
        elif key == "data.sources":
            rows.append((key, "[]", docs.get(f.name, "")))
            rows.extend(describe(SourceConfig, key + ".<i>."))
        else:
            rows.append((key, repr(getattr(default_obj, f.name)), docs.get(f.name, "")))
    return rows


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _plain_type(hint: Any) -> str:
    """A type as a config value is written: 'auto', true or false, an integer, null."""
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, _type_name(hint))


def _convert(value: Any, hint: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against the type ``hint``; return it converted, or record a problem."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", problems)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], key, problems)
        for option in inner:  # the first type the value fits
            trial: list[str] = []
            converted = _convert(value, option, key, trial)
            if not trial:
                return converted
        allowed = " or ".join(_plain_type(a) for a in args)
        problems.append(f"{key}: expected {allowed}, got {type(value).__name__} {value!r}")
        return value
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            problems.append(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return value
        return {k: _convert(v, args[1], f"{key}.{k}", problems) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return value
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}.{i}", problems) for i, v in enumerate(value))
        if len(value) != len(args):
            problems.append(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(value)
        return tuple(_convert(v, a, f"{key}.{i}", problems) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-3 as a string: its float pattern needs a dot.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: expected a number, got {type(value).__name__} {value!r}")
            return value
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {_type_name(hint)} at {key}")


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    where = prefix.rstrip(".") or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            known = ", ".join(sorted(names))
            problems.append(f"{prefix}{key}: unknown key (known here: {known})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], prefix + f.name, problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{prefix}{f.name}: required")
    if any(p.startswith(prefix) for p in problems) and prefix:
        # Keep going to collect every problem, but do not construct a half-valid object.
        try:
            return cls(**kwargs)
        except TypeError:
            return None
    return cls(**kwargs)


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""Names that become parts of file paths (run_name, tracking.registered_model): letters, digits,
'.', '_' and '-', starting with a letter or digit, so that no name can point outside the
workspace (no '/', no '..')."""


def _validate(cfg: RunConfig, problems: list[str]) -> None:
    """Checks of values that types alone do not catch."""
    d, t, p, loss = cfg.data, cfg.train, cfg.partition, cfg.loss
    for key, value in (("run_name", cfg.run_name), ("tracking.registered_model", cfg.tracking.registered_model)):
        if isinstance(value, str) and not SAFE_NAME.fullmatch(value):
            problems.append(
                f"{key}: {value!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
    if not d.sources:
        problems.append("data.sources: at least one source is required")
    names = [s.name for s in d.sources]
    if len(set(names)) != len(names):
        problems.append(f"data.sources: source names must be unique, got {names}")
    for i, s in enumerate(d.sources):
        for key in ("max_pairs", "sample"):
            value = getattr(s, key)
            if value is not None and value < 1:
                problems.append(f"data.sources.{i}.{key}: must be at least 1, got {value}")
        if s.weight <= 0:
            problems.append(f"data.sources.{i}.weight: must be positive, got {s.weight}")
        for role in s.columns or {}:
            if role not in COLUMN_ROLES:
                problems.append(
                    f"data.sources.{i}.columns.{role}: unknown column role (known: {', '.join(COLUMN_ROLES)})"
                )
    train_sources = [s for s in d.sources if s.use != "eval"]
    if d.sources and not train_sources:
        problems.append("data.sources: every source has use=eval; at least one must train")
    if not 0.0 < d.eval_fraction < 1.0:
        problems.append(f"data.eval_fraction: must be in (0, 1), got {d.eval_fraction}")
    if d.max_prompt_length >= d.max_length:
        problems.append(
            f"data.max_prompt_length: must be below data.max_length ({d.max_length}), got {d.max_prompt_length}"
        )
    for key, value in [
        ("train.epochs", t.epochs),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.grad_accum_steps", t.grad_accum_steps),
        ("train.logprob_chunk_rows", t.logprob_chunk_rows),
        ("train.max_pass_tokens", t.max_pass_tokens if isinstance(t.max_pass_tokens, int) else 1),
        ("train.eval_batch_size", t.eval_batch_size),
        ("train.num_processes", t.num_processes),
        ("data.eval_max_pairs", d.eval_max_pairs),
        ("data.min_pairs_per_step", d.min_pairs_per_step),
    ]:
        if value < 1:
            problems.append(f"{key}: must be at least 1, got {value}")
    if t.checkpoint_every < 0:
        problems.append(f"train.checkpoint_every: must be 0 or more, got {t.checkpoint_every}")
    if t.learning_rate <= 0:
        problems.append(f"train.learning_rate: must be positive, got {t.learning_rate}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        problems.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if loss.beta <= 0:
        problems.append(f"loss.beta: must be positive, got {loss.beta}")
    if not 0.0 <= loss.label_smoothing < 0.5:
        problems.append(f"loss.label_smoothing: must be in [0, 0.5), got {loss.label_smoothing}")
    if loss.label_smoothing and loss.name != "sigmoid":
        problems.append(f"loss.label_smoothing: only applies to loss.name=sigmoid, not {loss.name}")
    if p.num_steps is not None and p.num_steps < 1:
        problems.append(f"partition.num_steps: must be at least 1, got {p.num_steps}")
    if p.sizes is not None:
        if p.strategy == "by_source":
            problems.append(
                "partition.sizes: by_source makes one chunk per source; sizes apply to the other strategies"
            )
        elif not p.sizes or any(x <= 0 for x in p.sizes):
            problems.append(f"partition.sizes: must be positive numbers, got {list(p.sizes)}")
        elif p.num_steps is not None and p.num_steps != len(p.sizes):
            problems.append(f"partition.num_steps: {p.num_steps} does not match the {len(p.sizes)} sizes given")
        elif not all(float(x).is_integer() for x in p.sizes) and abs(sum(p.sizes) - 1.0) > 1e-6:
            problems.append(f"partition.sizes: fractions must sum to 1, got {sum(p.sizes):.6g}")
    if p.strategy == "by_source" and p.num_steps is not None and p.num_steps != len(train_sources):
        problems.append(
            f"partition.num_steps: by_source makes one step per training source ({len(train_sources)}), "
            f"got {p.num_steps}"
        )
    if cfg.storage.uri is not None and not cfg.storage.uri.startswith("s3://"):
        problems.append(f"storage.uri: must be s3://bucket/prefix, got {cfg.storage.uri!r}")
    block = cfg.storage.credentials_block
    if block is not None and not re.fullmatch(r"[a-z0-9-]+/[a-z0-9-]+", block):
        problems.append(
            f"storage.credentials_block: must be <block-type-slug>/<block-name> in lowercase letters, digits "
            f"and dashes (e.g. s3-credentials/prod), got {block!r}"
        )
    if not cfg.run_name or any(c in cfg.run_name for c in "/\\:") or cfg.run_name.startswith("."):
        problems.append(f"run_name: must be a plain name without slashes, got {cfg.run_name!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and its YAML-parsed value."""
    if "=" not in text:
        raise ConfigError([f"{text!r}: an override must look like key.sub=value"])
    key, raw = text.split("=", 1)
    path = [k for k in key.strip().split(".")]
    if not all(path):
        raise ConfigError([f"{text!r}: empty key in override"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError([f"{'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section"])
    last = path[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ConfigError([f"{'.'.join(path)}: no list item {last}"])
        node[int(last)] = value
    else:
        node[last] = value


def from_dict(data: dict[str, Any], origin: str | None = None) -> RunConfig:
    """Build and validate a RunConfig from plain data; raise ConfigError listing every problem."""
    problems: list[str] = []
    cfg = _build(RunConfig, data, "", problems)
    if not problems:
        sources = tuple(
            s if s.name else dataclasses.replace(s, name=_default_source_name(s.path)) for s in cfg.data.sources
        )
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=sources))
        _validate(cfg, problems)
    if problems:
        raise ConfigError(problems, origin)
    return cfg


def _default_source_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".csv", ".parquet"):
        name = name.removesuffix(suffix)
    return name or path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML recipe, apply ``key.sub=value`` overrides, validate.

    Relative data and model paths stay relative to the working directory, as users type them.
    """
    data: dict[str, Any] = {}
    origin = None
    if path is not None:
        origin = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"recipe file not found: {p}"])
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], origin) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"the top level must be a mapping, got {type(loaded).__name__}"], origin)
        data = loaded or {}
    for text in overrides:
        key_path, value = parse_override(text)
        _apply_override(data, key_path, value)
    return from_dict(data, origin)
