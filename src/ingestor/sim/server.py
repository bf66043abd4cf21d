"""A live Kite Connect ticker server over a simulated market, with fault injection.

``SimServer`` speaks the broker's WebSocket protocol (broker-frames.md
section 1) closely enough for the daemon, its tests and the live benchmark:

* the handshake needs the URL query parameters ``api_key`` and
  ``access_token``; a missing one gets HTTP 403, as the broker answers an
  invalid session (section 1.1).  ``expected_token`` accepts only that
  token; the ``reject_token`` fault answers 403 to everyone (an expired
  token).  More than ``max_connections`` per API key (the broker's 3) get
  HTTP 429 (the broker's exact answer is not documented);
* client requests are JSON text: ``{"a":"subscribe","v":[tokens]}`` (mode
  ``quote``, what the official client assumes), ``unsubscribe`` and
  ``{"a":"mode","v":[mode,[tokens]]}`` (tokens not subscribed are ignored);
  anything else, and tokens beyond 3000 per connection (the documented
  limit), get a text ``{"type":"error","data":"..."}``;
* market data is binary messages of up to ``batch`` packets (a token may
  appear twice in one message when few are subscribed) for the subscribed
  tokens in their modes, drawn from one shared ``ingestor.sim.market.Market``
  at about ``rate`` packets/s in total, shared between connections in
  proportion to their subscriptions; tokens outside the universe get
  nothing, as at the broker;
* a 1-byte heartbeat after ``heartbeat_interval`` seconds without a binary
  message (section 1.2);
* order postbacks as text ``{"type":"order","data":{...}}`` at
  ``postbacks`` per second, from a pluggable ``PostbackSource`` (default
  ``OrderPostbacks``: well-formed postbacks with the official field set,
  section 1.8), sent to the oldest live connection (``postbacks_to="all"``:
  to every one).

Each connection has one writer task, so with ``record`` the capture holds
exactly what was handed to the sockets, every binary and text message to
every connection in send order, under one stream id, flushed every
``flush_interval`` seconds (a killed server leaves a usable file: the
reader drops a torn last record).  A connection dropped by the
``drop_every`` fault is aborted only once its socket buffer is handed to the
kernel, so what the capture holds is what the client receives.

Faults (``Faults``), per connection, timed from its handshake:
``drop_every`` aborts the TCP connection (no close frame) every S seconds
of a connection's life; ``stall_after`` / ``stall_for`` stop every send,
heartbeats included, and stop reading (so pings go unanswered) without
closing; ``malformed`` damages that fraction of data messages (truncated,
a bad packet length, trailing bytes, garbage), each of which the decoder
counts as malformed; ``reject_token`` as above.

Use it in-process (``async with SimServer(...) as srv``), in a thread
(``ThreadedSimServer``), or as ``ingestor simulate --listen HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as _dt
import hashlib
import importlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable, Sequence
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.protocol import State

from ingestor.sim.market import HEARTBEAT, MODES, Instrument, Market

__all__ = [
    "Faults",
    "MAX_CONNECTIONS",
    "MAX_TOKENS_PER_CONNECTION",
    "OrderPostbacks",
    "PostbackSource",
    "SimServer",
    "ThreadedSimServer",
    "damage",
    "load_postback_source",
]

log = logging.getLogger(__name__)

#: The broker's documented limits (Kite Connect v3 WebSocket docs).
MAX_TOKENS_PER_CONNECTION = 3000
MAX_CONNECTIONS = 3

#: Asked for ``n`` postbacks now, returns complete text messages to send
#: (usually ``n`` JSON strings ``{"type":"order","data":{...}}``; more or
#: fewer is fine, e.g. an order lifecycle emitting several updates).
PostbackSource = Callable[[int], Sequence[str]]

_IST = _dt.timezone(_dt.timedelta(hours=5, minutes=30))
_NS = 1_000_000_000


@dataclass
class Faults:
    """Faults to inject, per connection, timed from its handshake (seconds).

    Attributes
    ----------
    drop_every : float, optional
        Abort the connection (no close frame) after this long.
    stall_after : float, optional
        Stop sending anything (heartbeats too) and reading after this long.
    stall_for : float, optional
        Resume after stalling this long (default: stay stalled).
    malformed : float
        Fraction of data messages sent damaged (0 to 1).
    reject_token : bool
        Refuse every handshake with HTTP 403 (an expired access token).
    """

    drop_every: float | None = None
    stall_after: float | None = None
    stall_for: float | None = None
    malformed: float = 0.0
    reject_token: bool = False

    def validate(self) -> None:
        for name in ("drop_every", "stall_after", "stall_for"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive, not {v!r}")
        if not 0.0 <= self.malformed <= 1.0:
            raise ValueError(f"malformed must be a fraction in [0, 1], not {self.malformed!r}")
        if self.stall_for is not None and self.stall_after is None:
            raise ValueError("stall_for needs stall_after")


# ---------------------------------------------------------------- postbacks

#: The official sample's keys in order (broker-frames.md 1.8, postback.json).
POSTBACK_KEYS = (
    "user_id", "unfilled_quantity", "app_id", "checksum", "placed_by", "order_id",
    "exchange_order_id", "parent_order_id", "status", "status_message", "status_message_raw",
    "order_timestamp", "exchange_update_timestamp", "exchange_timestamp", "variety", "exchange",
    "tradingsymbol", "instrument_token", "order_type", "transaction_type", "validity",
    "product", "quantity", "disclosed_quantity", "price", "trigger_price", "average_price",
    "filled_quantity", "pending_quantity", "cancelled_quantity", "market_protection", "meta",
    "tag", "guid",
)


class OrderPostbacks:
    """A minimal built-in source of well-formed order postbacks.

    Each order emits ``OPEN`` then, on a later call, a final update:
    ``COMPLETE`` (mostly, filled at a price on its instrument's tick grid),
    ``CANCELLED`` or ``REJECTED``.  Keys are exactly the official sample's;
    ``checksum`` is SHA-256 hex of ``order_id + order_timestamp +
    api_secret`` as the postbacks page defines it; times are IST wall clock
    ``YYYY-MM-DD HH:MM:SS``.  A richer lifecycle generator can replace it
    (any ``PostbackSource``).

    Parameters
    ----------
    instruments : sequence of Instrument
        Orders are drawn on the tradable ones (not indices).
    seed : int
    api_secret : str
        The secret in the checksum.
    user_id : str
    """

    def __init__(self, instruments: Sequence[Instrument], seed: int = 0, *,
                 api_secret: str = "simulator-secret", user_id: str = "SIM001",
                 app_id: int = 1234):
        self.instruments = [i for i in instruments if not i.is_index] or list(instruments)
        self.rng = np.random.default_rng([seed, 0x0DE5])
        self.api_secret = api_secret
        self.user_id = user_id
        self.app_id = app_id
        self._next_id = 0
        self._open: collections.deque[dict] = collections.deque()

    def __call__(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            # Close an open order half the time (when there is one), else place one.
            if self._open and self.rng.random() < 0.5:
                out.append(self._text(self._finish(self._open.popleft())))
            else:
                order = self._place()
                self._open.append(order)
                out.append(self._text(order))
        return out

    @staticmethod
    def _now() -> str:
        return _dt.datetime.now(_IST).strftime("%Y-%m-%d %H:%M:%S")

    def _price(self, inst: Instrument, raw: int) -> float | int:
        v = raw / inst.divisor
        return int(v) if v == int(v) else v

    def _place(self) -> dict:
        rng = self.rng
        inst = self.instruments[int(rng.integers(len(self.instruments)))]
        self._next_id += 1
        now = self._now()
        order_id = f"{now[2:4]}{now[5:7]}{now[8:10]}{self._next_id:09d}"
        qty = int(max(1, inst.lot_size) * rng.integers(1, 10))
        limit = rng.random() < 0.5
        price = self._price(inst, inst.price) if limit else 0
        product = ("CNC", "MIS") if inst.instrument_type == "EQ" else ("NRML", "MIS")
        return {
            "user_id": self.user_id,
            "unfilled_quantity": 0,
            "app_id": self.app_id,
            "checksum": self._checksum(order_id, now),
            "placed_by": self.user_id,
            "order_id": order_id,
            "exchange_order_id": f"{1000000000000000 + self._next_id}",
            "parent_order_id": None,
            "status": "OPEN",
            "status_message": None,
            "status_message_raw": None,
            "order_timestamp": now,
            "exchange_update_timestamp": now,
            "exchange_timestamp": now,
            "variety": "regular",
            "exchange": inst.exchange,
            "tradingsymbol": inst.tradingsymbol,
            "instrument_token": inst.instrument_token,
            "order_type": "LIMIT" if limit else "MARKET",
            "transaction_type": "BUY" if rng.random() < 0.5 else "SELL",
            "validity": "DAY",
            "product": product[int(rng.integers(2))],
            "quantity": qty,
            "disclosed_quantity": 0,
            "price": price,
            "trigger_price": 0,
            "average_price": 0,
            "filled_quantity": 0,
            "pending_quantity": qty,
            "cancelled_quantity": 0,
            "market_protection": 0,
            "meta": {},
            "tag": None,
            "guid": f"sim{self._next_id:x}",
            "_inst": inst,
        }

    def _finish(self, order: dict) -> dict:
        o = dict(order)
        inst = o["_inst"]
        o["exchange_update_timestamp"] = o["exchange_timestamp"] = self._now()
        r = self.rng.random()
        if r < 0.8:
            o["status"] = "COMPLETE"
            raw = inst.price + int(self.rng.integers(-3, 4)) * max(1, inst.tick)
            o["average_price"] = self._price(inst, max(inst.tick, raw))
            o["filled_quantity"] = o["quantity"]
            o["pending_quantity"] = 0
        elif r < 0.9:
            o["status"] = "CANCELLED"
            o["cancelled_quantity"] = o["unfilled_quantity"] = o["quantity"]
            o["pending_quantity"] = 0
        else:
            o["status"] = "REJECTED"
            o["status_message"] = o["status_message_raw"] = "RMS:Margin Exceeds"
            o["pending_quantity"] = 0
        return o

    def _checksum(self, order_id: str, order_timestamp: str) -> str:
        return hashlib.sha256((order_id + order_timestamp + self.api_secret).encode()).hexdigest()

    @staticmethod
    def _text(order: dict) -> str:
        data = {k: order[k] for k in POSTBACK_KEYS}
        return json.dumps({"type": "order", "data": data}, separators=(",", ":"))


def load_postback_source(spec: str, instruments: Sequence[Instrument],
                         seed: int = 0) -> PostbackSource:
    """Build a postback source named ``"module:factory"``.

    ``factory(instruments, seed)`` must return a ``PostbackSource`` (a
    callable taking how many postbacks are due and returning text messages).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"postback source must be MODULE:FACTORY, not {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    source = factory(instruments, seed)
    if not callable(source):
        raise TypeError(f"{spec} did not return a callable postback source")
    return source


# ------------------------------------------------------------------ damage

def damage(message: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """A damaged copy of a data message (of at least one packet) and how.

    Every kind is one the decoder must count as malformed: ``truncated``
    (cut inside: the packet count promises more bytes), ``bad_length`` (a
    packet length of 0xFFFF running past the end, or one byte short, which
    no packet type has), ``trailing`` (bytes after the last packet),
    ``garbage`` (random bytes under a count of 65535 packets).
    """
    n = len(message)
    kind = ("truncated", "bad_length", "trailing", "garbage")[int(rng.integers(4))]
    if kind == "truncated":
        return message[:int(rng.integers(2, n))], kind
    if kind == "bad_length":
        plen = int.from_bytes(message[2:4], "big")
        bad = 0xFFFF if rng.random() < 0.5 else plen - 1
        return message[:2] + bad.to_bytes(2, "big") + message[4:], kind
    if kind == "trailing":
        return message + rng.bytes(int(rng.integers(1, 9))), kind
    return b"\xff\xff" + rng.bytes(int(rng.integers(0, min(n, 4096)))), kind


# --------------------------------------------------------------- the server

class _Conn:
    """One client connection's state; its writer task is the only sender."""

    __slots__ = ("ws", "id", "api_key", "subs", "idx", "modes", "cum_weight", "dirty",
                 "budget", "outbox", "wake", "connected", "last_binary", "stalled",
                 "stall_done", "closing")

    def __init__(self, ws, conn_id: int, api_key: str, now: float):
        self.ws = ws
        self.id = conn_id
        self.api_key = api_key
        self.subs: dict[int, int] = {}       # token -> mode code, in subscription order
        self.idx = np.empty(0, np.int64)     # universe indices of subscribed known tokens
        self.modes = np.empty(0, np.int64)
        self.cum_weight = np.empty(0, np.float64)
        self.dirty = False
        self.budget = 0.0
        self.outbox: collections.deque[str] = collections.deque()
        self.wake = asyncio.Event()
        self.connected = now
        self.last_binary = now
        self.stalled = False
        self.stall_done = False
        self.closing = False


class SimServer:
    """A Kite-protocol WebSocket server over a seeded simulated market.

    Parameters
    ----------
    host : str
    port : int
        0 picks a free port (read it from ``port`` once started).
    tokens : int
        Size of the universe (ignored when ``market`` is given).
    rate : float
        Packets per second offered in total across connections.
    seed : int
    market : Market, optional
        The market to serve (default ``Market(n_tokens=tokens, seed=seed)``).
    record : path-like, optional
        Capture file of everything sent.
    stream : str, optional
        The capture's stream id (default a fresh one).
    instruments_csv : path-like, optional
        Written (Kite instruments dump) before the server listens.
    postbacks : float
        Order postbacks per second (0: none).
    postback_source : PostbackSource, optional
        Default ``ingestor.sim.orders.postback_source``: order lifecycles
        (``OrderPostbacks`` is the minimal one-shot alternative).
    postbacks_to : {"first", "all"}
        The oldest live connection, or every one.
    faults : Faults, optional
    expected_token : str, optional
        Accept only this access token.
    max_connections : int
        Per API key.
    max_tokens : int
        Per connection.
    batch : int
        Packets per binary message at most.
    heartbeat_interval, flush_interval, cycle : float
        Seconds: heartbeat after this much silence, capture flush period,
        and the writers' pacing period.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, tokens: int = 100,
                 rate: float = 1000.0, seed: int = 0, market: Market | None = None,
                 record: str | os.PathLike | None = None, stream: str | None = None,
                 instruments_csv: str | os.PathLike | None = None, postbacks: float = 0.0,
                 postback_source: PostbackSource | None = None, postbacks_to: str = "first",
                 faults: Faults | None = None, expected_token: str | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 max_tokens: int = MAX_TOKENS_PER_CONNECTION, batch: int = 100,
                 heartbeat_interval: float = 1.0, flush_interval: float = 0.2,
                 cycle: float = 0.005):
        if rate < 0 or postbacks < 0:
            raise ValueError("rate and postbacks must be non-negative")
        if not 1 <= batch <= 65535:
            raise ValueError("batch must be in 1..65535 packets")
        if postbacks_to not in ("first", "all"):
            raise ValueError("postbacks_to must be 'first' or 'all'")
        self.faults = faults or Faults()
        self.faults.validate()
        self.host = host
        self._port = port
        self.market = market if market is not None else Market(n_tokens=tokens, seed=seed)
        self.rate = float(rate)
        self.seed = seed
        self.record_path = os.fspath(record) if record is not None else None
        self.stream = stream
        self.instruments_csv = os.fspath(instruments_csv) if instruments_csv is not None else None
        self.postbacks = float(postbacks)
        self.postback_source = postback_source
        self.postbacks_to = postbacks_to
        self.expected_token = expected_token
        self.max_connections = max_connections
        self.max_tokens = max_tokens
        self.batch = batch
        self.heartbeat_interval = heartbeat_interval
        self.flush_interval = flush_interval
        self.cycle = cycle
        self._weights = self.market.activity
        self._damage_rng = np.random.default_rng([seed, 0xBAD])
        self._conns: list[_Conn] = []
        self._next_conn = 0
        self._server = None
        self._writer = None
        self._tasks: list[asyncio.Task] = []
        self._handlers: set[asyncio.Task] = set()
        self._closed = False
        self._stats = collections.Counter()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> "SimServer":
        """Write the instruments CSV, open the capture, start listening."""
        from websockets.asyncio.server import serve

        if self.instruments_csv:
            self.market.write_instruments_csv(self.instruments_csv)
        if self.record_path:
            from ingestor.feed.capture import CaptureHeader, CaptureWriter

            header = CaptureHeader(extra={"source": "ingestor simulate", "seed": self.seed})
            if self.stream:
                header.stream = self.stream
            self._writer = CaptureWriter(self.record_path, header)
            self.stream = header.stream
        if self.postbacks and self.postback_source is None:
            # realistic lifecycles (partial fills, cancels, duplicates, reordering)
            from ingestor.sim.orders import postback_source

            self.postback_source = postback_source(self.market.instruments, self.seed)
        self._server = await serve(
            self._handler, self.host, self._port, process_request=self._process_request,
            compression=None, ping_interval=None, close_timeout=2, max_size=1 << 20,
            logger=log)
        self._port = self._server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        if self._writer is not None:
            self._tasks.append(loop.create_task(self._flusher()))
        if self.postbacks:
            self._tasks.append(loop.create_task(self._postback_loop()))
        log.info("simulator listening on %s", self.url)
        return self

    async def close(self) -> None:
        """Close every connection gracefully (1001), stop, flush the capture."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            for c in self._conns:
                c.closing = True
                if c.stalled:  # read again so the close handshake can complete
                    _resume_reading(c.ws)
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()

    async def __aenter__(self) -> "SimServer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def serve(self, duration: float | None = None,
                    stop: asyncio.Event | None = None) -> None:
        """Serve until ``duration`` seconds pass or ``stop`` is set, then close."""
        stop = stop or asyncio.Event()
        try:
            await asyncio.wait_for(stop.wait(), duration)
        except asyncio.TimeoutError:
            pass
        finally:
            await self.close()

    # ------------------------------------------------------------ accessors

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """``ws://host:port`` (no credentials; clients add the query)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self._port}"

    def client_url(self, api_key: str = "simkey", access_token: str = "simtoken") -> str:
        """The URL a Kite client connects to, credentials in the query as at the broker."""
        return f"{self.url}/?api_key={api_key}&access_token={access_token}"

    @property
    def stats(self) -> dict:
        """Counters: connections, rejected, messages, ticks, heartbeats, postbacks, faults..."""
        s = dict(self._stats)
        s["connections_open"] = len(self._conns)
        s["subscribed"] = sum(len(c.subs) for c in self._conns)
        for k in ("connections", "rejected_403", "rejected_429", "messages", "binary_messages",
                  "text_messages", "heartbeats", "ticks", "bytes", "malformed", "postbacks",
                  "errors", "drops", "stalls"):
            s.setdefault(k, 0)
        return s

    @property
    def sent_ticks(self) -> int:
        """Packets sent in intact binary messages."""
        return self._stats["ticks"]

    @property
    def connections(self) -> int:
        return len(self._conns)

    # ------------------------------------------------------------ handshake

    def _process_request(self, connection, request):
        query = parse_qs(urlsplit(request.path).query)
        api_key = (query.get("api_key") or [""])[0]
        token = (query.get("access_token") or [""])[0]
        if not api_key or not token:
            self._stats["rejected_403"] += 1
            return connection.respond(HTTPStatus.FORBIDDEN, "api_key and access_token required\n")
        if self.faults.reject_token or (self.expected_token is not None
                                        and token != self.expected_token):
            self._stats["rejected_403"] += 1
            return connection.respond(HTTPStatus.FORBIDDEN, "invalid or expired access token\n")
        if sum(c.api_key == api_key for c in self._conns) >= self.max_connections:
            self._stats["rejected_429"] += 1
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS,
                                      f"at most {self.max_connections} connections per api_key\n")
        return None

    async def _handler(self, ws) -> None:
        query = parse_qs(urlsplit(ws.request.path).query)
        loop = asyncio.get_running_loop()
        conn = _Conn(ws, self._next_conn, (query.get("api_key") or [""])[0], loop.time())
        self._next_conn += 1
        self._conns.append(conn)
        self._stats["connections"] += 1
        me = asyncio.current_task()
        self._handlers.add(me)
        reader = loop.create_task(self._reader(conn))
        writer = loop.create_task(self._writer_loop(conn))
        try:
            done, pending = await asyncio.wait({reader, writer},
                                               return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
                exc = t.exception()
                if exc is not None and not _is_closed(exc):
                    log.error("simulator connection %d failed: %r", conn.id, exc)
        finally:
            if conn.stalled:
                _resume_reading(ws)
            self._conns.remove(conn)
            self._handlers.discard(me)

    # ------------------------------------------------------------ requests

    async def _reader(self, conn: _Conn) -> None:
        async for raw in conn.ws:
            self._request(conn, raw)
            conn.wake.set()

    def _request(self, conn: _Conn, raw) -> None:
        if isinstance(raw, (bytes, bytearray)):
            return self._error(conn, "binary requests are not understood")
        try:
            req = json.loads(raw)
        except ValueError:
            return self._error(conn, "request is not JSON")
        if not isinstance(req, dict):
            return self._error(conn, "request must be a JSON object")
        action, value = req.get("a"), req.get("v")
        if action == "subscribe":
            tokens = self._tokens(conn, value)
            if tokens is None:
                return
            room = self.max_tokens - len(conn.subs)
            ignored = 0
            for t in tokens:
                if t in conn.subs:
                    conn.subs[t] = MODES["quote"]
                elif room > 0:
                    conn.subs[t] = MODES["quote"]
                    room -= 1
                else:
                    ignored += 1
            conn.dirty = True
            if ignored:
                self._error(conn, f"subscription limit of {self.max_tokens} instruments per "
                                  f"connection exceeded: {ignored} token(s) not subscribed")
        elif action == "unsubscribe":
            tokens = self._tokens(conn, value)
            if tokens is None:
                return
            for t in tokens:
                conn.subs.pop(t, None)
            conn.dirty = True
        elif action == "mode":
            if (not isinstance(value, list) or len(value) != 2
                    or value[0] not in MODES):
                return self._error(conn, 'mode request must be {"a":"mode","v":'
                                         '["ltp"|"quote"|"full",[tokens]]}')
            tokens = self._tokens(conn, value[1])
            if tokens is None:
                return
            code = MODES[value[0]]
            for t in tokens:
                if t in conn.subs:
                    conn.subs[t] = code
            conn.dirty = True
        else:
            self._error(conn, f"unknown action {action!r}")

    def _tokens(self, conn: _Conn, value) -> list[int] | None:
        if not isinstance(value, list) or not all(
                type(t) is int and 0 <= t <= 0xFFFFFFFF for t in value):
            self._error(conn, "tokens must be a list of instrument tokens (unsigned integers)")
            return None
        return value

    def _error(self, conn: _Conn, text: str) -> None:
        conn.outbox.append(json.dumps({"type": "error", "data": text}))
        self._stats["errors"] += 1

    def _rebuild(self, conn: _Conn) -> None:
        idx, modes = [], []
        index = self.market._index
        for token, mode in conn.subs.items():
            k = index.get(token)
            if k is not None:
                idx.append(k)
                modes.append(mode)
        conn.idx = np.array(idx, np.int64)
        conn.modes = np.array(modes, np.int64)
        conn.cum_weight = np.cumsum(self._weights[conn.idx])
        conn.dirty = False

    # ------------------------------------------------------------ sending

    async def _writer_loop(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        faults = self.faults
        ws = conn.ws
        last = loop.time()
        while True:
            try:
                await asyncio.wait_for(conn.wake.wait(), self.cycle)
            except asyncio.TimeoutError:
                pass
            conn.wake.clear()
            if conn.closing:
                # The server is closing it (1001): send nothing more; the
                # reader ends when the close handshake does.
                continue
            now = loop.time()
            age = now - conn.connected
            elapsed, last = now - last, now
            if faults.drop_every is not None and age >= faults.drop_every:
                await self._drop(conn)
                return
            if faults.stall_after is not None and not conn.stall_done:
                stall_end = (faults.stall_after + faults.stall_for
                             if faults.stall_for is not None else float("inf"))
                if faults.stall_after <= age < stall_end:
                    if not conn.stalled:
                        conn.stalled = True
                        self._stats["stalls"] += 1
                        _pause_reading(ws)
                    conn.budget = 0.0
                    continue
                if conn.stalled:
                    conn.stalled = False
                    conn.stall_done = True
                    conn.last_binary = now
                    _resume_reading(ws)
            while conn.outbox:
                text = conn.outbox.popleft()
                await self._send(ws, text.encode(), text)
                self._stats["text_messages"] += 1
            # Rebuilt after the replies (and with no await before the ticks
            # are packed): every binary message sent after an error reply
            # reflects every request read before it, so a client can use a
            # bad request as a fence.
            if conn.dirty:
                self._rebuild(conn)
            k = len(conn.idx)
            if k and self.rate > 0:
                share = self.rate * k / max(k, self._active_tokens())
                # Bounded debt: a slow client or a busy loop lowers the rate
                # offered rather than queueing an ever larger burst.
                conn.budget = min(conn.budget + share * elapsed, max(1.0, share * 0.1))
                n = int(conn.budget)
                if n:
                    conn.budget -= n
                    await self._send_ticks(conn, n)
                    conn.last_binary = loop.time()
            if loop.time() - conn.last_binary >= self.heartbeat_interval:
                await self._send(ws, HEARTBEAT)
                self._stats["heartbeats"] += 1
                conn.last_binary = loop.time()

    def _active_tokens(self) -> int:
        return sum(len(c.idx) for c in self._conns if not c.stalled)

    async def _send_ticks(self, conn: _Conn, n: int) -> None:
        market = self.market
        k = len(conn.idx)
        # Tokens by activity (with replacement), in messages of at most
        # min(batch, subscribed) packets.
        pick = np.searchsorted(conn.cum_weight, market.rng.random(n) * conn.cum_weight[-1],
                               side="right")
        np.minimum(pick, k - 1, out=pick)
        size = min(self.batch, k)
        m, rest = divmod(n, size)
        counts = np.full(m + (rest > 0), size, np.int64)
        if rest:
            counts[-1] = rest
        now_ns = time.time_ns()
        buf, offsets = market.pack(conn.idx[pick], conn.modes[pick], counts,
                                   np.full(len(counts), now_ns, np.int64))
        data = buf.tobytes()
        offsets = offsets.tolist()
        stats = self._stats
        malformed = self.faults.malformed
        rng = self._damage_rng
        ws = conn.ws
        for i, count in enumerate(counts.tolist()):
            msg = data[offsets[i]:offsets[i + 1]]
            intact = not (malformed and rng.random() < malformed)
            if not intact:
                msg, _ = damage(msg, rng)
            await self._send(ws, msg)
            if intact:
                stats["ticks"] += count
            else:
                stats["malformed"] += 1
            if conn.closing:
                return
        if market.volume_near_limit():
            market.new_session()

    async def _send(self, ws, payload: bytes, text: str | None = None) -> None:
        """Record and send one message (``text`` given: a text message of ``payload``).

        Recorded only while the connection is open: ``send`` then writes the
        frame to the transport before its first ``await``, so the capture
        holds exactly the messages that went out, in order.
        """
        if ws.protocol.state is not State.OPEN:
            await ws.send(payload if text is None else text)  # raises ConnectionClosed
            return
        if self._writer is not None:
            self._writer.write(payload, 1 if text is None else 2, time.time_ns())
        stats = self._stats
        stats["messages"] += 1
        if text is None:
            stats["binary_messages"] += 1
        stats["bytes"] += len(payload)
        await ws.send(payload if text is None else text)

    async def _drop(self, conn: _Conn) -> None:
        """Abort the TCP connection once what was sent has reached the kernel."""
        transport = conn.ws.transport
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while transport.get_write_buffer_size() and loop.time() < deadline:
            await asyncio.sleep(0.001)
        self._stats["drops"] += 1
        transport.abort()

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            self._writer.flush()

    async def _postback_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = min(0.05, 1.0 / self.postbacks)
        due = 0.0
        last = loop.time()
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            due = min(due + (now - last) * self.postbacks, max(1.0, self.postbacks))
            last = now
            live = [c for c in self._conns if not c.stalled and not c.closing]
            n = int(due)
            if not n or not live:
                continue
            due -= n
            texts = list(self.postback_source(n))
            targets = live if self.postbacks_to == "all" else live[:1]
            for c in targets:
                c.outbox.extend(texts)
                c.wake.set()
            self._stats["postbacks"] += len(texts)


def _is_closed(exc: BaseException) -> bool:
    from websockets.exceptions import ConnectionClosed

    return isinstance(exc, (ConnectionClosed, ConnectionError, asyncio.CancelledError))


def _pause_reading(ws) -> None:
    try:
        ws.transport.pause_reading()
    except (AttributeError, RuntimeError):
        pass


def _resume_reading(ws) -> None:
    try:
        if not ws.transport.is_closing():
            ws.transport.resume_reading()
    except (AttributeError, RuntimeError):
        pass


class ThreadedSimServer:
    """A ``SimServer`` on its own event loop in a daemon thread (sync tests, benchmarks).

    ``with ThreadedSimServer(rate=...) as srv: srv.port, srv.url, srv.server.stats``;
    leaving the block closes the server gracefully.
    """

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs
        self.server: SimServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="simserver", daemon=True)

    def _run(self) -> None:
        async def main():
            self._stop = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            try:
                self.server = await SimServer(*self._args, **self._kwargs).start()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self.server.serve(stop=self._stop)

        asyncio.run(main())

    def start(self) -> "ThreadedSimServer":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    def client_url(self, *args, **kwargs) -> str:
        return self.server.client_url(*args, **kwargs)

    def __enter__(self) -> "ThreadedSimServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
