"""The sections of the run configuration (sdpo_core.config): the model, data, partition, loss,
tracking and storage settings, each a frozen pydantic model with a description per field."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from sdpo_core.config_rules import default_source_name, number

DataFormat = Literal["auto", "standard", "conversational", "implicit", "hh", "openai", "sharegpt", "scored", "pairwise"]
SourceUse = Literal["split", "train", "eval"]
PartitionStrategy = Literal["by_source", "random", "easy_to_hard", "sequential"]
AccuracyForm = Literal["sum", "mean"]
LossName = Literal["sigmoid", "ipo", "hinge", "dpop"]
Parallelism = Literal["ddp", "fsdp"]


Number = Annotated[float, BeforeValidator(number)]


class Section(BaseModel):
    """A config section: frozen, unknown keys forbidden, every field documented."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def one_line(text: str) -> str:  # a description written over several lines, as one line
    return " ".join(text.split())


class SourceConfig(Section):
    """One preference data source."""

    path: StrictStr = Field(
        description=one_line("""A file (JSON array, JSON lines, CSV, Parquet; .gz compressed JSON, JSON lines or
        CSV), a folder of such files, a folder written by datasets' save_to_disk, or a Hugging Face hub
        dataset id.""")
    )
    name: StrictStr = Field(
        "", description="Name of the source, used for by_source chunks and in reports (default: the file stem)."
    )
    format: DataFormat = Field(
        "auto",
        description=one_line("""Row format: standard (prompt/chosen/rejected strings), conversational (TRL's
        message lists), implicit (only chosen/rejected; the prompt is their shared start; hh is an alias),
        openai (input.messages, preferred_output, non_preferred_output), sharegpt (conversations, chosen,
        rejected), scored (chosen/rejected with ratings; ties dropped), pairwise (prompt, response_a,
        response_b, winner a/b/tie; ties dropped), or auto (detected from the first row)."""),
    )
    split: StrictStr = Field("train", description="Split to read from a hub dataset or a save_to_disk DatasetDict.")
    config_name: StrictStr | None = Field(None, description="Configuration (subset) name of a hub dataset.")
    columns: dict[StrictStr, StrictStr] | None = Field(
        None,
        description=one_line("""Column mapping for any other schema: {prompt, chosen, rejected, score_chosen,
        score_rejected, response_a, response_b, winner} -> the source's column names."""),
    )
    max_pairs: StrictInt | None = Field(
        None, description="Read at most this many usable pairs (the first ones in file order); None for all."
    )
    sample: StrictInt | None = Field(
        None, description="Keep a seeded random sample of this many pairs (after validation); None keeps all."
    )
    weight: Number = Field(
        1.0,
        description=one_line("""Mixing weight of the source's training pairs: 2 repeats each pair twice, 0.5 keeps
        a seeded half (a rate per source, as in data mixtures)."""),
    )
    use: SourceUse = Field(
        "split",
        description=one_line("""split: hold out data.eval_fraction for evaluation, train on the rest; train: train
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
        "float32",
        description=one_line("""The model's compute dtype when train.precision is auto: bfloat16 or float16
        train in that mixed precision (fp32 master weights), float32 trains in bf16-mixed on a GPU that
        supports bf16 and in fp32 elsewhere. M0 is read in the master weights' dtype."""),
    )
    save_dtype: Literal["master", "float32", "bfloat16", "float16"] = Field(
        "master",
        description=one_line("""The dtype step models are saved and registered in. master (the master
        weights' dtype, fp32 unless bf16-pure) keeps every update: a step model is the next step's
        reference and start, so an update rounded away on saving is lost for the steps after it."""),
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
        description=one_line("""False: a row that cannot be parsed or lacks a field stops the run, naming the file
        and line. True: such rows are skipped and counted by reason."""),
    )
    long_prompts: Literal["truncate", "drop"] = Field(
        "truncate", description="Prompts over max_prompt_length: truncate (keep the end) or drop the pair (counted)."
    )
    min_pairs_per_step: StrictInt = Field(
        1, description="Fewest training pairs a step may have; a run whose data leaves fewer stops before training."
    )
    watch: StrictStr | None = Field(
        None,
        description=one_line("""A folder or ``s3://bucket/prefix`` of preference batches for ``sdpo run --continue``
        (flows/continual.py): every data file in it is one batch, and each file holding pairs the chain has
        not trained on becomes the next step (one step per file, in name order). None: no continual runs."""),
    )


class PartitionConfig(Section):
    """How the training pairs are split into the steps D1..DT."""

    strategy: PartitionStrategy = Field(
        "by_source",
        description=one_line("""by_source: one chunk per source, ordered easy to hard by M0's reward accuracy
        (sDPO, section 3.2); random: chunks of the pooled, shuffled pairs (the paper's ablation);
        easy_to_hard: the pooled pairs ordered by M0's gamma, highest (easiest) first, then cut (a
        pair-level curriculum, future work in the paper); sequential: the pooled pairs in the order given
        (sources in recipe order, rows in file order), then cut."""),
    )
    num_steps: StrictInt | None = Field(
        None,
        description=one_line("""T, the number of steps (1 is plain DPO). by_source: the number of sources (None
        means that); the other strategies: None means 2, or the number of ``sizes``."""),
    )
    sizes: tuple[Number, ...] | None = Field(
        None,
        description=one_line("""Explicit chunk sizes for random, easy_to_hard and sequential: pair counts (whole
        numbers, summing to at most the training pairs) or fractions (summing to 1). None: equal chunks."""),
    )
    accuracy: AccuracyForm = Field(
        "sum",
        description=one_line("""M0's reward accuracy per source: share of pairs with gamma > 0, where gamma uses
        summed completion log-probs (sum) or mean per-token log-probs (mean, length-normalised). The same
        form orders pairs for easy_to_hard."""),
    )
    seed: StrictInt = Field(0, description="Seed of the random strategy's shuffle.")
    order: Literal["easy_to_hard", "hard_to_easy"] = Field(
        "easy_to_hard",
        description=one_line("""The order of by_source's and easy_to_hard's chunks: easy_to_hard is the paper's
        (M0's accuracy or gamma highest first); hard_to_easy reverses it, as a control."""),
    )

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
    reference: Literal["previous", "mean"] = Field(
        "previous",
        description=one_line("""The reference log-probs of step t. previous: M(t-1)'s (sDPO). mean: the mean of
        M0 .. M(t-1)'s log-probs, a multi-reference loss (the geometric mean of the reference models, in the
        spirit of MRPO); the policy still starts from M(t-1)."""),
    )


class LoraConfig(Section):
    """LoRA for each train step (peft): the policy is M(t-1) plus a fresh adapter."""

    r: StrictInt = Field(0, description="Adapter rank; 0 trains every weight (no LoRA).")
    alpha: Number = Field(16.0, description="LoRA's alpha: the adapter's update is scaled by alpha / r.")
    dropout: Number = Field(0.0, description="Dropout on the adapter's input.")
    target_modules: tuple[StrictStr, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        description="Names of the linear layers that get an adapter (Llama's attention projections by default).",
    )
    registered_as: Literal["merged", "adapter"] = Field(
        "merged",
        description=one_line("""merged: after the step the adapter is merged into the weights and the
        full model is registered, which then serves as the next step's reference and start. adapter:
        only the adapter is registered (peft's files, safetensors), its base version and the base's
        sha256 in its tags and meta.json; whatever loads it (the next step, reference scoring,
        evaluation) merges it into its base, resolving a chain of adapters down to a full model."""),
    )


class HarnessConfig(Section):
    """lm-evaluation-harness on each step's model (the ``harness`` extra)."""

    tasks: tuple[StrictStr, ...] = Field(
        (),
        description=one_line("""lm-evaluation-harness task names (e.g. arc_challenge, hellaswag, mmlu,
        truthfulqa_mc2: the paper's H4 set) run on each step's model where it trained; their scores
        become the step run's MLflow metrics harness/<task>/<metric>. Empty: off. Needs
        pip install 'sdpo[harness]'."""),
    )
    limit: StrictInt | None = Field(
        None, description="Examples per task (the harness's limit, for a quick look); None: every example."
    )
    batch_size: StrictInt = Field(8, description="The harness's batch size.")
    num_fewshot: StrictInt | None = Field(None, description="Few-shot examples per prompt; None: each task's default.")
    include_path: StrictStr | None = Field(
        None, description="A folder of custom task YAML files for the harness to find besides its own."
    )


class EvaluateConfig(Section):
    """Evaluation of each step's model beyond the held-out reward metrics."""

    harness: HarnessConfig = Field(
        default_factory=HarnessConfig, description="lm-evaluation-harness on each step's model (off by default)."
    )
    samples: StrictInt = Field(
        8,
        description=one_line("""Eval prompts that M0 and every step's model continue (seeded, the same random
        numbers for each model), logged as one MLflow table on the parent run (samples/generations.json, a
        column per model) and as generations.json in the run folder. 0: off."""),
    )
    sample_tokens: StrictInt = Field(32, description="Most new tokens of each sample generation.")


class TrackingConfig(Section):
    """MLflow tracking and registry."""

    tracking_uri: StrictStr | None = Field(
        None, description="MLflow tracking URI; None uses SQLite in the workspace (or MLFLOW_TRACKING_URI if set)."
    )
    experiment: StrictStr = Field("sdpo", description="MLflow experiment name.")
    artifact_location: StrictStr | None = Field(
        None,
        description=one_line("""Where a new experiment keeps its artifacts (every step's model): a folder, or
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
        description=one_line("""``s3://bucket/prefix``: every file one stage hands to another (data splits,
        chunks, partition, cached log-probs, reports) is uploaded there, verified, and downloaded by a stage
        that does not find it locally, so steps can run on other machines. None: the workspace only."""),
    )
    credentials_block: StrictStr | None = Field(
        None,
        description=one_line("""A Prefect block holding the S3 credentials, region and endpoint,
        ``<block-type-slug>/<name>`` (``s3-credentials/prod``, or prefect-aws's ``aws-credentials/<name>``):
        read when the pipeline and each train step start, its values win over the environment's for every S3
        upload and download (boto3 and MLflow). None: boto3's usual chain (environment, config files)."""),
    )
