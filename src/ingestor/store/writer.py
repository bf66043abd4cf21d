"""The writer: one transaction per ``FlushBatch``, exactly once, never dropping.

A flush is one transaction (psycopg 3, async).  ``Writer.write`` runs it on one connection in
the order below; ``Writer.write_all`` (replay and the daemon) overlaps consecutive batches on
two connections: batch N+1's inserts of rows no other batch has (steps 2-4's COPYs) run while
batch N is still in its transaction, and its offset check, upserts, postbacks and offset wait,
on the client's side, for N's commit (see "Two connections" below).

1. lock the stream's offset row and read its committed sequence number; a
   batch at or below it was written already (a retry after a lost commit
   acknowledgement, a replayed capture) and is skipped (a batch covering no
   message at all -- the end-of-stream flush of forming candles -- is
   written idempotently instead, see ``_tail``);
2. ``COPY tick_data`` from the core's binary payload (see "Two paths for ticks");
3. ``COPY ohlc_candles`` of the closed candles never stored in any version
   (``FlushBatch.new_candles``: the 1s/5s bulk, replay's closes), plainly: a
   unique violation there (the minute and longer timeframes have a key) is a
   bug (fatal), never data (measured on the 437,712
   candles of a 1M-tick, 400-instrument replay, one transaction per flush, on
   TimescaleDB: staging + upsert into the old two-index table 35k rows/s, into
   the one-key table 36k, plain COPY into it 71k); the others (forming
   candles, upserted again as they grow, and closes of candles stored while
   forming) are ``COPY``ed into a temporary staging table, then written by
   ``candle_sql.apply_staged``: upserted by the key (``INSERT ... ON CONFLICT
   DO UPDATE``), the 1s/5s ones, which have no key (sql/0007), replaced (the
   last version of a key in a batch wins);
4. ``COPY order_book_snapshots`` (first deleting the rows the batch
   retracts: see ``FlushBatch.retracted``), then upsert the engine's state of
   the instruments the batch touched into ``engine_state`` (the restart state
   of this very offset);
5. the batch's text messages (order postbacks) through ``on_texts`` (the
   orders component: orders, fills, positions);
6. advance the stream's committed sequence number; commit.

Two paths for ticks.  On TimescaleDB with ``tick_data``'s columnstore as
``ingestor.store.timescale`` sets it up (segmentby ``instrument_id``, orderby
``tables.TICK_ORDERBY``, no unique index), the batch's dense part -- instruments
with enough rows in the flush to make good compressed batches, grouped and
ordered by the core (``FlushBatch.ticks``) -- goes straight into the columnstore
(``timescaledb.enable_direct_compress_copy`` with ``..._client_sorted``, set for
that one statement's transaction), and the sparse rest into the rowstore: many
tiny compressed batches would make reads slow and the chunk larger.  A batch
that is not in order (``FlushBatch.in_order``: a backfill) goes to the rowstore
whole, so the columnstore's ordered batches never overlap.  The server falls
back to the rowstore silently when the table has a unique index or a trigger:
its warning is caught, counted (``WriterStats.direct_refused``) and logged once,
and the writer stops asking.  ``direct_compress=False`` (setting
``writer.direct_compress``) never asks: TimescaleDB calls the feature
experimental.

Two connections.  The server applies a transaction on one backend, one core; overlapping
two batches gives it the second (measured in ``ingestor.benchmarks.storage``: ``replay`` against
``replay, one connection``).  Commit order and the exactly-once protocol are unchanged: N+1
takes the offset row's lock, checks and advances it only after N committed.  Its early
inserts cannot conflict with N's rows (ticks are new per instrument and time, closed candles
never stored and snapshots are each written once); should N fail, N+1 rolls back and both are
written again one at a time by ``write``, which classifies the error as below.  One lock N+1
can hold that N may wait for: TimescaleDB's, on a chunk N+1's COPY created (the first COPY
into a new chunk holds the hypertable's ShareUpdateExclusiveLock to its commit).  N+1 enters
each table only after N is done with it, so only N's later upserts of forming candles can
meet it; N+1 looks (``pg_blocking_pids``) while it waits, rolls back if it blocks N, and is
written after it.

What happens when the database refuses a flush is decided by one classification of the
error's SQLSTATE, shared with the order store (``ingestor.store.errors.classify``):

* **connection** (the server went away, is restarting, the network cut): reconnect and
  retry with jittered exponential backoff for as long as ``retry_for`` allows (forever in
  the daemon, which spools meanwhile; then :class:`~ingestor.errors.ConnectionLost`).
  The offsets make the retry exactly once.
* **data** (the database refuses the batch's own values: class 22, a not-null or foreign
  key violation, an index row too large): after ``max_rejects`` attempts the batch is set
  aside to a dead-letter folder with the reason (:class:`DeadLetters`; ``ingestor
  dead-letter replay`` re-applies it once the cause is fixed), its offset is committed,
  and the pipeline goes on: never silently dropped, never blocking what follows.
* **fatal** (the fault is in the configuration, the schema, the server or the code: a
  check constraint such as ``ohlc_candles_timeframe_check``, a unique violation, missing
  privileges, a full disk, ...): the writer stops writing.  Nothing of the batch is
  committed and its offset is not advanced, so the spool keeps it and everything after it.
  :attr:`Writer.fatal` holds the reason and :attr:`Writer.up` is False (``/healthz``
  answers 503, ``ingestor_database_up`` is 0, ``ingestor_writer_fatal`` is 1), and the
  reason is logged once, as one error line.  Then, by ``fatal_retry``:

  - a number of seconds (the daemon's default, 30 s): the same batch is tried again at
    that pace, quietly, until the cause is fixed (a grant, a migration, freed disk: none of
    them needs a restart), then the writer logs its recovery and goes on;
  - None (``ingestor replay`` and other bounded runs): :class:`~ingestor.errors.WriterStopped`
    is raised at once and the command exits non-zero.

  A serialization failure or deadlock (40001, 40P01) is first retried ``max_rejects``
  times at once.  :class:`~ingestor.errors.StreamAdvanced` (another writer committed
  inside this batch's range) is fatal and always raised: no retry of the same batch can
  pass, the pipeline must restart from the database's offset (the daemon exits non-zero
  and the next start does that).

For health reports and metrics the writer exposes :attr:`Writer.up`, :attr:`Writer.fatal`
(the reason, or None), :attr:`Writer.fatal_since` (``time.time()``),
:attr:`Writer.dead_letters_since_start` and :attr:`Writer.last_dead_letter` (the path
of the newest dead-letter file); given a ``metrics`` object it also counts
``ingestor_dead_letters_total`` and sets ``ingestor_writer_fatal`` itself.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ingestor.errors import ConnectionLost, StreamAdvanced, WriterStopped
from ingestor.pipeline import tables
from ingestor.store import offsets
from ingestor.store.candle_sql import CANDLE_LIST, SQL_STAGE, aapply_staged
from ingestor.store.errors import classify, describe_error, is_transient, sqlstate_of
from ingestor.store.dsn import describe, error_line, password_of
from ingestor.logs import register_secret
from ingestor.pipeline import FlushBatch

log = logging.getLogger(__name__)
T = TypeVar("T")

_TICK_COLS = ", ".join(c[0] for c in tables.TICK_COLUMNS)
_SNAP_COLS = ", ".join(c[0] for c in tables.SNAPSHOT_COLUMNS)

SQL_COPY_TICKS = f"COPY tick_data ({_TICK_COLS}) FROM STDIN (FORMAT BINARY)"
SQL_COPY_CANDLES = f"COPY ohlc_candles ({CANDLE_LIST}) FROM STDIN (FORMAT BINARY)"
# for the rest of the transaction only, and turned off after the one COPY it is for
SQL_DIRECT_ON = ("SELECT set_config('timescaledb.enable_direct_compress_copy', 'on', true), "
                 "set_config('timescaledb.enable_direct_compress_copy_client_sorted', 'on', "
                 "true)")
SQL_DIRECT_OFF = SQL_DIRECT_ON.replace("'on'", "'off'")
# Whether tick_data is laid out for direct-to-columnstore COPY: the server has the setting,
# the columnstore is segmented and ordered as the core emits, and no unique index blocks it.
SQL_DIRECT_LAYOUT = """
SELECT current_setting('timescaledb.enable_direct_compress_copy', true) IS NOT NULL,
       (SELECT replace(orderby, '"', '') || '|' || segmentby
          FROM timescaledb_information.hypertable_columnstore_settings
         WHERE hypertable = 'tick_data'::regclass),
       (SELECT string_agg(indexrelid::regclass::text, ', ') FROM pg_index
         WHERE indrelid = 'tick_data'::regclass AND indisunique)
"""
#: the binary COPY header (signature, flags, extension length) and trailer
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
COPY_TRAILER = b"\xff\xff"
SQL_COPY_STAGE = f"COPY ingestor_candle_stage ({CANDLE_LIST}) FROM STDIN (FORMAT BINARY)"
SQL_COPY_SNAPS = f"COPY order_book_snapshots ({_SNAP_COLS}) FROM STDIN (FORMAT BINARY)"
# Angel One's DEPTH packets (FlushBatch.depth20): rows only a message makes, so only here
SQL_COPY_DEPTH20 = (f"COPY order_book_depth20 ({', '.join(c[0] for c in tables.DEPTH20_COLUMNS)}) "
                    "FROM STDIN (FORMAT BINARY)")
# A batch covering no message (see _transaction) writes its snapshots through a staging table,
# skipping keys already present: the offset cannot tell whether it was committed before.
SQL_SNAP_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS ingestor_snapshot_stage "
                  "(LIKE order_book_snapshots) ON COMMIT DELETE ROWS")
SQL_COPY_SNAP_STAGE = (f"COPY ingestor_snapshot_stage ({_SNAP_COLS}) FROM STDIN (FORMAT BINARY)")
SQL_INSERT_SNAPS = (f"INSERT INTO order_book_snapshots ({_SNAP_COLS}) "
                    f"SELECT {_SNAP_COLS} FROM ingestor_snapshot_stage ON CONFLICT DO NOTHING")

# The engine's continuation state of the instruments a batch touched (sql/0004): staged, then
# upserted by instrument, in the batch's transaction (its rows, offset and state commit together).
SQL_STATE_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS ingestor_state_stage (instrument_id integer, stream text, "
    "last_seq bigint, last_time timestamptz, last_volume bigint, state bytea) ON COMMIT DELETE ROWS")
SQL_COPY_STATE = ("COPY ingestor_state_stage (instrument_id, stream, last_seq, last_time, "
                  "last_volume, state) FROM STDIN (FORMAT BINARY)")
SQL_UPSERT_STATE = (
    "INSERT INTO engine_state (instrument_id, stream, last_seq, last_time, last_volume, state) "
    "SELECT instrument_id, stream, last_seq, last_time, NULLIF(last_volume, -1), state "
    "FROM ingestor_state_stage "
    "ON CONFLICT (instrument_id) DO UPDATE SET stream = excluded.stream, "
    "last_seq = excluded.last_seq, last_time = excluded.last_time, "
    "last_volume = excluded.last_volume, state = excluded.state, updated_at = now()")
# Snapshot rows a shutdown's flush() wrote mid-interval, superseded after the restart by a later
# book of the same interval (FlushBatch.retracted): deleted before the batch's snapshots.
SQL_RETRACT = (
    "DELETE FROM order_book_snapshots s USING unnest(%s::bigint[], %s::integer[]) AS r(t, id) "
    "WHERE s.instrument_id = r.id "
    "AND s.time = timestamptz 'epoch' + r.t * interval '1 microsecond'")

#: ``Writer._bulk``'s steps: closed candles, books, 20-level books, ticks
_STEPS = 4
# Whether the first backend holds a lock the second waits for (``Writer._wait_commit``).
SQL_BLOCKS = "SELECT %s = ANY(pg_blocking_pids(%s))"
#: seconds between ``_wait_commit``'s looks at whether the batch before waits for this one
YIELD_CHECK = 0.2


@dataclass
class _InFlight:
    batch: FlushBatch
    conn: "psycopg.AsyncConnection"
    t0: float
    task: "asyncio.Task | None" = None
    #: set as the batch's rows of each table are in (``Writer._bulk``'s steps), or it ended
    steps: list = field(default_factory=lambda: [asyncio.Event() for _ in range(_STEPS)])


class _Behind(Exception):
    """The batch before failed: this one rolled back and is written again after it."""


class _Yield(Exception):
    """The batch before waited for a lock this one held: this one rolled back."""


# A backfill (``FlushBatch.backfill_ticks``; see "Backfill" in ``ingestor.pipeline.pipeline``):
# ticks that keep their own times, older than ticks already stored for their instruments, so
# they may fall among stored ones.  ``_write_backfill`` writes them in the batch's transaction:
#
# * staged, then the rows whose (instrument_id, time) ``tick_data`` holds already are dropped:
#   that is the same tick (the same instrument received at the same microsecond: the same
#   capture replayed under another stream name, or two captures of one recording that
#   overlap), stored once.  Without a unique index on TimescaleDB this anti-join is what
#   keeps the key unique for a backfill (the stream offset keeps a replay of the *same*
#   stream once; the engine's clock, which makes live ticks unique by construction, is not
#   used for a backfill).  One probe of the (instrument_id, time) index per staged row.
# * the rest INSERTed: into the rowstore on TimescaleDB (never direct COPY), so the
#   columnstore's ordered batches never overlap (compaction later rebuilds the chunk in
#   order).
# * every candle the inserted rows touch is recomputed from tick_data with the one candle
#   definition (``candle_sql.RECOMPUTE_SQL``), so candles equal SQL over the stored ticks,
#   those of buckets that already held newer ticks included.  Touched: for each timeframe,
#   the bucket of each inserted row, and of each stored tick whose volume increase the
#   insert changed -- the first stored volume-carrying tick after an inserted one (its
#   increase is measured from the previous cumulative volume, which is now the inserted
#   tick's).  Cost: the recompute reads the stored ticks of each touched bucket, so a
#   backfill in many batches re-reads its longest buckets (a day) once per batch.
# * the engine state of a backfilled instrument whose forming bucket the insert touched, or
#   that the backfill went past, is set NULL: the next start recomputes that instrument from
#   tick_data (``ingestor.pipeline.state``, the fallback for such rows; its last time is then
#   the newest stored tick, never an older one), instead of continuing candles that lack the
#   backfilled ticks.
# * its book snapshots skip keys already stored.
#
# Backfill transactions take one transaction-scoped advisory lock (``SQL_BACKFILL_LOCK``), so
# two backfills of overlapping captures running at once are applied one after the other:
# the second one's anti-join, a statement begun after the lock is granted, sees the first
# one's rows (READ COMMITTED), and no tick is inserted twice.
SQL_BACKFILL_LOCK = "SELECT pg_advisory_xact_lock(hashtext('ingestor.backfill'))"
SQL_BACKFILL_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS ingestor_backfill_stage (LIKE tick_data) "
                      "ON COMMIT DELETE ROWS")
SQL_COPY_BACKFILL = f"COPY ingestor_backfill_stage ({_TICK_COLS}) FROM STDIN (FORMAT BINARY)"
SQL_BACKFILL_DROP_STORED = (
    "DELETE FROM ingestor_backfill_stage s WHERE EXISTS (SELECT FROM tick_data d "
    "WHERE d.instrument_id = s.instrument_id AND d.time = s.time)")
SQL_BACKFILL_INSERT = (f"INSERT INTO tick_data ({_TICK_COLS}) "
                       f"SELECT {_TICK_COLS} FROM ingestor_backfill_stage")
# Parameters: labels (text[]), strides (bigint[], µs), origin (timestamptz on a bucket boundary
# of every timeframe).  The stage holds the inserted rows only.
SQL_BACKFILL_KEYS = """
WITH ins AS (
    -- per instrument, its first and last inserted volume-carrying tick
    SELECT instrument_id, min(time) AS lo, max(time) AS hi
    FROM ingestor_backfill_stage WHERE volume IS NOT NULL GROUP BY instrument_id
), span AS (
    -- ... and the first stored volume-carrying tick after the last one
    SELECT ins.instrument_id, ins.lo,
           coalesce((SELECT d.time FROM tick_data d
                     WHERE d.instrument_id = ins.instrument_id AND d.time > ins.hi
                       AND d.volume IS NOT NULL ORDER BY d.time LIMIT 1), ins.hi) AS top
    FROM ins
), vol AS (
    -- the stored volume-carrying ticks of that span: is each one inserted, was its previous
    SELECT d.instrument_id, d.time, b.time IS NOT NULL AS inserted,
           lag(b.time IS NOT NULL) OVER (PARTITION BY d.instrument_id ORDER BY d.time) AS after
    FROM span
    JOIN tick_data d ON d.instrument_id = span.instrument_id
     AND d.time >= span.lo AND d.time <= span.top AND d.volume IS NOT NULL
    LEFT JOIN ingestor_backfill_stage b ON b.instrument_id = d.instrument_id AND b.time = d.time
), touched AS (
    SELECT instrument_id, time FROM ingestor_backfill_stage
    UNION ALL
    -- a stored tick right after an inserted one: its volume increase changed
    SELECT instrument_id, time FROM vol WHERE after AND NOT inserted
)
INSERT INTO ingestor_candle_keys (time, instrument_id, timeframe, stride_us)
SELECT DISTINCT date_bin(u.us * interval '1 microsecond', t.time, %(origin)s::timestamptz),
       t.instrument_id, u.label, u.us
FROM touched t CROSS JOIN unnest(%(labels)s::text[], %(strides)s::bigint[]) AS u(label, us)
"""
# The backfilled instruments whose committed forming candle is one of the recomputed ones, or
# whose newest stored tick is now an inserted one: their state is recomputed at the next start.
SQL_BACKFILL_RELEASE_STATE = """
UPDATE engine_state e SET state = NULL, updated_at = now()
WHERE e.state IS NOT NULL AND e.instrument_id IN (
    SELECT k.instrument_id FROM ingestor_candle_keys k
    JOIN engine_state s ON s.instrument_id = k.instrument_id
    WHERE k.time = date_bin(k.stride_us * interval '1 microsecond', s.last_time,
                            %(origin)s::timestamptz)
    UNION
    SELECT b.instrument_id FROM ingestor_backfill_stage b
    JOIN engine_state s ON s.instrument_id = b.instrument_id
    GROUP BY b.instrument_id, s.last_time HAVING max(b.time) > s.last_time)
"""

__all__ = ["ConnectionLost", "DeadLetters", "StreamAdvanced", "Writer", "WriterStats",
           "WriterStopped", "postback_handler"]

#: ``fatal_retry`` default: 30 s when connection losses are retried forever (the daemon),
#: else None (raise at once)
_AUTO = object()


@dataclass
class WriterStats:
    batches: int = 0
    skipped_batches: int = 0
    ticks: int = 0
    candles: int = 0
    snapshots: int = 0
    retries: int = 0
    reconnects: int = 0
    dead_letters: int = 0
    flush_seconds: list = field(default_factory=list)
    #: tick COPYs (and their rows) into the columnstore directly and into the rowstore
    direct_copies: int = 0
    direct_rows: int = 0
    rowstore_copies: int = 0
    rowstore_rows: int = 0
    #: direct COPYs the server turned into rowstore ones (its warning)
    direct_refused: int = 0
    #: batches ``write_all`` wrote overlapped with the one before, and those it had to write
    #: again one at a time (a failure, or a lock the batch before waited for)
    overlapped: int = 0
    overlap_retries: int = 0
    #: backfilled tick rows inserted, and those skipped as already stored (same key)
    backfill_ticks: int = 0
    backfill_stored: int = 0

    @property
    def write_seconds(self) -> float:
        return sum(self.flush_seconds)

    def flushed(self, seconds: float) -> None:
        """One committed flush's duration (the newest 5,000 to 10,000 are kept)."""
        self.flush_seconds.append(seconds)
        if len(self.flush_seconds) > 10_000:
            del self.flush_seconds[:5_000]


class DeadLetters:
    """A folder of batches the database refused: ``<stream>-<first>-<last>.*``."""

    def __init__(self, path: str):
        self.path = path

    def put(self, batch: FlushBatch, reason: str, sqlstate: str | None = None) -> str:
        """Write ``batch`` to the folder; returns the path of its ``.json`` description.

        ``<base>.json`` (stream, range, reason, counts), ``<base>.ticks.copy``,
        ``<base>.candles.copy``, ``<base>.snapshots.copy`` (the binary COPY payloads exactly
        as the writer sent them) and ``<base>.texts.jsonl`` (the postbacks).  ``ingestor
        dead-letter replay`` reads them back; once applied the description is renamed
        ``<base>.applied.json``.
        """
        os.makedirs(self.path, exist_ok=True)
        base = os.path.join(self.path, f"{batch.stream}-{batch.first_seq}-{batch.last_seq}")
        for name, data in (("ticks", batch.ticks), ("candles", batch.candles),
                           ("new_candles", batch.new_candles), ("snapshots", batch.snapshots),
                           ("backfill_ticks", batch.backfill_ticks),
                           ("backfill_snapshots", batch.backfill_snapshots)):
            if data:
                with open(f"{base}.{name}.copy", "wb") as f:
                    f.write(data)
        meta = {"stream": batch.stream, "first_seq": batch.first_seq, "last_seq": batch.last_seq,
                "reason": reason, "sqlstate": sqlstate, "ticks": batch.n_ticks, "candles": batch.n_candles,
                "snapshots": batch.n_snapshots, "texts": len(batch.texts),
                "set_aside_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "note": "each .copy file is a PostgreSQL binary COPY payload for its table"}
        if batch.backfill_clock is not None:
            c = batch.backfill_clock
            meta["backfill_clock"] = {"labels": c["labels"], "strides_us": c["strides_us"],
                                      "origin": c["origin"].isoformat()}
        with open(f"{base}.json", "w") as f:
            json.dump(meta, f, indent=2)
        if batch.texts:
            with open(f"{base}.texts.jsonl", "w") as f:
                for seq, payload in batch.texts:
                    f.write(json.dumps({"seq": seq, "text": payload.decode("utf-8", "replace")}) + "\n")
        return base + ".json"


class Writer:
    """Writes ``FlushBatch``es, one transaction each (see the module docstring).

    Parameters
    ----------
    dsn : str
        The database.
    dead_letter_dir : str
        Where refused batches are set aside.
    max_rejects : int
        Attempts before a batch the database refuses for its data is set aside (and
        immediate retries of a serialization failure or deadlock before it is fatal).
    retry_for : float or None
        Seconds to keep retrying a lost connection before giving up
        (``ConnectionLost`` is raised); None retries forever (the daemon,
        which spools meanwhile).
    fatal_retry : float or None
        After a fatal refusal, seconds between quiet attempts of the same batch; None
        raises :class:`~ingestor.errors.WriterStopped` instead.  Default: 30 s when
        ``retry_for`` is None (the daemon), else None.
    metrics : optional
        An object with ``dead_letters`` (a counter) and ``writer_fatal`` (a gauge), as
        :class:`ingestor.metrics.Metrics` has: kept up to date by the writer.
    on_texts : async callable, optional
        ``on_texts(conn, batch)`` run inside the flush transaction for the
        batch's text messages (the orders component): postbacks commit with
        the ticks and the stream offset, so they too are exactly once.
    direct_compress : bool
        Send each batch's dense part of ticks straight into TimescaleDB's columnstore when
        ``tick_data`` is laid out for it (see the module docstring); False never does.
    overlap : bool
        ``write_all`` writes a batch's rows on a second connection while the batch before
        is still in its transaction (see the module docstring); False: one at a time.
    """

    def __init__(self, dsn: str, *, dead_letter_dir: str = "dead-letter", max_rejects: int = 3,
                 retry_for: float | None = 60.0, backoff_max: float = 5.0,
                 on_texts: Callable[[psycopg.AsyncConnection, FlushBatch], Awaitable[None]] | None = None,
                 fatal_retry: float | None = _AUTO, metrics=None, direct_compress: bool = True,
                 overlap: bool = True):
        register_secret(password_of(dsn))
        self.dsn = dsn
        self.params = conninfo_to_dict(dsn)
        self.params.setdefault("connect_timeout", 10)
        self.dead_letters = DeadLetters(dead_letter_dir)
        self.max_rejects = max_rejects
        self.retry_for = retry_for
        self.backoff_max = backoff_max
        self.on_texts = on_texts
        if fatal_retry is _AUTO:
            fatal_retry = 30.0 if retry_for is None else None
        self.fatal_retry = fatal_retry
        self.metrics = metrics
        self.conn: psycopg.AsyncConnection | None = None
        #: ``write_all``'s second connection (``overlap``)
        self.conn2: psycopg.AsyncConnection | None = None
        self.overlap = overlap
        self.stats = WriterStats()
        #: False from a lost connection or a fatal refusal until the next successful flush
        #: (health, metrics)
        self.up = True
        #: the reason (one line, with the SQLSTATE) while the writer is stopped by a fatal
        #: refusal, else None; health reports show it and answer 503
        self.fatal: str | None = None
        #: ``time.time()`` when the current fatal stop began, else None
        self.fatal_since: float | None = None
        #: path of the newest dead-letter description (``.json``) this writer wrote
        self.last_dead_letter: str | None = None
        self.direct_compress = direct_compress
        #: whether this connection sends dense ticks to the columnstore (see ``connect``)
        self.direct = False
        self._direct_noted = False

    @property
    def dead_letters_since_start(self) -> int:
        """Batches set aside to the dead-letter folder since this writer was created."""
        return self.stats.dead_letters

    async def connect(self) -> None:
        if self.conn is not None and not self.conn.closed:
            return
        self.conn = await self._open()
        self.direct = self.direct_compress and await self._direct_layout()
        await self.conn.commit()

    async def _open(self) -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(**self.params)
        conn.add_notice_handler(self._notice)
        await conn.execute(SQL_STAGE)
        await conn.execute(SQL_SNAP_STAGE)
        await conn.execute(SQL_STATE_STAGE)
        await conn.commit()
        return conn

    async def _direct_layout(self) -> bool:
        """Whether ``tick_data`` takes direct-to-columnstore COPYs (logged once if it cannot
        only because of something an operator can fix)."""
        conn = self.conn
        if await (await conn.execute("SELECT to_regclass('timescaledb_information."
                                     "hypertable_columnstore_settings')")).fetchone() == (None,):
            return False
        has_setting, layout, unique = await (await conn.execute(SQL_DIRECT_LAYOUT)).fetchone()
        if not has_setting or layout is None:
            return False
        want = f"{tables.TICK_ORDERBY}|instrument_id"
        problem = None
        if unique:
            problem = (f"tick_data has a unique index ({unique}), which the server refuses "
                       "direct COPY for: run `ingestor migrate`")
        elif layout.replace(", ", ",") != want:
            problem = (f"tick_data's columnstore is ordered/segmented as {layout!r}, not as the "
                       f"core emits ({want!r})")
        if problem:
            if not self._direct_noted:
                log.warning("direct-to-columnstore COPY off: %s", problem)
                self._direct_noted = True
            return False
        return True

    def _notice(self, diag) -> None:
        msg = diag.message_primary or ""
        if "disabling direct compress" in msg:
            self.stats.direct_refused += 1
            self.direct = False
            if not self._direct_noted:
                self._direct_noted = True
                log.warning("the server refused direct-to-columnstore COPY (%s): ticks go to "
                            "the rowstore until the writer reconnects", msg)

    async def close(self) -> None:
        for name in ("conn", "conn2"):
            conn = getattr(self, name)
            if conn is not None:
                await conn.close()
                setattr(self, name, None)

    async def write(self, batch: FlushBatch) -> str:
        """Commit ``batch``; returns ``"written"``, ``"skipped"`` or ``"dead-letter"``.

        Raises
        ------
        ConnectionLost
            The database stayed unreachable longer than ``retry_for``.
        WriterStopped
            A fatal refusal and ``fatal_retry`` is None, or :class:`StreamAdvanced`:
            nothing of the batch was committed.
        """
        rejects = 0
        transient = 0
        while True:
            try:
                return await self._reconnecting(batch, lambda: self._flush(batch))
            except StreamAdvanced as exc:
                self._stop(batch, f"StreamAdvanced: {exc}")
                raise
            except psycopg.Error as exc:
                kind = classify(exc)  # not "connection": _reconnecting retries those
                reason = describe_error(exc)
                self.stats.retries += 1
                if kind == "data":
                    rejects += 1
                    if rejects < self.max_rejects:
                        log.warning("database refused %s %d..%d (%s); attempt %d of %d",
                                    batch.stream, batch.first_seq, batch.last_seq, reason,
                                    rejects, self.max_rejects)
                        continue
                    return await self._set_aside(batch, reason, sqlstate_of(exc))
                if is_transient(exc) and transient < self.max_rejects:
                    transient += 1
                    log.warning("flush of %s %d..%d: %s; retrying (%d of %d)", batch.stream,
                                batch.first_seq, batch.last_seq, reason, transient,
                                self.max_rejects)
                    # a few quick tries of the same transaction (a deadlock, a
                    # serialization failure), counted against max_rejects like the data
                    # refusals: part of the classification, not a backoff to hand to stamina
                    await asyncio.sleep(0.05 * transient * (0.5 + random.random()))
                    continue
                await self._fatal(batch, reason, sqlstate_of(exc))

    async def _flush(self, batch: FlushBatch) -> str:
        t0 = time.perf_counter()
        outcome = await self._transaction(batch)
        self.up = True
        if self.fatal is not None:
            self._resume(batch)
        self.stats.flushed(time.perf_counter() - t0)
        return outcome

    async def _reconnecting(self, batch: FlushBatch, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` on a connection, a lost connection retried (stamina: exponential
        backoff with jitter up to ``backoff_max``) for ``retry_for`` seconds, then
        :class:`ConnectionLost`; any other error is the caller's to classify."""
        import stamina

        def lost(exc: BaseException) -> bool:
            return isinstance(exc, psycopg.Error) and classify(exc) == "connection"

        lost_since = None
        try:
            async for attempt in stamina.retry_context(
                    on=lost, attempts=None, timeout=self.retry_for, wait_initial=0.05,
                    wait_max=self.backoff_max, wait_jitter=0.1):
                with attempt:
                    try:
                        await self.connect()
                        return await fn()
                    except psycopg.Error as exc:
                        if lost(exc):
                            self.up = False
                            await self._drop()
                            lost_since = lost_since or time.monotonic()
                            self.stats.retries += 1
                            log.warning("flush of %s %d..%d failed (%s); retrying in %.2f s",
                                        batch.stream, batch.first_seq, batch.last_seq,
                                        error_line(exc), attempt.next_wait)
                        raise
        except psycopg.Error as exc:
            if not lost(exc):
                raise
            raise ConnectionLost(f"database {describe(self.dsn)} unreachable for "
                                 f"{time.monotonic() - lost_since:.0f} s: {error_line(exc)}"
                                 ) from None
        raise AssertionError("unreachable")

    async def write_all(self, take: Callable[[], Awaitable[FlushBatch | None]],
                        on_written: Callable[[FlushBatch, str, float], object] | None = None
                        ) -> None:
        """Write the batches ``take()`` returns until it returns None, in order.

        Each batch is one transaction, committed after the one before (its offset check
        holds as in :meth:`write`).  With ``overlap``, while batch N is in its transaction
        on one connection, batch N+1's rows go in on the other (``_bulk``: the server's
        second core); N+1 then waits, on the client's side, for N's commit before its
        locking statements and its offset (``_locking``).  Should N fail, N+1 rolls back,
        and both are written again one at a time by :meth:`write`, which classifies the
        error, retries, sets aside or stops exactly as always.  N+1 enters each table after
        N is done with it (``_bulk``), so a TimescaleDB chunk both need is N's to create; should
        N still wait for a lock N+1 holds (its upserts of forming candles into a chunk N+1
        created), N+1 finds that out (``pg_blocking_pids``) while it waits, rolls back, and is
        written again after N.  ``on_written(batch, outcome, seconds)`` is called in commit
        order (and
        awaited when it returns an awaitable: what must follow a commit, in order).
        """
        inflight: collections.deque = collections.deque()
        taking: asyncio.Future | None = None
        try:
            while True:
                # the next batch, or the oldest in flight committing, whichever comes first: a
                # batch is settled (``on_written``) as soon as it commits, not when one follows
                if taking is None:
                    taking = asyncio.ensure_future(take())
                if inflight and not taking.done():
                    await asyncio.wait([taking, inflight[0].task],
                                       return_when=asyncio.FIRST_COMPLETED)
                    if inflight[0].task.done():
                        await self._settle(inflight, on_written)
                        continue
                b = await taking
                taking = None
                if b is None:
                    break
                conn = None
                if self.overlap and self.fatal is None and b.last_seq >= b.first_seq:
                    if len(inflight) == 2:
                        await self._settle(inflight, on_written)
                    try:
                        conn = await self._free_conn(inflight)
                    except psycopg.Error:  # the sequential path waits for the database
                        pass
                if conn is None:  # one at a time, after everything in flight
                    while inflight:
                        await self._settle(inflight, on_written)
                    await self._write_timed(b, on_written)
                    continue
                before = inflight[-1] if inflight else None
                f = _InFlight(b, conn, time.perf_counter())
                f.task = asyncio.create_task(self._overlapped(f, before),
                                             name=f"flush {b.stream} {b.first_seq}..{b.last_seq}")
                inflight.append(f)
            while inflight:
                await self._settle(inflight, on_written)
        finally:
            if taking is not None:
                taking.cancel()
            if inflight:  # cancelled or failed: nothing in flight may outlive the call
                for f in inflight:
                    f.task.cancel()
                await asyncio.gather(*(f.task for f in inflight), return_exceptions=True)

    async def _write_timed(self, b: FlushBatch, on_written) -> None:
        t0 = time.perf_counter()
        outcome = await self.write(b)
        if on_written is not None:
            await _maybe_await(on_written(b, outcome, time.perf_counter() - t0))

    async def _free_conn(self, inflight) -> psycopg.AsyncConnection:
        """The connection no batch in flight uses, open."""
        busy = {id(f.conn) for f in inflight}
        await self.connect()
        if id(self.conn) not in busy:
            return self.conn
        if self.conn2 is None or self.conn2.closed:
            self.conn2 = await self._open()
        return self.conn2

    async def _settle(self, inflight, on_written) -> None:
        """Wait for the oldest batch in flight; written again one at a time if it failed."""
        f = inflight[0]
        try:
            outcome = await f.task
            inflight.popleft()
            self.up = True
            self.stats.overlapped += 1
            seconds = time.perf_counter() - f.t0
            self.stats.flushed(seconds)
            if on_written is not None:
                await _maybe_await(on_written(f.batch, outcome, seconds))
            return
        except Exception as e:  # noqa: BLE001 - every failure is redone by write()
            # (not a cancellation: only this call's own, which cancels the batch with it)
            exc = e
        inflight.popleft()
        # The batches after it roll back (they wait for it): let them finish, so that no
        # connection is inside a transaction when write() takes one.
        if inflight:
            await asyncio.wait([g.task for g in inflight])
        for conn in {id(f.conn): f.conn, **{id(g.conn): g.conn for g in inflight}}.values():
            if conn.broken:
                await self._forget(conn)
        self.stats.overlap_retries += 1
        if not isinstance(exc, _Behind):
            log.debug("overlapped flush of %s %d..%d not committed (%s): writing it again "
                      "on its own", f.batch.stream, f.batch.first_seq, f.batch.last_seq,
                      describe_error(exc) if isinstance(exc, psycopg.Error) else repr(exc))
        await self._write_timed(f.batch, on_written)
        while inflight:  # each rolled back behind it: written again too, in order
            await self._settle(inflight, on_written)

    async def _forget(self, conn) -> None:
        if conn is self.conn:
            await self._drop()
        elif conn is self.conn2:
            self.conn2 = None
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    async def _overlapped(self, f: "_InFlight", before: "_InFlight | None") -> str:
        """Batch ``f``'s transaction on its connection, overlapping ``before``'s (see
        ``write_all``)."""
        conn, b = f.conn, f.batch
        outcome = "written"
        try:
            async with conn.transaction():
                copies = await self._bulk(conn, b, f, before)
                if before is not None:
                    await self._wait_commit(conn, before)
                verdict = await self._check_offset(conn, b)
                if verdict is not None:
                    outcome = verdict
                    raise psycopg.Rollback()
                await self._locking(conn, b)
                await offsets.aadvance(conn, b.stream, b.last_seq)
        finally:
            for step in f.steps:  # (the batch after never waits on one that ended)
                step.set()
        if outcome == "written":
            self._count(b, copies)
        return outcome

    async def _wait_commit(self, conn, before: "_InFlight") -> None:
        """Wait for the batch before to commit; give way (``_Yield``) if it waits for a lock
        this transaction holds, and roll back (``_Behind``) if it failed."""
        mine, theirs = conn.info.backend_pid, before.conn.info.backend_pid
        while True:
            done, _ = await asyncio.wait([before.task], timeout=YIELD_CHECK)
            if done:
                if before.task.cancelled() or before.task.exception() is not None:
                    raise _Behind()
                return
            cur = await conn.execute(SQL_BLOCKS, (mine, theirs))
            if (await cur.fetchone())[0]:
                raise _Yield()

    def _stop(self, batch: FlushBatch, reason: str) -> bool:
        """Enter (or stay in) the fatal state; returns True if this is news (logged)."""
        self.up = False
        if self.metrics is not None:
            self.metrics.writer_fatal.set(1)
        if self.fatal == reason:
            return False
        self.fatal = reason
        self.fatal_since = self.fatal_since or time.time()
        then = ("retrying it every %.0f s" % self.fatal_retry if self.fatal_retry is not None
                and not reason.startswith("StreamAdvanced") else "stopping")
        log.error("writer stopped: %s -- a fault of configuration, schema, server or code, not "
                  "of the data: batch %s %d..%d not committed, the spool keeps it; %s",
                  reason, batch.stream, batch.first_seq, batch.last_seq, then)
        return True

    async def _fatal(self, batch: FlushBatch, reason: str, sqlstate: str | None) -> None:
        """A fatal refusal of ``batch``: raise, or wait ``fatal_retry`` for another try."""
        if not self._stop(batch, reason):
            log.debug("writer still stopped: %s", reason)
        if self.fatal_retry is None:
            raise WriterStopped(reason, sqlstate)
        # a new session for the next try: the fix may have changed the schema the session's
        # staging tables were copied from
        await self._drop()
        await asyncio.sleep(self.fatal_retry)

    def _resume(self, batch: FlushBatch) -> None:
        log.warning("writer resumed at %s %d..%d after %.0f s stopped by: %s", batch.stream,
                    batch.first_seq, batch.last_seq, time.time() - (self.fatal_since or time.time()),
                    self.fatal)
        self.fatal = None
        self.fatal_since = None
        if self.metrics is not None:
            self.metrics.writer_fatal.set(0)

    async def _transaction(self, b: FlushBatch) -> str:
        conn = self.conn
        if b.last_seq < b.first_seq:
            return await self._tail(b)
        async with conn.transaction():
            verdict = await self._check_offset(conn, b)
            if verdict is not None:
                return verdict
            copies = await self._bulk(conn, b)
            await self._locking(conn, b)
            await offsets.aadvance(conn, b.stream, b.last_seq)
        self._count(b, copies)
        return "written"

    async def _check_offset(self, conn, b: FlushBatch) -> str | None:
        """Lock the stream's offset row: ``"skipped"`` if the batch is committed already;
        :class:`StreamAdvanced` if another writer committed part of it; else None."""
        committed = await offsets.acommitted(conn, b.stream, lock=True)
        if committed >= b.last_seq:
            self.stats.skipped_batches += 1
            return "skipped"
        if committed >= b.first_seq:
            # Another writer of this stream committed part of this range:
            # the pipeline must restart from the database's offset.
            raise StreamAdvanced(b.stream, committed, b.first_seq)
        return None

    async def _bulk(self, conn, b: FlushBatch, mine: "_InFlight | None" = None,
                    before: "_InFlight | None" = None) -> list:
        """The batch's inserts of rows no other batch has (ticks, closed candles never stored,
        snapshots): no row of theirs is another batch's, so they may run while the batch before
        is still in its transaction (see ``write_all``).

        Table by table, each after the batch before is done with that table (``before``'s
        steps): the first COPY into a new TimescaleDB chunk creates it and holds the
        hypertable's ShareUpdateExclusiveLock to the end of its transaction, so were the later
        batch first into a table, the earlier one would wait for it, and it would have to give
        way (``_Yield``); in this order the later one waits, as it must anyway."""
        dense = b.n_dense_ticks if self.direct and b.in_order else 0
        copies: list = []
        async with conn.cursor() as cur:
            steps = ((b.new_candles, SQL_COPY_CANDLES, b.new_candles),
                     (b.n_snapshots and not b.retracted, SQL_COPY_SNAPS, b.snapshots),
                     # rows of their own: each DEPTH packet's time is new per instrument
                     (b.depth20, SQL_COPY_DEPTH20, b.depth20),
                     (b.n_ticks, None, None))
            for k, (due, sql, data) in enumerate(steps):
                if before is not None:
                    await before.steps[k].wait()
                if due and sql is not None:
                    await _copy(cur, sql, data)
                elif due:
                    copies = await self._ticks(cur, b, dense)
                if mine is not None:
                    mine.steps[k].set()
        return copies

    async def _ticks(self, cur, b: FlushBatch, dense: int) -> list:
        copies = []
        if b.n_ticks > dense:
            copies.append(await self._copy_ticks(cur, b, dense, direct=False))
        if dense:
            # the setting is local to the transaction: on for this one COPY only
            await cur.execute(SQL_DIRECT_ON)
            copies.append(await self._copy_ticks(cur, b, dense, direct=True))
            await cur.execute(SQL_DIRECT_OFF)
        return copies

    async def _locking(self, conn, b: FlushBatch) -> None:
        """The batch's statements that update rows an earlier batch may hold (candle and
        state upserts, retracted snapshots, postbacks): run once the batch before committed."""
        async with conn.cursor() as cur:
            if b.candles:
                await _copy(cur, SQL_COPY_STAGE, b.candles)
                await aapply_staged(cur)
            if b.retracted:
                await _retract(cur, b)
                if b.n_snapshots:
                    await _copy(cur, SQL_COPY_SNAPS, b.snapshots)
            if b.n_state:
                await _write_state(cur, b)
            if not b.in_order:
                await _write_backfill(cur, b, self.stats)
        if b.texts and self.on_texts is not None:
            await self.on_texts(conn, b)

    def _count(self, b: FlushBatch, copies=()) -> None:
        """A committed batch in the statistics (``copies``: its tick COPYs, ``_ticks``)."""
        s = self.stats
        for path, rows in copies:
            if path == "direct":
                s.direct_copies += 1
                s.direct_rows += rows
            else:
                s.rowstore_copies += 1
                s.rowstore_rows += rows
        s.batches += 1
        s.ticks += b.n_ticks
        s.candles += b.n_candles
        s.snapshots += b.n_snapshots

    async def _copy_ticks(self, cur, b: FlushBatch, dense: int, *,
                          direct: bool) -> tuple[str, int]:
        """COPY the batch's dense part (``direct``) or the rest of its ticks (all of them
        when ``dense`` is 0): both parts are complete COPY payloads cut from ``b.ticks``."""
        s = self.stats
        refused = s.direct_refused
        mv = memoryview(b.ticks)
        async with cur.copy(SQL_COPY_TICKS) as cp:
            if direct:
                await cp.write(mv[:b.dense_bytes])
                await cp.write(COPY_TRAILER)
            elif dense:
                await cp.write(COPY_HEADER)
                await cp.write(mv[b.dense_bytes:])
            else:
                await cp.write(mv)
        rows = dense if direct else b.n_ticks - dense
        # counted once the transaction commits (``_count``)
        return ("direct" if direct and s.direct_refused == refused else "rowstore"), rows

    async def _tail(self, b: FlushBatch) -> str:
        # A batch covering no message: what the engine wrote out after the stream's last
        # committed message -- the end-of-stream flush of forming candles and pending
        # snapshots, candles closed by advance() in a quiet spell.  Skipping it by the offset
        # (nothing new to commit) would lose them.  It is written only if the stream is still
        # where this pipeline left it (else another writer went on and holds newer candles),
        # idempotently: candles are upserts, snapshots skip keys already present.
        if not (b.n_candles or b.n_snapshots or b.n_state or b.retracted):
            self.stats.skipped_batches += 1
            return "skipped"
        conn = self.conn
        async with conn.transaction():
            committed = await offsets.acommitted(conn, b.stream, lock=True)
            if committed != b.last_seq:
                self.stats.skipped_batches += 1
                return "skipped"
            async with conn.cursor() as cur:
                if b.n_candles:
                    await _stage_candles(cur, b)
                    await aapply_staged(cur)
                if b.retracted:
                    await _retract(cur, b)
                if b.n_snapshots:
                    await _copy(cur, SQL_COPY_SNAP_STAGE, b.snapshots)
                    await cur.execute(SQL_INSERT_SNAPS)
                if b.n_state:
                    # the flushed candles and books are now stored: a restart must know it
                    await _write_state(cur, b)
        self._count(b)
        return "written"

    async def _set_aside(self, batch: FlushBatch, reason: str, sqlstate: str | None = None) -> str:
        where = self.dead_letters.put(batch, reason, sqlstate)
        log.error("set aside %s %d..%d after %d refusals: %s (see %s; `ingestor dead-letter "
                  "replay` re-applies it once the cause is fixed)", batch.stream,
                  batch.first_seq, batch.last_seq, self.max_rejects, reason, where)
        # Commit the offset alone so the stream goes on past the refused batch.
        async def advance():
            async with self.conn.transaction():
                await offsets.aadvance(self.conn, batch.stream, batch.last_seq)

        while True:
            try:
                await self._reconnecting(batch, advance)
                break
            except psycopg.Error as exc:  # the offsets table itself is refused: not the batch's
                await self._fatal(batch, describe_error(exc), sqlstate_of(exc))
        if self.fatal is not None:
            self._resume(batch)
        self.up = True
        self.stats.dead_letters += 1
        self.last_dead_letter = where
        if self.metrics is not None:
            self.metrics.dead_letters.inc()
        return "dead-letter"

    async def _drop(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self.conn = None
            self.stats.reconnects += 1


async def _stage_candles(cur, b: FlushBatch) -> None:
    # A batch covering no message (``_tail``) may have been committed before: both parts are
    # upserted.  ``new_candles`` staged first: a key in both (none is, by construction)
    # would keep ``candles``.
    for payload in (b.new_candles, b.candles):
        if payload:
            await _copy(cur, SQL_COPY_STAGE, payload)


async def _maybe_await(result) -> None:
    if inspect.isawaitable(result):
        await result


async def _copy(cur, sql: str, data) -> None:
    """One COPY of one binary payload."""
    async with cur.copy(sql) as cp:
        await cp.write(data)


async def _retract(cur, b: FlushBatch) -> None:
    await cur.execute(SQL_RETRACT, ([t for t, _ in b.retracted], [i for _, i in b.retracted]))


async def _write_state(cur, b: FlushBatch) -> None:
    await _copy(cur, SQL_COPY_STATE, b.state)
    await cur.execute(SQL_UPSERT_STATE)


async def _write_backfill(cur, b: FlushBatch, stats: WriterStats) -> None:
    """A batch's backfill part (see ``SQL_BACKFILL_STAGE`` and the comment above it)."""
    from ingestor.store.candle_sql import RECOMPUTE_SQL, SQL_KEYS_TABLE

    if b.n_backfill_ticks:
        await cur.execute(SQL_BACKFILL_LOCK)
        await cur.execute(SQL_BACKFILL_STAGE)
        async with cur.copy(SQL_COPY_BACKFILL) as cp:
            await cp.write(b.backfill_ticks)
        await cur.execute("ANALYZE ingestor_backfill_stage")
        await cur.execute(SQL_BACKFILL_DROP_STORED)
        await cur.execute(SQL_BACKFILL_INSERT)
        inserted = max(cur.rowcount, 0)
        stats.backfill_ticks += inserted
        stats.backfill_stored += b.n_backfill_ticks - inserted
        if inserted:
            clock = b.backfill_clock
            params = {"labels": clock["labels"], "strides": clock["strides_us"],
                      "origin": clock["origin"]}
            await cur.execute(SQL_KEYS_TABLE)
            await cur.execute(SQL_BACKFILL_KEYS, params)
            # (the planner needs the keys' count: else a scan of tick_data per key)
            await cur.execute("ANALYZE ingestor_candle_keys")
            await cur.execute(RECOMPUTE_SQL)
            await aapply_staged(cur)
            await cur.execute(SQL_BACKFILL_RELEASE_STATE, {"origin": clock["origin"]})
    if b.n_backfill_snapshots:
        async with cur.copy(SQL_COPY_SNAP_STAGE) as cp:
            await cp.write(b.backfill_snapshots)
        await cur.execute(SQL_INSERT_SNAPS)


def postback_handler():
    """``on_texts`` for the writer: the batch's order postbacks into the order tables."""
    from ingestor.orders.store import OrderStore

    store = OrderStore()

    async def on_texts(conn, batch: FlushBatch) -> None:
        places = [(batch.stream, seq) for seq, _ in batch.texts]
        result = await store.apply(conn, [payload for _, payload in batch.texts], places)
        if result.dead_letters:
            log.warning("%d postback(s) of %s did not decode: kept in postback_dead_letters",
                        result.dead_letters, batch.stream)

    on_texts.store = store
    return on_texts
