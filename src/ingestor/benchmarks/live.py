"""Live stage: the simulator offering a fixed rate over loopback, the daemon ingesting.

Simulator server, daemon and PostgreSQL share this machine (2 cores here).
For each offered rate: ticks offered vs ingested per second, whether
anything was lost (every packet the simulator recorded must be in
``tick_data`` after the daemon's graceful stop), tick-to-commit latency
p50/p99 (the daemon's histogram: receive time of a batch's newest tick to
its commit), the largest event-loop lag, and the daemon's RSS: at start, at the end, its
largest sample (every 5 s) and its slope over the run's second half (a soak, ``--seconds
600``: flat once warm, or leaking).

Run: ``python -m ingestor.benchmarks.live [--quick] [--seconds S] [--rates 20000,50000]
[--flush-interval S] [--compare-overlap] [--broker kite,angel]`` (``--compare-overlap``: each
rate also with the writer on one connection, ``writer.overlap = false``; ``--broker``: Angel
One's SmartStream simulator and feed, one packet per message, in place of or beside Kite's)
or ``ingestor bench --only live``; the database server is
``INGESTOR_BENCH_DSN`` (default host=127.0.0.1 user=postgres); the benchmark
creates and drops its own database.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from ingestor.benchmarks.common import scratch_database, table

TITLE = "live: simulator -> daemon -> PostgreSQL over loopback (all on this machine)"


def _ingestor(*a):
    return [sys.executable, "-m", "ingestor", *a]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(t, y)`` points (0 for fewer than two)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / var if var else 0.0


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _quantile(text: str, name: str, q: float) -> float | None:
    """A quantile from a Prometheus histogram (linear inside the bucket)."""
    buckets = []
    for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M):
        le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
        buckets.append((le, float(m.group(2))))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    want = q * total
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= want:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (want - prev_n) / max(n - prev_n, 1e-9)
        prev_le, prev_n = le, n
    return None


def _counter(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def committed(port: int) -> float:
    """Tick rows a process committed so far (``ingestor_ticks_written_total``; 0 while its
    metrics do not answer)."""
    try:
        return _counter(_metrics(port), "ingestor_ticks_written_total") or 0.0
    except OSError:
        return 0.0


def _labelled(text: str, name: str, path: str) -> int:
    m = re.search(rf'^{name}{{path="{path}"}} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def _gauge(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its waited-for children), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _tick_bytes(dsn: str) -> tuple[int, int]:
    """tick_data's size as the run left it, then with every chunk compressed (TimescaleDB:
    decompressed and compressed again, as ``timescale.compact`` does once a chunk closes;
    forced here on the open chunk too).  Plain PostgreSQL: the table's size, twice."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        if c.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone() is None:
            n = c.execute("SELECT pg_total_relation_size('tick_data')").fetchone()[0]
            return n, n
        written = c.execute("SELECT hypertable_size('tick_data')").fetchone()[0]
        for (chunk,) in c.execute("SELECT show_chunks('tick_data')").fetchall():
            c.execute("SELECT decompress_chunk(%s, if_compressed => true)", (chunk,))
            c.execute("SELECT compress_chunk(%s)", (chunk,))
        return written, c.execute("SELECT hypertable_size('tick_data')").fetchone()[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class laid_out_database(scratch_database):
    """``with laid_out_database() as dsn:`` a scratch database with the schema, laid out as
    ``ingestor migrate`` does (TimescaleDB where the server has it)."""

    def __enter__(self) -> str:
        import psycopg

        from ingestor.store import timescale
        from ingestor.store.migrate import migrate

        dsn = super().__enter__()
        with psycopg.connect(dsn, autocommit=True) as c:
            migrate(c)
            timescale.setup(c, "auto")
        return dsn


def empty_tables(dsn: str) -> None:
    """What a run writes, emptied for the next one."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("TRUNCATE tick_data, ohlc_candles, order_book_snapshots, stream_offsets, "
                  "feed_gaps, engine_state")


def recorded(record: str, broker: str = "kite") -> dict:
    """The decoder's counters over a simulator's recording (``packets``: ticks sent)."""
    from ingestor._core import KiteDecoder, SmartStreamDecoder
    from ingestor.pipeline.batch import decode_capture

    dec = KiteDecoder() if broker == "kite" else SmartStreamDecoder()
    for _ in decode_capture(record, dec):
        pass
    return dec.stats()


def stored(dsn: str) -> tuple[int, float]:
    """Ticks in ``tick_data`` and the seconds between the first and the last."""
    import psycopg

    with psycopg.connect(dsn) as c:
        got, first, last = c.execute(
            "select count(*), min(time), max(time) from tick_data").fetchone()
    return got, (last - first).total_seconds() if got else 0.0


def latency_ms(text: str) -> dict:
    """p50 and p99 tick-to-commit (ms) from a scrape of ``/metrics``."""
    return {f"p{q} tick->commit ms":
            (_quantile(text, "ingestor_tick_to_commit_seconds", q / 100) or 0) * 1000
            for q in (50, 99)}


#: the credentials the benchmarks' feeds read (the simulators take any)
BENCH_ENV = {"KITE_API_KEY": "bench", "KITE_ACCESS_TOKEN": "bench", "ANGEL_API_KEY": "bench",
             "ANGEL_CLIENT_CODE": "bench", "ANGEL_JWT": "bench", "ANGEL_FEED_TOKEN": "bench"}


def start_simulator(dsn: str, rate: int, seconds: float, tokens: int, record: str, tmp: str,
                    broker: str = "kite"):
    """The broker's simulator on a free loopback port for ``seconds`` (and a minute more),
    recording what it sends in ``record``, its instruments loaded into ``dsn`` (Kite's CSV
    dump, Angel One's scrip master): ``(process, url)``."""
    listing = os.path.join(tmp, "instruments.csv" if broker == "kite"
                           else "OpenAPIScripMaster.json")
    sim_args = ["simulate", "--listen", "127.0.0.1:0", "--tokens", str(tokens), "--rate",
                str(rate), "--duration", str(seconds + 60), "--record", record]
    sim_args += (["--instruments-csv", listing] if broker == "kite"
                 else ["--broker", "angel", "--scrip-master", listing])
    sim = subprocess.Popen(_ingestor(*sim_args), stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    url = sim.stdout.readline().split()[-1]
    subprocess.run(_ingestor("instruments", "load", listing, "--dsn", dsn), check=True,
                   capture_output=True)
    return sim, url


def angel_feeds_toml(url: str) -> str:
    """An Angel One feed on the simulator at ``url``: every instrument of the master in
    SNAP_QUOTE (the 5-level book), credentials from ``BENCH_ENV``."""
    return (f'[[feeds]]\nname = "angel"\nbroker = "angel"\nurl = "{url}"\n'
            'mode = "full"\napi_key_env = "ANGEL_API_KEY"\n'
            'client_code_env = "ANGEL_CLIENT_CODE"\naccess_token_env = "ANGEL_JWT"\n'
            'feed_token_env = "ANGEL_FEED_TOKEN"\n')


def run_rate(dsn: str, rate: int, seconds: float, tokens: int, tmp: str,
             flush_interval: float | None = None, overlap: bool = True,
             broker: str = "kite") -> dict:
    empty_tables(dsn)
    record = os.path.join(tmp, f"sim-{broker}-{rate}.cap")
    sim, url = start_simulator(dsn, rate, seconds, tokens, record, tmp, broker)
    port = _free_port()
    env = dict(os.environ, **BENCH_ENV)
    args = ["run", "--dsn", dsn, "--metrics", f"127.0.0.1:{port}",
            "--spool-dir", os.path.join(tmp, f"spool-{broker}-{rate}")]
    settings = ""
    if broker == "kite":
        args += ["--url", url, "--mode", "full"]
    else:
        settings += angel_feeds_toml(url)
    if flush_interval is not None:
        settings += f"[pipeline]\nflush_interval = {flush_interval}\n"
    if not overlap:
        settings += "[writer]\noverlap = false\n"
    if settings:
        cfg = os.path.join(tmp, f"live-{rate}.toml")
        with open(cfg, "w") as f:
            f.write(settings)
        args += ["--config", cfg]
    daemon = subprocess.Popen(_ingestor(*args), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(2.0)
        rss0 = _rss_mib(daemon.pid)
        cpu0 = _cpu_seconds(daemon.pid)
        t0 = time.monotonic()
        written0 = committed(port)
        # RSS sampled through the run (a soak: is it flat once warm?)
        samples = [(0.0, rss0)]
        while (left := seconds - (time.monotonic() - t0)) > 0:
            time.sleep(min(5.0, left))
            samples.append((time.monotonic() - t0, _rss_mib(daemon.pid)))
        rss1 = samples[-1][1]
        if seconds >= 60:  # a soak: the series itself, one line
            print(f"{broker} {rate:,}/s RSS MiB every 5 s: "
                  + " ".join(f"{r:.0f}" for _, r in samples), file=sys.stderr)
        cpu1 = _cpu_seconds(daemon.pid)
        text = _metrics(port)
        wall = time.monotonic() - t0
        written1 = _counter(text, "ingestor_ticks_written_total") or 0.0
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=30)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
    finally:
        for p in (sim, daemon):
            if p.poll() is None:
                p.kill()
    stats = recorded(record, broker)
    sent = stats["packets"]
    # WebSocket messages carrying data (Kite: many packets a message; Angel One: one)
    messages = stats["messages"] - stats.get("heartbeats", 0)
    got, span = stored(dsn)
    written, packed = _tick_bytes(dsn)
    decoded = _counter(text, "ingestor_ticks_decoded_total") or 0
    return {
        "broker": broker,
        "writer": "two connections" if overlap else "one connection",
        "offered ticks/s": rate,
        "delivered ticks/s": sent / span if span else 0.0,
        "messages/s": messages / span if span else 0.0,
        "ingested ticks/s": got / span if span else 0.0,
        # what the database took per second while the feed was live (the window after the
        # first 2 s): below the offered rate when the writer falls behind, whatever the
        # spool absorbs meanwhile
        "committed ticks/s": (written1 - written0) / wall,
        "sent": sent,
        "in tick_data": got,
        "lost": sent - got,
        **latency_ms(text),
        "rows via columnstore": _labelled(text, "ingestor_tick_copy_rows_total", "columnstore"),
        "max loop lag ms": (_gauge(text, "ingestor_loop_lag_max_seconds") or 0) * 1000,
        "tick_data B/tick as written": written / got if got else 0.0,
        "B/tick compressed": packed / got if got else 0.0,
        "RSS start MiB": rss0,
        "RSS end MiB": rss1,
        "RSS max MiB": max(r for _, r in samples),
        # growth over the second half (least squares): a leak shows as a steady slope
        "RSS MiB/min, 2nd half": _slope(samples[len(samples) // 2:]) * 60,
        # the daemon's CPU over the measured window, per million ticks it decoded then
        "daemon CPU s / M ticks": (cpu1 - cpu0) / max(decoded * wall / max(span, wall), 1) * 1e6
        if decoded else float("nan"),
    }


def run(quick: bool = False, rates=None, seconds: float | None = None, tokens: int = 500,
        flush_interval: float | None = None, overlaps=(True,), brokers=("kite",)) -> list[dict]:
    rates = rates or ([5_000] if quick else [25_000, 50_000, 100_000, 150_000])
    seconds = seconds or (4 if quick else 30)
    rows = []
    with laid_out_database() as dsn:
        with tempfile.TemporaryDirectory() as tmp:
            for broker in brokers:
                for rate in rates:
                    for overlap in overlaps:
                        rows.append(run_rate(dsn, rate, seconds, tokens, tmp, flush_interval,
                                             overlap, broker))
    return rows


if __name__ == "__main__":
    argv = sys.argv
    rates = [int(x) for x in argv[argv.index("--rates") + 1].split(",")] if "--rates" in argv else None
    secs = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else None
    fi = float(argv[argv.index("--flush-interval") + 1]) if "--flush-interval" in argv else None
    # --compare-overlap: each rate with the writer's two connections and with one, side by side
    overlaps = (True, False) if "--compare-overlap" in argv else (True,)
    # --broker angel|kite,angel: Angel One's SmartStream simulator and feed (one packet per
    # message) in place of, or beside, Kite's
    brokers = tuple(argv[argv.index("--broker") + 1].split(",")) if "--broker" in argv \
        else ("kite",)
    rows = run(quick="--quick" in argv, rates=rates, seconds=secs, flush_interval=fi,
               overlaps=overlaps, brokers=brokers)
    print(table(rows, TITLE))
    ok = [r["delivered ticks/s"] for r in rows
          if r["lost"] == 0 and r["p99 tick->commit ms"] < 500]
    if ok:
        print(f"highest delivered rate with 0 lost and p99 under 500 ms: {max(ok):,.0f} ticks/s")
