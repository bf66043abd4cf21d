"""A restart in the middle of a bucket leaves the stored candles as if there had been none.

Engine level: a random stream split at a random message.  Engine A processes
all of it; engine B the first part, its candles "stored" in a dict that
emulates the writer's upsert by (time, instrument, timeframe); then a fresh
engine C, seeded with ``seed`` and ``seed_candle`` from B's state (the
twin's exact forming candles, themselves checked against a recomputation
from the stored tick rows alone, as ``ingestor.pipeline.state`` does in SQL),
processes the rest.  The upserted candles must equal A's, core and twin.

Database level (a real PostgreSQL): a simulated capture replayed in two
parts (two capture files of one stream, or a pipeline killed midway and the
whole capture replayed again) leaves ``ohlc_candles`` equal to SQL over
``tick_data`` and to an uninterrupted replay into another database.
"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestor import _core
from ingestor.pipeline.batch import decode_capture
from ingestor.twin import candles as twin
from kite_stream import Tick, encode_message, messages, random_stream
from test_candles_sql import assert_candles_equal_sql

DAY_US = 86_400_000_000
SEED_FIELDS = ("start_us", "open", "high", "low", "close", "volume", "trade_count", "pv", "oi")


# -- engine level -----------------------------------------------------------------------------

def _decode(msgs):
    dec = _core.KiteDecoder(capacity=1 << 14, depth_capacity=1 << 14)
    for recv_ns, seq, msg in msgs:
        assert dec.feed(msg, recv_ns, seq)
    return dec


def _upsert(store: dict, candles: list[dict]) -> None:
    for c in candles:
        # CANDLE_REWRITE says how to write the row (upsert), not what it holds
        c = {**c, "flags": c["flags"] & ~_core.CANDLE_REWRITE}
        store[(c["time_us"], c["instrument_id"], c["timeframe"])] = c


class CoreSide:
    """The core engine with small output buffers, its drained output upserted into ``store``."""

    def __init__(self, cfg, ids, store, rows):
        self.eng = _core.Engine(**cfg, tick_capacity=7, candle_capacity=40, snapshot_capacity=5,
                                instrument_capacity=2)
        self.ids, self.store, self.rows = ids, store, rows

    def drain(self):
        rows, cands, _ = self.eng.output()
        self.rows.extend(twin.as_dicts(rows))
        _upsert(self.store, twin.as_dicts(cands))
        self.eng.clear()

    def feed(self, msgs):
        dec = _decode(msgs)
        for tok in self.eng.unknown_tokens(dec).tolist():
            self.eng.set_instrument(tok, self.ids[tok])
        pos = 0
        while True:
            pos = self.eng.process(dec, pos)
            self.drain()
            if pos == dec.n_ticks:
                break

    def advance(self, now_us):
        while not self.eng.advance(now_us):
            self.drain()
        self.drain()

    def upsert_open(self):
        _upsert(self.store, twin.as_dicts(self.eng.open_candles()))

    def flush(self):
        while not self.eng.flush():
            self.drain()
        self.drain()


class TwinSide:
    def __init__(self, cfg, ids, store, rows):
        self.eng = twin.Engine(**cfg)
        self.ids, self.store, self.rows = ids, store, rows

    def _sync(self):
        self.rows.extend(self.eng.tick_rows)
        _upsert(self.store, self.eng.candles)
        self.eng.tick_rows, self.eng.candles, self.eng.snapshots = [], [], []

    def feed(self, msgs):
        dec = _decode(msgs)
        ticks, depth = dec.ticks[:dec.n_ticks], dec.depth[:dec.n_depth]
        for tok in self.eng.unknown_tokens(ticks):
            self.eng.set_instrument(tok, self.ids[tok])
        self.eng.process(ticks, depth)
        self._sync()

    def advance(self, now_us):
        self.eng.advance(now_us)
        self._sync()

    def upsert_open(self):
        _upsert(self.store, self.eng.open_candles())

    def flush(self):
        self.eng.flush()
        self._sync()


def _drive(side, msgs, rng, advance_p=0.15):
    i = 0
    while i < len(msgs):
        k = rng.randrange(1, 6)
        side.feed(msgs[i:i + k])
        i = min(i + k, len(msgs))
        if rng.random() < advance_p:
            last = msgs[i - 1][0] // 1000
            side.advance(last + rng.choice((-2_000_000, 0, 1_000_000, 70_000_000, DAY_US)))


def state_from_rows(rows: list[dict], eng: twin.Engine) -> list[dict]:
    """Each instrument's forming candles from stored tick rows alone (``ingestor.pipeline.state``'s SQL).

    Per instrument and timeframe: the bucket holding its last row; OHLC by
    time, the volume increases (measured from the previous row that carried
    a volume, wherever it lies), count, exact price x increase sum, last OI.
    """
    by_token: dict[int, list[dict]] = {}
    for r in rows:
        by_token.setdefault(r["instrument_token"], []).append(r)
    out = []
    for tok, rs in by_token.items():
        rs.sort(key=lambda r: r["time_us"])
        prev = None
        dvs = []
        for r in rs:
            dv = 0
            if r["flags"] & twin.ROW_HAS_VOLUME:
                v = r["volume"]
                dv = 0 if prev is None else v - prev if v >= prev else v
                prev = v
            dvs.append(dv)
        last = rs[-1]["time_us"]
        for tf, length in enumerate(eng.lengths):
            start = eng.bucket(last, length)
            sel = [(r, dv) for r, dv in zip(rs, dvs) if r["time_us"] >= start]
            prices = [r["price"] for r, _ in sel]
            ois = [r["oi"] for r, _ in sel if r["flags"] & twin.ROW_HAS_OI]
            out.append({"token": tok, "timeframe_index": tf, "start_us": start,
                        "open": prices[0], "high": max(prices), "low": min(prices),
                        "close": prices[-1], "volume": sum(dv for _, dv in sel),
                        "trade_count": len(sel), "pv": sum(r["price"] * dv for r, dv in sel),
                        "oi": ois[-1] if ois else None, "last_time_us": last,
                        "last_cum_volume": prev})
    return out


def seed_engine(eng, state: list[dict], ids: dict) -> None:
    for s in state:
        eng.set_instrument(s["token"], ids[s["token"]])
        eng.seed(s["token"], s["last_time_us"], s["last_cum_volume"])
    for s in state:
        eng.seed_candle(s["token"], s["timeframe_index"], *(s[k] for k in SEED_FIELDS),
                        stored=s["stored"])


def mark_stored(state: list[dict], store: dict, ref: twin.Engine, rnd) -> int:
    """``stored``: the store holds exactly the candle the state would write (``ingestor.pipeline.state``
    checks the same against ``ohlc_candles``); sometimes left False, which is always safe.
    Returns how many are held exactly."""
    held = 0
    for s in state:
        inst = ref.instruments[s["token"]]
        row = ref._candle_row(inst, s["timeframe_index"], inst.candles[s["timeframe_index"]])
        got = store.get((row["time_us"], row["instrument_id"], row["timeframe"]))
        same = got is not None and all(got[k] == v for k, v in row.items())
        held += same
        s["stored"] = same and rnd.random() < 0.8
    return held


ENGINE_CONFIGS = st.fixed_dictionaries({
    "timeframes": st.sampled_from([twin.DEFAULT_TIMEFRAMES, ("1s",), ("1d", "5s", "7m"),
                                   ("2h", "1s", "1m", "15m")]),
    "utc_offset": st.sampled_from(["+05:30", "00:00", "-03:00"]),
    "origin": st.sampled_from(["00:00", "09:15", "23:59:59"]),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), cfg=ENGINE_CONFIGS, n_ticks=st.integers(2, 250),
       n_inst=st.integers(1, 12), ending=st.sampled_from(["flush", "open", "killed"]),
       max_step=st.sampled_from([1_000, 400_000_000, 3_000_000_000, 90_000_000_000]))
def test_restart_mid_bucket_equals_uninterrupted(seed, cfg, n_ticks, n_inst, ending, max_step):
    rnd = random.Random(seed)
    stream = random_stream(rnd, n_ticks, n_inst, max_step_ns=max_step)
    msgs = messages(rnd, stream)
    cut = rnd.randrange(1, len(msgs)) if len(msgs) > 1 else 1
    tokens = sorted({t.token for t in stream})
    ids = {tok: k + 1 for k, tok in enumerate(tokens)}
    finals = {}
    for name, Side in (("core", CoreSide), ("twin", TwinSide)):
        # A: everything at once
        store_a, rows_a = {}, []
        a = Side(cfg, ids, store_a, rows_a)
        _drive(a, msgs, random.Random(seed + 1))
        a.flush()
        # B: the first part, then a clean stop, a stop after an open-candle upsert, or a kill
        store, rows = {}, []
        b = Side(cfg, ids, store, rows)
        _drive(b, msgs[:cut], random.Random(seed + 2))
        if ending == "flush":
            b.flush()
        elif ending == "open":
            b.upsert_open()
        # B's state: the twin's forming candles = a recomputation from the stored rows
        ref = twin.Engine(**cfg)
        for tok in tokens:
            ref.set_instrument(tok, ids[tok])
        dec = _decode(msgs[:cut])
        ref.process(dec.ticks[:dec.n_ticks], dec.depth[:dec.n_depth])
        state = ref.forming()
        key = lambda s: (s["token"], s["timeframe_index"])  # noqa: E731
        assert sorted(state, key=key) == sorted(state_from_rows(rows, ref), key=key)
        held = mark_stored(state, store, ref, random.Random(seed + 4))
        if ending == "flush":       # B wrote every forming candle out
            assert held == len(state)
        # C: a fresh engine seeded from the stored state, the rest of the stream
        c = Side(cfg, ids, store, rows)
        seed_engine(c.eng, state, ids)
        _drive(c, msgs[cut:], random.Random(seed + 3))
        c.flush()
        assert rows == rows_a, name
        assert store.keys() == store_a.keys(), name
        for k in store_a:
            assert store[k] == store_a[k], f"{name} {k}: restarted {store[k]} != {store_a[k]}"
        finals[name] = store
    assert finals["core"] == finals["twin"]


def test_unseeded_restart_breaks_the_candle():
    """The failure the seeding fixes: a fresh engine overwrites the bucket with a partial candle."""
    tok = (1234 << 8) | 1
    t0 = 1_700_000_040_000_000     # a minute boundary
    ticks = [Tick(token=tok, length=44, recv_ns=(t0 + k * 10_000_000) * 1000, price=p,
                  quantity=1, volume=v) for k, (p, v) in enumerate([(100, 10), (300, 15),
                                                                   (200, 40), (150, 41)])]
    msgs = [(t.recv_ns, k, encode_message([t])) for k, t in enumerate(ticks)]
    cfg = {"timeframes": ("1m",)}
    whole = {}
    a = CoreSide(cfg, {tok: 1}, whole, [])
    a.feed(msgs)
    a.flush()
    (expected,) = whole.values()
    assert (expected["open"], expected["high"], expected["volume"], expected["trade_count"]) == \
        (100, 300, 31, 4)
    for seeded in (False, True):
        store, rows = {}, []
        b = CoreSide(cfg, {tok: 1}, store, rows)
        b.feed(msgs[:2])
        b.flush()
        c = CoreSide(cfg, {tok: 1}, store, rows)
        c.eng.set_instrument(tok, 1)
        c.eng.seed(tok, rows[-1]["time_us"], rows[-1]["volume"])
        if seeded:
            c.eng.seed_candle(tok, 0, t0, 100, 300, 100, 300, 5, 2, 300 * 5)
        c.feed(msgs[2:])
        c.flush()
        (got,) = store.values()
        assert (got == expected) is seeded


def test_seed_candle_checks():
    tok = (7 << 8) | 3                  # CDS
    eng = _core.Engine(timeframes=("1m", "1h"), utc_offset="+05:30", origin="09:15")
    tw = twin.Engine(timeframes=("1m", "1h"), utc_offset="+05:30", origin="09:15")
    start = 1_704_171_000_000_000 - 5 * 60_000_000     # 10:15 IST: an hour bucket start
    good = dict(token=tok, timeframe_index=1, start_us=start, open=5, high=9, low=2, close=3,
                volume=10, trade_count=4, pv=50, oi=None)
    for e in (eng, tw):
        e.seed(tok, start + 10, 500)
        with pytest.raises(ValueError):         # set_instrument() first
            e.seed_candle(**good)
        e.set_instrument(tok, 1)
        e.seed(tok, start - 10, 500)
        with pytest.raises(ValueError):         # last time before the bucket
            e.seed_candle(**good)
        e.seed(tok, start + 10, 500)
        for bad in ({"start_us": start + 60_000_000},          # a minute start, not an hour's
                    {"timeframe_index": 2}, {"high": 4}, {"low": 6}, {"pv": 19}, {"pv": 91},
                    {"trade_count": 0}, {"volume": -1}, {"oi": 1 << 32}, {"close": 1 << 32}):
            with pytest.raises(ValueError):
                e.seed_candle(**{**good, **bad})
        e.seed_candle(**{**good, "pv": 90})
        with pytest.raises(ValueError):         # later ticks would land before the candle
            e.seed(tok, start - 1, 500)
    # 128-bit pv: continued exactly (VWAP from the sum, with the 10^7 CDS divisor)
    big_vol = 1 << 62
    pv = ((1 << 32) - 1) * big_vol
    eng.seed_candle(tok, 0, start, (1 << 32) - 1, (1 << 32) - 1, (1 << 32) - 1, (1 << 32) - 1,
                    big_vol, 3, pv, 17)
    c0, c1 = sorted(eng.open_candles(), key=lambda c: int(c["timeframe"]))
    assert (c0["volume"], c0["trade_count"], c0["open_interest"]) == (big_vol, 3, 17)
    assert c0["vwap_e7"] == (1 << 32) - 1                     # raw / 10^7 in units of 1e-7
    # the hour candle: vwap = 90 / 10 raw = 9 / 10^7; seeded, so a version may be stored
    assert (c1["time_us"], c1["vwap_e7"], c1["flags"]) == (
        start, 9, _core.CANDLE_HAS_VWAP | _core.CANDLE_REWRITE)


# -- database level ---------------------------------------------------------------------------

def _migrated(dsn):
    from ingestor.store.migrate import migrate

    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)
    return dsn


@pytest.fixture
def db(fresh_db):
    return _migrated(fresh_db)


@pytest.fixture
def other_db(pg_server_dsn):
    """A second fresh database in the same test (``fresh_db`` is one per test)."""
    import os
    import secrets

    from conftest import _conninfo

    name = f"ingestor_t_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        yield _migrated(_conninfo(pg_server_dsn, dbname=name))
    finally:
        with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    """A simulated capture and its records (859 messages, 75 s of a 40-instrument market: minute boundaries)."""
    from ingestor.feed.capture import CaptureReader
    from ingestor.sim.market import generate_capture

    path = tmp_path_factory.mktemp("restart") / "whole.cap"
    generate_capture(path, ticks=40_000, tokens=40, mode="mixed", seed=5)
    with CaptureReader(path) as rd:
        header, records = rd.header, list(rd.records())
    return path, header, records


def _split(capture, tmp_path, k):
    """Two capture files of the same stream: records [0, k) and [k, end)."""
    from ingestor.feed.capture import CaptureHeader, CaptureWriter

    _, header, records = capture
    paths = []
    for part, (first, recs) in enumerate(((0, records[:k]), (k, records[k:]))):
        p = tmp_path / f"part{part + 1}.cap"
        with CaptureWriter(p, CaptureHeader(broker=header.broker, stream=header.stream,
                                            first_seq=first, extra=dict(header.extra))) as w:
            for r in recs:
                assert w.write(r.payload, r.kind, r.recv_ns) == r.seq
        paths.append(p)
    return paths


def _candles(conn) -> list[tuple]:
    return conn.execute(
        "select i.instrument_token, c.timeframe, c.time, c.open_price, c.high_price, c.low_price, "
        "c.close_price, c.volume, c.trade_count, c.vwap, c.open_interest "
        "from ohlc_candles c join instruments i on i.id = c.instrument_id "
        "order by 1, 2, 3").fetchall()


def _ticks(conn) -> list[tuple]:
    return conn.execute(
        "select i.instrument_token, t.time, t.price, t.quantity, t.volume, t.oi, t.bid_price, "
        "t.ask_quantity, t.exchange_time from tick_data t join instruments i "
        "on i.id = t.instrument_id order by 1, 2").fetchall()



def _twin_state(records, upto, **cfg):
    """The twin's forming candles after the capture's first ``upto`` records."""
    dec = _core.KiteDecoder(capacity=1 << 16, depth_capacity=1 << 16)
    for r in records[:upto]:
        if r.kind == 1:
            assert dec.feed(r.payload, r.recv_ns, r.seq)
    ticks, depth = dec.ticks[:dec.n_ticks], dec.depth[:dec.n_depth]
    eng = twin.Engine(**cfg)
    for tok in eng.unknown_tokens(ticks):
        eng.set_instrument(tok, 0)
    eng.process(ticks, depth)
    return eng.forming()


async def _aquery(dsn, clock):
    from ingestor.pipeline.state import aquery_candle_state

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return await aquery_candle_state(conn, clock)


def _cut(records, rng):
    """A record inside a burst, in the middle half of the capture (a restart mid-bucket)."""
    n = len(records)
    while True:
        k = rng.randrange(n // 4, 3 * n // 4)
        if records[k].kind == 1 and len(records[k].payload) > 2 \
                and records[k].recv_ns - records[k - 1].recv_ns < 50_000_000:
            return k


def test_split_capture_equals_sql_and_one_replay(db, other_db, capture, tmp_path, rng):
    from ingestor.pipeline import PipelineSettings
    from ingestor.pipeline.replay import replay
    from ingestor.pipeline.state import clock_of, query_candle_state

    _, _, records = capture
    k = _cut(records, rng)
    part1, part2 = _split(capture, tmp_path, k)
    settings = PipelineSettings(flush_rows=2_500)
    r1 = replay(str(part1), db, settings=settings, progress=False)
    assert 0 < r1.ticks

    # The state SQL computes from the stored ticks is the twin's, exactly: for the stored
    # timeframes (every forming candle stored exactly by part one's final flush), and for
    # timeframes whose buckets do not nest, with another origin (stored: only the 1s and 5s
    # buckets, which the origin does not move).
    key = lambda s: (s["token"], s["timeframe_index"])  # noqa: E731
    odd = {"timeframes": ("1d", "5s", "7m", "2h", "1s"), "origin": "09:15", "utc_offset": "+05:30"}
    for cfg in ({}, odd):
        eng = _core.Engine(**cfg)
        with psycopg.connect(db) as conn:
            got = query_candle_state(conn, clock_of(eng))
        assert asyncio.run(_aquery(db, clock_of(eng))) == got
        assert all(s["stored"] is (not cfg or eng.timeframes[s["timeframe_index"]] in ("1s", "5s"))
                   for s in got)
        expected = _twin_state(records, k, **cfg)
        got = sorted(({x: v for x, v in s.items() if x not in ("instrument_id", "stored")}
                      for s in got), key=key)
        assert got == sorted(expected, key=key)
        assert any(s["pv"] for s in got) and any(s["oi"] is not None for s in got)
        assert any(s["last_cum_volume"] is None for s in got)

    r2 = replay(str(part2), db, settings=settings, progress=False)
    assert r2.ticks > 0 and r2.skipped_messages == 0
    rw = replay(str(capture[0]), other_db, settings=settings, progress=False)
    assert rw.ticks == r1.ticks + r2.ticks
    assert_candles_equal_sql(db)
    with psycopg.connect(db) as a, psycopg.connect(other_db) as b:
        assert _ticks(a) == _ticks(b)
        assert _candles(a) == _candles(b)


def test_killed_pipeline_then_whole_replay(db, other_db, capture, rng):
    """A pipeline stops without its final flush (SIGKILL: forming candles never written, the
    short timeframes' not even upserted); the whole capture replayed again continues it."""
    from ingestor.feed.capture import CaptureReader
    from ingestor.store.dsn import connect
    from ingestor.store.instruments import register_tokens
    from ingestor.store.offsets import committed
    from ingestor.pipeline import Pipeline, PipelineSettings
    from ingestor.pipeline.replay import load_state, replay
    from ingestor.pipeline.state import clock_of, query_candle_state
    from ingestor.store.writer import Writer

    path, header, records = capture
    settings = PipelineSettings(flush_rows=1_000)
    stop_after = rng.randrange(2, 8)

    async def killed():
        writer = Writer(db)
        await writer.connect()
        written = 0
        with CaptureReader(path, chunk_size=1 << 16) as rd:
            for chunk, seq in rd.chunks():
                for batch in pipe.feed_chunk(chunk, seq):
                    await writer.write(batch)
                    written += 1
                    if written == stop_after:
                        await writer.close()
                        return
        raise AssertionError("the capture ended before the kill")

    with connect(db, autocommit=True) as setup:
        pipe = Pipeline(header.stream, resolve=lambda toks: register_tokens(setup, toks),
                        settings=settings, committed=committed(setup, header.stream))
        load_state(setup, pipe)
        asyncio.run(killed())
    with psycopg.connect(db) as conn:
        stored = conn.execute("select count(*) from tick_data").fetchone()[0]
        assert stored > 0
        last = committed(conn, header.stream)
        # the killed run left forming candles unwritten (1s, 5s) or stale: seeded as such
        st = query_candle_state(conn, clock_of(_core.Engine()))
        assert any(not s["stored"] for s in st)
    again = replay(str(path), db, settings=settings, progress=False)
    whole = replay(str(path), other_db, settings=settings, progress=False)
    # exactly what the killed run committed is skipped (the messages holding ticks),
    # exactly the rest is written
    dec = _core.KiteDecoder(capacity=1 << 20)
    seqs = np.concatenate([dec.ticks["seq"][:dec.n_ticks].copy()
                           for _ in decode_capture(str(path), dec)])
    assert again.skipped_messages == len(np.unique(seqs[seqs <= last])) > 0
    assert again.ticks == whole.ticks - stored > 0
    assert_candles_equal_sql(db)
    with psycopg.connect(db) as a, psycopg.connect(other_db) as b:
        assert _ticks(a) == _ticks(b)
        assert _candles(a) == _candles(b)


def test_without_candle_seeding_the_stored_candles_go_wrong(db, capture, tmp_path, rng,
                                                            monkeypatch):
    """Control: the same split with only last times and volumes seeded goes wrong, loudly:
    the second part takes the candles the first part stored (its final flush wrote every
    forming one) for new ones, and their plain COPY hits the key -- a bug, so the writer
    stops (it used to upsert them and silently break some candle)."""
    import ingestor.pipeline.replay as rp
    from ingestor.errors import WriterStopped
    from ingestor.pipeline import state
    from ingestor.pipeline import PipelineSettings

    monkeypatch.setattr(rp, "load_state", lambda conn, p: state.load_state(conn, p, candles=False))
    part1, part2 = _split(capture, tmp_path, _cut(capture[2], rng))
    settings = PipelineSettings(flush_rows=2_500)
    rp.replay(str(part1), db, settings=settings, progress=False)
    with pytest.raises(WriterStopped, match="ohlc_candles_key"):
        rp.replay(str(part2), db, settings=settings, progress=False)


def test_exact_conversions():
    from decimal import Decimal

    from ingestor.pipeline.state import clock_of, raw_price, vwap_e7

    # more digits than Decimal's default 28-digit context keeps
    pv = (1 << 32) - 1
    pv *= (1 << 62) + 12345
    assert pv > 10**28
    assert raw_price(Decimal(f"{pv // 100}.{pv % 100:02d}00000"), 100) == pv
    assert raw_price(Decimal("1234.5600000"), 100) == 123456
    assert raw_price(Decimal("0E-7"), 10_000_000) == 0
    assert raw_price(Decimal("-1.5"), 10) == -15
    with pytest.raises(ValueError):
        raw_price(Decimal("1.005"), 100)
    # (0.02 * 1 + 0.01 * 199999) / 200000 = 0.010000050: half away from zero
    assert vwap_e7(2 * 1 + 1 * 199_999, 200_000, 100) == 100001
    assert vwap_e7(10, 3, 10_000_000) == 3
    with pytest.raises(ValueError):
        clock_of(_core.Engine(origin="09:15"), origin="00:00")
    assert clock_of(_core.Engine(), ("1s", "5s", "1m", "5m", "15m", "1h", "1d"), "+05:30",
                    "00:00").lengths_us[-1] == DAY_US


def test_tail_batch_after_the_last_message_is_written_once(db, capture):
    """The final flush right after a batch covers no message: its forming candles and pending
    snapshots are still written (the offset cannot skip it), and writing it twice (a retry
    after a lost acknowledgement) changes nothing."""
    from ingestor.feed.capture import CaptureReader
    from ingestor.store.dsn import connect
    from ingestor.store.instruments import register_tokens
    from ingestor.pipeline import Pipeline, PipelineSettings
    from ingestor.store.writer import Writer

    path, header, _ = capture
    with connect(db, autocommit=True) as setup:
        pipe = Pipeline(header.stream, resolve=lambda toks: register_tokens(setup, toks),
                        settings=PipelineSettings(flush_rows=10**9, first_batch_rows=0))
        with CaptureReader(path) as rd:
            for chunk, seq in rd.chunks():
                assert not list(pipe.feed_chunk(chunk, seq))
        data = pipe.take()
        tail = pipe.take(final=True)
    assert data.n_ticks > 0 and tail.n_ticks == 0 and tail.last_seq < tail.first_seq
    assert tail.n_candles > 0 and tail.n_snapshots > 0

    async def write(*batches):
        w = Writer(db)
        try:
            return [await w.write(b) for b in batches]
        finally:
            await w.close()

    assert asyncio.run(write(data, tail)) == ["written", "written"]
    with psycopg.connect(db) as conn:
        before = conn.execute("select (select count(*) from order_book_snapshots), "
                              "(select count(*) from ohlc_candles)").fetchone()
    assert_candles_equal_sql(db)
    assert asyncio.run(write(data, tail)) == ["skipped", "written"]
    with psycopg.connect(db) as conn:
        assert conn.execute("select (select count(*) from order_book_snapshots), "
                            "(select count(*) from ohlc_candles)").fetchone() == before
    assert_candles_equal_sql(db)
