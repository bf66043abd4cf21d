"""Benchmark: binary COPY encoding, rows per second.

What it measures, per row layout (a tick-like row: timestamptz, integer ids,
exact numerics, nullable bigints, a text lookup; a depth-snapshot-like row:
numeric[5]/bigint[5]/integer[5] arrays), over the same rows:

``core encode``
    ``ingestor._core.CopyEncoder.encode``: one complete payload.
``core stream``
    ``begin`` / ``encode_rows`` in chunks of 10 000 rows / ``take`` / ``end``.
``twin``
    The pure-Python oracle (``ingestor.twin.copy``), on a subset.
``psycopg write_row``
    psycopg 3's own binary COPY row formatting (``BinaryFormatter.write_row``,
    the C implementation where installed), given ready Python tuples
    (datetime, int, Decimal, str, lists): psycopg's cost alone.
``tuples + write_row``
    The conventional Python path: building those tuples from the numpy rows
    (Decimal(raw) / divisor, datetime) and then ``write_row``.

No server is needed: psycopg formats rows without a connection.  With
``--dsn``, it also times encode + send into a temporary table for the core
and for ``copy.write_row`` (same connection, same run).

Each figure is the median of several runs.  Build the release core first
(``python setup.py build_ext --inplace`` without ``INGESTOR_DEBUG``): the
debug build's checks make it slower.

Usage: ``python -m ingestor.benchmarks.copy [--quick] [--dsn DSN]``; ``run(quick)``
returns the rows of the table for ``ingestor bench``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from decimal import Decimal

import numpy as np

from ingestor._core import DEBUG, CopyEncoder
from ingestor.twin.copy import CopyEncoder as TwinEncoder

EXCHANGES = {1: "NSE", 2: "NFO", 3: "CDS", 4: "BSE", 5: "BFO", 6: "BCD", 7: "MCX",
             8: "MCX-SX", 9: "INDICES", 12: "NCO"}
F_QTY, F_DEPTH, F_OI = 0x01, 0x02, 0x04

TICK = np.dtype([
    ("time_us", "<i8"), ("instrument_id", "<u4"), ("divisor", "<u4"), ("price", "<u4"),
    ("quantity", "<u4"), ("volume", "<u4"), ("oi", "<u4"), ("bid_price", "<u4"),
    ("bid_quantity", "<u4"), ("ask_price", "<u4"), ("ask_quantity", "<u4"),
    ("exchange_ts", "<u4"), ("segment", "u1"), ("flags", "u1"),
])
TICK_COLUMNS = [
    ("time", "timestamptz_us", {"field": "time_us"}),
    ("instrument_id", "int4"),
    ("exchange", "text_lookup", {"field": "segment", "table": EXCHANGES, "default": "SEG{}"}),
    ("price", "numeric", {"divisor_field": "divisor"}),
    ("quantity", "int8", {"null_unless_flag": ("flags", F_QTY)}),
    ("volume", "int8", {"null_unless_flag": ("flags", F_QTY)}),
    ("oi", "int8", {"null_unless_flag": ("flags", F_OI)}),
    ("bid_price", "numeric", {"divisor_field": "divisor", "null_unless_flag": ("flags", F_DEPTH)}),
    ("bid_quantity", "int8", {"null_unless_flag": ("flags", F_DEPTH)}),
    ("ask_price", "numeric", {"divisor_field": "divisor", "null_unless_flag": ("flags", F_DEPTH)}),
    ("ask_quantity", "int8", {"null_unless_flag": ("flags", F_DEPTH)}),
    ("exchange_time", "timestamptz_s", {"field": "exchange_ts", "null_if_zero": True}),
]
TICK_SQL = ("time timestamptz, instrument_id integer, exchange text, price numeric(18,7), "
            "quantity bigint, volume bigint, oi bigint, bid_price numeric(18,7), bid_quantity bigint, "
            "ask_price numeric(18,7), ask_quantity bigint, exchange_time timestamptz")
TICK_OIDS = [1184, 23, 25, 1700, 20, 20, 20, 1700, 20, 1700, 20, 1184]

SNAP = np.dtype([
    ("time_us", "<i8"), ("instrument_id", "<u4"), ("divisor", "<u4"),
    ("bid_price", "<u4", (5,)), ("bid_quantity", "<u4", (5,)), ("bid_orders", "<u2", (5,)),
    ("ask_price", "<u4", (5,)), ("ask_quantity", "<u4", (5,)), ("ask_orders", "<u2", (5,)),
    ("total_bid", "<u8"), ("total_ask", "<u8"),
])
SNAP_COLUMNS = [
    ("time", "timestamptz_us", {"field": "time_us"}),
    ("instrument_id", "int4"),
    ("bid_prices", "numeric[]", {"field": "bid_price", "divisor_field": "divisor"}),
    ("bid_quantities", "int8[]", {"field": "bid_quantity"}),
    ("bid_orders", "int4[]"),
    ("ask_prices", "numeric[]", {"field": "ask_price", "divisor_field": "divisor"}),
    ("ask_quantities", "int8[]", {"field": "ask_quantity"}),
    ("ask_orders", "int4[]"),
    ("total_bid_quantity", "int8", {"field": "total_bid"}),
    ("total_ask_quantity", "int8", {"field": "total_ask"}),
]
SNAP_SQL = ("time timestamptz, instrument_id integer, bid_prices numeric(18,7)[], "
            "bid_quantities bigint[], bid_orders integer[], ask_prices numeric(18,7)[], "
            "ask_quantities bigint[], ask_orders integer[], total_bid_quantity bigint, "
            "total_ask_quantity bigint")
SNAP_OIDS = [1184, 23, 1231, 1016, 1007, 1231, 1016, 1007, 20, 20]

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


TITLE = "copy: numpy rows -> PostgreSQL binary COPY payloads (rows/s)"


def make_ticks(n: int, seed: int = 1) -> np.ndarray:
    """Tick-like rows: NSE/NFO/CDS mixes, prices around real magnitudes."""
    g = np.random.default_rng(seed)
    a = np.zeros(n, TICK)
    a["time_us"] = 1_700_000_000_000_000 + np.arange(n) * 37
    a["segment"] = g.choice([1, 1, 1, 2, 2, 3, 9], n)
    a["divisor"] = np.where(a["segment"] == 3, 10**7, 100)
    a["instrument_id"] = g.integers(1, 5_000_000, n)
    a["price"] = g.integers(100, 5_000_000, n)
    a["flags"] = np.where(a["segment"] == 9, 0, F_QTY | F_DEPTH) | np.where(g.random(n) < 0.3, F_OI, 0)
    for f in ("quantity", "volume", "oi", "bid_quantity", "ask_quantity"):
        a[f] = g.integers(0, 10_000_000, n)
    a["bid_price"] = a["price"] - g.integers(0, 100, n)
    a["ask_price"] = a["price"] + g.integers(0, 100, n)
    a["exchange_ts"] = np.where(g.random(n) < 0.1, 0, 1_700_000_000 + np.arange(n) // 1000)
    return a


def make_snapshots(n: int, seed: int = 2) -> np.ndarray:
    g = np.random.default_rng(seed)
    a = np.zeros(n, SNAP)
    a["time_us"] = 1_700_000_000_000_000 + np.arange(n) * 1000
    a["instrument_id"] = g.integers(1, 5_000_000, n)
    a["divisor"] = 100
    mid = g.integers(1000, 5_000_000, n)
    a["bid_price"] = mid[:, None] - np.arange(5) * 5
    a["ask_price"] = mid[:, None] + np.arange(1, 6) * 5
    for f in ("bid_quantity", "ask_quantity"):
        a[f] = g.integers(1, 100_000, (n, 5))
    for f in ("bid_orders", "ask_orders"):
        a[f] = g.integers(1, 200, (n, 5))
    empty = g.random(n) < 0.2            # some books with empty levels (zeros)
    for f in ("bid_price", "bid_quantity", "bid_orders"):
        a[f][empty, 3:] = 0
    a["total_bid"] = a["bid_quantity"].sum(axis=1)
    a["total_ask"] = a["ask_quantity"].sum(axis=1)
    return a


def tick_tuples(a: np.ndarray) -> list[tuple]:
    """The conventional path: Python values per row, as a struct decoder would give."""
    out = []
    for r in a.tolist():
        (t, iid, div, price, qty, vol, oi, bp, bq, ap, aq, ets, seg, flags) = r
        d = Decimal(div)
        has_q, has_d = flags & F_QTY, flags & F_DEPTH
        out.append((
            EPOCH + dt.timedelta(microseconds=t), iid, EXCHANGES.get(seg, f"SEG{seg}"),
            Decimal(price) / d, qty if has_q else None, vol if has_q else None,
            oi if flags & F_OI else None, Decimal(bp) / d if has_d else None, bq if has_d else None,
            Decimal(ap) / d if has_d else None, aq if has_d else None,
            EPOCH + dt.timedelta(seconds=ets) if ets else None))
    return out


def snap_tuples(a: np.ndarray) -> list[tuple]:
    out = []
    for r in a.tolist():
        (t, iid, div, bp, bq, bo, ap, aq, ao, tb, ta) = r
        bp, bq, bo, ap, aq, ao = (x.tolist() for x in (bp, bq, bo, ap, aq, ao))  # subarrays
        d = Decimal(div)
        out.append((EPOCH + dt.timedelta(microseconds=t), iid, [Decimal(p) / d for p in bp], bq, bo,
                    [Decimal(p) / d for p in ap], aq, ao, tb, ta))
    return out


def _median_rate(fn, rows: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return rows / statistics.median(times)


def _psycopg_formatter(oids):
    from psycopg import pq
    from psycopg._copy_base import BinaryFormatter
    from psycopg.adapt import Transformer

    tx = Transformer()
    tx.set_dumper_types(oids, pq.Format.BINARY)
    return BinaryFormatter(tx)


def _write_rows(oids, rows):
    f = _psycopg_formatter(oids)
    size = 0
    for row in rows:
        size += len(f.write_row(row))
    return size + len(f.end())


def _stream(enc, a, chunk=10_000):
    enc.begin()
    size = 0
    for s in range(0, len(a), chunk):
        enc.encode_rows(a, s, min(len(a), s + chunk))
        size += len(enc.take())
    enc.end()
    return size + len(enc.take())


def _measure(case, dtype, columns, oids, make, to_tuples, n, n_twin, repeat, dsn, sql_cols):
    a = make(n)
    enc = CopyEncoder(dtype, columns)
    twin = TwinEncoder(dtype, columns)
    payload = enc.encode(a)
    assert enc.encode(a, 0, n_twin) == twin.encode(a[:n_twin])   # same bytes, or no figures
    tuples = to_tuples(a)
    results = [
        ("core encode", n, _median_rate(lambda: enc.encode(a), n, repeat)),
        ("core stream", n, _median_rate(lambda: _stream(enc, a), n, repeat)),
        ("twin", n_twin, _median_rate(lambda: twin.encode(a[:n_twin]), n_twin, max(1, repeat // 2))),
        ("psycopg write_row", n, _median_rate(lambda: _write_rows(oids, tuples), n, repeat)),
        ("tuples + write_row", n, _median_rate(lambda: _write_rows(oids, to_tuples(a)), n, repeat)),
    ]
    if dsn:
        results += _measure_send(case, enc, a, tuples, dsn, sql_cols, repeat)
    base = next(r for name, _, r in results if name == "psycopg write_row")
    return [{"bench": "copy_encode", "case": case, "impl": name, "rows": rows,
             "rows_per_s": rate, "vs_psycopg": rate / base, "bytes_per_row": len(payload) / n}
            for name, rows, rate in results]


def _measure_send(case, enc, a, tuples, dsn, sql_cols, repeat):
    import psycopg

    table = f"bench_copy_{case}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TEMP TABLE {table} ({sql_cols})")

        def core():
            with conn.transaction():
                with conn.cursor().copy(enc.copy_sql(table)) as copy:
                    copy.write(enc.encode(a))
                conn.execute(f"TRUNCATE {table}")

        def rows():
            with conn.transaction():
                with conn.cursor().copy(enc.copy_sql(table)) as copy:
                    copy.set_types([p_type for p_type in _sql_types(enc)])
                    for row in tuples:
                        copy.write_row(row)
                conn.execute(f"TRUNCATE {table}")

        n = len(a)
        return [("core encode + COPY", n, _median_rate(core, n, repeat)),
                ("write_row + COPY", n, _median_rate(rows, n, repeat))]


def _sql_types(enc):
    names = {"timestamptz": "timestamptz", "int4": "int4", "int8": "int8", "numeric": "numeric",
             "text_lookup": "text", "text": "text", "numeric[]": "numeric[]", "int4[]": "int4[]",
             "int8[]": "int8[]", "int2": "int2", "int2[]": "int2[]"}
    return [names[p.type] for p in enc.plans]


def run(quick: bool = False, dsn: str | None = None) -> list[dict]:
    """Run the benchmark; one dict per (case, implementation).

    Keys: ``bench``, ``case`` (``tick`` / ``snapshot``), ``impl``, ``rows``,
    ``rows_per_s`` (median), ``vs_psycopg`` (ratio to psycopg's
    ``write_row`` formatting of ready tuples), ``bytes_per_row``.
    """
    n = 20_000 if quick else 100_000
    n_twin = 1_000 if quick else 5_000
    repeat = 3 if quick else 5
    return (_measure("tick", TICK, TICK_COLUMNS, TICK_OIDS, make_ticks, tick_tuples,
                     n, n_twin, repeat, dsn, TICK_SQL)
            + _measure("snapshot", SNAP, SNAP_COLUMNS, SNAP_OIDS, make_snapshots, snap_tuples,
                       n // 2, n_twin // 2, repeat, dsn, SNAP_SQL))


def format_table(rows: list[dict]) -> str:
    lines = [f"{'case':<9} {'implementation':<20} {'rows':>8} {'rows/s':>12} {'vs psycopg':>10} {'B/row':>6}"]
    for r in rows:
        lines.append(f"{r['case']:<9} {r['impl']:<20} {r['rows']:>8} {r['rows_per_s']:>12,.0f} "
                     f"{r['vs_psycopg']:>9.2f}x {r['bytes_per_row']:>6.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and runs")
    parser.add_argument("--dsn", help="also time encode + send into a temporary table")
    args = parser.parse_args(argv)
    if DEBUG:
        print("warning: the core is the debug build; figures are not representative")
    print(format_table(run(args.quick, args.dsn)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
