"""Run configuration: one typed pydantic model, YAML recipes and ``key.sub=value`` overrides.

Each field's description is its documentation: ``sdpo run --help`` prints it, and the Prefect UI
shows it in the form of a run started from a deployment (the flow's parameter is a RunConfig).
Unknown keys are refused; every problem is reported in one ConfigError naming its key (types by
pydantic, ranges and cross-field rules by config_rules). Parse once, at the edge; pass the object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from sdpo_core.config_rules import ConfigError, describe_errors, value_problems
from sdpo_core.config_sections import (
    AccuracyForm,
    DataConfig,
    DataFormat,
    EvaluateConfig,
    LoraConfig,
    LossConfig,
    LossName,
    ModelConfig,
    Number,
    Parallelism,
    PartitionConfig,
    PartitionStrategy,
    Section,
    SourceConfig,
    SourceUse,
    StorageConfig,
    TrackingConfig,
    one_line,
)
from sdpo_core.hashing import sha256_json
from sdpo_core.overrides import apply_override, parse_override

__all__ = [
    "AccuracyForm", "ConfigError", "DataConfig", "DataFormat", "LossConfig", "LossName", "ModelConfig",
    "Parallelism", "LoraConfig", "PartitionConfig", "PartitionStrategy", "RunConfig", "SourceConfig", "SourceUse",
    "StorageConfig", "TrackingConfig", "TrainConfig", "from_dict", "load_config",
]  # fmt: skip


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
    shared_prompt: Literal["auto", "packed"] | StrictBool = Field(
        "auto",
        description=one_line("""Compute each pair's prompt once for both completions (one row
        [prompt|chosen|rejected]) instead of two padded rows; the log-probs are the same. Attention is split
        in two calls per layer (prompt + chosen, causal; the rejected tokens over prompt + rejected) for
        models that dispatch it through transformers' attention interface, a 4-D mask for others (eager,
        sdpa; set false for other implementations). packed: several pairs per row of packed_row_tokens
        tokens, each as prompt, chosen, rejected, with FlexAttention block masks (no padding inside a row,
        one shape per run). auto is true on a CPU and false on a GPU, where it measured slower than padded
        rows, split attention included (benchmarks/results/gpu)."""),
    )
    packed_row_tokens: StrictInt = Field(
        2048,
        description=one_line("""Row length of the packed layout (shared_prompt: packed), fixed for the whole run so
        that shapes repeat: a pass is a few such rows. A pair longer than this widens every row of the run to
        the next multiple of 128 that holds it."""),
    )
    compile: StrictBool = Field(
        False,
        description=one_line("""Regional torch.compile: each decoder layer is compiled once (they share one
        graph), the rest runs eagerly. Rows are padded to a few fixed widths so that shapes repeat; the first
        passes pay the compilation."""),
    )
    max_pass_tokens: Literal["auto"] | StrictInt | None = Field(
        "auto",
        description=one_line("""Padded tokens per forward/backward pass: each micro-batch is cut into
        length-sorted passes of at most this many tokens (2 x pairs x longest row). Same update, less padding
        and less activation memory; None runs each micro-batch in one pass. auto is 1024 on a CPU and None on
        a GPU."""),
    )
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16-pure"] = Field(
        "auto",
        description=one_line("""fp32; bf16-mixed or fp16-mixed: fp32 master weights updated by AdamW, the
        forward and backward under bf16 or fp16 autocast (fp16 with loss scaling); bf16-pure: bf16
        weights updated in place, which rounds away most updates at DPO learning rates (it warns below
        1e-4). auto follows model.dtype (see there). The reference is scored in the same precision."""),
    )
    init: Literal["previous", "base"] = Field(
        "previous",
        description=one_line("""Where step t's policy starts. previous: M(t-1), the reference too (sDPO);
        base: M0, with M(t-1) still the reference (the paper's Fig. 3 control)."""),
    )
    disable_dropout: StrictBool = Field(
        True,
        description=one_line("""Set every dropout layer of the policy to p = 0 while it trains (TRL's
        DPOConfig default): the policy's log-probs are then those the reference was scored with.
        Llama-style models have none; GPT-2- or OPT-style ones do."""),
    )
    gradient_checkpointing: StrictBool = Field(
        False,
        description=one_line("""Keep only each decoder layer's input during the forward and recompute the layer in
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
    score_pass_tokens: Literal["auto"] | StrictInt | None = Field(
        "auto",
        description=one_line("""Padded tokens per forward-only pass when scoring (reference log-probs,
        evaluation): length-sorted pairs are taken while rows x longest row stay within it (a longer pair
        goes alone). None scores eval_batch_size pairs per pass. auto is 32768 on a GPU and None on a CPU."""),
    )
    checkpoint_every: StrictInt = Field(
        25,
        description=one_line("""Save a checkpoint of the train step (weights, optimizer, scheduler, data position,
        random states) every this many optimizer steps, and after the last; 0 saves only after the last. A
        rerun of the same pipeline continues an unfinished step from its newest checkpoint."""),
    )
    deployment: StrictStr | None = Field(
        None,
        description=one_line("""Run each train step as a run of this Prefect deployment (``flow/deployment``, e.g.
        sdpo_train_step/sdpo-train-step on a GPU work pool) and wait for it; None trains in-process."""),
    )
    num_processes: StrictInt = Field(
        1,
        description=one_line("""Data-parallel processes for a train step; above 1 the step runs under torchrun,
        each process on its share of every micro-batch (one per GPU, or CPU processes with gloo)."""),
    )
    distributed_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend: auto is nccl on GPUs, gloo on CPUs."
    )
    parallelism: Parallelism = Field(
        "ddp",
        description=one_line("""With num_processes above 1: ddp keeps a whole copy of the model in every process
        and all-reduces gradients once per optimizer step (torch's DistributedDataParallel); fsdp shards
        parameters, gradients and optimizer state across the processes (torch's fully_shard, one unit per
        decoder layer; gradients are reduce-scattered every pass, so they stay sharded), for models whose
        training state does not fit one GPU. The update is the same."""),
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA for each train step (off: r = 0).")
    carry_optimizer: StrictBool = Field(
        False,
        description=one_line("""Carry AdamW's moments and the learning-rate schedule across sDPO steps: step t starts
        from the optimizer state M(t-1) was saved with, and one warmup + cosine runs over the whole chain. Off:
        each step restarts both (the paper). Tells the reference's effect apart from optimizer restarts."""),
    )
    num_threads: StrictInt | None = Field(None, description="torch CPU threads; None keeps torch's default.")


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
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Harness evaluation of step models.")

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

    def data_hash(self) -> str:
        """A short content hash of what the prepared data depends on: the model (its tokenizer)
        and the data section. Runs that differ elsewhere (an experiment's arms) share one
        preparation."""
        data = self.to_dict()
        return sha256_json({"model": data["model"], "data": data["data"]})[:16]


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
        data = load_yaml_mapping(Path(path))
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(data, key_path, value)
    return from_dict(data, origin)


def load_yaml_mapping(p: Path) -> dict[str, Any]:
    """A recipe file's top-level mapping (safe YAML); ConfigError naming the file otherwise."""
    origin = str(p)
    if not p.is_file():
        raise ConfigError([f"recipe file not found: {p}"])
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], origin) from None
    except RecursionError:
        raise ConfigError(["YAML nested too deeply"], origin) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text: {exc}"], origin) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError([f"the top level must be a mapping, got {type(loaded).__name__}"], origin)
    return loaded or {}
