"""Run configuration: one typed pydantic model, YAML recipes and ``key.sub=value`` overrides.

Each field's description is its documentation: ``sdpo run --help`` prints it, and the Prefect UI
shows it in the form of a run started from a deployment (the flow's parameter is a RunConfig).
Unknown keys are refused; every problem is reported in one ConfigError naming its key (types by
pydantic, ranges and cross-field rules by config_rules). Parse once, at the edge; pass the object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from sdpo_core.config_rules import ConfigError, default_source_name, describe_errors, number, value_problems
from sdpo_core.hashing import sha256_json
from sdpo_core.overrides import apply_override, parse_override

DataFormat = Literal["auto", "standard", "conversational", "implicit", "hh", "openai", "sharegpt", "scored"]
SourceUse = Literal["split", "train", "eval"]
PartitionStrategy = Literal["by_source", "random", "easy_to_hard", "sequential"]
AccuracyForm = Literal["sum", "mean"]
LossName = Literal["sigmoid", "ipo", "hinge", "dpop"]
Parallelism = Literal["ddp", "fsdp"]


Number = Annotated[float, BeforeValidator(number)]


class Section(BaseModel):
    """A config section: frozen, unknown keys forbidden, every field documented."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _doc(text: str) -> str:  # a description written over several lines, as one line
    return " ".join(text.split())


class SourceConfig(Section):
    """One preference data source."""

    path: StrictStr = Field(
        description=_doc("""A file (JSON array, JSON lines, CSV, Parquet; .gz compressed JSON, JSON lines or
        CSV), a folder of such files, a folder written by datasets' save_to_disk, or a Hugging Face hub
        dataset id.""")
    )
    name: StrictStr = Field(
        "", description="Name of the source, used for by_source chunks and in reports (default: the file stem)."
    )
    format: DataFormat = Field(
        "auto",
        description=_doc("""Row format: standard (prompt/chosen/rejected strings), conversational (TRL's
        message lists), implicit (only chosen/rejected; the prompt is their shared start; hh is an alias),
        openai (input.messages, preferred_output, non_preferred_output), sharegpt (conversations, chosen,
        rejected), scored (chosen/rejected with ratings; ties dropped), or auto (detected from the first
        row)."""),
    )
    split: StrictStr = Field("train", description="Split to read from a hub dataset or a save_to_disk DatasetDict.")
    config_name: StrictStr | None = Field(None, description="Configuration (subset) name of a hub dataset.")
    columns: dict[StrictStr, StrictStr] | None = Field(
        None,
        description=_doc("""Column mapping for any other schema: {prompt, chosen, rejected, score_chosen,
        score_rejected} -> the source's column names."""),
    )
    max_pairs: StrictInt | None = Field(
        None, description="Read at most this many usable pairs (the first ones in file order); None for all."
    )
    sample: StrictInt | None = Field(
        None, description="Keep a seeded random sample of this many pairs (after validation); None keeps all."
    )
    weight: Number = Field(
        1.0,
        description=_doc("""Mixing weight of the source's training pairs: 2 repeats each pair twice, 0.5 keeps
        a seeded half (a rate per source, as in data mixtures)."""),
    )
    use: SourceUse = Field(
        "split",
        description=_doc("""split: hold out data.eval_fraction for evaluation, train on the rest; train: train
        on all; eval: evaluate on all, never train."""),
    )

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and isinstance(data.get("path"), str):
            data = {**data, "name": default_source_name(data["path"])}
        return data


class ModelConfig(Section):
    """The initial model M0."""

    name_or_path: StrictStr = Field(
        "models/stories260K", description="A local Hugging Face model folder (safetensors weights) or a hub id."
    )
    trust_remote_code: StrictBool = Field(
        False, description="Allow model code from the model folder or hub to run. Off unless you trust the source."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype for training and scoring."
    )


class DataConfig(Section):
    """Preference data: sources, prompt formatting, lengths and the held-out split."""

    sources: tuple[SourceConfig, ...] = Field(
        (), description="The sources, each with path, name, format and max_pairs."
    )
    eval_fraction: Number = Field(
        0.1, description="Share of each source's pairs held out for evaluation; never trained on."
    )
    eval_max_pairs: StrictInt = Field(64, description="Cap on held-out pairs per source.")
    max_length: StrictInt = Field(
        256, description="Max tokens of prompt plus completion; completions are cut at the end."
    )
    max_prompt_length: StrictInt = Field(
        128, description="Max prompt tokens; longer prompts keep their end (the most recent turns)."
    )
    seed: StrictInt = Field(
        0, description="Seed of the held-out split, the per-source samples and the weights' subsampling."
    )
    skip_bad_rows: StrictBool = Field(
        False,
        description=_doc("""False: a row that cannot be parsed or lacks a field stops the run, naming the file
        and line. True: such rows are skipped and counted by reason."""),
    )
    long_prompts: Literal["truncate", "drop"] = Field(
        "truncate", description="Prompts over max_prompt_length: truncate (keep the end) or drop the pair (counted)."
    )
    min_pairs_per_step: StrictInt = Field(
        1, description="Fewest training pairs a step may have; a run whose data leaves fewer stops before training."
    )


class PartitionConfig(Section):
    """How the training pairs are split into the steps D1..DT."""

    strategy: PartitionStrategy = Field(
        "by_source",
        description=_doc("""by_source: one chunk per source, ordered easy to hard by M0's reward accuracy
        (sDPO, section 3.2); random: chunks of the pooled, shuffled pairs (the paper's ablation);
        easy_to_hard: the pooled pairs ordered by M0's gamma, highest (easiest) first, then cut (a
        pair-level curriculum, future work in the paper); sequential: the pooled pairs in the order given
        (sources in recipe order, rows in file order), then cut."""),
    )
    num_steps: StrictInt | None = Field(
        None,
        description=_doc("""T, the number of steps (1 is plain DPO). by_source: the number of sources (None
        means that); the other strategies: None means 2, or the number of ``sizes``."""),
    )
    sizes: tuple[Number, ...] | None = Field(
        None,
        description=_doc("""Explicit chunk sizes for random, easy_to_hard and sequential: pair counts (whole
        numbers, summing to at most the training pairs) or fractions (summing to 1). None: equal chunks."""),
    )
    accuracy: AccuracyForm = Field(
        "sum",
        description=_doc("""M0's reward accuracy per source: share of pairs with gamma > 0, where gamma uses
        summed completion log-probs (sum) or mean per-token log-probs (mean, length-normalised). The same
        form orders pairs for easy_to_hard."""),
    )
    seed: StrictInt = Field(0, description="Seed of the random strategy's shuffle.")

    def pooled_num_steps(self) -> int:
        """T of a pooled strategy: num_steps, else the number of sizes, else 2 (the paper's T)."""
        return self.num_steps if self.num_steps is not None else len(self.sizes) if self.sizes else 2


class LossConfig(Section):
    """The DPO-family loss (see sdpo_core.losses)."""

    name: LossName = Field("sigmoid", description="sigmoid (DPO), ipo, hinge, dpop (DPO-Positive).")
    beta: Number = Field(0.1, description="Inverse temperature of the implicit reward, beta in the DPO paper.")
    label_smoothing: Number = Field(
        0.0, description="Conservative DPO: assumed share of flipped labels (sigmoid only), in [0, 0.5)."
    )
    dpop_lambda: Number = Field(
        50.0,
        description="DPO-Positive's lambda: weight of the penalty when the chosen log-prob falls below the reference.",
    )
    nll_weight: Number = Field(
        0.0,
        description="Weight of an extra NLL term on the chosen completion (mean per token), as in RPO; 0 disables.",
    )


class TrainConfig(Section):
    """One DPO step's optimisation."""

    epochs: StrictInt = Field(1, description="Passes over the step's chunk.")
    micro_batch_size: StrictInt = Field(8, description="Pairs per forward/backward pass.")
    grad_accum_steps: StrictInt = Field(
        1, description="Micro-batches per optimizer step; global batch = micro_batch_size * grad_accum_steps."
    )
    learning_rate: Number = Field(5e-4, description="Peak AdamW learning rate.")
    weight_decay: Number = Field(0.0, description="AdamW decoupled weight decay.")
    adam_betas: tuple[Number, Number] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_ratio: Number = Field(
        0.1, description="Share of optimizer steps with linear warmup; then cosine decay to min_lr_ratio."
    )
    min_lr_ratio: Number = Field(0.0, description="Learning rate at the end of the cosine, as a share of the peak.")
    max_grad_norm: Number = Field(1.0, description="Clip the global gradient norm to this; 0 disables.")
    seed: StrictInt = Field(
        0, description="Seed of shuffling and initialisation; a CPU run with the same seed repeats exactly."
    )
    device: StrictStr = Field("auto", description="cpu, cuda, cuda:N or auto (cuda when available).")
    shared_prompt: Literal["auto"] | StrictBool = Field(
        "auto",
        description=_doc("""Compute each pair's prompt once for both completions (one row
        [prompt|chosen|rejected]) instead of two padded rows; the log-probs are the same. Attention is split
        in two calls per layer (prompt + chosen, causal; the rejected tokens over prompt + rejected) for
        models that dispatch it through transformers' attention interface, a 4-D mask for others (eager,
        sdpa; set false for other implementations). auto is true on a CPU and false on a GPU, where it
        measured slower than padded rows, split attention included (benchmarks/results/gpu)."""),
    )
    max_pass_tokens: Literal["auto"] | StrictInt | None = Field(
        "auto",
        description=_doc("""Padded tokens per forward/backward pass: each micro-batch is cut into
        length-sorted passes of at most this many tokens (2 x pairs x longest row). Same update, less padding
        and less activation memory; None runs each micro-batch in one pass. auto is 1024 on a CPU and None on
        a GPU."""),
    )
    gradient_checkpointing: StrictBool = Field(
        False,
        description=_doc("""Keep only each decoder layer's input during the forward and recompute the layer in
        the backward pass (torch's non-reentrant activation checkpointing, through transformers): far less
        activation memory for about one more forward pass of compute. Split attention is recomputed with its
        own layout, so the shared-prompt layout keeps it."""),
    )
    logprob_chunk_rows: StrictInt = Field(
        2048, description="Completion tokens per chunk of the output projection and log-softmax."
    )
    eval_batch_size: StrictInt = Field(
        16, description="Pairs per batch when scoring (reference log-probs, evaluation)."
    )
    checkpoint_every: StrictInt = Field(
        25,
        description=_doc("""Save a checkpoint of the train step (weights, optimizer, scheduler, data position,
        random states) every this many optimizer steps, and after the last; 0 saves only after the last. A
        rerun of the same pipeline continues an unfinished step from its newest checkpoint."""),
    )
    deployment: StrictStr | None = Field(
        None,
        description=_doc("""Run each train step as a run of this Prefect deployment (``flow/deployment``, e.g.
        sdpo_train_step/sdpo-train-step on a GPU work pool) and wait for it; None trains in-process."""),
    )
    num_processes: StrictInt = Field(
        1,
        description=_doc("""Data-parallel processes for a train step; above 1 the step runs under torchrun,
        each process on its share of every micro-batch (one per GPU, or CPU processes with gloo)."""),
    )
    distributed_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend: auto is nccl on GPUs, gloo on CPUs."
    )
    parallelism: Parallelism = Field(
        "ddp",
        description=_doc("""With num_processes above 1: ddp keeps a whole copy of the model in every process
        and all-reduces gradients once per optimizer step (torch's DistributedDataParallel); fsdp shards
        parameters, gradients and optimizer state across the processes (torch's fully_shard, one unit per
        decoder layer; gradients are reduce-scattered every pass, so they stay sharded), for models whose
        training state does not fit one GPU. The update is the same."""),
    )
    num_threads: StrictInt | None = Field(None, description="torch CPU threads; None keeps torch's default.")


class TrackingConfig(Section):
    """MLflow tracking and registry."""

    tracking_uri: StrictStr | None = Field(
        None, description="MLflow tracking URI; None uses SQLite in the workspace (or MLFLOW_TRACKING_URI if set)."
    )
    experiment: StrictStr = Field("sdpo", description="MLflow experiment name.")
    artifact_location: StrictStr | None = Field(
        None,
        description=_doc("""Where a new experiment keeps its artifacts (every step's model): a folder, or
        ``s3://bucket/prefix`` (boto3; endpoint and credentials from storage.credentials_block, else
        from MLFLOW_S3_ENDPOINT_URL and boto3's chain). None: the workspace's mlartifacts/ with a local store, else the server's default.
        Uploads to S3 are verified (size and checksum) before a model version points to them."""),
    )
    registered_model: StrictStr = Field(
        "sdpo-model", description="Registered model whose versions are the step models; aliases step-<t> and final."
    )


class StorageConfig(Section):
    """Where the run's intermediate files live besides the workspace."""

    uri: StrictStr | None = Field(
        None,
        description=_doc("""``s3://bucket/prefix``: every file one stage hands to another (data splits,
        chunks, partition, cached log-probs, reports) is uploaded there, verified, and downloaded by a stage
        that does not find it locally, so steps can run on other machines. None: the workspace only."""),
    )
    credentials_block: StrictStr | None = Field(
        None,
        description=_doc("""A Prefect block holding the S3 credentials, region and endpoint,
        ``<block-type-slug>/<name>`` (``s3-credentials/prod``, or prefect-aws's ``aws-credentials/<name>``):
        read when the pipeline and each train step start, its values win over the environment's for every S3
        upload and download (boto3 and MLflow). None: boto3's usual chain (environment, config files)."""),
    )


class RunConfig(Section):
    """A stepwise DPO run."""

    run_name: StrictStr = Field(
        "sdpo", description="Name of the pipeline run (MLflow parent run, Prefect flow run, workspace folder)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The initial model M0.")
    data: DataConfig = Field(default_factory=DataConfig, description="Preference data.")
    partition: PartitionConfig = Field(default_factory=PartitionConfig, description="How the data is split into steps.")
    loss: LossConfig = Field(default_factory=LossConfig, description="The DPO-family loss.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation of each step.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Artifact storage for intermediate files (S3)."
    )

    @model_validator(mode="after")
    def _check_values(self, info: ValidationInfo) -> RunConfig:
        # from_dict collects these itself, to report them with the type problems' key format;
        # a config validated elsewhere (a deployment run's parameters) is checked here.
        if not (info.context or {}).get("values_checked_by_caller"):
            problems = value_problems(self)
            if problems:
                raise ValueError("; ".join(problems))
        return self

    def planned_steps(self) -> int:
        """T: one step per training source for by_source, else the pooled strategy's count."""
        if self.partition.strategy == "by_source":
            return sum(1 for s in self.data.sources if s.use != "eval")
        return self.partition.pooled_num_steps()

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-able data (tuples as lists)."""
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """A short content hash of the resolved config."""
        return sha256_json(self.to_dict())[:16]


def from_dict(data: Any, origin: str | None = None) -> RunConfig:
    """Build and validate a RunConfig from plain data; raise ConfigError listing every problem."""
    try:
        cfg = RunConfig.model_validate(data if data is not None else {}, context={"values_checked_by_caller": True})
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, RunConfig), origin) from None
    problems = value_problems(cfg)
    if problems:
        raise ConfigError(problems, origin)
    return cfg


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
        apply_override(data, key_path, value)
    return from_dict(data, origin)
