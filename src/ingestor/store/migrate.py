"""Ordered SQL migrations, applied once each, safely when several daemons start at once.

Migrations are the plain SQL files ``NNNN_name.sql`` of ``ingestor/sql/`` (the project's
top-level ``sql/``), applied in version order and recorded in
``schema_migrations(version, name, checksum, applied_at)``.

* **Serialised.**  :func:`migrate` holds a session-level PostgreSQL advisory lock
  (:data:`LOCK_KEY`) from before it reads ``schema_migrations`` until it is done, so two
  daemons (or an operator and a daemon) starting together apply each migration once: the
  second waits, then finds nothing pending.
* **Atomic by default.**  A migration runs in one transaction together with the insert of
  its ``schema_migrations`` row: it is applied entirely or not at all.
* **Statements that cannot run in a transaction** (``CREATE INDEX CONCURRENTLY``,
  ``ALTER TYPE ... ADD VALUE`` before PostgreSQL 12, ``VACUUM``) go in a file whose header
  has the line ``-- ingestor: no-transaction``.  Such a file is split into statements, each
  run on its own in autocommit mode, and recorded after the last one succeeded.  If one
  fails, the earlier ones stay applied and the migration is not recorded, so it is run again
  from the top next time: its statements must be idempotent (``IF NOT EXISTS``, and for a
  concurrent index, ``DROP INDEX CONCURRENTLY IF EXISTS`` of an invalid leftover first).
* **Long locks said first.**  A migration that holds tables locked until it commits (an
  index rebuilt in its transaction) names them in its header, ``-- ingestor: locks t1,
  t2``; before it runs, :func:`migrate` logs a warning naming the tables that hold more
  than :data:`LOCK_WARN_ROWS` rows (the planner's estimate), since writes to them wait
  until it commits.
* **Tamper-evident.**  The SHA-256 of each applied file (line endings normalised) is stored;
  if an applied file has changed since, :func:`migrate` refuses (:class:`MigrationError`) --
  an applied migration is history; a change goes in a new file.
* **Start check.**  :func:`current` tells the daemon whether the database has exactly the
  migrations this version ships (:func:`require_current` turns "no" into one line).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

#: The advisory lock key (``pg_advisory_lock(bigint)``): the bytes of "ingestor".
LOCK_KEY = int.from_bytes(b"ingestor", "big")

#: The header line that makes a migration run outside a transaction.
NO_TRANSACTION = re.compile(r"^--\s*ingestor:\s*no-transaction\s*$", re.M)

#: The header line naming the tables a migration holds locked until it commits.
LOCKS = re.compile(r"^--\s*ingestor:\s*locks\s+(.+?)\s*$", re.M)
#: Above this many rows (estimated) in a table a migration locks, it is announced.
LOCK_WARN_ROWS = 1_000_000

_FILENAME = re.compile(r"^(\d{4})_([a-z0-9][a-z0-9_]*)\.sql$")

SCHEMA_MIGRATIONS_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """A migration cannot be applied, or the applied history disagrees with the files."""


@dataclass(frozen=True)
class Migration:
    """One migration file.

    Attributes
    ----------
    version : int
        The number the file name starts with; the order of application.
    name : str
        The rest of the file name (without ``.sql``).
    sql : str
        The file's text.
    checksum : str
        SHA-256 (hex) of the text with line endings normalised to ``\\n``.
    transactional : bool
        False when the header marks it ``-- ingestor: no-transaction``.
    locks : tuple of str
        The tables its header names in ``-- ingestor: locks ...``.
    """

    version: int
    name: str
    sql: str
    checksum: str
    transactional: bool
    locks: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``0001_market_data``: how messages name it."""
        return f"{self.version:04d}_{self.name}"


def checksum(text: str) -> str:
    """SHA-256 hex digest of a migration's text, insensitive to CRLF/LF checkouts."""
    return hashlib.sha256(text.replace("\r\n", "\n").encode("utf-8")).hexdigest()


def _default_source():
    return resources.files("ingestor.store") / "sql"


def discover(source: str | Path | None = None) -> list[Migration]:
    """The migrations of a directory (default: the package's ``sql/``), in version order.

    Raises
    ------
    MigrationError
        Two files share a version number, or a ``.sql`` file's name does not follow
        ``NNNN_name.sql``.
    """
    root = _default_source() if source is None else Path(source)
    found: dict[int, Migration] = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".sql"):
            continue
        m = _FILENAME.match(entry.name)
        if not m:
            raise MigrationError(f"migration file name {entry.name!r} is not NNNN_name.sql")
        version = int(m.group(1))
        text = entry.read_text(encoding="utf-8")
        if version in found:
            raise MigrationError(f"two migrations numbered {version:04d}: "
                                 f"{found[version].label}.sql and {entry.name}")
        header = _header(text)
        locks = tuple(t.strip() for found_locks in LOCKS.findall(header)
                      for t in found_locks.split(",") if t.strip())
        found[version] = Migration(version, m.group(2), text, checksum(text),
                                   transactional=not NO_TRANSACTION.search(header),
                                   locks=locks)
    return [found[v] for v in sorted(found)]


def _header(text: str) -> str:
    """The leading comment block of a file (where the no-transaction marker must be)."""
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("--"):
            break
        lines.append(s)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# statement splitting (for no-transaction migrations)

_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def split_statements(text: str) -> list[str]:
    """Split SQL text into statements at top-level semicolons.

    Understands what can hide a semicolon: ``--`` and (nested) ``/* */`` comments,
    single-quoted strings (``''`` escapes; ``E''`` strings with backslash escapes), quoted
    identifiers and dollar-quoted bodies (``$$ ... $$``, ``$tag$ ... $tag$``).  Statements
    consisting only of comments/whitespace are dropped.
    """
    out: list[str] = []
    start = i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == "/" and text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "'":
            escapes = i > 0 and text[i - 1] in "eE" and (i < 2 or not (text[i - 2].isalnum()
                                                                       or text[i - 2] == "_"))
            i += 1
            while i < n:
                if escapes and text[i] == "\\":
                    i += 2
                    continue
                if text[i] == "'":
                    if i + 1 < n and text[i + 1] == "'":
                        i += 2
                        continue
                    break
                i += 1
            i += 1
        elif c == '"':
            j = i + 1
            while j < n:
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        j += 2
                        continue
                    break
                j += 1
            i = j + 1
        elif c == "$" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = _DOLLAR_TAG.match(text, i)
            if m:
                tag = m.group(0)
                j = text.find(tag, m.end())
                i = n if j < 0 else j + len(tag)
            else:
                i += 1
        elif c == ";":
            _keep(out, text[start:i])
            i += 1
            start = i
        else:
            i += 1
    _keep(out, text[start:])
    return out


def _keep(out: list[str], stmt: str) -> None:
    body = stmt.strip()
    if body and split_is_code(body):
        out.append(body)


def split_is_code(stmt: str) -> bool:
    """True if ``stmt`` has anything besides comments and whitespace."""
    s = re.sub(r"/\*.*?\*/", "", stmt, flags=re.S)
    s = re.sub(r"--[^\n]*", "", s)
    return bool(s.strip())


# --------------------------------------------------------------------------------------------
# status


@dataclass
class SchemaStatus:
    """How the database's applied migrations compare with the shipped files.

    Attributes
    ----------
    applied : list of int
        Versions recorded in ``schema_migrations``.
    pending : list of Migration
        Shipped but not applied (``ingestor migrate`` applies them).
    unknown : list of int
        Applied but not shipped: the database is newer than this version of ingestor.
    changed : list of Migration
        Applied, but the file's checksum differs from the recorded one.
    """

    applied: list[int] = field(default_factory=list)
    pending: list[Migration] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)
    changed: list[Migration] = field(default_factory=list)

    @property
    def current(self) -> bool:
        """True when every shipped migration is applied, unchanged, and nothing else is."""
        return not (self.pending or self.unknown or self.changed)

    def __bool__(self) -> bool:
        return self.current

    @property
    def message(self) -> str:
        """One line for the user."""
        if self.changed:
            return ("applied migration(s) changed since they were applied: "
                    + ", ".join(m.label for m in self.changed)
                    + " (restore the files; put changes in a new migration)")
        if self.unknown:
            return ("the database has migration(s) this version of ingestor does not know: "
                    + ", ".join(f"{v:04d}" for v in self.unknown) + " (upgrade ingestor)")
        if self.pending:
            return (f"the database schema is not current ({len(self.pending)} pending: "
                    + ", ".join(m.label for m in self.pending) + "): run `ingestor migrate`")
        return "the database schema is current"


def _applied(conn) -> dict[int, tuple[str, str]]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]
    if not exists:
        return {}
    rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
    return {v: (name, chk) for v, name, chk in rows}


def _status(applied: dict[int, tuple[str, str]], migrations: Iterable[Migration]) -> SchemaStatus:
    st = SchemaStatus(applied=sorted(applied))
    shipped = {m.version: m for m in migrations}
    for v, m in shipped.items():
        if v not in applied:
            st.pending.append(m)
        elif applied[v][1] != m.checksum:
            st.changed.append(m)
    st.unknown = sorted(v for v in applied if v not in shipped)
    st.pending.sort(key=lambda m: m.version)
    return st


def current(conn, source: str | Path | None = None) -> SchemaStatus:
    """Compare the database with the shipped migrations (read-only; takes no lock).

    Parameters
    ----------
    conn : psycopg.Connection
        Any connection to the database.
    source : path, optional
        A migrations directory other than the package's (tests).

    Returns
    -------
    SchemaStatus
        Truthy when the schema is current; ``.message`` says what to do otherwise.
    """
    from psycopg.pq import TransactionStatus

    idle = conn.info.transaction_status == TransactionStatus.IDLE
    try:
        return _status(_applied(conn), discover(source))
    finally:
        # read-only: end the transaction this call opened, leave the caller's alone
        if idle and not conn.autocommit and \
                conn.info.transaction_status == TransactionStatus.INTRANS:
            conn.rollback()


def require_current(conn, source: str | Path | None = None) -> None:
    """Raise :class:`ingestor.errors.SchemaNotCurrent` (one line) unless the schema is current."""
    status = current(conn, source)
    if not status:
        from ingestor.errors import SchemaNotCurrent

        raise SchemaNotCurrent(status.message)


# --------------------------------------------------------------------------------------------
# applying


def migrate(conn, source: str | Path | None = None) -> list[Migration]:
    """Apply the pending migrations in order, under the advisory lock.

    Parameters
    ----------
    conn : psycopg.Connection
        A connection with the privileges to create the schema.  It is switched to
        autocommit for the duration (transactions are managed here) and restored after;
        it must not be inside a transaction.
    source : path, optional
        A migrations directory other than the package's (tests).

    Returns
    -------
    list of Migration
        The migrations applied by this call (empty when the schema was current).

    Raises
    ------
    MigrationError
        An applied migration's file changed, the database has migrations unknown to this
        version, or a migration failed (the message names it and the server's reason; a
        transactional migration left nothing behind).
    """
    import psycopg

    migrations = discover(source)
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise MigrationError("migrate() needs a connection that is not inside a transaction "
                             "(commit or roll back first)")
    was_autocommit = conn.autocommit
    conn.autocommit = True
    done: list[Migration] = []
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            conn.execute(SCHEMA_MIGRATIONS_DDL)
            status = _status(_applied(conn), migrations)
            if status.changed or status.unknown:
                raise MigrationError(status.message)
            for m in status.pending:
                log.info("applying migration %s%s", m.label,
                         "" if m.transactional else " (outside a transaction)")
                _announce_locks(conn, m)
                try:
                    if m.transactional:
                        with conn.transaction():
                            conn.execute(m.sql)
                            _record(conn, m)
                    else:
                        for stmt in split_statements(m.sql):
                            conn.execute(stmt)
                        _record(conn, m)
                except psycopg.Error as exc:
                    raise MigrationError(f"migration {m.label} failed: {_pg_reason(exc)}") from exc
                done.append(m)
        finally:
            if not conn.closed and conn.info.transaction_status == 0:  # IDLE
                conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    finally:
        if not conn.closed and conn.info.transaction_status == 0:
            conn.autocommit = was_autocommit
    return done


# a table's rows as the planner estimates them, its partitions or chunks included (-1: never
# analyzed, counted as none); NULL when the table does not exist (yet)
_SQL_ROWS = """
SELECT sum(greatest(c.reltuples, 0))::bigint FROM pg_class c
WHERE c.oid = to_regclass(%(t)s)
   OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass(%(t)s))
"""


def _announce_locks(conn, m: Migration) -> None:
    big = []
    for table in m.locks:
        rows = conn.execute(_SQL_ROWS, {"t": table}).fetchone()[0] or 0
        if rows > LOCK_WARN_ROWS:
            big.append(f"{table} (about {rows:,} rows)")
    if big:
        log.warning("migration %s holds %s locked until it commits: writes to %s wait "
                    "meanwhile (run this outside market hours)", m.label, ", ".join(big),
                    "it" if len(big) == 1 else "them")


def _record(conn, m: Migration) -> None:
    conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                 (m.version, m.name, m.checksum))


def _pg_reason(exc) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) or str(exc).splitlines()[0]
    context = getattr(diag, "context", None)
    detail = f" ({context.splitlines()[0]})" if context else ""
    return f"{primary}{detail}"
