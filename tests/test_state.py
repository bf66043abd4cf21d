"""The engine's state committed with each batch: a capture replayed in parts equals one replay.

For any split of a capture into parts, each replayed by a process of its own (a new pipeline
seeded from the database, resuming at the committed offset), ``tick_data``, ``ohlc_candles``
and ``order_book_snapshots`` end identical, row for row, to one clean replay into a fresh
database: parts that stop without a final flush (an interrupted replay, several times over),
and parts that end with one (a truncated capture, then the whole one).  And the state comes
from ``engine_state``, not from ``tick_data``: deleting the ticks between the parts changes no
candle.
"""

from __future__ import annotations

import asyncio

import numpy as np
import psycopg
import pytest

from ingestor import _core
from test_restart import _candles, _migrated, _split, _ticks  # noqa: F401 (fixtures below)
from test_restart import capture, db, other_db  # noqa: F401


def _snapshots(conn) -> list[tuple]:
    return conn.execute(
        "select i.instrument_token, s.time, s.bid_prices, s.bid_quantities, s.bid_orders, "
        "s.ask_prices, s.ask_quantities, s.ask_orders, s.total_bid_quantity, "
        "s.total_ask_quantity from order_book_snapshots s join instruments i "
        "on i.id = s.instrument_id order by 1, 2").fetchall()


def _settings():
    from ingestor.pipeline import PipelineSettings

    return PipelineSettings(flush_rows=1_500)


@pytest.fixture(scope="module")
def clean(capture, tmp_path_factory, pg_server_dsn):  # noqa: F811
    """The rows of one uninterrupted replay of the whole capture (computed once)."""
    import os
    import secrets

    from conftest import _conninfo
    from ingestor.pipeline.replay import replay

    name = f"ingestor_t_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        dsn = _migrated(_conninfo(pg_server_dsn, dbname=name))
        replay(str(capture[0]), dsn, settings=_settings(), progress=False)
        with psycopg.connect(dsn) as conn:
            out = {"ticks": _ticks(conn), "candles": _candles(conn),
                   "snapshots": _snapshots(conn)}
    finally:
        with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
    assert out["snapshots"] and out["candles"] and out["ticks"]
    return out


def _assert_same(dsn, clean, tables=("ticks", "candles", "snapshots")) -> None:
    with psycopg.connect(dsn) as conn:
        got = {"ticks": _ticks(conn), "candles": _candles(conn), "snapshots": _snapshots(conn)}
    for t in tables:
        assert len(got[t]) == len(clean[t]), f"{t}: {len(got[t])} rows, clean {len(clean[t])}"
        assert got[t] == clean[t], t


def _interrupted(path, dsn, batches: int) -> int:
    """A replay stopped after ``batches`` committed batches, without its final flush (what a
    SIGINT leaves: the pipeline's pending rows are dropped, the spool or capture has them).
    Returns the committed offset."""
    from ingestor.feed.capture import CaptureReader
    from ingestor.pipeline import Pipeline
    from ingestor.pipeline.replay import load_state
    from ingestor.store.dsn import connect
    from ingestor.store.instruments import register_tokens
    from ingestor.store.offsets import committed
    from ingestor.store.writer import Writer

    async def run(pipe):
        writer = Writer(dsn)
        written = 0
        try:
            with CaptureReader(path, chunk_size=1 << 14) as rd:
                for chunk, seq in rd.chunks():
                    for batch in pipe.feed_chunk(chunk, seq):
                        assert await writer.write(batch) == "written"
                        written += 1
                        if written == batches:
                            return
        finally:
            await writer.close()
        raise AssertionError("the capture ended before the interruption")

    with connect(dsn, autocommit=True) as setup:
        stream = CaptureReader(path).header.stream
        pipe = Pipeline(stream, resolve=lambda toks: register_tokens(setup, toks),
                        settings=_settings(), committed=committed(setup, stream))
        load_state(setup, pipe)
        asyncio.run(run(pipe))
        return committed(setup, stream)


def test_interrupted_three_times_then_resumed_equals_one_replay(db, capture, clean, rng):  # noqa: F811
    """The issue's case: SIGINT three times, then a replay to the end."""
    from ingestor.pipeline.replay import replay

    path = str(capture[0])
    offsets = [_interrupted(path, db, rng.randrange(1, 6)) for _ in range(3)]
    assert offsets[0] < offsets[1] < offsets[2]
    with psycopg.connect(db) as conn:
        # a pending (not yet final) book was committed as state: the case that lost snapshots
        pending = conn.execute(
            "select count(*) from engine_state where get_byte(state, 4) & 2 = 2").fetchone()[0]
        assert pending > 0
    r = replay(path, db, settings=_settings(), progress=False)
    assert r.skipped_messages > 0 and r.ticks > 0
    _assert_same(db, clean)


@pytest.mark.parametrize("where", [0.2, 0.5, 0.8])
def test_split_files_each_flushed_equals_one_replay(db, capture, clean, tmp_path, rng, where):  # noqa: F811
    """Two capture files of one stream, each replayed to its end with the final flush (a book
    written mid-interval by the first is replaced when the second continues the interval)."""
    from ingestor.pipeline.replay import replay

    _, _, records = capture
    k = _cut_at(records, where, rng)
    part1, part2 = _split(capture, tmp_path, k)
    r1 = replay(str(part1), db, settings=_settings(), progress=False)
    r2 = replay(str(part2), db, settings=_settings(), progress=False)
    assert r1.ticks > 0 and r2.ticks > 0 and r2.skipped_messages == 0
    _assert_same(db, clean)


def test_truncated_then_whole_capture_equals_one_replay(db, capture, clean, tmp_path, rng):  # noqa: F811
    """The issue's other case: a truncated capture replayed (with its final flush), then the
    whole capture (its first part skipped by the offset)."""
    from ingestor.pipeline.replay import replay

    _, _, records = capture
    part1, _ = _split(capture, tmp_path, _cut_at(records, 0.6, rng))
    replay(str(part1), db, settings=_settings(), progress=False)
    with psycopg.connect(db) as conn:
        flushed = conn.execute(
            "select count(*) from engine_state where get_byte(state, 4) & 6 = 6").fetchone()[0]
        assert flushed > 0      # books written mid-interval by the final flush
    r = replay(str(capture[0]), db, settings=_settings(), progress=False)
    assert r.skipped_messages > 0
    _assert_same(db, clean)


def test_state_comes_from_engine_state_not_tick_data(db, capture, clean, tmp_path, rng):  # noqa: F811
    """Delete every tick between the parts: the candles still continue exactly (the forming
    candles, volumes and times come from engine_state, read in one query)."""
    from ingestor.pipeline.replay import replay

    _, _, records = capture
    part1, part2 = _split(capture, tmp_path, _cut_at(records, 0.5, rng))
    replay(str(part1), db, settings=_settings(), progress=False)
    with psycopg.connect(db) as conn:
        n_state = conn.execute("select count(*) from engine_state where state is not null"
                               ).fetchone()[0]
        assert n_state == conn.execute("select count(distinct instrument_id) from tick_data"
                                       ).fetchone()[0] > 0
        conn.execute("delete from tick_data")
    replay(str(part2), db, settings=_settings(), progress=False)
    _assert_same(db, clean, ("candles", "snapshots"))


def test_legacy_rows_are_recomputed_from_ticks_once(db, capture, clean, tmp_path, rng):  # noqa: F811
    """A database migrated from before engine_state (rows with state NULL, as the migration
    adds them): those instruments are seeded from tick_data, their state is then committed."""
    from ingestor.pipeline.replay import replay
    from ingestor.pipeline import Pipeline
    from ingestor.pipeline.state import load_state

    _, _, records = capture
    part1, part2 = _split(capture, tmp_path, _cut_at(records, 0.5, rng))
    replay(str(part1), db, settings=_settings(), progress=False)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("update engine_state set state = null")
        loaded = load_state(conn, Pipeline("x", resolve=dict))
        assert loaded.legacy == loaded.instruments > 0
    replay(str(part2), db, settings=_settings(), progress=False)
    # ticks and candles exact (the legacy path has no book state, so snapshots are not compared)
    _assert_same(db, clean, ("ticks", "candles"))
    with psycopg.connect(db) as conn:
        assert conn.execute("select count(*) from engine_state where state is null"
                            ).fetchone()[0] == 0
        loaded = load_state(conn, Pipeline("x", resolve=dict))
        assert loaded.legacy == 0 and loaded.instruments > 0


def _cut_at(records, where: float, rng) -> int:
    """A binary record near ``where`` of the capture, inside a burst (mid-interval)."""
    n = len(records)
    k = int(n * where)
    while True:
        k += rng.randrange(1, 5)
        if records[k].kind == 1 and len(records[k].payload) > 2 \
                and records[k].recv_ns - records[k - 1].recv_ns < 50_000_000:
            return k


# -- engine level -----------------------------------------------------------------------------

def test_take_state_roundtrip_and_retraction():
    """take_state -> a fresh engine seeded from it continues like the first one; a book
    flush() wrote mid-interval is retracted when the next engine continues the interval."""
    from ingestor.pipeline.state import _seed_records, Loaded

    tok = 408065            # NSE equity: divisor 100
    eng = _core.Engine(snapshot_interval_us=1_000_000)
    eng.set_instrument(tok, 7)
    t0 = 1_700_000_000_000_000      # µs, on a second boundary

    def full(t_us, price, vol):
        a = np.zeros(1, _core.TICK_DTYPE)
        a["recv_ns"], a["seq"], a["instrument_token"], a["last_price"] = t_us * 1000, t_us, tok, price
        a["volume_traded"], a["divisor"], a["length"], a["mode"] = vol, 100, 184, 3
        a["segment"], a["depth_row"], a["oi"] = tok & 0xff, 0, 5
        d = np.zeros(1, _core.DEPTH_DTYPE)
        d["bid_price"][0, 0] = price - 5
        return a, d

    for i, (p, v) in enumerate([(1000, 10), (1010, 15), (1005, 40)]):
        a, d = full(t0 + 100_000 * (i + 1), p, v)
        assert eng.process(a, depth=d) == 1
    eng.clear()
    assert eng.flush()
    _, cands, snaps = eng.output()
    assert len(snaps) == 1 and snaps[0]["time_us"] == t0 + 300_000
    eng.clear()
    st = eng.take_state()
    assert len(st) == 1 and st[0]["flags"] & _core.STATE_SNAP_STORED
    assert len(eng.take_state()) == 0           # nothing changed since

    fresh = _core.Engine(snapshot_interval_us=1_000_000)
    fresh.set_instrument(tok, 7)
    out = Loaded()
    _seed_records(fresh, [tok], np.frombuffer(st.tobytes(), fresh.state_dtype), out, True)
    assert out.instruments == 1 and out.candles == len(fresh.timeframes) and out.dropped == 0
    again = fresh.take_state(all=True)
    # the same state (a seeded candle is marked stored: it was written out unchanged)
    assert again["acc"]["flags"].tolist() == (st["acc"]["flags"] | 8).tolist()
    again["acc"]["flags"] = st["acc"]["flags"]
    assert again.tobytes() == st.tobytes()
    # the same interval goes on: the flushed book is retracted, the later one is pending
    a, d = full(t0 + 600_000, 1020, 50)
    fresh.process(a, depth=d)
    r = fresh.retracted()
    assert r.tolist() == [(t0 + 300_000, 7, tok)]
    assert len(fresh.output()[2]) == 0
    fresh.clear()
    # the next interval: the pending book of the first is written, once
    a, d = full(t0 + 1_200_000, 1030, 60)
    fresh.process(a, depth=d)
    assert fresh.output()[2]["time_us"].tolist() == [t0 + 600_000]
    assert len(fresh.retracted()) == 0
    # the 1s candle of the first second: all four ticks, as without the restart
    one = [c for c in fresh.output()[1] if c["timeframe"] == 0]
    assert len(one) == 1 and one[0]["trade_count"] == 4 and one[0]["volume"] == 40


def test_candles_never_stored_are_told_apart():
    """A closed candle written for the first time is flagged new; one a version of which was
    written (advance() then a reopening tick, or seeded after a restart) must be upserted."""
    tok = 408065
    eng = _core.Engine(timeframes=("1s", "1m"), snapshot_interval_us=0)
    eng.set_instrument(tok, 3)
    t0 = 1_700_000_000_000_000

    def tick(t_us, price):
        a = np.zeros(1, _core.TICK_DTYPE)
        a["recv_ns"], a["seq"], a["instrument_token"], a["last_price"] = t_us * 1000, t_us, tok, price
        a["divisor"], a["length"], a["mode"], a["segment"], a["depth_row"] = 100, 8, 1, 1, -1
        eng.process(a)

    tick(t0 + 1, 100)
    tick(t0 + 1_000_001, 101)            # closes the first 1s bucket: new
    c = eng.output()[1]
    assert c["timeframe"].tolist() == [0] and not c["flags"][0] & _core.CANDLE_REWRITE
    eng.clear()
    assert eng.advance(t0 + 2_000_000)   # writes the second 1s bucket out: new
    c = eng.output()[1]
    assert c["time_us"].tolist() == [t0 + 1_000_000] and not c["flags"][0] & _core.CANDLE_REWRITE
    eng.clear()
    tick(t0 + 1_500_000, 102)            # lands in it (advance ran ahead): reopened
    tick(t0 + 2_000_001, 103)            # ...closed again: a version is stored, upsert
    c = eng.output()[1]
    assert c["time_us"].tolist() == [t0 + 1_000_000] and c["flags"][0] & _core.CANDLE_REWRITE
    assert c["trade_count"][0] == 2


# -- engine level, random streams --------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_restart import ENGINE_CONFIGS, _decode  # noqa: E402
from kite_stream import messages, random_stream  # noqa: E402


class _Store:
    """What the writer leaves in the tables: rows, upserted candles, snapshots less retractions."""

    def __init__(self):
        self.rows, self.candles, self.snaps = [], {}, {}

    def drain(self, eng):
        rows, cands, snaps = eng.output()
        for t, i in zip(eng.retracted()["time_us"].tolist(),
                        eng.retracted()["instrument_id"].tolist()):
            assert self.snaps.pop((t, i), None) is not None, "retracted a row never written"
        self.rows.extend(rows.tolist())
        rewrite = (cands["flags"] & _core.CANDLE_REWRITE).tolist()
        cands = cands.copy()
        cands["flags"] &= 0xff ^ _core.CANDLE_REWRITE
        for c, rw in zip(cands, rewrite):
            key = (int(c["time_us"]), int(c["instrument_id"]), int(c["timeframe"]))
            assert rw or key not in self.candles, "a candle flagged new was stored before"
            self.candles[key] = c.item()    # values (a copy's padding bytes are undefined)
        for s in snaps:
            key = (int(s["time_us"]), int(s["instrument_id"]))
            assert key not in self.snaps, "a snapshot written twice"
            self.snaps[key] = s.tobytes()
        eng.clear()


def _feed(eng, store, msgs, ids):
    dec = _decode(msgs)
    for tok in eng.unknown_tokens(dec).tolist():
        eng.set_instrument(tok, ids[tok])
    pos = 0
    while True:
        pos = eng.process(dec, pos)
        store.drain(eng)
        if pos == dec.n_ticks:
            return


def _flush(eng, store):
    while not eng.flush():
        store.drain(eng)
    store.drain(eng)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), cfg=ENGINE_CONFIGS, n_ticks=st.integers(2, 200),
       n_inst=st.integers(1, 8), flushed=st.booleans(),
       interval=st.sampled_from([0, 1_000_000, 60_000_000]),
       max_step=st.sampled_from([1_000, 300_000_000, 3_000_000_000]))
def test_split_stream_with_state_equals_one_run(seed, cfg, n_ticks, n_inst, flushed, interval,
                                                max_step):
    """Engine A runs a stream whole; B runs its first part (then a final flush, or not: an
    interruption), hands out take_state; a fresh C seeded from those bytes alone runs the rest.
    Tick rows, candles and snapshots (retractions applied) equal A's, byte for byte."""
    import random

    from ingestor.pipeline.state import Loaded, _seed_records, decode_state

    rnd = random.Random(seed)
    msgs = messages(rnd, random_stream(rnd, n_ticks, n_inst, max_step_ns=max_step))
    cut = rnd.randrange(1, len(msgs)) if len(msgs) > 1 else 1
    tokens = sorted({tok for tok in _decode(msgs).ticks["instrument_token"][:].tolist() if tok})
    ids = {tok: k + 1 for k, tok in enumerate(tokens)}
    small = {"tick_capacity": 5, "candle_capacity": 30, "snapshot_capacity": 3}

    def engine():
        return _core.Engine(**cfg, snapshot_interval_us=interval, **small)

    a, whole = engine(), _Store()
    _feed(a, whole, msgs, ids)
    _flush(a, whole)

    b, parts = engine(), _Store()
    _feed(b, parts, msgs[:cut], ids)
    if flushed:
        _flush(b, parts)
    blobs = [r.tobytes() for r in b.take_state()]

    c = engine()
    for tok, iid in ids.items():
        c.set_instrument(tok, iid)
    recs = decode_state(blobs)
    out = Loaded()
    _seed_records(c, recs["token"].tolist(), recs, out, True)
    assert out.dropped == 0
    _feed(c, parts, msgs[cut:], ids)
    _flush(c, parts)
    assert parts.rows == whole.rows
    assert parts.candles == whole.candles
    assert parts.snaps == whole.snaps


def test_process_runs_without_the_gil():
    """While one thread aggregates, another runs Python: it sees the engine busy (a call into
    it then is refused instead of racing).  Holding the GIL, the loop could never be seen."""
    import threading
    import time

    tok = 408065
    n = 200_000
    a = np.zeros(n, _core.TICK_DTYPE)
    a["recv_ns"] = (1_700_000_000_000_000 + np.arange(n) * 1000) * 1000
    a["seq"] = np.arange(n)
    a["instrument_token"], a["last_price"], a["divisor"] = tok, 100, 100
    a["length"], a["mode"], a["segment"], a["depth_row"] = 8, 1, 1, -1
    eng = _core.Engine(tick_capacity=n, candle_capacity=n * 7, snapshot_capacity=16)
    eng.set_instrument(tok, 1)
    stop = threading.Event()
    errors = []

    def work():
        try:
            while not stop.is_set():
                assert eng.process(a) == n
                eng.clear()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    th = threading.Thread(target=work)
    th.start()
    seen = False
    deadline = time.monotonic() + 20
    try:
        while not seen and time.monotonic() < deadline and th.is_alive():
            try:
                eng.stats()
                eng.take_state()
            except RuntimeError as exc:
                assert "another thread" in str(exc)
                seen = True
    finally:
        stop.set()
        th.join()
    assert not errors, errors
    assert seen, "the main thread never ran while the engine aggregated"


def test_state_of_reset_offsets_is_not_used(db, capture, clean, tmp_path, rng):  # noqa: F811
    """Tables emptied to ingest again (ticks, candles, snapshots and offsets, but not
    engine_state): the stale state rows are not seeded, the new replay equals a clean one."""
    from ingestor.pipeline.replay import replay

    _, _, records = capture
    part1, _ = _split(capture, tmp_path, _cut_at(records, 0.5, rng))
    replay(str(part1), db, settings=_settings(), progress=False)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("truncate tick_data, ohlc_candles, order_book_snapshots, stream_offsets")
        assert conn.execute("select count(*) from engine_state").fetchone()[0] > 0
    replay(str(capture[0]), db, settings=_settings(), progress=False)
    _assert_same(db, clean)
