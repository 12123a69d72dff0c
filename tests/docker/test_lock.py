"""The lock (requirements/cpu.lock): it pins every dependency of pyproject.toml at a version that
its specifier allows, holds no CUDA-only package, and every install path uses it: the Makefile
(so `make run`, `make test` and CI), the worker images; the compose stack's servers run the
clients' MLflow and Prefect versions."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "cpu.lock"


def lock_pins() -> dict[str, str]:
    """{canonical name: version} of every ``name==version`` line of the lock."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and ";" not in version, f"{LOCK.name}: not an exact pin: {line!r}"
            pins[canonicalize_name(name.split("[")[0])] = version.strip()
    return pins


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    return [Requirement(d) for d in deps]


def test_lock_pins_every_direct_dependency_within_its_specifier():
    pins = lock_pins()
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            # Left to pyproject.toml's exact pin: its build (CPU or CUDA) is the index's choice.
            assert str(req.specifier) == "==2.13.0" and name not in pins
            continue
        assert name in pins, f"{LOCK.name} does not pin {req.name} (pyproject.toml: {req})"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}"
        )


def test_lock_holds_no_cuda_only_package():
    cuda = [name for name in lock_pins() if name.startswith(("nvidia-", "triton", "cuda-"))]
    assert not cuda, f"{LOCK.name} would pull CUDA packages into the CPU environment: {cuda}"


def makefile_vars() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^([A-Z_]+) :?= (.*)$", text, flags=re.M))


def test_makefile_installs_from_the_lock():
    text = (ROOT / "Makefile").read_text()
    variables = makefile_vars()
    assert variables["LOCK"] == "requirements/cpu.lock"
    assert "-c $(LOCK)" in variables["PIP_INSTALL"] and "$(TORCH)" in variables["PIP_INSTALL"]
    # Both installs (run and test) go through it, and are redone when the lock changes.
    for stamp in (".installed-run", ".installed-test"):
        rule = re.search(rf"^\$\(VENV\)/{re.escape(stamp)}: (.*)\n\t(.*)$", text, flags=re.M)
        assert rule, f"no rule for {stamp}"
        assert "$(LOCK)" in rule.group(1) and rule.group(2).startswith("$(PIP_INSTALL) -e ")
    # (--no-deps installs the project alone: make test-device-versions's, whose requirements came
    # from the lock beside the device's pins.)
    assert not re.search(r"pip install(?!.*(-c \$\(LOCK\)|--no-deps)).* -e ", text), "an install that skips the lock"
    # One documented command regenerates it.
    assert re.search(r"^lock:.*\n(\t.*\n)*\t.*uv pip compile pyproject.toml .*", text, flags=re.M)
    assert "make lock" in LOCK.read_text().splitlines()[1]


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_worker_images_install_from_the_lock():
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        text = (ROOT / "docker" / dockerfile).read_text()
        assert "COPY requirements/cpu.lock requirements/" in text
        assert "pip install --no-cache-dir . -c requirements/cpu.lock" in text, dockerfile


def test_servers_run_the_clients_versions():
    pins = lock_pins()
    mlflow = re.search(r"^ARG MLFLOW_VERSION=(\S+)$", (ROOT / "docker" / "Dockerfile.mlflow").read_text(), re.M)
    assert mlflow and mlflow.group(1) == pins["mlflow"], "the MLflow server and its clients differ"
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    image = compose["services"]["prefect-server"]["image"]
    assert image.startswith(f"prefecthq/prefect:{pins['prefect']}-"), f"{image}: not the clients' Prefect"
