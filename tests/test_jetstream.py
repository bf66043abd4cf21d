"""The log between feed and writer processes: simulator -> feed -> JetStream -> writer ->
PostgreSQL, with real servers (a private ``nats-server`` per test, on free loopback ports,
in the test's temporary folder: ``jetstream_harness``), and the faults each process can
meet.  The 3-node cluster with every fault at once is ``test_jetstream_cluster``."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from ingestor.feed.jetstream import decode_records

from daemon_harness import (ANGEL_ENV, AngelSimulator, Simulator, angel_all_written,
                            angel_feed_toml, angel_modes_toml, angel_stored_ticks, count_ticks,
                            load_angel_master, load_instruments, tick_summary, wait_for)
from jetstream_harness import (NATS_SERVER, Role, _no_process_left, _publish_raw,  # noqa: F401
                               assert_every_tick_once, log_messages, log_records, log_ticks,
                               nats_server, sent_ticks, simulated_records)

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="needs the nats-server binary")


def test_feed_jetstream_writer_every_tick_once(tmp_path, db, nats_server):
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url])
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url])
    wait_for(lambda: count_ticks(db) > 3000, timeout=90, what="3000 ticks written")
    # messages on the subject that are not capture records: set aside, counted, not a stop
    asyncio.run(_publish_raw(nats_server.url, "ingestor.raw.kite-0", [
        (b"\x00\x01", None),
        (b"\x00\x01", {"Nats-Msg-Id": "kite-0-x:notanumber"}),
        (b"\x00\x01", {"Nats-Msg-Id": "s:1", "Ingestor-Recv-Ns": "1", "Ingestor-Kind": "9"}),
        # several records promised, the payload not holding them
        (b"\x00\x01", {"Nats-Msg-Id": "kite-0-x:1-5", "Ingestor-Records": "5",
                        "Ingestor-Recv-Ns": "1"})]))
    wait_for(lambda: writer.output().count("malformed message") == 4, timeout=30,
             what="four malformed messages set aside")
    sim.stop()
    sent = sent_ticks(sim.record)
    wait_for(lambda: count_ticks(db) >= sent, timeout=90, what=f"all {sent} sent ticks written")
    assert feed.terminate() == 0, feed.output()
    assert writer.terminate() == 0, writer.output()
    assert assert_every_tick_once(db, sim.record) == sent
    assert "test-token-secret" not in feed.output() + writer.output()


def test_angel_feed_jetstream_writer_every_tick_once(tmp_path, db, nats_server):
    """Angel One over the log: the feed appends each SmartStream frame (one packet each) as
    it came, the writer decodes them with the SmartStream decoder (the feed's broker)."""
    sim = AngelSimulator(tmp_path, tokens=30, rate=2000, seed=5)
    try:
        load_angel_master(db, sim.master)
        feeds = angel_feed_toml(sim.url, extra=angel_modes_toml(30, 5))
        feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url], feeds=feeds,
                    extra_env=ANGEL_ENV)
        writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url], feeds=feeds)
        wait_for(lambda: count_ticks(db) > 2000, timeout=90, what="2000 ticks written")
    finally:
        sim.stop()  # the recording is complete once the simulator has stopped
    want, n_depth = angel_all_written(sim, db, timeout=90)
    sent = sum(want.values())
    assert feed.terminate() == 0, feed.output()
    assert writer.terminate() == 0, writer.output()
    assert angel_stored_ticks(db) == want        # every tick once, at its exact price
    n, distinct = tick_summary(db)
    assert n == distinct == sent and n_depth > 0
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM order_book_depth20").fetchone()[0] == n_depth
    assert "malformed" not in writer.output()
    out = feed.output() + writer.output()
    for secret in ANGEL_ENV.values():
        assert secret not in out


def test_writer_killed_and_restarted_resumes_exactly_once(tmp_path, db, nats_server):
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url])
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url])
    wait_for(lambda: count_ticks(db) > 2000, timeout=90, what="2000 ticks written")
    writer.kill()  # SIGKILL: batches in flight, acknowledgements not sent
    at_kill = count_ticks(db)
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url])
    wait_for(lambda: count_ticks(db) > at_kill + 2000, timeout=90, what="the new writer writing")
    sim.stop()
    sent = sent_ticks(sim.record)
    wait_for(lambda: count_ticks(db) >= sent, timeout=90, what=f"all {sent} sent ticks written")
    assert feed.terminate() == 0, feed.output()
    assert writer.terminate() == 0, writer.output()
    assert assert_every_tick_once(db, sim.record) == sent


def test_feed_restarted_within_the_window_does_not_double(tmp_path, db, nats_server):
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    # recording: the spool writes every record (without it, records the log acknowledged
    # before the spool's thread came to them are not written, and a feed keeping up leaves
    # little or nothing), so the killed feed leaves records the log has
    record = f"[record]\ndir = \"{tmp_path / 'recorded'}\"\n"
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url], tables=record)
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url])
    wait_for(lambda: count_ticks(db) > 2000, timeout=90, what="2000 ticks written")
    feed.kill()  # its spool keeps the stream's open segment: republished at the restart
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url], tables=record)
    wait_for(lambda: "republished" in feed.output(), timeout=60, what="the leftover republished")
    before = count_ticks(db)
    wait_for(lambda: count_ticks(db) > before + 1000, timeout=90, what="the new stream written")
    sim.stop()
    assert feed.terminate() == 0, feed.output()
    msgs = log_messages(nats_server.url)
    ids = [m.headers["Nats-Msg-Id"] for m in msgs]
    assert len(ids) == len(set(ids))
    # the republished leftover did not double the log: it went in the messages the killed
    # feed had published (their ends kept beside the spool's segments), same ids, dropped
    held = sum(decode_records(m.headers, m.data)[2] for m in msgs)
    assert held == len(log_records(msgs))  # no record twice
    line = next(x for x in feed.output().splitlines() if "republished" in x)
    assert "(0 record(s)" not in line, line  # the log did have them: dropped as duplicates
    in_log = log_ticks(msgs)
    wait_for(lambda: count_ticks(db) >= in_log, timeout=90, what=f"all {in_log} logged ticks")
    assert writer.terminate() == 0, writer.output()
    n, distinct = tick_summary(db)
    assert n == distinct == in_log


def test_jetstream_server_restart_loses_nothing(tmp_path, db, nats_server):
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    # the log is away longer than a short lease: a writer unable to renew stops (its own
    # test); here the outage is within the TTL, so the writer keeps its lease
    long = "lease_ttl = 60.0\nlease_renew = 2.0\n"
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url], lease=long)
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url], lease=long)
    wait_for(lambda: count_ticks(db) > 2000, timeout=90, what="2000 ticks written")
    nats_server.stop()
    wait_for(lambda: "not acknowledged" in feed.output(), timeout=60,
             what="the feed meeting the log's absence")
    nats_server.start()
    before = count_ticks(db)
    wait_for(lambda: count_ticks(db) > before + 2000, timeout=120, what="writing again")
    sim.stop()
    sent = sent_ticks(sim.record)
    wait_for(lambda: count_ticks(db) >= sent, timeout=120, what=f"all {sent} sent ticks written")
    assert feed.terminate() == 0, feed.output()
    assert writer.terminate() == 0, writer.output()
    assert assert_every_tick_once(db, sim.record) == sent


def test_writer_takes_overlapping_and_late_batches_once(tmp_path, db, nats_server):
    """Messages of several records whose ranges overlap (a leftover republished in other
    messages than the first time) or come late (a resend landing after later ones): each
    record is written once, in sequence order."""
    from ingestor.feed.capture import RECORD_HEADER
    from ingestor.feed.jetstream import encode_batch_headers

    cap, recs = simulated_records(tmp_path, db, tokens=10, ticks=3000, seed=9)
    n = len(recs)
    assert n > 60
    stream = "kite-0-0000000b47c4"

    def batch(first: int, last: int):
        data = b"".join(RECORD_HEADER.pack(r.recv_ns, r.kind, len(r.payload)) + r.payload
                        for r in recs[first:last + 1])
        return data, encode_batch_headers(stream, first, last, recs[last].recv_ns)

    ranges = [(0, 9), (10, 19), (5, 24),  # overlaps what came before
              (40, 49), (25, 39),          # a late one: 40..49 wait for it
              (30, 44), (50, n - 1), (45, n - 1)]  # entirely fed already
    asyncio.run(_publish_raw(nats_server.url, "ingestor.raw.kite-0",
                             [batch(a, b) for a, b in ranges]))
    writer = Role(tmp_path, "writer", db, "ws://127.0.0.1:9", [nats_server.url])
    sent = sent_ticks(str(cap))
    wait_for(lambda: count_ticks(db) >= sent, timeout=90, what=f"all {sent} ticks written")
    assert writer.terminate() == 0, writer.output()
    assert assert_every_tick_once(db, str(cap)) == sent
    assert "never came" not in writer.output()
    with psycopg.connect(db) as c:
        assert c.execute("select committed_seq from stream_offsets where stream = %s",
                         (stream,)).fetchone()[0] == recs[-1].seq


def test_writer_puts_a_late_message_back_in_order(tmp_path, db, nats_server):
    """A publish sent again after the ones that followed it were stored lands after them
    (a server lost it, a leader moved): the writer waits for it and feeds the stream in
    sequence order."""
    from ingestor.feed.jetstream import encode_headers

    cap, recs = simulated_records(tmp_path, db, tokens=10, ticks=3000, seed=5)
    assert len(recs) > 40
    stream = "kite-0-0123456789ab"
    order = [*range(0, 10), *range(11, 30), 10, *range(30, len(recs))]
    asyncio.run(_publish_raw(nats_server.url, "ingestor.raw.kite-0", [
        (recs[i].payload, encode_headers(stream, recs[i].seq, recs[i].recv_ns, recs[i].kind))
        for i in order]))
    writer = Role(tmp_path, "writer", db, "ws://127.0.0.1:9", [nats_server.url])
    sent = sent_ticks(str(cap))
    wait_for(lambda: count_ticks(db) >= sent, timeout=90, what=f"all {sent} ticks written")
    assert writer.terminate() == 0, writer.output()
    assert assert_every_tick_once(db, str(cap)) == sent
    with psycopg.connect(db) as c:
        assert c.execute("select committed_seq from stream_offsets where stream = %s",
                         (stream,)).fetchone()[0] == recs[-1].seq


async def _add_stream(url: str, **kw) -> None:
    import nats
    from nats.js.api import StreamConfig

    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(StreamConfig(**kw))
    finally:
        await nc.close()


@pytest.mark.parametrize("existing, said", [
    (dict(name="TEST", subjects=["ingestor.>"], duplicate_window=10.0), "duplicate_window"),
    (dict(name="OTHER", subjects=["ingestor.raw.>"]), "overlap"),
])
def test_a_stream_against_a_guarantee_stops_the_role_loudly(tmp_path, db, nats_server,
                                                            existing, said):
    asyncio.run(_add_stream(nats_server.url, **existing))
    writer = Role(tmp_path, "writer", db, "ws://127.0.0.1:9", [nats_server.url],
                  feed="tokens = [256265]\n")
    assert writer.proc.wait(timeout=60) == 1
    writer.out.close()
    assert said in writer.output()


def test_feed_spools_while_the_log_is_away(tmp_path, db, nats_server):
    """No log at the feed's start: it receives and spools meanwhile, and publishes it all,
    in order, once the server answers."""
    nats_server.stop()
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url])
    spool = tmp_path / "spool-feed"
    wait_for(lambda: sum(p.stat().st_size for p in spool.glob("*.cap")) > 200_000, timeout=60,
             what="the feed spooling without the log")
    nats_server.start()
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url])
    wait_for(lambda: count_ticks(db) > 2000, timeout=90, what="writing once the log is up")
    sim.stop()
    sent = sent_ticks(sim.record)
    wait_for(lambda: count_ticks(db) >= sent, timeout=90, what=f"all {sent} sent ticks written")
    assert feed.terminate() == 0, feed.output()
    assert writer.terminate() == 0, writer.output()
    assert assert_every_tick_once(db, sim.record) == sent
