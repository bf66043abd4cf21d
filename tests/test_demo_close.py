"""The demo's happy path logs no warnings: a server going away at the end is an orderly close.

Every demo ended with ``connection closed: received 1001 (going away)`` as a WARNING; an
orderly close (1000, 1001) is INFO now, an abnormal one (1011: server error) still warns.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from websockets.asyncio.server import serve

from ingestor.feed.kite import KiteFeed


async def _one_session(code: int) -> KiteFeed:
    async def handler(ws):
        await ws.recv()  # the subscription
        await ws.send(b"\x00")  # a heartbeat
        await ws.close(code, "bye")

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        stop = asyncio.Event()
        feed = KiteFeed("t", f"ws://127.0.0.1:{port}", "key", "token", {256265: "ltp"},
                        lambda *a: None, on_disconnect=lambda *a: stop.set())
        await asyncio.wait_for(feed.run(stop), 30)
    return feed


@pytest.mark.parametrize("code, level", [(1001, logging.INFO), (1000, logging.INFO),
                                         (1011, logging.WARNING)])
def test_close_log_level(caplog, code, level):
    caplog.set_level(logging.DEBUG, "ingestor.feed.kite")
    feed = asyncio.run(_one_session(code))
    closed = [r for r in caplog.records
              if r.name == "ingestor.feed.kite" and "connection closed" in r.getMessage()]
    assert len(closed) == 1, caplog.text
    assert closed[0].levelno == level
    assert f"received {code}" in closed[0].getMessage()
    assert feed.stats.messages == 1
    if level == logging.INFO:
        assert not [r for r in caplog.records
                    if r.name.startswith("ingestor") and r.levelno >= logging.WARNING], caplog.text
