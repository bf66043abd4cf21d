"""A hostile feed server (a few lines of ``websockets``): inputs that must not stop ingestion."""

from __future__ import annotations

import asyncio
import re
import struct
import threading
import urllib.request

import psycopg
from daemon_harness import Daemon, count_ticks, free_port, wait_for


TOKEN = 408065


def metric(port: int, series: str) -> float:
    """One series' value from the daemon's /metrics (-1 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else -1.0


def ltp_message(token: int, price: int) -> bytes:
    return struct.pack(">HHII", 1, 8, token, price)


class HostileServer:
    """Serves Kite-framed messages; ``first`` is sent first on every ``bad_connections``-th
    connection, then valid LTP packets every 20 ms.  Counts the valid packets it sent."""

    def __init__(self, first: bytes, bad_connections: int = 1, refused: bool = False):
        self.first = first
        self.bad_connections = bad_connections
        # refused: the client drops a connection on ``first`` (a message over its size
        # limit), so what is sent after it on that connection is never received: send
        # nothing more there and wait for the client to close it.
        self.refused = refused
        self.connections = 0
        self.active = 0
        self.sent = 0
        self.stop = threading.Event()
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self._ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self._ready.wait(10)

    async def _main(self) -> None:
        from websockets.asyncio.server import serve

        async def handler(ws):
            self.connections += 1
            self.active += 1
            try:
                if self.connections <= self.bad_connections:
                    await ws.send(self.first)
                    if self.refused:
                        await ws.wait_closed()
                        return
                price = 10_000
                while not self.stop.is_set():
                    await ws.send(ltp_message(TOKEN, price))
                    self.sent += 1
                    price += 5
                    await asyncio.sleep(0.02)
                await ws.close()  # after the client's close frame: it received all before it
            finally:
                self.active -= 1

        async with serve(handler, "127.0.0.1", self.port, max_size=None):
            self._ready.set()
            while not self.stop.is_set():
                await asyncio.sleep(0.05)

    def finish(self) -> None:
        """Stop sending; return once every connection is closed (all sent was received)."""
        self.stop.set()
        wait_for(lambda: self.active == 0, timeout=30)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def test_oversized_message_is_refused_counted_and_the_rest_flows(tmp_path, db):
    """One message over the size limit (the client had none: a 256 MiB message was spooled,
    then killed every start): refused, counted, the connection reopened, the rest ingested."""
    port = free_port()
    srv = HostileServer(b"\x00" * (17 << 20), refused=True)
    try:
        d = Daemon(tmp_path, db, srv.url, feed=f"tokens = [{TOKEN}]\n", metrics_port=port)
        wait_for(lambda: count_ticks(db) > 20, timeout=60)
        assert d.proc.poll() is None, d.output()

        wait_for(lambda: metric(port, 'ingestor_feed_oversized_messages_total'
                                      '{connection="kite-0"}') >= 1, timeout=30)
        srv.finish()
        assert d.terminate() == 0, d.output()
    finally:
        srv.close()
    out = d.output()
    assert "over 16777216 bytes" in out, out
    assert srv.connections >= 2
    with psycopg.connect(db) as c:
        n, distinct = c.execute("select count(*), count(distinct time) from tick_data").fetchone()
    assert n == distinct == srv.sent


def test_token_zero_is_counted_and_skipped(tmp_path, db):
    """A packet with instrument_token 0 (message 0001 0008 00000000 00002710): registration
    refused it and was retried forever, tick_data stopped while /healthz said 200, and every
    restart failed the same way.  Now it is counted per packet and the rest flows."""
    port = free_port()
    srv = HostileServer(bytes.fromhex("0001000800000000" "00002710"), bad_connections=3)
    try:
        d = Daemon(tmp_path, db, srv.url, feed=f"tokens = [{TOKEN}]\n", metrics_port=port)
        wait_for(lambda: count_ticks(db) > 20, timeout=60)

        wait_for(lambda: metric(port, 'ingestor_malformed_messages_total{reason="bad_token"}')
                 >= 1, timeout=30)
        srv.finish()
        assert d.terminate() == 0, d.output()
    finally:
        srv.close()
    with psycopg.connect(db) as c:
        n, distinct = c.execute("select count(*), count(distinct time) from tick_data").fetchone()
        placeholders = c.execute("select count(*) from instruments where instrument_token = 0"
                                 ).fetchone()[0]
    assert n == distinct == srv.sent
    assert placeholders == 0


def test_replay_of_a_capture_with_token_zero(tmp_path, db):
    import subprocess
    import sys

    from ingestor.feed.capture import CaptureHeader, CaptureWriter

    path = tmp_path / "zero.cap"
    with CaptureWriter(path, CaptureHeader(stream="zero-token", first_seq=0)) as w:
        w.write(ltp_message(TOKEN, 10_000), 1, 1_700_000_000_000_000_000)
        w.write(bytes.fromhex("0002" "0008" "00000000" "00002710" "0008") +
                struct.pack(">II", TOKEN, 10_005), 1, 1_700_000_000_100_000_000)
        w.write(ltp_message(TOKEN, 10_010), 1, 1_700_000_000_200_000_000)
    for _ in range(2):  # and again: exactly once, no failure on the second pass either
        r = subprocess.run([sys.executable, "-m", "ingestor", "replay", str(path), "--dsn", db],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert "1 packet(s) with instrument token 0" in r.stdout or "skipped" in r.stdout
    assert count_ticks(db) == 3


def test_a_bad_registry_row_never_stops_the_engine(tmp_path, db):
    """Issue 15, item 4: a row of ``instruments`` with a token the engine cannot key (2^32 and
    over; written by hand or an older version: every entry point refuses it now) made every
    ``run`` and ``replay`` exit 1 (``OverflowError ... uint32``).  It is left out, said once,
    and the replay writes every tick."""
    import subprocess
    import sys

    from ingestor.feed.capture import CaptureHeader, CaptureWriter

    with psycopg.connect(db, autocommit=True) as c:
        c.execute("insert into instruments (instrument_token, exchange, symbol) "
                  "values (%s, 'NSE', 'BAD-ROW')", (2**32 + 5,))
    path = tmp_path / "ok.cap"
    with CaptureWriter(path, CaptureHeader(stream="bad-registry-row", first_seq=0)) as w:
        for k in range(3):
            w.write(ltp_message(TOKEN, 10_000 + k), 1, 1_700_000_000_000_000_000 + k * 10**8)
    r = subprocess.run([sys.executable, "-m", "ingestor", "replay", str(path), "--dsn", db],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cannot key" in r.stderr
    assert count_ticks(db) == 3


def test_replay_of_a_capture_holding_a_deeply_nested_postback(tmp_path, db):
    """Issue 15, item 2, through a capture: the postback nested 1000 levels deep is a dead
    letter, the ticks around it are written, and a second replay writes nothing twice."""
    import subprocess
    import sys

    from ingestor.feed.capture import CaptureHeader, CaptureWriter

    deep = "[" * 1000 + "]" * 1000
    postback = ('{"type": "order", "data": {"order_id": "n1", "status": "OPEN", "zz": '
                + deep + "}}").encode()
    path = tmp_path / "deep.cap"
    with CaptureWriter(path, CaptureHeader(stream="deep-postback", first_seq=0)) as w:
        w.write(ltp_message(TOKEN, 10_000), 1, 1_700_000_000_000_000_000)
        w.write(postback, 2, 1_700_000_000_100_000_000)
        w.write(ltp_message(TOKEN, 10_010), 1, 1_700_000_000_200_000_000)
    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "ingestor", "replay", str(path), "--dsn", db],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert count_ticks(db) == 2
    with psycopg.connect(db) as c:
        letters = c.execute("select count(*) from postback_dead_letters").fetchone()[0]
    assert letters == 1
