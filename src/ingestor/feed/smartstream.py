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

Everything else is :class:`ingestor.feed.kite.KiteFeed`'s (this class changes only its
hooks: the connect, a refused login, the requests, text messages, the pinger): the receive
loop, the reconnect loop with
exponential backoff and jitter, the watchdog (nothing received, not even a ``pong``, for
``heartbeat_timeout``: reconnect), a refused login reported once and retried slowly, a
fresh stream id per connection, resubscription on every connect.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
    refresh : callable, optional
        ``refresh() -> (jwt, feed_token)``: the credentials read again (the daemon: the
        credentials file), called before every reconnection.  The JWT and the feed token
        expire daily; a refused login (HTTP 401) says so and the next attempt uses what the
        file holds then.  A failing ``refresh`` keeps the tokens it had (said once).
    """

    def __init__(self, label: str, url: str, api_key: str, client_code: str, jwt: str,
                 feed_token: str, subscriptions: Subscriptions, on_message: Callable, *,
                 on_connect: Callable | None = None, on_disconnect: Callable | None = None,
                 heartbeat_timeout: float = 40.0, reconnect_min: float = 0.5,
                 reconnect_max: float = 30.0, rejected_retry: float = 60.0,
                 connect_timeout: float = 10.0, ping_interval: float = 30.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 refresh: Callable[[], tuple[str, str]] | None = None):
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
        self.refresh = refresh
        self._refresh_failed = False
        self._log = log
        #: texts received: ``pong``s and JSON errors (never handed on)
        self.pongs = 0
        self.errors: list[str] = []
        #: times fresh credentials were taken (``refresh`` gave other tokens)
        self.credential_changes = 0

    def set_credentials(self, jwt: str, feed_token: str) -> None:
        """Fresh daily tokens: used from the next (re)connection on."""
        if (jwt, feed_token) != (self._headers["Authorization"], self._headers["x-feed-token"]):
            self.credential_changes += 1
        self._headers["Authorization"] = jwt
        self._headers["x-feed-token"] = feed_token

    async def reload(self) -> None:
        """Reconnect now with the credentials read again (an operator's SIGHUP to the daemon
        after writing fresh tokens to the credentials file): a live connection is closed (not
        a fault: no warning), a wait before the next attempt (a refused login's) is cut
        short."""
        if self._wake is not None:
            self._wake.set()
        if self._ws is not None:
            self._reload = True
            await self._ws.close()

    def _before_reconnect(self) -> None:
        if self.refresh is None:
            return
        try:
            jwt, feed_token = self.refresh()
        except Exception as exc:  # noqa: BLE001 - a file mid-write, a bad line: keep the old
            if not self._refresh_failed:
                log.warning("%s: cannot read the credentials again (%s); keeping the ones "
                            "read before", self.label, redact(str(exc))[:300])
            self._refresh_failed = True
            return
        self._refresh_failed = False
        before = self.credential_changes
        self.set_credentials(jwt, feed_token)
        if self.credential_changes != before:
            log.info("%s: fresh JWT and feed token read from the credentials", self.label)

    def _connect(self):
        return connect(self._url, open_timeout=self.connect_timeout,
                       max_size=self.max_message_bytes, compression=None,
                       ping_interval=None, additional_headers=self._headers, logger=_ws_log)

    def _refused(self, exc: InvalidStatus) -> bool:
        if exc.response.status_code != 401:
            return False
        why = redact(str(exc.response.headers.get("x-error-message", ""))[:200])
        self.stats.rejected += 1
        self.stats.last_error = f"login refused (HTTP 401{': ' + why if why else ''})"
        log.error("%s: SmartStream refused the credentials (HTTP 401%s). The JWT and feed token "
                  "expire daily: write fresh ones (the jwt and feed_token lines) to the feed's "
                  "credentials file; it is read again before the next attempt, in %.0f s "
                  "(SIGHUP: at once)", self.label, f", {why}" if why else "", self.rejected_retry)
        return True

    def _requests(self) -> list[str]:
        return subscribe_requests(self.subscriptions)

    def _started(self, ws) -> list:
        return [asyncio.get_running_loop().create_task(self._pinger(ws))]

    def _text(self, stream: str, msg: str, now: int) -> None:
        self.stats.bytes += len(msg)
        if msg.strip() == "pong":
            self.pongs += 1
            return
        # {"correlationID": ..., "errorCode": "E1001|E1002", "errorMessage": ...}, or anything
        shown = redact(msg[:300])
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
