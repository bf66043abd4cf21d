"""Start-up: seeding the engine after a long day, from engine_state (and the old way).

A restart must continue every instrument exactly (last time, last cumulative volume, forming
candles with their exact price x volume sums, the pending book).  That state is committed with
each batch in ``engine_state`` (sql/0004), so start-up reads one row per instrument, whatever
the day's ticks.  This benchmark builds such a day -- a simulated capture over ``--instruments``
instruments replayed (real state rows), then ``tick_data`` filled up to ``--ticks`` rows with
earlier ticks of the same instruments -- and times ``load_state``:

* ``engine_state``: the normal start-up (one query, O(instruments));
* ``tick_data (fallback)``, with ``--legacy``: the same instruments marked as from before
  engine_state, so their forming candles are recomputed from the day's ticks in SQL (what every
  start-up did before; about a minute after 20M ticks).

Run: ``python -m ingestor.benchmarks.startup [--ticks N] [--instruments K] [--legacy] [--quick]``
(default 20,000,000 ticks over 3,000 instruments; ``--quick``: 300,000 over 300), or
``ingestor bench --only startup``.  The database server
is ``INGESTOR_BENCH_DSN`` (default host=127.0.0.1 user=postgres); the benchmark creates and
drops its own database.  Building the 20M-tick day takes a few minutes; the timings are of
``load_state`` alone.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from ingestor.benchmarks.common import scratch_database, table

TITLE = "start-up: load_state after a day of ticks (seconds; one row per instrument read)"


def _arg(name: str, default: int) -> int:
    if name in sys.argv:
        return int(sys.argv[sys.argv.index(name) + 1])
    return default


def _load(dsn: str, repeat: int = 3) -> tuple[float, object]:
    import psycopg

    from ingestor.pipeline import Pipeline
    from ingestor.pipeline.state import load_state

    times, out = [], None
    for _ in range(repeat):
        with psycopg.connect(dsn, autocommit=True) as conn:
            pipe = Pipeline("bench", resolve=dict)
            t0 = time.perf_counter()
            out = load_state(conn, pipe)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run(quick: bool = False, ticks: int | None = None, instruments: int = 3_000,
        legacy: bool = False) -> list[dict]:
    import psycopg

    from ingestor.pipeline import PipelineSettings
    from ingestor.pipeline.replay import replay
    from ingestor.sim.market import generate_capture
    from ingestor.store.migrate import migrate

    ticks = ticks or (300_000 if quick else 20_000_000)
    if quick:
        instruments = min(instruments, 300)
    rows = []
    with scratch_database() as dsn, tempfile.TemporaryDirectory() as tmp:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
        # the end of the day: a capture replayed, so engine_state holds real state rows
        cap = os.path.join(tmp, "day.cap")
        live = min(ticks, max(20 * instruments, 200_000))
        generate_capture(cap, ticks=live, tokens=instruments, mode="mixed", seed=11)
        replay(cap, dsn, settings=PipelineSettings(), progress=False)
        with psycopg.connect(dsn, autocommit=True) as conn:
            first, n_inst = conn.execute(
                "select min(time), count(distinct instrument_id) from tick_data").fetchone()
            # the rest of the day: earlier ticks of the same instruments, 1 ms apart per
            # instrument, all before the replayed ones (same day, so the 1d buckets hold them)
            rest = ticks - live
            if rest > 0:
                conn.execute(
                    "insert into tick_data (time, instrument_id, exchange, price, quantity, "
                    "volume, oi) "
                    "select %(first)s::timestamptz - (g / k.n + 1) * interval '1 millisecond', "
                    "k.ids[g %% k.n + 1], 'NSE', 100 + (g %% 997) / 100.0, 1, g / k.n, null "
                    "from (select array_agg(distinct instrument_id) ids, "
                    "      count(distinct instrument_id) n from tick_data) k, "
                    "generate_series(0, %(rest)s - 1) g",
                    {"first": first, "rest": rest})
            conn.execute("vacuum analyze tick_data")
            total = conn.execute("select count(*) from tick_data").fetchone()[0]
        seconds, out = _load(dsn)
        rows.append({"seeded from": "engine_state", "tick_data rows": total,
                     "instruments": out.instruments, "candles": out.candles,
                     "seconds": seconds})
        if legacy:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("update engine_state set state = null")
            seconds, out = _load(dsn, repeat=1)
            rows.append({"seeded from": "tick_data (fallback, SQL)", "tick_data rows": total,
                         "instruments": out.instruments, "candles": out.candles,
                         "seconds": seconds})
    return rows


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    print(table(run(quick=quick, ticks=_arg("--ticks", 0) or None,
                    instruments=_arg("--instruments", 3_000), legacy="--legacy" in sys.argv),
                TITLE))
