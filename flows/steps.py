"""One sDPO step as the flows run it (the pipeline and a continue run alike): reuse the version a
rerun finds registered, or score the reference, train, evaluate and register the step model."""

from __future__ import annotations

from collections.abc import Callable

from flows.train_step import run_train_deployment
from sdpo_core.config import RunConfig
from sdpo_core.records import ChunkInfo, TrainStepSpec
from tasks.context import RunContext
from tasks.registry import find_finished_step, register_step
from tasks.tracking import model_uri, version_uri
from tasks.training import clear_checkpoints, evaluate_step, mean_reference, reference_logps, train_step


def run_one_step(
    cfg: RunConfig,
    ctx: RunContext,
    chunk: ChunkInfo,
    versions: dict[int, str],
    eval_path: str,
    m0_eval: str,
    prev_eval: str,
    schedule: tuple[int, int] = (0, 0),
    reusable: Callable[[str], bool] | None = None,
) -> tuple[dict, str]:
    """Step ``chunk.step``: M(t) from, and against, M(t-1) = ``versions[t - 1]`` (sDPO, arXiv
    2403.19270, section 3.2); fills ``versions[t]``.

    Args:
        eval_path: the held-out pairs; ``m0_eval`` and ``prev_eval`` are M0's and M(t-1)'s scores
            of them.
        schedule: (offset, total) of the learning-rate schedule under train.carry_optimizer;
            (0, 0) is the step's own schedule.
        reusable: whether a version registered for this step by an earlier run may be reused (a
            continue run refuses versions a rollback abandoned); None reuses any.

    Returns:
        The step's report row and the path of M(t)'s eval scores (the next step's ``prev_eval``).
    """
    name = ctx.model_name
    ref_version = versions[chunk.step - 1]
    row = {"step": chunk.step, "chunk": chunk.label, "pairs": chunk.size, "m0_accuracy": chunk.m0_accuracy}
    # A rerun (same name, config, chunk and reference) reuses the step's registered version.
    done = find_finished_step(cfg, ctx, chunk, ref_version)
    if done is not None and reusable is not None and not reusable(done["version"]):
        done = None
    if done is not None:
        version, metrics = done["version"], done["metrics"]
        prev_eval = reference_logps(cfg, ctx, version_uri(name, version), eval_path, "eval")
        row |= {"train_loss": done["train_loss"], "optimizer_steps": done["optimizer_steps"], "reused": True}
    else:
        ref_uri = version_uri(name, ref_version)
        ref_scores = reference_logps(cfg, ctx, ref_uri, chunk.path, f"chunk-{chunk.step}")
        if cfg.loss.reference == "mean" and chunk.step > 1:  # a multi-reference loss: M0 .. M(t-1)
            earlier = [
                reference_logps(cfg, ctx, version_uri(name, versions[s]), chunk.path, f"chunk-{chunk.step}")
                for s in range(chunk.step - 1)
            ]
            ref_scores = mean_reference(ctx, [*earlier, ref_scores], chunk.step)
        # train.init=base (the paper's Fig. 3 control): the policy starts from M0, the reference
        # is still M(t-1).
        init_uri = version_uri(name, versions[0]) if cfg.train.init == "base" and chunk.step > 1 else ""
        spec = TrainStepSpec(
            config=cfg, chunk=chunk, ref_uri=ref_uri, ref_scores=ref_scores, init_uri=init_uri,
            schedule_offset=schedule[0], schedule_total=schedule[1],
        )  # fmt: skip
        trained = run_train_deployment(ctx, spec) if cfg.train.deployment else train_step(ctx, spec)
        metrics, prev_eval = evaluate_step(cfg, ctx, chunk, trained, eval_path, m0_eval, prev_eval, ref_scores)
        version = register_step(
            cfg, ctx, chunk, trained.model_dir, trained.run_id, ref_version, metrics,
            trained.final_loss, trained.optimizer_steps,
        )  # fmt: skip
        if trained.checkpoint_dir:  # registered: its checkpoints are no longer needed
            clear_checkpoints(ctx, trained.checkpoint_dir)
        row |= {"train_loss": trained.final_loss, "optimizer_steps": trained.optimizer_steps, "reused": False}
    versions[chunk.step] = version
    return row | {"version": version, "model_uri": model_uri(name, chunk.step), **metrics}, prev_eval
