"""The writer: one transaction per ``FlushBatch``, exactly once, never dropping.

A flush is one transaction on one connection (psycopg 3, async):

1. lock the stream's offset row and read its committed sequence number; a
   batch at or below it was written already (a retry after a lost commit
   acknowledgement, a replayed capture) and is skipped (a batch covering no
   message at all -- the end-of-stream flush of forming candles -- is
   written idempotently instead, see ``_tail``);
2. ``COPY tick_data`` from the core's binary payload;
3. ``COPY`` the candles into a temporary staging table, then ``INSERT ...
   ON CONFLICT DO UPDATE`` into ``ohlc_candles`` (forming candles are
   upserted again as they grow; the last version of a key in a batch wins);
4. ``COPY order_book_snapshots`` (first deleting the rows the batch
   retracts: see ``FlushBatch.retracted``), then upsert the engine's state of
   the instruments the batch touched into ``engine_state`` (the restart state
   of this very offset);
5. the batch's text messages (order postbacks) through ``on_texts`` (the
   orders component: orders, fills, positions);
6. advance the stream's committed sequence number; commit.

A lost connection (the server restarted, a network cut) is retried with
jittered exponential backoff, reconnecting, for as long as ``retry_for``
allows: the offsets make the retry exactly once.  A batch the database
itself keeps rejecting (a data error, ``max_rejects`` times) is set aside to
a dead-letter file with the reason, its offset is committed, and the
pipeline goes on: never silently dropped, never blocking what follows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ingestor.pipeline import tables
from ingestor.store import offsets
from ingestor.store.dsn import describe, error_line, password_of
from ingestor.logs import register_secret
from ingestor.pipeline import FlushBatch

log = logging.getLogger(__name__)

_TICK_COLS = ", ".join(c[0] for c in tables.TICK_COLUMNS)
_SNAP_COLS = ", ".join(c[0] for c in tables.SNAPSHOT_COLUMNS)
_CANDLE_KEY = ("time", "instrument_id", "timeframe")
_CANDLE_COLS = _CANDLE_KEY + tables.CANDLE_VALUE_COLUMNS
_CANDLE_LIST = ", ".join(_CANDLE_COLS)

SQL_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS ingestor_candle_stage "
    "(LIKE ohlc_candles, ord bigint GENERATED ALWAYS AS IDENTITY) ON COMMIT DELETE ROWS")
SQL_COPY_TICKS = f"COPY tick_data ({_TICK_COLS}) FROM STDIN (FORMAT BINARY)"
SQL_COPY_STAGE = f"COPY ingestor_candle_stage ({_CANDLE_LIST}) FROM STDIN (FORMAT BINARY)"
SQL_COPY_SNAPS = f"COPY order_book_snapshots ({_SNAP_COLS}) FROM STDIN (FORMAT BINARY)"
# A batch covering no message (see _transaction) writes its snapshots through a staging table,
# skipping keys already present: the offset cannot tell whether it was committed before.
SQL_SNAP_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS ingestor_snapshot_stage "
                  "(LIKE order_book_snapshots) ON COMMIT DELETE ROWS")
SQL_COPY_SNAP_STAGE = (f"COPY ingestor_snapshot_stage ({_SNAP_COLS}) FROM STDIN (FORMAT BINARY)")
SQL_INSERT_SNAPS = (f"INSERT INTO order_book_snapshots ({_SNAP_COLS}) "
                    f"SELECT {_SNAP_COLS} FROM ingestor_snapshot_stage ON CONFLICT DO NOTHING")
# DISTINCT ON: a key twice in one batch (a bucket reopened by a late tick) would
# make ON CONFLICT DO UPDATE affect a row twice; the latest version (highest ord) wins.
SQL_UPSERT = (
    f"INSERT INTO ohlc_candles ({_CANDLE_LIST}) "
    f"SELECT DISTINCT ON (time, instrument_id, timeframe) {_CANDLE_LIST} "
    f"FROM ingestor_candle_stage ORDER BY time, instrument_id, timeframe, ord DESC "
    f"ON CONFLICT (time, instrument_id, timeframe) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in tables.CANDLE_VALUE_COLUMNS))

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

#: Errors that mean "the connection or server is gone", not "this batch is bad".
_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


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

    @property
    def write_seconds(self) -> float:
        return sum(self.flush_seconds)


class DeadLetters:
    """A folder of batches the database refused: ``<stream>-<first>-<last>.*``."""

    def __init__(self, path: str):
        self.path = path

    def put(self, batch: FlushBatch, reason: str) -> str:
        os.makedirs(self.path, exist_ok=True)
        base = os.path.join(self.path, f"{batch.stream}-{batch.first_seq}-{batch.last_seq}")
        for name, data in (("ticks", batch.ticks), ("candles", batch.candles),
                           ("new_candles", batch.new_candles), ("snapshots", batch.snapshots)):
            if data:
                with open(f"{base}.{name}.copy", "wb") as f:
                    f.write(data)
        meta = {"stream": batch.stream, "first_seq": batch.first_seq, "last_seq": batch.last_seq,
                "reason": reason, "ticks": batch.n_ticks, "candles": batch.n_candles,
                "snapshots": batch.n_snapshots, "texts": len(batch.texts),
                "set_aside_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "note": "each .copy file is a PostgreSQL binary COPY payload for its table"}
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
        Attempts before a batch the database refuses is set aside.
    retry_for : float or None
        Seconds to keep retrying a lost connection before giving up
        (``ConnectionLost`` is raised); None retries forever (the daemon,
        which spools meanwhile).
    on_texts : async callable, optional
        ``on_texts(conn, batch)`` run inside the flush transaction for the
        batch's text messages (the orders component): postbacks commit with
        the ticks and the stream offset, so they too are exactly once.
    """

    def __init__(self, dsn: str, *, dead_letter_dir: str = "dead-letter", max_rejects: int = 3,
                 retry_for: float | None = 60.0, backoff_max: float = 5.0,
                 on_texts: Callable[[psycopg.AsyncConnection, FlushBatch], Awaitable[None]] | None = None):
        register_secret(password_of(dsn))
        self.dsn = dsn
        self.params = conninfo_to_dict(dsn)
        self.params.setdefault("connect_timeout", 10)
        self.dead_letters = DeadLetters(dead_letter_dir)
        self.max_rejects = max_rejects
        self.retry_for = retry_for
        self.backoff_max = backoff_max
        self.on_texts = on_texts
        self.conn: psycopg.AsyncConnection | None = None
        self.stats = WriterStats()
        #: False from a lost connection until the next successful flush (health, metrics)
        self.up = True

    async def connect(self) -> None:
        if self.conn is not None and not self.conn.closed:
            return
        self.conn = await psycopg.AsyncConnection.connect(**self.params)
        await self.conn.execute(SQL_STAGE)
        await self.conn.execute(SQL_SNAP_STAGE)
        await self.conn.execute(SQL_STATE_STAGE)
        await self.conn.commit()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None

    async def write(self, batch: FlushBatch) -> str:
        """Commit ``batch``; returns ``"written"``, ``"skipped"`` or ``"dead-letter"``."""
        rejects = 0
        delay = 0.05
        lost_since = None
        while True:
            try:
                await self.connect()
                t0 = time.perf_counter()
                outcome = await self._transaction(batch)
                self.up = True
                self.stats.flush_seconds.append(time.perf_counter() - t0)
                if len(self.stats.flush_seconds) > 10_000:
                    del self.stats.flush_seconds[:5_000]
                return outcome
            except _CONNECTION_ERRORS as exc:
                self.up = False
                await self._drop()
                now = time.monotonic()
                lost_since = lost_since or now
                if self.retry_for is not None and now - lost_since > self.retry_for:
                    raise ConnectionLost(f"database {describe(self.dsn)} unreachable for "
                                         f"{now - lost_since:.0f} s: {error_line(exc)}") from None
                self.stats.retries += 1
                log.warning("flush of %s %d..%d failed (%s); retrying in %.2f s", batch.stream,
                            batch.first_seq, batch.last_seq, error_line(exc), delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.backoff_max)
            except psycopg.Error as exc:
                rejects += 1
                self.stats.retries += 1
                reason = f"{type(exc).__name__}: {error_line(exc)}"
                if rejects < self.max_rejects:
                    log.warning("database refused %s %d..%d (%s); attempt %d of %d", batch.stream,
                                batch.first_seq, batch.last_seq, reason, rejects, self.max_rejects)
                    continue
                return await self._set_aside(batch, reason)

    async def _transaction(self, b: FlushBatch) -> str:
        conn = self.conn
        if b.last_seq < b.first_seq:
            return await self._tail(b)
        async with conn.transaction():
            committed = await offsets.acommitted(conn, b.stream, lock=True)
            if committed >= b.last_seq:
                self.stats.skipped_batches += 1
                return "skipped"
            if committed >= b.first_seq:
                # Another writer of this stream committed part of this range:
                # the pipeline must restart from the database's offset.
                raise StreamAdvanced(b.stream, committed, b.first_seq)
            async with conn.cursor() as cur:
                if b.n_ticks:
                    async with cur.copy(SQL_COPY_TICKS) as cp:
                        await cp.write(b.ticks)
                if b.n_candles:
                    await _stage_candles(cur, b)
                    await cur.execute(SQL_UPSERT)
                if b.retracted:
                    await _retract(cur, b)
                if b.n_snapshots:
                    async with cur.copy(SQL_COPY_SNAPS) as cp:
                        await cp.write(b.snapshots)
                if b.n_state:
                    await _write_state(cur, b)
            if b.texts and self.on_texts is not None:
                await self.on_texts(conn, b)
            await offsets.aadvance(conn, b.stream, b.last_seq)
        s = self.stats
        s.batches += 1
        s.ticks += b.n_ticks
        s.candles += b.n_candles
        s.snapshots += b.n_snapshots
        return "written"

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
                    await cur.execute(SQL_UPSERT)
                if b.retracted:
                    await _retract(cur, b)
                if b.n_snapshots:
                    async with cur.copy(SQL_COPY_SNAP_STAGE) as cp:
                        await cp.write(b.snapshots)
                    await cur.execute(SQL_INSERT_SNAPS)
                if b.n_state:
                    # the flushed candles and books are now stored: a restart must know it
                    await _write_state(cur, b)
        s = self.stats
        s.batches += 1
        s.candles += b.n_candles
        s.snapshots += b.n_snapshots
        return "written"

    async def _set_aside(self, batch: FlushBatch, reason: str) -> str:
        where = self.dead_letters.put(batch, reason)
        log.error("set aside %s %d..%d after %d refusals: %s (see %s)", batch.stream,
                  batch.first_seq, batch.last_seq, self.max_rejects, reason, where)
        # Commit the offset alone so the stream goes on past the refused batch.
        while True:
            try:
                await self.connect()
                async with self.conn.transaction():
                    await offsets.aadvance(self.conn, batch.stream, batch.last_seq)
                break
            except _CONNECTION_ERRORS:
                await self._drop()
                await asyncio.sleep(0.5)
        self.stats.dead_letters += 1
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
    # Both parts are upserted for now; ``new_candles`` (never stored) could be inserted
    # plainly.  Staged first: a key in both (none is, by construction) would keep ``candles``.
    for payload in (b.new_candles, b.candles):
        if payload:
            async with cur.copy(SQL_COPY_STAGE) as cp:
                await cp.write(payload)


async def _retract(cur, b: FlushBatch) -> None:
    await cur.execute(SQL_RETRACT, ([t for t, _ in b.retracted], [i for _, i in b.retracted]))


async def _write_state(cur, b: FlushBatch) -> None:
    async with cur.copy(SQL_COPY_STATE) as cp:
        await cp.write(b.state)
    await cur.execute(SQL_UPSERT_STATE)


class ConnectionLost(Exception):
    """The database stayed unreachable longer than the writer's ``retry_for``."""


class StreamAdvanced(Exception):
    def __init__(self, stream: str, committed: int, first_seq: int):
        super().__init__(f"stream {stream} was committed up to {committed} by another writer, "
                         f"inside this batch (from {first_seq})")
        self.committed = committed


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
