"""An Angel One SmartStream simulator: the Kite market model, served as SmartAPI WebSocket 2.0.

``AngelMarket`` takes the instruments of :class:`ingestor.sim.market.Market` in the segments
Angel One has (NSE, indices, NFO, BSE, BFO, MCX, CDS) and names each by its SmartStream key
(exchange type, exchange token as a string); a packet is the market's Kite packet for that
instrument in the same state, re-encoded byte for byte as SmartStream frames it
(``ingestor.twin.smartstream``): the same prices, volumes, books and clock.

``AngelSimServer`` speaks the protocol of ``ingestor.feed.smartstream``: the four
authentication headers (HTTP 401 with ``x-error-message`` when one is missing or the feed
token is not the expected one), at most 3 connections a client code, JSON subscribe and
unsubscribe requests (errors answered as ``{"errorCode": "E1002", ...}``), at most 1000
subscriptions a session, the text ``ping`` answered with ``pong`` (control pings are answered
by the WebSocket library), one packet per binary message.  ``record`` writes a capture of
everything sent (header ``broker`` ``angel``); ``drop_after`` drops the first connection
that sent that many packets, once (reconnection tests).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import logging
import os
import time
from decimal import Decimal
from http import HTTPStatus

from ingestor.sim.market import Market, make_universe
from ingestor.twin.smartstream import encode_depth, encode_ltp, encode_quote, encode_snap_quote

log = logging.getLogger(__name__)
#: the WebSocket library logs the handshake's headers (credentials) at DEBUG: not here
_ws_log = logging.getLogger(__name__ + ".websocket")
_ws_log.setLevel(logging.INFO)

#: Kite segment code -> SmartStream exchange type
KITE_TO_ANGEL = {1: 1, 9: 1, 2: 2, 4: 3, 5: 4, 7: 5, 3: 13}
_EXCH_SEG = {1: "NSE", 2: "NFO", 3: "BSE", 4: "BFO", 5: "MCX", 7: "NCDEX", 13: "CDS"}
MODE_CODES = {"ltp": 1, "quote": 2, "snap_quote": 3, "full": 3, "depth": 4}
MAX_SUBSCRIPTIONS = 1000
MAX_CONNECTIONS = 3


class AngelMarket:
    """The Kite market model under SmartStream keys (see the module docstring)."""

    def __init__(self, n_tokens: int = 100, seed: int = 0):
        universe = [i for i in make_universe(n_tokens, seed,
                                             segments=sorted(KITE_TO_ANGEL))]
        self.market = Market(universe, seed=seed)
        #: (exchange type, token) -> Kite token, in universe order
        self.keys: dict[tuple[int, str], int] = {}
        self.instruments = {}
        for inst in universe:
            key = (KITE_TO_ANGEL[inst.segment_code], str(inst.exchange_token))
            if key not in self.keys:
                self.keys[key] = inst.instrument_token
                self.instruments[key] = inst
        self._seq = 0

    def packets(self, subs: list[tuple[tuple[int, str], str]], n: int,
                recv_ns: int | None = None) -> list[bytes]:
        """``n`` packets (at most one per subscription) for ``[((etype, token), mode)]``."""
        from ingestor._core import decode_kite

        kite = {}
        want = {}
        for key, mode in subs:
            tok = self.keys.get(key)
            if tok is not None:
                kite[tok] = "ltp" if MODE_CODES[mode] == 1 else \
                    "quote" if MODE_CODES[mode] == 2 else "full"
                want[tok] = (key, MODE_CODES[mode])
        if not kite or n <= 0:
            return []
        msg = self.market.message(kite, min(n, len(kite)), recv_ns)
        out = []
        for r in decode_kite(msg):
            (etype, token), mode = want[int(r["instrument_token"])]
            self._seq += 1
            ms = int(r["exchange_timestamp"]) * 1000 or self.market.clock_ns // 1_000_000
            head = (etype, token, int(r["last_price"]), self._seq, ms)
            if mode == 1:
                out.append(encode_ltp(*head))
                continue
            quote = (int(r["last_traded_quantity"]), int(r["average_traded_price"]),
                     int(r["volume_traded"]), float(r["total_buy_quantity"]),
                     float(r["total_sell_quantity"]), int(r["open"]), int(r["high"]),
                     int(r["low"]), int(r["close"]))
            if mode == 2:
                out.append(encode_quote(*head, *quote))
            elif mode == 3:
                book = [[int(x) for x in r[k]] for k in ("bid_quantity", "bid_price",
                                                         "bid_orders", "ask_quantity",
                                                         "ask_price", "ask_orders")]
                out.append(encode_snap_quote(*head, *quote, int(r["last_trade_time"]),
                                             int(r["oi"]), 0.0, *book))
            else:
                bids = list(zip(*(r[k].tolist() for k in ("bid_quantity", "bid_price",
                                                          "bid_orders"))))
                asks = list(zip(*(r[k].tolist() for k in ("ask_quantity", "ask_price",
                                                          "ask_orders"))))
                out.append(encode_depth(etype, token, ms, ms, bids, asks))
        return out

    def write_master(self, path: str | os.PathLike) -> None:
        """The universe as an Angel One instrument master (``OpenAPIScripMaster.json``)."""
        rows = []
        for (etype, token), inst in self.instruments.items():
            paise = lambda raw: str(Decimal(raw) * 100 / inst.divisor)  # noqa: E731
            expiry = ""
            if inst.expiry:
                expiry = _dt.date.fromisoformat(inst.expiry).strftime("%d%b%Y").upper()
            rows.append({"token": token, "symbol": inst.tradingsymbol, "name": inst.name,
                         "expiry": expiry,
                         "strike": paise(inst.strike) if inst.strike else "-1.000000",
                         "lotsize": str(inst.lot_size), "instrumenttype": inst.instrument_type,
                         "exch_seg": _EXCH_SEG[etype], "tick_size": paise(inst.tick)})
        with open(path, "w") as f:
            json.dump(rows, f)


class _Conn:
    def __init__(self, ws, client_code: str):
        self.ws = ws
        self.client_code = client_code
        self.subs: dict[tuple[int, str], str] = {}
        self.sent = 0


class AngelSimServer:
    """A SmartStream WebSocket server over an :class:`AngelMarket` (see the module docstring).

    Parameters
    ----------
    host, port : str, int
        0 picks a free port (``port`` once started).
    market : AngelMarket, optional
    rate : float
        Packets per second per connection.
    feed_token : str, optional
        Accept only this feed token.
    record : path-like, optional
        A capture of every packet sent.
    drop_after : int, optional
        Drop the first connection that sent this many packets (once).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 market: AngelMarket | None = None, tokens: int = 60, seed: int = 0,
                 rate: float = 500.0, feed_token: str | None = None,
                 record: str | os.PathLike | None = None, drop_after: int | None = None,
                 cycle: float = 0.01):
        self.host = host
        self._port = port
        self.market = market or AngelMarket(tokens, seed)
        self.rate = rate
        self.feed_token = feed_token
        self.record = os.fspath(record) if record is not None else None
        self.drop_after = drop_after
        self.cycle = cycle
        self.conns: list[_Conn] = []
        self.stats = {"connections": 0, "rejected_401": 0, "rejected_429": 0, "pings": 0,
                      "packets": 0, "errors": 0, "subscribe_requests": 0}
        self._server = None
        self._writer = None
        self._dropped = False
        self.stream: str | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self._port}/smart-stream"

    async def start(self) -> "AngelSimServer":
        from websockets.asyncio.server import serve

        if self.record:
            from ingestor.feed.capture import CaptureHeader, CaptureWriter

            header = CaptureHeader(broker="angel", extra={"source": "ingestor simulate"})
            self._writer = CaptureWriter(self.record, header)
            self.stream = header.stream
        self._server = await serve(self._handler, self.host, self._port,
                                   process_request=self._process_request, compression=None,
                                   close_timeout=2, max_size=1 << 20, logger=_ws_log)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def __aenter__(self) -> "AngelSimServer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _process_request(self, connection, request):
        h = request.headers
        missing = [k for k in ("Authorization", "x-api-key", "x-client-code", "x-feed-token")
                   if not h.get(k)]
        why = None
        if missing:
            why = f"missing header(s) {', '.join(missing)}"
        elif self.feed_token is not None and h.get("x-feed-token") != self.feed_token:
            why = "Invalid feed token"
        if why is not None:
            self.stats["rejected_401"] += 1
            resp = connection.respond(HTTPStatus.UNAUTHORIZED, why + "\n")
            resp.headers["x-error-message"] = why
            return resp
        if sum(c.client_code == h["x-client-code"] for c in self.conns) >= MAX_CONNECTIONS:
            self.stats["rejected_429"] += 1
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS,
                                      f"at most {MAX_CONNECTIONS} connections a client code\n")
        return None

    async def _handler(self, ws) -> None:
        conn = _Conn(ws, ws.request.headers["x-client-code"])
        self.conns.append(conn)
        self.stats["connections"] += 1
        writer = asyncio.get_running_loop().create_task(self._send_loop(conn))
        try:
            async for raw in ws:
                await self._request(conn, raw)
        except Exception:  # noqa: BLE001 - a dropped client
            pass
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            self.conns.remove(conn)

    async def _error(self, conn: _Conn, cid: str, code: str, text: str) -> None:
        self.stats["errors"] += 1
        await conn.ws.send(json.dumps({"correlationID": cid, "errorCode": code,
                                       "errorMessage": text}))

    async def _request(self, conn: _Conn, raw) -> None:
        if raw == "ping":
            self.stats["pings"] += 1
            await conn.ws.send("pong")
            return
        try:
            req = json.loads(raw)
            action, params = req["action"], req["params"]
            mode, lists = int(params["mode"]), params["tokenList"]
            cid = str(req.get("correlationID", ""))[:10]
            names = {v: k for k, v in MODE_CODES.items() if k != "full"}
            if action not in (0, 1) or mode not in names:
                raise ValueError
            keys = [(int(t["exchangeType"]), str(tok)) for t in lists for tok in t["tokens"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            return await self._error(conn, "", "E1002", "Invalid Request Payload.")
        self.stats["subscribe_requests"] += 1
        if action == 1:
            if len(set(conn.subs) | set(keys)) > MAX_SUBSCRIPTIONS:
                return await self._error(conn, cid, "E1002",
                                         f"more than {MAX_SUBSCRIPTIONS} subscriptions")
            for k in keys:
                conn.subs[k] = names[mode]
        else:
            for k in keys:
                conn.subs.pop(k, None)

    async def _send_loop(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        budget = 0.0
        last = loop.time()
        while True:
            await asyncio.sleep(self.cycle)
            now = loop.time()
            budget = min(budget + self.rate * (now - last), self.rate)
            last = now
            n = int(budget)
            if not conn.subs or n <= 0:
                continue
            budget -= n
            for p in self.market.packets(list(conn.subs.items()), n):
                if (self.drop_after is not None and not self._dropped
                        and conn.sent >= self.drop_after):
                    self._dropped = True
                    conn.ws.transport.abort()       # a dropped connection, no close frame
                    return
                await conn.ws.send(p)
                conn.sent += 1
                self.stats["packets"] += 1
                if self._writer is not None:
                    self._writer.write(p, 1, time.time_ns())
