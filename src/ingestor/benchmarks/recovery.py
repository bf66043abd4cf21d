"""Recovery: a restart over a large crash leftover in the spool.

A daemon killed mid-stream leaves its spool behind.  The restarted daemon must be
receiving again at once (the feed does not wait for the backlog, nor for the database)
and drain the leftover in order, exactly once, while it spools the live stream.

For a leftover of ``--gib`` GiB (a simulated full-mode capture placed in the spool folder
as a killed daemon's stream), with the database up and with it down (a DSN to a port where
nothing listens; the tokens come from the configuration): seconds from the daemon's start
to its first received live message, and (database up) seconds until the leftover's ticks
are all in ``tick_data``, with the drain rate.

Run: ``python -m ingestor.benchmarks.recovery [--gib 1.0] [--quick]``; the database server is
``INGESTOR_BENCH_DSN`` (the benchmark creates and drops its own database).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from ingestor.benchmarks.common import scratch_database, table

TITLE = "recovery: restart over a crash leftover in the spool"


def _ingestor(*a):
    return [sys.executable, "-m", "ingestor", *a]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _received(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(float(m.group(1)) for m in
               re.finditer(r'^ingestor_messages_received_total\{[^}]*\} (\S+)$', text, re.M))


def make_leftover(path: str, gib: float, tokens: int) -> tuple[int, list[int]]:
    """A full-mode capture of about ``gib`` GiB named as a killed daemon's spool segment."""
    from ingestor.sim.market import generate_capture

    # full packets are 184 bytes, 50 to a message on average: ~9.4 KB per message
    ticks = int(gib * (1 << 30) / 190)
    info = generate_capture(path, ticks, tokens=tokens, mode="full", seed=11,
                            stream="kite-0-leftover0000")
    return ticks, info


def run_case(dsn: str, tmp: str, leftover: str, ticks: int, records: int, db_up: bool,
             tokens_list: list[int]) -> dict:
    spool = os.path.join(tmp, "spool")
    shutil.rmtree(spool, ignore_errors=True)
    os.makedirs(spool)
    # a hard link: the daemon deletes what it committed, the next case needs it again
    os.link(leftover, os.path.join(spool, "kite-0-leftover0000.000000000000.cap"))
    sim = subprocess.Popen(_ingestor("simulate", "--listen", "127.0.0.1:0", "--tokens", "400",
                                     "--rate", "5000", "--duration", "600"),
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = sim.stdout.readline().split()[-1]
    port = _free_port()
    cfg = os.path.join(tmp, "recovery.toml")
    with open(cfg, "w") as f:
        f.write(f"[feed]\ntokens = {tokens_list!r}\nmode = \"full\"\n"
                f"[spool]\ndir = \"{spool}\"\nmax_bytes = {8 << 30}\n"
                f"[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
    use_dsn = dsn if db_up else f"host=127.0.0.1 port={_free_port()} user=postgres dbname=x"
    env = dict(os.environ, KITE_API_KEY="bench", KITE_ACCESS_TOKEN="bench")
    t0 = time.monotonic()
    daemon = subprocess.Popen(_ingestor("run", "--config", cfg, "--dsn", use_dsn, "--url", url),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = drained = None
    try:
        while time.monotonic() - t0 < 60:
            if _received(port) > 0:
                first = time.monotonic() - t0
                break
            time.sleep(0.02)
        if db_up:
            import psycopg

            while time.monotonic() - t0 < 1800 and daemon.poll() is None:
                with psycopg.connect(dsn) as c:
                    n = c.execute("select committed_seq from stream_offsets "
                                  "where stream = 'kite-0-leftover0000'").fetchone()
                if n is not None and n[0] >= records - 1:  # committed through its last record
                    drained = time.monotonic() - t0
                    break
                time.sleep(0.2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=300)
        except subprocess.TimeoutExpired:
            daemon.kill()
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=30)
    return {"database": "up" if db_up else "down",
            "leftover MiB": os.path.getsize(leftover) / (1 << 20),
            "first live message s": first if first is not None else float("nan"),
            "leftover drained s": drained if drained is not None else float("nan"),
            "drain ticks/s": ticks / drained if drained else float("nan")}


def run(quick: bool = False, gib: float = 1.0) -> list[dict]:
    import psycopg

    from ingestor.store.migrate import migrate

    gib = 0.05 if quick else gib
    rows = []
    with tempfile.TemporaryDirectory() as tmp, scratch_database() as dsn:
        with psycopg.connect(dsn, autocommit=True) as c:
            migrate(c)
        leftover = os.path.join(tmp, "leftover.cap")
        ticks, _ = make_leftover(leftover, gib, tokens=400)
        from ingestor._core import KiteDecoder
        from ingestor.pipeline.batch import decode_capture

        dec = KiteDecoder()
        toks: set[int] = set()
        records = 0
        for b in decode_capture(leftover, dec):
            toks.update(b.decoder.ticks["instrument_token"][:b.decoder.n_ticks].tolist())
            records = b.last_seq + 1
        for db_up in (True, False):
            rows.append(run_case(dsn, tmp, leftover, ticks, records, db_up, sorted(toks)))
    return rows


if __name__ == "__main__":
    argv = sys.argv
    gib = float(argv[argv.index("--gib") + 1]) if "--gib" in argv else 1.0
    print(table(run(quick="--quick" in argv, gib=gib), TITLE))
