"""The bar of "no single input can stop or corrupt ingestion" (issue 15).

A hostile feed interleaves, among 100,000 valid ticks, one packet of each bad kind (token 0,
an unknown packet length, a packet running past its message, trailing bytes, an empty
message, a message over the size limit) and one postback of each bad kind (nested deep, an
over-long order_id, a token of 2^32, a year-1 timestamp, COMPLETE with nothing filled, a fill
without an average price, an average implying a negative fill, another side for a known
order).  The daemon keeps running, ``tick_data`` holds every valid tick exactly once, each
bad input is counted in a metric by its reason and each bad postback is in
``postback_dead_letters`` with its reason, ``/healthz`` reports them, SIGTERM exits 0, and a
restart over the same spool starts cleanly.
"""

from __future__ import annotations

import asyncio
import struct
import threading

import psycopg

from daemon_harness import Daemon, count_ticks, free_port, healthz, wait_for
from test_hostile_feed import metric
from test_hostile_orders import pb
from test_orders import HOSTILE

TOKENS = [408065 + 256 * k for k in range(40)]  # NSE equities (segment byte 1)
PACKETS = 50
MESSAGES = 2_000  # x PACKETS = 100,000 valid ticks


def _ltp(token: int, price: int) -> bytes:
    return struct.pack(">HII", 8, token, price)


def _message(i: int) -> bytes:
    return struct.pack(">H", PACKETS) + b"".join(
        _ltp(TOKENS[(i * PACKETS + k) % len(TOKENS)], 10_000 + i) for k in range(PACKETS))


#: bad binary messages: (message, valid ticks in it, the reason counted)
BAD_PACKETS = [
    (struct.pack(">H", 3) + _ltp(TOKENS[0], 1) + _ltp(0, 2) + _ltp(TOKENS[1], 3), 2, "bad_token"),
    (struct.pack(">H", 3) + _ltp(TOKENS[2], 4) + struct.pack(">H", 7) + bytes(7)
     + _ltp(TOKENS[3], 5), 2, "unknown_length"),
    (struct.pack(">H", 2) + _ltp(TOKENS[4], 6) + struct.pack(">H", 8) + bytes(4), 1, "truncated"),
    (struct.pack(">H", 1) + _ltp(TOKENS[5], 7) + b"\x01\x02\x03", 1, "trailing_bytes"),
    (b"", 0, "empty_message"),
]

BAD_POSTBACKS = {
    "nested": (HOSTILE["nested unknown key"], "invalid", "nested deeper"),
    "long order_id": (HOSTILE["long order_id"], "invalid", "length <= "),
    "token 2**32": (HOSTILE["token 2**32"], "invalid", "instrument_token"),
    "year 1": (HOSTILE["year 1"], "invalid", "not a plausible time"),
    "complete, nothing filled": (pb("c1", status="COMPLETE", t="09:30:00"), "invalid",
                                 "COMPLETE with filled_quantity 0"),
    "fill without average": (pb("c2", status="UPDATE", filled=4, t="09:30:00"), "invalid",
                             "average_price"),
    "average falling": (pb("k1", status="COMPLETE", filled=10, avg=1, t="09:31:00"),
                        "contradiction", "at -98"),
    "other side": (pb("k2", status="COMPLETE", filled=10, avg=100, side="SELL", t="09:31:00"),
                   "contradiction", "names side SELL"),
}
#: valid postbacks sent before the contradicting ones (the orders they contradict)
GOOD_POSTBACKS = [pb("k1", status="UPDATE", filled=5, avg=100, t="09:30:00"),
                  pb("k2", status="UPDATE", filled=5, avg=100, t="09:30:00"),
                  pb("ok", status="COMPLETE", filled=10, avg=100, t="09:30:00")]


class BarServer:
    """First connection: the valid messages with the bad ones interleaved, then one message
    over the client's size limit (the client drops the connection at it).  Second connection:
    the rest of the valid messages.  Later connections (a restart): heartbeats only."""

    def __init__(self):
        self.connections = 0
        self.valid_ticks = 0
        self.stop = threading.Event()
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.sent_all = threading.Event()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self._ready.wait(10)

    async def _main(self):
        from websockets.asyncio.server import serve

        bad_at = {100 + 150 * k: b for k, b in enumerate(BAD_PACKETS)}
        texts = GOOD_POSTBACKS + [m for m, _, _ in BAD_POSTBACKS.values()]
        text_at = {50 + 120 * k: t for k, t in enumerate(texts)}
        half = MESSAGES // 2

        async def send_range(ws, lo, hi):
            for i in range(lo, hi):
                await ws.send(_message(i))
                self.valid_ticks += PACKETS
                if i in bad_at:
                    msg, valid, _ = bad_at[i]
                    await ws.send(msg)
                    self.valid_ticks += valid
                if i in text_at:
                    await ws.send(text_at[i])
                if i % 25 == 0:
                    await asyncio.sleep(0.002)

        async def handler(ws):
            self.connections += 1
            n = self.connections
            if n == 1:
                await send_range(ws, 0, half)
                await ws.send(b"\x00" * (17 << 20))  # over the limit: the client drops it
                await ws.wait_closed()
                return
            if n == 2:
                await send_range(ws, half, MESSAGES)
                self.sent_all.set()
            from websockets.exceptions import ConnectionClosed

            try:
                while not self.stop.is_set():
                    await ws.send(b"\x00")  # heartbeats
                    await asyncio.sleep(0.3)
                await ws.close()
            except ConnectionClosed:
                pass

        async with serve(handler, "127.0.0.1", self.port, max_size=None):
            self._ready.set()
            while not self.stop.is_set():
                await asyncio.sleep(0.05)

    def close(self):
        self.stop.set()
        self.thread.join(10)


def test_bar_every_bad_input_set_aside_and_every_valid_tick_once(tmp_path, db):
    port = free_port()
    srv = BarServer()
    feed = f"tokens = {TOKENS}\n"
    try:
        d = Daemon(tmp_path, db, srv.url, feed=feed, metrics_port=port)
        assert srv.sent_all.wait(90), d.output()
        wait_for(lambda: count_ticks(db) >= srv.valid_ticks, timeout=60,
                 what=f"{srv.valid_ticks} valid ticks in tick_data")
        with psycopg.connect(db) as c:
            wait_for(lambda: c.execute("SELECT count(*) FROM postback_dead_letters"
                                       ).fetchone()[0] >= len(BAD_POSTBACKS), timeout=30,
                     what="the bad postbacks dead-lettered")
        assert d.proc.poll() is None, d.output()
        # each bad packet counted by its reason, the oversized message too
        for _, _, reason in BAD_PACKETS:
            assert metric(port, f'ingestor_malformed_messages_total{{reason="{reason}"}}') >= 1, \
                reason
        assert metric(port, 'ingestor_feed_oversized_messages_total{connection="kite-0"}') >= 1
        kinds = [k for _, k, _ in BAD_POSTBACKS.values()]
        for kind in ("invalid", "contradiction"):
            wait_for(lambda: metric(port, f'ingestor_postback_dead_letters_total{{kind="{kind}"}}')
                     == kinds.count(kind), timeout=10, what=f"{kind} postbacks counted")
        status, health = healthz(port)
        assert status == 503 and health["postback_dead_letters"] == len(BAD_POSTBACKS), health
        assert health["last_postback_dead_letter"]
        assert d.terminate() == 0, d.output()
    except BaseException:
        srv.close()
        raise
    with psycopg.connect(db) as c:
        n, distinct = c.execute("SELECT count(*), count(DISTINCT (instrument_id, time)) "
                                "FROM tick_data").fetchone()
        reasons = [r for (r,) in c.execute("SELECT reason FROM postback_dead_letters")]
        orders = {o for (o,) in c.execute("SELECT broker_order_id FROM orders")}
        fills = c.execute("SELECT o.broker_order_id, e.quantity, e.price FROM executions e "
                          "JOIN orders o ON o.id = e.order_id ORDER BY 1").fetchall()
    assert n == distinct == srv.valid_ticks
    assert len(reasons) == len(BAD_POSTBACKS)
    for name, (_, _, why) in BAD_POSTBACKS.items():
        assert sum(why in r for r in reasons) >= 1, (name, reasons)
    assert orders == {"k1", "k2", "ok"}
    assert [(o, q) for o, q, _ in fills] == [("k1", 5), ("k2", 5), ("ok", 10)]
    assert all(p > 0 for _, _, p in fills)

    # a restart over the same spool: starts cleanly, writes nothing twice
    try:
        d = Daemon(tmp_path, db, srv.url, feed=feed, metrics_port=port, name="restart")
        wait_for(lambda: _metric_or_none(port, 'ingestor_feed_connected{connection="kite-0"}')
                 == 1, timeout=60, what="the restarted daemon connected")
        status, health = healthz(port)
        assert health["failed"] is None and health["postback_dead_letters"] == 0, health
        assert d.proc.poll() is None, d.output()
        assert d.terminate() == 0, d.output()
    finally:
        srv.close()
    out = d.output()
    assert "Traceback" not in out and " failed" not in out, out
    with psycopg.connect(db) as c:
        assert c.execute("SELECT count(*) FROM tick_data").fetchone()[0] == srv.valid_ticks
        assert c.execute("SELECT count(*) FROM postback_dead_letters").fetchone()[0] == \
            len(BAD_POSTBACKS)


def _metric_or_none(port: int, series: str):
    try:
        return metric(port, series)
    except OSError:
        return None
