"""Logging set-up and secret redaction.

One line per event; ``--log-format json`` gives one JSON object per line for
machines.  ``redact`` removes secrets (access tokens, API keys, passwords in
DSNs and URLs) from any text before it reaches a log, an error line or a
metric label: library error messages quote URLs and DSNs verbatim.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_SECRET_PATTERNS = [
    # query parameters and key=value pairs (URLs, libpq conninfo)
    (re.compile(r"(?i)((?:access_token|api_key|api_secret|password|passwd|token|secret)\s*[=:]\s*)"
                r"('[^']*'|\"[^\"]*\"|[^\s&;,'\"]+)"), r"\1***"),
    # userinfo in URIs: scheme://user:password@host
    (re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@"), r"\1***@"),
    # Authorization headers
    (re.compile(r"(?i)(authorization\s*[:=]\s*)(token|bearer)?\s*\S+"), r"\1\2 ***"),
]

_extra_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Redact this exact value wherever it appears from now on."""
    if value and len(value) >= 4:
        _extra_secrets.add(value)


def redact(text: str) -> str:
    for secret in _extra_secrets:
        text = text.replace(secret, "***")
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            obj.update({k: redact(str(v)) if isinstance(v, str) else v for k, v in fields.items()})
        if record.exc_info:
            obj["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(obj, default=str)


def setup_logging(debug: bool = False, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_RedactingFormatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
