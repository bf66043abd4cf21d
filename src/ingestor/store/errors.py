"""What a database error means for the batch that met it: one classification, by SQLSTATE.

The writer (``ingestor.store.writer``) and the order store (``ingestor.orders.store``) both
ask :func:`classify`, so a refusal is handled the same way wherever it happens:

``"connection"``
    The server went away or cannot take us now: a client-side ``OperationalError`` or
    ``InterfaceError`` without a SQLSTATE, class 08 (connection exception), and the
    shutdown codes of class 57 (57P01 admin_shutdown, 57P02 crash_shutdown, 57P03
    cannot_connect_now: "the database system is starting up").  Nothing is wrong with the
    batch: reconnect and retry it with backoff (forever in the daemon, whose spool grows
    meanwhile; bounded in ``ingestor replay``).  The stream offsets make the retry exactly
    once.
``"data"``
    The database refuses rows because of their own values: class 22 (data exception:
    out-of-range numbers and timestamps, a NUL byte or an invalid byte sequence in text,
    a number jsonb cannot hold), 23502 not_null_violation and 23503 foreign_key_violation
    (a row that lacks a value or points nowhere), and 54000 program_limit_exceeded ("index
    row size ... exceeds btree ... maximum": the content is too big to index).  Retrying the
    same rows gives the same answer: the writer sets the batch aside after ``max_rejects``
    attempts (a dead letter) and commits its offset; the order store dead-letters the one
    postback.
``"fatal"``
    Everything else: the fault is not in one batch's values but in the configuration, the
    schema, the server or the code, so setting batches aside would only throw good data away
    one batch after another (with ``timeframes = ["1s", "2m"]`` every batch carries a "2m"
    candle).  Among them: 23514 check_violation (the checked domains, such as
    ``ohlc_candles_timeframe_check``, follow from configuration), 23505 unique_violation
    (keys are unique by construction: a duplicate is a bug), class 42 (syntax, undefined
    objects, insufficient privilege), 25 (transaction state), 40 (serialization failure,
    deadlock: see :func:`is_transient`), 53 (insufficient resources: disk full, out of
    memory, too many connections), 57 other than the shutdown codes (query_canceled by a
    statement timeout, ...), 58 and XX (system and internal errors), any other SQLSTATE, and
    the writer's own :class:`~ingestor.errors.StreamAdvanced`.  The writer stops: nothing is
    committed, the spool keeps the batch (see the writer for what happens next).

:func:`is_transient` marks the fatal errors worth a few immediate retries first
(40001 serialization_failure, 40P01 deadlock_detected, 55P03 lock_not_available).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Kind", "classify", "describe_error", "is_transient", "sqlstate_of"]

Kind = Literal["connection", "data", "fatal"]

#: class 57 codes that mean "the server is going away or not up yet", not an intervention
_SHUTDOWN = frozenset({"57P01", "57P02", "57P03"})
#: outside class 22, the codes caused by a row's own values
_DATA = frozenset({"23502", "23503", "54000"})
#: fatal codes that a repeat of the same transaction may well pass
_TRANSIENT = frozenset({"40001", "40P01", "55P03"})


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE a psycopg error carries (None for client-side errors and others)."""
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) and len(code) == 5 else None


def classify(exc: BaseException) -> Kind:
    """``"connection"``, ``"data"`` or ``"fatal"`` for ``exc`` (see the module docstring).

    Examples
    --------
    >>> import psycopg
    >>> classify(psycopg.errors.lookup("54000")())   # index row too large: the content
    'data'
    >>> classify(psycopg.errors.lookup("23514")())   # a check constraint: the configuration
    'fatal'
    >>> classify(psycopg.OperationalError("server closed the connection unexpectedly"))
    'connection'
    """
    import psycopg

    if not isinstance(exc, psycopg.Error):
        return "fatal"
    code = sqlstate_of(exc)
    if code is None:
        # raised by the client library: the connection broke (OperationalError: the server
        # closed it, a timeout; InterfaceError: used after it was closed) -- or psycopg
        # refused something before sending it, which is the code's fault
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            return "connection"
        return "fatal"
    if code.startswith("08") or code in _SHUTDOWN:
        return "connection"
    if code.startswith("22") or code in _DATA:
        return "data"
    return "fatal"


def is_transient(exc: BaseException) -> bool:
    """A fatal error that the same transaction, tried again at once, may pass."""
    return sqlstate_of(exc) in _TRANSIENT


def describe_error(exc: BaseException) -> str:
    """One line for logs and dead-letter reasons: ``SQLSTATE ClassName: first line``."""
    from ingestor.store.dsn import error_line

    code = sqlstate_of(exc)
    head = f"{code} {type(exc).__name__}" if code else type(exc).__name__
    return f"{head}: {error_line(exc)}"
