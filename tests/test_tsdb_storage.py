"""The storage layout on a real TimescaleDB: direct-to-columnstore COPY, exactly once.

Run when ``INGESTOR_TEST_TSDB_DSN`` names a TimescaleDB server (skipped with that reason
otherwise).  Background jobs are never waited for (a stock 2.28.3 build on PostgreSQL
15.20 fails every one of them in the scheduler): policies run through ``CALL run_job``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import psycopg
import pytest

import test_backfill
import test_candle_keys
import test_replay
from test_db_migrate import _migrations_before, _old_rows
from ingestor.pipeline import PipelineSettings
from ingestor.pipeline.replay import replay
from ingestor.sim.market import generate_capture
from ingestor.store import timescale as ts
from ingestor.store.migrate import migrate

pytestmark = pytest.mark.timescale

capture = test_replay.capture  # the same 30,000-tick, 60-instrument capture
captures = test_backfill.captures  # older and newer captures of the same instruments


def _pause_jobs(conn) -> None:
    """Unschedule this database's policies: the captures are of 2024, so a scheduler that
    works would compress or drop their chunks under the test (``CALL run_job`` still runs
    a job on demand)."""
    conn.execute("SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs "
                 "WHERE hypertable_schema = current_schema()")


@pytest.fixture
def tsdb(tsdb_db):
    """A fresh database on the TimescaleDB server, migrated and laid out as `migrate` does."""
    with psycopg.connect(tsdb_db, autocommit=True) as conn:
        migrate(conn)
        assert ts.setup(conn, "on").enabled
        _pause_jobs(conn)
    return tsdb_db


def _chunks(conn) -> list[tuple]:
    """(chunk, is_compressed, compressed chunk or None) of tick_data, oldest first."""
    return conn.execute(
        "SELECT format('%I.%I', ch.schema_name, ch.table_name), c.is_compressed,"
        "       CASE WHEN cc.id IS NULL THEN NULL"
        "            ELSE format('%I.%I', cc.schema_name, cc.table_name) END"
        "  FROM timescaledb_information.chunks c"
        "  JOIN _timescaledb_catalog.chunk ch ON ch.schema_name = c.chunk_schema"
        "   AND ch.table_name = c.chunk_name"
        "  LEFT JOIN _timescaledb_catalog.chunk cc ON cc.id = ch.compressed_chunk_id"
        " WHERE c.hypertable_name = 'tick_data' ORDER BY c.range_start").fetchall()


def _stored(conn) -> tuple[int, int, int]:
    """(rows in compressed batches, compressed batches, rows in the rowstore) of tick_data."""
    packed = batches = 0
    for _, _, compressed in _chunks(conn):
        if compressed:
            n, b = conn.execute(f"SELECT coalesce(sum(_ts_meta_count), 0), count(*) "
                                f"FROM {compressed}").fetchone()
            packed += n
            batches += b
    loose = conn.execute("SELECT count(*) FROM tick_data").fetchone()[0] - packed
    return packed, batches, loose


def test_layout_lean_key_columnstore_and_policies(tsdb):
    with psycopg.connect(tsdb, autocommit=True) as conn:
        st = ts.read_state(conn)
        assert ts.TICK_KEY not in st.constraints and ts.TICK_INDEX in st.indexes
        assert not conn.execute("SELECT count(*) FROM pg_index WHERE indrelid = "
                                "'tick_data'::regclass AND indisunique").fetchone()[0]
        seg, order = conn.execute(
            "SELECT segmentby, orderby FROM timescaledb_information."
            "hypertable_columnstore_settings WHERE hypertable = 'tick_data'::regclass").fetchone()
        assert seg == "instrument_id" and order.replace('"', "") == "time DESC"
        hours = conn.execute("SELECT '1 hour'::interval::text").fetchone()[0]
        assert st.policies[("tick_data", "compression")] == hours
        # plain PostgreSQL keeps its key: the same migrations, no TimescaleDB layout
        assert ts.setup(conn, "on").statements == [
            f"SELECT set_chunk_time_interval('{t}', INTERVAL '{i}')"
            for t, i in (("tick_data", "1 hour"), ("ohlc_candles", "1 day"),
                         ("order_book_snapshots", "1 hour"))]


def test_replay_goes_straight_into_the_columnstore_exactly_once(tsdb, capture):
    settings = PipelineSettings(flush_rows=10_000, dense_rows=20)
    r = replay(str(capture), tsdb, settings=settings, progress=False)
    assert r.ticks == 30_000
    assert r.columnstore_rows > 20_000 and r.columnstore_rows + r.rowstore_rows == 30_000
    with psycopg.connect(tsdb) as conn:
        packed, batches, loose = _stored(conn)
        # the server holds what the writer sent where it sent it
        assert (packed, loose) == (r.columnstore_rows, r.rowstore_rows)
        assert batches > 0 and any(c[1] for c in _chunks(conn))
        stats = conn.execute("SELECT count(*) FROM chunk_columnstore_stats('tick_data') "
                             "WHERE compression_status = 'Compressed'").fetchone()[0]
        assert stats > 0
        n, distinct = conn.execute("SELECT count(*), count(DISTINCT (instrument_id, time)) "
                                   "FROM tick_data").fetchone()
        assert n == distinct == 30_000
    again = replay(str(capture), tsdb, settings=settings, progress=False)
    assert again.ticks == 0
    with psycopg.connect(tsdb) as conn:
        assert _stored(conn) == (packed, batches, loose)


def test_rows_exact_and_exactly_once_through_the_columnstore(tsdb, capture):
    test_replay.test_replay_rows_exact_and_exactly_once(tsdb, capture, dense_rows=10)


def test_candles_equal_sql_over_columnstore_ticks(tsdb, capture):
    test_replay.test_candles_equal_sql_over_stored_ticks(tsdb, capture, dense_rows=10)


def test_killed_connections_lose_nothing_through_the_columnstore(tsdb, capture):
    test_replay.test_killed_connections_lose_nothing(tsdb, capture, dense_rows=5)


# reads that a plan may answer from the batches' order (newest first per instrument): they
# must agree with a scan that decompresses everything and sorts itself
_READS = {
    "latest": "SELECT time, price FROM tick_data WHERE instrument_id = %(i)s "
              "ORDER BY time DESC LIMIT 3",
    "oldest": "SELECT time, price FROM tick_data WHERE instrument_id = %(i)s "
              "ORDER BY time LIMIT 3",
    "range": "SELECT time, price FROM tick_data WHERE instrument_id = %(i)s "
             "AND time > %(t)s ORDER BY time DESC LIMIT 50",
}


def _reads(conn, table: str, ids, mid) -> dict:
    return {(name, i): conn.execute(sql.replace("tick_data", table), {"i": i, "t": mid}
                                    ).fetchall()
            for name, sql in _READS.items() for i in ids}


def test_ordered_reads_on_direct_compressed_chunks_match_the_rowstore(tsdb, capture):
    replay(str(capture), tsdb, settings=PipelineSettings(flush_rows=6_000, dense_rows=5),
           progress=False)
    with psycopg.connect(tsdb) as conn:
        assert _stored(conn)[0] > 25_000
        ids = [r[0] for r in conn.execute(
            "SELECT DISTINCT instrument_id FROM tick_data ORDER BY 1")]
        mid = conn.execute("SELECT min(time) + (max(time) - min(time)) / 2 "
                           "FROM tick_data").fetchone()[0]
        conn.execute("CREATE TEMP TABLE heap AS SELECT * FROM tick_data")
        got = _reads(conn, "tick_data", ids, mid)
        want = _reads(conn, "heap", ids, mid)
        assert got == want
        last = conn.execute("SELECT DISTINCT ON (instrument_id) instrument_id, time, price "
                            "FROM tick_data ORDER BY instrument_id, time DESC").fetchall()
        assert last == conn.execute("SELECT DISTINCT ON (instrument_id) instrument_id, time, "
                                    "price FROM heap ORDER BY instrument_id, time DESC"
                                    ).fetchall()


def test_rows_against_the_declared_order_would_read_wrong(tsdb, capture, monkeypatch):
    """The control of the test above: the same capture emitted oldest first into a
    columnstore declared newest first reads wrong -- what ``tables.TICK_ORDERBY`` being one
    constant for the server and the core prevents."""
    from ingestor.pipeline import tables

    monkeypatch.setattr(tables, "TICK_ORDER_DESC", False)
    replay(str(capture), tsdb, settings=PipelineSettings(flush_rows=6_000, dense_rows=5),
           progress=False)
    with psycopg.connect(tsdb) as conn:
        ids = [r[0] for r in conn.execute("SELECT DISTINCT instrument_id FROM tick_data")]
        mid = conn.execute("SELECT min(time) + (max(time) - min(time)) / 2 "
                           "FROM tick_data").fetchone()[0]
        conn.execute("CREATE TEMP TABLE heap AS SELECT * FROM tick_data")
        got, want = _reads(conn, "tick_data", ids, mid), _reads(conn, "heap", ids, mid)
    assert sum(got[k] != want[k] for k in got) > len(got) // 2


def test_instruments_below_the_threshold_stay_in_the_rowstore(tsdb, capture):
    # (a flush holds at least a decoder's fill of rows: the threshold decides, not flush_rows)
    r = replay(str(capture), tsdb, settings=PipelineSettings(flush_rows=300, dense_rows=10_000),
               progress=False)
    assert r.ticks == 30_000 and r.columnstore_rows == 0 and r.rowstore_rows == 30_000
    with psycopg.connect(tsdb) as conn:
        assert _stored(conn) == (0, 0, 30_000)


def test_a_backfill_batch_goes_to_the_rowstore(tsdb, tmp_path):
    """A batch not in order (older than ticks stored for its instruments) never becomes
    compressed batches that overlap the ones there."""
    from ingestor.pipeline.pipeline import Pipeline
    from ingestor.feed.capture import CaptureReader
    from ingestor.store.instruments import register_tokens
    from ingestor.store.writer import Writer

    path = tmp_path / "late.cap"
    generate_capture(path, ticks=5_000, tokens=10, mode="quote", seed=3)
    with psycopg.connect(tsdb, autocommit=True) as setup:
        with CaptureReader(path) as rd:
            pl = Pipeline(rd.header.stream, lambda toks: register_tokens(setup, toks),
                          PipelineSettings(flush_rows=1_000_000, first_batch_rows=0,
                                           dense_rows=1))
            for chunk, seq in rd.chunks():
                list(pl.feed_chunk(chunk, seq))
        batch = pl.take(final=True)
    assert batch.n_dense_ticks == batch.n_ticks == 5_000
    batch.in_order = False

    async def write():
        w = Writer(tsdb)
        try:
            assert await w.write(batch) == "written"
            assert w.direct  # the layout allows it: the batch's flag kept it out
        finally:
            await w.close()
        return w.stats

    stats = asyncio.run(write())
    assert (stats.direct_rows, stats.rowstore_rows) == (0, 5_000)
    with psycopg.connect(tsdb) as conn:
        assert _stored(conn) == (0, 0, 5_000)


def test_an_older_capture_after_newer_data_reads_right(tsdb, tmp_path):
    """A capture of an earlier hour replayed after a later one (same instruments) backfills
    them: its ticks keep their own times (issue 15) and go to the rowstore, never into
    compressed batches that would overlap the later hour's; the ordered reads agree with a
    full scan, and candles equal SQL over the ticks."""
    from ingestor.sim.market import Market
    from test_candles_sql import assert_candles_equal_sql

    late, early = tmp_path / "late.cap", tmp_path / "early.cap"
    t0 = Market(n_tokens=40, seed=5).clock_ns
    generate_capture(late, ticks=8_000, market=Market(n_tokens=40, seed=5,
                                                       start_ns=t0 + 3_600 * 10**9),
                     stream="late")
    generate_capture(early, ticks=8_000, market=Market(n_tokens=40, seed=5, start_ns=t0),
                     stream="early")
    settings = PipelineSettings(flush_rows=4_000, dense_rows=5)
    first = replay(str(late), tsdb, settings=settings, progress=False)
    assert first.columnstore_rows > 0 and first.backfill_instruments == 0
    r = replay(str(early), tsdb, settings=settings, progress=False)
    assert r.backfill_instruments == 40 and r.backfill_ticks == 8_000
    assert r.columnstore_rows == 0
    with psycopg.connect(tsdb) as conn:
        n, distinct = conn.execute("SELECT count(*), count(DISTINCT (instrument_id, time)) "
                                   "FROM tick_data").fetchone()
        assert n == distinct == 16_000
        packed, _, loose = _stored(conn)
        assert (packed, loose) == (first.columnstore_rows, 8_000 + first.rowstore_rows)
        # the early hour is stored at its own times, before the late one
        assert conn.execute("SELECT count(*) FROM tick_data WHERE time < %s",
                            (test_replay.EPOCH + dt.timedelta(
                                microseconds=(t0 + 3_600 * 10**9) // 1000),)
                            ).fetchone()[0] == 8_000
        ids = [r[0] for r in conn.execute("SELECT DISTINCT instrument_id FROM tick_data")]
        mid = conn.execute("SELECT min(time) + (max(time) - min(time)) / 2 "
                           "FROM tick_data").fetchone()[0]
        conn.execute("CREATE TEMP TABLE heap AS SELECT * FROM tick_data")
        assert _reads(conn, "tick_data", ids, mid) == _reads(conn, "heap", ids, mid)
        assert_candles_equal_sql(conn)
    # compaction rebuilds the chunks in order: reads still agree, nothing lost or doubled
    with psycopg.connect(tsdb, autocommit=True) as conn:
        ts.compact(conn, "tick_data", grace="1 minute")
        assert _stored(conn)[2] == 0
        conn.execute("CREATE TEMP TABLE heap AS SELECT * FROM tick_data")
        assert _reads(conn, "tick_data", ids, mid) == _reads(conn, "heap", ids, mid)
        assert conn.execute("SELECT count(*), count(DISTINCT (instrument_id, time)) "
                            "FROM tick_data").fetchone() == (16_000, 16_000)


def test_backfill_keeps_its_own_times_on_timescaledb(tsdb, captures):
    test_backfill.test_an_older_capture_keeps_its_own_times(tsdb, captures)


def test_backfill_twice_and_overlapping_once_on_timescaledb(tsdb, captures):
    test_backfill.test_the_same_backfill_twice_and_overlapping_captures_store_each_tick_once(
        tsdb, captures)


def test_newer_capture_after_a_backfill_on_timescaledb(tsdb, captures):
    test_backfill.test_a_newer_capture_after_a_backfill_continues_the_live_clock(
        tsdb, captures)


def test_the_servers_refusal_is_caught_counted_and_nothing_lost(tsdb, capture, caplog):
    """Direct COPY silently falls back to the rowstore on a table with a row trigger: the
    writer sees the server's warning, counts it and stops asking."""
    with psycopg.connect(tsdb, autocommit=True) as conn:
        conn.execute("CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS "
                     "'BEGIN RETURN NEW; END'")
        conn.execute("CREATE TRIGGER noop BEFORE INSERT ON tick_data FOR EACH ROW "
                     "EXECUTE FUNCTION noop()")
    caplog.set_level(logging.WARNING, "ingestor.store.writer")
    r = replay(str(capture), tsdb, settings=PipelineSettings(flush_rows=10_000, dense_rows=5),
               progress=False)
    assert r.ticks == 30_000 and r.columnstore_rows == 0
    assert "refused direct-to-columnstore COPY" in caplog.text
    with psycopg.connect(tsdb) as conn:
        assert _stored(conn) == (0, 0, 30_000)


def test_a_unique_index_turns_direct_copy_off_loudly(tsdb, capture, caplog):
    with psycopg.connect(tsdb, autocommit=True) as conn:
        conn.execute("CREATE UNIQUE INDEX tick_data_key ON tick_data (instrument_id, time)")
    caplog.set_level(logging.WARNING, "ingestor.store.writer")
    r = replay(str(capture), tsdb, settings=PipelineSettings(flush_rows=10_000, dense_rows=5),
               progress=False)
    assert r.ticks == 30_000 and r.columnstore_rows == 0
    assert "unique index (tick_data_key)" in caplog.text


def test_an_old_layout_with_rows_and_compressed_chunks_migrates(tsdb_db, tmp_path):
    """The schema before this layout as `ingestor migrate` left it on TimescaleDB: the
    primary keys of 0001, a week-long columnstore policy, rows, chunks compressed."""
    with psycopg.connect(tsdb_db, autocommit=True) as conn:
        migrate(conn, _migrations_before(tmp_path, 5))
        conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        for table, interval, seg in (("tick_data", "1 hour", "instrument_id"),
                                     ("ohlc_candles", "1 day", "instrument_id, timeframe"),
                                     ("order_book_snapshots", "1 hour", "instrument_id")):
            conn.execute(f"SELECT create_hypertable('{table}', by_range('time', "
                         f"INTERVAL '{interval}'), create_default_indexes => false)")
            conn.execute(f"ALTER TABLE {table} SET (timescaledb.enable_columnstore = true, "
                         f"timescaledb.segmentby = '{seg}', timescaledb.orderby = 'time DESC')")
            conn.execute(f"CALL add_columnstore_policy('{table}', after => INTERVAL '7 days')")
        _pause_jobs(conn)
        _old_rows(conn)
        for table in ("tick_data", "ohlc_candles", "order_book_snapshots"):
            chunks = conn.execute(f"SELECT show_chunks('{table}')").fetchall()
            assert len(chunks) >= 1
            conn.execute("SELECT compress_chunk(%s)", (chunks[0][0],))
        before = test_replay._table_digest(conn)

        applied = migrate(conn)  # 0005 first, then whatever came after it
        assert [m.version for m in applied][:1] == [5]
        res = ts.setup(conn, "on")
        _pause_jobs(conn)
        assert "ALTER TABLE tick_data DROP CONSTRAINT IF EXISTS tick_data_pkey" in res.statements
        st = ts.read_state(conn)
        assert ts.TICK_KEY not in st.constraints and ts.TICK_INDEX in st.indexes
        keys = dict(conn.execute(
            "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE contype = 'p' AND conrelid IN ('ohlc_candles'::regclass, "
            "'order_book_snapshots'::regclass)").fetchall())
        assert keys == {"order_book_snapshots": "PRIMARY KEY (instrument_id, \"time\")"}
        test_candle_keys.assert_candle_keys(conn)
        assert st.policies[("tick_data", "compression")] == conn.execute(
            "SELECT '1 hour'::interval::text").fetchone()[0]
        assert test_replay._table_digest(conn) == before
    # and the converted database takes the fast path, exactly once
    later = tmp_path / "later.cap"
    generate_capture(later, ticks=20_000, tokens=60, seed=11, stream="later")
    settings = PipelineSettings(flush_rows=10_000, dense_rows=10)
    r = replay(str(later), tsdb_db, settings=settings, progress=False)
    assert r.columnstore_rows > 0
    assert replay(str(later), tsdb_db, settings=settings, progress=False).ticks == 0
    with psycopg.connect(tsdb_db) as conn:
        n, distinct = conn.execute("SELECT count(*), count(DISTINCT (instrument_id, time)) "
                                   "FROM tick_data").fetchone()
        assert n == distinct == 80_000


def test_compaction_merges_small_batches_once(tsdb, capture):
    replay(str(capture), tsdb, settings=PipelineSettings(flush_rows=2_000, dense_rows=5),
           progress=False)
    with psycopg.connect(tsdb, autocommit=True) as conn:
        packed, batches, loose = _stored(conn)
        assert packed > 0
        digest = test_replay._table_digest(conn)
        size = conn.execute("SELECT hypertable_size('tick_data')").fetchone()[0]
        first = ts.compact(conn, "tick_data", grace="1 minute")
        assert first.recompressed or first.compressed
        packed2, batches2, loose2 = _stored(conn)
        assert packed2 == 30_000 and loose2 == 0 and batches2 < batches
        assert conn.execute("SELECT hypertable_size('tick_data')").fetchone()[0] < size
        assert test_replay._table_digest(conn) == digest
        again = ts.compact(conn, "tick_data", grace="1 minute")
        assert not again.recompressed and not again.compressed and again.checked > 0


def test_sigkill_restart_and_spool_replay_no_duplicates(tmp_path, tsdb):
    """tick_data without its key: a daemon killed mid-run and restarted over its spool writes
    every tick it received once, through the columnstore path too."""
    import test_daemon

    with psycopg.connect(tsdb) as conn:
        assert not conn.execute("SELECT count(*) FROM pg_index WHERE indrelid = "
                                "'tick_data'::regclass AND indisunique").fetchone()[0]
    test_daemon.test_sigkill_and_restart_no_duplicates(
        tmp_path, tsdb, writer="direct_min_rows = 3\n")
    with psycopg.connect(tsdb) as conn:
        assert _stored(conn)[0] > 0  # some ticks went straight into the columnstore


def test_retention_drops_old_chunks_only(tsdb):
    with psycopg.connect(tsdb, autocommit=True) as conn:
        conn.execute("INSERT INTO tick_data (time, instrument_id, exchange, price) VALUES "
                     "(now() - INTERVAL '40 days', 1, 'NSE', 1), (now(), 1, 'NSE', 2)")
        job = conn.execute("SELECT job_id FROM timescaledb_information.jobs WHERE "
                           "hypertable_name = 'tick_data' AND proc_name = 'policy_retention'"
                           ).fetchone()[0]
        conn.execute("CALL run_job(%s)", (job,))
        assert conn.execute("SELECT price FROM tick_data").fetchall() == [(2,)]
