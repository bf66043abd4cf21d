"""Readers' speed through the compatibility schemas: each seed's per-symbol time-range read
through its view, against the same read on ingestor's tables by instrument id.

The bar (docs/compat.md): a read through a view costs at most 1.5x the base-table read, or
1 ms more, whichever is larger.

One capture (``--ticks`` over ``--tokens`` instruments, mixed modes; now and then the
simulator opens the next trading day: 5M ticks over 300 instruments are 10 sessions of about
15 minutes on 10 days, so a table holds ten or twenty chunks, far fewer than months of
retention leave: planning over hypertables costs more in production than here) is replayed
by ``ingestor replay`` into a database of its own on the server ``--dsn`` names; ``ingestor
migrate``
lays it out first (hypertables where the server has TimescaleDB; ``--retention off``, so that
no policy drops the simulated day while it is read), then ``ingestor migrate --compat all``
creates the schemas.  ``instruments`` is padded to ``--instruments`` rows without data (a
full instruments dump's size), so a view's lookup by symbol costs what it costs in
production; on TimescaleDB every closed chunk is then compacted into the columnstore, as the
daemon and the policies leave a day (``--as-written`` keeps the layout as written).

The base read returns the same columns and values as the view's, but for the key the caller
filtered by (symbol, UUID).  Each read runs for ``--sample`` instruments (with ticks in the last hour and a symbol no other
instrument has): both queries once to warm the cache, then ``--repeat`` rounds alternating
which goes first.  A run is the client's whole execute and fetch, planning included: no
prepared statements (psycopg's ``prepare_threshold=None``), so every run is parsed, planned
for its values and executed, as a service's ad-hoc query is.  The view's read runs as the
schema's reader role with ``search_path`` set to the schema, as a service would.  The table
shows per read the median over instruments of each instrument's median, the ratio, the bar,
and the server's planning time of each query (``EXPLAIN (SUMMARY)``, median).  Before timing,
each pair is checked to return the same number of rows, and some.

Reads (the seed's query shape; windows: ticks over the last hour, candles over the last
day, i.e. its session):

* ``001 market_data``: ``SELECT time, symbol, open, ... vwap FROM market_data WHERE symbol =
  $1 AND time >= $2 AND time < $3 ORDER BY time DESC`` (the seed's index (symbol, time DESC))
  against the 1m candles by id; and ``SELECT *``, whose best bid/ask per candle come from the
  bucket's last quoted tick, against the same lateral probe written on the base tables;
* ``002 ohlcv_data``: the seed document's own query (``SELECT * FROM ohlcv_data WHERE
  timestamp >= ... AND timestamp < ... AND instrument_id = '<uuid>' AND timeframe = '1m'``),
  and ``ohlcv_5m`` by UUID;
* ``003 market_data``: ``interval = 'tick'`` (the price columns; and ``SELECT *``, which adds
  the per-row ``data_id`` MD5 and the ``tick_data`` JSON object, computed the same way on
  ``tick_data`` by id, and once more against a plain tick read without them) and ``interval =
  '1min'`` against the 1m candles;
* ``004 market_data``: ``SELECT * ... WHERE symbol = $1 AND timestamp >= ... ORDER BY
  timestamp DESC`` (the seed's index (symbol, timestamp DESC)).

Run (one to two minutes with the defaults, 5M ticks, on a shared 2-core machine)::

    python -m ingestor.benchmarks.compat --dsn "host=... port=... user=..." \\
        [--ticks 5000000] [--tokens 300] [--instruments 50000] [--sample 5] [--repeat 15]

Not part of ``ingestor bench``; the benchmark creates and drops its own database.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from ingestor.benchmarks.common import server_dsn, table
from ingestor.benchmarks.storage import HERE, Databases, _cli

#: Candle columns of a read by instrument id (what the views' candle columns come from).
_CANDLE = "time, open_price, high_price, low_price, close_price, volume"
_TICKS = ("time > %(end)s - interval '1 hour' AND time <= %(end)s")
_DAY = "time >= %(day)s AND time < %(day)s + interval '1 day'"
_EPOCH_US = "(extract(epoch FROM time) * 1000000)::bigint::text"
_TICK_ROW = (
    f"md5('ingestor:tick:' || instrument_id::text || ':' || {_EPOCH_US})::uuid, time, "
    "price, price, price, price, volume, oi::numeric, 'tick'::text, "
    "jsonb_build_object('quantity', quantity, 'volume', volume, 'oi', oi, "
    "'bid_price', bid_price, 'bid_quantity', bid_quantity, 'ask_price', ask_price, "
    "'ask_quantity', ask_quantity, 'exchange_time', exchange_time, 'exchange', exchange), "
    "NULL::timestamptz")

#: (label, seed code, the read through the view, the same read on the base tables by id).
#: The base read returns the same columns and values as the view, but for the key the caller
#: filtered by (the symbol, the UUID): what a service reading by instrument id would write.
READS = [
    ("001 market_data, OHLCV columns", "001",
     "SELECT time, symbol, open, high, low, close, volume, vwap FROM market_data "
     f"WHERE symbol = %(sym)s AND {_DAY} ORDER BY time DESC",
     f"SELECT {_CANDLE}, vwap FROM ohlc_candles WHERE instrument_id = %(iid)s "
     f"AND timeframe = '1m' AND {_DAY} ORDER BY time DESC"),
    ("001 market_data, every column (bid/ask)", "001",
     f"SELECT * FROM market_data WHERE symbol = %(sym)s AND {_DAY} ORDER BY time DESC",
     "SELECT c.time, c.open_price, c.high_price, c.low_price, c.close_price, c.volume, c.vwap, "
     "q.bid_price, q.ask_price, q.bid_quantity, q.ask_quantity FROM ohlc_candles c "
     "LEFT JOIN LATERAL (SELECT t.bid_price, t.ask_price, t.bid_quantity, t.ask_quantity "
     "FROM tick_data t WHERE t.instrument_id = c.instrument_id AND t.time >= c.time "
     "AND t.time < c.time + interval '1 minute' AND t.bid_price IS NOT NULL "
     "ORDER BY t.time DESC LIMIT 1) q ON true "
     "WHERE c.instrument_id = %(iid)s AND c.timeframe = '1m' "
     "AND c.time >= %(day)s AND c.time < %(day)s + interval '1 day' ORDER BY c.time DESC"),
    ("002 ohlcv_data 1m, by uuid (the seed's query)", "002",
     "SELECT * FROM ohlcv_data WHERE timestamp >= %(day)s "
     "AND timestamp < %(day)s + interval '1 day' AND instrument_id = %(uuid)s "
     "AND timeframe = '1m'",
     f"SELECT time, timeframe, open_price, high_price, low_price, close_price, volume, "
     "open_interest, trade_count, NULL::timestamptz FROM ohlc_candles "
     f"WHERE instrument_id = %(iid)s AND timeframe = '1m' AND {_DAY}"),
    ("002 ohlcv_5m, by uuid", "002",
     "SELECT * FROM ohlcv_5m WHERE instrument_id = %(uuid)s AND bucket >= %(day)s "
     "AND bucket < %(day)s + interval '1 day' ORDER BY bucket",
     f"SELECT {_CANDLE} FROM ohlc_candles WHERE instrument_id = %(iid)s "
     f"AND timeframe = '5m' AND {_DAY} ORDER BY time"),
    ("003 market_data tick, price columns", "003",
     "SELECT symbol, timestamp, open, high, low, close, volume, oi FROM market_data "
     "WHERE symbol = %(sym)s AND interval = 'tick' AND timestamp > %(end)s - interval '1 hour' "
     "AND timestamp <= %(end)s ORDER BY timestamp",
     "SELECT time, price, price, price, price, volume, oi::numeric FROM tick_data "
     f"WHERE instrument_id = %(iid)s AND {_TICKS} ORDER BY time"),
    ("003 market_data tick, every column", "003",
     "SELECT * FROM market_data WHERE symbol = %(sym)s AND interval = 'tick' "
     "AND timestamp > %(end)s - interval '1 hour' AND timestamp <= %(end)s ORDER BY timestamp",
     f"SELECT {_TICK_ROW} FROM tick_data WHERE instrument_id = %(iid)s AND {_TICKS} "
     "ORDER BY time"),
    ("  the same, against plain ticks (no data_id, no JSON)", "003",
     "SELECT * FROM market_data WHERE symbol = %(sym)s AND interval = 'tick' "
     "AND timestamp > %(end)s - interval '1 hour' AND timestamp <= %(end)s ORDER BY timestamp",
     "SELECT time, exchange, price, quantity, volume, oi, bid_price, bid_quantity, ask_price, "
     f"ask_quantity, exchange_time FROM tick_data WHERE instrument_id = %(iid)s AND {_TICKS} "
     "ORDER BY time"),
    ("003 market_data 1min", "003",
     "SELECT * FROM market_data WHERE symbol = %(sym)s AND interval = '1min' "
     "AND timestamp >= %(day)s AND timestamp < %(day)s + interval '1 day' ORDER BY timestamp",
     f"SELECT md5('ingestor:candle:1m:' || instrument_id::text || ':' || {_EPOCH_US})::uuid, "
     "time, open_price, high_price, low_price, close_price, volume, open_interest::numeric, "
     "'1min'::text, NULL::jsonb, NULL::timestamptz FROM ohlc_candles "
     f"WHERE instrument_id = %(iid)s AND timeframe = '1m' AND {_DAY} ORDER BY time"),
    ("004 market_data", "004",
     "SELECT * FROM market_data WHERE symbol = %(sym)s AND timestamp >= %(day)s "
     "AND timestamp < %(day)s + interval '1 day' ORDER BY timestamp DESC",
     f"SELECT {_CANDLE}, vwap, NULL::timestamptz FROM ohlc_candles "
     f"WHERE instrument_id = %(iid)s AND timeframe = '1m' AND {_DAY} ORDER BY time DESC"),
]

#: The issue's bar: within 1.5x, or 1 ms more, whichever is larger.
RATIO, SLACK_MS = 1.5, 1.0


def _run(conn, sql: str, params: dict) -> tuple[float, int]:
    """One whole execute + fetch: (milliseconds, rows)."""
    t0 = time.perf_counter()
    rows = conn.execute(sql, params).fetchall()
    return (time.perf_counter() - t0) * 1e3, len(rows)


def _planning_ms(conn, sql: str, params: dict) -> float:
    """The server's planning time of one query (``EXPLAIN (SUMMARY)``: planned, not run)."""
    for (line,) in conn.execute("EXPLAIN (SUMMARY) " + sql, params).fetchall():
        if line.startswith("Planning Time:"):
            return float(line.split(":")[1].split()[0])
    raise RuntimeError("EXPLAIN (SUMMARY) gave no planning time")


def prepare(dbs: Databases, ticks: int, tokens: int, instruments: int,
            compact: bool) -> tuple[str, str]:
    """Fill a fresh database on ``dbs``' server: (its DSN, what the layout is)."""
    import psycopg

    from ingestor.sim.market import generate_capture

    db = dbs.fresh("compat")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cap = os.path.join(tmp, "day.cap")
        info = generate_capture(cap, ticks=ticks, tokens=tokens, mode="mixed", seed=31)
        print(f"capture: {ticks:,} ticks, {info['sessions']} sessions, in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        _cli(HERE, "migrate", "--dsn", db, "--retention", "off")
        wall, _, _ = _cli(HERE, "replay", cap, "--dsn", db, "--no-progress")
        print(f"replayed in {wall:.0f} s", file=sys.stderr)
    # --retention off again: a migrate without it sets the default retention policies back,
    # and their first run drops the simulated days (years old by the calendar) while they are
    # read (on TimescaleDB the candles were gone: every candle read compared two empty reads)
    _cli(HERE, "migrate", "--dsn", db, "--compat", "all", "--retention", "off")
    with psycopg.connect(db, autocommit=True) as c:
        have = c.execute("SELECT count(*) FROM instruments").fetchone()[0]
        # rows without data, as most of a full dump's are (unique tokens and symbols)
        c.execute("INSERT INTO instruments (instrument_token, exchange, symbol) "
                  "SELECT 900000000 + g, 'NFO', 'FILLER' || g FROM generate_series(1, %s) g",
                  (max(0, instruments - have),))
        tsdb = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
                         ).fetchone()
        server = c.execute("SHOW server_version").fetchone()[0].split()[0]
        if tsdb:
            layout = f"TimescaleDB {tsdb[0]} (PostgreSQL {server})"
            if compact:
                from ingestor.store import timescale as ts

                t1 = time.perf_counter()
                for t in ("tick_data", "ohlc_candles", "order_book_snapshots"):
                    ts.compact(c, t, grace="1 minute")
                print(f"compacted in {time.perf_counter() - t1:.0f} s", file=sys.stderr)
                layout += ", chunks in the columnstore"
            else:
                layout += ", as written"
        else:
            layout = f"PostgreSQL {server}"
        c.execute("VACUUM ANALYZE")
    return db, layout


def measure(db: str, sample: int, repeat: int) -> list[dict]:
    import psycopg

    from ingestor.store import compat

    base = psycopg.connect(db, autocommit=True, prepare_threshold=None)
    view = psycopg.connect(db, autocommit=True, prepare_threshold=None)
    try:
        end, day = base.execute(
            "SELECT max(time), date_trunc('day', max(time) + interval '5 hours 30 minutes') "
            "- interval '5 hours 30 minutes' FROM tick_data").fetchone()
        picked = base.execute(
            "SELECT i.id, i.symbol, md5('ingestor:instrument:' || i.id::text)::uuid "
            "FROM instruments i WHERE i.instrument_token < 900000000 "
            "AND (SELECT count(*) FROM instruments j WHERE j.symbol = i.symbol) = 1 "
            "AND EXISTS (SELECT 1 FROM tick_data t WHERE t.instrument_id = i.id "
            "AND t.time > %s - interval '1 hour') ORDER BY hashint4(i.id) LIMIT %s",
            (end, sample)).fetchall()
        if not picked:
            raise SystemExit("no instrument with ticks in the last hour: more --ticks")
        rows = []
        for label, code, view_sql, base_sql in READS:
            seed = compat.SEEDS[code]
            view.execute(f"SET ROLE {seed.role}")
            view.execute(f"SET search_path = {seed.schema}")
            per = {"view": [], "base": [], "plan view": [], "plan base": [], "rows": []}
            for iid, sym, key in picked:
                params = {"sym": sym, "iid": iid, "uuid": key, "end": end, "day": day}
                (_, nv), (_, nb) = _run(view, view_sql, params), _run(base, base_sql, params)
                if nv != nb:
                    raise SystemExit(f"{label}: the view gave {nv} rows and the base read {nb} "
                                     f"for {sym}: not the same read")
                if not nb:
                    raise SystemExit(f"{label}: no rows for {sym}: two empty reads measure "
                                     "nothing (was the data dropped?)")
                got = {"view": [], "base": [], "plan view": [], "plan base": []}
                for k in range(repeat):
                    order = [("view", view, view_sql), ("base", base, base_sql)]
                    for name, conn, sql in order if k % 2 == 0 else order[::-1]:
                        got[name].append(_run(conn, sql, params)[0])
                        got[f"plan {name}"].append(_planning_ms(conn, sql, params))
                for name, values in got.items():
                    per[name].append(statistics.median(values))
                per["rows"].append(nb)
            v, b = statistics.median(per["view"]), statistics.median(per["base"])
            bar = max(RATIO * b, b + SLACK_MS)
            rows.append({"read": label, "rows": int(statistics.median(per["rows"])),
                         "view ms": v, "base ms": b, "ratio": f"{v / b:.2f}x",
                         "bar ms": bar, "within": "yes" if v <= bar else "NO",
                         "plan view / base ms": f"{statistics.median(per['plan view']):.3f} / "
                                                f"{statistics.median(per['plan base']):.3f}"})
            view.execute("RESET ROLE")
            print(table(rows[-1:]), file=sys.stderr)
        return rows
    finally:
        base.close()
        view.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", default=server_dsn(),
                   help="the server (default INGESTOR_BENCH_DSN or the local one); a scratch "
                        "database is created on it and dropped")
    p.add_argument("--ticks", type=int, default=5_000_000)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--instruments", type=int, default=50_000,
                   help="rows in instruments, padded with instruments without data")
    p.add_argument("--sample", type=int, default=5, help="instruments each read is timed for")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--as-written", action="store_true",
                   help="TimescaleDB: read the chunks as written (no compaction)")
    args = p.parse_args()
    t0 = time.perf_counter()
    dbs = Databases(args.dsn)
    try:
        db, layout = prepare(dbs, args.ticks, args.tokens, args.instruments, not args.as_written)
        rows = measure(db, args.sample, args.repeat)
    finally:
        dbs.drop_all()
    print(table(rows, f"per-symbol reads through the compatibility views vs by instrument id: "
                      f"{layout}; {args.ticks:,} ticks over {args.tokens:,} instruments, "
                      f"{args.instruments:,} in instruments; median over {args.sample} "
                      f"instruments of the median of {args.repeat}, ms, planning included "
                      f"[{time.perf_counter() - t0:.0f} s]"))


if __name__ == "__main__":
    main()
