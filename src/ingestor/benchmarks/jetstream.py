"""The log: simulator -> feed -> NATS JetStream -> writer -> PostgreSQL, beside the
single-process daemon (simulator -> daemon with its local spool -> PostgreSQL), same rates,
same machine, same run.

For each offered rate and each layout (embedded daemon; JetStream with 1 node; JetStream
with 3 clustered nodes and 3 replicas): ticks ingested per second (stored over the span of
their receive times), ticks committed per second while the feed was live (what the database
took: below the offered rate when the writer falls behind), ticks lost (every packet
the simulator recorded must be in ``tick_data`` after the graceful stops), p50/p99
tick-to-commit (the writer's histogram: the receive time travels with each message, so it
spans feed, log and writer), and the largest consumer lag the writer saw.

Everything shares this machine (2 cores here): the simulator, the feed, one or three
``nats-server`` processes, the writer and PostgreSQL.  On separate machines the feed's and
the writer's CPU would not compete (the log then costs a network round trip per publish
window, not CPU), so this understates what the log allows.

Run: ``python -m ingestor.benchmarks.jetstream [--quick] [--seconds S] [--rates 5000,20000]
[--layouts embedded,js1,js3] [--broker kite|angel]`` (``angel``: Angel One's SmartStream
simulator and feed, one packet per WebSocket frame); ``--find-max [--start R] [--rounds N]``
instead searches each layout's highest offered rate committed without loss and without
falling behind (doubling from R, default 5000, then two bisections; default layouts
embedded,js1) and prints them side by side with each one's peak loss-free committed rate
and the log's share of the daemon's (bar: js1 >= 0.8 of embedded); ``--rounds N`` does
that N times, the layouts' order alternating, and adds the medians (one run's figures
move by a tenth or more on a shared machine); needs the ``nats-server`` binary; the
database server is ``INGESTOR_BENCH_DSN`` (default host=127.0.0.1 user=postgres); the
benchmark creates and drops its own database; ``INGESTOR_BENCH_LOGS=DIR`` keeps the feed's
and writer's logs there.  Not run by the tests.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from ingestor.benchmarks.common import table
from ingestor.benchmarks.live import (BENCH_ENV, _counter, _free_port, _ingestor, _metrics,
                                      angel_feeds_toml, committed, empty_tables,
                                      laid_out_database, latency_ms, recorded,
                                      start_simulator, stored)
from ingestor.benchmarks.live import run_rate as run_embedded

TITLE = ("log: simulator -> feed -> JetStream -> writer -> PostgreSQL vs the single-process "
         "daemon (all on this machine)")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(4).startswith(b"INFO")
    except OSError:
        return False


def start_nats(tmp: str, nodes: int, tag: str) -> tuple[list[subprocess.Popen], list[str]]:
    """``nodes`` JetStream servers on free loopback ports (clustered when more than one)."""
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    ports = [_free_port() for _ in range(nodes)]
    cports = [_free_port() for _ in range(nodes)]
    procs = []
    for i in range(nodes):
        args = [binary, "-js", "-a", "127.0.0.1", "-p", str(ports[i]), "-n", f"b{i}",
                "-sd", os.path.join(tmp, f"nats-{tag}-{i}")]
        if nodes > 1:
            args += ["--cluster_name", "bench", "--cluster", f"nats://127.0.0.1:{cports[i]}",
                     "--routes", ",".join(f"nats://127.0.0.1:{p}"
                                          for j, p in enumerate(cports) if j != i)]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    end = time.monotonic() + 30
    while not all(_answers(p) for p in ports):
        if time.monotonic() > end:
            raise RuntimeError("nats-server did not start")
        time.sleep(0.1)
    return procs, [f"nats://127.0.0.1:{p}" for p in ports]


def _out(name: str):
    """Where a process's log goes: ``INGESTOR_BENCH_LOGS``/<name>.log, else nowhere."""
    d = os.environ.get("INGESTOR_BENCH_LOGS")
    return open(os.path.join(d, f"{name}.log"), "w") if d else subprocess.DEVNULL


def _max_labelled(text: str, name: str) -> float:
    vals = [float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)]
    return max(vals) if vals else 0.0


def run_log(dsn: str, rate: int, seconds: float, tokens: int, tmp: str, nodes: int,
            broker: str = "kite") -> dict:
    empty_tables(dsn)
    nats, urls = start_nats(tmp, nodes, f"{nodes}-{rate}")
    record = os.path.join(tmp, f"sim-js{nodes}-{broker}-{rate}.cap")
    sim, url = start_simulator(dsn, rate, seconds, tokens, record, tmp, broker)
    env = dict(os.environ, **BENCH_ENV)
    feeds = (f"[feed]\nurl = \"{url}\"\nmode = \"full\"\n" if broker == "kite"
             else angel_feeds_toml(url))
    procs, ports = {}, {}
    stream = f"BENCH{nodes}_{rate}"
    for role in ("feed", "writer"):
        ports[role] = _free_port()
        cfg = os.path.join(tmp, f"{role}-{nodes}-{rate}.toml")
        with open(cfg, "w") as f:
            f.write(feeds +
                    f"[spool]\ndir = \"{os.path.join(tmp, f'spool-{role}-{nodes}-{rate}')}\"\n"
                    f"[metrics]\nlisten = \"127.0.0.1:{ports[role]}\"\n"
                    "[log]\nservers = [" + ", ".join(f'"{u}"' for u in urls) + "]\n"
                    f"stream = \"{stream}\"\nreplicas = {nodes}\n"
                    # a replicated lease bucket elects for up to ~9 s (checked at load)
                    + ("lease_ttl = 15.0\nlease_renew = 2.5\n" if nodes > 1 else ""))
        procs[role] = subprocess.Popen(_ingestor("run", "--role", role, "--config", cfg,
                                                 "--dsn", dsn), env=env,
                                       stdout=_out(f"{role}-{nodes}-{rate}"),
                                       stderr=subprocess.STDOUT)
    lag = 0.0
    try:
        time.sleep(2.0)
        for role, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"the {role} process exited ({p.returncode}) at its start: "
                                   "INGESTOR_BENCH_LOGS=DIR keeps its log")
        t0 = time.monotonic()
        written0 = committed(ports["writer"])
        end = t0 + seconds
        while time.monotonic() < end:  # the consumer lag, sampled once a second
            time.sleep(1.0)
            try:
                lag = max(lag, _max_labelled(_metrics(ports["writer"]), "ingestor_log_pending"))
            except OSError:
                pass
        window = (committed(ports["writer"]) - written0) / (time.monotonic() - t0)
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=30)
        procs["feed"].send_signal(signal.SIGTERM)
        procs["feed"].wait(timeout=120)
        # the writer has everything once it committed every logged message (its lag back
        # at 0, as the daemon writes all it received before it exits): its last metrics,
        # then the graceful stop
        deadline, last = time.monotonic() + 120, -1.0
        while True:
            time.sleep(1.0)
            text = _metrics(ports["writer"])
            done = _counter(text, "ingestor_ticks_written_total") or 0.0
            if (done == last and not _max_labelled(text, "ingestor_log_pending")
                    or time.monotonic() > deadline):
                break
            last = done
        procs["writer"].send_signal(signal.SIGTERM)
        procs["writer"].wait(timeout=120)
    finally:
        for p in (sim, *procs.values(), *nats):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    sent = recorded(record, broker)["packets"]
    got, span = stored(dsn)
    return {
        "offered ticks/s": rate,
        "ingested ticks/s": got / span if span else 0.0,
        "committed ticks/s": window,
        "sent": sent,
        "in tick_data": got,
        "lost": sent - got,
        **latency_ms(text),
        "max consumer lag msgs": lag,
    }


def run(quick: bool = False, rates=None, seconds: float | None = None, tokens: int = 500,
        layouts=("embedded", "js1", "js3"), broker: str = "kite") -> list[dict]:
    rates = rates or ([5_000] if quick else [10_000, 25_000, 50_000])
    seconds = seconds or (5 if quick else 20)
    rows = []
    with laid_out_database() as dsn:
        with tempfile.TemporaryDirectory() as tmp:
            for rate in rates:
                for layout in layouts:
                    rows.append(_one(dsn, layout, rate, seconds, tokens, tmp, broker))
    return rows


def _one(dsn: str, layout: str, rate: int, seconds: float, tokens: int, tmp: str,
         broker: str = "kite") -> dict:
    if layout == "embedded":
        r = run_embedded(dsn, rate, seconds, tokens, tmp, broker=broker)
        r = {k: r[k] for k in ("offered ticks/s", "ingested ticks/s", "committed ticks/s",
                               "sent", "in tick_data", "lost", "p50 tick->commit ms",
                               "p99 tick->commit ms")}
        r["max consumer lag msgs"] = float("nan")
    else:
        r = run_log(dsn, rate, seconds, tokens, tmp, nodes=int(layout[2:]), broker=broker)
    return {"layout": layout, **r}


def _kept_up(r: dict) -> bool:
    """Loss-free, and committing what was offered while the feed was live (the spool or the
    log absorbs what a path cannot take, so past its limit a run loses nothing but its
    commits fall behind the offered rate; so do they when the simulator, starved of CPU,
    sends less than offered)."""
    return not r["lost"] and r["committed ticks/s"] >= 0.95 * r["offered ticks/s"]


def _shares(kept: float | None, peak: float, base_kept: float | None, base_peak: float) -> str:
    """A layout's share of the daemon's peak and of its rate kept up with, as printed."""
    if not base_peak:
        return ""
    out = f"; {peak / base_peak:.2f} of embedded's peak"
    if kept and base_kept:
        out += f", {kept / base_kept:.2f} of its rate kept up with"
    return out


def find_max(layouts=("embedded", "js1"), seconds: float = 5.0, tokens: int = 500,
             start: int = 5_000, cap: int = 640_000, bisections: int = 2,
             broker: str = "kite"):
    """Each layout's highest rate kept up with (:func:`_kept_up`): doubled from ``start``
    until a run falls behind or loses ticks (or ``cap``), then ``bisections`` halvings of
    the interval.  Returns (rows, best: layout -> ((offered, committed) of its highest run
    kept up with or None, the highest loss-free committed rate of any of its runs))."""
    rows, best = [], {}
    with laid_out_database() as dsn:
        with tempfile.TemporaryDirectory() as tmp:
            for layout in layouts:
                ok, bad, rate = None, None, start
                while rate <= cap:
                    r = _one(dsn, layout, rate, seconds, tokens, tmp, broker)
                    rows.append(r)
                    if not _kept_up(r):
                        bad = rate
                        break
                    ok = (rate, r["committed ticks/s"])
                    rate *= 2
                for _ in range(bisections if ok and bad else 0):
                    rate = (ok[0] + bad) // 2
                    r = _one(dsn, layout, rate, seconds, tokens, tmp, broker)
                    rows.append(r)
                    if not _kept_up(r):
                        bad = rate
                    else:
                        ok = (rate, r["committed ticks/s"])
                # the highest rate committed without a loss, kept up with or not
                peak = max((x["committed ticks/s"] for x in rows
                            if x["layout"] == layout and not x["lost"]), default=0.0)
                best[layout] = (ok, peak)
    return rows, best


if __name__ == "__main__":
    argv = sys.argv
    broker = argv[argv.index("--broker") + 1] if "--broker" in argv else "kite"
    if broker not in ("kite", "angel"):
        sys.exit("--broker is kite or angel")
    if "--find-max" in argv:
        start = int(argv[argv.index("--start") + 1]) if "--start" in argv else 5_000
        secs = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else 5.0
        layouts = (argv[argv.index("--layouts") + 1].split(",") if "--layouts" in argv
                   else ("embedded", "js1"))
        rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 1
        peaks: dict[str, list] = {}
        for n in range(rounds):
            order = tuple(layouts) if n % 2 == 0 else tuple(reversed(layouts))
            rows, best = find_max(order, seconds=secs, start=start, broker=broker)
            print(table(rows, TITLE + f": highest loss-free rate (round {n + 1} of {rounds})"))
            base = best.get("embedded", (None, 0.0))
            for layout in layouts:
                ok, peak = best[layout]
                peaks.setdefault(layout, []).append((ok[1] if ok else 0.0, peak))
                kept = (f"kept up with up to {ok[0]:,} offered ({ok[1]:,.0f} committed)" if ok
                        else f"fell behind already at {start:,}/s")
                share = "" if layout == "embedded" else _shares(
                    ok and ok[1], peak, base[0] and base[0][1], base[1])
                print(f"{layout}: {kept}; peak loss-free {peak:,.0f} ticks/s committed{share}")
        if peaks:
            med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
                   for k, v in peaks.items()}
            for layout, (kept, peak) in med.items():
                line = (f"median of {rounds}: {layout} kept up with {kept:,.0f} committed, "
                        f"peak loss-free {peak:,.0f}")
                base_kept, base_peak = med.get("embedded", (0.0, 0.0))
                if layout != "embedded" and base_peak:
                    line += _shares(kept, peak, base_kept, base_peak)
                    if layout == "js1":
                        line += " (bar 0.8: " + ("met" if peak >= 0.8 * base_peak
                                                 else "NOT met") + ")"
                print(line)
        sys.exit(0)
    rates = [int(x) for x in argv[argv.index("--rates") + 1].split(",")] if "--rates" in argv else None
    secs = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else None
    layouts = (argv[argv.index("--layouts") + 1].split(",") if "--layouts" in argv
               else ("embedded", "js1", "js3"))
    rows = run(quick="--quick" in argv, rates=rates, seconds=secs, layouts=layouts,
               broker=broker)
    print(table(rows, TITLE))
    best = {}
    for r in rows:
        if r["lost"] == 0:
            best[r["layout"]] = max(best.get(r["layout"], 0.0), r["committed ticks/s"])
    for layout, v in best.items():
        share = f" ({v / best['embedded']:.2f} of embedded)" if best.get("embedded") else ""
        print(f"{layout}: highest loss-free committed rate {v:,.0f} ticks/s{share}")
