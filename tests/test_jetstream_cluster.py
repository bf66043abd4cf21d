"""Issue 11's cluster test: a 3-node NATS cluster on loopback ports, a stream (and the lease
bucket) with 3 replicas, the simulator as the broker on two connections, two feed processes
and two writer processes, and mid-stream, one after the other: the stream leader's node
SIGKILLed and restarted, the active writer SIGKILLed, the database crashed and restarted,
the active feed SIGKILLed.  At the end every tick the simulator sent is in ``tick_data``
exactly once, but for those within a connection's takeover gap in ``feed_gaps`` (at most
once), each gap no longer than the lease's TTL plus a reconnect, and the candles equal SQL
over the ticks.

Leases are taken per connection (feeds) and per subject (writers), and a process takes every
one that is free: the first feed and the first writer hold both connections' and both
subjects' leases, the second of each waits as the standby for both (there is no setting to
prefer one process for a connection), so a SIGKILL moves two leases at once."""

from __future__ import annotations

import signal
import time

import psycopg
import pytest

from daemon_harness import Simulator, count_ticks, load_instruments, tick_summary, wait_for
from jetstream_harness import (NATS_SERVER, Role, _no_process_left,  # noqa: F401
                               assert_candles_equal_sql, assert_every_tick_outside_once,
                               last_seq, log_messages, log_ticks, nats_cluster, ns,
                               sent_ticks, stream_leader, takeover_gaps)
from pg_private import private_pg, private_pg_running  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="needs the nats-server binary")

#: leases that outlast a node's death: a raft group whose leader died elects another within
#: NATS 2.9's election timeout (up to 9 s), during which no renewal is acknowledged; a
#: holder stops after TTL - RENEW without one
TTL, RENEW = 15.0, 2.5
LEASE = f"lease_ttl = {TTL}\nlease_renew = {RENEW}\n"
#: the longest a feed takes to connect to the broker once it holds the lease (a reconnect)
RECONNECT = 3.0
#: 20 instruments over two connections (kite-0, kite-1): two subjects, two leases per role
FEED = "tokens_per_connection = 10\n"
CONNECTIONS = 2


def _say(what: str) -> None:
    print(f"[cluster] {what}", flush=True)


@pytest.mark.slow
def test_two_feeds_two_writers_on_three_replicas_through_every_fault(
        tmp_path, private_pg_running, nats_cluster):
    pg = private_pg_running
    db = pg.dsn()
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("truncate tick_data, ohlc_candles, order_book_snapshots, stream_offsets, "
                  "feed_gaps")
    urls = [n.url for n in nats_cluster]
    sim = Simulator(tmp_path, tokens=20, rate=2000)
    load_instruments(db, sim.csv)

    def role(kind: str, name: str) -> Role:
        leased = "replicas = 3\n" + ("feed_lease = true\n" if kind == "feed" else "")
        return Role(tmp_path, kind, db, sim.url, urls, name=name, feed=FEED, lease=LEASE,
                    log=leased)

    def grows(by: int, what: str, timeout: float = 120) -> None:
        at = count_ticks(db)
        wait_for(lambda: count_ticks(db) > at + by, timeout=timeout, what=what)

    # the first of each role takes both leases, the second waits for both
    feed_a = role("feed", "feed-a")
    wait_for(lambda: feed_a.output().count("lease taken") == CONNECTIONS, timeout=60,
             what="the first feed holding both connections")
    writer_a = role("writer", "writer-a")
    wait_for(lambda: writer_a.output().count("lease taken") == CONNECTIONS, timeout=60,
             what="the first writer holding both subjects")
    feed_b, writer_b = role("feed", "feed-b"), role("writer", "writer-b")
    for r in (feed_b, writer_b):
        wait_for(lambda r=r: "standby" in r.output(), timeout=60, what=f"{r.name} waiting")
    grows(2000, "2000 ticks written")

    # 1. the node leading the stream crashes: the other two keep its quorum, elect a leader
    leader = stream_leader(urls)
    victim = next(n for n in nats_cluster if n.name == leader)
    victim.stop(signal.SIGKILL)
    t0 = time.monotonic()
    grows(2000, "writing on with the stream's leader node down")
    _say(f"node {leader} (stream leader) killed: 2000 more ticks written in "
         f"{time.monotonic() - t0:.1f} s, new leader {stream_leader(urls)}")
    victim.start()

    # 2. the active writer SIGKILLed: the standby takes both subjects over
    writer_a.kill()
    t0 = time.monotonic()
    wait_for(lambda: writer_b.output().count("took over the lease") == CONNECTIONS,
             timeout=90, what="the standby writer taking both subjects over")
    _say(f"writer SIGKILLed at {count_ticks(db)} ticks: standby took over in "
         f"{time.monotonic() - t0:.1f} s")
    grows(1000, "the standby writer writing")
    writer_a = role("writer", "writer-a2")  # restarted by its supervisor: a standby now
    wait_for(lambda: "standby" in writer_a.output(), timeout=60, what="the restarted writer")

    # 3. the database crashes: the feed publishes on into the log, the writer waits for it
    pg.stop("immediate")
    at_crash = last_seq(urls)
    wait_for(lambda: last_seq(urls) > at_crash + 300, timeout=120,
             what="the log growing while the database is away")
    pg.start()
    t0 = time.monotonic()
    grows(1000, "writing again after the database's restart")
    _say(f"database crashed and restarted: writing again {time.monotonic() - t0:.1f} s "
         "after its start")

    # 4. the active feed SIGKILLed: the standby takes both connections over
    feed_a.kill()
    t0 = time.monotonic()
    wait_for(lambda: feed_b.output().count("took over the lease") == CONNECTIONS, timeout=90,
             what="the standby feed taking both connections over")
    _say(f"feed SIGKILLed: standby took over in {time.monotonic() - t0:.1f} s")
    grows(2000, "the standby feed's ticks written")
    sim.stop()
    assert feed_b.terminate() == 0, feed_b.output()

    # everything the log holds is written once; what it holds is the sent ticks outside
    # each connection's takeover gap (and possibly some within it)
    msgs = log_messages(urls)
    ids = [m.headers["Nats-Msg-Id"] for m in msgs]
    assert len(ids) == len(set(ids))
    in_log = log_ticks(msgs)
    wait_for(lambda: count_ticks(db) >= in_log, timeout=120, what=f"all {in_log} logged ticks")
    assert writer_b.terminate() == 0, writer_b.output()
    assert writer_a.terminate() == 0, writer_a.output()
    assert "lease taken" not in writer_a.output()  # the restarted one stayed a standby
    n, distinct = tick_summary(db)
    assert n == distinct == in_log  # every message of the log once, none twice

    gaps = takeover_gaps(db)
    assert [g[0] for g in gaps] == [f"kite-{i}" for i in range(CONNECTIONS)], gaps
    per_token = {}
    for label, stream, started, ended, tokens in gaps:
        assert stream and stream.startswith(f"{label}-"), (label, stream)
        assert ended is not None and ended > started, (label, started, ended)
        length = (ended - started).total_seconds()
        _say(f"{label}: takeover gap {length:.1f} s over {len(tokens)} instruments")
        # from the killed feed's last renewal (at the earliest) to the standby's connection:
        # the TTL, the standby's try interval and the estimate's margin, a reconnect
        assert length <= TTL + 2 * RENEW + RECONNECT, (label, started, ended)
        per_token.update({t: (ns(started), ns(ended)) for t in tokens})
    assert len(per_token) == 20
    outside = assert_every_tick_outside_once(db, sim.record, per_token)
    with psycopg.connect(db) as conn:
        assert_candles_equal_sql(conn, ("1s", "1m"))
    # one takeover per lease, none lost under the faults (no spurious one)
    for r in (feed_b, writer_b):
        assert r.output().count("took over the lease") == CONNECTIONS, r.name
        assert "lease lost" not in r.output(), r.name
    sent = sent_ticks(sim.record)
    _say(f"ticks: {sent} sent, {n} stored (all {in_log} logged): {outside} sent outside the "
         f"gaps, all stored once; of the {sent - outside} sent within them, {n - outside} "
         "stored")
