"""The candle definition is what SQL computes over the stored tick rows.

A random stream goes through the core engine; its tick rows are loaded into
a table with ``tick_data``'s columns (exact numeric(18,7) prices) in a real
PostgreSQL, and the candles of every timeframe are recomputed there with
``date_bin`` (the engine's offset and origin) and the ``lag()`` window over
the ticks that carry a volume.  Every column of every candle must be equal.
"""

from __future__ import annotations

import datetime
from decimal import Decimal

import numpy as np
import psycopg
import pytest

from ingestor import _core
# the candle definition in SQL lives with the product (`ingestor dead-letter replay`
# recomputes candles with it); test_replay and test_restart import it from here
from ingestor.store.candle_sql import CANDLES_SQL
from kite_stream import Tick, encode_message, messages, random_stream


def assert_candles_equal_sql(db, timeframes=_core.DEFAULT_TIMEFRAMES) -> None:
    """Every stored candle of ``timeframes`` equals SQL over the stored ticks, none missing or
    extra (rows compared in order, so a duplicated candle fails too).  ``db``: a connection
    or a DSN."""
    if isinstance(db, str):
        with psycopg.connect(db) as conn:
            return assert_candles_equal_sql(conn, timeframes)
    for label in timeframes:
        stride = f"{_core.timeframe_us(label)} microseconds"
        expected = db.execute(CANDLES_SQL, {"stride": stride,
                                            "origin": "1970-01-01 00:00:00+05:30"}).fetchall()
        stored = db.execute(
            "SELECT time, instrument_id, open_price, high_price, low_price, close_price, volume, "
            "trade_count, vwap, open_interest FROM ohlc_candles WHERE timeframe = %s "
            "ORDER BY instrument_id, time", (label,)).fetchall()
        assert len(stored) == len(expected) > 0, label
        bad = [(a, b) for a, b in zip(stored, expected) if tuple(a) != tuple(b)]
        assert not bad, (label, len(bad), bad[:3])

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
EXCHANGES = {1: "NSE", 2: "NFO", 3: "CDS", 4: "BSE", 5: "BFO", 6: "BCD", 7: "MCX",
             8: "MCXSX", 9: "NSE", 12: "NCO"}

TICK_DATA = """
create temporary table tick_data (
    time timestamptz not null,
    instrument_id integer not null,
    exchange text not null,
    price numeric(18,7) not null,
    quantity bigint,
    volume bigint,
    oi bigint,
    bid_price numeric(18,7),
    bid_quantity bigint,
    ask_price numeric(18,7),
    ask_quantity bigint,
    exchange_time timestamptz,
    unique (time, instrument_id)
)
"""

def _ts(us: int) -> datetime.datetime:
    return EPOCH + datetime.timedelta(microseconds=int(us))


def _price(raw: int, divisor: int) -> Decimal:
    return Decimal(int(raw)) / Decimal(int(divisor))   # exact: at most 17 digits


def _tick_records(rows):
    for r in rows:
        f = int(r["flags"])
        div = int(r["divisor"])
        book = f & _core.ROW_HAS_BOOK
        yield (
            _ts(r["time_us"]), int(r["instrument_id"]), EXCHANGES.get(int(r["segment"]), "X"),
            _price(r["price"], div),
            int(r["quantity"]) if f & _core.ROW_HAS_QUANTITY else None,
            int(r["volume"]) if f & _core.ROW_HAS_VOLUME else None,
            int(r["oi"]) if f & _core.ROW_HAS_OI else None,
            _price(r["bid_price"], div) if book else None,
            int(r["bid_quantity"]) if book else None,
            _price(r["ask_price"], div) if book else None,
            int(r["ask_quantity"]) if book else None,
            _ts(r["exchange_time_us"]) if f & _core.ROW_HAS_EXCHANGE_TIME else None,
        )


def _core_candle(c):
    div = int(c["divisor"])
    f = int(c["flags"])
    return (
        _ts(c["time_us"]), int(c["instrument_id"]),
        _price(c["open"], div), _price(c["high"], div), _price(c["low"], div),
        _price(c["close"], div), int(c["volume"]), int(c["trade_count"]),
        Decimal(int(c["vwap_e7"])).scaleb(-7) if f & _core.CANDLE_HAS_VWAP else None,
        int(c["open_interest"]) if f & _core.CANDLE_HAS_OI else None,
    )


@pytest.mark.parametrize("origin,utc_offset,start_utc", [
    ("00:00", "+05:30", "2023-11-14T16:00:00"),   # crosses IST midnight (18:30 UTC)
    ("09:15", "+05:30", "2023-11-14T01:30:00"),   # crosses the 09:15 IST origin (03:45 UTC)
])
def test_candles_equal_sql(pg_dsn, rng, origin, utc_offset, start_utc):
    start = datetime.datetime.fromisoformat(start_utc).replace(tzinfo=datetime.timezone.utc)
    start_ns = (start - EPOCH) // datetime.timedelta(microseconds=1) * 1000
    stream = random_stream(rng, 3_000, 25, start_ns=start_ns, max_step_ns=4_000_000_000)
    # A VWAP exactly halfway between two 1e-7 steps: (0.02 * 1 + 0.01 * 199999)
    # / 200000 = 0.010000050 -> 0.0100001 half away from zero (0.0100000 if
    # rounded half to even or truncated).
    tie_token = (4242 << 8) | 1
    t_end = (stream[-1].recv_ns // 1_000_000_000 + 1) * 1_000_000_000   # a whole second
    tie = [Tick(token=tie_token, length=44, recv_ns=t_end, price=p, volume=v)
           for p, v in [(5, 10), (2, 11), (1, 200010)]]
    eng = _core.Engine(utc_offset=utc_offset, origin=origin)
    dec = _core.KiteDecoder(capacity=1 << 14, depth_capacity=1 << 14)
    msgs = messages(rng, stream)
    msgs.append((t_end, len(msgs), encode_message(tie)))   # one message: times t, t+1, t+2 µs
    for recv_ns, seq, msg in msgs:
        assert dec.feed(msg, recv_ns, seq)
    tokens = eng.unknown_tokens(dec)
    eng.set_instruments(tokens, range(1, len(tokens) + 1))
    assert eng.process(dec) == dec.n_ticks
    rows = eng.output()[0].copy()
    candles = [eng.output()[1].copy()]
    eng.clear()
    while not eng.flush():
        candles.append(eng.output()[1].copy())
        eng.clear()
    candles.append(eng.output()[1].copy())
    candles = np.concatenate(candles)
    # the stream crosses a day boundary (local midnight or the origin)
    day = eng.timeframes.index("1d")
    assert len(np.unique(candles["time_us"][candles["timeframe"] == day])) == 2

    with psycopg.connect(pg_dsn) as conn:
        conn.execute(TICK_DATA)
        with conn.cursor() as cur:
            with cur.copy("copy tick_data from stdin") as copy:
                for rec in _tick_records(rows):
                    copy.write_row(rec)
            cur.execute("select count(*) from tick_data")
            assert cur.fetchone()[0] == len(rows)
            sign = utc_offset[0]
            origin_ts = f"1970-01-01 {origin}:00{sign}{utc_offset[1:]}"
            for tf_index, label in enumerate(eng.timeframes):
                stride = f"{_core.timeframe_us(label)} microseconds"
                cur.execute(CANDLES_SQL, {"stride": stride, "origin": origin_ts})
                expected = cur.fetchall()
                mine = sorted((_core_candle(c) for c in candles if c["timeframe"] == tf_index),
                              key=lambda c: (c[1], c[0]))
                assert len(mine) == len(expected), label
                for a, b in zip(mine, expected):
                    assert a == tuple(b), f"{label}: core {a} != sql {tuple(b)}"
                assert any(c[8] is not None for c in mine)
            tie = [c for c in candles if c["instrument_token"] == tie_token]
            assert len(tie) == len(eng.timeframes)
            assert {int(c["vwap_e7"]) for c in tie} == {100001}
