"""The package's exceptions: one hierarchy, so callers catch by meaning, not by module.

Library code raises these; only the command line (``ingestor.cli``) turns them into exit
statuses and one line on stderr: an :class:`IngestorError` whose ``exit_status`` is 2 means
bad usage or bad input (a bad setting, a malformed file), anything else is 1.

::

    IngestorError                       exit 1
    +-- UsageError                      exit 2: bad usage or bad input
    |   +-- ConfigError                 exit 2: a bad setting
    +-- PoisonInput                     one input the product refuses (kept aside, not raised
    |                                   past the component that met it)
    +-- DatabaseError
        +-- DatabaseUnavailable         the server cannot be reached / went away
        |   +-- ConnectionLost          ... for longer than the writer's ``retry_for``
        +-- SchemaNotCurrent            migrations are missing
        +-- WriterStopped               the writer met a *fatal* refusal (see
            |                           ``ingestor.store.errors``): nothing committed
            +-- StreamAdvanced          another writer committed inside this batch's range

``ingestor.config.ConfigError`` (a ``ValueError``) predates this module; the CLI maps it to
status 2 as well.  It could become a subclass of :class:`ConfigError` here.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConnectionLost",
    "DatabaseError",
    "DatabaseUnavailable",
    "IngestorError",
    "PoisonInput",
    "SchemaNotCurrent",
    "StreamAdvanced",
    "UsageError",
    "WriterStopped",
]


class IngestorError(Exception):
    """Base of the package's errors; ``str()`` is one line for the user (no secrets)."""

    #: the command line's exit status for this error
    exit_status = 1


class UsageError(IngestorError):
    """Bad usage or bad input (arguments, a malformed file): exit status 2."""

    exit_status = 2


class ConfigError(UsageError):
    """A bad setting: one line naming it, exit status 2."""


class PoisonInput(IngestorError, ValueError):
    """One input (a message, a row) that cannot be stored because of its own content.

    Components that meet one keep it aside with the reason (a dead letter) and go on;
    it is raised only between the parts of one component.
    """


class DatabaseError(IngestorError):
    """Something about the database, not about one input."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached or went away (a restart, a network cut)."""


class ConnectionLost(DatabaseUnavailable):
    """The database stayed unreachable longer than the writer's ``retry_for``."""


class SchemaNotCurrent(DatabaseError):
    """The database's schema is missing migrations (``ingestor migrate``)."""


class WriterStopped(DatabaseError):
    """The writer stopped on a *fatal* refusal: the batch was not committed.

    Attributes
    ----------
    reason : str
        The one-line reason (the SQLSTATE and the server's message).
    sqlstate : str or None
        The server's code, when the refusal came from the server.
    """

    def __init__(self, reason: str, sqlstate: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.sqlstate = sqlstate


class StreamAdvanced(WriterStopped):
    """Another writer committed part of this batch's range: the pipeline must restart
    from the database's offset (a retry of the same batch can never succeed)."""

    def __init__(self, stream: str, committed: int, first_seq: int):
        super().__init__(f"stream {stream} was committed up to {committed} by another writer, "
                         f"inside this batch (from {first_seq})")
        self.stream = stream
        self.committed = committed
        self.first_seq = first_seq
