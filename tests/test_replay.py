"""Replay end to end into a real PostgreSQL: exact rows, candles = SQL, exactly once."""

from __future__ import annotations

import datetime as dt
import threading
import time
from decimal import Decimal

import numpy as np
import psycopg
import pytest

from ingestor import _core
from ingestor.feed.capture import CaptureReader
from ingestor.pipeline.batch import decode_capture
from ingestor.pipeline import PipelineSettings
from ingestor.pipeline.replay import replay
from ingestor.sim.market import generate_capture

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _us(t: dt.datetime) -> int:
    return (t - EPOCH) // dt.timedelta(microseconds=1)


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    path = tmp_path_factory.mktemp("cap") / "mixed.cap"
    generate_capture(path, ticks=30_000, tokens=60, mode="mixed", seed=11)
    return path


def _decoded(path) -> np.ndarray:
    """Every packet of the capture, decoded (TICK_DTYPE rows, in stream order)."""
    dec = _core.KiteDecoder(capacity=1 << 20, depth_capacity=1 << 20)
    parts = [dec.ticks[:dec.n_ticks].copy() for _ in decode_capture(path, dec)]
    return np.concatenate(parts)


def _table_digest(conn) -> dict:
    q = {
        "ticks": "select count(*), sum(price), sum(coalesce(volume,0)), sum(hashtext(time::text)) from tick_data",
        "candles": "select count(*), sum(open_price + high_price + low_price + close_price), "
                   "sum(volume), sum(trade_count), sum(coalesce(vwap,0)) from ohlc_candles",
        "snapshots": "select count(*), sum(bid_prices[1]), sum(ask_quantities[5]) from order_book_snapshots",
    }
    return {k: conn.execute(v).fetchone() for k, v in q.items()}


def test_replay_rows_exact_and_exactly_once(db, capture, dense_rows=100):
    settings = PipelineSettings(flush_rows=4_000, dense_rows=dense_rows)
    r1 = replay(str(capture), db, settings=settings, progress=False)
    ticks = _decoded(capture)
    assert r1.ticks == len(ticks) == 30_000
    # several transactions (how many follows the decoder's fills as well as flush_rows, so
    # it is not pinned here; the offsets below are)
    assert r1.batches >= 2
    with psycopg.connect(db) as conn:
        # every packet is one row, with its exact price, in stream order per instrument
        rows = conn.execute(
            "select i.instrument_token, t.price, t.time, t.quantity, t.volume, t.oi "
            "from tick_data t join instruments i on i.id = t.instrument_id "
            "order by i.instrument_token, t.time").fetchall()
        assert len(rows) == len(ticks)
        order = np.lexsort((np.arange(len(ticks)), ticks["instrument_token"]))
        for row, k in zip(rows, order):
            tk = ticks[k]
            assert row[0] == tk["instrument_token"]
            assert row[1] == Decimal(int(tk["last_price"])) / int(tk["divisor"])
            if tk["length"] in (44, 184):
                assert row[3] == tk["last_traded_quantity"] and row[4] == tk["volume_traded"]
            else:
                assert row[3] is None and row[4] is None
            assert (row[5] is None) == (tk["length"] != 184)
        # times strictly increase per instrument and sit within 1 ms of the receive time
        times = {}
        for row, k in zip(rows, order):
            prev = times.get(row[0])
            us = _us(row[2])
            assert prev is None or us > prev
            assert 0 <= us - ticks[k]["recv_ns"] // 1000 < 1000
            times[row[0]] = us
        before = _table_digest(conn)
        assert before["candles"][0] > 0 and before["snapshots"][0] > 0

    # the capture's stream and last sequence number: what the first replay committed
    with CaptureReader(capture) as rd:
        stream = rd.header.stream
        messages = sum(1 for _ in rd.records())
        last_seq = rd.header.first_seq + messages - 1
    with psycopg.connect(db) as conn:
        assert conn.execute("select stream, committed_seq from stream_offsets").fetchall() == [
            (stream, last_seq)]

    r2 = replay(str(capture), db, settings=settings, progress=False)
    assert r2.ticks == 0 and r2.batches == 0
    # every message that holds ticks (heartbeats hold none), none decoded again
    assert r2.skipped_messages == len(np.unique(ticks["seq"]))
    with psycopg.connect(db) as conn:
        assert _table_digest(conn) == before
        assert conn.execute("select stream, committed_seq from stream_offsets").fetchall() == [
            (stream, last_seq)]


def test_candles_equal_sql_over_stored_ticks(db, capture, dense_rows=100):
    from test_candles_sql import CANDLES_SQL

    replay(str(capture), db, settings=PipelineSettings(flush_rows=5_000, dense_rows=dense_rows),
           progress=False)
    with psycopg.connect(db) as conn:
        for label in _core.DEFAULT_TIMEFRAMES:
            stride = f"{_core.timeframe_us(label)} microseconds"
            sql = CANDLES_SQL
            expected = conn.execute(sql, {"stride": stride, "origin": "1970-01-01 00:00:00+05:30"}).fetchall()
            stored = conn.execute(
                "select time, instrument_id, open_price, high_price, low_price, close_price, volume, "
                "trade_count, vwap, open_interest from ohlc_candles where timeframe = %s "
                "order by instrument_id, time", (label,)).fetchall()
            assert len(stored) == len(expected) > 0, label
            for a, b in zip(stored, expected):
                assert tuple(a) == tuple(b), label


def test_snapshots_are_the_last_full_packet_of_their_interval(db, capture):
    replay(str(capture), db, settings=PipelineSettings(flush_rows=5_000), progress=False)
    with psycopg.connect(db) as conn:
        full = conn.execute(
            "select instrument_id, time, bid_price, ask_price, bid_quantity, ask_quantity "
            "from tick_data where oi is not null order by instrument_id, time").fetchall()
        snaps = conn.execute(
            "select instrument_id, time, bid_prices[1], ask_prices[1], bid_quantities[1], "
            "ask_quantities[1], array_length(bid_prices, 1), array_length(ask_orders, 1) "
            "from order_book_snapshots order by instrument_id, time").fetchall()
    # group full packets by (instrument, 1 s interval): the last one is the snapshot
    last = {}
    for inst, t, bp, ap, bq, aq in full:
        last[(inst, _us(t) // 1_000_000)] = (inst, t, bp, ap, bq, aq)
    expected = sorted(last.values(), key=lambda r: (r[0], r[1]))
    assert len(snaps) == len(expected) > 0
    for s, e in zip(snaps, expected):
        assert s[:6] == e and s[6] == 5 and s[7] == 5


def test_killed_connections_lose_nothing(db, capture, dense_rows=100):
    """The server kills the writer's backend mid-COPY a few times: retried, exactly once."""
    settings = PipelineSettings(flush_rows=1_500, dense_rows=dense_rows)
    done = threading.Event()
    kills = []

    def killer():
        with psycopg.connect(db, autocommit=True) as c:
            while not done.is_set() and len(kills) < 4:
                rows = c.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity "
                    "where datname = current_database() and pid <> pg_backend_pid() "
                    "and state = 'active' and (query ilike 'copy%%' or query ilike 'insert into ohlc%%')"
                ).fetchall()
                kills.extend(r for r in rows if r[0])
                time.sleep(0.01)

    th = threading.Thread(target=killer)
    th.start()
    try:
        r = replay(str(capture), db, settings=settings, progress=False)
    finally:
        done.set()
        th.join()
    assert kills, "the test never caught a flush in progress"
    with psycopg.connect(db) as conn:
        n, distinct = conn.execute(
            "select count(*), count(distinct (instrument_id, time)) from tick_data").fetchone()
        assert n == distinct == 30_000
        # and the same tables as an undisturbed replay into another database
        digest = _table_digest(conn)
    assert r.ticks == 30_000
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("truncate tick_data, ohlc_candles, order_book_snapshots, stream_offsets")
    replay(str(capture), db, settings=settings, progress=False)
    with psycopg.connect(db) as conn:
        assert _table_digest(conn) == digest


def test_the_last_batches_of_a_capture_shrink(capture):
    """Near a capture's end a batch is cut once it holds about what is left, while what
    is left is at least a quarter batch: the last transaction, which commits with none
    beside it, is short rather than whatever a whole batch left over, and no batch is so
    small that its instruments' rows miss the columnstore."""
    import asyncio

    from ingestor.pipeline import Pipeline
    from ingestor.pipeline.driver import Driver, drive_capture

    ids: dict[int, int] = {}

    def resolve(tokens):
        return {t: ids.setdefault(t, len(ids) + 1) for t in tokens}

    flush = 8_000
    pl = Pipeline("shrink", resolve=resolve,
                  settings=PipelineSettings(flush_rows=flush, first_batch_rows=0))
    sizes: list[int] = []

    async def run():
        queue: asyncio.Queue = asyncio.Queue()
        reader = CaptureReader(capture, chunk_size=1 << 16)  # ~800 ticks a chunk
        try:
            await drive_capture(Driver(pl, queue), reader)
        finally:
            reader.close()
        while not queue.empty():
            sizes.append(queue.get_nowait().n_ticks)

    asyncio.run(run())
    assert sum(sizes) == len(_decoded(capture)) == 30_000
    *cut, last = sizes
    assert cut[0] >= flush and cut[1] >= flush, sizes  # full batches while much is left
    assert all(n >= flush // 4 for n in cut), sizes
    # without shrinking, the last batch would hold 30,000 - 3 x 8,000 = 6,000 ticks
    assert last <= flush // 2, sizes
