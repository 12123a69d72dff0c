"""Keeping secrets out of what a run writes, logs and prints: one redaction for all of it.

:func:`redact` is the one function applied to text (URIs, log lines, exception messages); it
masks the user info of any URI and the value of every token-like ``name=value`` parameter.
:func:`redact_mapping` applies it to a nested config and masks the values of keys that name a
secret (the logged ``config.yaml``, MLflow params). Names are matched by whole segments, so a key
such as ``train.max_pass_tokens`` stays visible while ``access_token`` or ``aws_secret`` do not.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

# A name is split into lowercase segments at `_`, `-`, `.` and camelCase humps.
_SEGMENT_SPLIT = re.compile(r"[_\-.\s]+|(?<=[a-z0-9])(?=[A-Z])")
# A name whose last segment is one of these holds a secret: `hf_token`, `X-Amz-Signature`,
# `client_secret`, `X-Amz-Credential` (but not `credentials_block`, a block's name).
_SECRET_LAST = {
    "secret", "password", "passwd", "pwd", "passphrase", "token", "sig", "signature",
    "credential", "apikey", "auth", "authorization", "cookie",
}  # fmt: skip
# ... or whose last two segments are one of these: `aws_secret_access_key`, `api_key`.
_SECRET_PAIRS = {
    ("access", "key"), ("api", "key"), ("private", "key"), ("secret", "key"), ("signing", "key"),
    ("account", "key"), ("session", "key"), ("master", "key"),
}  # fmt: skip

# scheme://user:password@host -> scheme://***@host, anywhere in a text (any scheme).
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"<>]+@")
# name=value, the name starting a word (after `?`, `&`, a space, a quote, the start).
_PARAMETER = re.compile(r"(?<![\w.\-])([A-Za-z][\w.\-]*)=([^&\s#'\"<>,;)]+)")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}")


def is_secret_name(name: str) -> bool:
    """Whether a key or parameter name names a secret, matched by whole segments.

    ``access_token``, ``X-Amz-Security-Token``, ``api_key``, ``aws_secret``: yes;
    ``max_pass_tokens``, ``max_length``, ``credentials_block``, ``key``: no.
    """
    segments = [s.lower() for s in _SEGMENT_SPLIT.split(name) if s]
    if not segments:
        return False
    if segments[-1] in _SECRET_LAST:
        return True
    return len(segments) >= 2 and (segments[-2], segments[-1]) in _SECRET_PAIRS


def redact(text: str) -> str:
    """``text`` with every URI's user info and every secret-named parameter's value masked.

    ``postgresql://bob:pw@db/x`` -> ``postgresql://***@db/x``;
    ``https://h/f?X-Amz-Signature=abc&n=1`` -> ``https://h/f?X-Amz-Signature=***&n=1``;
    ``Authorization: Bearer abc...`` -> ``Authorization: Bearer ***``. Other text is unchanged.
    """
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _PARAMETER.sub(lambda m: f"{m[1]}={MASK}" if is_secret_name(m[1]) else m[0], text)
    return _BEARER.sub(rf"\1 {MASK}", text)


def redact_mapping(data: Any) -> Any:
    """A copy of a nested config (dicts, lists, scalars) for logging: values under secret-named
    keys become ``***`` (when set), and every string passes through :func:`redact`."""
    if isinstance(data, dict):
        return {
            k: MASK if is_secret_name(str(k)) and v not in (None, "", {}, []) else redact_mapping(v)
            for k, v in data.items()
        }
    if isinstance(data, (list, tuple)):
        return [redact_mapping(v) for v in data]
    return redact(data) if isinstance(data, str) else data


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record's message through :func:`redact`.

    Put on a handler, it covers every record the handler writes or ships (Prefect's API
    handler stores log lines in its database), whichever logger made it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is left to the handler to report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # The handler's formatter uses this text as it is: the traceback is redacted too.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def redact_log_handlers(*loggers: logging.Logger) -> None:
    """Add a :class:`RedactingFilter` to every handler of ``loggers`` (once each)."""
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


RUN_LOGGERS = ("", "prefect.flow_runs", "prefect.task_runs", "prefect.extra")
"""The loggers whose handlers print or store a flow run's log lines (the root's and Prefect's)."""


def redact_run_logs() -> None:
    """Pass every log line a flow run prints or Prefect stores through :func:`redact`; each flow
    (pipeline, train step, experiment) calls this when it starts."""
    redact_log_handlers(*(logging.getLogger(name) for name in RUN_LOGGERS))
