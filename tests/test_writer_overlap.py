"""``Writer.write_all``: batch N+1's rows go in on a second connection while batch N is still
in its transaction, and nothing of the exactly-once protocol changes.

What could go wrong, and the test for each: the overlapped writer stores other rows than one
transaction at a time (``test_same_rows_as_one_at_a_time``); a batch commits before the one
before it, or survives that one's failure (``test_a_failed_batch_*``); batch N waits for a lock
N+1 holds while N+1 waits for N's commit, a deadlock the server cannot see
(``test_a_lock_the_batch_before_waits_for_is_given_up``); a cancelled writer leaves a
transaction open or half a batch committed (``test_cancelled_mid_flight_commits_nothing_half``).
"""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from conftest import _scratch_database
from ingestor.pipeline import PipelineSettings
from ingestor.pipeline.replay import replay
from ingestor.sim.market import generate_capture
from ingestor.store.migrate import migrate
from ingestor.store.writer import Writer
from test_writer_errors import T0, _offset, _ticks, tick_batch

#: every stored row of each table, in a fixed order, as one digest (engine_state without its
#: updated_at, which is the time of the write)
DIGESTS = {
    "tick_data": "select md5(string_agg(t::text, '|' order by instrument_id, time)) from tick_data t",
    "ohlc_candles": "select md5(string_agg(c::text, '|' order by instrument_id, timeframe, time)) "
                    "from ohlc_candles c",
    "order_book_snapshots": "select md5(string_agg(s::text, '|' order by instrument_id, time)) "
                            "from order_book_snapshots s",
    "engine_state": "select md5(string_agg((instrument_id, stream, last_seq, last_time, "
                    "last_volume, state)::text, '|' order by instrument_id)) from engine_state",
    "stream_offsets": "select md5(string_agg((stream, committed_seq)::text, '|' order by stream)) "
                      "from stream_offsets",
}


def _digests(dsn) -> dict:
    with psycopg.connect(dsn) as conn:
        return {k: conn.execute(q).fetchone()[0] for k, q in DIGESTS.items()}


async def _write_all(w: Writer, batches) -> list:
    """``write_all`` over ``batches``; returns (stream, first_seq, outcome) in callback order."""
    items = list(batches) + [None]
    seen = []

    async def take():
        return items.pop(0)

    try:
        await w.write_all(take, lambda b, outcome, s: seen.append((b.first_seq, outcome)))
    finally:
        await w.close()
    return seen


def test_same_rows_as_one_at_a_time(db, pg_server_dsn, tmp_path):
    path = tmp_path / "m.cap"
    generate_capture(path, ticks=40_000, tokens=80, mode="mixed", seed=5)
    settings = PipelineSettings(flush_rows=2_000)
    r = replay(str(path), db, settings=settings, progress=False, chunk_size=1 << 16)
    assert r.ticks == 40_000 and r.batches >= 10
    # every batch went through the overlapped path (none written again one at a time) but
    # a last one covering no message (the end of input's forming candles alone), which is
    # written alone: whether there is one depends on where the last batches were cut
    assert r.overlap_retries == 0 and r.overlapped >= r.batches - 1
    with _scratch_database(pg_server_dsn, "ingestor_t") as other:
        with psycopg.connect(other, autocommit=True) as conn:
            migrate(conn)
        r1 = replay(str(path), other, settings=settings, progress=False, overlap=False,
                    chunk_size=1 << 16)
        assert r1.overlapped == 0 and r1.ticks == r.ticks and r1.batches == r.batches
        assert _digests(other) == _digests(db)
    # and a second replay of the capture writes nothing (exactly once)
    again = replay(str(path), db, settings=settings, progress=False)
    assert again.ticks == 0 and again.skipped_messages > 0


def _bad(first, last):
    return tick_batch("s", first, last, [(T0, 1, "N\x00SE", "1")])  # NUL in text: class 22


def _good(first, last, iid):
    return tick_batch("s", first, last, [(T0, iid, "NSE", str(iid))])


def test_a_failed_batch_rolls_back_the_one_after_it(db, tmp_path):
    """Batch 0 is refused for its data while batch 1 is in flight: batch 1 must not commit
    first (its offset would pass over batch 0's); both are written again in order: batch 0
    set aside, batch 1 stored."""
    w = Writer(db, dead_letter_dir=str(tmp_path / "dead"), max_rejects=2, retry_for=10)
    seen = asyncio.run(_write_all(w, [_bad(0, 4), _good(5, 9, 2), _good(10, 14, 3)]))
    assert seen == [(0, "dead-letter"), (5, "written"), (10, "written")]
    assert w.stats.overlap_retries >= 2            # batch 0 and the batch rolled back behind it
    assert _offset(db, "s") == 14 and _ticks(db) == 2
    assert (tmp_path / "dead" / "s-0-4.json").exists()


def test_a_failed_batch_after_a_good_one(db, tmp_path):
    w = Writer(db, dead_letter_dir=str(tmp_path / "dead"), max_rejects=2, retry_for=10)
    seen = asyncio.run(_write_all(w, [_good(0, 4, 1), _bad(5, 9), _good(10, 14, 3),
                                      _good(15, 19, 4)]))
    assert seen == [(0, "written"), (5, "dead-letter"), (10, "written"), (15, "written")]
    assert _offset(db, "s") == 19 and _ticks(db) == 3
    # and once past the failure the writer overlaps again
    assert w.stats.overlapped >= 2


def test_a_lock_the_batch_before_waits_for_is_given_up(db, tmp_path):
    """Batch 0's last statement waits for a lock batch 1's rows hold (here a table lock taken
    by batch 0's postback handler; in TimescaleDB, a chunk both create), while batch 1 waits for
    batch 0's commit on the client's side: a deadlock the server cannot see.  Batch 1 sees that
    it blocks batch 0, rolls back, and is written again after it."""
    state = {"waited": False}

    async def on_texts(conn, batch):
        if state["waited"]:
            return
        state["waited"] = True
        # wait (with a deadline) until another backend of the writer holds tick_data's
        # insert lock: batch 1's rows are in
        end = time.monotonic() + 30
        while time.monotonic() < end:
            cur = await conn.execute(
                "select count(*) from pg_locks l join pg_class c on c.oid = l.relation "
                "where c.relname = 'tick_data' and l.mode = 'RowExclusiveLock' and l.granted "
                "and l.pid <> pg_backend_pid()")
            if (await cur.fetchone())[0]:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("batch 1 never wrote its rows while batch 0 was in flight")
        await conn.execute("lock table tick_data in share mode")

    w = Writer(db, dead_letter_dir=str(tmp_path / "dead"), retry_for=10, on_texts=on_texts)
    first = _good(0, 4, 1)
    first.texts = [(0, b"{}")]
    seen = asyncio.run(asyncio.wait_for(_write_all(w, [first, _good(5, 9, 2)]), 60))
    assert seen == [(0, "written"), (5, "written")]
    assert w.stats.overlap_retries == 1 and w.stats.overlapped == 1
    assert _offset(db, "s") == 9 and _ticks(db) == 2


def test_cancelled_mid_flight_commits_nothing_half(db, tmp_path):
    """Cancelled with two batches in flight (the first held in its postback handler): neither
    commits, and no connection of the writer is left inside a transaction."""
    held = asyncio.Event

    async def scenario():
        gate = held()
        entered = held()

        async def on_texts(conn, batch):
            entered.set()
            await gate.wait()                       # never set: cancelled here

        w = Writer(db, dead_letter_dir=str(tmp_path / "dead"), retry_for=10, on_texts=on_texts)
        first = _good(0, 4, 1)
        first.texts = [(0, b"{}")]
        items = [first, _good(5, 9, 2)]
        more = asyncio.Event()

        async def take():
            if items:
                return items.pop(0)
            await more.wait()                       # the stream goes on; nothing more yet

        task = asyncio.create_task(w.write_all(take, None))
        await asyncio.wait_for(entered.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        conns = [c for c in (w.conn, w.conn2) if c is not None]
        states = [c.info.transaction_status for c in conns]
        await w.close()
        return states

    states = asyncio.run(scenario())
    assert states and all(s == psycopg.pq.TransactionStatus.IDLE for s in states)
    assert _offset(db, "s") == -1 and _ticks(db) == 0
