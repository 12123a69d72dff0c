"""``key.sub=value`` overrides on top of a recipe: parsed as YAML values, set by key path."""

from __future__ import annotations

from typing import Any

import yaml

from sdpo_core.config_rules import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and its YAML-parsed value."""
    if "=" not in text:
        raise ConfigError([f"{text!r}: an override must look like key.sub=value"])
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError([f"{text!r}: empty key in override"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError([f"{key.strip()}: the value is nested too deeply"]) from None
    return path, value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``value`` at ``path`` in nested recipe data (list items by index)."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError([f"{'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section"])
    last = path[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ConfigError([f"{'.'.join(path)}: no list item {last}"])
        node[int(last)] = value
    else:
        node[last] = value
