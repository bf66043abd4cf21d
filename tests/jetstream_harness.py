"""Helpers for the log's tests (``ingestor run --role feed|writer`` over NATS JetStream):
private ``nats-server`` processes (one, or a 3-node cluster) on free loopback ports in the
test's temporary folder, role processes, and the checks of what reached the database.

A test module uses the fixtures by importing them::

    from jetstream_harness import (NATS_SERVER, Role, _no_process_left,  # noqa: F401
                                   nats_server)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys

import psycopg
import pytest

from daemon_harness import (ingestor, load_instruments, recorded_prices, tick_summary,
                            wait_for)
from test_candles_sql import assert_candles_equal_sql  # noqa: F401 - the log tests' check
from ingestor import _core

NATS_SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """A private JetStream server (or a cluster node) on a free loopback port."""

    def __init__(self, tmp, name: str = "n1", port: int | None = None,
                 cluster_port: int | None = None, routes: list[int] = (), cluster: str = "",
                 config: str = ""):
        """``config``: lines of a server configuration file (``max_payload: 65536``)."""
        self.tmp, self.name, self.config = tmp, name, config
        self.port = port or free_port()
        self.cluster_port, self.routes, self.cluster = cluster_port, list(routes), cluster
        self.store = tmp / f"nats-{name}"
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd",
                str(self.store), "-n", self.name]
        if self.cluster_port:
            args += ["--cluster_name", self.cluster, "--cluster",
                     f"nats://127.0.0.1:{self.cluster_port}", "--routes",
                     ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        if self.config:
            conf = self.tmp / f"nats-{self.name}.conf"
            conf.write_text(self.config)
            args += ["-c", str(conf)]
        self.log = open(self.tmp / f"nats-{self.name}.log", "a")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._answers, timeout=30, what=f"nats-server {self.name} answering")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.log.close()


@pytest.fixture
def nats_server(tmp_path):
    s = NatsServer(tmp_path)
    yield s
    s.stop()


@pytest.fixture
def nats_cluster(tmp_path):
    """Three JetStream servers clustered on loopback ports."""
    ports = [free_port() for _ in range(3)]
    cports = [free_port() for _ in range(3)]
    nodes = [NatsServer(tmp_path, f"n{i + 1}", port=ports[i], cluster_port=cports[i],
                        routes=[p for j, p in enumerate(cports) if j != i], cluster="ingestor")
             for i in range(3)]
    yield nodes
    for n in nodes:
        n.stop()


class Role:
    """An ``ingestor run --role ...`` process with its own config, spool and log file."""

    #: every process started, killed at the test's end if still running (a failed test)
    started: list = []

    def __init__(self, tmp, role: str, dsn: str, url: str, servers: list[str], *,
                 name: str | None = None, log: str = "", feed: str = "",
                 lease: str = "lease_ttl = 6.0\nlease_renew = 1.0\n", args: tuple = (),
                 extra_env: dict | None = None, feeds: str | None = None, tables: str = ""):
        """``feeds``: ``[[feeds]]`` tables in place of the Kite ``[feed]`` on ``url``;
        ``tables``: more tables of the configuration."""
        self.name = name or role
        self.cfg = tmp / f"{self.name}.toml"
        servers_toml = ", ".join(f'"{s}"' for s in servers)
        head = feeds if feeds is not None else (
            f"[feed]\n{feed}url = \"{url}\"\nmode = \"full\"\nheartbeat_timeout = 2.0\n"
            "reconnect_min = 0.1\nreconnect_max = 0.5\n")
        self.cfg.write_text(
            head
            + "[pipeline]\nflush_interval = 0.2\nflush_rows = 5000\n"
            f"[spool]\ndir = \"{tmp / ('spool-' + self.name)}\"\n"
            f"[writer]\ndead_letter_dir = \"{tmp / 'dead'}\"\n"
            "[metrics]\nlisten = \"\"\n"
            f"{tables}"
            f"[log]\nservers = [{servers_toml}]\nstream = \"TEST\"\nduplicate_window = 120.0\n"
            f"max_feed_restart = 60.0\nack_timeout = 3.0\n{lease}{log}")
        self.logpath = tmp / f"{self.name}.log"
        self.out = open(self.logpath, "a")
        env = dict(os.environ, KITE_API_KEY="test-key", KITE_ACCESS_TOKEN="test-token-secret",
                   **(extra_env or {}))
        self.proc = subprocess.Popen(ingestor("run", "--role", role, "--config", str(self.cfg),
                                              "--dsn", dsn, *args), env=env, stdout=self.out,
                                     stderr=subprocess.STDOUT, text=True)
        Role.started.append(self.proc)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self.out.close()
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.out.close()

    def output(self) -> str:
        return self.logpath.read_text()


@pytest.fixture
def cpu_burner():
    """A process spinning on a core for the test's duration: the leases' TTLs must hold on a
    busy machine (no renewal missed, no spurious takeover)."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield p
    p.kill()
    p.wait()


@pytest.fixture(autouse=True)
def _no_process_left():
    yield
    while Role.started:
        p = Role.started.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


# -- the log's contents ------------------------------------------------------------------


async def _log_messages(urls, stream: str = "TEST") -> list:
    """Every message of the log's stream, in order (an ephemeral ordered read)."""
    import nats

    nc = await nats.connect(urls)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        total = info.state.messages
        sub = await js.pull_subscribe(">", stream=stream)
        out = []
        while len(out) < total:
            got = await sub.fetch(batch=1000, timeout=10)
            for m in got:  # acknowledged as read: the consumer's max_ack_pending (1000)
                await m.ack()
            out += got
        return out
    finally:
        await nc.close()


def log_messages(urls) -> list:
    """``urls``: a server's URL, or a cluster's list of them."""
    return asyncio.run(_log_messages(urls))


def wait_log_committed(urls, dsn: str, what: str, timeout: float = 90) -> dict[str, int]:
    """Wait until every capture stream's last message in the log is committed in
    ``stream_offsets``; returns each stream's last sequence number in the log."""
    from ingestor.feed.jetstream import decode_records

    last: dict[str, int] = {}
    for m in log_messages(urls):
        stream, first, n, _, _ = decode_records(m.headers, m.data)
        last[stream] = max(last.get(stream, -1), first + n - 1)

    def committed() -> bool:
        with psycopg.connect(dsn) as c:
            have = dict(c.execute("select stream, committed_seq from stream_offsets"))
        return all(have.get(s, -1) >= n for s, n in last.items())
    wait_for(committed, timeout=timeout, what=what)
    return last


def simulated_records(tmp, db: str, tokens: int, ticks: int, seed: int):
    """A simulator's capture of ``ticks`` ticks (its instruments loaded into ``db``):
    ``(capture path, its records)``, for tests that publish the log's messages themselves."""
    from ingestor.feed.capture import CaptureReader

    cap, csv = tmp / "market.cap", tmp / "instruments.csv"
    subprocess.run(ingestor("simulate", "--tokens", str(tokens), "--ticks", str(ticks),
                            "--seed", str(seed), "--out", str(cap), "--instruments-csv",
                            str(csv)), check=True, capture_output=True)
    load_instruments(db, str(csv))
    with CaptureReader(str(cap)) as rd:
        return cap, list(rd.records())


async def _publish_raw(url: str, subject: str, items) -> None:
    import nats

    from ingestor.config import LogConfig
    from ingestor.feed.jetstream import ensure_stream

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, LogConfig(servers=[url], stream="TEST", duplicate_window=120.0))
        for payload, headers in items:
            await js.publish(subject, payload, headers=headers)
    finally:
        await nc.close()


def log_records(msgs) -> dict[tuple[str, int], bytes]:
    """Each (capture stream, seq) the log's messages hold, once (a record can be in the log
    twice: a leftover republished), with its capture record; malformed messages left out."""
    from ingestor.feed.capture import RECORD_HEADER, iter_records
    from ingestor.feed.jetstream import MalformedMessage, decode_records

    out: dict[tuple[str, int], bytes] = {}
    for m in msgs:
        try:
            stream, first, _, _, records = decode_records(m.headers, m.data)
        except MalformedMessage:
            continue
        for k, (off, length, _, _) in enumerate(iter_records(records)):
            out.setdefault((stream, first + k), records[off - RECORD_HEADER.size:off + length])
    return out


def log_ticks(msgs) -> int:
    """Tick packets in the log's records, each record once (decoded as the writer decodes
    them)."""
    dec = _core.KiteDecoder(capacity=1 << 16)
    for (_, seq), rec in log_records(msgs).items():
        dec.feed_capture(rec, 0, seq)
        dec.clear()
    return dec.stats()["packets"]


async def _stream_info(urls, stream: str = "TEST"):
    import nats

    nc = await nats.connect(urls)
    try:
        return await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()


def last_seq(urls) -> int:
    return asyncio.run(_stream_info(urls)).state.last_seq


def stream_leader(urls) -> str:
    """The name of the cluster node that leads the log's stream."""
    return asyncio.run(_stream_info(urls)).cluster.leader


# -- what the database holds -------------------------------------------------------------



def sent_ticks(record: str) -> int:
    return sum(map(len, recorded_prices(record).values()))



def stored_prices(dsn: str) -> dict[int, list]:
    """Per token, the stored prices in time order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("select i.instrument_token, t.price from tick_data t join "
                            "instruments i on i.id = t.instrument_id "
                            "order by i.instrument_token, t.time").fetchall()
    got: dict[int, list] = {}
    for tok, price in rows:
        got.setdefault(tok, []).append(price)
    return got


def assert_every_tick_once(dsn: str, record: str) -> int:
    """Every tick the simulator recorded is in tick_data exactly once, in order, and the
    candles equal SQL over the ticks."""
    from decimal import Decimal

    rec = recorded_prices(record)
    got = stored_prices(dsn)
    assert sum(map(len, rec.values())) == sum(map(len, got.values()))
    for tok, prices in rec.items():
        assert got[tok] == [Decimal(p) / d for p, d in prices], tok
    n, distinct = tick_summary(dsn)
    assert n == distinct
    with psycopg.connect(dsn) as conn:
        assert_candles_equal_sql(conn, ("1s", "1m"))
    return n


def ns(t: dt.datetime) -> int:
    return (t - EPOCH) // dt.timedelta(microseconds=1) * 1000


def takeover_gaps(dsn: str) -> list[tuple]:
    """The ``feed_gaps`` rows a standby feed recorded when it took a connection over:
    (connection, stream, started_at, ended_at, tokens), by connection."""
    with psycopg.connect(dsn) as c:
        return c.execute("select connection, stream, started_at, ended_at, tokens from "
                         "feed_gaps where reason like '%standby took over%' "
                         "order by connection, started_at").fetchall()


def assert_every_tick_outside_once(dsn: str, record: str, gaps: dict[int, tuple]) -> int:
    """Per instrument, the stored prices in time order begin with every tick the simulator
    sent before its gap's start and end with every tick it sent after its gap's end (``gaps``:
    token -> (lo, hi) ns; a token without one: every tick), in its order; the ones sent within
    the gap are stored at most once (nothing else is stored).  Returns the ticks outside."""
    from decimal import Decimal

    from ingestor.feed.capture import RECORD_HEADER, CaptureReader

    sent: dict[int, list] = {}
    dec = _core.KiteDecoder(capacity=1 << 16)
    with CaptureReader(record) as rd:
        for r in rd.records():
            if r.kind != 1:
                continue
            dec.feed_capture(RECORD_HEADER.pack(r.recv_ns, r.kind, len(r.payload)) + r.payload,
                             0, r.seq)
            t = dec.ticks[:dec.n_ticks]
            for tok, p, d in zip(t["instrument_token"].tolist(), t["last_price"].tolist(),
                                 t["divisor"].tolist()):
                sent.setdefault(tok, []).append((Decimal(p) / d, r.recv_ns))
            dec.clear()
    got = stored_prices(dsn)
    assert set(got) <= set(sent)
    outside = 0
    for tok, ticks in sent.items():
        prices = [p for p, _ in ticks]
        have = got.get(tok, [])
        if tok not in gaps:
            assert have == prices, tok
            outside += len(prices)
            continue
        lo, hi = gaps[tok]
        before = sum(1 for _, t in ticks if t < lo)
        after = sum(1 for _, t in ticks if t > hi)
        assert have[:before] == prices[:before], tok
        assert after == 0 or have[-after:] == prices[-after:], tok
        assert before + after <= len(have) <= len(prices), tok
        outside += before + after
    assert outside > 0
    return outside
