"""A backfill keeps its own times (issue 15, item 9): an older capture replayed after newer data.

Before, the engine's one clock per instrument restamped every tick of an older capture just
after the newest stored one: 2024-01-01 ticks landed at 2024-01-02 00:04:00.000001 and merged
into that minute's candle.  Now a stream whose first tick of an instrument is more than the
tolerance older than what is stored backfills it: its ticks keep their receive times, those
already stored (same instrument and time) are skipped, the candles they touch are recomputed
from ``tick_data``, and the live clock stays where it was.  A ``db`` here is plain
PostgreSQL; ``test_tsdb_storage`` runs the same checks on TimescaleDB.
"""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from ingestor import _core
from ingestor.feed.capture import CaptureHeader, CaptureReader, CaptureWriter
from ingestor.pipeline import PipelineSettings
from ingestor.pipeline.pipeline import BACKFILL_TOLERANCE_US, Pipeline
from ingestor.pipeline.replay import replay
from ingestor.sim.market import Market, generate_capture
from test_candles_sql import assert_candles_equal_sql

from test_replay import _decoded, _table_digest, _us

DAY_NS = 86_400 * 10**9
SETTINGS = PipelineSettings(flush_rows=3_000, dense_rows=5)


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    """A newer capture of 30 instruments (a day later) and older ones of those 30 and 10 more."""
    d = tmp_path_factory.mktemp("backfill")
    universe = Market(n_tokens=40, seed=5)
    t0, some = universe.clock_ns, universe.instruments[:30]
    caps = {
        "newer": (d / "newer.cap", Market(instruments=some, seed=5, start_ns=t0 + DAY_NS), 8_000),
        "older": (d / "older.cap", Market(n_tokens=40, seed=5, start_ns=t0), 8_000),
        # the same recording under another stream name (a copy renamed, a second recorder)
        "older-again": (d / "older-again.cap", Market(n_tokens=40, seed=5, start_ns=t0), 8_000),
        # a capture after the newer one: continues the live clock
        "latest": (d / "latest.cap", Market(instruments=some, seed=6,
                                            start_ns=t0 + 2 * DAY_NS), 4_000),
    }
    out = {}
    for stream, (path, market, ticks) in caps.items():
        generate_capture(path, ticks=ticks, market=market, stream=stream)
        out[stream] = path
    # a recording that overlaps the older one: its second half, then more of that session
    with CaptureReader(out["older"]) as rd:
        records = list(rd.records())
    more = d / "more.cap"
    generate_capture(more, ticks=4_000, stream="more", market=Market(
        n_tokens=40, seed=7, start_ns=records[-1].recv_ns + 10**9))
    with CaptureReader(more) as rd:
        records = records[len(records) // 2:] + list(rd.records())
    out["older-overlap"] = d / "older-overlap.cap"
    with CaptureWriter(out["older-overlap"], CaptureHeader(stream="older-overlap")) as w:
        for rec in records:
            w.write(rec.payload, rec.kind, rec.recv_ns)
    return out


def _own_times(path) -> dict[tuple[int, int], int]:
    """{(token, time µs): k}: the capture's ticks at their own receive times, made strictly
    increasing per instrument within the stream (the late-tick rule), as a backfill stores them."""
    ticks = _decoded(path)
    prev: dict[int, int] = {}
    out = {}
    for k, (tok, ns) in enumerate(zip(ticks["instrument_token"].tolist(),
                                      ticks["recv_ns"].tolist())):
        t = ns // 1000
        if tok in prev and t <= prev[tok]:
            t = prev[tok] + 1
        prev[tok] = t
        out[(tok, t)] = k
    return out


def _rows_of(payload: bytes, ids: dict[int, int]) -> set[tuple[int, int]]:
    """(token, time µs) of a binary COPY of tick_data rows, as the server reads it (the
    first two columns: time, µs since 2000-01-01, and instrument_id)."""
    import struct

    from ingestor.pipeline import tables

    assert [c[0] for c in tables.TICK_COLUMNS[:2]] == ["time", "instrument_id"]
    token_of = {i: t for t, i in ids.items()}
    out, pos = set(), 19
    while True:
        (nf,) = struct.unpack_from(">h", payload, pos)
        pos += 2
        if nf == -1:
            return out
        fields = []
        for _ in range(nf):
            (ln,) = struct.unpack_from(">i", payload, pos)
            pos += 4
            fields.append(payload[pos:pos + max(ln, 0)])
            pos += max(ln, 0)
        t = struct.unpack(">q", fields[0])[0] + 946_684_800_000_000
        out.add((token_of[struct.unpack(">i", fields[1])[0]], t))


def _stored(conn) -> set[tuple[int, int]]:
    return {(tok, _us(t)) for tok, t in conn.execute(
        "SELECT i.instrument_token, t.time FROM tick_data t "
        "JOIN instruments i ON i.id = t.instrument_id").fetchall()}


def _assert_unique(conn) -> int:
    n, distinct = conn.execute("SELECT count(*), count(DISTINCT (instrument_id, time)) "
                               "FROM tick_data").fetchone()
    assert n == distinct
    return n



def _clock(conn) -> dict[int, tuple]:
    return {i: (t, v) for i, t, v in conn.execute(
        "SELECT instrument_id, last_time, last_volume FROM engine_state").fetchall()}


def test_an_older_capture_keeps_its_own_times(db, captures):
    newer = replay(str(captures["newer"]), db, settings=SETTINGS, progress=False)
    assert newer.ticks == 8_000 and newer.backfill_instruments == 0
    with psycopg.connect(db) as conn:
        before_newer = conn.execute("SELECT instrument_id, time, price, volume FROM tick_data "
                                    "ORDER BY 1, 2").fetchall()
        clock = _clock(conn)
        newest = conn.execute("SELECT max(time) FROM tick_data").fetchone()[0]
        assert_candles_equal_sql(conn)

    r = replay(str(captures["older"]), db, settings=SETTINGS, progress=False)
    # 30 instruments held newer ticks (backfilled); 10 had none (the one clock, in order)
    assert r.backfill_instruments == 30
    assert r.ticks == 8_000 and r.backfill_stored == 0
    assert 0 < r.backfill_ticks < 8_000
    assert "older ticks kept their own times" in "\n".join(r.lines())
    own = _own_times(captures["older"])
    with psycopg.connect(db) as conn:
        stored = _stored(conn)
        # every tick of the older capture at exactly its own time, none restamped after newer data
        assert set(own) <= stored
        assert len(stored) == 16_000 == _assert_unique(conn)
        assert max(t for _, t in own) < _us(newest) - 3_600_000_000
        # the newer day's rows are untouched
        assert conn.execute(
            "SELECT instrument_id, time, price, volume FROM tick_data WHERE time > %s - "
            "interval '1 hour' ORDER BY 1, 2", (newest,)).fetchall()[-len(before_newer):] \
            == before_newer
        # candles equal SQL over the stored ticks, those of the newer day included (the first
        # volume of the newer day is now measured from the older day's last one)
        assert_candles_equal_sql(conn)
        # the live clock is not moved back
        after = _clock(conn)
        for iid, (t, _) in clock.items():
            assert after[iid][0] == t
        digest = _table_digest(conn)
    # the same capture again is one stream already committed: nothing (but the state the
    # backfill released: recomputed from tick_data at start and committed once)
    again = replay(str(captures["older"]), db, settings=SETTINGS, progress=False)
    assert again.ticks == 0 and again.backfill_instruments == 0
    with psycopg.connect(db) as conn:
        assert _table_digest(conn) == digest
        assert conn.execute("SELECT count(*) FROM engine_state WHERE state IS NULL"
                            ).fetchone()[0] == 0
        assert {i: t for i, (t, _) in _clock(conn).items() if i in clock} == {
            i: t for i, (t, _) in clock.items()}


def test_the_same_backfill_twice_and_overlapping_captures_store_each_tick_once(db, captures):
    for stream in ("newer", "older"):
        replay(str(captures[stream]), db, settings=SETTINGS, progress=False)
    with psycopg.connect(db) as conn:
        digest = _table_digest(conn)
    # the same recording under another stream name: every tick is already stored
    r = replay(str(captures["older-again"]), db, settings=SETTINGS, progress=False)
    assert r.backfill_instruments == 40 and r.backfill_ticks == 0 and r.backfill_stored == 8_000
    with psycopg.connect(db) as conn:
        assert _table_digest(conn) == digest
    # a recording overlapping that one: what it shares is stored already, the rest is added
    r = replay(str(captures["older-overlap"]), db, settings=SETTINGS, progress=False)
    older, overlap = set(_own_times(captures["older"])), set(_own_times(captures["older-overlap"]))
    shared = older & overlap
    assert len(shared) > 3_000
    # (all 40 instruments are behind now: the 10 the newer capture lacks went through the
    # one clock in the older capture, and this stream starts behind their stored ticks too)
    assert r.backfill_instruments == 40
    assert r.backfill_stored == len(shared)
    assert r.ticks == len(overlap) - len(shared)
    with psycopg.connect(db) as conn:
        stored = _stored(conn)
        assert older | overlap <= stored
        assert len(stored) == 8_000 + len(older | overlap) == _assert_unique(conn)
        assert_candles_equal_sql(conn)
        snaps, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (instrument_id, time)) FROM order_book_snapshots"
        ).fetchone()
        assert snaps == distinct > 0


def test_a_newer_capture_after_a_backfill_continues_the_live_clock(db, captures):
    for stream in ("newer", "older"):
        replay(str(captures[stream]), db, settings=SETTINGS, progress=False)
    r = replay(str(captures["latest"]), db, settings=SETTINGS, progress=False)
    assert r.ticks == 4_000 and r.backfill_instruments == 0
    own = _own_times(captures["latest"])
    with psycopg.connect(db) as conn:
        stored = _stored(conn)
        assert set(own) <= stored and len(stored) == 20_000 == _assert_unique(conn)
        assert_candles_equal_sql(conn)
        # every instrument's committed state is current again
        assert conn.execute("SELECT count(*) FROM engine_state WHERE state IS NULL "
                            "AND instrument_id IN (SELECT id FROM instruments WHERE "
                            "instrument_token = ANY(%s))",
                            ([tok for tok, _ in own],)).fetchone()[0] == 0


# -- the verdict, without a database ---------------------------------------------------------

def _pipeline(path, backfill_us, seed_offset_us):
    """A pipeline over ``path`` whose instruments were seeded at the capture's first receive
    time + ``seed_offset_us`` (as if the database held ticks up to then)."""
    ticks = _decoded(path)
    tokens = sorted(set(ticks["instrument_token"].tolist()))
    ids = {t: k + 1 for k, t in enumerate(tokens)}
    pl = Pipeline("s", lambda toks: {t: ids[t] for t in toks},
                  PipelineSettings(flush_rows=1 << 30, first_batch_rows=0,
                                   backfill_tolerance_us=backfill_us))
    pl.set_ids(ids)
    stored = int(ticks["recv_ns"][0]) // 1000 + seed_offset_us
    for t in tokens:
        pl.seed(t, stored, None)
    with CaptureReader(path) as rd:
        for chunk, seq in rd.chunks():
            assert not list(pl.feed_chunk(chunk, seq))
    return pl, tokens, stored


def test_a_stream_within_the_tolerance_is_late_ticks_restamped(captures):
    pl, tokens, stored = _pipeline(captures["latest"], BACKFILL_TOLERANCE_US,
                                   BACKFILL_TOLERANCE_US // 2)
    b = pl.take(final=True)
    assert b.in_order and not b.n_backfill_ticks and b.n_ticks == 4_000
    assert pl.totals["backfill_instruments"] == 0
    assert (pl.engine.last_times(tokens) > stored).all()


def test_a_stream_older_than_the_tolerance_backfills_and_parks_the_clock(captures):
    pl, tokens, stored = _pipeline(captures["latest"], BACKFILL_TOLERANCE_US, 3_600_000_000)
    b = pl.take(final=True)
    assert not b.in_order and b.n_backfill_ticks == 4_000 and b.n_ticks == 0
    assert b.n_backfill_snapshots > 0 and b.backfill_clock["labels"] == list(
        _core.DEFAULT_TIMEFRAMES)
    # nothing of the main engine's: no candles, no state, its clock where it was
    assert b.n_candles == 0 and b.n_state == 0 and b.n_snapshots == 0
    assert (pl.engine.last_times(tokens) == stored).all()
    assert pl.totals["backfill_instruments"] == len(tokens)
    # the ticks are at their own times (strictly increasing per instrument within the stream)
    own = _own_times(captures["latest"])
    ids = {t: pl.engine.instrument_id(t) for t in tokens}
    assert _rows_of(b.backfill_ticks, ids) == set(own)


def test_a_backfills_last_books_in_a_batch_covering_no_message(captures):
    """The final flush's pending books of a backfill, in a batch after the last message's
    (the writer writes it idempotently): they go with the batch's own snapshots."""
    pl, _, _ = _pipeline(captures["latest"], BACKFILL_TOLERANCE_US, 3_600_000_000)
    first = pl.take()
    assert first.n_backfill_ticks == 4_000 and first.last_seq >= first.first_seq
    tail = pl.take(final=True)
    assert tail.last_seq < tail.first_seq
    assert tail.n_snapshots > 0 and tail.n_backfill_snapshots == 0 and tail.n_state == 0


def test_the_daemon_never_backfills(captures):
    """The daemon's settings leave detection off: an older stream goes through the one clock
    (restamped after the stored time), as before."""
    from ingestor.config import Config
    from ingestor.daemon import settings_of

    assert settings_of(Config()).backfill_tolerance_us is None
    assert PipelineSettings().backfill_tolerance_us is None
    pl, tokens, stored = _pipeline(captures["latest"], None, 3_600_000_000)
    b = pl.take(final=True)
    assert b.in_order and b.n_ticks == 4_000 and not b.n_backfill_ticks
    assert (pl.engine.last_times(tokens) > stored).all()


def test_park_keeps_an_instruments_state_out_of_flushes():
    eng = _core.Engine()
    t, day, shift = 1_700_000_000_000_000, 86_400_000_000, 19_800_000_000   # +05:30
    eng.set_instrument(256265, 1)
    eng.seed(256265, t, 10)
    eng.seed_candle(256265, 6, (t + shift) // day * day - shift, 100, 100, 100, 100, 0, 1, 0)
    eng.touch(256265)
    eng.park(256265)
    # parked: neither its state nor its forming candle goes out
    assert len(eng.take_state()) == 0
    assert len(eng.open_candles()) == 0
    assert eng.flush() and eng.n_candles == 0
    eng.park(256265, False)
    assert len(eng.open_candles()) == 1
    assert len(eng.take_state()) == 1 and eng.flush() and eng.n_candles == 1
    assert eng.last_times(np.array([256265, 1], np.uint32)).tolist() == [
        t, np.iinfo(np.int64).min]


def test_a_refused_backfill_is_set_aside_and_applied_later(db, captures, tmp_path):
    """A backfill batch the database refuses for its data goes to the dead-letter folder
    whole (its backfill rows and buckets too); `ingestor dead-letter replay` applies it as
    the writer would have: own times, nothing twice, candles equal SQL."""
    from ingestor.commands.deadletter import replay_folder

    replay(str(captures["newer"]), db, settings=SETTINGS, progress=False)
    with psycopg.connect(db, autocommit=True) as conn:
        newest = conn.execute("SELECT min(time) FROM tick_data").fetchone()[0]
        conn.execute("CREATE FUNCTION refuse_old() RETURNS trigger LANGUAGE plpgsql AS $$ "
                     "BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '22023'; END $$")
        conn.execute(f"CREATE TRIGGER refuse_old BEFORE INSERT ON tick_data FOR EACH ROW "
                     f"WHEN (NEW.time < '{newest.isoformat()}') EXECUTE FUNCTION refuse_old()")
    dead = tmp_path / "dead"
    r = replay(str(captures["older"]), db, settings=SETTINGS, progress=False,
               dead_letter_dir=str(dead))
    assert r.dead_letters >= 1 and r.backfill_ticks < 6_000
    assert list(dead.glob("*.backfill_ticks.copy"))
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DROP TRIGGER refuse_old ON tick_data")
    done = replay_folder(db, str(dead))
    assert done and all(e.error is None for e in done)
    assert sum(e.ticks_added for e in done) > 0
    assert not replay_folder(db, str(dead))     # applied once
    own = _own_times(captures["older"])
    with psycopg.connect(db) as conn:
        stored = _stored(conn)
        assert set(own) <= stored and len(stored) == 16_000 == _assert_unique(conn)
        assert_candles_equal_sql(conn)


def test_a_second_receivers_recording_interleaves_and_candles_stay_exact(db, captures,
                                                                         tmp_path):
    """Another receiver's recording of the same session: the same packets, received 0.5 ms
    later.  Not the same ticks by the table's key (other receive times): stored beside the
    first recording's, interleaved with them -- so nearly every stored tick's volume increase
    changes, and the recompute must find every bucket that changed."""
    for stream in ("newer", "older"):
        replay(str(captures[stream]), db, settings=SETTINGS, progress=False)
    shifted = tmp_path / "shifted.cap"
    with CaptureReader(captures["older"]) as rd, \
            CaptureWriter(shifted, CaptureHeader(stream="older-shifted")) as w:
        for rec in rd.records():
            w.write(rec.payload, rec.kind, rec.recv_ns + 500_000)
    r = replay(str(shifted), db, settings=SETTINGS, progress=False)
    older, other = set(_own_times(captures["older"])), set(_own_times(shifted))
    # (a tick exactly 0.5 ms after another of its instrument would be "the same" by the key)
    assert r.backfill_instruments == 40 and r.backfill_ticks == len(other - older) > 7_000
    with psycopg.connect(db) as conn:
        stored = _stored(conn)
        assert older | other <= stored
        assert len(stored) == 8_000 + len(older | other) == _assert_unique(conn)
        assert_candles_equal_sql(conn)
