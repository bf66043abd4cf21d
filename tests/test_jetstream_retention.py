"""The log's retention against the writers: messages JetStream dropped (a stream's limits,
discard old) before any writer committed them stop the writer loudly, or with
``--accept-log-loss`` are recorded in ``feed_gaps``; a writer falling behind is warned of
before that.  Real NATS servers of the test's own (``test_jetstream``'s), real PostgreSQL."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from daemon_harness import Simulator, count_ticks, load_instruments, tick_summary, wait_for
from jetstream_harness import (NATS_SERVER, Role, _no_process_left,  # noqa: F401
                               nats_server, sent_ticks, wait_log_committed)

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="needs the nats-server binary")

#: what the writer says, in one line, when retention dropped what it had not committed
LOST = "dropped messages no writer committed"


async def _small_stream(url: str, max_msgs: int) -> None:
    """The log's stream as an operator may set it up: few messages, the oldest dropped."""
    import nats
    from nats.js.api import DiscardPolicy, StreamConfig

    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(StreamConfig(
            name="TEST", subjects=["ingestor.>"], duplicate_window=120.0, max_msgs=max_msgs,
            discard=DiscardPolicy.OLD))
    finally:
        await nc.close()


async def _state(url: str, consumer: str | None = None) -> tuple[int, int, int]:
    """(first sequence, last sequence, the consumer's last delivered stream sequence)."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        st = (await js.stream_info("TEST")).state
        delivered = 0
        if consumer:
            delivered = (await js.consumer_info("TEST", consumer)).delivered.stream_seq or 0
        return st.first_seq, st.last_seq, delivered
    finally:
        await nc.close()


def state(url: str, consumer: str | None = None) -> tuple[int, int, int]:
    return asyncio.run(_state(url, consumer))


def _writing(tmp_path, db, nats_server) -> tuple[Simulator, Role, Role]:
    """A feed and a writer on a stream of at most 600 messages, 1000 ticks written."""
    asyncio.run(_small_stream(nats_server.url, max_msgs=600))
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)
    feed = Role(tmp_path, "feed", db, sim.url, [nats_server.url])
    writer = Role(tmp_path, "writer", db, sim.url, [nats_server.url])
    wait_for(lambda: count_ticks(db) > 1000, timeout=90, what="1000 ticks written")
    return sim, feed, writer


def lost_lines(role: Role) -> list[str]:
    return [x for x in role.output().splitlines() if LOST in x]


def test_retention_dropping_uncommitted_messages_stops_the_writer(tmp_path, db, nats_server):
    """A writer stopped while the feed overflows the stream's limits: the next writer finds
    its subject's committed position dropped with messages after it, and stops (exit 1, one
    line); one started with --accept-log-loss records the loss in feed_gaps and writes on,
    nothing twice."""
    sim, feed, writer = _writing(tmp_path, db, nats_server)
    assert writer.terminate() == 0, writer.output()
    _, stopped_at, _ = state(nats_server.url)
    wait_for(lambda: state(nats_server.url)[0] > stopped_at + 1, timeout=90,
             what="the feed overflowing the stream past the stopped writer")
    again = Role(tmp_path, "writer", db, sim.url, [nats_server.url], name="writer-2")
    assert again.proc.wait(timeout=60) == 1
    again.out.close()
    lines = lost_lines(again)
    assert len(lines) == 1, again.output()
    assert "--accept-log-loss" in lines[0] and "kite-0" in lines[0]
    # the feed stops (everything it received is in the log): the log no longer moves, so
    # the writer reading it from its first message is not itself overtaken by retention
    sim.stop()
    assert feed.terminate() == 0, feed.output()
    # an operator looked: the writer goes on past the hole, recording it
    before = count_ticks(db)
    accepted = Role(tmp_path, "writer", db, sim.url, [nats_server.url], name="writer-3",
                    args=("--accept-log-loss",))
    wait_for(lambda: "accepted (--accept-log-loss)" in accepted.output(), timeout=60,
             what="the loss accepted")
    wait_for(lambda: count_ticks(db) > before, timeout=90, what="writing again")
    wait_log_committed(nats_server.url, db, "everything the log still holds committed")
    assert accepted.terminate() == 0, accepted.output()
    n, distinct = tick_summary(db)
    assert n == distinct  # nothing twice
    assert n < sent_ticks(sim.record)  # (the loss was real: retention dropped some)
    with psycopg.connect(db) as c:
        gaps = c.execute("select connection, stream, started_at, ended_at, reason from "
                         "feed_gaps where reason like 'log retention dropped%'").fetchall()
    assert len(gaps) == 1, gaps
    label, stream, started, ended, _ = gaps[0]
    assert label == "kite-0" and stream.startswith("kite-0-") and started < ended


def test_a_writer_behind_the_retention_is_warned_then_stops(tmp_path, db, nats_server):
    """A writer that cannot commit (its table locked) while the feed goes on: it warns when
    its oldest uncommitted message nears the stream's limit, and once retention dropped
    messages it had not read it stops at the hole (exit 1, one line) rather than go on."""
    sim, feed, writer = _writing(tmp_path, db, nats_server)
    blocker = psycopg.connect(db)
    try:
        blocker.execute("lock table tick_data in access exclusive mode")
        wait_for(lambda: "of stream TEST's retention" in writer.output(), timeout=60,
                 what="the writer warning of its lag against the retention")
        consumer = "ingestor-writer-kite-0"
        wait_for(lambda: (lambda f, _l, d: f > d + 1)(*state(nats_server.url, consumer)),
                 timeout=90, what="retention dropping messages the writer has not read")
    finally:
        blocker.rollback()
        blocker.close()
    assert writer.proc.wait(timeout=60) == 1
    writer.out.close()
    assert len(lost_lines(writer)) == 1, writer.output()
    sim.stop()
    assert feed.terminate() == 0, feed.output()
    n, distinct = tick_summary(db)
    assert n == distinct
