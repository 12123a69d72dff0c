"""Injected faults: a run killed in the middle of a train step, two runs at once in one workspace.

Each run is `python -m flows.cli run` in its own process (its own temporary Prefect server),
as a user would start it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flows.test_pipeline import REPO, registry, run_cli_process, write_recipe

HH = {"name": "hh", "path": str(REPO / "data/hh-rlhf_helpful-base_test.jsonl.gz"), "format": "hh", "max_pairs": 240}
ORCA = {"name": "orca", "path": str(REPO / "data/orca_dpo_pairs_validation_msfoundry.jsonl"), "max_pairs": 20}


def _recipe(tmp_path: Path, name: str) -> Path:
    """Two steps, one per source; the hh step is ~100 optimizer steps, checkpointed every 5."""
    return write_recipe(
        tmp_path,
        name,
        data__sources=[ORCA, HH],
        train__micro_batch_size=2,
        train__grad_accum_steps=1,
        train__checkpoint_every=5,
        train__num_threads=1,
    )


def _env(workspace: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HF_"))}
    return env | {"SDPO_HOME": str(workspace), "HF_HUB_OFFLINE": "1"}


def _final_weights(workspace: Path) -> dict[int, str]:
    """weights_sha256 of each step model the workspace's runs saved, by step."""
    found = {}
    for meta in workspace.glob("runs/*/models/step-*/meta.json"):
        data = json.loads(meta.read_text())
        found[data["step"]] = data["weights_sha256"]
    return found


@pytest.mark.slow
def test_killed_mid_step_then_rerun_resumes_and_registers_each_step_once(tmp_path: Path) -> None:
    killed_ws, whole_ws = tmp_path / "killed", tmp_path / "whole"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    recipe = _recipe(tmp_path / "a", "crash")

    # 1. Start the run; SIGKILL it (the CLI and the Prefect server it started) once step 2 has
    #    written its second checkpoint, long before the step ends (the orca step has fewer than
    #    10 optimizer steps: this is the hh step, first or second by M0's accuracy).
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "-c", str(recipe)],
        cwd=REPO, env=_env(killed_ws), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 400
    pointer = None
    while time.monotonic() < deadline and proc.poll() is None:
        for candidate in killed_ws.glob("checkpoints/crash-step-*/latest"):
            try:
                newest = candidate.read_text().strip()
            except FileNotFoundError:  # a finished step's checkpoints, removed meanwhile
                continue
            if newest >= "step-00000010":
                pointer = candidate
        if pointer is not None:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate(timeout=60)[0].decode()
    assert pointer is not None, f"no checkpoint of step 2 appeared before the run ended:\n{out[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    killed_step = int(pointer.parent.name.split("-step-")[1].split("-")[0])
    c = registry(tmp_path / "a")
    before = sorted(int(v.version) for v in c.search_model_versions("name = 'model-crash'"))
    assert before == list(range(1, killed_step + 1)), "M0 and the steps before the killed one were registered"

    # 2. Run it again: finished steps are reused, the killed one continues from its checkpoint.
    again = run_cli_process(recipe, killed_ws, {})
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stderr + again.stdout
    assert f"resuming train step {killed_step} from checkpoint" in log
    resumed_at = re.search(rf"train step {killed_step} resumed at optimizer step (\d+) of (\d+)", log)
    assert resumed_at is not None, log[-3000:]
    assert 10 <= int(resumed_at[1]) < int(resumed_at[2]), "training went on from the checkpoint, not from the start"
    versions = {int(v.version): v for v in c.search_model_versions("name = 'model-crash'")}
    assert sorted(versions) == [1, 2, 3], "exactly one version per step"
    for step, version in ((0, "1"), (1, "2"), (2, "3")):
        assert str(c.get_model_version_by_alias("model-crash", f"step-{step}").version) == version
    assert not list(killed_ws.glob("checkpoints/crash-step-*/latest")), "checkpoints are removed once registered"

    # 3. The same pipeline never interrupted, in another workspace: the same weights, bit for bit.
    whole = run_cli_process(_recipe(tmp_path / "b", "crash"), whole_ws, {})
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed_weights, whole_weights = _final_weights(killed_ws), _final_weights(whole_ws)
    assert resumed_weights[2] == whole_weights[2]
    assert resumed_weights[1] == whole_weights[1]


@pytest.mark.slow
def test_two_runs_at_once_in_one_workspace_do_not_disturb_each_other(tmp_path: Path) -> None:
    """Two runs with different names, one workspace, one MLflow database and one registered
    model: each run's lineage holds only its own versions, though they move the same aliases."""
    workspace = tmp_path / "shared"
    recipes = {
        name: write_recipe(tmp_path, name, train__num_threads=1, tracking__registered_model="model-shared")
        for name in ("left", "right")
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "-c", str(recipe)],
            cwd=REPO,
            env=_env(workspace),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, recipe in recipes.items()
    }
    outputs = {name: p.communicate(timeout=600) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}:\n{outputs[name][1][-3000:]}"
        assert f"sDPO run '{name}': 2 step(s)" in outputs[name][0]
    c = registry(tmp_path)  # both track to the same MLflow database
    versions = {str(v.version): v for v in c.search_model_versions("name = 'model-shared'")}
    base = {n for n, v in versions.items() if v.tags.get("sdpo.step", "0") == "0"}
    for name in recipes:
        mine = {
            int(v.tags["sdpo.step"]): v
            for v in versions.values()
            if v.tags.get("sdpo.run") == name and str(v.version) not in base
        }
        assert sorted(mine) == [1, 2], f"{name}: one version per step"
        assert mine[1].tags["sdpo.reference_version"] in base
        assert mine[2].tags["sdpo.reference_version"] == str(mine[1].version), f"{name}: step 2 from its own step 1"
    final = c.get_model_version_by_alias("model-shared", "final")
    assert final.tags["sdpo.step"] == "2", "the alias points to the step 2 of whichever run finished last"
    runs = sorted(p.name.rsplit("-", 3)[0] for p in (workspace / "runs").iterdir())
    assert runs == ["left", "right"]
