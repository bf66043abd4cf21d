"""What the writer does with each kind of database refusal, on a real PostgreSQL.

One classification (``ingestor.store.errors.classify``) decides: a *data* refusal sets the
batch aside after ``max_rejects`` attempts and commits its offset; a *fatal* one (a check
constraint whose domain is configuration, a unique violation, a privilege...) stops the
writer with nothing committed and the offset where it was; a *connection* loss is retried.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import glob
import json
import logging
import os
import secrets
import socket
import struct
import time
from decimal import Decimal

import psycopg
import pytest

from ingestor.errors import ConnectionLost, StreamAdvanced, WriterStopped
from ingestor.metrics import Metrics
from ingestor.pipeline import FlushBatch, Pipeline, PipelineSettings
from ingestor.store.errors import classify, is_transient
from ingestor.store.offsets import committed
from ingestor.store.writer import Writer
from ingestor.twin.copy import HEADER, NULL, TRAILER, numeric_send

PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
T0 = dt.datetime(2024, 1, 15, 4, 0, tzinfo=dt.timezone.utc)


def _f(body: bytes | None) -> bytes:
    return NULL if body is None else struct.pack(">i", len(body)) + body


def tick_payload(rows) -> bytes:
    """A binary COPY payload for tick_data's columns: rows of (time, instrument_id, exchange,
    price); the other columns null."""
    out = [HEADER]
    for t, iid, exchange, price in rows:
        us = (t - PG_EPOCH) // dt.timedelta(microseconds=1)
        fields = [struct.pack(">q", us), struct.pack(">i", iid), exchange.encode("utf-8"),
                  numeric_send(Decimal(price))] + [None] * 8
        out.append(struct.pack(">h", len(fields)) + b"".join(_f(x) for x in fields))
    out.append(TRAILER)
    return b"".join(out)


def tick_batch(stream, first, last, rows) -> FlushBatch:
    return FlushBatch(stream, first, last, ticks=tick_payload(rows), n_ticks=len(rows))


def _ticks(dsn) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("select count(*) from tick_data").fetchone()[0]


def _offset(dsn, stream) -> int:
    with psycopg.connect(dsn) as conn:
        return committed(conn, stream)


def _sample(metrics: Metrics, name: str) -> float:
    v = metrics.registry.get_sample_value(name)
    return 0.0 if v is None else v


async def _until(cond, timeout=30.0, step=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        await asyncio.sleep(step)
    raise AssertionError("condition not met in time")


def _pipeline_batches(dsn, tmp_path, timeframes):
    """Real batches of a small simulated capture through a pipeline with ``timeframes``."""
    from ingestor.feed.capture import CaptureReader
    from ingestor.sim.market import generate_capture
    from ingestor.store.instruments import register_tokens

    path = tmp_path / "s.cap"
    generate_capture(path, ticks=3_000, tokens=10, mode="mixed", seed=3)
    batches = []
    with psycopg.connect(dsn, autocommit=True) as setup, CaptureReader(path) as rd:
        pipe = Pipeline(rd.header.stream, resolve=lambda toks: register_tokens(setup, toks),
                        settings=PipelineSettings(timeframes=timeframes, flush_rows=1_000,
                                                  open_candle_min_us=1_000_000))
        for chunk, seq in rd.chunks():
            batches.extend(pipe.feed_chunk(chunk, seq))
        batches.append(pipe.take(final=True))
    return [b for b in batches if b.n_ticks]


# --------------------------------------------------------------------------------------------
# the classification, on errors the server really raises


def _raise(conn, sql, params=None) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        with conn.transaction():
            conn.execute(sql, params)
    return info.value


def test_classification_of_real_server_errors(db):
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("create table big (k text primary key)")
        huge = secrets.token_hex(2000)          # 4000 incompressible characters
        # an index row too large is the content's fault, not the connection's
        exc = _raise(conn, "insert into big values (%s)", (huge,))
        assert exc.sqlstate == "54000" and isinstance(exc, psycopg.OperationalError)
        assert classify(exc) == "data"
        assert classify(_raise(conn, "select 1 / 0")) == "data"                        # 22012
        assert classify(_raise(conn, "select 'x\\x00'::bytea::text::int")) == "data"     # 22P02
        assert classify(_raise(conn, "insert into tick_data (time, instrument_id, exchange) "
                                     "values (now(), 1, 'NSE')")) == "data"            # 23502
        exc = _raise(conn, "insert into ohlc_candles values (now(), 1, '2m', 1, 1, 1, 1, 0, 1)")
        assert exc.sqlstate == "23514" and classify(exc) == "fatal"
        conn.execute("insert into big values ('a')")
        exc = _raise(conn, "insert into big values ('a')")
        assert exc.sqlstate == "23505" and classify(exc) == "fatal"
        assert classify(_raise(conn, "select * from no_such_table")) == "fatal"         # 42P01
        assert classify(_raise(conn, "selec 1")) == "fatal"                             # 42601
        exc = _raise(conn, "set statement_timeout = 1; select pg_sleep(1)")
        assert exc.sqlstate == "57014" and classify(exc) == "fatal"
        conn.execute("set statement_timeout = 0")
        assert not is_transient(exc)
        # the server ends the session: a connection error
        with psycopg.connect(db, autocommit=True) as other:
            other.execute("select pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(psycopg.Error) as info:
            conn.execute("select 1")
        assert classify(info.value) == "connection"
    assert classify(psycopg.OperationalError("server closed the connection unexpectedly")) == \
        "connection"
    assert classify(psycopg.errors.lookup("57P01")()) == "connection"
    assert classify(psycopg.errors.lookup("57P03")()) == "connection"
    assert classify(psycopg.errors.lookup("08006")()) == "connection"
    assert classify(psycopg.errors.lookup("40001")()) == "fatal"
    assert is_transient(psycopg.errors.lookup("40P01")())
    assert classify(psycopg.errors.lookup("53100")()) == "fatal"
    assert classify(psycopg.errors.lookup("42501")()) == "fatal"
    assert classify(ValueError("not a database error")) == "fatal"


# --------------------------------------------------------------------------------------------
# fatal: stop, keep the batch, do not commit its offset


def test_timeframe_check_is_fatal_not_dead_lettered_and_recovers(db, tmp_path, caplog):
    """``timeframes = ["1s", "2s"]`` (or "2m"): every batch carries a candle the schema's check
    refuses.  The daemon's writer must not throw batch after batch away as dead letters
    while /healthz says 200: it stops, says so once, keeps the offset, and goes on by itself
    once the schema accepts the timeframe."""
    batches = _pipeline_batches(db, tmp_path, ("1s", "2s"))
    b = batches[0]
    assert b.n_candles and b.n_ticks
    metrics = Metrics()
    dead = tmp_path / "dead"
    w = Writer(db, dead_letter_dir=str(dead), max_rejects=2, retry_for=None, fatal_retry=0.05,
               metrics=metrics)

    async def scenario():
        task = asyncio.ensure_future(w.write(b))
        await _until(lambda: w.fatal is not None)
        assert "23514" in w.fatal and "ohlc_candles_timeframe_check" in w.fatal
        assert w.up is False and w.fatal_since is not None
        assert _sample(metrics, "ingestor_writer_fatal") == 1
        await _until(lambda: w.stats.retries >= 5)              # tried again and again ...
        assert not task.done()
        assert not dead.exists() or not os.listdir(dead)        # ... never set aside
        assert w.dead_letters_since_start == 0
        assert _sample(metrics, "ingestor_dead_letters_total") == 0
        assert _offset(db, b.stream) < b.first_seq              # offset not committed
        assert _ticks(db) == 0
        # the operator fixes the schema; the writer resumes without a restart
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("alter table ohlc_candles drop constraint ohlc_candles_timeframe_check, "
                         "add constraint ohlc_candles_timeframe_check "
                         "check (timeframe in ('1s', '2s'))")
        assert await asyncio.wait_for(task, 30) == "written"
        assert w.fatal is None and w.up is True
        assert _sample(metrics, "ingestor_writer_fatal") == 0
        await w.close()

    with caplog.at_level(logging.DEBUG, logger="ingestor.store.writer"):
        asyncio.run(scenario())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]   # ONE line for the operator
    assert "writer stopped" in errors[0].getMessage() and "23514" in errors[0].getMessage()
    assert _offset(db, b.stream) == b.last_seq
    assert _ticks(db) == b.n_ticks


def test_fatal_in_a_bounded_run_raises_writer_stopped(db, tmp_path):
    b = _pipeline_batches(db, tmp_path, ("1s", "2s"))[0]
    w = Writer(db, dead_letter_dir=str(tmp_path / "dead"), max_rejects=2, retry_for=5)

    async def scenario():
        try:
            with pytest.raises(WriterStopped) as info:
                await w.write(b)
            return info.value
        finally:
            await w.close()

    exc = asyncio.run(scenario())
    assert exc.sqlstate == "23514" and w.fatal == exc.reason
    assert not (tmp_path / "dead").exists()
    assert _offset(db, b.stream) < b.first_seq and _ticks(db) == 0


def test_unique_violation_is_fatal(db, tmp_path):
    # (instrument_id, time) is unique by construction: a repeat is a bug, not bad data
    rows = [(T0, 1, "NSE", "100.5"), (T0, 1, "NSE", "100.5")]
    w = Writer(db, dead_letter_dir=str(tmp_path / "dead"), max_rejects=2, retry_for=5)

    async def scenario():
        try:
            with pytest.raises(WriterStopped) as info:
                await w.write(tick_batch("u", 0, 4, rows))
            return info.value
        finally:
            await w.close()

    exc = asyncio.run(scenario())
    assert exc.sqlstate == "23505"
    assert not (tmp_path / "dead").exists()
    assert _offset(db, "u") == -1 and _ticks(db) == 0


def test_stream_advanced_is_fatal_and_raised_even_in_the_daemon(db, tmp_path):
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("insert into stream_offsets (stream, committed_seq) values ('sa', 5)")
    w = Writer(db, dead_letter_dir=str(tmp_path / "dead"), retry_for=None, fatal_retry=0.05)

    async def scenario():
        try:
            with pytest.raises(StreamAdvanced):
                await asyncio.wait_for(w.write(tick_batch("sa", 3, 9, [(T0, 1, "NSE", "1")])), 30)
        finally:
            await w.close()

    asyncio.run(scenario())
    assert isinstance(StreamAdvanced("s", 1, 0), WriterStopped)
    assert w.fatal and "StreamAdvanced" in w.fatal and not w.up
    assert _offset(db, "sa") == 5 and _ticks(db) == 0


# --------------------------------------------------------------------------------------------
# data: set aside after max_rejects, offset committed, the stream goes on


def test_a_data_error_is_dead_lettered_and_the_offset_advances(db, tmp_path):
    dead = tmp_path / "dead"
    metrics = Metrics()
    w = Writer(db, dead_letter_dir=str(dead), max_rejects=3, retry_for=5, metrics=metrics)
    bad = tick_batch("d", 0, 9, [(T0, 1, "NSE", "1"), (T0, 2, "N\x00SE", "2")])  # NUL in text
    good = tick_batch("d", 10, 12, [(T0, 3, "NSE", "3")])

    async def scenario():
        try:
            return await w.write(bad), await w.write(good)
        finally:
            await w.close()

    assert asyncio.run(scenario()) == ("dead-letter", "written")
    assert w.stats.retries == 3                                  # max_rejects attempts
    assert w.dead_letters_since_start == 1 and w.fatal is None and w.up
    assert _sample(metrics, "ingestor_dead_letters_total") == 1
    assert _offset(db, "d") == 12 and _ticks(db) == 1
    assert w.last_dead_letter == str(dead / "d-0-9.json")
    meta = json.loads((dead / "d-0-9.json").read_text())
    assert meta["sqlstate"] == "22021" and "22021" in meta["reason"]
    assert meta["ticks"] == 2 and (dead / "d-0-9.ticks.copy").read_bytes() == bad.ticks


def test_an_index_row_too_large_is_data_not_a_lost_connection(db, tmp_path):
    """54000 is an OperationalError in psycopg; it used to be retried as a lost connection
    forever (here: until ``retry_for`` ran out).  The content is too big: a dead letter."""
    with psycopg.connect(db, autocommit=True) as conn:   # an operator's extra index
        conn.execute("create index tick_data_exchange_idx on tick_data (exchange)")
    w = Writer(db, dead_letter_dir=str(tmp_path / "dead"), max_rejects=2, retry_for=2)
    b = tick_batch("big", 0, 3, [(T0, 1, secrets.token_hex(2000), "1")])

    async def scenario():
        try:
            return await w.write(b)
        finally:
            await w.close()

    assert asyncio.run(scenario()) == "dead-letter"
    assert json.loads((tmp_path / "dead" / "big-0-3.json").read_text())["sqlstate"] == "54000"
    assert _offset(db, "big") == 3
    assert glob.glob(str(tmp_path / "dead" / "big-0-3.ticks.copy"))


def test_connection_loss_is_still_retried(db, tmp_path):
    """A terminated session mid-stream is a connection error: reconnect and write once."""
    w = Writer(db, dead_letter_dir=str(tmp_path / "dead"), retry_for=30)

    async def scenario():
        try:
            assert await w.write(tick_batch("c", 0, 0, [(T0, 1, "NSE", "1")])) == "written"
            with psycopg.connect(db, autocommit=True) as other:
                other.execute("select pg_terminate_backend(%s)", (w.conn.info.backend_pid,))
            assert await w.write(tick_batch("c", 1, 1, [(T0, 2, "NSE", "1")])) == "written"
        finally:
            await w.close()

    asyncio.run(scenario())
    assert w.stats.reconnects >= 1 and w.stats.dead_letters == 0 and w.fatal is None
    assert _offset(db, "c") == 1 and _ticks(db) == 2
    assert issubclass(ConnectionLost, Exception)


def test_database_away_longer_than_retry_for_is_connection_lost(tmp_path, caplog):
    """Nobody listens at the DSN: retried with backoff (each retry said), then
    ``ConnectionLost`` once ``retry_for`` has passed; nothing set aside, not fatal."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = Writer(f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2",
               dead_letter_dir=str(tmp_path / "dead"), retry_for=1.0, backoff_max=0.2)

    async def scenario():
        with pytest.raises(ConnectionLost, match="unreachable for"):
            await asyncio.wait_for(w.write(tick_batch("c", 0, 0, [(T0, 1, "NSE", "1")])), 60)

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert w.stats.retries >= 2 and not w.up and w.fatal is None and w.stats.dead_letters == 0
    assert sum("retrying in" in r.message for r in caplog.records) == w.stats.retries
