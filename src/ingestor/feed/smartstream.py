"""Angel One SmartAPI WebSocket 2.0 ("SmartStream") client: one connection of the daemon.

Protocol (SmartAPI docs, "WebSocket Streaming 2.0"; broker-frames.md section 2): connect to
``wss://smartapisocket.angelone.in/smart-stream`` with the headers ``Authorization`` (the
JWT), ``x-api-key``, ``x-client-code`` and ``x-feed-token``; a refused login is HTTP 401 with
an ``x-error-message`` header.  Requests are JSON text::

    {"correlationID": "...", "action": 1, "params": {"mode": 1..4,
     "tokenList": [{"exchangeType": 1, "tokens": ["3045", ...]}, ...]}}

(action 1 subscribe, 0 unsubscribe); at most 1000 (token, mode) subscriptions a session and
3 connections a client code.  Market data: one binary packet per message (decoded by
``ingestor._core.SmartStreamDecoder``).  Heartbeat: the docs ask for the text ``ping`` every
30 s, answered by the text ``pong``; the official Python client sends WebSocket control
pings every 10 s instead.  This client sends the text ping every ``ping_interval`` and
answers the server's control pings (the WebSocket library does); ``pong`` and JSON error
texts are the client's own business and are not handed on (SmartStream carries no order
updates: those come from another socket).

Everything else is :class:`ingestor.feed.kite.KiteFeed`'s: the reconnect loop with
exponential backoff and jitter, the watchdog (nothing received, not even a ``pong``, for
``heartbeat_timeout``: reconnect), a refused login reported once and retried slowly, a
fresh stream id per connection, resubscription on every connect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Callable

import websockets
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from ingestor.feed.kite import MAX_MESSAGE_BYTES, KiteFeed
from ingestor.logs import redact

log = logging.getLogger(__name__)
#: the WebSocket library logs the handshake's headers (the JWT and feed token) at DEBUG:
#: its logger for these connections never goes below INFO, whatever the daemon's level
_ws_log = logging.getLogger(__name__ + ".websocket")
_ws_log.setLevel(logging.INFO)

#: subscription mode names -> SmartStream mode codes ("full" is Kite's name for the mode
#: with the book: SNAP_QUOTE)
MODES = {"ltp": 1, "quote": 2, "snap_quote": 3, "full": 3, "depth": 4}
#: the exchange types of the docs, by name
EXCHANGE_TYPES = {"nse_cm": 1, "nse_fo": 2, "bse_cm": 3, "bse_fo": 4, "mcx_fo": 5,
                  "ncx_fo": 7, "cde_fo": 13}
#: the docs' limit of (token, mode) subscriptions a session
MAX_SUBSCRIPTIONS = 1000
#: the official client's limits of DEPTH (20-level) subscriptions: nse_cm only, 50 tokens
MAX_DEPTH_TOKENS = 50
DEFAULT_URL = "wss://smartapisocket.angelone.in/smart-stream"

Subscriptions = dict[tuple[int, str], str]


def check_subscriptions(subs: Subscriptions) -> None:
    """Raise ``ValueError`` (a configuration error) for what the broker would refuse."""
    if len(subs) > MAX_SUBSCRIPTIONS:
        raise ValueError(f"{len(subs)} subscriptions on one connection: SmartStream takes at "
                         f"most {MAX_SUBSCRIPTIONS} a session")
    depth = 0
    for (etype, token), mode in subs.items():
        if etype not in EXCHANGE_TYPES.values():
            raise ValueError(f"exchange type {etype} of token {token!r} is not one of "
                             f"{sorted(EXCHANGE_TYPES.values())}")
        if not 1 <= len(token) <= 25 or not token.isascii() or not token.isprintable() \
                or " " in token:
            raise ValueError(f"token {token[:40]!r}: want 1..25 printable ASCII characters")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} of token {token!r}: want one of {sorted(MODES)}")
        if MODES[mode] == 4:
            depth += 1
            if etype != 1:
                raise ValueError(f"depth mode of token {token!r}: nse_cm (exchange type 1) only")
    if depth > MAX_DEPTH_TOKENS:
        raise ValueError(f"{depth} depth subscriptions: at most {MAX_DEPTH_TOKENS}")


def subscribe_requests(subs: Subscriptions, action: int = 1,
                       correlation_id: str = "ingestor") -> list[str]:
    """The JSON text requests subscribing (or with ``action=0`` unsubscribing) ``subs``:
    one per mode, each with one token list per exchange type."""
    by_mode: dict[int, dict[int, list[str]]] = {}
    for (etype, token), mode in sorted(subs.items()):
        by_mode.setdefault(MODES[mode], {}).setdefault(etype, []).append(token)
    return [json.dumps({"correlationID": correlation_id[:10], "action": action,
                        "params": {"mode": mode, "tokenList": [
                            {"exchangeType": e, "tokens": toks}
                            for e, toks in sorted(lists.items())]}})
            for mode, lists in sorted(by_mode.items())]


class SmartStreamFeed(KiteFeed):
    """One SmartStream connection, kept up until ``stop`` is set.

    Parameters
    ----------
    label : str
        The connection's name in logs, metrics and ``feed_gaps`` (``angel-0``).
    url : str
    api_key, client_code, jwt, feed_token : str
        The credentials (sent as headers, never logged).
    subscriptions : dict
        ``{(exchange_type, token): mode}`` (modes: ``MODES``), subscribed on every connect.
    on_message, on_connect, on_disconnect : callable
        As :class:`ingestor.feed.kite.KiteFeed`; only binary messages reach ``on_message``.
    ping_interval : float
        Seconds between text ``ping``s (the docs: 30).
    """

    def __init__(self, label: str, url: str, api_key: str, client_code: str, jwt: str,
                 feed_token: str, subscriptions: Subscriptions, on_message: Callable, *,
                 on_connect: Callable | None = None, on_disconnect: Callable | None = None,
                 heartbeat_timeout: float = 40.0, reconnect_min: float = 0.5,
                 reconnect_max: float = 30.0, rejected_retry: float = 60.0,
                 connect_timeout: float = 10.0, ping_interval: float = 30.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        check_subscriptions(subscriptions)
        super().__init__(label, url, api_key, "", {}, on_message, on_connect=on_connect,
                         on_disconnect=on_disconnect, heartbeat_timeout=heartbeat_timeout,
                         reconnect_min=reconnect_min, reconnect_max=reconnect_max,
                         rejected_retry=rejected_retry, connect_timeout=connect_timeout,
                         max_message_bytes=max_message_bytes)
        self._url = url
        self.subscriptions = dict(subscriptions)
        self.ping_interval = ping_interval
        self._headers = {"Authorization": jwt, "x-api-key": api_key,
                         "x-client-code": client_code, "x-feed-token": feed_token}
        #: texts received: ``pong``s and JSON errors (never handed on)
        self.pongs = 0
        self.errors: list[str] = []

    def set_credentials(self, jwt: str, feed_token: str) -> None:
        """Fresh daily tokens: used from the next (re)connection on."""
        self._headers["Authorization"] = jwt
        self._headers["x-feed-token"] = feed_token

    def _text(self, text: str) -> None:
        if text.strip() == "pong":
            self.pongs += 1
            return
        # {"correlationID": ..., "errorCode": "E1001|E1002", "errorMessage": ...}, or anything
        shown = redact(text[:300])
        if len(self.errors) < 100:
            self.errors.append(shown)
        log.warning("%s: SmartStream says: %s", self.label, shown)

    async def _pinger(self, ws) -> None:
        try:
            while True:
                await asyncio.sleep(self.ping_interval)
                await ws.send("ping")
        except websockets.exceptions.ConnectionClosed:
            pass  # the session sees it too

    async def _session(self, stop: asyncio.Event) -> str:
        """One connection, until it fails; returns why it ended."""
        try:
            ws = await connect(self._url, open_timeout=self.connect_timeout,
                               max_size=self.max_message_bytes, compression=None,
                               ping_interval=None, additional_headers=self._headers,
                               logger=_ws_log)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                why = redact(str(exc.response.headers.get("x-error-message", ""))[:200])
                self.stats.rejected += 1
                self.stats.last_error = f"login refused (HTTP 401{': ' + why if why else ''})"
                log.error("%s: SmartStream refused the credentials (HTTP 401%s: the JWT and "
                          "feed token expire daily); retrying in %.0f s", self.label,
                          f", {why}" if why else "", self.rejected_retry)
                return "rejected"
            self.stats.last_error = f"HTTP {status}"
            log.warning("%s: connection refused with HTTP %d", self.label, status)
            return f"HTTP {status}"
        except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as exc:
            self.stats.last_error = redact(f"{type(exc).__name__}: {exc}")
            log.warning("%s: cannot connect: %s", self.label, self.stats.last_error)
            return self.stats.last_error
        self._ws = ws
        if stop.is_set():
            ws.transport.abort()
            self._ws = None
            return "stopped"
        self.stream = f"{self.label}-{uuid.uuid4().hex[:12]}"
        self.stats.connects += 1
        self.stats.connected = True
        self.stats.last_message_ns = time.time_ns()
        stats, stream, on_message = self.stats, self.stream, self.on_message
        pinger = asyncio.get_running_loop().create_task(self._pinger(ws))
        try:
            if self.on_connect:
                self.on_connect(stream)
            log.info("%s: connected (stream %s), subscribing %d tokens", self.label, stream,
                     len(self.subscriptions))
            for req in subscribe_requests(self.subscriptions):
                await ws.send(req)
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.heartbeat_timeout) as tm:
                while not stop.is_set():
                    msg = await ws.recv()
                    now = time.time_ns()
                    tm.reschedule(loop.time() + self.heartbeat_timeout)
                    stats.messages += 1
                    stats.last_message_ns = now
                    if isinstance(msg, str):
                        stats.bytes += len(msg)
                        self._text(msg)
                        continue
                    stats.bytes += len(msg)
                    on_message(stream, msg, False, now)
            return "stopped"
        except TimeoutError:
            stats.last_error = f"no message for {self.heartbeat_timeout:g} s (stalled)"
            log.warning("%s: %s; reconnecting", self.label, stats.last_error)
            return "stalled"
        except websockets.exceptions.ConnectionClosed as exc:
            if stop.is_set():
                return "stopped"
            if exc.sent is not None and exc.sent.code == 1009:
                stats.oversized += 1
                stats.last_error = f"a message over {self.max_message_bytes} bytes: refused"
                log.error("%s: %s", self.label, stats.last_error)
                return "oversized"
            stats.last_error = redact(f"connection closed: {exc}")
            log.warning("%s: %s", self.label, stats.last_error)
            return "closed"
        except OSError as exc:
            stats.last_error = redact(f"{type(exc).__name__}: {exc}")
            log.warning("%s: %s", self.label, stats.last_error)
            return stats.last_error
        finally:
            pinger.cancel()
            self._ws = None
            if not stop.is_set():
                if ws.transport is not None:
                    ws.transport.abort()
            else:
                try:
                    await asyncio.wait_for(ws.close(), 2)
                except Exception:  # noqa: BLE001 - closing a broken connection
                    if ws.transport is not None:
                        ws.transport.abort()
