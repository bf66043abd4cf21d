"""The SmartStream client against the Angel One simulator: the handshake's headers, a refused
login, subscriptions, text pings, a dropped connection resubscribed on a new stream."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from ingestor._core import SmartStreamDecoder
from ingestor.feed.smartstream import (SmartStreamFeed, check_subscriptions,
                                       subscribe_requests)
from ingestor.sim.smartstream import AngelMarket, AngelSimServer
from ingestor.store.instruments import read_angel

SECRET_JWT = "eyJhbGciOiJIUzUxMiJ9.secret-jwt-value"
SECRET_FEED = "feed-token-0123456789"


async def until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def subs_of(market: AngelMarket, n: int, modes=("ltp", "quote", "snap_quote")):
    keys = list(market.keys)[:n]
    return {k: modes[i % len(modes)] for i, k in enumerate(keys)}


def test_subscribe_requests_group_by_mode_and_exchange_type():
    reqs = subscribe_requests({(1, "3045"): "ltp", (2, "35001"): "ltp", (1, "2885"): "full",
                               (1, "1"): "depth"})
    import json

    got = [json.loads(r) for r in reqs]
    assert [g["params"]["mode"] for g in got] == [1, 3, 4]
    assert got[0]["action"] == 1
    assert got[0]["params"]["tokenList"] == [{"exchangeType": 1, "tokens": ["3045"]},
                                             {"exchangeType": 2, "tokens": ["35001"]}]


@pytest.mark.parametrize("subs,match", [
    ({(1, str(i)): "ltp" for i in range(1001)}, "at most 1000"),
    ({(2, "1"): "depth"}, "nse_cm"),
    ({(1, str(i)): "depth" for i in range(51)}, "at most 50"),
    ({(6, "1"): "ltp"}, "exchange type 6"),
    ({(1, "a b"): "ltp"}, "printable"),
    ({(1, "1"): "full_depth"}, "mode"),
])
def test_what_the_broker_would_refuse_is_a_configuration_error(subs, match):
    with pytest.raises(ValueError, match=match):
        check_subscriptions(subs)


def test_client_against_simulator(caplog):
    async def main():
        market = AngelMarket(40, seed=3)
        subs = subs_of(market, 12)
        async with AngelSimServer(market=market, rate=400, feed_token=SECRET_FEED,
                                  drop_after=150) as sim:
            got = []
            streams, gaps = [], []
            feed = SmartStreamFeed(
                "angel-0", sim.url, "apikey", "C123", SECRET_JWT, SECRET_FEED, subs,
                on_message=lambda s, p, t, r: got.append((s, p, t)),
                on_connect=streams.append,
                on_disconnect=lambda s, st, why: gaps.append((s, why)),
                heartbeat_timeout=5, reconnect_min=0.05, ping_interval=0.05)
            stop = asyncio.Event()
            task = asyncio.create_task(feed.run(stop))
            # dropped once after 150 packets: a second stream, resubscribed, goes on
            await until(lambda: len(streams) == 2 and sum(s == streams[1] for s, _, _ in got) > 50)
            await until(lambda: feed.pongs >= 2)
            stop.set()
            await feed.close()
            await asyncio.wait_for(task, 5)
            return market, subs, sim, feed, got, streams, gaps

    with caplog.at_level(logging.DEBUG):
        market, subs, sim, feed, got, streams, gaps = asyncio.run(main())
    assert gaps and gaps[0][0] == streams[0]
    assert sim.stats["subscribe_requests"] >= 2 * len({m for m in subs.values()})
    assert sim.stats["pings"] >= 2
    assert all(not is_text for _, _, is_text in got)      # pong is the client's own
    dec = SmartStreamDecoder(1 << 12)
    for _, payload, _ in got:
        assert dec.feed(payload)
    st = dec.stats()
    assert st["packets"] == len(got) and st["malformed_messages"] == 0
    seen = {dec.token_of(int(k)) for k in dec.ticks["instrument_token"][:dec.n_ticks]}
    assert seen == set(subs)                               # every subscribed token streamed
    assert st["ltp"] and st["quote"] and st["snap_quote"]
    assert SECRET_JWT not in caplog.text and SECRET_FEED not in caplog.text


def test_refused_login_is_reported_once_and_retried_slowly(caplog):
    async def main():
        async with AngelSimServer(feed_token=SECRET_FEED) as sim:
            feed = SmartStreamFeed("angel-0", sim.url, "apikey", "C123", SECRET_JWT,
                                   "stale-feed-token", {(1, "1"): "ltp"},
                                   on_message=lambda *a: None, rejected_retry=30)
            stop = asyncio.Event()
            task = asyncio.create_task(feed.run(stop))
            await until(lambda: feed.stats.rejected == 1)
            # the next attempt waits rejected_retry (30 s): stopping now ends that wait
            await until(lambda: feed.stats.reconnects == 1)
            stop.set()
            await asyncio.wait_for(task, 5)
            return sim, feed

    with caplog.at_level(logging.INFO):
        sim, feed = asyncio.run(main())
    assert feed.stats.rejected == 1 and sim.stats["rejected_401"] == 1   # not hammered
    assert "Invalid feed token" in feed.stats.last_error
    assert sum("HTTP 401" in r.message for r in caplog.records) == 1
    assert "stale-feed-token" not in caplog.text and SECRET_JWT not in caplog.text


def test_simulator_master_loads_whole(tmp_path):
    market = AngelMarket(80, seed=5)
    path = tmp_path / "OpenAPIScripMaster.json"
    market.write_master(path)
    read = read_angel(path)
    assert read.rejected == {}
    assert {(r.exchange_type, r.token) for r in read.rows} == set(market.keys)
    assert {r.exchange_type for r in read.rows} == {1, 2, 3, 4, 5, 13}
