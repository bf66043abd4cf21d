"""ohlc_candles' keys (sql/0007): the sub-minute candles have none and are written once,
replaced where a version may be stored already; the other timeframes are upserted by theirs.

On PostgreSQL, and on TimescaleDB when ``INGESTOR_TEST_TSDB_DSN`` names one (with the stored
versions in a columnstore chunk, which a replacing delete must decompress).
"""

from __future__ import annotations

import asyncio
import datetime as dt

import psycopg
import pytest

import test_replay
from test_candles_sql import assert_candles_equal_sql
from test_db_migrate import _migrations_before, _old_rows
from ingestor.feed.capture import CaptureReader
from ingestor.pipeline import Pipeline, PipelineSettings
from ingestor.store import migrate as mig
from ingestor.store.candle_sql import FAST_TIMEFRAMES, SQL_STAGE, apply_staged
from ingestor.store.instruments import register_tokens
from ingestor.store.writer import Writer

capture = test_replay.capture  # 30,000 ticks over 60 instruments

T0 = dt.datetime(2024, 3, 4, 3, 45, tzinfo=dt.timezone.utc)
S = dt.timedelta(seconds=1)
COLS = ("time, instrument_id, timeframe, open_price, high_price, low_price, close_price, "
        "volume, trade_count")


def assert_candle_keys(conn) -> None:
    """The layout of sql/0007: no primary key; a unique key on every timeframe but
    :data:`FAST_TIMEFRAMES`, a BRIN index on time for those (the migration's predicates are
    the writer's constant)."""
    idx = dict(conn.execute("SELECT indexname, indexdef FROM pg_indexes "
                            "WHERE tablename = 'ohlc_candles' AND schemaname = current_schema()"
                            ).fetchall())
    fast = "ARRAY[" + ", ".join(f"'{t}'::text" for t in FAST_TIMEFRAMES) + "]"
    assert set(idx) == {"ohlc_candles_key", "ohlc_candles_fast_time_idx"}, idx
    assert idx["ohlc_candles_key"].startswith("CREATE UNIQUE INDEX")
    assert idx["ohlc_candles_key"].endswith(
        f'btree (instrument_id, timeframe, "time") WHERE (timeframe <> ALL ({fast}))')
    assert idx["ohlc_candles_fast_time_idx"].endswith(
        f'brin ("time") WITH (autosummarize=\'on\') WHERE (timeframe = ANY ({fast}))')
    assert conn.execute("SELECT count(*) FROM pg_constraint WHERE conrelid = "
                        "'ohlc_candles'::regclass AND contype IN ('p', 'u')").fetchone()[0] == 0


@pytest.fixture(params=["postgres", "timescaledb"])
def server(request):
    """(DSN of a fresh database, whether it is TimescaleDB)."""
    if request.param == "postgres":
        return request.getfixturevalue("fresh_db"), False
    return request.getfixturevalue("tsdb_db"), True


def _lay_out(conn) -> None:
    """TimescaleDB's layout as `ingestor migrate` makes it, its policies unscheduled (the
    captures are of 2024: a working scheduler would compress or drop chunks under the test)."""
    from test_tsdb_storage import _pause_jobs  # (it imports this module)
    from ingestor.store import timescale as ts

    assert ts.setup(conn, "on").enabled
    _pause_jobs(conn)


def _old_database(conn, tmp_path, tsdb: bool) -> None:
    """The schema before 0007 with rows: 1m candles and 1s candles (their old key made each
    unique), on TimescaleDB laid out as `ingestor migrate` did, the first candle chunk in the
    columnstore."""
    mig.migrate(conn, _migrations_before(tmp_path, 7))
    if tsdb:
        _lay_out(conn)
    _old_rows(conn)
    conn.execute(f"INSERT INTO ohlc_candles ({COLS}) SELECT timestamptz '2024-03-04 03:45+00' "
                 "+ (g / 20) * INTERVAL '1 s', g % 20 + 1, '1s', 1, 2, 0.5, 1.5, g, 3 "
                 "FROM generate_series(1, 4000) g")
    if tsdb:
        first = conn.execute("SELECT show_chunks('ohlc_candles') ORDER BY 1 LIMIT 1").fetchone()
        conn.execute("SELECT compress_chunk(%s)", first)


def _row(conn, time, instrument, timeframe):
    return conn.execute("SELECT close_price, volume FROM ohlc_candles WHERE time = %s "
                        "AND instrument_id = %s AND timeframe = %s",
                        (time, instrument, timeframe)).fetchall()


def test_migration_keeps_rows_and_the_keys_guard_what_they_should(server, tmp_path):
    dsn, tsdb = server
    with psycopg.connect(dsn, autocommit=True) as conn:
        _old_database(conn, tmp_path, tsdb)
        before = test_replay._table_digest(conn)
        assert [m.version for m in mig.migrate(conn)] == [7]
        assert test_replay._table_digest(conn) == before
        assert_candle_keys(conn)
        # the key still refuses a second 1m candle of a key
        with pytest.raises(psycopg.errors.UniqueViolation, match="ohlc_candles_key"):
            conn.execute(f"INSERT INTO ohlc_candles ({COLS}) VALUES "
                         "(timestamptz '2024-03-04 03:46+00', 1, '1m', 1, 1, 1, 1, 1, 1)")


def test_staged_candles_are_upserted_or_replaced(server, tmp_path):
    """Through the stage, as the writer, a backfill and `dead-letter replay` write candles
    that may be stored: a stored 1s candle (in a columnstore chunk on TimescaleDB) replaced,
    a 5s key staged twice stored once with its later version, a 1m candle upserted, one
    already right left alone."""
    dsn, tsdb = server
    with psycopg.connect(dsn, autocommit=True) as conn:
        _old_database(conn, tmp_path, tsdb)
        mig.migrate(conn)
    with psycopg.connect(dsn) as conn:
        n_before = conn.execute("SELECT count(*) FROM ohlc_candles").fetchone()[0]
        one_m = conn.execute("SELECT time, close_price, volume FROM ohlc_candles "
                             "WHERE instrument_id = 1 AND timeframe = '1m' ORDER BY time LIMIT 2"
                             ).fetchall()
        assert len(one_m) == 2
        with conn.transaction():
            conn.execute(SQL_STAGE)
            stage = (f"INSERT INTO ingestor_candle_stage ({COLS}) "
                     "VALUES (%s, %s, %s, 1, 9, 1, %s, %s, 1)")
            conn.execute(stage, (T0 + S, 1, "1s", 7, 70))            # stored: replaced
            conn.execute(stage, (T0 + 500 * S, 3, "5s", 1, 10))     # new, staged twice:
            conn.execute(stage, (T0 + 500 * S, 3, "5s", 2, 20))     # the later one wins
            conn.execute(stage, (one_m[0][0], 1, "1m", 8, 80))      # stored: upserted
            # stored and already right (the old rows' open 1, high 2 ... as staged here)
            conn.execute(f"INSERT INTO ingestor_candle_stage ({COLS}) SELECT {COLS} "
                         "FROM ohlc_candles WHERE instrument_id = 1 AND timeframe = '1m' "
                         "AND time = %s", (one_m[1][0],))
            assert apply_staged(conn) == 3
            assert conn.execute("SELECT count(*) FROM ingestor_candle_stage").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM ohlc_candles").fetchone()[0] == n_before + 1
        assert _row(conn, T0 + S, 1, "1s") == [(7, 70)]
        assert _row(conn, T0 + 500 * S, 3, "5s") == [(2, 20)]
        assert _row(conn, one_m[0][0], 1, "1m") == [(8, 80)]
        assert _row(conn, one_m[1][0], 1, "1m") == [one_m[1][1:]]


def test_forming_subminute_candles_upserted_every_flush_stay_unique(server, capture):
    """pipeline.open_candles_from below a minute: every flush stores the forming 1s and 5s
    candles again, each time replacing the version before; the candles equal SQL over the
    ticks, none twice."""
    dsn, tsdb = server
    with psycopg.connect(dsn, autocommit=True) as conn:
        mig.migrate(conn)
        if tsdb:
            _lay_out(conn)
    settings = PipelineSettings(flush_rows=500, open_candle_min_us=1_000_000)
    batches = []
    with psycopg.connect(dsn, autocommit=True) as setup, CaptureReader(str(capture)) as rd:
        pl = Pipeline(rd.header.stream, resolve=lambda toks: register_tokens(setup, toks),
                      settings=settings)
        for chunk, seq in rd.chunks():
            batches.extend(pl.feed_chunk(chunk, seq))
        batches.append(pl.take(final=True))
    # the forming sub-minute candles went through the stage in most flushes
    assert sum(1 for b in batches if b.candles) >= len(batches) - 1 >= 5

    async def write():
        w = Writer(dsn)
        await w.connect()
        for b in batches:
            assert await w.write(b) in ("written", "skipped")
        await w.close()

    asyncio.run(write())
    with psycopg.connect(dsn) as conn:
        assert_candles_equal_sql(conn)
        n, keys = conn.execute("SELECT count(*), count(DISTINCT (time, instrument_id, timeframe)) "
                               "FROM ohlc_candles").fetchone()
        assert n == keys > 0
