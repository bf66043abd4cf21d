"""Tick rows grouped by instrument for the columnstore (``_core.group_ticks``), and the
two-COPY split of a batch's payload the writer sends (exercised on plain PostgreSQL)."""

from __future__ import annotations


import numpy as np
import psycopg
import pytest
from hypothesis import given, settings, strategies as st

from ingestor import _core
from ingestor.pipeline import PipelineSettings
from ingestor.pipeline.replay import replay
from ingestor.sim.market import generate_capture


def _rows(ids) -> np.ndarray:
    rows = np.zeros(len(ids), _core.TICKROW_DTYPE)
    rows["instrument_id"] = ids
    rows["time_us"] = np.arange(len(ids))  # arrival order = time order per instrument
    rows["price"] = np.arange(len(ids)) * 7
    return rows


def _model(ids, min_rows: int, descending: bool) -> list[int]:
    """The expected order of row indexes: dense instruments, then sparse, each in order of
    first appearance, rows newest first when descending."""
    first: dict[int, list[int]] = {}
    for k, i in enumerate(ids):
        first.setdefault(i, []).append(k)
    out = []
    for dense in (True, False):
        for i, ks in first.items():
            if (len(ks) >= min_rows) == dense:
                out.extend(reversed(ks) if descending else ks)
    return out


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(-(1 << 31), (1 << 31) - 1) | st.sampled_from([1, 2, 3, 5, 8]),
                    max_size=400),
       min_rows=st.integers(1, 30), descending=st.booleans())
def test_group_ticks_matches_the_model(ids, min_rows, descending):
    rows = _rows(ids)
    out = np.zeros(len(ids) + 3, _core.TICKROW_DTYPE)
    dense = _core.group_ticks(rows, out, min_rows, descending)
    order = _model(ids, min_rows, descending)
    assert np.array_equal(out[:len(ids)], rows[order])
    counts = {i: ids.count(i) for i in ids}
    assert dense == sum(c for c in counts.values() if c >= min_rows)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(-(1 << 31), (1 << 31) - 1) | st.sampled_from([1, 2, 3, 5, 8]),
                    max_size=400))
def test_last_rows_is_each_instruments_last_row(ids):
    """What a drain's latest prices come from: the last row of each instrument, instruments
    in order of first appearance (the sort it replaces, numpy.unique on the reversed ids,
    gives the same rows in id order)."""
    got = _core.last_rows(_rows(ids)).tolist()
    last = {i: k for k, i in enumerate(ids)}
    assert got == [last[i] for i in dict.fromkeys(ids)]
    if ids:
        uniq, first = np.unique(np.array(ids, np.int32)[::-1], return_index=True)
        assert sorted(got) == sorted((len(ids) - 1 - first).tolist())
    with pytest.raises(TypeError):
        _core.last_rows(np.zeros(3, _core.CANDLE_DTYPE))
    with pytest.raises(ValueError, match="contiguous"):
        _core.last_rows(_rows([1, 2, 3, 4])[::2])


def test_group_ticks_refuses_what_it_cannot_do():
    rows = _rows([1, 2, 1])
    with pytest.raises(ValueError, match="holds 2 rows, 3 needed"):
        _core.group_ticks(rows, np.zeros(2, _core.TICKROW_DTYPE))
    with pytest.raises(TypeError):
        _core.group_ticks(rows, np.zeros(3, _core.CANDLE_DTYPE))
    with pytest.raises(ValueError, match="overlap"):
        _core.group_ticks(rows, rows)
    with pytest.raises(ValueError, match="contiguous"):
        _core.group_ticks(_rows([1, 2, 3, 4])[::2], np.zeros(4, _core.TICKROW_DTYPE))
    assert _core.group_ticks(rows[:0], np.zeros(0, _core.TICKROW_DTYPE)) == 0


def test_a_batch_split_in_two_copies_stores_the_same_rows(db, tmp_path):
    """The writer's columnstore path cuts a batch's payload in two complete COPYs (dense
    part, the rest).  Forced on plain PostgreSQL (where the settings it sets are inert),
    the rows are exactly those of one COPY."""
    from ingestor.store.writer import Writer

    path = tmp_path / "split.cap"
    generate_capture(path, ticks=8_000, tokens=40, mode="mixed", seed=5)
    settings = PipelineSettings(flush_rows=3_000, dense_rows=60)

    def table(dsn):
        with psycopg.connect(dsn) as conn:
            return conn.execute("SELECT i.instrument_token, t.* FROM tick_data t JOIN "
                                "instruments i ON i.id = t.instrument_id "
                                "ORDER BY i.instrument_token, t.time").fetchall()

    replay(str(path), db, settings=settings, progress=False)
    plain = table(db)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("TRUNCATE tick_data, ohlc_candles, order_book_snapshots, stream_offsets, "
                     "engine_state")

    forced = []
    connect = Writer.connect

    async def connect_direct(self):
        await connect(self)
        self.direct = True
        forced.append(self)

    Writer.connect = connect_direct
    try:
        r = replay(str(path), db, settings=settings, progress=False)
    finally:
        Writer.connect = connect
    assert forced and 0 < r.columnstore_rows < r.ticks == 8_000
    assert r.rowstore_rows == r.ticks - r.columnstore_rows
    assert table(db) == plain


def test_pipeline_batches_are_grouped_newest_first(db, tmp_path):
    from ingestor.feed.capture import CaptureReader
    from ingestor.pipeline.pipeline import Pipeline
    from ingestor.store.instruments import register_tokens

    path = tmp_path / "g.cap"
    generate_capture(path, ticks=6_000, tokens=30, mode="quote", seed=9)
    with psycopg.connect(db, autocommit=True) as setup, CaptureReader(path) as rd:
        pl = Pipeline(rd.header.stream, lambda toks: register_tokens(setup, toks),
                      PipelineSettings(flush_rows=10**6, first_batch_rows=0, dense_rows=150))
        for chunk, seq in rd.chunks():
            assert not list(pl.feed_chunk(chunk, seq))
        b = pl.take(final=True)
    grouped = pl._grouped[:b.n_ticks]
    ids = grouped["instrument_id"]
    # each instrument one run of rows, newest first; dense instruments before the rest
    changes = np.flatnonzero(np.diff(ids)) + 1
    runs = np.split(np.arange(b.n_ticks), changes)
    assert len(runs) == len(np.unique(ids))
    for run in runs:
        assert (np.diff(grouped["time_us"][run]) < 0).all()
    sizes = [len(r) for r in runs]
    dense_runs = [s for s in sizes if s >= 150]
    assert sizes[:len(dense_runs)] == dense_runs and sum(dense_runs) == b.n_dense_ticks
    assert 0 < b.n_dense_ticks < b.n_ticks
    assert b.ticks[:b.dense_bytes].startswith(b"PGCOPY\n\xff\r\n\x00")
    assert b.ticks.endswith(b"\xff\xff")
