"""Stream offsets: the committed sequence number of each stream (exactly once).

DESIGN.md "Exactly once": every message has a place (stream, sequence number); a flush
commits its rows and the highest sequence number it covers *in the same transaction*;
anything at or below a stream's committed number is skipped.  So these functions do not
commit: call them on the writer's connection inside its flush transaction.

:func:`advance` is monotonic (``greatest``): committing an older number -- a retried batch
that lost a race, a replay of an earlier part -- never moves the offset back.  A stream that
never committed reads as :data:`NONE` (-1), so sequence 0 is still "not yet written".

Sync and async twins share the SQL (:data:`SQL_COMMITTED`, :data:`SQL_ADVANCE`).
"""

from __future__ import annotations

#: The committed number of a stream that has never committed.
NONE = -1

SQL_COMMITTED = "SELECT committed_seq FROM stream_offsets WHERE stream = %s"
# FOR UPDATE variant: serialises two writers of one stream (the second waits for the first's
# flush to commit, then sees its number) -- the row is created first so there is one to lock.
SQL_ENSURE = ("INSERT INTO stream_offsets (stream, committed_seq) VALUES (%s, -1) "
              "ON CONFLICT (stream) DO NOTHING")
SQL_COMMITTED_LOCK = SQL_COMMITTED + " FOR UPDATE"
SQL_ADVANCE = (
    "INSERT INTO stream_offsets AS o (stream, committed_seq, updated_at) VALUES (%s, %s, now()) "
    "ON CONFLICT (stream) DO UPDATE SET "
    "committed_seq = greatest(o.committed_seq, excluded.committed_seq), updated_at = now() "
    "RETURNING committed_seq")


def committed(conn, stream: str, *, lock: bool = False) -> int:
    """The committed sequence number of ``stream`` (:data:`NONE` if it never committed).

    Parameters
    ----------
    conn : psycopg.Connection
    stream : str
    lock : bool
        Lock the stream's row until the current transaction ends (``SELECT ... FOR
        UPDATE``), so a concurrent writer of the same stream waits instead of writing the
        same rows.
    """
    if lock:
        conn.execute(SQL_ENSURE, (stream,))
        row = conn.execute(SQL_COMMITTED_LOCK, (stream,)).fetchone()
    else:
        row = conn.execute(SQL_COMMITTED, (stream,)).fetchone()
    return NONE if row is None else int(row[0])


def advance(conn, stream: str, seq: int) -> int:
    """Record ``seq`` as committed for ``stream`` unless a higher one is; return the offset.

    Call inside the flush transaction that wrote the rows up to ``seq``.
    """
    if seq < NONE:
        raise ValueError(f"sequence numbers are >= 0, not {seq}")
    return int(conn.execute(SQL_ADVANCE, (stream, seq)).fetchone()[0])


def all_offsets(conn) -> dict[str, int]:
    """Every stream's committed number."""
    return {s: int(n) for s, n in conn.execute("SELECT stream, committed_seq FROM stream_offsets")}


async def acommitted(conn, stream: str, *, lock: bool = False) -> int:
    """Async twin of :func:`committed` (a :class:`psycopg.AsyncConnection`)."""
    if lock:
        await conn.execute(SQL_ENSURE, (stream,))
        cur = await conn.execute(SQL_COMMITTED_LOCK, (stream,))
    else:
        cur = await conn.execute(SQL_COMMITTED, (stream,))
    row = await cur.fetchone()
    return NONE if row is None else int(row[0])


async def aadvance(conn, stream: str, seq: int) -> int:
    """Async twin of :func:`advance`."""
    if seq < NONE:
        raise ValueError(f"sequence numbers are >= 0, not {seq}")
    cur = await conn.execute(SQL_ADVANCE, (stream, seq))
    return int((await cur.fetchone())[0])
