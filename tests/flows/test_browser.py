"""What a user sees in a web browser after `make run` (issue 17, "Tested in a real browser").

The Prefect server and an MLflow UI server over a SQLite store, each started once on 127.0.0.1;
one small pipeline run in its own process (`sdpo run`, as `make run` starts it), reporting to
them; then headless Chromium (Debian's package, driven over the DevTools protocol) loads the MLflow parent run's page and the Prefect flow run's page as a user clicks
through them, checks that the plots and the per-step table artifact are there, and saves
screenshots (in the test's folder; also in ``$SDPO_SCREENSHOT_DIR`` when set, which is how
docs/screenshots/ is made).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.flows.chromium import Browser, chromium_binary
from tests.flows.test_deployments import BIN, REPO, api, free_port
from tests.flows.test_pipeline import run_cli_process, write_recipe

PLOTS = ("heldout.png", "partition.png", "training.png")


class Server:
    """A server process, started at once; :meth:`wait` for it to answer. Its log's tail is printed
    when the block it serves fails."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], health: str, logs: Path) -> None:
        self.name, self.health, self.log = name, health, logs / f"{name}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(argv, cwd=logs, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait(self, seconds: float = 180) -> None:
        """Until its health address answers 200 (a cold Prefect server takes ~15-25 s on 2 busy cores)."""
        deadline = time.monotonic() + seconds
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.health, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name}: no answer at {self.health}\n{self.log.read_text()[-3000:]}"
                    ) from None
                time.sleep(1)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            print(f"--- {self.name} ---\n{self.log.read_text()[-3000:]}")
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.mark.slow
def test_mlflow_and_prefect_uis_show_the_run_in_a_browser(tmp_path):
    chromium_binary()  # skip (or fail in CI) before anything starts, not after the run
    started = time.monotonic()
    workspace = tmp_path / "workspace"
    sources = [
        {"name": "orca", "path": str(REPO / "data/orca_dpo_pairs_validation_msfoundry.jsonl"), "max_pairs": 8},
        {"name": "mix", "path": str(REPO / "data/llamafactory_dpo_en_demo.json"), "max_pairs": 8},
    ]
    recipe = write_recipe(
        tmp_path, "browser", data__sources=sources, data__eval_fraction=0.25, data__max_length=64,
        data__max_prompt_length=32, train__grad_accum_steps=1,
    )  # fmt: skip
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # write_recipe's tracking store

    # The two servers, each started once, side by side, on free loopback ports: what
    # `make ui-prefect` and `make ui-mlflow` start, over the run's stores.
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    prefect_env = env | {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"{prefect_url}/api",  # the UI asks the API at this address
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    prefect_argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    mlflow_argv = [str(BIN / "mlflow"), "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
                   "--port", str(mlflow_port), "--workers", "1"]  # fmt: skip
    mlflow_env = env | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with (
        Server("prefect", prefect_argv, prefect_env, f"{prefect_url}/api/health", logs) as prefect,
        Server("mlflow", mlflow_argv, mlflow_env, f"{mlflow_url}/health", logs) as mlflow,
    ):
        prefect.wait()
        mlflow.wait()  # it has made the SQLite store the run then writes to
        print(f"servers up: {time.monotonic() - started:.0f} s")  # phase times, shown when the test fails
        # One small run of `sdpo run` in its own process, its flow run on the Prefect server (as
        # with `make serve` running), its tracking in the store the MLflow server reads.
        run = run_cli_process(recipe, workspace, {"PREFECT_API_URL": f"{prefect_url}/api"})
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        print(f"pipeline run: {time.monotonic() - started:.0f} s")

        from mlflow import MlflowClient

        c = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        experiment = c.get_experiment_by_name("exp-browser")
        [parent] = c.search_runs([experiment.experiment_id], "tags.`mlflow.runName` = 'browser'")
        [flow_run] = api(f"{prefect_url}/api", "/flow_runs/filter", {"flows": {"name": {"any_": ["sdpo_pipeline"]}}})
        with Browser(tmp_path / "chromium") as browser:
            browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)  # fmt: skip
            mlflow_parent_run_shows_the_plots(browser, mlflow_url, experiment.experiment_id, parent.info.run_id, shots)
            prefect_flow_run_shows_the_table(browser, prefect_url, flow_run["id"], shots)
        print(f"pages checked: {time.monotonic() - started:.0f} s")

    if os.environ.get("SDPO_SCREENSHOT_DIR"):
        for shot in ("mlflow-parent-run-plots.png", "prefect-flow-run-artifacts.png"):
            shutil.copy(shots / shot, Path(os.environ["SDPO_SCREENSHOT_DIR"]) / shot)


def mlflow_parent_run_shows_the_plots(browser: Browser, url: str, experiment_id: str, run_id: str, shots: Path):
    """The parent run's Artifacts tab, with plots/training.png selected, in the model-training view
    (the experiment is of that kind; a fresh browser would otherwise open the GenAI one)."""
    page = f"{url}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/plots/training.png"
    browser.open(f"{page}?workflowType=machine_learning")
    # The tree lists the plots folder's files, fetched from the server's artifact listing, and
    # shows them once the folder has opened (offsetParent is null while an element is hidden) ...
    listed = " && ".join(
        f'document.querySelector(\'[data-testid="artifact-tree-node"][artifact-name="{name}"]\')?.offsetParent'
        for name in PLOTS
    )
    browser.wait_for(listed)
    # ... and the selected plot's PNG came through the server and was decoded by the browser.
    browser.wait_for("(i => i && i.complete && i.naturalWidth > 0)(document.querySelector('img[alt=\"plots/training.png\"]'))")  # fmt: skip
    names = browser.evaluate(
        "[...document.querySelectorAll('[data-testid=\"artifact-tree-node\"]')].map(e => e.getAttribute('artifact-name'))"
    )
    assert sorted(n for n in names if n.endswith(".png")) == list(PLOTS), names
    assert "Model training" in browser.evaluate("document.body.innerText")
    # MLflow's assistant panel opens by default and hides half the page; a user closes it.
    browser.click('[data-component-id="mlflow.assistant.chat_panel.close"]')
    time.sleep(1)  # the folder's opening animation
    browser.screenshot(shots / "mlflow-parent-run-plots.png")


def prefect_flow_run_shows_the_table(browser: Browser, url: str, flow_run_id: str, shots: Path):
    """The flow run's page, its Artifacts tab (which a link cannot open: the UI falls back to Logs
    while the run loads), the sdpo-steps table card, and the table itself."""
    browser.open(f"{url}/runs/flow-run/{flow_run_id}")
    browser.wait_for("document.getElementById('artifacts')")
    assert browser.click("#artifacts")
    # The cards are in a virtual scroller that renders only what is in view.
    browser.wait_for("document.querySelector('#artifacts-content .p-virtual-scroller')")
    browser.evaluate("document.getElementById('artifacts-content').scrollIntoView()")
    card = "[...document.querySelectorAll('#artifacts-content a')].find(a => a.innerText.includes('sdpo-steps'))"
    browser.wait_for(card)
    kind = browser.evaluate(f"{card}.querySelector('.artifact-card__subheader').textContent.trim()")
    assert kind == "table", kind
    browser.evaluate(f"{card}.scrollIntoView({{block: 'center'}})")
    time.sleep(0.5)
    browser.screenshot(shots / "prefect-flow-run-artifacts.png")
    # Its page renders the per-step table: one row per sDPO step, named by its chunk.
    browser.evaluate(f"{card}.click()")
    browser.wait_for("[...document.querySelectorAll('table th')].some(th => th.innerText.includes('eval acc vs M0'))")
    rows = browser.evaluate(
        "[...document.querySelectorAll('table tbody tr')].map(tr => [...tr.cells].slice(0, 2).map(td => td.innerText.trim()))"
    )
    assert [step for step, _ in sorted(rows)] == ["1", "2"], json.dumps(rows)
    assert {chunk for _, chunk in rows} == {"orca", "mix"}, json.dumps(rows)
    browser.screenshot(shots / "prefect-table-artifact.png")
