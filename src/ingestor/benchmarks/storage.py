"""Storage: ``ingestor replay`` into TimescaleDB (or PostgreSQL) against today's layout.

Side by side in one run, on the same capture and server, each variant into a database of
its own, alternating variants round by round, each round in another order and each variant
from a checkpoint (medians over ``--repeat`` rounds):

* ``baseline``: ``ingestor replay`` of another checkout (``--baseline DIR``: a checkout
  whose core is built in place, e.g. ``git worktree add ../base <rev>`` then
  ``python setup.py build_ext --inplace`` there) into a database that checkout migrated:
  the previous layout and writer;
* ``replay``: this package's ``ingestor replay`` (the one this benchmark is imported from, a
  checkout or an installed package), timed as a whole process;
* ``replay, one connection``: the same with ``--no-overlap`` (one transaction at a time:
  the next batch's rows wait for the commit before them);
* ``replay, direct COPY off``: the same with ``--no-direct-compress`` (every tick through
  the rowstore; TimescaleDB only);
* ``(a) server only``: this package's writer sending the very batches replay makes, with
  the same transaction boundaries, encoded beforehand and sent from memory: what the
  server itself needs.

Beside each: the client process's CPU seconds (the rest of the wall time is the server),
and ``tick_data``'s size on disk as written and once its chunks are compressed (TimescaleDB:
``ingestor.store.timescale.compact``, what the daemon runs on closed chunks; the baseline's
chunks compressed by ``compress_chunk``).

Run::

    python -m ingestor.benchmarks.storage --dsn "host=... port=... user=..." \\
        [--baseline DIR] [--ticks 1000000] [--tokens 400] [--repeat 3]

The benchmark creates and drops its own databases on that server.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from ingestor.benchmarks.common import table

#: where this package is imported from (a checkout's ``src/``, or site-packages): the
#: ``root`` of :func:`_cli` for this code, where ``--baseline`` names another checkout
HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dsn_with(dsn: str, dbname: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return make_conninfo(**params)


class Databases:
    """Scratch databases on one server, dropped at the end."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.made: list[str] = []

    def fresh(self, tag: str) -> str:
        import psycopg

        name = f"ingestor_bench_{tag}_{os.getpid()}_{len(self.made)}"
        with psycopg.connect(_dsn_with(self.dsn, "postgres"), autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name}")
            c.execute(f"CREATE DATABASE {name}")
        self.made.append(name)
        return _dsn_with(self.dsn, name)

    def drop_all(self) -> None:
        import psycopg

        with psycopg.connect(_dsn_with(self.dsn, "postgres"), autocommit=True) as c:
            for name in self.made:
                c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _cli(root: str, *args: str) -> tuple[float, float, str]:
    """Run ``python -m ingestor ARGS`` of this package (``root`` is :data:`HERE`) or of the
    checkout ``root`` (its ``src/``, from that folder): (wall s, child CPU s, stdout)."""
    this = root == HERE
    root = os.path.abspath(root)  # (a relative --baseline: the child runs from that folder)
    env = dict(os.environ, PYTHONPATH=root if this else os.path.join(root, "src"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ingestor", *args], env=env,
                       cwd=None if this else root, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise SystemExit(f"{root}: ingestor {' '.join(args[:1])} failed:\n{r.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, r.stdout


def format1(cap: str) -> str:
    """The same capture in capture format 1 (a baseline from before format 2 reads only
    that): beside it, ``<name>.v1``."""
    from ingestor.feed.capture import CaptureReader, CaptureWriter

    out = cap + ".v1"
    if not os.path.exists(out):
        with CaptureReader(cap) as rd, CaptureWriter(out, rd.header, version=1) as w:
            for rec in rd.records():
                w.write(rec.payload, rec.kind, rec.recv_ns)
    return out


def _available(dsn: str) -> bool:
    import psycopg

    with psycopg.connect(_dsn_with(dsn, "postgres")) as c:
        return c.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
                         ).fetchone() is not None


def _timescale(dsn: str) -> bool:
    import psycopg

    with psycopg.connect(dsn) as c:
        return c.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'"
                         ).fetchone() is not None


def _sizes(dsn: str, compact: bool) -> tuple[int, int]:
    """tick_data's bytes as written, then once its chunks are compressed."""
    import psycopg

    from ingestor.store import timescale as ts

    with psycopg.connect(dsn, autocommit=True) as c:
        if not _timescale(dsn):
            n = c.execute("SELECT pg_total_relation_size('tick_data')").fetchone()[0]
            return n, n
        written = c.execute("SELECT hypertable_size('tick_data')").fetchone()[0]
        if compact:
            ts.compact(c, "tick_data", grace="1 minute")
        else:
            for (chunk,) in c.execute("SELECT show_chunks('tick_data')").fetchall():
                c.execute(f"SELECT compress_chunk('{chunk}', if_not_compressed => true)")
        return written, c.execute("SELECT hypertable_size('tick_data')").fetchone()[0]


def _checkpoint(dsn: str) -> None:
    """Write back what the previous variant left dirty before the next is timed (a variant
    that writes a lot would otherwise slow the one after it); skipped without the right."""
    import psycopg

    try:
        with psycopg.connect(_dsn_with(dsn, "postgres"), autocommit=True) as c:
            c.execute("CHECKPOINT")
    except psycopg.Error:
        pass


def _server_only(dsn: str, cap: str) -> float:
    """Variant (a): replay's own batches, encoded first, written from memory."""
    import psycopg

    from ingestor.feed.capture import CaptureReader
    from ingestor.pipeline import Pipeline, PipelineSettings
    from ingestor.store.instruments import register_tokens
    from ingestor.store.writer import Writer

    from ingestor.commands.replay import FLUSH_ROWS

    # as `ingestor replay` runs it: its transaction size, no forming candles upserted
    settings = PipelineSettings(flush_rows=FLUSH_ROWS, open_candle_min_us=1 << 62)
    batches = []
    with psycopg.connect(dsn, autocommit=True) as setup, CaptureReader(cap) as rd:
        pl = Pipeline(rd.header.stream, resolve=lambda toks: register_tokens(setup, toks),
                      settings=settings)
        for chunk, seq in rd.chunks():
            batches.extend(pl.feed_chunk(chunk, seq))
        batches.append(pl.take(final=True))

    async def write() -> float:
        w = Writer(dsn)
        await w.connect()
        t0 = time.perf_counter()
        for b in batches:
            await w.write(b)
        dt = time.perf_counter() - t0
        await w.close()
        return dt

    return asyncio.run(write())


def run(dsn: str, baseline: str | None, ticks: int, tokens: int, repeat: int) -> list[dict]:
    from ingestor.sim.market import generate_capture

    dbs = Databases(dsn)
    results: dict[str, list] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cap = os.path.join(tmp, "bench.cap")
            generate_capture(cap, ticks=ticks, tokens=tokens, mode="mixed", seed=7)
            tsdb = _available(dsn)
            variants = [("baseline", baseline, [])] if baseline else []
            variants.append(("replay", HERE, []))
            variants.append(("replay, one connection", HERE, ["--no-overlap"]))
            if tsdb:
                variants.append(("replay, direct COPY off", HERE, ["--no-direct-compress"]))
            # each variant's modules compiled first, as an installed package has them: with
            # PYTHONDONTWRITEBYTECODE set (some machines set it), every replay would compile
            # its sources at start, a cost no user pays and not the same for two checkouts
            for root in {root for _, root, _ in variants}:
                compileall.compile_dir(root if root == HERE else os.path.join(root, "src"),
                                       quiet=2)
            for rnd in range(repeat):
                # each round in another order (no variant always runs right after the one
                # that leaves the server the most to write back), each from a checkpoint
                for name, root, extra in variants[rnd % len(variants):] + \
                        variants[:rnd % len(variants)]:
                    db = dbs.fresh(name.split(",")[0])
                    _cli(root, "migrate", "--dsn", db)
                    _checkpoint(dsn)
                    wall, cpu, out = _cli(root, "replay", cap if root == HERE else format1(cap),
                                          "--dsn", db, "--no-progress", *extra)
                    sizes = _sizes(db, compact=root == HERE) if rnd == 0 else (None, None)
                    results.setdefault(name, []).append((wall, cpu, sizes))
                db = dbs.fresh("a")
                _cli(HERE, "migrate", "--dsn", db)
                _checkpoint(dsn)
                results.setdefault("(a) server only", []).append(
                    (_server_only(db, cap), None, (None, None)))
    finally:
        dbs.drop_all()

    rows = []
    base = statistics.median(w for w, _, _ in results["baseline"]) if "baseline" in results \
        else None
    ref = statistics.median(w for w, _, _ in results["replay"])
    for name, runs in results.items():
        wall = statistics.median(w for w, _, _ in runs)
        cpus = [c for _, c, _ in runs if c is not None]
        written, packed = runs[0][2]
        row = {"variant": name, "ticks": ticks, "seconds": wall, "ticks/s": ticks / wall,
               "client CPU s": statistics.median(cpus) if cpus else "",
               "replay rate / its rate": wall / ref}
        if base:
            row["vs baseline"] = base / wall
        row["tick_data MB as written"] = written / 1e6 if written else ""
        row["MB compressed"] = packed / 1e6 if packed else ""
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", default=os.environ.get("INGESTOR_BENCH_DSN",
                                                   "host=127.0.0.1 user=postgres"))
    p.add_argument("--baseline", help="a checkout to compare with (core built in place)")
    p.add_argument("--ticks", type=int, default=1_000_000)
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    rows = run(a.dsn, a.baseline, a.ticks, a.tokens, a.repeat)
    print(table(rows, f"storage: replay of {a.ticks:,} ticks over {a.tokens:,} instruments "
                      f"(medians of {a.repeat} rounds)"))


if __name__ == "__main__":
    main()
