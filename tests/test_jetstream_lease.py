"""Leases, a replaced log stream and published candles (the log's roles, ``[log]``): real
NATS servers of the test's own (``test_jetstream``'s), real PostgreSQL, no mocks."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time

import psycopg
import pytest

from daemon_harness import Simulator, count_ticks, load_instruments, tick_summary, wait_for
from jetstream_harness import (EPOCH, NATS_SERVER, Role, _no_process_left,  # noqa: F401
                               _publish_raw, assert_every_tick_once,
                               assert_every_tick_outside_once, cpu_burner,
                               log_messages, log_ticks, nats_server, ns, sent_ticks,
                               simulated_records, takeover_gaps, wait_log_committed)

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="needs the nats-server binary")

#: short leases for quick takeovers; a holder stops only after 4.5 s without a renewal (a
#: busy machine is not a death)
TTL, RENEW = 6.0, 1.5
SHORT = f"lease_ttl = {TTL}\nlease_renew = {RENEW}\n"
#: the longest a feed takes to connect to the broker once it holds the lease (a reconnect)
RECONNECT = 3.0


def test_two_writers_one_active_standby_takes_over_when_it_is_killed(tmp_path, db, nats_server,
                                                                    cpu_burner):
    """Under CPU load (a process spinning beside them): the active writer keeps its lease, the
    standby waits until the active one is killed, then takes over once."""
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url], lease=SHORT)
    first = Role(tmp_path, "writer", db, sim.url, [nats_server.url], name="writer-a", lease=SHORT)
    wait_for(lambda: count_ticks(db) > 2000, timeout=90, what="the first writer writing")
    second = Role(tmp_path, "writer", db, sim.url, [nats_server.url], name="writer-b",
                  lease=SHORT)
    wait_for(lambda: "standby" in second.output(), timeout=60, what="the second one waiting")
    before = count_ticks(db)
    wait_for(lambda: count_ticks(db) > before + 1000, timeout=60, what="writing with a standby")
    assert "lease taken" not in second.output()  # still waiting: one writer per subject
    assert "lease lost" not in first.output()  # no renewal missed under the load
    first.kill()  # SIGKILL: batches in flight, its lease not released
    wait_for(lambda: "took over the lease" in second.output(), timeout=60,
             what="the standby taking over")
    at_kill = count_ticks(db)
    wait_for(lambda: count_ticks(db) > at_kill + 1000, timeout=90, what="the standby writing")
    # a standby stopped while it waits: an orderly exit, having taken nothing
    third = Role(tmp_path, "writer", db, sim.url, [nats_server.url], name="writer-c",
                 lease=SHORT)
    wait_for(lambda: "standby" in third.output(), timeout=60, what="a third one waiting")
    assert third.terminate() == 0, third.output()
    assert "lease taken" not in third.output()
    sim.stop()
    sent = sent_ticks(sim.record)
    wait_for(lambda: count_ticks(db) >= sent, timeout=90, what=f"all {sent} sent ticks written")
    assert feed.terminate() == 0, feed.output()
    assert second.terminate() == 0, second.output()
    assert second.output().count("took over the lease") == 1  # one takeover, no flapping
    assert "lease lost" not in second.output()
    assert assert_every_tick_once(db, sim.record) == sent


def test_a_writer_that_cannot_renew_its_lease_stops(tmp_path, db, nats_server):
    """The log away for longer than the lease's TTL: the writer cannot know whether another
    took over, so it stops (exit 1, one line) rather than commit on."""
    sim = Simulator(tmp_path, tokens=5, rate=500)
    load_instruments(db, sim.csv)
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url], lease=SHORT)
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url], lease=SHORT)
    wait_for(lambda: count_ticks(db) > 200, timeout=90, what="writing")
    nats_server.stop()
    assert writer.proc.wait(timeout=60) == 1
    writer.out.close()
    assert "lease lost (no renewal acknowledged" in writer.output()
    nats_server.start()
    sim.stop()
    assert feed.terminate() == 0, feed.output()


def test_two_feeds_standby_takes_over_the_connection(tmp_path, db, nats_server, cpu_burner):
    """A feed process SIGKILLed under CPU load: its standby takes over the connection once;
    every tick the simulator sent outside the recorded gap is stored exactly once, and the
    gap is no longer than the lease's TTL plus a reconnect."""
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    leased = "feed_lease = true\n"
    first = Role(tmp_path, "feed", db, sim.url, [nats_server.url], name="feed-a", lease=SHORT,
                 log=leased)
    wait_for(lambda: "lease taken" in first.output(), timeout=60, what="the first feed's lease")
    second = Role(tmp_path, "feed", db, sim.url, [nats_server.url], name="feed-b", lease=SHORT,
                  log=leased)
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url], lease=SHORT)
    wait_for(lambda: "standby" in second.output(), timeout=60, what="the second feed waiting")
    wait_for(lambda: count_ticks(db) > 2000, timeout=90, what="2000 ticks written")
    assert "lease taken" not in second.output()  # not connected to the broker
    assert "lease lost" not in first.output()  # no renewal missed under the load
    first.kill()  # SIGKILL: what it received and had not published is that gap's
    wait_for(lambda: "took over the lease" in second.output(), timeout=60,
             what="the standby feed taking over")
    at_kill = count_ticks(db)
    wait_for(lambda: count_ticks(db) > at_kill + 2000, timeout=90,
             what="the standby's ticks written")
    third = Role(tmp_path, "feed", db, sim.url, [nats_server.url], name="feed-c", lease=SHORT,
                 log=leased)
    wait_for(lambda: "standby" in third.output(), timeout=60, what="a third feed waiting")
    assert third.terminate() == 0, third.output()  # stopped while waiting: nothing taken
    assert "lease taken" not in third.output()
    sim.stop()
    assert second.terminate() == 0, second.output()
    msgs = log_messages(nats_server.url)
    ids = [m.headers["Nats-Msg-Id"] for m in msgs]
    assert len(ids) == len(set(ids))
    assert len({i.rsplit(":", 1)[0] for i in ids}) >= 2  # both feeds' capture streams
    in_log = log_ticks(msgs)
    wait_for(lambda: count_ticks(db) >= in_log, timeout=90, what=f"all {in_log} logged ticks")
    assert writer.terminate() == 0, writer.output()
    n, distinct = tick_summary(db)
    assert n == distinct == in_log  # every message of the log once, none twice
    gaps = takeover_gaps(db)
    assert len(gaps) == 1, gaps
    label, stream, started, ended, tokens = gaps[0]
    assert label == "kite-0" and stream and stream.startswith("kite-0-")
    assert ended is not None and ended > started
    assert second.output().count("took over the lease") == 1  # one takeover, no flapping
    assert "lease lost" not in second.output()
    # the gap: from the killed feed's last renewal (at the earliest) to the standby's
    # connection: the TTL, the standby's try interval and the estimate's margin (a renewal
    # each), a reconnect
    assert (ended - started).total_seconds() <= TTL + 2 * RENEW + RECONNECT, (started, ended)
    assert_every_tick_outside_once(db, sim.record, {t: (ns(started), ns(ended)) for t in tokens})


def test_roles_tell_systemd_when_they_are_ready(tmp_path, db, nats_server):
    """Under the one unit template (``Type=notify``, deploy/systemd/ingestor@.service) every
    role says READY=1: an active feed once it receives, a standby feed while it waits for its
    lease (not a start left hanging until ``TimeoutStartSec`` fails it), a writer once its
    database answered; each pings the watchdog and says STOPPING=1 at SIGTERM."""
    from test_sdnotify import NotifySocket

    sim = Simulator(tmp_path, tokens=5, rate=500)
    load_instruments(db, sim.csv)
    leased = "feed_lease = true\n"
    socks = {name: NotifySocket() for name in ("feed-a", "feed-b", "writer")}

    def env(name: str) -> dict:
        return {"NOTIFY_SOCKET": socks[name].path, "WATCHDOG_USEC": "2000000"}

    try:
        first = Role(tmp_path, "feed", db, sim.url, [nats_server.url], name="feed-a",
                     lease=SHORT, log=leased, extra_env=env("feed-a"))
        ready = socks["feed-a"].wait_for("READY")
        assert ready["STATUS"] == "receiving on 1 of 1 connection(s); log connected", ready
        second = Role(tmp_path, "feed", db, sim.url, [nats_server.url], name="feed-b",
                      lease=SHORT, log=leased, extra_env=env("feed-b"))
        ready = socks["feed-b"].wait_for("READY")
        assert ready["STATUS"] == ("receiving on 0 of 1 connection(s); standby for 1 (another "
                                   "process holds the lease); log connected"), ready
        assert "lease taken" not in second.output()
        writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url], lease=SHORT,
                      extra_env=env("writer"))
        ready = socks["writer"].wait_for("READY")
        assert ready["STATUS"] == "database connected", ready
        for s in socks.values():
            s.wait_for("WATCHDOG")
        for role in (second, first, writer):
            assert role.terminate() == 0, role.output()
        for s in socks.values():
            assert s.wait_for("STOPPING")["STATUS"].startswith("stopping (SIGTERM)")
            assert s.keys() == ["READY", "STOPPING"]
    finally:
        sim.stop()
        for s in socks.values():
            s.close()


async def _delete_stream(url: str, name: str = "TEST") -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


def test_a_log_stream_deleted_and_recreated_stops_the_writer(tmp_path, db, nats_server):
    sim = Simulator(tmp_path, tokens=10, rate=1000)
    load_instruments(db, sim.csv)
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url])
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url])
    wait_for(lambda: count_ticks(db) > 1000, timeout=90, what="writing")
    asyncio.run(_delete_stream(nats_server.url))
    assert writer.proc.wait(timeout=60) == 1
    writer.out.close()
    lines = [x for x in writer.output().splitlines() if "was deleted under the writer" in x]
    assert len(lines) == 1, writer.output()
    # created again (as a feed's restart or an operator would): its numbering restarts
    asyncio.run(_publish_raw(nats_server.url, "ingestor.raw.kite-0", []))
    again = Role(tmp_path, "writer", db, sim.url, [nats_server.url], name="writer-2")
    assert again.proc.wait(timeout=60) == 1
    again.out.close()
    assert "was deleted and re-created" in again.output()
    assert "--accept-new-log-stream" in again.output()
    before = count_ticks(db)
    # an operator checked: the writer reads the new stream; nothing doubles
    accepted = Role(tmp_path, "writer", db, sim.url, [nats_server.url], name="writer-3",
                    args=("--accept-new-log-stream",))
    wait_for(lambda: "accepted as new" in accepted.output(), timeout=60, what="accepted")
    wait_for(lambda: count_ticks(db) > before + 500, timeout=90, what="writing again")
    sim.stop()
    assert feed.terminate() == 0, feed.output()
    # everything the new stream holds is committed (none skipped), nothing twice
    assert wait_log_committed(nats_server.url, db, "the new stream's messages committed")
    assert accepted.terminate() == 0, accepted.output()
    n, distinct = tick_summary(db)
    assert n == distinct
    # a later writer without the flag reads on: the new stream is the recorded one
    later = Role(tmp_path, "writer", db, sim.url, [nats_server.url], name="writer-4")
    wait_for(lambda: "reading ingestor.raw.kite-0" in later.output(), timeout=60,
             what="the next writer reading")
    assert later.terminate() == 0, later.output()


class CandleSubscriber:
    """Core NATS subscriber on the candles' subjects, in a thread of its own."""

    def __init__(self, url: str, subject: str):
        self.url, self.subject = url, subject
        self.msgs: list = []
        self.ready = threading.Event()
        self.done = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    async def _run(self) -> None:
        import nats

        nc = await nats.connect(self.url)
        self.done = asyncio.Event()
        self.loop = asyncio.get_running_loop()

        async def got(m):
            self.msgs.append((m.subject, m.data))
        await nc.subscribe(self.subject, cb=got, pending_msgs_limit=1 << 20)
        await nc.flush()
        self.ready.set()
        await self.done.wait()
        await nc.drain()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.done.set)
        self.thread.join(30)


def test_closed_candles_published_after_commit(tmp_path, db, nats_server):
    import json
    from decimal import Decimal

    from ingestor.feed.jetstream import encode_headers

    cap, recs = simulated_records(tmp_path, db, tokens=5, ticks=4000, seed=7)
    stream = "kite-0-00000000c0de"
    asyncio.run(_publish_raw(nats_server.url, "ingestor.raw.kite-0", [
        (r.payload, encode_headers(stream, r.seq, r.recv_ns, r.kind)) for r in recs]))
    sub = CandleSubscriber(nats_server.url, "candles.>")
    writer = Role(tmp_path, "writer", db, "ws://127.0.0.1:9", [nats_server.url],
                  log='publish_candles = true\ncandles_prefix = "candles"\n')
    sent = sent_ticks(str(cap))
    wait_for(lambda: count_ticks(db) >= sent, timeout=90, what=f"all {sent} ticks written")
    assert writer.terminate() == 0, writer.output()
    sub.stop()
    assert sub.msgs, "no candle published"
    with psycopg.connect(db) as c:
        rows = c.execute(
            "select i.instrument_token, o.timeframe, o.time, o.open_price, o.high_price, "
            "o.low_price, o.close_price, o.volume, o.trade_count from ohlc_candles o join "
            "instruments i on i.id = o.instrument_id").fetchall()
    def us(t) -> int:
        return (t - EPOCH) // dt.timedelta(microseconds=1)

    stored = {(tok, tf, us(t)): r for tok, tf, t, *r in rows}
    latest: dict = {}
    for tok, tf, t, *_ in rows:
        latest[(tok, tf)] = max(latest.get((tok, tf), us(t)), us(t))
    seen = {}
    for subject, data in sub.msgs:  # the last message of a candle is its stored version
        m = json.loads(data)
        assert subject == f"candles.{m['timeframe']}.{m['token']}"
        seen[(m["token"], m["timeframe"], m["time_us"])] = m
    for key, m in seen.items():
        assert key in stored, m
        o, h, lo, cl, vol, n = stored[key]
        assert [Decimal(m["open"]), Decimal(m["high"]), Decimal(m["low"]),
                Decimal(m["close"])] == [o, h, lo, cl], m
        assert (m["volume"], m["trade_count"]) == (vol, n), m
        assert m["time"] == (EPOCH + dt.timedelta(microseconds=key[2])).isoformat().replace(
            "+00:00", "Z")
    # every stored candle that a later one of its instrument and timeframe closed was
    # published (the last of each was still forming at the end: written, not published)
    missing = [k for k in stored if k[2] < latest[(k[0], k[1])] and k not in seen]
    assert not missing, missing[:5]


def _with_lease_bucket(url: str, scenario) -> None:
    """``await scenario(js, kv, cfg)`` against the lease bucket of stream TEST (TTL 3 s,
    renewed every 0.5 s) on the server at ``url``."""
    import nats

    from ingestor.config import LogConfig
    from ingestor.feed.lease import lease_bucket

    cfg = LogConfig(servers=[url], stream="TEST", lease_ttl=3.0, lease_renew=0.5)

    async def main():
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await scenario(js, await lease_bucket(js, cfg), cfg)
        finally:
            await nc.close()

    asyncio.run(main())


def test_a_lease_holder_fences_itself_when_the_key_is_taken(nats_server, cpu_burner):
    """The lease's own rules against a real bucket, under CPU load: one holder at a time (the
    holder renews for two TTLs without a miss, the standby never takes it meanwhile), a
    standby takes an expired key, and a holder whose key another wrote (an operator, a
    takeover) calls its fence at its next renewal instead of going on."""
    from ingestor.feed.lease import Lease

    async def scenario(js, kv, cfg):
        lost: list[str] = []
        a = Lease(kv, "writer.x", cfg, "a", "a", on_lost=lost.append)
        b = Lease(kv, "writer.x", cfg, "b", "b", on_lost=lost.append)
        stop = asyncio.Event()
        assert await a.take(stop)
        keeper = asyncio.create_task(a.keep())
        waiting = asyncio.create_task(b.take(stop))
        # a renews well past the TTL (twice its length in renewals): b waits meanwhile
        first, deadline = a.revision, time.monotonic() + 60
        while a.revision is not None and a.revision < first + 2 * cfg.lease_ttl / \
                cfg.lease_renew:
            assert time.monotonic() < deadline, "a does not renew"
            await asyncio.sleep(0.05)
        assert a.held and not waiting.done() and lost == []
        keeper.cancel()  # a dies without a word
        assert await asyncio.wait_for(waiting, timeout=5 * cfg.lease_ttl)
        assert b.previous is not None and b.previous.holder == "a"
        keeper = asyncio.create_task(b.keep())
        await kv.put("writer.x", b'{"holder": "intruder"}')  # the key taken from b
        await asyncio.wait_for(keeper, timeout=5 * cfg.lease_ttl)
        assert lost == ["b"] and not b.held

    _with_lease_bucket(nats_server.url, scenario)


def test_a_lease_taken_after_its_bucket_was_away_longer_than_its_ttl_is_kept(nats_server):
    """A standby whose attempts were refused for longer than the TTL (no stream answering:
    the bucket's replica group electing a leader after a node died) and that then takes the
    free key holds it from that take: it renews on, rather than fencing itself at once as if
    held since its first refused try (a standby writer took over and stopped so in the
    cluster test)."""
    from ingestor.feed.lease import Lease, bucket_name, lease_bucket

    async def scenario(js, kv, cfg):
        await js.delete_key_value(bucket_name(cfg))  # no stream answers the key's subject
        lost: list[str] = []
        a = Lease(kv, "writer.y", cfg, "a", "a", on_lost=lost.append)
        stop = asyncio.Event()
        taking = asyncio.create_task(a.take(stop))
        away = time.monotonic()
        while time.monotonic() - away < cfg.lease_ttl:
            assert not taking.done()  # nothing to take while no stream answers
            await asyncio.sleep(0.1)
        await lease_bucket(js, cfg)
        assert await asyncio.wait_for(taking, timeout=60)
        keeper = asyncio.create_task(a.keep())
        first, deadline = a.revision, time.monotonic() + 60
        while a.revision is not None and a.revision < first + 4:
            assert time.monotonic() < deadline, "a does not renew"
            await asyncio.sleep(0.05)
        assert a.held and lost == []
        keeper.cancel()

    _with_lease_bucket(nats_server.url, scenario)
