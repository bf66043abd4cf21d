"""The daemon end to end over loopback: simulator -> daemon -> PostgreSQL, with faults."""

from __future__ import annotations

import time
from decimal import Decimal

import psycopg

from daemon_harness import (Daemon, Simulator, captured_packets, captured_texts, count_ticks,
                            load_instruments, recorded_prices, tick_summary, wait_for)
from ingestor import _core
from ingestor.pipeline.batch import decode_capture
from ingestor.store.migrate import migrate
from pg_private import private_pg, private_pg_running  # noqa: F401 - fixtures



def test_end_to_end_every_recorded_tick_once(tmp_path, db):
    from test_candles_sql import assert_candles_equal_sql

    sim = Simulator(tmp_path, tokens=30, rate=3000)
    load_instruments(db, sim.csv)
    d = Daemon(tmp_path, db, sim.url)
    wait_for(lambda: count_ticks(db) > 6000, timeout=60, what="6000 ticks written")
    sim.stop()  # the recording is complete once the simulator has stopped
    rec = recorded_prices(sim.record)
    # everything the simulator sent is in flight or written: wait until it is all written
    sent = sum(map(len, rec.values()))
    wait_for(lambda: count_ticks(db) >= sent, timeout=60, what=f"all {sent} sent ticks written")
    assert d.terminate() == 0, d.output()
    with psycopg.connect(db) as conn:
        rows = conn.execute("select i.instrument_token, t.price from tick_data t join instruments i "
                            "on i.id = t.instrument_id order by i.instrument_token, t.time").fetchall()
        got: dict[int, list] = {}
        for tok, price in rows:
            got.setdefault(tok, []).append(price)
        assert sum(map(len, rec.values())) == len(rows) > 3000
        for tok, prices in rec.items():
            assert got[tok] == [Decimal(p) / d for p, d in prices], tok
        n, distinct = tick_summary(db)
        assert n == distinct
        assert_candles_equal_sql(conn)
        # the secrets never reach the logs
    assert "test-token-secret" not in d.output()


def test_database_restart_mid_run_loses_nothing(tmp_path, private_pg_running):
    cluster = private_pg_running
    dsn = cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("truncate tick_data, ohlc_candles, order_book_snapshots, stream_offsets, feed_gaps")
    sim = Simulator(tmp_path, tokens=20, rate=3000)
    load_instruments(dsn, sim.csv)
    d = Daemon(tmp_path, dsn, sim.url)
    wait_for(lambda: count_ticks(dsn) > 1000, timeout=60, what="1000 ticks written")
    cluster.stop("immediate")           # a crash of the database server
    time.sleep(2.0)                     # the scenario: the database is away for a while;
    cluster.start()                     # the feed goes on into the spool
    before = count_ticks(dsn)
    wait_for(lambda: count_ticks(dsn) > before + 1000, timeout=60, what="writing resumed")
    sim.stop()
    sent = sim.sent_packets()
    wait_for(lambda: count_ticks(dsn) >= sent, timeout=60, what=f"all {sent} sent ticks written")
    assert d.terminate() == 0, d.output()
    n, distinct = tick_summary(dsn)
    assert n == distinct == sent
    assert "retrying" in d.output()


def test_sigkill_and_restart_no_duplicates(tmp_path, db, writer=""):
    sim = Simulator(tmp_path, tokens=20, rate=3000)
    load_instruments(db, sim.csv)
    record = f'[record]\ndir = "{tmp_path / "rec"}"\n'
    d = Daemon(tmp_path, db, sim.url, config=record, writer=writer)
    wait_for(lambda: count_ticks(db) > 1000, timeout=60, what="1000 ticks written")
    d.kill()                            # SIGKILL: no flush, no cleanup
    spooled = list((tmp_path / "spool").glob("*.cap"))
    assert spooled, "the spool should hold the killed daemon's stream"
    d2 = Daemon(tmp_path, db, sim.url, config=record, name="daemon2", writer=writer)
    wait_for(lambda: count_ticks(db) > 3000, timeout=60, what="3000 ticks written")
    sim.stop()
    assert d2.terminate() == 0, d2.output()
    n, distinct = tick_summary(db)
    # exactly every tick either daemon received (the killed one's spool, replayed and kept
    # in the recording, and the second one's stream), once: not what the simulator sent to
    # the killed daemon's socket after the kill
    assert n == distinct == captured_packets(tmp_path / "rec", tmp_path / "spool") > 3000
    assert "replayed spool" in d2.output()
    with psycopg.connect(db) as c:
        streams = c.execute("select count(*) from stream_offsets").fetchone()[0]
        candles, keys = c.execute("select count(*), count(distinct (time, instrument_id, "
                                  "timeframe)) from ohlc_candles").fetchone()
    assert streams == 2
    # none twice, the 1s and 5s ones included, which have no key (sql/0007)
    assert candles == keys > 0


def test_feed_dropped_reconnects_and_records_gaps(tmp_path, db):
    sim = Simulator(tmp_path, "--drop-every", "1.5", tokens=10, rate=2000)
    load_instruments(db, sim.csv)
    d = Daemon(tmp_path, db, sim.url, config=f'[record]\ndir = "{tmp_path / "rec"}"\n')

    def dropped_twice():
        with psycopg.connect(db) as c:
            gaps = c.execute("select count(*) from feed_gaps").fetchone()[0]
            streams = c.execute("select count(*) from stream_offsets").fetchone()[0]
        return gaps >= 2 and streams >= 3 and (gaps, streams)

    # two drops: three connections, each with ticks committed, and two gaps recorded
    wait_for(dropped_twice, timeout=90, what="two drops recorded")
    sim.stop()
    assert d.terminate() == 0, d.output()
    n, distinct = tick_summary(db)
    assert n == distinct > 0
    with psycopg.connect(db) as c:
        gaps = c.execute("select connection, started_at, ended_at, tokens from feed_gaps").fetchall()
        streams = c.execute("select count(*) from stream_offsets").fetchone()[0]
    assert len(gaps) >= 2 and all(g[2] >= g[1] and len(g[3]) == 10 for g in gaps)
    assert streams >= 3            # a fresh stream per connection
    # the raw recording: one capture per connection's stream, holding every tick written
    from ingestor.feed.capture import CaptureReader

    recorded = sorted((tmp_path / "rec").glob("*.cap"))
    assert len(recorded) == streams
    total = 0
    for path in recorded:
        dec = _core.KiteDecoder()
        for _ in decode_capture(path, dec):
            pass
        total += dec.stats()["packets"]
        with CaptureReader(path) as rd:
            assert rd.header.first_seq == 0
    assert total == n


def test_feed_stalled_watchdog_reconnects(tmp_path, db):
    sim = Simulator(tmp_path, "--stall-after", "1", "--stall-for", "30", tokens=10, rate=2000)
    load_instruments(db, sim.csv)
    d = Daemon(tmp_path, db, sim.url)

    def gaps() -> int:
        with psycopg.connect(db) as c:
            return c.execute("select count(*) from feed_gaps").fetchone()[0]

    # the watchdog (2 s) fires long before the stall (30 s) ends: a reconnect, its gap
    wait_for(lambda: gaps() >= 1, timeout=60, what="a feed gap recorded")
    sim.stop()
    assert d.terminate() == 0, d.output()
    assert "stalled" in d.output()


def test_rejected_token_reported_and_not_hammered(tmp_path, db):
    sim = Simulator(tmp_path, "--reject-token", tokens=10, rate=1000)
    load_instruments(db, sim.csv)
    d = Daemon(tmp_path, db, sim.url)
    wait_for(lambda: "HTTP 403" in d.output(), timeout=60, what="the first attempt rejected")
    time.sleep(3)                       # the scenario: 3 s more, well within rejected_retry
    assert d.terminate() == 0, d.output()
    out = d.output()
    assert out.count("HTTP 403") == 1          # one attempt (the retry comes after 30 s)
    assert "test-token-secret" not in out


def test_malformed_messages_counted_rest_ingested(tmp_path, db):
    sim = Simulator(tmp_path, "--malformed", "0.1", tokens=20, rate=3000)
    load_instruments(db, sim.csv)
    d = Daemon(tmp_path, db, sim.url)
    wait_for(lambda: count_ticks(db) > 2000, timeout=60, what="2000 ticks written")
    sim.stop()
    dec = _core.KiteDecoder()
    for _ in decode_capture(sim.record, dec):
        pass
    st = dec.stats()
    wait_for(lambda: count_ticks(db) >= st["packets"], timeout=60,
             what=f"all {st['packets']} sent ticks written")
    assert d.terminate() == 0, d.output()
    assert st["malformed_messages"] > 0
    n, distinct = tick_summary(db)
    assert n == distinct == st["packets"]


def _order_tables(dsn: str) -> dict:
    with psycopg.connect(dsn) as c:
        return {
            "orders": c.execute(
                "select broker_order_id, current_status, filled_quantity, average_price "
                "from orders order by 1").fetchall(),
            "executions": c.execute(
                "select o.broker_order_id, e.quantity, e.price from executions e "
                "join orders o on o.id = e.order_id order by 1, 2, 3").fetchall(),
            "positions": c.execute(
                "select strategy_id, i.instrument_token, p.quantity, p.average_entry_price, "
                "p.realized_pnl, p.status from positions p join instruments i on i.id = p.instrument_id "
                "order by 1, 2, p.status, 3").fetchall(),
        }


def _fill_chains(dsn: str) -> dict[str, list]:
    """Per order, its executions as (filled_quantity_after, quantity, price), in fill order."""
    out: dict[str, list] = {}
    with psycopg.connect(dsn) as c:
        for boid, after, q, p in c.execute(
                "select o.broker_order_id, e.filled_quantity_after, e.quantity, e.price "
                "from executions e join orders o on o.id = e.order_id order by 1, 2"):
            out.setdefault(boid, []).append((after, q, p))
    return out


def test_postbacks_survive_a_database_restart(tmp_path, private_pg_running, fresh_db):
    """Order postbacks on the live stream, the database crashed mid-stream: the order tables end
    as applying the postbacks the daemon received (every one the simulator sent), in order.

    The store applies a batch's postbacks in exchange-time order and skips one older than the
    order's stored state, so a late (reordered) partial fill merges into the next fill when it
    arrives in a later batch than a newer postback, and is a fill of its own when both share a
    batch.  The daemon's batch boundaries are its own business (timing, the outage), so its
    fills are checked against the two extremes: every received postback in one batch (every
    fill level) and each in its own batch (only the levels that arrived in order).
    """
    from ingestor.orders.store import OrderStore, _price7, derive_fill_price
    from ingestor.orders import decode_postback

    cluster = private_pg_running
    dsn = cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("truncate tick_data, ohlc_candles, order_book_snapshots, stream_offsets, feed_gaps, "
                  "orders, order_history, executions, positions, strategies cascade")
    sim = Simulator(tmp_path, "--postbacks", "100", tokens=15, rate=1000)
    load_instruments(dsn, sim.csv)
    rec, spool = tmp_path / "rec", tmp_path / "spool"
    d = Daemon(tmp_path, dsn, sim.url, config=f'[record]\ndir = "{rec}"\n')

    def orders() -> int:
        with psycopg.connect(dsn) as c:
            return c.execute("select count(*) from orders").fetchone()[0]

    wait_for(lambda: orders() > 20, timeout=60, what="20 orders written")
    cluster.stop("immediate")
    time.sleep(1.5)                     # the scenario: the database is away for a while
    cluster.start()
    n = orders()
    wait_for(lambda: orders() > n + 20, timeout=60, what="orders written after the restart")
    # the simulator first: then what it recorded is all it sent, and the daemon has it all
    # (received and spooled) before it is stopped
    sim.stop()
    sent = captured_texts(sim.record)
    assert len(sent) > 40

    def received():
        try:
            return captured_texts(rec, spool) == sent
        except (OSError, ValueError):   # a segment moved or just created meanwhile
            return False

    wait_for(received, timeout=60, what=f"the daemon received all {len(sent)} postbacks")
    assert d.terminate() == 0, d.output()
    # its recording: every postback the simulator sent, once, in order
    assert captured_texts(rec) == sent

    # the references: the received postbacks applied to an empty database in one batch, and
    # each in a batch of its own
    with psycopg.connect(fresh_db, autocommit=True) as c:
        migrate(c)
    load_instruments(fresh_db, sim.csv)
    with psycopg.connect(fresh_db, autocommit=True) as c:
        OrderStore().apply_sync(c, sent)
    one_batch = _order_tables(fresh_db)
    all_levels = _fill_chains(fresh_db)
    with psycopg.connect(fresh_db, autocommit=True) as c:
        c.execute("truncate orders, order_history, executions, positions, strategies cascade")
        store = OrderStore()
        for text in sent:
            store.apply_sync(c, [text])
    each_batch = _order_tables(fresh_db)
    in_order = _fill_chains(fresh_db)

    got = _order_tables(dsn)
    # an order's final state does not depend on the batches
    assert one_batch["orders"] == each_batch["orders"]
    assert got["orders"] == one_batch["orders"] and len(got["orders"]) > 20
    # fills: the levels between the extremes, each fill derived from the postbacks' averages
    avg: dict[tuple[str, int], set] = {}
    for text in sent:
        pb = decode_postback(text)
        avg.setdefault((pb.order_id, pb.filled_quantity), set()).add(
            _price7(pb.average_price) or Decimal(0))
    chains = _fill_chains(dsn)
    assert chains.keys() == all_levels.keys()
    for boid, chain in chains.items():
        levels = {f for f, _, _ in chain}
        assert {f for f, _, _ in in_order.get(boid, [])} <= levels, boid
        assert levels <= {f for f, _, _ in all_levels[boid]}, boid
        prev, prev_avg = 0, Decimal(0)
        for after, q, price in chain:
            (a,) = avg[(boid, after)]
            assert q == after - prev and price == derive_fill_price(prev_avg, prev, a, after), boid
            prev, prev_avg = after, a
    # Positions follow the order fills were applied in, so they are checked as the orders
    # tests check them: equal to an average-cost replay of this database's own executions.
    from test_orders import check_consistent

    with psycopg.connect(dsn) as c:
        check_consistent(c)


def test_tokens_spread_over_several_connections(tmp_path, db):
    sim = Simulator(tmp_path, tokens=12, rate=2000)
    load_instruments(db, sim.csv)
    d = Daemon(tmp_path, db, sim.url, feed="tokens_per_connection = 5\n")
    wait_for(lambda: count_ticks(db) > 2000, timeout=60, what="2000 ticks written")
    sim.stop()
    sent = sim.sent_packets()
    wait_for(lambda: count_ticks(db) >= sent, timeout=60, what=f"all {sent} sent ticks written")
    assert d.terminate() == 0, d.output()
    assert "3 connection(s)" in d.output()
    with psycopg.connect(db) as c:
        streams = [r[0] for r in c.execute("select stream from stream_offsets")]
    assert sorted({s.rsplit("-", 1)[0] for s in streams}) == ["kite-0", "kite-1", "kite-2"]
    n, distinct = tick_summary(db)
    assert n == distinct == sent


def test_leftover_spool_replays_in_receive_order(tmp_path):
    """Stream ids carry a random part: leftovers are ordered by their first receive time,
    each stream's segments by sequence number, not by name."""
    from ingestor.feed.capture import CaptureHeader, CaptureWriter
    from ingestor.feed.spool import Spool

    def segment(name, stream, first_seq, recv_ns):
        path = tmp_path / name
        with CaptureWriter(path, CaptureHeader(stream=stream, first_seq=first_seq)) as w:
            w.write(b"\x00", 1, recv_ns)
        return str(path)

    later = segment("kite-0-aaaa.000000000000.cap", "kite-0-aaaa", 0, 2_000)
    later2 = segment("kite-0-aaaa.000000000100.cap", "kite-0-aaaa", 100, 3_000)
    earlier2 = segment("kite-0-ffff.000000000050.cap", "kite-0-ffff", 50, 1_500)
    earlier = segment("kite-0-ffff.000000000000.cap", "kite-0-ffff", 0, 1_000)
    streams = Spool(str(tmp_path)).leftovers()
    assert [sp.stream for sp in streams] == ["kite-0-ffff", "kite-0-aaaa"]
    assert [[s.path for s in sp.segments] for sp in streams] == [[earlier, earlier2], [later, later2]]
