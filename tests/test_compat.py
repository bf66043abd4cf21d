"""Compatibility schemas (``ingestor migrate --compat``): the reference schemas' own queries,
unchanged, over rows the real pipeline wrote, answer what ingestor's tables hold.

One database for the module: small simulated captures at several minutes of two days
replayed through the pipeline (so candles of 1m, 5m and 1d with several 1m per 5m and two
days), order postbacks through the order store, two instruments sharing a symbol on NSE and
BSE, and every compatibility schema created.  Once on plain PostgreSQL and, where
``INGESTOR_TEST_TSDB_DSN`` names a TimescaleDB server, once over hypertables.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections import defaultdict
from decimal import Decimal

import psycopg
import psycopg.sql
import pytest

from conftest import TSDB_DSN, _scratch_database
from ingestor.cli import main
from ingestor.orders import OrderStore
from ingestor.pipeline import PipelineSettings
from ingestor.pipeline.replay import replay
from ingestor.sim.market import Market, generate_capture
from ingestor.sim.orders import OrderFlow
from ingestor.store import compat
from ingestor.store.migrate import migrate

UTC = dt.timezone.utc
IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
#: Capture starts (IST): several minutes of one 5m bucket and of the next ones, and a second day.
STARTS = [(6, 9, 15, 5), (6, 9, 16, 10), (6, 9, 18, 20), (6, 9, 21, 0), (6, 9, 22, 30),
          (6, 9, 31, 0), (7, 9, 15, 0), (7, 9, 17, 40)]
ORDER_INSTRUMENTS = [(779521, "NSE", "SBIN", "470.35"), (408065, "NSE", "INFY", "1573.70"),
                     (1368834, "CDS", "USDINR24JANFUT", "83.1225", "0.0025")]
DUP = "DUPSYM"
OTHER_ACCOUNT = "XY9999"

#: Each seed's relations and columns, in the seed documents' order.
SEED_COLUMNS = {
    "001": {
        "market_data": "time symbol open high low close volume vwap bid ask bid_size ask_size",
        "market_data_daily": "day symbol open high low close volume avg_price",
        "orders": "order_id created_at updated_at strategy_id signal_id symbol side order_type "
                  "quantity price stop_price time_in_force status filled_quantity "
                  "avg_fill_price broker_order_id error_message",
        "executions": "execution_id time order_id symbol side quantity price commission venue "
                      "broker_exec_id",
        "positions": "symbol quantity average_cost realized_pnl strategy_id opened_at updated_at",
    },
    "002": {
        "instruments": "id instrument_token exchange_token tradingsymbol name last_price expiry "
                       "strike tick_size lot_size instrument_type segment exchange created_at "
                       "updated_at",
        "ohlcv_data": "instrument_id timestamp timeframe open high low close volume "
                      "open_interest trades_count created_at",
        "daily_ohlcv": "instrument_id date open high low close volume",
        "ohlcv_5m": "bucket instrument_id open high low close volume",
        "trades": "order_id order_timestamp instrument_id exchange_order_id transaction_type "
                  "quantity price order_type order_status executed_quantity pending_quantity "
                  "cancelled_quantity average_price algo_id strategy_id user_id "
                  "exchange_timestamp created_at updated_at",
    },
    "003": {
        "market_data": "data_id symbol timestamp open high low close volume oi interval "
                       "tick_data created_at",
        "trades": "trade_id strategy_id broker_id symbol exchange instrument_type order_type "
                  "transaction_type quantity price trigger_price stoploss target status "
                  "order_id parent_order_id order_timestamp execution_timestamp average_price "
                  "filled_quantity metadata created_at updated_at",
        "positions": "position_id trade_id user_id symbol exchange instrument_type quantity "
                     "average_price current_price unrealized_pnl realized_pnl status opened_at "
                     "closed_at metadata created_at updated_at",
        "position_history": "history_id position_id price quantity pnl action timestamp",
    },
    "004": {
        "market_data": "symbol timestamp open_price high_price low_price close_price volume "
                       "vwap created_at",
        "trade_executions": "id order_id portfolio_id symbol side quantity price commission "
                            "timestamp broker execution_id created_at",
    },
}


def _uuid(kind: str, key) -> uuid.UUID:
    """The views' derived keys, computed independently of the SQL."""
    return uuid.UUID(hashlib.md5(f"ingestor:{kind}:{key}".encode()).hexdigest())


@pytest.fixture(scope="module", params=["postgresql", pytest.param("timescaledb",
                                                                      marks=pytest.mark.timescale)])
def filled(request, tmp_path_factory):
    if request.param == "timescaledb":
        if not TSDB_DSN:
            pytest.skip("INGESTOR_TEST_TSDB_DSN names no TimescaleDB server")
        server = TSDB_DSN
    else:
        server = request.getfixturevalue("pg_server_dsn")
    tmp = tmp_path_factory.mktemp("compat")
    with _scratch_database(server, "ingestor_compat") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
            if request.param == "timescaledb":
                from ingestor.store import timescale as ts

                # hypertables without policies: no background job compresses or drops the
                # test's (old) chunks while it reads them
                off = {t: None for t in ("tick_data", "ohlc_candles", "order_book_snapshots")}
                assert ts.setup(conn, "on", ts.TimescaleSettings().with_overrides(
                    compress_after=off, retention=off)).enabled
        for k, (day, h, m, s) in enumerate(STARTS):
            start = dt.datetime(2024, 11, day, h, m, s, tzinfo=IST)
            path = tmp / f"c{k}.cap"
            generate_capture(path, ticks=900, tokens=12, seed=500 + k,
                             market=Market(n_tokens=12, seed=7,
                                           start_ns=int(start.timestamp()) * 10**9))
            replay(str(path), dsn, settings=PipelineSettings(flush_rows=2_000), progress=False)
        flow = OrderFlow(ORDER_INSTRUMENTS, seed=3, strategies=["alpha", "beta"])
        with psycopg.connect(dsn) as conn:
            OrderStore().apply_sync(conn, flow.next_messages(120) + flow.drain())
            # a second account: the orders of one strategy were placed by another user
            conn.execute("UPDATE orders SET placed_by = %s WHERE strategy_id = 'beta'",
                         (OTHER_ACCOUNT,))
            conn.commit()
            # two instruments with ticks share a symbol on NSE and BSE (as listed shares do)
            ids = [r[0] for r in conn.execute(
                "SELECT instrument_id FROM tick_data GROUP BY 1 ORDER BY count(*) DESC LIMIT 2")]
            conn.execute("UPDATE instruments SET exchange = 'NSE', symbol = %s WHERE id = %s",
                         (DUP, ids[0]))
            conn.execute("UPDATE instruments SET exchange = 'BSE', symbol = %s WHERE id = %s",
                         (DUP, ids[1]))
            conn.commit()
            compat.create(conn, list(compat.SEEDS))
            conn.execute("ANALYZE")
            conn.commit()
        yield dsn


def _reader(dsn, code):
    """A connection reading as a service of that seed would: search_path = its schema."""
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(f"SET search_path = {compat.SEEDS[code].schema}")
    return conn


def _busiest(conn) -> tuple[int, str]:
    """(instrument id, symbol) of an instrument with many ticks and a unique symbol."""
    return conn.execute(
        "SELECT i.id, i.symbol FROM instruments i JOIN tick_data t ON t.instrument_id = i.id "
        "WHERE i.symbol <> %s GROUP BY 1, 2 ORDER BY count(*) DESC LIMIT 1", (DUP,)).fetchone()


# --------------------------------------------------------------------------------------------
# shape, create / re-create / drop


def test_views_have_exactly_the_seed_names(filled):
    with psycopg.connect(filled) as conn:
        for code, rels in SEED_COLUMNS.items():
            schema = compat.SEEDS[code].schema
            got = defaultdict(list)
            for table, column in conn.execute(
                    "SELECT table_name, column_name FROM information_schema.columns "
                    "WHERE table_schema = %s ORDER BY table_name, ordinal_position", (schema,)):
                got[table].append(column)
            assert {t: " ".join(c) for t, c in got.items()} == rels, code


def test_create_is_idempotent_and_drop_is_clean(db):
    def state(conn):
        return conn.execute(
            "SELECT table_schema, table_name, view_definition FROM information_schema.views "
            "WHERE table_schema LIKE 'compat\\_%' ORDER BY 1, 2").fetchall()

    def indexes(conn):
        return {r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'instruments'")}

    with psycopg.connect(db, autocommit=True) as conn:
        compat.create(conn, ["001", "002"])
        first = state(conn)
        assert {s for s, _, _ in first} == {"compat_quant", "compat_gogotrade"}
        compat.create(conn, ["001", "002"])          # again: the same views, no error
        assert state(conn) == first
        compat.create(conn, list(compat.SEEDS))
        assert len({s for s, _, _ in state(conn)}) == 4
        assert set(compat.BASE_INDEXES) <= indexes(conn)
        assert sorted(compat.present(conn)) == list(compat.SEEDS)
        acl = conn.execute("SELECT datacl::text FROM pg_database WHERE datname = "
                           "current_database()").fetchone()[0]
        assert all(s.role in acl for s in compat.SEEDS.values())
        compat.drop(conn, ["001"])                    # others remain: so do the base indexes
        assert "compat_quant" not in {s for s, _, _ in state(conn)}
        assert set(compat.BASE_INDEXES) <= indexes(conn)
        compat.drop(conn, list(compat.SEEDS))
        compat.drop(conn, list(compat.SEEDS))         # dropping what is gone: no error
        assert state(conn) == [] and compat.present(conn) == {}
        assert not set(compat.BASE_INDEXES) & indexes(conn)
        # the reader roles stay (cluster-wide) but hold nothing in this database any more
        dbname = conn.execute("SELECT current_database()").fetchone()[0]
        for seed in compat.SEEDS.values():
            acl = conn.execute("SELECT coalesce(datacl::text, '') FROM pg_database "
                               "WHERE datname = %s", (dbname,)).fetchone()[0]
            assert seed.role not in acl
            assert conn.execute(
                "SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = "
                "s.setdatabase JOIN pg_roles r ON r.oid = s.setrole WHERE d.datname = %s "
                "AND r.rolname = %s", (dbname, seed.role)).fetchone()[0] == 0


def test_cli_flags_refusals_and_settings(db, tmp_path, capsys):
    assert main(["migrate", "--dsn", db, "--timescale", "off", "--compat", "1,004",
                 "--compat-timeframe", "001=5m", "--compat-exchanges", "004=nse,nfo"]) == 0
    out = capsys.readouterr().out
    assert "compat_quant_reader" in out and "compat_octopus_reader" in out
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT compat_quant.granularity(), "
                            "compat_quant.granularity_interval()").fetchone() == (
            "5m", dt.timedelta(minutes=5))
        assert conn.execute("SELECT compat_octopus.listed('NSE'), compat_octopus.listed('BSE')"
                            ).fetchone() == (True, False)
        assert "granularity 1m" in compat.present(conn)["004"]
    cfg = tmp_path / "ingestor.toml"
    cfg.write_text('[pipeline]\ntimeframes = ["1m", "1d"]\n')
    for argv, words in (
            (["--compat", "002", "--config", str(cfg)], "needs the timeframe(s) 5m"),
            (["--compat", "001", "--compat-timeframe", "001=15m", "--config", str(cfg)],
             "needs the timeframe(s) 15m"),
            (["--compat", "005"], "unknown reference schema"),
            (["--compat", "002", "--compat-timeframe", "002=5m"], "no granularity"),
            (["--compat", "001", "--compat-timeframe", "001=30m"], "not a stored timeframe"),
            (["--compat", "001", "--compat-exchanges", "001=N;SE"], "exchange names"),
            (["--compat-timeframe", "001=5m"], "need --compat"),
            (["--compat", "1", "--drop-compat", "1"], "one at a time")):
        assert main(["migrate", "--dsn", db, "--timescale", "off", *argv]) == 2, argv
        assert words in capsys.readouterr().err, argv
    # a refusal changed nothing: 001 still at 5m
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT compat_quant.granularity()").fetchone() == ("5m",)
    assert main(["migrate", "--dsn", db, "--timescale", "off", "--compat", "003",
                 "--config", str(cfg)]) == 0
    assert "no rows for timeframe(s) 5m, 15m, 1h" in capsys.readouterr().out
    assert main(["migrate", "--dsn", db, "--timescale", "off", "--drop-compat", "all"]) == 0
    with psycopg.connect(db) as conn:
        assert compat.present(conn) == {}


# --------------------------------------------------------------------------------------------
# 001: market_data, market_data_daily, orders, executions, positions


def test_001_market_data_per_symbol_equals_candles_and_last_bid(filled):
    with psycopg.connect(filled) as base:
        iid, sym = _busiest(base)
        t0, t1 = dt.datetime(2024, 11, 6, tzinfo=UTC), dt.datetime(2024, 11, 8, tzinfo=UTC)
        candles = base.execute(
            "SELECT time, open_price, high_price, low_price, close_price, volume, vwap "
            "FROM ohlc_candles WHERE instrument_id = %s AND timeframe = '1m' "
            "AND time >= %s AND time < %s ORDER BY time", (iid, t0, t1)).fetchall()
        ticks = base.execute("SELECT time, bid_price, ask_price, bid_quantity, ask_quantity "
                             "FROM tick_data WHERE instrument_id = %s AND bid_price IS NOT NULL "
                             "ORDER BY time", (iid,)).fetchall()
    assert len(candles) >= 5
    with _reader(filled, "001") as conn:
        rows = conn.execute(
            "SELECT time, symbol, open, high, low, close, volume, vwap, bid, ask, bid_size, "
            "ask_size FROM market_data WHERE symbol = %s AND time >= %s AND time < %s "
            "ORDER BY time", (sym, t0, t1)).fetchall()
    assert len(rows) == len(candles)
    with_bid = 0
    for row, c in zip(rows, candles):
        assert row[0] == c[0] and row[1] == sym and tuple(row[2:8]) == tuple(c[1:])
        inside = [t for t in ticks if c[0] <= t[0] < c[0] + dt.timedelta(minutes=1)]
        assert tuple(row[8:]) == (tuple(inside[-1][1:]) if inside else (None,) * 4)
        with_bid += bool(inside)
    assert with_bid > 0
    assert all(isinstance(r[5], Decimal) for r in rows)   # exact, not DOUBLE


def test_001_market_data_daily_is_the_seeds_aggregate_of_market_data(filled):
    # The seed's continuous aggregate, with first()/last() spelled in plain SQL and the day
    # being the exchange's (the 1d bucket); run over the compatibility market_data itself.
    with _reader(filled, "001") as conn:
        expected = conn.execute(
            "SELECT (date_trunc('day', time AT TIME ZONE 'Asia/Kolkata') "
            "        AT TIME ZONE 'Asia/Kolkata') AS day, symbol, "
            "(array_agg(open ORDER BY time))[1], max(high), min(low), "
            "(array_agg(close ORDER BY time DESC))[1], sum(volume), avg(close) "
            "FROM market_data WHERE symbol <> %s GROUP BY 1, 2 ORDER BY 2, 1", (DUP,)
        ).fetchall()
        got = conn.execute("SELECT day, symbol, open, high, low, close, volume, avg_price "
                           "FROM market_data_daily WHERE symbol <> %s ORDER BY symbol, day",
                           (DUP,)).fetchall()
        # a symbol on two exchanges: one daily row per exchange (the seed's GROUP BY symbol
        # over market_data would merge the two venues' candles)
        dup = conn.execute("SELECT day, count(*) FROM market_data_daily WHERE symbol = %s "
                           "GROUP BY 1", (DUP,)).fetchall()
    assert len({r[0] for r in got}) == 2 and len(got) > 10     # two exchange days
    assert got == expected
    assert len(dup) == 2 and {n for _, n in dup} == {2}


def test_001_orders_executions_positions(filled):
    with psycopg.connect(filled) as base:
        ex = base.execute("SELECT e.id, e.time, e.order_id, i.symbol, e.transaction_type, "
                          "e.quantity, e.price, i.exchange FROM executions e "
                          "JOIN instruments i ON i.id = e.instrument_id ORDER BY e.id").fetchall()
        n_orders = base.execute("SELECT count(*) FROM orders").fetchone()[0]
        open_pos = base.execute("SELECT count(*) FROM positions WHERE status = 'OPEN'"
                                ).fetchone()[0]
    assert ex and n_orders
    with _reader(filled, "001") as conn:
        got = conn.execute("SELECT execution_id, time, order_id, symbol, side, quantity, price, "
                           "commission, venue, broker_exec_id FROM executions").fetchall()
        by_id = {r[0]: r for r in got}
        assert len(by_id) == len(ex)
        for eid, time, oid, sym, side, qty, price, exch in ex:
            assert by_id[_uuid("execution", eid)] == (
                _uuid("execution", eid), time, oid, sym, side.lower(), qty, price, None, exch,
                None)
        # the seed's fills-of-an-order read (idx_executions_order)
        oid = ex[0][2]
        assert conn.execute("SELECT count(*) FROM executions WHERE order_id = %s", (oid,)
                            ).fetchone()[0] == sum(1 for e in ex if e[2] == oid)
        assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == n_orders
        assert {r[0] for r in conn.execute("SELECT DISTINCT status FROM orders")} <= {
            "pending", "open", "filled", "cancelled", "rejected"}
        assert conn.execute("SELECT count(*) FROM positions").fetchone()[0] == open_pos


# --------------------------------------------------------------------------------------------
# 002: instruments, ohlcv_data, daily_ohlcv, ohlcv_5m, trades


def test_002_seed_query_and_aggregates(filled):
    with psycopg.connect(filled) as base:
        iid, sym = _busiest(base)
        candles = base.execute(
            "SELECT time, timeframe, open_price, high_price, low_price, close_price, volume, "
            "open_interest, trade_count FROM ohlc_candles WHERE instrument_id = %s "
            "AND timeframe = '1m' AND time >= '2024-11-06' AND time < '2024-11-07' "
            "ORDER BY time", (iid,)).fetchall()
        daily = base.execute(
            "SELECT time, open_price, high_price, low_price, close_price, volume "
            "FROM ohlc_candles WHERE instrument_id = %s AND timeframe = '1d' ORDER BY time",
            (iid,)).fetchall()
        last = base.execute("SELECT price FROM tick_data WHERE instrument_id = %s "
                            "ORDER BY time DESC LIMIT 1", (iid,)).fetchone()[0]
    key = str(_uuid("instrument", iid))
    with _reader(filled, "002") as conn:
        # the seed document's own query ("Time-Series Data Storage"), its placeholders filled
        rows = conn.execute(
            "SELECT * FROM ohlcv_data WHERE timestamp >= '2024-11-06' "
            f"AND timestamp < '2024-11-07' AND instrument_id = '{key}' AND timeframe = '1m' "
            "ORDER BY timestamp").fetchall()
        assert [(r[1], r[2], *r[3:10]) for r in rows] == candles and len(rows) >= 4
        assert {r[0] for r in rows} == {uuid.UUID(key)} and {r[10] for r in rows} == {None}
        # daily_ohlcv: the exchange's date of each 1d candle, whatever the session's TimeZone
        for tz in ("UTC", "America/New_York", "Asia/Kolkata"):
            conn.execute(f"SET TimeZone = '{tz}'")
            got = conn.execute("SELECT date, open, high, low, close, volume FROM daily_ohlcv "
                               "WHERE instrument_id = %s ORDER BY date", (key,)).fetchall()
            assert got == [(d[0].astimezone(IST).date(), *d[1:]) for d in daily]
            assert [g[0] for g in got] == [dt.date(2024, 11, 6), dt.date(2024, 11, 7)]
        conn.execute("RESET TimeZone")
        # ohlcv_5m: the seed's aggregate of the 1m rows in 5-minute buckets (first/last in
        # plain SQL), equal to the view over ingestor's 5m candles
        expected = conn.execute(
            "SELECT date_bin('5 minutes', timestamp, '2000-01-01') AS bucket, instrument_id, "
            "(array_agg(open ORDER BY timestamp))[1], max(high), min(low), "
            "(array_agg(close ORDER BY timestamp DESC))[1], sum(volume) "
            "FROM ohlcv_data WHERE timeframe = '1m' GROUP BY 1, 2 ORDER BY 2, 1").fetchall()
        got = conn.execute("SELECT bucket, instrument_id, open, high, low, close, volume "
                           "FROM ohlcv_5m ORDER BY instrument_id, bucket").fetchall()
        assert got == expected
        assert any(n > 1 for (n,) in conn.execute(
            "SELECT count(*) FROM ohlcv_data WHERE timeframe = '1m' "
            "GROUP BY instrument_id, date_bin('5 minutes', timestamp, '2000-01-01')"))
        ins = conn.execute("SELECT id, tradingsymbol, last_price FROM instruments "
                           "WHERE tradingsymbol = %s", (sym,)).fetchone()
        assert ins == (uuid.UUID(key), sym, last)
        n = conn.execute("SELECT count(*) FROM trades WHERE algo_id IS NULL").fetchone()[0]
        assert n == conn.execute("SELECT count(*) FROM trades").fetchone()[0] > 0


# --------------------------------------------------------------------------------------------
# 003: market_data (ticks and intervals), trades, positions


def test_003_market_data_intervals_trades_positions(filled):
    with psycopg.connect(filled) as base:
        iid, sym = _busiest(base)
        ticks = base.execute(
            "SELECT time, price, volume, oi, quantity FROM tick_data WHERE instrument_id = %s "
            "ORDER BY time", (iid,)).fetchall()
        hours = base.execute(
            "SELECT time, open_price, high_price, low_price, close_price, volume, open_interest "
            "FROM ohlc_candles WHERE instrument_id = %s AND timeframe = '1h' ORDER BY time",
            (iid,)).fetchall()
        orders = base.execute("SELECT id, broker_order_id, current_status, filled_quantity "
                              "FROM orders").fetchall()
        positions = base.execute("SELECT id, quantity, status FROM positions").fetchall()
    with _reader(filled, "003") as conn:
        rows = conn.execute(
            "SELECT * FROM market_data WHERE symbol = %s AND timestamp >= %s "
            "AND timestamp < %s AND interval = 'tick' ORDER BY timestamp",
            (sym, dt.datetime(2024, 11, 6, tzinfo=UTC), dt.datetime(2024, 11, 8, tzinfo=UTC))
        ).fetchall()
        assert len(rows) == len(ticks)
        for r, t in zip(rows, ticks):
            us = (t[0] - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(microseconds=1)
            assert r[0] == _uuid("tick", f"{iid}:{us}")
            assert (r[2], r[3], r[4], r[5], r[6], r[7]) == (t[0], t[1], t[1], t[1], t[1], t[2])
            assert r[8] == (None if t[3] is None else Decimal(t[3])) and r[9] == "tick"
            assert r[10]["quantity"] == t[4]
        got = conn.execute("SELECT timestamp, open, high, low, close, volume, oi "
                           "FROM market_data WHERE symbol = %s AND interval = '1hour' "
                           "ORDER BY timestamp", (sym,)).fetchall()
        assert got == [(*h[:6], None if h[6] is None else Decimal(h[6])) for h in hours]
        assert conn.execute("SELECT count(*) FROM market_data WHERE interval = '30min'"
                            ).fetchone()[0] == 0
        trades = {r[0]: r for r in conn.execute(
            "SELECT trade_id, order_id, status, filled_quantity, broker_id FROM trades")}
        assert len(trades) == len(orders)
        for oid, broker_id, status, filled_q in orders:
            t = trades[oid]
            assert t[1] == broker_id and t[3] == filled_q
            assert t[4] == _uuid("broker", "kite")
            assert t[2] == {"COMPLETE": "FILLED", "CANCELLED": "CANCELLED",
                            "REJECTED": "REJECTED"}.get(status, t[2])
        pos = {r[0]: r for r in conn.execute(
            "SELECT position_id, quantity, status, trade_id, user_id FROM positions")}
        assert len(pos) == len(positions) > 0
        meta = conn.execute("SELECT order_id, metadata FROM trades LIMIT 1").fetchone()
        assert meta[1]["order_id"] == meta[0]      # the last postback, as JSON
        for pid, qty, status in positions:
            p = pos[_uuid("position", pid)]
            assert p[1:3] == (qty, status) and p[3] in trades and p[4] is not None


def test_003_position_history_retraces_positions(filled):
    with psycopg.connect(filled) as base:
        positions = base.execute("SELECT id, quantity, status, opened_at, closed_at "
                                 "FROM positions").fetchall()
        fills = base.execute("SELECT strategy_id, instrument_id, transaction_type, quantity "
                             "FROM executions ORDER BY id").fetchall()
    # fills through zero, from the fills themselves (net quantity per pair changing sign)
    net, flips = defaultdict(int), 0
    for strategy, instrument, side, q in fills:
        before = net[strategy, instrument]
        after = net[strategy, instrument] = before + (q if side == "BUY" else -q)
        flips += before * after < 0
    with _reader(filled, "003") as conn:
        rows = conn.execute("SELECT position_id, quantity, action, timestamp, price, pnl "
                            "FROM position_history ORDER BY timestamp").fetchall()
    # every fill is a row; a fill through zero is two (closing one position, opening the next)
    assert len(rows) == len(fills) + flips
    assert sum(1 for r in rows if r[2] == "OPEN") == len(positions)
    by_pos = defaultdict(list)
    for r in rows:
        by_pos[r[0]].append(r)
    assert len(by_pos) == len(positions)
    closes = 0
    for pid, qty, status, opened_at, closed_at in positions:
        hist = by_pos[_uuid("position", pid)]
        opens = [h for h in hist if h[2] == "OPEN"]
        assert len(opens) == 1 and opens[0][3] == opened_at
        held = sum(h[1] if h[2] in ("OPEN", "INCREASE") else -h[1] for h in hist)
        assert held == abs(qty)
        if status == "CLOSED":
            closes += 1
            assert [h[3] for h in hist if h[2] == "CLOSE"] == [closed_at]
        assert all(h[5] is None for h in hist)
    assert closes > 0


def test_account_filter(filled):
    with psycopg.connect(filled) as base:
        per_account = dict(base.execute(
            "SELECT o.placed_by, count(*) FROM executions e JOIN orders o ON o.id = e.order_id "
            "GROUP BY 1").fetchall())
        orders_per_account = dict(base.execute(
            "SELECT placed_by, count(*) FROM orders GROUP BY 1").fetchall())
    assert len(per_account) == 2 and OTHER_ACCOUNT in per_account
    with psycopg.connect(filled, autocommit=True) as conn:
        compat.create(conn, ["003", "004"], compat.CompatSettings(account_filter={"003", "004"}))
        try:
            conn.execute("SET search_path = compat_octopus")
            count = "SELECT count(*) FROM trade_executions"
            assert conn.execute(count).fetchone()[0] == 0          # no account named: nothing
            for account, n in per_account.items():
                conn.execute("SELECT set_config('app.current_user_id', %s, false)", (account,))
                assert conn.execute(count).fetchone()[0] == n
                # the seed's own form: the account's UUID (portfolio_id), any case
                conn.execute("SELECT set_config('app.current_user_id', %s, false)",
                             (str(_uuid("account", account)).upper(),))
                assert conn.execute(count).fetchone()[0] == n
                assert {r[0] for r in conn.execute(
                    "SELECT DISTINCT portfolio_id FROM trade_executions")} == {
                    _uuid("account", account)}
            conn.execute("SET search_path = compat_algotrading")
            conn.execute("SELECT set_config('app.current_user_id', %s, false)", (OTHER_ACCOUNT,))
            assert conn.execute("SELECT count(*) FROM trades").fetchone()[0] == \
                orders_per_account[OTHER_ACCOUNT]
            assert {r[0] for r in conn.execute("SELECT DISTINCT user_id FROM positions")} == {
                _uuid("account", OTHER_ACCOUNT)}
            # per-account views are security barriers; market data views need not be
            opts = dict(conn.execute(
                "SELECT n.nspname || '.' || c.relname, c.reloptions FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'v' "
                "AND n.nspname LIKE 'compat%%'").fetchall())
            for view in ("compat_octopus.trade_executions", "compat_algotrading.trades",
                         "compat_algotrading.positions", "compat_algotrading.position_history",
                         "compat_quant.orders", "compat_quant.executions",
                         "compat_quant.positions", "compat_gogotrade.trades"):
                assert "security_barrier=true" in (opts[view] or []), view
        finally:
            conn.execute("RESET app.current_user_id")
            conn.execute("RESET search_path")
            compat.create(conn, ["003", "004"])
    # unfiltered again: every account
    with _reader(filled, "004") as conn:
        assert conn.execute("SELECT count(*) FROM trade_executions").fetchone()[0] == sum(
            per_account.values())


# --------------------------------------------------------------------------------------------
# 004: market_data, trade_executions; symbols on two exchanges


def test_004_market_data_and_trade_executions(filled):
    with psycopg.connect(filled) as base:
        iid, sym = _busiest(base)
        candles = base.execute(
            "SELECT time, open_price, high_price, low_price, close_price, volume, vwap "
            "FROM ohlc_candles WHERE instrument_id = %s AND timeframe = '1m' ORDER BY time DESC",
            (iid,)).fetchall()
        ex = base.execute("SELECT e.id, e.order_id, o.placed_by, e.transaction_type, e.quantity, "
                          "e.price, e.time FROM executions e JOIN orders o ON o.id = e.order_id"
                          ).fetchall()
    with _reader(filled, "004") as conn:
        rows = conn.execute(
            "SELECT symbol, timestamp, open_price, high_price, low_price, close_price, volume, "
            "vwap FROM market_data WHERE symbol = %s ORDER BY timestamp DESC", (sym,)).fetchall()
        assert [r[1:] for r in rows] == candles and {r[0] for r in rows} == {sym}
        got = {r[0]: r for r in conn.execute(
            "SELECT id, order_id, portfolio_id, side, quantity, price, timestamp "
            "FROM trade_executions")}
        assert len(got) == len(ex)
        for eid, oid, placed_by, side, qty, price, time in ex:
            assert got[_uuid("execution", eid)][1:] == (
                oid, _uuid("account", placed_by), side.lower(), qty, price, time)


def test_symbol_on_two_exchanges(filled):
    with psycopg.connect(filled) as base:
        per_exchange = dict(base.execute(
            "SELECT i.exchange, count(*) FROM ohlc_candles c JOIN instruments i "
            "ON i.id = c.instrument_id WHERE i.symbol = %s AND c.timeframe = '1m' GROUP BY 1",
            (DUP,)).fetchall())
    assert set(per_exchange) == {"NSE", "BSE"}
    # by default a reader sees both exchanges' rows under the bare symbol
    with _reader(filled, "004") as conn:
        assert conn.execute("SELECT count(*) FROM market_data WHERE symbol = %s", (DUP,)
                            ).fetchone()[0] == sum(per_exchange.values())
    # a schema narrowed to NSE shows NSE's only
    with psycopg.connect(filled, autocommit=True) as conn:
        compat.create(conn, ["004"], compat.CompatSettings(exchanges={"004": ("NSE",)}))
        try:
            conn.execute("SET search_path = compat_octopus")
            assert conn.execute("SELECT count(*) FROM market_data WHERE symbol = %s", (DUP,)
                                ).fetchone()[0] == per_exchange["NSE"]
        finally:
            conn.execute("RESET search_path")
            compat.create(conn, ["004"])


# --------------------------------------------------------------------------------------------
# indexes: per-symbol and per-uuid reads


def _scans(plan) -> list[tuple[str, str, str]]:
    """(node type, relation, index) of every scan node of an EXPLAIN (FORMAT JSON) plan."""
    out = []

    def walk(node):
        if "Relation Name" in node:
            out.append((node["Node Type"], node["Relation Name"], node.get("Index Name", "")))
        for child in node.get("Plans", []):
            walk(child)
    walk(plan[0]["Plan"])
    return out


def test_per_symbol_reads_use_indexes(filled):
    with psycopg.connect(filled, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
            pytest.skip("plans over chunks differ; the plans are checked on plain PostgreSQL")
        # a realistic instruments table (~20k rows: a dump's NSE+NFO share), so that a scan
        # of it would be chosen if no index served the lookup
        conn.execute(
            "INSERT INTO instruments (instrument_token, exchange, symbol) "
            "SELECT 900000000 + g, 'NFO', 'FILLER' || g FROM generate_series(1, 20000) g")
        conn.execute("ANALYZE instruments")
        try:
            iid, sym = _busiest(conn)
            key = _uuid("instrument", iid)
            window = "'2024-11-06 03:00+00' AND '2024-11-06 05:00+00'"
            reads = {
                "001": f"SELECT * FROM market_data WHERE symbol = %s AND time BETWEEN {window}",
                "003": f"SELECT * FROM market_data WHERE symbol = %s AND timestamp BETWEEN "
                       f"{window} AND interval = 'tick'",
                # the candles: the interval's branch only, the timeframe an index condition
                "003 candles": f"SELECT * FROM market_data WHERE symbol = %s AND timestamp "
                               f"BETWEEN {window} AND interval = '1min'",
                "004": f"SELECT * FROM market_data WHERE symbol = %s AND timestamp BETWEEN "
                       f"{window} ORDER BY timestamp DESC",
                "002": f"SELECT * FROM ohlcv_data WHERE instrument_id = '{key}' "
                       f"AND timeframe = '1m' AND timestamp BETWEEN {window}",
            }
            for code, q in reads.items():
                conn.execute(f"SET search_path = {compat.SEEDS[code[:3]].schema}")
                plan = conn.execute("EXPLAIN (FORMAT JSON) " + q,
                                    (sym,) if "%s" in q else None).fetchone()[0]
                scans = _scans(plan)
                seq = [s for s in scans if s[0] == "Seq Scan"]
                assert not seq, (code, scans)
                ins = [s for s in scans if s[1] == "instruments"]
                assert ins and ins[0][2] in compat.BASE_INDEXES, (code, scans)
                # an index scan, or a bitmap heap scan (which only an index feeds)
                assert any(s[1] in ("ohlc_candles", "tick_data")
                           and s[0] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan")
                           for s in scans), (code, scans)
                assert conn.execute(q, (sym,) if "%s" in q else None).fetchall()
            # 001 without bid/ask: the join to the last tick is removed, no tick_data probe
            conn.execute("SET search_path = compat_quant")
            plan = conn.execute("EXPLAIN (FORMAT JSON) SELECT time, close FROM market_data "
                                "WHERE symbol = %s", (sym,)).fetchone()[0]
            assert {s[1] for s in _scans(plan)} == {"instruments", "ohlc_candles"}
        finally:
            conn.execute("RESET search_path")
            conn.execute("DELETE FROM instruments WHERE instrument_token > 900000000")
            conn.execute("ANALYZE instruments")


def _nodes(plan) -> list[dict]:
    """Every node of an EXPLAIN (FORMAT JSON) plan."""
    out = []

    def walk(node):
        out.append(node)
        for child in node.get("Plans", []):
            walk(child)
    walk(plan[0]["Plan"])
    return out


#: 003's intervals and the timeframe each reads (None: the ticks).
INTERVALS = {"tick": None, "1min": "1m", "5min": "5m", "15min": "15m", "1hour": "1h",
             "1day": "1d"}


def _base_tables(conn, names) -> list:
    """Each relation name of a plan as the table it reads: a TimescaleDB chunk (of the
    rowstore or the columnstore) as its hypertable; other names as they are."""
    if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
        return list(names)
    chunks = dict(conn.execute(
        "SELECT ch.table_name, coalesce(u.table_name, h.table_name) "
        "FROM _timescaledb_catalog.chunk ch "
        "JOIN _timescaledb_catalog.hypertable h ON h.id = ch.hypertable_id "
        "LEFT JOIN _timescaledb_catalog.hypertable u ON u.compressed_hypertable_id = h.id"
    ).fetchall())
    return [chunks.get(n, n) for n in names]


def test_003_interval_decided_at_plan_time(filled):
    """A reader's ``interval = '...'`` leaves one branch of 003's ``market_data`` in the
    plan: the others are dropped at plan time (not planned and emptied at run time, which
    on TimescaleDB cost planning every chunk of both hypertables), and a candle interval's
    timeframe is a condition of the candle scan (an index condition on PostgreSQL).  Plain
    PostgreSQL and TimescaleDB."""
    with psycopg.connect(filled) as base:
        _, sym = _busiest(base)
    with _reader(filled, "003") as conn:
        tsdb = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'"
                            ).fetchone()
        for interval, tf in INTERVALS.items():
            # the interval as a literal, as the seed's queries write it
            q = (f"SELECT * FROM market_data WHERE symbol = %s AND interval = '{interval}' "
                 "AND timestamp >= '2024-11-06' AND timestamp < '2024-11-08' "
                 "ORDER BY timestamp")
            nodes = _nodes(conn.execute("EXPLAIN (FORMAT JSON) " + q, (sym,)).fetchone()[0])
            assert not any("One-Time Filter" in n for n in nodes), (interval, nodes)
            rels = _base_tables(conn, [n["Relation Name"] for n in nodes
                                       if "Relation Name" in n])
            # one branch: one probe of instruments, one table of ticks or candles
            assert rels.count("instruments") == 1, (interval, rels)
            assert set(rels) == {"instruments", "tick_data" if tf is None else "ohlc_candles"}, (
                interval, rels)
            if tf is not None:
                keys = ("Index Cond",) if not tsdb else (
                    "Index Cond", "Filter", "Recheck Cond", "Vectorized Filter")
                conds = " ".join(n.get(k, "") for n in nodes for k in keys)
                assert f"timeframe = '{tf}'::text" in conds, (interval, conds)
            assert conn.execute(q, (sym,)).fetchall(), interval
        # no branch for 30min: nothing to scan, no rows
        q = "SELECT * FROM market_data WHERE symbol = %s AND interval = '30min'"
        nodes = _nodes(conn.execute("EXPLAIN (FORMAT JSON) " + q, (sym,)).fetchone()[0])
        assert not [n for n in nodes if "Relation Name" in n], nodes
        assert conn.execute(q, (sym,)).fetchall() == []


def test_003_interval_as_a_parameter(filled):
    """A service's prepared statement (``interval = $1``, a generic plan: the interval not
    known at plan time) gets the same rows as the literal: every branch is planned, and the
    interval picks its branch at run time."""
    with psycopg.connect(filled) as base:
        _, sym = _busiest(base)
    with _reader(filled, "003") as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute("PREPARE md(text, text) AS SELECT * FROM market_data WHERE symbol = $1 "
                     "AND interval = $2 ORDER BY timestamp, data_id")
        lit = psycopg.sql.Literal(sym).as_string(conn)
        plan = conn.execute(f"EXPLAIN (FORMAT JSON) EXECUTE md({lit}, 'tick')").fetchone()[0]
        # a generic plan: the interval is not known when planning, so every branch is kept
        # and the interval picks one when the plan runs (what this test exercises)
        assert [n.get("Relation Name") for n in _nodes(plan)].count("instruments") > 1
        for interval in (*INTERVALS, "30min"):
            got = conn.execute(f"EXECUTE md({lit}, '{interval}')").fetchall()
            want = conn.execute(
                f"SELECT * FROM market_data WHERE symbol = %s AND interval = '{interval}' "
                "ORDER BY timestamp, data_id", (sym,)).fetchall()
            assert got == want and (bool(got) == (interval != "30min")), interval


# --------------------------------------------------------------------------------------------
# read-only roles


def test_reader_roles_read_their_views_only(filled):
    with psycopg.connect(filled, autocommit=True) as conn:
        dbname = conn.execute("SELECT current_database()").fetchone()[0]
        for code, rels in SEED_COLUMNS.items():
            seed = compat.SEEDS[code]
            # the role's own search_path in this database is its schema
            setting = conn.execute(
                "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d "
                "ON d.oid = s.setdatabase JOIN pg_roles r ON r.oid = s.setrole "
                "WHERE d.datname = %s AND r.rolname = %s", (dbname, seed.role)).fetchone()
            assert setting == ([f"search_path={seed.schema}"],)
            conn.execute(f"SET ROLE {seed.role}")
            try:
                conn.execute(f"SET search_path = {seed.schema}")
                for rel in rels:
                    conn.execute(f"SELECT * FROM {rel} LIMIT 1").fetchall()
                for stmt in ("SELECT 1 FROM public.tick_data LIMIT 1",
                             "SELECT 1 FROM public.ohlc_candles LIMIT 1",
                             "SELECT 1 FROM public.orders LIMIT 1",
                             "INSERT INTO public.stream_offsets (stream, committed_seq) "
                             "VALUES ('x', 1)",
                             "INSERT INTO public.instruments (instrument_token, exchange, symbol) "
                             "VALUES (1, 'NSE', 'Z')"):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute(stmt)
                other = next(s for c, s in compat.SEEDS.items() if c != code)
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(f"SELECT 1 FROM {other.schema}.{next(iter(SEED_COLUMNS[other.code]))}")
            finally:
                conn.execute("RESET ROLE")
                conn.execute("RESET search_path")
            # no write privilege on its views either (none of them is updatable anyway)
            for rel in rels:
                assert conn.execute(
                    "SELECT has_table_privilege(%s, %s, 'SELECT'), "
                    "has_table_privilege(%s, %s, 'INSERT, UPDATE, DELETE, TRUNCATE')",
                    (seed.role, f"{seed.schema}.{rel}") * 2).fetchone() == (True, False)
        # the views run with their owner's rights, not the caller's
        assert conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname LIKE 'compat\\_%%' AND c.relkind = 'v' "
            "AND coalesce(array_to_string(c.reloptions, ','), '') LIKE '%%security_invoker=true%%'"
        ).fetchone()[0] == 0

