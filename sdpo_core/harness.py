"""lm-evaluation-harness on a step model (``evaluate.harness``; the ``harness`` extra).

The paper reports its models on the H4 set (ARC, HellaSwag, MMLU, TruthfulQA) through the
harness. Here it runs on each step's model folder, where the step trained, and its scores come
back as flat metric names, ``harness/<task>/<metric>``, for the step's MLflow run. Values in,
values out: the folder and the settings in, the scores out.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from sdpo_core.config import ConfigError, RunConfig
from sdpo_core.config_sections import HarnessConfig

INSTALL_HINT = "pip install 'sdpo[harness]' (lm-evaluation-harness)"


def enabled(cfg: RunConfig) -> bool:
    """Whether the run evaluates its step models with the harness."""
    return bool(cfg.evaluate.harness.tasks)


def check_available(cfg: RunConfig) -> None:
    """Fail with one ConfigError when the harness is asked for but lm_eval is not installed, or
    its include_path is not a folder: before any step trains, not after the first one."""
    if not enabled(cfg):
        return
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError([f"evaluate.harness.tasks is set but lm_eval is not installed: {INSTALL_HINT}"])
    include = cfg.evaluate.harness.include_path
    if include is not None and not Path(include).expanduser().is_dir():
        raise ConfigError([f"evaluate.harness.include_path: {include} is not a folder"])


def metric_name(task: str, key: str) -> str:
    """``harness/<task>/<metric>`` from the harness's ``<metric>,<filter>`` key (the filter
    ``none`` dropped); characters MLflow refuses in a metric name become ``_``."""
    metric, _, filt = key.partition(",")
    name = f"{task}/{metric}" if filt in ("", "none") else f"{task}/{metric}_{filt}"
    return "harness/" + re.sub(r"[^\w\-. /]", "_", name)


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The harness's ``results`` (per task: ``"acc,none": 0.5``, ...) as metric name -> value;
    entries that are not finite numbers (``"N/A"`` standard errors, names) are left out."""
    out: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            if key in ("alias", "name", "sample_len") or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                out[metric_name(task, key)] = float(value)
    return out


def harness_scores(model_dir: str | Path, cfg: HarnessConfig, device: str, dtype: str = "float32") -> dict[str, float]:
    """Run the harness's tasks on the model in ``model_dir`` (a full model folder, safetensors)
    and return its scores as ``harness/<task>/<metric>`` -> value.

    Args:
        model_dir: the step model's folder.
        cfg: the tasks, example limit, batch size, few-shot count and custom task folder.
        device: where the model runs (cpu, cuda, cuda:N).
        dtype: the dtype the harness loads the weights in.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    include = str(Path(cfg.include_path).expanduser()) if cfg.include_path else None
    manager = TaskManager(include_path=include)
    missing = [t for t in cfg.tasks if t not in manager.all_tasks]
    if missing:
        raise ConfigError([f"evaluate.harness.tasks: unknown task(s) {', '.join(missing)} (include_path: {include})"])
    output = lm_eval.simple_evaluate(
        model="hf",
        # safetensors only, and no remote code: the harness loads the folder as sdpo would.
        model_args={"pretrained": str(model_dir), "dtype": dtype, "trust_remote_code": False},
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size,
        device=device,
        limit=cfg.limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,  # no bootstrap standard errors: minutes on large tasks, and not logged
    )
    if output is None:  # the harness returns None on processes other than rank 0
        return {}
    return flatten_results(output["results"])
