"""The log between feed and writer processes: simulator -> feed -> JetStream -> writer ->
PostgreSQL, with real servers (a private ``nats-server`` per test, on free loopback ports,
in the test's temporary folder), and the faults each process can meet."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys

import psycopg
import pytest

from daemon_harness import (ANGEL_ENV, AngelSimulator, Simulator, angel_feed_toml,
                            angel_modes_toml, angel_sent_ticks, angel_stored_ticks, count_ticks, ingestor,
                            load_angel_master, load_instruments, tick_summary, wait_for)
from ingestor import _core
from ingestor.pipeline.batch import decode_capture
from pg_private import private_pg, private_pg_running  # noqa: F401 - fixtures

NATS_SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)
pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="needs the nats-server binary")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """A private JetStream server (or a cluster node) on a free loopback port."""

    def __init__(self, tmp, name: str = "n1", port: int | None = None,
                 cluster_port: int | None = None, routes: list[int] = (), cluster: str = ""):
        self.tmp, self.name = tmp, name
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


class Role:
    """An ``ingestor run --role ...`` process with its own config, spool and log file."""

    #: every process started, killed at the test's end if still running (a failed test)
    started: list = []

    def __init__(self, tmp, role: str, dsn: str, url: str, servers: list[str], *,
                 name: str | None = None, log: str = "", feed: str = "",
                 lease: str = "lease_ttl = 6.0\nlease_renew = 1.0\n", args: tuple = (),
                 extra_env: dict | None = None, feeds: str | None = None):
        """``feeds``: ``[[feeds]]`` tables in place of the Kite ``[feed]`` on ``url``."""
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


def recorded_prices(record: str) -> dict[int, list]:
    """Per token, the recorded packets' prices (raw, divisor) in order."""
    out: dict[int, list] = {}
    dec = _core.KiteDecoder(capacity=1 << 16)
    for _ in decode_capture(record, dec):
        t = dec.ticks[:dec.n_ticks]
        for tok, p, d in zip(t["instrument_token"].tolist(), t["last_price"].tolist(),
                             t["divisor"].tolist()):
            out.setdefault(tok, []).append((p, d))
    return out


def assert_every_tick_once(dsn: str, record: str) -> int:
    """Every tick the simulator recorded is in tick_data exactly once, in order, and the
    candles equal SQL over the ticks."""
    from decimal import Decimal

    from test_candles_sql import CANDLES_SQL

    rec = recorded_prices(record)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("select i.instrument_token, t.price from tick_data t join "
                            "instruments i on i.id = t.instrument_id "
                            "order by i.instrument_token, t.time").fetchall()
        got: dict[int, list] = {}
        for tok, price in rows:
            got.setdefault(tok, []).append(price)
        assert sum(map(len, rec.values())) == len(rows)
        for tok, prices in rec.items():
            assert got[tok] == [Decimal(p) / d for p, d in prices], tok
        n, distinct = tick_summary(dsn)
        assert n == distinct
        for label in ("1s", "1m"):
            stride = f"{_core.timeframe_us(label)} microseconds"
            expected = conn.execute(CANDLES_SQL, {"stride": stride,
                                                  "origin": "1970-01-01 00:00:00+05:30"}).fetchall()
            stored = conn.execute(
                "select time, instrument_id, open_price, high_price, low_price, close_price, "
                "volume, trade_count, vwap, open_interest from ohlc_candles where timeframe = %s "
                "order by instrument_id, time", (label,)).fetchall()
            assert [tuple(r) for r in stored] == [tuple(r) for r in expected], label
    return len(rows)


def sent_ticks(record: str) -> int:
    return sum(map(len, recorded_prices(record).values()))


def test_feed_jetstream_writer_every_tick_once(tmp_path, db, nats_server):
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url])
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url])
    wait_for(lambda: count_ticks(db) > 3000, timeout=90, what="3000 ticks written")
    # messages on the subject that are not capture records: set aside, counted, not a stop
    asyncio.run(_publish_raw(nats_server.url, "ingestor.raw.kite-0", [
        (b"\x00\x01", None),
        (b"\x00\x01", {"Nats-Msg-Id": "kite-0-x:notanumber"}),
        (b"\x00\x01", {"Nats-Msg-Id": "s:1", "Ingestor-Recv-Ns": "1", "Ingestor-Kind": "9"})]))
    wait_for(lambda: writer.output().count("malformed message") == 3, timeout=30,
             what="three malformed messages set aside")
    sim.stop()
    sent = sent_ticks(sim.record)
    wait_for(lambda: count_ticks(db) >= sent, timeout=90, what=f"all {sent} sent ticks written")
    assert feed.terminate() == 0, feed.output()
    assert writer.terminate() == 0, writer.output()
    assert assert_every_tick_once(db, sim.record) == sent
    assert "test-token-secret" not in feed.output() + writer.output()


def test_angel_feed_jetstream_writer_every_tick_once(tmp_path, db, nats_server):
    """Angel One over the log: the feed appends each SmartStream frame (one packet each) as
    it came, the writer decodes them with the SmartStream decoder (the feed's broker)."""
    sim = AngelSimulator(tmp_path, tokens=30, rate=2000, seed=5)
    try:
        load_angel_master(db, sim.master)
        feeds = angel_feed_toml(sim.url, extra=angel_modes_toml(30, 5))
        feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url], feeds=feeds,
                    extra_env=ANGEL_ENV)
        writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url], feeds=feeds)
        wait_for(lambda: count_ticks(db) > 2000, timeout=90, what="2000 ticks written")
    finally:
        sim.stop()  # the recording is complete once the simulator has stopped
    want, n_depth = angel_sent_ticks(sim.sent(), db)
    sent = sum(want.values())
    wait_for(lambda: count_ticks(db) >= sent, timeout=90, what=f"all {sent} sent ticks written")
    assert feed.terminate() == 0, feed.output()
    assert writer.terminate() == 0, writer.output()
    assert angel_stored_ticks(db) == want        # every tick once, at its exact price
    n, distinct = tick_summary(db)
    assert n == distinct == sent and n_depth > 0
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM order_book_depth20").fetchone()[0] == n_depth
    assert "malformed" not in writer.output()
    out = feed.output() + writer.output()
    for secret in ANGEL_ENV.values():
        assert secret not in out


async def _log_messages(url: str, stream: str = "TEST") -> list:
    """Every message of the log's stream, in order (an ephemeral ordered read)."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        total = info.state.messages
        sub = await js.pull_subscribe(">", stream=stream)
        out = []
        while len(out) < total:
            out += await sub.fetch(batch=1000, timeout=10)
        for m in out:
            await m.ack()
        return out
    finally:
        await nc.close()


def log_messages(url: str) -> list:
    return asyncio.run(_log_messages(url))


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


def log_ticks(msgs) -> int:
    """Tick packets in the log's messages (decoded as the writer decodes them)."""
    from ingestor.feed.capture import RECORD_HEADER
    from ingestor.feed.jetstream import MalformedMessage, decode_message

    dec = _core.KiteDecoder(capacity=1 << 16)
    for m in msgs:
        try:
            _, seq, recv_ns, kind = decode_message(m.headers)
        except MalformedMessage:
            continue
        rec = RECORD_HEADER.pack(recv_ns, kind, len(m.data)) + m.data
        dec.feed_capture(rec, 0, seq)
        dec.clear()
    return dec.stats()["packets"]


def test_writer_killed_and_restarted_resumes_exactly_once(tmp_path, db, nats_server):
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url])
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url])
    wait_for(lambda: count_ticks(db) > 2000, timeout=90, what="2000 ticks written")
    writer.kill()  # SIGKILL: batches in flight, acknowledgements not sent
    at_kill = count_ticks(db)
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url])
    wait_for(lambda: count_ticks(db) > at_kill + 2000, timeout=90, what="the new writer writing")
    sim.stop()
    sent = sent_ticks(sim.record)
    wait_for(lambda: count_ticks(db) >= sent, timeout=90, what=f"all {sent} sent ticks written")
    assert feed.terminate() == 0, feed.output()
    assert writer.terminate() == 0, writer.output()
    assert assert_every_tick_once(db, sim.record) == sent


def test_feed_restarted_within_the_window_does_not_double(tmp_path, db, nats_server):
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url])
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url])
    wait_for(lambda: count_ticks(db) > 2000, timeout=90, what="2000 ticks written")
    feed.kill()  # its spool keeps the stream's segment: republished at the restart
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url])
    wait_for(lambda: "republished" in feed.output(), timeout=60, what="the leftover republished")
    before = count_ticks(db)
    wait_for(lambda: count_ticks(db) > before + 1000, timeout=90, what="the new stream written")
    sim.stop()
    assert feed.terminate() == 0, feed.output()
    msgs = log_messages(nats_server.url)
    ids = [m.headers["Nats-Msg-Id"] for m in msgs]
    assert len(ids) == len(set(ids))  # the republished leftover did not double the log
    line = next(x for x in feed.output().splitlines() if "republished" in x)
    assert "(0 message(s)" not in line, line  # the log did have them: dropped as duplicates
    in_log = log_ticks(msgs)
    wait_for(lambda: count_ticks(db) >= in_log, timeout=90, what=f"all {in_log} logged ticks")
    assert writer.terminate() == 0, writer.output()
    n, distinct = tick_summary(db)
    assert n == distinct == in_log


def test_jetstream_server_restart_loses_nothing(tmp_path, db, nats_server):
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    # the log is away longer than a short lease: a writer unable to renew stops (its own
    # test); here the outage is within the TTL, so the writer keeps its lease
    long = "lease_ttl = 60.0\nlease_renew = 2.0\n"
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url], lease=long)
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url], lease=long)
    wait_for(lambda: count_ticks(db) > 2000, timeout=90, what="2000 ticks written")
    nats_server.stop()
    wait_for(lambda: "not acknowledged" in feed.output(), timeout=60,
             what="the feed meeting the log's absence")
    nats_server.start()
    before = count_ticks(db)
    wait_for(lambda: count_ticks(db) > before + 2000, timeout=120, what="writing again")
    sim.stop()
    sent = sent_ticks(sim.record)
    wait_for(lambda: count_ticks(db) >= sent, timeout=120, what=f"all {sent} sent ticks written")
    assert feed.terminate() == 0, feed.output()
    assert writer.terminate() == 0, writer.output()
    assert assert_every_tick_once(db, sim.record) == sent


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


async def _last_seq(urls: list[str], stream: str = "TEST") -> int:
    import nats

    nc = await nats.connect(urls)
    try:
        return (await nc.jetstream().stream_info(stream)).state.last_seq
    finally:
        await nc.close()


def last_seq(urls: list[str]) -> int:
    return asyncio.run(_last_seq(urls))


@pytest.mark.slow
def test_three_replicas_survive_a_node_killed(tmp_path, private_pg_running, nats_cluster):
    """One NATS node killed and restarted, then the database crashed and restarted (a private
    cluster), mid-stream: every tick once, candles equal SQL over the ticks."""
    pg = private_pg_running
    db = pg.dsn()
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("truncate tick_data, ohlc_candles, order_book_snapshots, stream_offsets, "
                  "feed_gaps")
    urls = [n.url for n in nats_cluster]
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    long = "lease_ttl = 60.0\nlease_renew = 2.0\n"  # (a leader election within the TTL)
    feed = Role(tmp_path, "feed", db, sim.url, urls, log="replicas = 3\n", lease=long)
    writer = Role(tmp_path, "writer", db, sim.url, urls, log="replicas = 3\n", lease=long)
    wait_for(lambda: count_ticks(db) > 2000, timeout=120, what="2000 ticks written")
    victim = nats_cluster[0]
    victim.stop(signal.SIGKILL)  # a crashed node: the other two keep the stream's quorum
    before = count_ticks(db)
    wait_for(lambda: count_ticks(db) > before + 2000, timeout=120,
             what="writing on with a node down")
    victim.start()
    # the database crashes: the feed publishes on into the log, the writer waits for it
    at = count_ticks(db)
    pg.stop("immediate")
    at_crash = last_seq(urls)
    wait_for(lambda: last_seq(urls) > at_crash + 300, timeout=120,
             what="the log growing while the database is away")
    pg.start()
    wait_for(lambda: count_ticks(db) > at + 1000, timeout=120,
             what="writing again after the database's restart")
    sim.stop()
    sent = sent_ticks(sim.record)
    wait_for(lambda: count_ticks(db) >= sent, timeout=120, what=f"all {sent} sent ticks written")
    assert feed.terminate() == 0, feed.output()
    assert writer.terminate() == 0, writer.output()
    assert assert_every_tick_once(db, sim.record) == sent


def test_writer_puts_a_late_message_back_in_order(tmp_path, db, nats_server):
    """A publish sent again after the ones that followed it were stored lands after them
    (a server lost it, a leader moved): the writer waits for it and feeds the stream in
    sequence order."""
    from ingestor.feed.capture import CaptureReader
    from ingestor.feed.jetstream import encode_headers

    cap, csv = tmp_path / "market.cap", tmp_path / "instruments.csv"
    subprocess.run(ingestor("simulate", "--tokens", "10", "--ticks", "3000", "--seed", "5",
                            "--out", str(cap), "--instruments-csv", str(csv)), check=True,
                   capture_output=True)
    load_instruments(db, str(csv))
    with CaptureReader(str(cap)) as rd:
        recs = list(rd.records())
    assert len(recs) > 40
    stream = "kite-0-0123456789ab"
    order = [*range(0, 10), *range(11, 30), 10, *range(30, len(recs))]
    asyncio.run(_publish_raw(nats_server.url, "ingestor.raw.kite-0", [
        (recs[i].payload, encode_headers(stream, recs[i].seq, recs[i].recv_ns, recs[i].kind))
        for i in order]))
    writer = Role(tmp_path, "writer", db, "ws://127.0.0.1:9", [nats_server.url])
    sent = sent_ticks(str(cap))
    wait_for(lambda: count_ticks(db) >= sent, timeout=90, what=f"all {sent} ticks written")
    assert writer.terminate() == 0, writer.output()
    assert assert_every_tick_once(db, str(cap)) == sent
    with psycopg.connect(db) as c:
        assert c.execute("select committed_seq from stream_offsets where stream = %s",
                         (stream,)).fetchone()[0] == recs[-1].seq


async def _add_stream(url: str, **kw) -> None:
    import nats
    from nats.js.api import StreamConfig

    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(StreamConfig(**kw))
    finally:
        await nc.close()


@pytest.mark.parametrize("existing, said", [
    (dict(name="TEST", subjects=["ingestor.>"], duplicate_window=10.0), "duplicate_window"),
    (dict(name="OTHER", subjects=["ingestor.raw.>"]), "overlap"),
])
def test_a_stream_against_a_guarantee_stops_the_role_loudly(tmp_path, db, nats_server,
                                                            existing, said):
    asyncio.run(_add_stream(nats_server.url, **existing))
    writer = Role(tmp_path, "writer", db, "ws://127.0.0.1:9", [nats_server.url],
                  feed="tokens = [256265]\n")
    assert writer.proc.wait(timeout=60) == 1
    writer.out.close()
    assert said in writer.output()


def test_feed_spools_while_the_log_is_away(tmp_path, db, nats_server):
    """No log at the feed's start: it receives and spools meanwhile, and publishes it all,
    in order, once the server answers."""
    nats_server.stop()
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url])
    spool = tmp_path / "spool-feed"
    wait_for(lambda: sum(p.stat().st_size for p in spool.glob("*.cap")) > 200_000, timeout=60,
             what="the feed spooling without the log")
    nats_server.start()
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url])
    wait_for(lambda: count_ticks(db) > 2000, timeout=90, what="writing once the log is up")
    sim.stop()
    sent = sent_ticks(sim.record)
    wait_for(lambda: count_ticks(db) >= sent, timeout=90, what=f"all {sent} sent ticks written")
    assert feed.terminate() == 0, feed.output()
    assert writer.terminate() == 0, writer.output()
    assert assert_every_tick_once(db, sim.record) == sent
