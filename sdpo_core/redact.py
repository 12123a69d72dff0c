"""Keeping secrets out of what a run writes: URIs' user info, and keys that name a secret."""

from __future__ import annotations

import re

SENSITIVE_MARKERS = ("secret", "password", "token", "key", "credential")
"""A config key containing one of these has its value masked in MLflow params."""


def redact_userinfo(text: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://***@host/...``: credentials in URIs
    never reach MLflow params or tags."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
