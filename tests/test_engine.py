"""The aggregation engine (``ingestor._core.Engine``) against its pure-Python twin.

Random Kite streams are encoded as the broker sends them, decoded by the real
``KiteDecoder`` and pushed through both engines in the same chunks, with the
core draining small output buffers (its stop-at-a-message protocol) and both
advanced to the same wall-clock times.  Every tick row, candle, snapshot,
open candle and flushed candle must be equal, field by field.
"""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestor import _core
from ingestor.twin import candles as twin
from kite_stream import Tick, encode_message, messages, random_stream

DAY_US = 86_400_000_000


def to_array(rows: list[dict], dtype) -> np.ndarray:
    arr = np.zeros(len(rows), dtype=dtype)
    for name in dtype.names if rows else ():
        arr[name] = [r[name] for r in rows]
    return arr


def assert_rows_equal(core: np.ndarray, twin_rows: list[dict], what: str) -> None:
    expected = to_array(twin_rows, core.dtype)
    assert len(core) == len(expected), f"{what}: {len(core)} rows, twin {len(expected)}"
    for name in core.dtype.names:
        a, b = core[name], expected[name]
        if not np.array_equal(a, b):
            bad = np.nonzero((a != b).reshape(len(a), -1).any(axis=1))[0][0]
            raise AssertionError(f"{what}[{bad}].{name}: core {a[bad]} twin {b[bad]}\n"
                                 f"core row {core[bad]}\ntwin row {twin_rows[bad]}")


class Run:
    """Drive the core and the twin over the same messages."""

    def __init__(self, rng, engine_kw, caps=(64, 256, 64), ids=None, seed_p=0.3):
        self.rng = rng
        self.seed_p = seed_p
        self.core = _core.Engine(**engine_kw, tick_capacity=caps[0], candle_capacity=caps[1],
                                 snapshot_capacity=caps[2], instrument_capacity=4)
        self.twin = twin.Engine(**engine_kw)
        self.dec = _core.KiteDecoder(capacity=1 << 15, depth_capacity=1 << 15)
        self.ids = ids if ids is not None else {}
        self.out = ([], [], [])

    def drain(self):
        rows, cands, snaps = self.core.output()
        self.out[0].append(rows.copy())
        self.out[1].append(cands.copy())
        self.out[2].append(snaps.copy())
        self.core.clear()

    def feed(self, msgs):
        dec = self.dec
        dec.clear()
        for recv_ns, seq, msg in msgs:
            assert dec.feed(msg, recv_ns, seq)
        n = dec.n_ticks
        ticks, depth = dec.ticks[:n], dec.depth[:dec.n_depth]
        unknown = self.core.unknown_tokens(dec)
        assert unknown.tolist() == self.twin.unknown_tokens(ticks)
        if n and int(ticks["instrument_token"][0]) in unknown.tolist():
            with pytest.raises(LookupError):
                self.core.process(dec)
        for tok in unknown.tolist():
            iid = self.ids.setdefault(tok, len(self.ids) + 1)
            self.core.set_instrument(tok, iid)
            self.twin.set_instrument(tok, iid)
            if self.rng.random() < self.seed_p:
                # a restarted daemon: state as stored in the database
                last = int(ticks["recv_ns"][0]) // 1000 + self.rng.randrange(-5_000_000, 5_000_000)
                vol = self.rng.choice([None, 0, self.rng.randrange(1 << 32)])
                self.core.seed(tok, last, vol)
                self.twin.seed(tok, last, vol)
        assert len(self.core.unknown_tokens(dec)) == 0
        pos = 0
        while True:
            before = self.core.n_tick_rows
            pos = self.core.process(dec, pos)
            # A stop lands on a message boundary.
            if 0 < pos < n:
                assert ticks["seq"][pos] != ticks["seq"][pos - 1]
            if pos == n:
                break
            assert self.core.n_tick_rows > 0 or before == 0
            self.drain()
        self.twin.process(ticks, depth)

    def advance(self, now_us):
        while not self.core.advance(now_us):
            self.drain()
        self.twin.advance(now_us)

    def check_open(self):
        assert_rows_equal(self.core.open_candles(), self.twin.open_candles(), "open_candles")

    def finish(self):
        while not self.core.flush():
            self.drain()
        self.drain()
        self.twin.flush()
        rows = np.concatenate(self.out[0])
        assert_rows_equal(rows, self.twin.tick_rows, "tick_rows")
        assert_rows_equal(np.concatenate(self.out[1]), self.twin.candles, "candles")
        assert_rows_equal(np.concatenate(self.out[2]), self.twin.snapshots, "snapshots")
        assert len(self.core.open_candles()) == 0
        self.stats = self.core.stats()
        assert self.stats["ticks"] == len(self.twin.tick_rows)
        return rows, np.concatenate(self.out[1]), np.concatenate(self.out[2])


def run_stream(rng, stream, engine_kw, caps, advance_p=0.2, chunk_max=8, per_message=4,
               seed_p=0.3):
    msgs = messages(rng, stream, per_message)
    run = Run(rng, engine_kw, caps, seed_p=seed_p)
    i = 0
    while i < len(msgs):
        k = rng.randrange(1, chunk_max + 1)
        run.feed(msgs[i:i + k])
        i += k
        if rng.random() < advance_p:
            last = msgs[min(i, len(msgs)) - 1][0] // 1000
            run.advance(last + rng.choice((-2_000_000, 0, 1, 1_000_000, 70_000_000, DAY_US)))
        if rng.random() < 0.2:
            run.check_open()
    return run.finish()


ENGINE_CONFIGS = st.fixed_dictionaries({
    "timeframes": st.sampled_from([twin.DEFAULT_TIMEFRAMES, ("1s",), ("1d", "5s", "7m"),
                                   ("2h", "1s", "1m", "15m")]),
    "utc_offset": st.sampled_from(["+05:30", "00:00", "-03:00", 19800]),
    "origin": st.sampled_from(["00:00", "09:15", "23:59:59"]),
    "snapshot_interval_us": st.sampled_from([0, 1, 1_000_000, 5_000_000, 60_000_000]),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), cfg=ENGINE_CONFIGS,
       n_ticks=st.integers(1, 250), n_inst=st.integers(1, 25),
       caps=st.tuples(st.integers(1, 40), st.integers(1, 120), st.integers(1, 30)),
       max_step=st.sampled_from([1_000, 400_000_000, 3_000_000_000, 90_000_000_000]))
def test_core_equals_twin(seed, cfg, n_ticks, n_inst, caps, max_step):
    # The stream is drawn from a seeded RNG (hypothesis shrinks the seed and
    # sizes; drawing every value through hypothesis exceeds its data budget).
    rnd = random.Random(seed)
    stream = random_stream(rnd, n_ticks, n_inst, max_step_ns=max_step)
    run_stream(rnd, stream, cfg, caps)


def test_late_tick_reopens_an_advanced_bucket():
    """advance() wrote a bucket out; a late tick lands in it: it is written again, whole."""
    tok = (3 << 8) | 1
    t0 = 1_700_000_040_000_000   # a minute boundary
    ticks = [Tick(token=tok, length=44, recv_ns=(t0 + dt) * 1000, price=p, volume=v)
             for dt, p, v in [(0, 100, 10), (1_000, 105, 12)]]
    late = Tick(token=tok, length=44, recv_ns=t0 * 1000, price=90, volume=20)
    run = Run(random.Random(0), {"timeframes": ("1m",)}, seed_p=0)
    run.feed([(t.recv_ns, i, encode_message([t])) for i, t in enumerate(ticks)])
    run.advance(t0 + 60_000_000)
    run.feed([(late.recv_ns, 5, encode_message([late]))])
    assert run.core.stats()["reopened"] == 1
    _, cands, _ = run.finish()
    assert [(c["trade_count"], c["low"], c["volume"]) for c in cands] == [(2, 100, 2), (3, 90, 10)]


def test_ten_thousand_instruments(rng):
    stream = random_stream(rng, 40_000, 10_000, max_step_ns=2_000_000)
    rows, cands, snaps = run_stream(rng, stream, {}, (4096, 16384, 4096), advance_p=0.05,
                                    chunk_max=400, per_message=50)
    assert len(np.unique(rows["instrument_token"])) > 9_000
    # time strictly increases per instrument
    order = np.lexsort((np.arange(len(rows)), rows["instrument_id"]))
    ids, times = rows["instrument_id"][order], rows["time_us"][order]
    same = ids[1:] == ids[:-1]
    assert (times[1:][same] > times[:-1][same]).all()


def test_vwap_exact_against_fractions(rng):
    """Every VWAP equals the exact rational rounded half away from zero (a check
    of the twin too), with prices and volumes large enough to overflow 64 bits."""
    stream = random_stream(rng, 3_000, 5, max_step_ns=20_000_000_000, big=True, traded=2)
    # One instrument whose cumulative volume swings between 1 and 2^32 - 1
    # (session resets) at prices near 2^32: its sums pass 2^64 within a minute.
    tok = (77 << 8) | 1
    t_end = stream[-1].recv_ns
    for k in range(40):
        vol = (1 << 32) - 1 - rng.randrange(0, 1000) if k % 2 else rng.randrange(1, 1000)
        stream.append(Tick(token=tok, length=44, recv_ns=t_end + k * 1_000_000_000,
                           price=(1 << 32) - 1 - rng.randrange(0, 1 << 20), quantity=1,
                           volume=vol))
    rows, cands, _ = run_stream(rng, stream, {"timeframes": ("1m", "1h", "1d")},
                                (1 << 14, 1 << 14, 1 << 14), advance_p=0, seed_p=0)
    assert (cands["flags"] & _core.CANDLE_HAS_VWAP).any()
    # rebuild the volume increases from the tick rows
    prev = {}
    incr = np.zeros(len(rows), dtype=object)
    for i, r in enumerate(rows):
        if r["flags"] & _core.ROW_HAS_VOLUME:
            p = prev.get(int(r["instrument_id"]))
            v = int(r["volume"])
            incr[i] = 0 if p is None else (v - p if v >= p else v)
            prev[int(r["instrument_id"])] = v
    checked = 0
    wide = 0
    for c in cands:
        length = twin.timeframe_us(("1m", "1h", "1d")[c["timeframe"]])
        sel = ((rows["instrument_id"] == c["instrument_id"]) & (rows["time_us"] >= c["time_us"])
               & (rows["time_us"] < c["time_us"] + length))
        pv = sum(int(p) * int(d) for p, d in zip(rows["price"][sel], incr[sel]))
        vol = sum(int(d) for d in incr[sel])
        assert c["volume"] == vol
        assert c["trade_count"] == sel.sum()
        if vol == 0:
            assert not c["flags"] & _core.CANDLE_HAS_VWAP
            continue
        exact = Fraction(pv, vol * int(c["divisor"])) * 10**7
        q, r = divmod(exact.numerator, exact.denominator)
        expect = q + (1 if 2 * r >= exact.denominator else 0)
        assert c["vwap_e7"] == expect
        checked += 1
        wide += pv >= 1 << 64
    assert checked > 10 and wide > 0


def test_hand_computed_candles():
    """A small stream whose candles are worked out by hand."""
    tok = (1234 << 8) | 1           # NSE: divisor 100
    base = 1_700_000_000_000_000    # µs; 2023-11-14 22:13:20 UTC
    t0 = (base // 60_000_000 + 1) * 60_000_000   # a minute boundary (IST too)

    def q(dt_us, price, vol, length=44):
        return Tick(token=tok, length=length, recv_ns=(t0 + dt_us) * 1000, price=price,
                    quantity=1, volume=vol)

    ticks = [q(0, 10000, 500), q(10_000_000, 10100, 510), q(10_000_000, 9900, 530, 8),
             q(59_999_999, 10050, 530), q(60_000_000, 10200, 400)]
    eng = _core.Engine(timeframes=("1m",))
    eng.set_instrument(tok, 7)
    dec = _core.KiteDecoder()
    for i, t in enumerate(ticks):
        dec.feed(encode_message([t]), t.recv_ns, i)
    assert eng.process(dec) == 5
    rows, cands, snaps = eng.output()
    assert rows["time_us"].tolist() == [t0, t0 + 10_000_000, t0 + 10_000_001,
                                        t0 + 59_999_999, t0 + 60_000_000]
    assert rows["flags"].tolist()[2] == 0      # LTP: no quantity, volume, ...
    assert len(cands) == 1
    c = cands[0]
    assert (c["time_us"], c["open"], c["high"], c["low"], c["close"]) == (t0, 10000, 10100, 9900, 10050)
    # increases: first 0, +10, LTP 0, 530 - 510 = 20
    assert (c["volume"], c["trade_count"]) == (30, 4)
    # vwap = (101.00 * 10 + 100.50 * 20) / 30 = 100.6666666...7 -> 100.6666667
    assert c["vwap_e7"] == 1006666667
    assert c["instrument_id"] == 7 and c["flags"] == _core.CANDLE_HAS_VWAP
    (o,) = eng.open_candles()
    # cumulative volume fell 530 -> 400 (new session): the increase is 400
    assert (o["time_us"], o["volume"], o["trade_count"], o["vwap_e7"]) == (t0 + 60_000_000, 400, 1, 1020000000)


def test_buckets_align_to_local_midnight_and_origin():
    eng = _core.Engine(timeframes=("1h", "1d"), utc_offset="+05:30", origin="09:15")
    tok = (5 << 8) | 1
    eng.set_instrument(tok, 1)
    # 2024-01-02 10:20:00 IST = 04:50:00 UTC
    t = 1704171000 * 1_000_000
    dec = _core.KiteDecoder()
    dec.feed(encode_message([Tick(token=tok, length=8, recv_ns=t * 1000, price=1)]), t * 1000, 0)
    eng.process(dec)
    hour, day = eng.open_candles()
    assert hour["time_us"] == t - 5 * 60_000_000           # 10:15 IST
    assert day["time_us"] == t - 65 * 60_000_000           # 09:15 IST the same day
    eng2 = _core.Engine(timeframes=("1h", "1d"))
    eng2.set_instrument(tok, 1)
    eng2.process(dec)
    hour, day = eng2.open_candles()
    assert hour["time_us"] == t - 20 * 60_000_000          # 10:00 IST
    assert day["time_us"] == t - (10 * 60 + 20) * 60_000_000  # 00:00 IST


def test_seed_continues_time_and_volume():
    tok = (9 << 8) | 2
    eng = _core.Engine(timeframes=("1m",))
    eng.set_instrument(tok, 3)
    eng.seed(tok, last_time_us=2_000_000_000_000_000, last_cum_volume=1000)
    dec = _core.KiteDecoder()
    dec.feed(encode_message([Tick(token=tok, length=44, recv_ns=1_000, price=5, volume=1400)]),
             1_000, 0)
    eng.process(dec)
    rows, _, _ = eng.output()
    assert rows["time_us"][0] == 2_000_000_000_000_001
    (o,) = eng.open_candles()
    assert o["volume"] == 400
    # unseeded: the first tick carrying a volume adds 0
    eng2 = _core.Engine(timeframes=("1m",))
    eng2.set_instrument(tok, 3)
    eng2.process(dec)
    assert eng2.open_candles()[0]["volume"] == 0


def test_unknown_tokens_and_errors():
    eng = _core.Engine()
    a, b = (1 << 8) | 1, (2 << 8) | 3
    dec = _core.KiteDecoder()
    dec.feed(encode_message([Tick(token=a, length=8, recv_ns=1, price=1),
                             Tick(token=b, length=8, recv_ns=1, price=1),
                             Tick(token=a, length=8, recv_ns=1, price=1)]), 1, 0)
    assert eng.unknown_tokens(dec).tolist() == [a, b]
    eng.set_instruments(np.array([b]), np.array([11]))
    assert eng.unknown_tokens(dec).tolist() == [a]
    with pytest.raises(LookupError):
        eng.process(dec)
    assert eng.n_tick_rows == 0
    eng.set_instrument(a, 10)
    assert eng.process(dec) == 3
    assert eng.output()[0]["instrument_id"].tolist() == [10, 11, 10]
    assert eng.instrument_id(a) == 10 and eng.instrument_id(12345) is None
    with pytest.raises(ValueError):
        _core.Engine(timeframes=("1w",))
    with pytest.raises(ValueError):
        _core.Engine(origin="25:00")


def test_first_unseen_marks_each_instrument_once_per_stream():
    eng = _core.Engine()
    a, b, c = (1 << 8) | 1, (2 << 8) | 3, (3 << 8) | 1
    eng.set_instruments(np.array([a, b]), np.array([10, 11]))
    dec = _core.KiteDecoder()
    dec.feed(encode_message([Tick(token=b, length=8, recv_ns=1, price=1),
                             Tick(token=a, length=8, recv_ns=2, price=1),
                             Tick(token=b, length=8, recv_ns=3, price=1),
                             Tick(token=c, length=8, recv_ns=4, price=1),
                             Tick(token=c, length=8, recv_ns=5, price=1)]), 1, 0)
    toks, first = eng.first_unseen(dec)
    # in order of first appearance, with the index of that tick; c has no slot
    assert toks.tolist() == [b, a, c] and first.tolist() == [0, 1, 3]
    toks, first = eng.first_unseen(dec, 2)
    assert toks.tolist() == [c] and first.tolist() == [3]  # slotless: every call
    eng.forget_seen()
    toks, first = eng.first_unseen(dec, 1)
    assert toks.tolist() == [a, b, c] and first.tolist() == [1, 2, 3]
    arr = dec.ticks[:dec.n_ticks].copy()  # a TICK_DTYPE array is a source too
    eng.forget_seen()
    assert eng.first_unseen(arr)[0].tolist() == [b, a, c]
    assert len(eng.first_unseen(arr, 5)[0]) == 0


def test_real_full_packet_vector():
    """The real Kite full-mode vector: tick rows carry its book's best levels."""
    import os

    from conftest import VECTORS

    with open(os.path.join(VECTORS, "fullMode_binary.packet"), "rb") as f:
        msg = f.read()
    dec = _core.KiteDecoder()
    dec.feed(msg, 1_700_000_000_000_000_000, 0)
    eng = _core.Engine(snapshot_interval_us=0)
    eng.set_instruments(eng.unknown_tokens(dec), np.arange(len(eng.unknown_tokens(dec))))
    eng.process(dec)
    rows, _, snaps = eng.output()
    ticks = dec.ticks[:dec.n_ticks]
    full = ticks["length"] == 184
    assert full.any()
    books = dec.depth[ticks["depth_row"][full]]
    assert (rows["bid_price"][full] == books["bid_price"][:, 0]).all()
    assert (rows["ask_quantity"][full] == books["ask_quantity"][:, 0]).all()
    assert (rows["flags"][full] & _core.ROW_HAS_BOOK).all()
    assert len(snaps) == full.sum()
    assert (snaps["bid_orders"] == books["bid_orders"]).all()


def test_vwap_tie_rounds_half_away_from_zero():
    """(0.02 * 1 + 0.01 * 199999) / 200000 = 0.010000050: exactly halfway."""
    tok = (4242 << 8) | 1
    eng = _core.Engine(timeframes=("1s",))
    eng.set_instrument(tok, 1)
    dec = _core.KiteDecoder()
    for k, (p, v) in enumerate([(5, 10), (2, 11), (1, 200010)]):
        t = Tick(token=tok, length=44, recv_ns=10**18 + k * 1000, price=p, volume=v)
        dec.feed(encode_message([t]), t.recv_ns, k)
    eng.process(dec)
    (c,) = eng.open_candles()
    assert (c["volume"], c["vwap_e7"]) == (200000, 100001)
