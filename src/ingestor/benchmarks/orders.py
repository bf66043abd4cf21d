"""Orders stage: order postbacks persisted per second, one transaction each vs batched.

A seeded :class:`ingestor.sim.orders.OrderFlow` stream (realistic lifecycles with
duplicated and late deliveries, on 50 instruments and 3 strategies) is applied to a fresh
schema by :class:`ingestor.orders.OrderStore`: one postback per transaction, then batches of
10, 100 and 1000 (sync driver), and batches of 100 through the async driver.  Every variant
starts from empty order tables (instruments stay registered); the figure is the median of
several runs.  Each transaction commits durably (the server's ``synchronous_commit``), so the
one-per-transaction rate is bounded by the commit latency.

Run: ``python -m ingestor.benchmarks.orders [--dsn DSN] [--quick]`` or ``ingestor bench --only orders``.
The DSN names a server (``INGESTOR_BENCH_DSN``, default ``host=127.0.0.1 user=postgres``);
the benchmark creates its own database there and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time

from ingestor.benchmarks.common import table

TITLE = "orders: postbacks persisted per second (one transaction each vs batched)"

TABLES = ("orders", "order_history", "executions", "positions", "strategies",
          "postback_dead_letters")


def _dsn() -> str:
    return os.environ.get("INGESTOR_BENCH_DSN", "host=127.0.0.1 user=postgres")


def _with_db(dsn: str, name: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    return make_conninfo(**dict(conninfo_to_dict(dsn), dbname=name))


def _messages(n: int) -> list[str]:
    from ingestor.sim.orders import OrderFlow

    instruments = [(256265 + 256 * k + 1, "NSE", f"SYM{k:02d}", 100 + 17 * k) for k in range(50)]
    flow = OrderFlow(instruments, seed=42, concurrent=20)
    msgs = flow.next_messages(n)
    return msgs + flow.drain()


def _clean(conn) -> None:
    conn.execute("TRUNCATE " + ", ".join(TABLES) + " CASCADE")
    conn.commit()


def _run_sync(conn, msgs: list[str], batch: int) -> float:
    from ingestor.orders import OrderStore

    _clean(conn)
    store = OrderStore()
    store.apply_sync(conn, msgs[:1])  # registers the instruments/strategy outside the timing
    _clean(conn)
    t0 = time.perf_counter()
    for i in range(0, len(msgs), batch):
        store.apply_sync(conn, msgs[i:i + batch])
    return time.perf_counter() - t0


def _run_async(dsn: str, msgs: list[str], batch: int) -> float:
    import psycopg

    from ingestor.orders import OrderStore

    async def go() -> float:
        conn = await psycopg.AsyncConnection.connect(dsn)
        try:
            store = OrderStore()
            await store.apply(conn, msgs[:1])
            await conn.execute("TRUNCATE " + ", ".join(TABLES) + " CASCADE")
            await conn.commit()
            t0 = time.perf_counter()
            for i in range(0, len(msgs), batch):
                await store.apply(conn, msgs[i:i + batch])
            return time.perf_counter() - t0
        finally:
            await conn.close()

    with psycopg.connect(dsn) as conn:
        _clean(conn)
    try:
        import uvloop

        return uvloop.run(go())
    except ImportError:
        return asyncio.run(go())


def run(quick: bool = False, dsn: str | None = None) -> list[dict]:
    """Rows of the table: one per variant."""
    import psycopg

    from ingestor.store.migrate import migrate

    server = dsn or _dsn()
    n = 300 if quick else 3000
    repeat = 1 if quick else 3
    msgs = _messages(n)
    name = f"ingestor_bench_orders_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(_with_db(server, "postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    db = _with_db(server, name)
    rows: list[dict] = []
    try:
        with psycopg.connect(db) as conn:
            migrate(conn)
            variants = [("1 per transaction", 1, "sync"), ("batches of 10", 10, "sync"),
                        ("batches of 100", 100, "sync"), ("batches of 1000", 1000, "sync"),
                        ("batches of 100 (async)", 100, "async")]
            base = None
            for label, batch, kind in variants:
                times = []
                for _ in range(repeat):
                    if kind == "sync":
                        times.append(_run_sync(conn, msgs, batch))
                    else:
                        times.append(_run_async(db, msgs, batch))
                t = statistics.median(times)
                rate = len(msgs) / t
                base = base or rate
                nb = -(-len(msgs) // batch)
                rows.append({"variant": label, "postbacks": len(msgs), "transactions": nb,
                             "postbacks/s": rate, "ms/transaction": 1000 * t / nb,
                             "vs 1 per tx": f"{rate / base:.1f}x"})
    finally:
        with psycopg.connect(_with_db(server, "postgres"), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn", help="server to create the benchmark database on")
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(quick=args.quick, dsn=args.dsn)
    print(table(rows, f"{TITLE}  [{time.perf_counter() - t0:.0f} s]"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
