"""Which database: one resolution rule for every command, and one clear error line.

DESIGN.md ("Console script"): the database is named by ``--dsn``, else
``INGESTOR_DSN``, else ``DATABASE_URL``, else the config file, else libpq's own
defaults (``PGHOST`` and friends).  Either form libpq accepts works: a
conninfo string (``host=... dbname=...``) or a URI (``postgresql://...``).

A DSN may carry a password.  Nothing this module raises or logs contains it:
the password is registered with :func:`ingestor.logs.register_secret` and every
message passes through :func:`ingestor.logs.redact`, because libpq and psycopg
quote the connection string verbatim in some of their errors (a malformed
URI, for one).
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from ingestor.logs import redact, register_secret

#: Environment variables consulted, in order, after ``--dsn``.
ENV_VARS = ("INGESTOR_DSN", "DATABASE_URL")

_URI_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s:]*:([^@\s/]*)@", re.I)
_KV_PASSWORD = re.compile(r"(?i)\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")
#: a quoted fragment in libpq's parse errors; only bare punctuation (``"="``, ``"]"``) is kept
_QUOTED = re.compile(r'"([^"]*)"')


def resolve_dsn(dsn: str | None = None, *, config_dsn: str | None = None,
                environ: Mapping[str, str] | None = None) -> str:
    """Return the DSN to connect with, by the project's precedence rule.

    Parameters
    ----------
    dsn : str or None
        The ``--dsn`` flag's value; wins when given (even an empty string means
        "libpq defaults" only when passed explicitly as ``""``).
    config_dsn : str or None
        The ``dsn`` of the config file, when the command has one.
    environ : mapping, optional
        The environment (default ``os.environ``).

    Returns
    -------
    str
        A conninfo string or URI; ``""`` means libpq's defaults (``PGHOST``,
        ``PGDATABASE``, ... and the local socket).  Its password, if any, is
        registered for redaction.
    """
    env = os.environ if environ is None else environ
    chosen = dsn
    if chosen is None:
        for name in ENV_VARS:
            if env.get(name):
                chosen = env[name]
                break
    if chosen is None:
        chosen = config_dsn or ""
    register_secret(password_of(chosen))
    return chosen


def password_of(dsn: str) -> str | None:
    """The password a DSN carries, if any (parsed leniently: even a malformed DSN)."""
    if not dsn:
        return None
    try:
        from psycopg.conninfo import conninfo_to_dict

        value = conninfo_to_dict(dsn).get("password")
        if value:
            return str(value)
    except Exception:  # noqa: BLE001 - malformed: fall back to patterns
        pass
    m = _URI_PASSWORD.match(dsn.strip())
    if m and m.group(1):
        from urllib.parse import unquote

        return unquote(m.group(1))
    m = _KV_PASSWORD.search(dsn)
    if m:
        return m.group(1).strip("'")
    return None


def describe(dsn: str) -> str:
    """A short, password-free name of the target for messages: ``user@host:port/dbname``."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        p = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001
        return "the database (malformed DSN)"
    host = p.get("host") or os.environ.get("PGHOST") or "local socket"
    port = p.get("port") or os.environ.get("PGPORT") or "5432"
    db = p.get("dbname") or os.environ.get("PGDATABASE") or "(default database)"
    user = p.get("user") or os.environ.get("PGUSER")
    who = f"{user}@" if user else ""
    return f"{who}{host}:{port}/{db}"


def error_line(exc: BaseException) -> str:
    """The first meaningful line of a driver error, redacted."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # libpq's multi-host messages put the reason on the last line
    line = lines[-1] if lines and len(lines) > 1 and "failed:" in lines[-1] else lines[0]
    return redact(line)


def malformed_line(exc: BaseException) -> str:
    """libpq's complaint about a DSN it cannot parse, without the DSN's text.

    libpq quotes the word it stumbled on (``missing "=" after "PW789"``, ``invalid
    connection option "x"``, or the whole URI), and with an unquoted password containing
    a space that word is half of the password: no redaction can know it.  So every quoted
    fragment is withheld and the rest of the reason kept."""
    text = str(exc).strip() or type(exc).__name__
    line = " ".join(text.splitlines()[0].split())
    kept = _QUOTED.sub(lambda m: m.group(0) if re.fullmatch(r"[=\[\]'%]?", m.group(1))
                       else '"..."', line)
    hint = " (a value with spaces needs quotes: key='a b')" if "missing \"=\"" in kept else ""
    return f"malformed DSN: {redact(kept)}{hint} (fragment withheld)"


def _params(dsn: str, connect_timeout: int) -> dict:
    """libpq parameters of ``dsn`` (its password registered for redaction), or
    :class:`ingestor.errors.DatabaseError`."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    from ingestor.errors import DatabaseError

    register_secret(password_of(dsn))
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise DatabaseError(f"invalid database DSN: {malformed_line(exc)}") from None
    params.setdefault("connect_timeout", connect_timeout)
    return params


def connect(dsn: str, *, autocommit: bool = False, connect_timeout: int = 10, **kwargs):
    """Open a psycopg connection, or raise :class:`~ingestor.errors.DatabaseUnavailable` with
    one clear line.

    Parameters
    ----------
    dsn : str
        As returned by :func:`resolve_dsn`.
    autocommit : bool
        Passed to :func:`psycopg.connect`.
    connect_timeout : int
        Seconds before an unreachable server is reported (unless the DSN sets one).

    Raises
    ------
    ingestor.errors.DatabaseError
        The DSN is malformed, or (:class:`~ingestor.errors.DatabaseUnavailable`) the
        server does not answer / refuses us; the message names the target without its
        password.
    """
    import psycopg

    from ingestor.errors import DatabaseUnavailable

    params = _params(dsn, connect_timeout)
    try:
        return psycopg.connect(autocommit=autocommit, **params, **kwargs)
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"cannot connect to {describe(dsn)}: {error_line(exc)}") from None


async def connect_async(dsn: str, *, autocommit: bool = False, connect_timeout: int = 10,
                        **kwargs):
    """Async twin of :func:`connect` (a :class:`psycopg.AsyncConnection`)."""
    import psycopg

    from ingestor.errors import DatabaseUnavailable

    params = _params(dsn, connect_timeout)
    try:
        return await psycopg.AsyncConnection.connect(autocommit=autocommit, **params, **kwargs)
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"cannot connect to {describe(dsn)}: {error_line(exc)}") from None
