"""What a config's types alone do not check, and how problems are worded.

:func:`value_problems` holds the range and cross-field rules of a :class:`sdpo_core.config.RunConfig`;
:func:`describe_errors` turns pydantic's type errors into the same one-line form, ``key.sub: what
is wrong, got <value>``, so that :class:`ConfigError` lists every problem of a recipe together.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from sdpo_core.config_limits import reprlib_repr, shown, train_problems
from sdpo_core.redact import redact

COLUMN_ROLES = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", "response_a", "response_b", "winner")

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""Names that become parts of file paths (run_name, tracking.registered_model): letters, digits,
'.', '_' and '-', starting with a letter or digit, so that no name can point outside the
workspace (no '/', no '..')."""


class ConfigError(ValueError):
    """One or more problems in a configuration; the message lists each, naming its key."""

    def __init__(self, problems: list[str], origin: str | None = None) -> None:
        self.problems = problems
        where = f" in {origin}" if origin else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")


# pydantic error types -> how a config value of that kind is written.
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "none": "null",
    "dict": "a mapping",
    "model": "a mapping",
    "tuple": "a list",
    "list": "a list",
}


def _expected(error: dict[str, Any]) -> str | None:
    kind = error["type"]
    if kind == "literal_error":
        return " or ".join(repr(v) for v in _literal_values(error))
    if kind == "value_error" and "expected a number" in error["msg"]:
        return "a number"
    for prefix, text in _EXPECTED.items():
        if kind.startswith(prefix + "_") or kind == prefix:
            return text
    return None


def _literal_values(error: dict[str, Any]) -> list[Any]:
    expected = (error.get("ctx") or {}).get("expected", "")
    return re.findall(r"'([^']*)'", expected) and [v for v in re.findall(r"'([^']*)'", expected)]


def _key_and_model(loc: tuple[Any, ...], root: type[BaseModel]) -> tuple[str, type[BaseModel] | None, bool]:
    """The dotted key of a pydantic error location, the model at the parent of its last part,
    and whether the location ends inside a union member's tag (which is dropped)."""
    parts: list[str] = []
    node: Any = root
    parent: type[BaseModel] | None = root
    for item in loc:
        if isinstance(node, type) and issubclass(node, BaseModel) and isinstance(item, str):
            parent = node
            if item not in node.model_fields:
                parts.append(item)  # an unknown key
                node = None
                continue
            parts.append(item)
            node = _unwrap(node.model_fields[item].annotation)
        elif isinstance(item, int):
            parts.append(str(item))
            args = typing.get_args(node) if node is not None else ()
            node = _unwrap(args[0]) if args else None
        else:
            return ".".join(parts), parent, True  # a union member's tag, such as 'int' or 'literal[...]'
    return ".".join(parts), parent, False


def _unwrap(hint: Any) -> Any:
    """``X | None`` -> X, ``tuple[X, ...]`` kept (its items are indexed), Annotated -> its type."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) and len(args) == 1:
        return _unwrap(args[0])
    return hint


def _allows_none(loc: tuple[Any, ...], root: type[BaseModel]) -> bool:
    """Whether the field at ``loc`` (a model field) accepts null."""
    node: Any = root
    hint: Any = None
    for item in loc:
        if (
            isinstance(node, type)
            and issubclass(node, BaseModel)
            and isinstance(item, str)
            and item in node.model_fields
        ):
            hint = node.model_fields[item].annotation
            node = _unwrap(hint)
        elif isinstance(item, int):
            args = typing.get_args(node)
            node = _unwrap(args[0]) if args else None
        else:
            break
    return type(None) in typing.get_args(hint)


def describe_errors(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """One problem per key, in the order pydantic found them; union members' errors merged."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for error in exc.errors(include_url=False):
        if error["type"] == "missing" and error["loc"] and isinstance(error["loc"][-1], int):
            # A fixed-length list given too few items: pydantic names the first missing index.
            given = error["input"] if isinstance(error["input"], (list, tuple)) else []
            error = {
                **error,
                "type": "too_short",
                "loc": error["loc"][:-1],
                "ctx": {"field_type": "Tuple", "max_length": error["loc"][-1] + 1, "actual_length": len(given)},
            }
        key, _, _ = _key_and_model(error["loc"], root)
        by_key.setdefault(key, []).append(error)
    return [_problem(key, errors, root) for key, errors in by_key.items()]


def _problem(key: str, errors: list[dict[str, Any]], root: type[BaseModel]) -> str:
    where = key or "the config"
    first = errors[0]
    kind = first["type"]
    if kind == "extra_forbidden":
        _, parent, _ = _key_and_model(first["loc"], root)
        known = ", ".join(sorted(parent.model_fields)) if parent is not None else ""
        return f"{where}: unknown key (known here: {known})"
    if kind == "missing":
        return f"{where}: required"
    value = first.get("input")
    if kind in ("too_short", "too_long") and (first.get("ctx") or {}).get("field_type") == "Tuple":
        wanted = max(err["ctx"]["max_length"] for err in errors if err.get("ctx"))
        return f"{where}: expected {wanted} values, got {first['ctx']['actual_length']}"
    if len(errors) == 1 and kind == "literal_error":
        choices = ", ".join(repr(v) for v in _literal_values(first))
        return f"{where}: {reprlib_repr(value)} is not one of {choices}"
    expected = [e for e in (_expected(err) for err in errors) if e]
    if expected and len(errors) > 1 and _allows_none(first["loc"], root):
        expected.append("null")  # pydantic names no error for the None member of a union
    if expected:
        text = " or ".join(dict.fromkeys(expected))
        if "true or false" in text and len(expected) == 1:
            return f"{where}: expected {text}, got {reprlib_repr(value)}"
        return f"{where}: expected {text}, got {shown(value)}"
    return f"{where}: {first['msg']}, got {shown(value)}"


def default_source_name(path: str) -> str:
    """A source's name when the recipe gives none: the file name without its data suffixes."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".csv", ".parquet"):
        name = name.removesuffix(suffix)
    return name or path


def number(value: Any) -> Any:
    """A number as a recipe writes it. YAML 1.1 (PyYAML) reads ``1e-3`` as a string (its float
    pattern needs a dot), so numeric strings are numbers; booleans are not."""
    if isinstance(value, bool):
        raise ValueError("expected a number")
    return value


def describe(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf option of a config model, for the CLI help.

    A section is walked into; a list of sections (data.sources) is listed, then its item's
    options as ``<key>.<i>.<option>``.
    """
    rows: list[tuple[str, str, str]] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        hint = info.annotation
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            rows.extend(describe(hint, key + "."))
            continue
        items = typing.get_args(hint)[:1] if typing.get_origin(hint) is tuple else ()
        item = items[0] if items and isinstance(items[0], type) and issubclass(items[0], BaseModel) else None
        default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
        rows.append((key, "[]" if item is not None else default, info.description or ""))
        if item is not None:
            rows.extend(describe(item, key + ".<i>."))
    return rows


def value_problems(cfg: Any) -> list[str]:
    """Checks of a RunConfig's values that types alone do not catch, each naming its key."""
    problems: list[str] = []
    d, t, p, loss = cfg.data, cfg.train, cfg.partition, cfg.loss
    for key, value in (("run_name", cfg.run_name), ("tracking.registered_model", cfg.tracking.registered_model)):
        if not SAFE_NAME.fullmatch(value):
            problems.append(
                f"{key}: {value!r} must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
    if not d.sources:
        problems.append("data.sources: at least one source is required")
    names = [s.name for s in d.sources]
    if len(set(names)) != len(names):
        problems.append(f"data.sources: source names must be unique, got {names}")
    for i, s in enumerate(d.sources):
        for key in ("max_pairs", "sample"):
            value = getattr(s, key)
            if value is not None and value < 1:
                problems.append(f"data.sources.{i}.{key}: must be at least 1, got {value}")
        if not s.weight > 0 or s.weight == float("inf"):
            problems.append(f"data.sources.{i}.weight: must be a positive finite number, got {s.weight}")
        for role in s.columns or {}:
            if role not in COLUMN_ROLES:
                problems.append(
                    f"data.sources.{i}.columns.{role}: unknown column role (known: {', '.join(COLUMN_ROLES)})"
                )
    train_sources = [s for s in d.sources if s.use != "eval"]
    if d.sources and not train_sources:
        problems.append("data.sources: every source has use=eval; at least one must train")
    if not 0.0 < d.eval_fraction < 1.0:
        problems.append(f"data.eval_fraction: must be in (0, 1), got {d.eval_fraction}")
    if d.max_prompt_length >= d.max_length:
        problems.append(
            f"data.max_prompt_length: must be below data.max_length ({d.max_length}), got {d.max_prompt_length}"
        )
    for key, value in [
        ("train.epochs", t.epochs),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.grad_accum_steps", t.grad_accum_steps),
        ("train.logprob_chunk_rows", t.logprob_chunk_rows),
        ("train.max_pass_tokens", t.max_pass_tokens if isinstance(t.max_pass_tokens, int) else 1),
        ("train.eval_batch_size", t.eval_batch_size),
        ("train.score_pass_tokens", t.score_pass_tokens if isinstance(t.score_pass_tokens, int) else 1),
        ("train.num_processes", t.num_processes),
        ("data.eval_max_pairs", d.eval_max_pairs),
        ("data.min_pairs_per_step", d.min_pairs_per_step),
    ]:
        if value < 1:
            problems.append(f"{key}: must be at least 1, got {value}")
    if t.lora.r < 0:
        problems.append(f"train.lora.r: must be 0 (off) or more, got {t.lora.r}")
    if t.lora.r > 0 and not t.lora.target_modules:
        problems.append("train.lora.target_modules: LoRA needs at least one module name")
    if t.lora.r > 0 and t.parallelism == "fsdp" and t.num_processes > 1:
        problems.append("train.lora: LoRA under FSDP is not supported; use train.parallelism=ddp")
    if t.shared_prompt == "packed" and t.compile and t.gradient_checkpointing:
        # Packed attention's recomputation swaps the attention back in with a checkpoint context,
        # which torch.compile refuses inside a compiled layer.
        problems.append(
            "train.shared_prompt: packed rows with both train.compile and train.gradient_checkpointing are not "
            "supported; turn one of them off"
        )
    if t.packed_row_tokens < 16:
        problems.append(f"train.packed_row_tokens: must be at least 16, got {t.packed_row_tokens}")
    if t.checkpoint_every < 0:
        problems.append(f"train.checkpoint_every: must be 0 or more, got {t.checkpoint_every}")
    if cfg.evaluate.samples < 0:
        problems.append(f"evaluate.samples: must be 0 (off) or more, got {cfg.evaluate.samples}")
    if cfg.evaluate.sample_tokens < 1:
        problems.append(f"evaluate.sample_tokens: must be at least 1, got {cfg.evaluate.sample_tokens}")
    if not t.learning_rate > 0 or t.learning_rate == float("inf"):
        problems.append(f"train.learning_rate: must be positive, got {t.learning_rate}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        problems.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if not loss.beta > 0 or loss.beta == float("inf"):
        problems.append(f"loss.beta: must be positive, got {loss.beta}")
    if not 0.0 <= loss.label_smoothing < 0.5:
        problems.append(f"loss.label_smoothing: must be in [0, 0.5), got {loss.label_smoothing}")
    if loss.label_smoothing and loss.name != "sigmoid":
        problems.append(f"loss.label_smoothing: only applies to loss.name=sigmoid, not {loss.name}")
    _partition_problems(p, len(train_sources), problems)
    problems += train_problems(cfg)
    for key, text in _strings(cfg.to_dict()):
        if redact(text) != text:
            # The config is a Prefect flow run parameter, shown in the UI and stored as is: no
            # value of it may hold a secret (sdpo_core.redact finds the same ones it masks).
            problems.append(
                f"{key}: must not hold credentials (user:password@ or a token such as ?X-Amz-Signature=), got "
                f"{redact(text)!r}; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN), or name a storage.credentials_block"
            )
    if cfg.storage.uri is not None and not cfg.storage.uri.startswith("s3://"):
        problems.append(f"storage.uri: must be s3://bucket/prefix, got {cfg.storage.uri!r}")
    block = cfg.storage.credentials_block
    if block is not None and not re.fullmatch(r"[a-z0-9-]+/[a-z0-9-]+", block):
        problems.append(
            f"storage.credentials_block: must be <block-type-slug>/<block-name> in lowercase letters, digits "
            f"and dashes (e.g. s3-credentials/prod), got {block!r}"
        )
    return problems


def _strings(data: Any, key: str = "") -> list[tuple[str, str]]:
    """Every string value of a nested config, with its dotted key."""
    if isinstance(data, dict):
        return [item for k, v in data.items() for item in _strings(v, f"{key}.{k}" if key else str(k))]
    if isinstance(data, (list, tuple)):
        return [item for i, v in enumerate(data) for item in _strings(v, f"{key}.{i}")]
    return [(key, data)] if isinstance(data, str) else []


def _partition_problems(p: Any, num_train_sources: int, problems: list[str]) -> None:
    if p.num_steps is not None and p.num_steps < 1:
        problems.append(f"partition.num_steps: must be at least 1, got {p.num_steps}")
    if p.sizes is not None:
        if p.strategy == "by_source":
            problems.append(
                "partition.sizes: by_source makes one chunk per source; sizes apply to the other strategies"
            )
        elif not p.sizes or any(not x > 0 for x in p.sizes):
            problems.append(f"partition.sizes: must be positive numbers, got {list(p.sizes)}")
        elif p.num_steps is not None and p.num_steps != len(p.sizes):
            problems.append(f"partition.num_steps: {p.num_steps} does not match the {len(p.sizes)} sizes given")
        elif not all(float(x).is_integer() for x in p.sizes) and abs(sum(p.sizes) - 1.0) > 1e-6:
            problems.append(f"partition.sizes: fractions must sum to 1, got {sum(p.sizes):.6g}")
    if p.strategy == "by_source" and p.num_steps is not None and p.num_steps != num_train_sources:
        problems.append(
            f"partition.num_steps: by_source makes one step per training source ({num_train_sources}), "
            f"got {p.num_steps}"
        )
