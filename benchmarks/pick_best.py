"""The fastest sdpo setting among benchmark runs, as the flags that repeat it: ``gpu_checks.sh``'s
part "best" reads the JSON of parts "defaults", "compile" and "packed" with it.

    python -m benchmarks.pick_best RUN.json [RUN.json ...]

Prints the flags of the run whose ``sdpo`` variant trained the most pairs per second (its
median round), e.g. ``--layout packed --compile``, and on stderr which file and speed won. A
file that is missing or holds no sdpo result (a part that failed or timed out) is passed over;
exit 1 if none has one. Runs are compared only when their shape (size, pairs, batch, lengths,
dtype, precision, checkpointing) is the same as the first usable one's; others are passed over
with a note, since their speeds do not compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# Settings that must match for two runs' speeds to compare.
SHAPE = ("pairs", "batch_size", "max_length", "max_prompt_length", "gradient_checkpointing", "precision")
# Settings that choose sdpo's step, and the flag that sets each.
CHOICES = {"layout": "--layout", "row_tokens": "--row-tokens", "pass_tokens": "--pass-tokens", "compile": "--compile"}


def flags(settings: dict[str, Any]) -> list[str]:
    """The dpo_step flags that choose the run's sdpo step (defaults left out)."""
    out: list[str] = []
    if settings.get("layout", "auto") != "auto":
        out += ["--layout", str(settings["layout"])]
    for key in ("row_tokens", "pass_tokens"):
        if settings.get(key):
            out += [CHOICES[key], str(settings[key])]
    if settings.get("compile"):
        out.append("--compile")
    return out


def usable(path: Path) -> tuple[dict[str, Any], float, tuple[Any, ...]] | None:
    """(settings, sdpo's pairs/s, shape) of a run, or None if it has none to offer."""
    try:
        result = json.loads(path.read_text())
        sizes = result["sizes"]
        (size, per), *_ = sizes.items()
        speed = float(per["variants"]["sdpo"]["pairs_per_s"])
        settings = result["settings"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    shape = (size, result["machine"].get("dtype"), *(settings.get(k) for k in SHAPE))
    return settings, speed, shape


def pick(paths: list[Path]) -> tuple[Path, list[str], float] | None:
    """The file whose sdpo trained fastest, its flags and its pairs/s; None when no file has one."""
    best: tuple[Path, list[str], float] | None = None
    first_shape = None
    for path in paths:
        found = usable(path)
        if found is None:
            print(f"pick_best: {path}: no sdpo result, passed over", file=sys.stderr)
            continue
        settings, speed, shape = found
        first_shape = first_shape or shape
        if shape != first_shape:
            print(f"pick_best: {path}: another shape ({shape} against {first_shape}), passed over", file=sys.stderr)
            continue
        if best is None or speed > best[2]:
            best = (path, flags(settings), speed)
    return best


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    best = pick(paths)
    if best is None:
        print("pick_best: none of the runs has an sdpo result", file=sys.stderr)
        return 1
    path, chosen, speed = best
    print(f"pick_best: {path} ({speed:.2f} pairs/s): {' '.join(chosen) or '(the defaults)'}", file=sys.stderr)
    print(" ".join(chosen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
