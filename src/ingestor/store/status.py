"""What the database says about ingestion, for ``ingestor status``: read-only queries.

Each function takes a psycopg connection in autocommit mode (so one refused query, a
missing view or a statement timeout, does not end the others) and the instants that bound
"today" (the caller's, so a status can be taken as of another time), and returns plain
values.  The queries are cheap on a table of a busy day:

* the newest tick per exchange and today's tick count come from ``engine_state`` (one row
  per instrument, the instrument's last tick time, written with every batch) and, per
  instrument that ticked today, a range scan of ``tick_data``'s key ``(instrument_id,
  time)``; a count over the whole table would read every day's rows on plain PostgreSQL,
  where ``tick_data`` has no index on ``time`` alone.  Without ``engine_state`` (an older
  schema) they fall back to scanning ``tick_data``, bounded by the statement timeout;
* candles and snapshots are counted by their keys, which lead with ``time``;
* TimescaleDB's state (hypertables, columnstore/compression, policy jobs) is read from
  ``timescaledb_information`` only where the extension is installed, each view and function
  tried on its own: their names changed across versions (``hypertable_columnstore_stats``
  since 2.18, ``hypertable_compression_stats`` before), so what one version lacks is
  reported as unavailable, never an error.
"""

from __future__ import annotations

import datetime as dt
import logging

import psycopg

from ingestor.store.dsn import error_line

log = logging.getLogger(__name__)

#: The time-series tables, with the column "today" is counted on.
TABLES = ("tick_data", "ohlc_candles", "order_book_snapshots")

#: Streams listed at most (one per connection per run accumulate; the newest are shown).
MAX_STREAMS = 20


class Unavailable(Exception):
    """A query that could not answer (timeout, missing object): its one-line reason."""


def _rows(conn, sql: str, params=()) -> list[tuple]:
    try:
        return conn.execute(sql, params).fetchall()
    except psycopg.errors.QueryCanceled:
        raise Unavailable("timed out (statement_timeout)") from None
    except psycopg.Error as exc:
        raise Unavailable(error_line(exc)) from None


def _has_table(conn, name: str) -> bool:
    return _rows(conn, "SELECT to_regclass(%s) IS NOT NULL", (name,))[0][0]


def set_timeout(conn, seconds: float) -> None:
    """Bound every following query of ``conn`` (a status must answer, not hang)."""
    conn.execute(f"SET statement_timeout = {max(1, int(seconds * 1000))}")


def streams(conn, limit: int = MAX_STREAMS) -> tuple[int, list[dict]]:
    """How many streams ever committed, and the ``limit`` most recently committed ones."""
    total = _rows(conn, "SELECT count(*) FROM stream_offsets")[0][0]
    rows = _rows(conn, "SELECT stream, committed_seq, updated_at FROM stream_offsets "
                       "ORDER BY updated_at DESC, stream LIMIT %s", (limit,))
    return total, [{"stream": s, "committed_seq": n, "updated_at": t} for s, n, t in rows]


def newest_ticks(conn) -> dict[str, dt.datetime]:
    """The newest tick's time per exchange (exchanges that never ticked are absent)."""
    if _has_table(conn, "engine_state"):
        rows = _rows(conn, "SELECT i.exchange, max(e.last_time) FROM engine_state e "
                           "JOIN instruments i ON i.id = e.instrument_id GROUP BY i.exchange")
    else:
        rows = _rows(conn, "SELECT exchange, max(time) FROM tick_data GROUP BY exchange")
    return {ex: t for ex, t in rows if t is not None}


def rows_today(conn, table: str, start: dt.datetime, end: dt.datetime) -> int:
    """Rows of ``table`` with ``start <= time < end``."""
    if table == "tick_data" and _has_table(conn, "engine_state"):
        sql = ("SELECT coalesce(sum(c.n), 0)::bigint FROM engine_state e CROSS JOIN LATERAL "
               "(SELECT count(*) AS n FROM tick_data t WHERE t.instrument_id = e.instrument_id"
               " AND t.time >= %s AND t.time < %s) c WHERE e.last_time >= %s")
        return int(_rows(conn, sql, (start, end, start))[0][0])
    if table not in TABLES:
        raise ValueError(table)
    return int(_rows(conn, f"SELECT count(*) FROM {table} WHERE time >= %s AND time < %s",
                     (start, end))[0][0])


def table_bytes(conn, table: str, hypertable: bool) -> int:
    """On-disk size of ``table`` with its indexes (and, on a hypertable, its chunks)."""
    if hypertable:
        return int(_rows(conn, "SELECT hypertable_size(%s::regclass)", (table,))[0][0] or 0)
    return int(_rows(conn, "SELECT pg_total_relation_size(%s::regclass)", (table,))[0][0])


def bytes_since(conn, table: str, start: dt.datetime) -> int:
    """Bytes of a hypertable's chunks that reach past ``start`` (today's chunks)."""
    sql = ("SELECT coalesce(sum(s.total_bytes), 0)::bigint FROM chunks_detailed_size(%s::regclass) s"
           " JOIN timescaledb_information.chunks c ON c.chunk_schema = s.chunk_schema"
           " AND c.chunk_name = s.chunk_name WHERE c.range_end > %s")
    return int(_rows(conn, sql, (table, start))[0][0])


def feed_gaps(conn, start: dt.datetime, end: dt.datetime) -> list[dict]:
    """Gaps overlapping ``[start, end)`` and every gap still open, oldest first."""
    rows = _rows(conn, "SELECT connection, stream, started_at, ended_at, reason, "
                       "coalesce(cardinality(tokens), 0) FROM feed_gaps "
                       "WHERE (started_at < %s AND (ended_at IS NULL OR ended_at >= %s)) "
                       "OR ended_at IS NULL ORDER BY started_at LIMIT 200", (end, start))
    return [{"connection": c, "stream": s, "started_at": a, "ended_at": b, "reason": r,
             "tokens": n} for c, s, a, b, r, n in rows]


def postback_dead_letters(conn, start: dt.datetime, end: dt.datetime) -> dict:
    """Postbacks set aside since ``start``: how many, and the latest reasons."""
    n = _rows(conn, "SELECT count(*) FROM postback_dead_letters "
                    "WHERE received_at >= %s AND received_at < %s", (start, end))[0][0]
    latest = _rows(conn, "SELECT received_at, stream, seq, reason FROM postback_dead_letters "
                         "WHERE received_at >= %s AND received_at < %s "
                         "ORDER BY received_at DESC LIMIT 5", (start, end))
    return {"today": int(n), "latest": [{"received_at": t, "stream": s, "seq": q, "reason": r}
                                        for t, s, q, r in latest]}


def timescale_version(conn) -> str | None:
    """The installed TimescaleDB version, or None (plain PostgreSQL)."""
    from ingestor.store.timescale import detect

    return detect(conn).installed


def hypertables(conn) -> dict[str, dict]:
    """Hypertables of the time-series tables: compression/columnstore flag and chunk count."""
    rows = _rows(conn, "SELECT hypertable_name, compression_enabled, num_chunks "
                       "FROM timescaledb_information.hypertables "
                       "WHERE hypertable_name = ANY(%s)", (list(TABLES),))
    return {name: {"compression_enabled": bool(on), "chunks": int(n)} for name, on, n in rows}


def compression(conn, table: str) -> dict:
    """Columnstore (2.18+) or compression statistics of a hypertable."""
    last: Unavailable | None = None
    for fn in ("hypertable_columnstore_stats", "hypertable_compression_stats"):
        try:
            rows = _rows(conn, f"SELECT total_chunks, number_compressed_chunks, "
                               f"before_compression_total_bytes, after_compression_total_bytes "
                               f"FROM {fn}(%s::regclass)", (table,))
        except Unavailable as exc:
            last = exc
            continue
        total, done, before, after = rows[0] if rows else (0, 0, None, None)
        return {"chunks": int(total or 0), "compressed_chunks": int(done or 0),
                "bytes_before": before, "bytes_after": after}
    raise last or Unavailable("no compression statistics")


def jobs(conn) -> list[dict]:
    """TimescaleDB's background jobs on the time-series tables (policies) and how they ran."""
    rows = _rows(conn, "SELECT j.job_id, j.proc_name, j.hypertable_name, s.last_run_status, "
                       "s.last_run_started_at, s.next_start, s.total_failures "
                       "FROM timescaledb_information.jobs j "
                       "LEFT JOIN timescaledb_information.job_stats s ON s.job_id = j.job_id "
                       "WHERE j.hypertable_name = ANY(%s) ORDER BY j.job_id", (list(TABLES),))
    return [{"job_id": i, "proc": p, "table": t, "last_run_status": st, "last_run_started_at": ls,
             "next_start": ns, "total_failures": f} for i, p, t, st, ls, ns, f in rows]
