"""Kite Connect ticker client: one WebSocket connection of the daemon.

Protocol (Kite Connect v3 WebSocket docs; broker-frames.md section 1):
``wss://ws.kite.trade?api_key=...&access_token=...``; JSON text requests
``{"a": "subscribe", "v": [tokens]}`` and ``{"a": "mode", "v": [mode,
[tokens]]}``; binary market-data messages and 1-byte heartbeats; text
messages (order postbacks, errors, broker messages).

The client hands every message, untouched, to ``on_message`` with its
receive time; it does nothing else with them.  It keeps the connection up:
a watchdog reconnects when nothing (not even a heartbeat) arrived for
``heartbeat_timeout``; reconnects back off exponentially with jitter; a
rejected token (HTTP 403: expired or wrong) is reported once, clearly, and
retried slowly.  Every (re)connection is a new stream with a fresh id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from ingestor.logs import redact

log = logging.getLogger(__name__)

MODES = ("ltp", "quote", "full")


def feed_url(base: str, api_key: str, access_token: str) -> str:
    """``base`` with the ``api_key`` and ``access_token`` query parameters added."""
    parts = urlsplit(base)
    query = "&".join(q for q in (parts.query, urlencode({"api_key": api_key,
                                                          "access_token": access_token})) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))


def subscribe_requests(subscriptions: dict[int, str]) -> list[str]:
    """The JSON text requests subscribing ``{token: mode}``."""
    tokens = sorted(subscriptions)
    out = [json.dumps({"a": "subscribe", "v": tokens})]
    for mode in MODES:
        group = [t for t in tokens if subscriptions[t] == mode]
        if group:
            out.append(json.dumps({"a": "mode", "v": [mode, group]}))
    return out


#: The largest WebSocket message accepted.  A Kite message of 3000 full packets is ~550 KB;
#: 16 MiB is far above any real frame, and far below what a spool record can hold (2^32).
MAX_MESSAGE_BYTES = 16 << 20
#: close codes of an orderly close: normal closure, going away (a server shutting down)
ORDERLY_CLOSE = (1000, 1001)


@dataclass
class FeedStats:
    connects: int = 0
    reconnects: int = 0
    rejected: int = 0
    messages: int = 0
    bytes: int = 0
    last_message_ns: int = 0
    connected: bool = False
    last_error: str = ""
    gaps: list = field(default_factory=list)
    #: messages over ``max_message_bytes`` (the connection is closed with 1009 and reopened)
    oversized: int = 0


class KiteFeed:
    """One Kite ticker connection, kept up until ``stop`` is set.

    Parameters
    ----------
    label : str
        The connection's name in logs, metrics and ``feed_gaps`` (``kite-0``).
    url, api_key, access_token : str
        The endpoint and credentials (query parameters are added here).
    subscriptions : dict
        ``{token: mode}`` to subscribe on every connect.
    on_message : callable
        ``on_message(stream, payload: bytes, is_text: bool, recv_ns: int)``,
        called in the event loop for every message, in order.
    on_connect, on_disconnect : callable, optional
        ``on_connect(stream)``; ``on_disconnect(stream, started_ns, reason)``
        when a connection ends (the start of the gap).
    """

    def __init__(self, label: str, url: str, api_key: str, access_token: str,
                 subscriptions: dict[int, str], on_message: Callable, *,
                 on_connect: Callable | None = None, on_disconnect: Callable | None = None,
                 heartbeat_timeout: float = 10.0, reconnect_min: float = 0.5,
                 reconnect_max: float = 30.0, rejected_retry: float = 60.0,
                 connect_timeout: float = 10.0, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.label = label
        self._url = feed_url(url, api_key, access_token)
        self.subscriptions = dict(subscriptions)
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.heartbeat_timeout = heartbeat_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.rejected_retry = rejected_retry
        self.connect_timeout = connect_timeout
        self.max_message_bytes = max_message_bytes
        self.stats = FeedStats()
        #: the client's logger (a broker's subclass logs under its own module)
        self._log = log
        self.stream: str | None = None
        self._ws = None
        #: set by a reload (fresh credentials): the connection's close is not a fault
        self._reload = False
        #: set to cut the wait before the next attempt short (a reload)
        self._wake: asyncio.Event | None = None

    async def run(self, stop: asyncio.Event) -> None:
        # Not a stamina loop (the writer's and the log's are): every wait here must end at
        # once when ``stop`` is set or a reload wakes it (``_pause``), and stamina sleeps with
        # asyncio.sleep, which only cancelling the task ends -- that would cancel the session
        # too, which closes its socket in order on stop; the backoff restarts once a
        # connection was up yet still waits ``reconnect_min`` first (a server that accepts and
        # closes at once is not hammered), where a fresh stamina loop tries at once; and the
        # wait depends on how the session ended (``rejected_retry``, none after a reload).
        # What stamina would give is the two lines of jittered doubling below.
        delay = self.reconnect_min
        first = True
        while not stop.is_set():
            if not first:
                self._before_reconnect()
            first = False
            started = time.time_ns()
            reason = await self._session(stop)
            if stop.is_set():
                break
            if self.stream is not None and self.on_disconnect:
                self.on_disconnect(self.stream, started if not self.stats.connected else time.time_ns(), reason)
            if reason == "rejected":
                wait = self.rejected_retry
            elif reason == "reload":
                wait = 0.0
            else:
                wait = delay * (0.5 + random.random())
                delay = min(delay * 2, self.reconnect_max)
            if self.stats.connected:
                delay = self.reconnect_min  # it was up: start backing off afresh
            self.stats.connected = False
            self.stats.reconnects += 1
            await self._pause(stop, wait)

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        """Wait before the next attempt: ``seconds``, or until stopped or woken (a reload)."""
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.clear()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    # -- what a broker changes (the rest of the session is shared) -------------------------

    def _before_reconnect(self) -> None:
        """Called before every connection attempt but the first (fresh credentials)."""

    def _connect(self):
        """The connection attempt: ``websockets.asyncio.client.connect(...)``."""
        return connect(self._url, open_timeout=self.connect_timeout,
                       max_size=self.max_message_bytes, compression=None, ping_interval=None,
                       additional_headers={"X-Kite-Version": "3"})

    def _refused(self, exc: InvalidStatus) -> bool:
        """True (said once, clearly) when the broker refused the credentials."""
        if exc.response.status_code != 403:
            return False
        self.stats.rejected += 1
        self.stats.last_error = "access token rejected (HTTP 403)"
        self._log.error("%s: the broker rejected the API key or access token (HTTP 403: "
                        "expired or wrong); retrying in %.0f s", self.label, self.rejected_retry)
        return True

    def _requests(self) -> list[str]:
        """The subscription requests sent on every connect."""
        return subscribe_requests(self.subscriptions)

    def _started(self, ws) -> list:
        """Tasks that run beside the receive loop of a connection (cancelled at its end)."""
        return []

    def _text(self, stream: str, msg: str, now: int) -> None:
        """A text message: Kite's (postbacks, errors) are handed on as they came."""
        payload = msg.encode()
        self.stats.bytes += len(payload)
        self.on_message(stream, payload, True, now)

    # -- one connection ----------------------------------------------------------------------

    async def _session(self, stop: asyncio.Event) -> str:
        """One connection, until it fails; returns why it ended."""
        try:
            ws = await self._connect()
        except InvalidStatus as exc:
            if self._refused(exc):
                return "rejected"
            status = exc.response.status_code
            self.stats.last_error = f"HTTP {status}"
            self._log.warning("%s: connection refused with HTTP %d", self.label, status)
            return f"HTTP {status}"
        except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as exc:
            self.stats.last_error = redact(f"{type(exc).__name__}: {exc}")
            self._log.warning("%s: cannot connect: %s", self.label,
                              self.stats.last_error)
            return self.stats.last_error
        self._ws = ws
        if stop.is_set():  # connected after the daemon began to stop: not a stream
            ws.transport.abort()
            self._ws = None
            return "stopped"
        self.stream = f"{self.label}-{uuid.uuid4().hex[:12]}"
        self.stats.connects += 1
        self.stats.connected = True
        self.stats.last_message_ns = time.time_ns()
        on_message = self.on_message
        stats = self.stats
        stream = self.stream
        text = self._text
        side = self._started(ws)
        self._reload = False
        try:
            if self.on_connect:
                self.on_connect(self.stream)
            self._log.info("%s: connected (stream %s), subscribing %d tokens", self.label,
                           self.stream, len(self.subscriptions))
            for req in self._requests():
                await ws.send(req)
            loop = asyncio.get_running_loop()
            recv = ws.recv
            # The watchdog's deadline is pushed at most every ``slack`` seconds: a reschedule
            # (a timer cancelled and made again, several µs) per message was the largest cost
            # of a feed that sends one packet per message (Angel One).  A stall is still said
            # only after ``heartbeat_timeout`` of silence, at most ``slack`` later.
            hb = self.heartbeat_timeout
            slack = hb / 16
            push_at = 0.0
            # Stopping closes the socket (close()), which ends recv() below.
            async with asyncio.timeout(hb + slack) as tm:
                while not stop.is_set():
                    msg = await recv()
                    now = time.time_ns()
                    t = loop.time()
                    if t >= push_at:
                        tm.reschedule(t + hb + slack)
                        push_at = t + slack
                    stats.messages += 1
                    stats.last_message_ns = now
                    if isinstance(msg, str):
                        text(stream, msg, now)
                        continue
                    stats.bytes += len(msg)
                    on_message(stream, msg, False, now)
            return "stopped"
        except TimeoutError:
            stats.last_error = f"no message for {self.heartbeat_timeout:g} s (stalled)"
            self._log.warning("%s: %s; reconnecting", self.label, stats.last_error)
            return "stalled"
        except websockets.exceptions.ConnectionClosed as exc:
            if stop.is_set():
                return "stopped"
            if self._reload:
                return "reload"
            if exc.sent is not None and exc.sent.code == 1009:
                stats.oversized += 1
                stats.last_error = (f"a message over {self.max_message_bytes} bytes (no real "
                                    f"frame is near that): refused, reconnecting")
                self._log.error("%s: %s", self.label, stats.last_error)
                return "oversized"
            stats.last_error = redact(f"connection closed: {exc}")
            # 1000 (normal) and 1001 (going away: a server shutting down or restarting) are an
            # orderly close (RFC 6455 section 7.4.1), not a fault: INFO; the rest warn
            orderly = exc.rcvd is not None and exc.rcvd.code in ORDERLY_CLOSE
            self._log.log(logging.INFO if orderly else logging.WARNING, "%s: %s", self.label,
                          stats.last_error)
            return "closed"
        except OSError as exc:
            stats.last_error = redact(f"{type(exc).__name__}: {exc}")
            self._log.warning("%s: %s", self.label, stats.last_error)
            return stats.last_error
        finally:
            for t in side:
                t.cancel()
            self._ws = None
            if not stop.is_set():
                # a stalled or broken peer would not answer a closing handshake
                if ws.transport is not None:
                    ws.transport.abort()
            else:
                try:
                    await asyncio.wait_for(ws.close(), 2)
                except Exception:  # noqa: BLE001 - closing a broken connection
                    if ws.transport is not None:
                        ws.transport.abort()
