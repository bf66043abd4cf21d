"""Schema choices for ``tick_data`` measured: COPY rows/s with and without its indexes / FK.

Backs the figures quoted in ``sql/0001_market_data.sql``.  For each variant a fresh
``tick_data`` (the migration's columns) is created with that variant's key, indexes and
foreign key, then the same binary COPY payload, encoded once in advance and sent from
memory, is streamed into it in batches, one transaction per batch as the writer flushes.
What is timed is the server's work for the COPY (parse, heap insert, index and FK upkeep,
commit), not the encoding.

Usage::

    python -m ingestor.benchmarks.schema [--dsn DSN] [--rows 500000] [--batch 50000]
                                 [--instruments 2000] [--repeat 1]

The DSN names a server (the usual rule: --dsn, INGESTOR_DSN, DATABASE_URL, libpq
defaults); the benchmark creates its own database on it and drops it at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from ingestor.store.dsn import connect, resolve_dsn

TABLE = """
CREATE TABLE tick_data (
    time timestamptz NOT NULL, instrument_id integer NOT NULL, exchange text NOT NULL,
    price numeric(18,7) NOT NULL, quantity bigint, volume bigint, oi bigint,
    bid_price numeric(18,7), bid_quantity bigint, ask_price numeric(18,7), ask_quantity bigint,
    exchange_time timestamptz)
"""

#: (label, DDL run after CREATE TABLE)
VARIANTS = [
    ("heap only (no key, no index)", []),
    ("unique (instrument_id, time)  [chosen]",
     ["ALTER TABLE tick_data ADD PRIMARY KEY (instrument_id, time)"]),
    ("not unique (instrument_id, time)",
     ["CREATE INDEX ON tick_data (instrument_id, time)"]),
    ("not unique (instrument_id, time DESC)  [TimescaleDB rowstore]",
     ["CREATE INDEX ON tick_data (instrument_id, time DESC)"]),
    ("unique (time, instrument_id)",
     ["ALTER TABLE tick_data ADD PRIMARY KEY (time, instrument_id)"]),
    ("unique (time, instrument_id) + (instrument_id, time DESC)  [ref. 000]",
     ["ALTER TABLE tick_data ADD PRIMARY KEY (time, instrument_id)",
      "CREATE INDEX ON tick_data (instrument_id, time DESC)"]),
    ("unique (instrument_id, time) + FK instruments",
     ["ALTER TABLE tick_data ADD PRIMARY KEY (instrument_id, time)",
      "ALTER TABLE tick_data ADD FOREIGN KEY (instrument_id) REFERENCES instruments (id)"]),
    ("unique (instrument_id, time) + BRIN (time)",
     ["ALTER TABLE tick_data ADD PRIMARY KEY (instrument_id, time)",
      "CREATE INDEX ON tick_data USING brin (time)"]),
    ("unique (instrument_id, time) + B-tree (price)  [ref. 000]",
     ["ALTER TABLE tick_data ADD PRIMARY KEY (instrument_id, time)",
      "CREATE INDEX ON tick_data (price)"]),
]

PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds


def _numeric_dtype(name: str):
    # binary numeric: ndigits, weight, sign, dscale, then base-10000 digits (2 here)
    return [(f"{name}_len", ">i4"), (f"{name}_nd", ">i2"), (f"{name}_w", ">i2"),
            (f"{name}_s", ">i2"), (f"{name}_ds", ">i2"), (f"{name}_d0", ">i2"),
            (f"{name}_d1", ">i2")]


ROW = np.dtype(
    [("nfields", ">i2"),
     ("time_len", ">i4"), ("time", ">i8"),
     ("iid_len", ">i4"), ("iid", ">i4"),
     ("exch_len", ">i4"), ("exch", "S3")]
    + _numeric_dtype("price")
    + [("qty_len", ">i4"), ("qty", ">i8"),
       ("vol_len", ">i4"), ("vol", ">i8"),
       ("oi_len", ">i4")]                      # oi: null
    + _numeric_dtype("bid")
    + [("bidq_len", ">i4"), ("bidq", ">i8")]
    + _numeric_dtype("ask")
    + [("askq_len", ">i4"), ("askq", ">i8"),
       ("xt_len", ">i4"), ("xt", ">i8")],
    align=False)


def _set_numeric(rows, name, paise):
    """Price in paise (1/100) as a binary numeric with 2 digit groups and dscale 2."""
    rows[f"{name}_len"] = 12
    rows[f"{name}_nd"] = 2
    rows[f"{name}_w"] = 0
    rows[f"{name}_s"] = 0
    rows[f"{name}_ds"] = 2
    rows[f"{name}_d0"] = paise // 100          # integer part < 10000
    rows[f"{name}_d1"] = (paise % 100) * 100   # two decimals in the first fraction group


def encode(n: int, instruments: int, seed: int = 1) -> np.ndarray:
    """n tick rows as binary COPY rows (one structured array), times strictly increasing."""
    rng = np.random.default_rng(seed)
    rows = np.zeros(n, dtype=ROW)
    rows["nfields"] = 12
    t0 = int(time.time() * 1e6) - PG_EPOCH_US - 3_600_000_000
    rows["time_len"] = 8
    rows["time"] = t0 + np.arange(n, dtype=np.int64) * 50  # 20k ticks/s market-wide
    rows["iid_len"] = 4
    rows["iid"] = rng.integers(1, instruments + 1, n, dtype=np.int32)
    rows["exch_len"] = 3
    rows["exch"] = b"NSE"
    paise = rng.integers(10_000, 900_000, n)
    _set_numeric(rows, "price", paise)
    rows["qty_len"] = 8
    rows["qty"] = rng.integers(1, 500, n)
    rows["vol_len"] = 8
    rows["vol"] = np.arange(n) * 7
    rows["oi_len"] = -1
    _set_numeric(rows, "bid", paise - 5)
    rows["bidq_len"] = 8
    rows["bidq"] = rng.integers(1, 5000, n)
    _set_numeric(rows, "ask", paise + 5)
    rows["askq_len"] = 8
    rows["askq"] = rng.integers(1, 5000, n)
    rows["xt_len"] = 8
    rows["xt"] = rows["time"] - 1_000_000
    return rows


HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"


def payloads(rows: np.ndarray, batch: int) -> list[bytes]:
    return [HEADER + rows[i:i + batch].tobytes() + TRAILER for i in range(0, len(rows), batch)]


def run_variant(conn, ddl: list[str], batches: list[bytes]) -> float:
    with conn.transaction():
        conn.execute("DROP TABLE IF EXISTS tick_data")
        conn.execute(TABLE)
        for stmt in ddl:
            conn.execute(stmt)
    conn.execute("CHECKPOINT")  # start each variant from the same clean state
    t = time.perf_counter()
    for payload in batches:
        with conn.transaction():
            with conn.cursor().copy("COPY tick_data FROM STDIN (FORMAT BINARY)") as cp:
                cp.write(payload)
    return time.perf_counter() - t


from ingestor.benchmarks.common import scratch_database, table  # noqa: E402

TITLE = "schema: COPY BINARY into tick_data, by key/index choice (rows/s)"


def run(quick: bool = False, rows: int | None = None, batch: int | None = None,
        instruments: int | None = None, repeat: int = 1, dsn: str | None = None) -> list[dict]:
    n_rows = rows or (50_000 if quick else 500_000)
    batch = batch or (10_000 if quick else 50_000)
    instruments = instruments or (500 if quick else 2000)
    out = []
    with scratch_database(resolve_dsn(dsn or os.environ.get("INGESTOR_BENCH_DSN"))) as db:
        with connect(db, autocommit=True) as conn:
            conn.execute("CREATE TABLE instruments (id integer PRIMARY KEY)")
            conn.execute("INSERT INTO instruments SELECT generate_series(1, %s)", (instruments,))
            batches = payloads(encode(n_rows, instruments), batch)
            base = None
            for label, ddl in VARIANTS:
                secs = statistics.median(run_variant(conn, ddl, batches) for _ in range(repeat))
                rate = n_rows / secs
                base = base or rate
                out.append({"tick_data variant": label, "rows/s": rate, "vs heap": rate / base})
            conn.execute("DROP TABLE IF EXISTS tick_data")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn")
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=50_000)
    ap.add_argument("--instruments", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)

    print(f"tick_data COPY BINARY: {args.rows} rows, {args.instruments} instruments, "
          f"batches of {args.batch} (one transaction each), repeat {args.repeat}")
    print(table(run(rows=args.rows, batch=args.batch, instruments=args.instruments,
                    repeat=args.repeat, dsn=args.dsn), TITLE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
