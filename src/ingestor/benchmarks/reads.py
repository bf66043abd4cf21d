"""Reads services make, on a day of ticks, for each storage layout considered.

A faster ingest that makes reads slow is not a win.  One capture (``--ticks`` over
``--tokens`` instruments, mixed modes) is replayed into a database per layout, then each read
is timed warm (one run to warm the cache, then the median of ``--repeat``), in milliseconds:

* ``ticks, 1 instrument, last hour``: one instrument's ticks over the day's last hour;
* ``latest tick, every instrument``: per instrument its newest tick (a lateral probe each);
* ``latest book, every instrument``: the same on ``order_book_snapshots``;
* ``latest 1m candle, every instrument``;
* ``1m candles, 1 instrument, the day``;
* ``1s candles, 1 instrument, last 5 minutes`` and ``..., the day``: the sub-minute
  candles, which have no key (``sql/0007``);
* ``start-up: engine_state``: what ``ingestor run`` reads at start (``state.load_state``);
* ``start-up: tick_data probes``: the fallback over ``tick_data`` for a database migrated
  from before ``engine_state`` (``state.query_candle_state``: per instrument its last tick and
  the window of its forming candles).

Per-instrument reads are the median over several instruments.  Layouts (``--layouts``):
``tsdb-columnstore`` (this package on TimescaleDB, every closed chunk compressed, as the
daemon and the policies leave a day), ``tsdb-written`` (the same as written, before compaction: the shape of the day's
own chunks while they are written), ``tsdb-baseline`` (``--baseline DIR``'s layout:
the primary key, rowstore chunks), ``postgres`` (this package on plain PostgreSQL).

Run::

    python -m ingestor.benchmarks.reads --tsdb-dsn "host=... port=..." --pg-dsn "host=..." \\
        [--baseline DIR] [--ticks 20000000] [--tokens 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from ingestor.benchmarks.common import table
from ingestor.benchmarks.storage import HERE, Databases, _cli, format1

READS = {
    "ticks, 1 instrument, last hour (ms)": (
        "SELECT time, price, volume FROM tick_data WHERE instrument_id = %(i)s "
        "AND time > %(end)s - INTERVAL '1 hour' AND time <= %(end)s ORDER BY time", True),
    "latest tick, every instrument (ms)": (
        "SELECT i.id, t.time, t.price FROM instruments i CROSS JOIN LATERAL "
        "(SELECT time, price FROM tick_data WHERE instrument_id = i.id "
        "ORDER BY time DESC LIMIT 1) t", False),
    "latest book, every instrument (ms)": (
        "SELECT i.id, b.time, b.bid_prices[1], b.ask_prices[1] FROM instruments i "
        "CROSS JOIN LATERAL (SELECT time, bid_prices, ask_prices FROM order_book_snapshots "
        "WHERE instrument_id = i.id ORDER BY time DESC LIMIT 1) b", False),
    "latest 1m candle, every instrument (ms)": (
        "SELECT i.id, c.time, c.close_price FROM instruments i CROSS JOIN LATERAL "
        "(SELECT time, close_price FROM ohlc_candles WHERE instrument_id = i.id "
        "AND timeframe = '1m' ORDER BY time DESC LIMIT 1) c", False),
    "1m candles, 1 instrument, the day (ms)": (
        "SELECT time, open_price, high_price, low_price, close_price, volume FROM ohlc_candles "
        "WHERE instrument_id = %(i)s AND timeframe = '1m' AND time >= %(day)s "
        "AND time < %(day)s + INTERVAL '1 day' ORDER BY time", True),
    # the sub-minute candles have no key since sql/0007: found by time (BRIN), then filtered
    "1s candles, 1 instrument, last 5 minutes (ms)": (
        "SELECT time, open_price, high_price, low_price, close_price, volume FROM ohlc_candles "
        "WHERE instrument_id = %(i)s AND timeframe = '1s' AND time > %(end)s - INTERVAL "
        "'5 minutes' AND time <= %(end)s ORDER BY time", True),
    "1s candles, 1 instrument, the day (ms)": (
        "SELECT time, open_price, high_price, low_price, close_price, volume FROM ohlc_candles "
        "WHERE instrument_id = %(i)s AND timeframe = '1s' AND time >= %(day)s "
        "AND time < %(day)s + INTERVAL '1 day' ORDER BY time", True),
}


def _time(fn, repeat: int) -> float:
    fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def measure(dsn: str, repeat: int, root: str = HERE) -> dict:
    import psycopg

    from ingestor import _core
    from ingestor.pipeline import state

    out = {}
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("VACUUM ANALYZE")
        end, = c.execute("SELECT max(time) FROM tick_data").fetchone()
        day, = c.execute("SELECT date_trunc('day', min(time) + INTERVAL '5 hours 30 minutes') "
                         "- INTERVAL '5 hours 30 minutes' FROM tick_data").fetchone()
        ids = [r[0] for r in c.execute(
            "SELECT id FROM instruments ORDER BY hashint4(id) LIMIT 15").fetchall()]
        for name, (sql, per_instrument) in READS.items():
            if per_instrument:
                out[name] = statistics.median(
                    _time(lambda i=i: c.execute(sql, {"i": i, "end": end, "day": day}).fetchall(),
                          repeat) for i in ids)
            else:
                out[name] = _time(lambda: c.execute(sql).fetchall(), repeat)
        out["rows in tick_data"] = c.execute("SELECT count(*) FROM tick_data").fetchone()[0]
        try:
            out["tick_data MB"] = c.execute(
                "SELECT hypertable_size('tick_data')").fetchone()[0] / 1e6
        except psycopg.Error:
            out["tick_data MB"] = c.execute(
                "SELECT pg_total_relation_size('tick_data')").fetchone()[0] / 1e6
    if root == HERE:
        with psycopg.connect(dsn, autocommit=True) as c:
            eng = _core.Engine()
            out["start-up: engine_state (ms)"] = _time(lambda: state.load_state(c, eng), repeat)
            clock = state.clock_of(eng)
            out["start-up: tick_data probes (ms)"] = _time(
                lambda: state.query_candle_state(c, clock, None), min(repeat, 3))
    return out


def run(args) -> list[dict]:
    from ingestor.sim.market import generate_capture

    rows = []
    dbs = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cap = os.path.join(tmp, "day.cap")
            t0 = time.perf_counter()
            generate_capture(cap, ticks=args.ticks, tokens=args.tokens, mode="mixed", seed=17)
            print(f"capture: {args.ticks:,} ticks in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
            for layout in args.layouts.split(","):
                server = args.pg_dsn if layout == "postgres" else args.tsdb_dsn
                root = args.baseline if layout == "tsdb-baseline" else HERE
                if root is None:
                    continue
                dbs.setdefault(server, Databases(server))
                db = dbs[server].fresh(layout.replace("-", "_"))
                _cli(root, "migrate", "--dsn", db)
                wall, cpu, _ = _cli(root, "replay", cap if root == HERE else format1(cap),
                                    "--dsn", db, "--no-progress")
                print(f"{layout}: replayed in {wall:.0f} s", file=sys.stderr)
                if layout == "tsdb-columnstore":
                    import psycopg

                    from ingestor.store import timescale as ts

                    with psycopg.connect(db, autocommit=True) as c:  # the next day's state
                        for t in ("tick_data", "ohlc_candles", "order_book_snapshots"):
                            ts.compact(c, t, grace="1 minute")
                row = {"layout": layout, "replay ticks/s": args.ticks / wall}
                row.update(measure(db, args.repeat, root))
                rows.append(row)
                print(table([row]), file=sys.stderr)
    finally:
        for d in dbs.values():
            d.drop_all()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tsdb-dsn", default="host=127.0.0.1 port=5442 user=postgres")
    p.add_argument("--pg-dsn", default=os.environ.get("INGESTOR_BENCH_DSN",
                                                      "host=127.0.0.1 user=postgres"))
    p.add_argument("--baseline", help="a checkout whose layout to compare (core built in place)")
    p.add_argument("--layouts", default="tsdb-columnstore,tsdb-written,tsdb-baseline,postgres")
    p.add_argument("--ticks", type=int, default=20_000_000)
    p.add_argument("--tokens", type=int, default=2_000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    rows = run(args)
    # one column per layout, one row per read
    keys = [k for k in rows[0] if k != "layout"] if rows else []
    print(table([{"read": k, **{r["layout"]: r.get(k, "") for r in rows}} for k in keys],
                f"reads on a day of {args.ticks:,} ticks over {args.tokens:,} instruments "
                f"(warm, median of {args.repeat})"))


if __name__ == "__main__":
    main()
