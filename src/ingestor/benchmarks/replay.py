"""Replay stage: a capture end to end into PostgreSQL, against the alternatives.

Same capture, same database, same run; tables emptied between variants:

* ``replay``: ``ingestor replay`` (decode -> aggregate -> encode in the core,
  binary COPY, one transaction per 50k ticks with candles upserted and
  snapshots).
* ``(a) server only``: the same statements in the same transactions, with
  the payloads encoded beforehand and sent from memory: the pipeline's cost
  removed, what the server itself needs.
* ``(b) conventional Python``: struct decode into dicts/tuples, the same
  aggregation in pure Python (the core's twin), psycopg ``copy.write_row``
  into the same tables with the same upsert.
* ``replay, no tick_data key``: replay after dropping ``tick_data``'s primary
  key (what uniqueness by construction would allow).

Run: ``python -m ingestor.benchmarks.replay [--quick] [--ticks N]`` or ``ingestor bench
--only replay``; the database server is ``INGESTOR_BENCH_DSN`` (default
host=127.0.0.1 user=postgres); the benchmark creates and drops its own database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
import tempfile
import time
from decimal import Decimal

from ingestor.benchmarks.common import scratch_database, table

TITLE = "replay: capture -> PostgreSQL end to end (ticks/s; same capture, database and run)"

TABLES = "tick_data, ohlc_candles, order_book_snapshots, stream_offsets"


def _precompute(path: str, ids: dict, settings) -> list:
    from ingestor.feed.capture import CaptureReader
    from ingestor.pipeline import Pipeline

    out = []
    with CaptureReader(path) as rd:
        pl = Pipeline(rd.header.stream, resolve=lambda toks: {t: ids[t] for t in toks},
                      settings=settings)
        for chunk, seq in rd.chunks():
            out.extend(pl.feed_chunk(chunk, seq))
        out.append(pl.take(final=True))
    return out


async def _write_all(dsn: str, batches: list) -> None:
    from ingestor.store.writer import Writer

    w = Writer(dsn)
    await w.connect()
    for b in batches:
        await w.write(b)
    await w.close()


def _conventional(path: str, dsn: str, ids: dict, flush_rows: int) -> int:
    """Struct decode, pure-Python aggregation, psycopg write_row: the usual way."""
    import psycopg

    from ingestor.feed.capture import CaptureReader
    from ingestor.store.instruments import exchange_of
    from ingestor.twin.candles import Engine as PyEngine
    from ingestor.twin.frames import decode_message
    from ingestor.store.candle_sql import SQL_STAGE, apply_staged

    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    us = dt.timedelta(microseconds=1)
    book_keys = ("bid_quantity", "bid_price", "bid_orders", "ask_quantity", "ask_price", "ask_orders")
    eng = PyEngine()
    for t, i in ids.items():
        eng.set_instrument(t, i)
    n_ticks = 0

    def ts(v):
        return epoch + v * us

    def price(raw, div):
        return Decimal(raw) / div

    with psycopg.connect(dsn) as conn, CaptureReader(path) as rd:
        conn.execute(SQL_STAGE)
        conn.commit()
        stream = rd.header.stream
        last_seq = -1
        pending = 0

        def flush(final=False):
            if final:
                eng.flush()
            else:
                eng.candles.extend(r for r in eng.open_candles() if r["timeframe"] >= 2)
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("INSERT INTO stream_offsets (stream, committed_seq) VALUES (%s, -1) "
                            "ON CONFLICT DO NOTHING", (stream,))
                cur.execute("SELECT committed_seq FROM stream_offsets WHERE stream = %s FOR UPDATE",
                            (stream,))
                with cur.copy("COPY tick_data (time, instrument_id, exchange, price, quantity, volume, "
                              "oi, bid_price, bid_quantity, ask_price, ask_quantity, exchange_time) "
                              "FROM STDIN") as cp:
                    for r in eng.tick_rows:
                        f, d = r["flags"], r["divisor"]
                        book = f & 8
                        cp.write_row((ts(r["time_us"]), r["instrument_id"], exchange_of(r["instrument_token"]),
                                      price(r["price"], d), r["quantity"] if f & 1 else None,
                                      r["volume"] if f & 2 else None, r["oi"] if f & 4 else None,
                                      price(r["bid_price"], d) if book else None,
                                      r["bid_quantity"] if book else None,
                                      price(r["ask_price"], d) if book else None,
                                      r["ask_quantity"] if book else None,
                                      ts(r["exchange_time_us"]) if f & 16 else None))
                with cur.copy("COPY ingestor_candle_stage (time, instrument_id, timeframe, open_price, "
                              "high_price, low_price, close_price, volume, trade_count, vwap, "
                              "open_interest) FROM STDIN") as cp:
                    for c in eng.candles:
                        d = c["divisor"]
                        cp.write_row((ts(c["time_us"]), c["instrument_id"], eng.timeframes[c["timeframe"]],
                                      price(c["open"], d), price(c["high"], d), price(c["low"], d),
                                      price(c["close"], d), c["volume"], c["trade_count"],
                                      Decimal(c["vwap_e7"]).scaleb(-7) if c["flags"] & 1 else None,
                                      c["open_interest"] if c["flags"] & 2 else None))
                apply_staged(cur)
                with cur.copy("COPY order_book_snapshots (time, instrument_id, bid_prices, "
                              "bid_quantities, bid_orders, ask_prices, ask_quantities, ask_orders, "
                              "total_bid_quantity, total_ask_quantity) FROM STDIN") as cp:
                    for s in eng.snapshots:
                        d = s["divisor"]
                        cp.write_row((ts(s["time_us"]), s["instrument_id"],
                                      [price(p, d) for p in s["bid_price"]], s["bid_quantity"],
                                      s["bid_orders"], [price(p, d) for p in s["ask_price"]],
                                      s["ask_quantity"], s["ask_orders"],
                                      s["total_bid_quantity"], s["total_ask_quantity"]))
                cur.execute("UPDATE stream_offsets SET committed_seq = %s WHERE stream = %s",
                            (last_seq, stream))
            eng.tick_rows.clear()
            eng.candles.clear()
            eng.snapshots.clear()

        for rec in rd.records():
            last_seq = rec.seq
            if rec.kind != 1:
                continue
            for tk in decode_message(rec.payload, rec.recv_ns, rec.seq):
                book = {k: tk[k] for k in book_keys} if tk["length"] == 184 else None
                eng._tick(tk, book)
                n_ticks += 1
                pending += 1
            if pending >= flush_rows:
                flush()
                pending = 0
        flush(final=True)
    return n_ticks


def run(quick: bool = False, ticks: int | None = None) -> list[dict]:
    import psycopg

    from ingestor.store.instruments import load_ids
    from ingestor.store.migrate import migrate
    from ingestor.pipeline import PipelineSettings
    from ingestor.pipeline.replay import replay
    from ingestor.sim.market import generate_capture

    n = ticks or (20_000 if quick else 300_000)
    n_conv = min(n, 5_000 if quick else 60_000)
    rows = []
    settings = PipelineSettings()
    with scratch_database() as dsn:
        with tempfile.TemporaryDirectory() as tmp, psycopg.connect(dsn, autocommit=True) as conn:
            cap = os.path.join(tmp, "bench.cap")
            cap_conv = os.path.join(tmp, "conv.cap")
            generate_capture(cap, ticks=n, tokens=500, mode="mixed", seed=7)
            generate_capture(cap_conv, ticks=n_conv, tokens=500, mode="mixed", seed=7)
            migrate(conn)

            def empty():
                conn.execute(f"TRUNCATE {TABLES}")
                conn.execute("VACUUM ANALYZE tick_data")

            # warm-up: registers the instruments, warms the caches
            replay(cap, dsn, settings=settings, progress=False)
            ids = load_ids(conn)
            empty()
            r = replay(cap, dsn, settings=settings, progress=False)
            replay_rate = r.ticks / r.seconds
            rows.append({"variant": "replay", "ticks": r.ticks, "seconds": r.seconds,
                         "ticks/s": replay_rate, "vs replay": 1.0})

            batches = _precompute(cap, ids, settings)
            empty()
            t0 = time.perf_counter()
            asyncio.run(_write_all(dsn, batches))
            t_a = time.perf_counter() - t0
            rows.append({"variant": "(a) server only (payloads from memory)", "ticks": r.ticks,
                         "seconds": t_a, "ticks/s": r.ticks / t_a,
                         "vs replay": (r.ticks / t_a) / replay_rate})
            del batches

            empty()
            t0 = time.perf_counter()
            nc = _conventional(cap_conv, dsn, ids, settings.flush_rows)
            t_b = time.perf_counter() - t0
            rows.append({"variant": "(b) conventional Python (struct + write_row)", "ticks": nc,
                         "seconds": t_b, "ticks/s": nc / t_b, "vs replay": (nc / t_b) / replay_rate})

            empty()
            conn.execute("ALTER TABLE tick_data DROP CONSTRAINT tick_data_pkey")
            r2 = replay(cap, dsn, settings=settings, progress=False)
            rows.append({"variant": "replay, tick_data without its key", "ticks": r2.ticks,
                         "seconds": r2.seconds, "ticks/s": r2.ticks / r2.seconds,
                         "vs replay": (r2.ticks / r2.seconds) / replay_rate})
    return rows


if __name__ == "__main__":
    t = None
    if "--ticks" in sys.argv:
        t = int(sys.argv[sys.argv.index("--ticks") + 1])
    print(table(run(quick="--quick" in sys.argv, ticks=t), TITLE))
