"""The wheels the lent GPU machine lacks for the benchmark, into an ignored folder: ``make wheels``.

The GPU machine (Python 3.12, x86_64, torch 2.11, transformers 5.17; no network) has no trl and
no datasets, which TRL's side of ``benchmarks.dpo_step`` needs, and no pydantic, which
``sdpo_core.config`` needs. This downloads, for CPython 3.12 on manylinux x86_64, one wheel per
package of :data:`CARRIED` at the version ``requirements/cpu.lock`` pins (the CPU environment's),
each without its requirements (``--no-deps``: the list is explicit), checks that every
requirement of a carried wheel is carried or already on the device (:data:`ON_DEVICE`), and
fails if the folder is over its size limit: a device call carries at most 64 MiB, the working
tree included. ``benchmarks/gpu_checks.sh`` installs them from the folder when trl is missing.

    python -m benchmarks.carry_wheels [--out benchmarks/wheels] [--limit-mib 56]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "cpu.lock"
# What is carried, and why. pyarrow (48 MiB) and fsspec are on the device, but datasets 5.2 needs
# pyarrow >= 24 and fsspec <= 2026.9.0, which the device's versions may not meet (its list gives
# no versions); gpu_checks.sh's install keeps the device's own where they do.
CARRIED = {
    "trl": "TRL's DPOTrainer, the benchmark's other side (1.16.0, as on the CPU)",
    "datasets": "TRL's train dataset (trl requires it)",
    "dill": "datasets requires it",
    "multiprocess": "datasets requires it",
    "pyarrow": "datasets requires >= 24; used only if the device's is older",
    "fsspec": "datasets requires <= 2026.9.0; used only if the device's is newer",
    "pydantic": "sdpo_core.config's models",
    "pydantic-core": "pydantic requires it (compiled)",
    "annotated-types": "pydantic requires it",
    "typing-inspection": "pydantic requires it",
    "typing-extensions": "pydantic requires >= 4.16; used only if the device's is older",
}
# Packages the device's image has (device KINDS.md, read 2026-11-17), as far as the carried wheels
# need them; torch, transformers and numpy are never carried.
ON_DEVICE = {
    "accelerate", "filelock", "huggingface-hub", "jinja2", "numpy", "packaging", "pandas", "psutil",
    "pyyaml", "requests", "httpx", "tqdm", "xxhash", "aiohttp", "transformers", "torch",
}  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
TRANSFER_LIMIT_MIB = 64.0


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(names: list[str], lock_text: str) -> dict[str, str]:
    """Each name's version in the lock (``name==version`` lines); a missing one is an error naming it."""
    pins = {}
    for line in lock_text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match:
            pins[normalise(match[1])] = match[2]
    missing = [n for n in names if normalise(n) not in pins]
    if missing:
        raise SystemExit(f"{LOCK.relative_to(REPO)}: no pin for {', '.join(missing)}")
    return {n: pins[normalise(n)] for n in names}


def requirements(wheel: Path) -> set[str]:
    """The names a wheel requires on the device (CPython 3.12 on Linux x86_64), extras left out."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    device = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip
    names = set()
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(device):
                names.add(normalise(req.name))
    return names


def unmet(wheels: list[Path]) -> dict[str, set[str]]:
    """Per wheel, what it requires that is neither carried nor on the device."""
    have = {normalise(n) for n in CARRIED} | {normalise(n) for n in ON_DEVICE}
    return {w.name: missing for w in wheels if (missing := requirements(w) - have)}


def tree_mib() -> float:
    """What else travels with a device call: the tracked and untracked-not-ignored files, MiB."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((REPO / p.decode()).stat().st_size for p in listed if p and (REPO / p.decode()).is_file()) / 2**20


def download(out: Path, pins: dict[str, str]) -> None:
    """One wheel per pin into ``out``, for CPython 3.12 on manylinux x86_64, no requirements."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for name, version in pins.items():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"]
        cmd += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *platforms]
        subprocess.run([*cmd, "--dest", str(out), f"{name}=={version}"], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "wheels"))
    parser.add_argument("--limit-mib", type=float, default=56.0, help="the wheels' total at most (MiB)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pins = pinned(list(CARRIED), LOCK.read_text())
    wanted = {normalise(n): v for n, v in pins.items()}
    # Wheels of other versions left from an earlier pin would make two candidates: remove them.
    for old in out.glob("*.whl"):
        name, version = old.name.split("-")[:2]
        if wanted.get(normalise(name)) != version:
            old.unlink()
    download(out, pins)
    wheels = sorted(out.glob("*.whl"))
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    total, tree = sum(w.stat().st_size for w in wheels) / 2**20, tree_mib()
    print(f"{total:8.2f} MiB in {len(wheels)} wheels ({out}); the working tree adds {tree:.2f} MiB")
    problems = [
        f"{name} requires {', '.join(sorted(m))}, neither carried nor on the device"
        for name, m in unmet(wheels).items()
    ]
    if total > args.limit_mib:
        problems.append(f"the wheels take {total:.2f} MiB, over the {args.limit_mib:g} MiB limit")
    if total + tree > TRANSFER_LIMIT_MIB:
        problems.append(f"wheels and working tree take {total + tree:.2f} MiB, over a device call's 64 MiB")
    for problem in problems:
        print(f"carry_wheels: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
