"""The SmartStream decoder (``_core.SmartStreamDecoder``): golden frames, its pure-Python
twin, property tests, and the engine taking its ticks as it takes Kite's.

No public capture of SmartStream frames exists (broker-frames.md section 2.5), so the golden
frames here are assembled byte by byte at the offsets of the layout table (section 2.2-2.3),
not with the twin's encoder, and decoded to the values the table gives them.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestor import _core
from ingestor._core import DEPTH20_DTYPE, Engine, SmartStreamDecoder
from ingestor.twin.smartstream import (Keys, TwinStats, core_records, decode_message,
                                       encode_depth, encode_ltp, encode_quote,
                                       encode_snap_quote, parse_packet, split_records,
                                       walk_capture)


def i64(v: int) -> bytes:
    return v.to_bytes(8, "little", signed=True)


def head(mode: int, etype: int, token: bytes, size: int) -> bytearray:
    b = bytearray(size)
    b[0], b[1] = mode, etype
    b[2:2 + len(token)] = token
    return b


def golden_ltp() -> bytes:
    # SBIN-EQ (nse_cm token "3045"): LTP 590.25 at 2023-11-14 22:13:20.123 UTC
    b = head(1, 1, b"3045", 51)
    b[27:35] = i64(1234567)
    b[35:43] = i64(1_700_000_000_123)
    b[43:51] = i64(59025)
    return bytes(b)


def golden_quote_currency() -> bytes:
    # USDINR future (cde_fo token "1185"): prices over 10^7
    b = head(2, 13, b"1185", 123)
    b[35:43] = i64(1_700_000_001_999)
    b[43:51] = i64(831_234_000)          # 83.1234
    b[51:59] = i64(3)
    b[59:67] = i64(831_200_000)
    b[67:75] = i64(987_654)
    b[75:83] = struct.pack("<d", 1500.0)
    b[83:91] = struct.pack("<d", 2500.0)
    for off, v in ((91, 830_000_000), (99, 835_000_000), (107, 829_000_000),
                   (115, 830_500_000)):
        b[off:off + 8] = i64(v)
    return bytes(b)


BIDS = [(100, 260_000, 3), (50, 259_995, 1), (75, 259_990, 2), (0, 0, 0), (10, 259_900, 1)]
ASKS = [(20, 260_010, 1), (40, 260_020, 4), (60, 260_030, 2), (80, 260_040, 1), (5, 260_100, 9)]


def golden_snap_quote() -> bytes:
    # NIFTY future (nse_fo token "35001"), SNAP_QUOTE with its best five
    b = head(3, 2, b"35001", 379)
    b[27:35] = i64(42)
    b[35:43] = i64(1_700_000_002_500)
    b[43:51] = i64(2_600_005)           # 26000.05
    b[51:59] = i64(50)
    b[59:67] = i64(2_599_010)
    b[67:75] = i64(12_345_678)
    b[75:83] = struct.pack("<d", 123456.0)
    b[83:91] = struct.pack("<d", 654321.0)
    for off, v in ((91, 2_590_000), (99, 2_610_000), (107, 2_580_000), (115, 2_595_000)):
        b[off:off + 8] = i64(v)
    b[123:131] = i64(1_700_000_001)     # last traded time, seconds
    b[131:139] = i64(9_876_543)         # open interest
    b[139:147] = struct.pack("<d", float("nan"))   # "dummy field, garbage"
    for i, (q, p, o) in enumerate(BIDS):
        e = 147 + 20 * i
        b[e:e + 2] = (1).to_bytes(2, "little")
        b[e + 2:e + 10], b[e + 10:e + 18] = i64(q), i64(p)
        b[e + 18:e + 20] = o.to_bytes(2, "little")
    for i, (q, p, o) in enumerate(ASKS):
        e = 247 + 20 * i
        b[e + 2:e + 10], b[e + 10:e + 18] = i64(q), i64(p)
        b[e + 18:e + 20] = o.to_bytes(2, "little")
    for off, v in ((347, 2_860_000), (355, 2_340_000), (363, 2_700_000), (371, 1_800_000)):
        b[off:off + 8] = i64(v)
    return bytes(b)


def golden_depth() -> bytes:
    b = head(4, 1, b"2885", 443)
    b[27:35] = i64(1_700_000_003_000)
    b[35:43] = i64(1_700_000_003_001)
    for i in range(20):
        e = 43 + 10 * i
        b[e:e + 4] = (1000 + i).to_bytes(4, "little")
        b[e + 4:e + 8] = (250_000 - 5 * i).to_bytes(4, "little")
        b[e + 8:e + 10] = (i + 1).to_bytes(2, "little")
        e = 243 + 10 * i
        b[e:e + 4] = (2000 + i).to_bytes(4, "little")
        b[e + 4:e + 8] = (250_005 + 5 * i).to_bytes(4, "little")
        b[e + 8:e + 10] = (i + 2).to_bytes(2, "little")
    return bytes(b)


def feed_all(frames, dec=None, seq0=0):
    dec = dec or SmartStreamDecoder(64)
    for k, f in enumerate(frames):
        assert dec.feed(f, 1_000 + k, seq0 + k)
    return dec


# -- golden frames --------------------------------------------------------------------------

def test_golden_ltp():
    f = golden_ltp()
    dec = feed_all([f])
    (t,), _ = core_records(dec)
    assert t["instrument_token"] & 0xFF == 1 and t["segment"] == 1 and t["divisor"] == 100
    assert t["last_price"] == 59025 and t["last_price"] / t["divisor"] == 590.25
    assert (t["mode"], t["length"]) == (1, 8)
    assert t["exchange_timestamp"] == 1_700_000_000    # ms to s (floor)
    assert t["last_traded_quantity"] == 0 and t["book"] is None
    assert dec.token_of(t["instrument_token"]) == (1, "3045")
    st_ = dec.stats()
    assert (st_["messages"], st_["packets"], st_["ltp"], st_["malformed_messages"]) == (1, 1, 1, 0)
    assert f == encode_ltp(1, "3045", 59025, 1234567, 1_700_000_000_123)
    p = parse_packet(f)
    assert (p["token"], p["sequence_number"], p["last_traded_price"]) == ("3045", 1234567, 59025)


def test_golden_quote_currency_divisor():
    f = golden_quote_currency()
    (t,), _ = core_records(feed_all([f]))
    assert t["segment"] == 3 and t["divisor"] == 10_000_000
    assert t["instrument_token"] & 0xFF == 3
    assert t["last_price"] == 831_234_000
    assert (t["last_traded_quantity"], t["average_traded_price"], t["volume_traded"]) == \
        (3, 831_200_000, 987_654)
    assert (t["total_buy_quantity"], t["total_sell_quantity"]) == (1500, 2500)
    assert (t["open"], t["high"], t["low"], t["close"]) == \
        (830_000_000, 835_000_000, 829_000_000, 830_500_000)
    assert (t["mode"], t["length"]) == (2, 44)
    assert t["exchange_timestamp"] == 1_700_000_001
    assert f == encode_quote(13, "1185", 831_234_000, 0, 1_700_000_001_999, 3, 831_200_000,
                             987_654, 1500.0, 2500.0, 830_000_000, 835_000_000, 829_000_000,
                             830_500_000)


def test_golden_snap_quote_book():
    f = golden_snap_quote()
    dec = feed_all([f])
    (t,), _ = core_records(dec)
    assert (t["mode"], t["length"], t["segment"]) == (3, 184, 2)
    assert t["last_price"] == 2_600_005 and t["oi"] == 9_876_543
    assert t["last_trade_time"] == 1_700_000_001
    assert t["volume_traded"] == 12_345_678
    assert (t["total_buy_quantity"], t["total_sell_quantity"]) == (123456, 654321)
    book = t["book"]
    assert list(zip(book["bid_quantity"], book["bid_price"], book["bid_orders"])) == BIDS
    assert list(zip(book["ask_quantity"], book["ask_price"], book["ask_orders"])) == ASKS
    assert dec.stats()["bad_field"] == 0   # the OI-change garbage is not read
    assert f[:139] + struct.pack("<d", 0.0) + f[147:] == encode_snap_quote(
        2, "35001", 2_600_005, 42, 1_700_000_002_500, 50, 2_599_010, 12_345_678, 123456.0,
        654321.0, 2_590_000, 2_610_000, 2_580_000, 2_595_000, 1_700_000_001, 9_876_543, 0.0,
        *[list(x) for x in zip(*BIDS)], *[list(x) for x in zip(*ASKS)],
        2_860_000, 2_340_000, 2_700_000, 1_800_000)
    p = parse_packet(f)
    assert [lv["flag"] for lv in p["best_5_buy_data"]] == [1] * 5
    assert p["52_week_low_price"] == 1_800_000


def test_golden_depth20():
    f = golden_depth()
    dec = feed_all([f])
    ticks, (d,) = core_records(dec)
    assert ticks == [] and dec.n_ticks == 0
    assert (d["word27"], d["word35"]) == (1_700_000_003_000, 1_700_000_003_001)
    assert d["bid_quantity"] == [1000 + i for i in range(20)]
    assert d["bid_price"] == [250_000 - 5 * i for i in range(20)]
    assert d["ask_orders"] == [i + 2 for i in range(20)]
    assert d["exchange_type"] == 1 and d["divisor"] == 100
    assert dec.stats()["depth"] == 1
    assert DEPTH20_DTYPE.itemsize == dec.depth20.dtype.itemsize
    assert f == encode_depth(1, "2885", 1_700_000_003_000, 1_700_000_003_001,
                             [(1000 + i, 250_000 - 5 * i, i + 1) for i in range(20)],
                             [(2000 + i, 250_005 + 5 * i, i + 2) for i in range(20)])


@pytest.mark.parametrize("frame,reason", [
    (b"", "empty_message"),
    (golden_ltp()[:50], "short"),
    (golden_snap_quote()[:378], "short"),
    (golden_depth()[:442], "short"),
    (b"\x05" + golden_ltp()[1:], "unknown_mode"),
    (b"\x00" + golden_ltp()[1:], "unknown_mode"),
    (golden_ltp()[:1] + b"\x06" + golden_ltp()[2:], "unknown_exchange"),
    (golden_ltp()[:2] + b"\x00" * 25 + golden_ltp()[27:], "bad_token"),
    (golden_ltp()[:2] + b"30 5" + b"\x00" * 21 + golden_ltp()[27:], "bad_token"),
    (golden_ltp()[:2] + b"\xff" * 25 + golden_ltp()[27:], "bad_token"),
    (golden_ltp()[:43] + i64(-1), "out_of_range"),
    (golden_ltp()[:43] + i64(1 << 32), "out_of_range"),
    (golden_snap_quote()[:131] + i64(-5) + golden_snap_quote()[139:], "out_of_range"),
    (golden_snap_quote()[:157] + i64(1 << 40) + golden_snap_quote()[165:], "out_of_range"),
    (golden_depth()[:43] + b"\xff\xff\xff\xff" + golden_depth()[47:], "out_of_range"),
])
def test_set_aside_by_reason(frame, reason):
    dec = SmartStreamDecoder(8)
    stats = TwinStats()
    assert dec.feed(frame, 1, 1)
    assert decode_message(frame, 1, 1, stats) == []
    assert dec.n_ticks == dec.n_depth == dec.n_depth20 == 0
    s = dec.stats()
    assert s[reason] == 1 and s["malformed_messages"] == 1 and s["messages"] == 1
    assert s["packets"] == 0
    assert s == stats.as_dict()


def test_kept_with_a_reason():
    # trailing bytes: decoded, counted; unrepresentable informational fields: 0, counted
    long = golden_ltp() + b"\x00" * 9
    bad = bytearray(golden_quote_currency())
    bad[75:83] = struct.pack("<d", float("nan"))
    bad[83:91] = struct.pack("<d", -1.0)
    bad[35:43] = i64(-1000)
    dec = feed_all([long, bytes(bad)])
    ticks, _ = core_records(dec)
    assert len(ticks) == 2
    assert ticks[1]["total_buy_quantity"] == ticks[1]["total_sell_quantity"] == 0
    assert ticks[1]["exchange_timestamp"] == 0
    s = dec.stats()
    assert (s["trailing_bytes"], s["malformed_messages"], s["bad_field"]) == (1, 1, 3)
    stats, keys = TwinStats(), Keys()
    want = decode_message(long, 1000, 0, stats, keys) + decode_message(bytes(bad), 1001, 1,
                                                                       stats, keys)
    assert (ticks, []) == split_records(want)
    assert s == stats.as_dict()


def test_token_after_nul_is_ignored_and_keys_are_per_exchange_type():
    a = encode_ltp(1, b"3045\x00junk", 100)
    b = encode_ltp(1, "3045", 200)
    c = encode_ltp(2, "3045", 300)          # the same token string in another segment
    dec = feed_all([a, b, c])
    ticks, _ = core_records(dec)
    assert ticks[0]["instrument_token"] == ticks[1]["instrument_token"]
    assert ticks[2]["instrument_token"] != ticks[0]["instrument_token"]
    assert ticks[2]["instrument_token"] & 0xFF == 2
    assert sorted(dec.keys().values()) == [(1, "3045"), (2, "3045")]


def test_resolver_assigns_and_refuses():
    calls = []

    def resolver(etype, token):
        calls.append((etype, token))
        return None if token == "BAD" else (int(token) << 8) | {1: 1, 2: 2}[etype]

    dec = SmartStreamDecoder(8)
    dec.resolver = resolver
    frames = [encode_ltp(1, "3045", 1), encode_ltp(1, "BAD", 2), encode_ltp(1, "3045", 3),
              encode_ltp(2, "7", 4)]
    feed_all(frames, dec)
    ticks, _ = core_records(dec)
    assert [t["instrument_token"] for t in ticks] == [(3045 << 8) | 1, (3045 << 8) | 1,
                                                      (7 << 8) | 2]
    assert calls == [(1, "3045"), (1, "BAD"), (2, "7")]   # once per token
    assert dec.stats()["refused_token"] == 1

    wrong = SmartStreamDecoder(8)
    wrong.resolver = lambda etype, token: (5 << 8) | 3      # the currency segment for nse_cm
    with pytest.raises(ValueError, match="segment code 1"):
        wrong.feed(encode_ltp(1, "1", 1))


def test_add_keys_preloads():
    dec = SmartStreamDecoder(8)
    dec.add_keys([(1, "3045", (77 << 8) | 1), (13, "1185", (78 << 8) | 3), (2, "X", None)])
    dec.resolver = lambda *a: pytest.fail("preloaded tokens need no resolver")
    feed_all([encode_ltp(1, "3045", 1), encode_ltp(13, "1185", 2), encode_ltp(2, "X", 3)], dec)
    ticks, _ = core_records(dec)
    assert [t["instrument_token"] for t in ticks] == [(77 << 8) | 1, (78 << 8) | 3]
    assert dec.stats()["refused_token"] == 1
    with pytest.raises(ValueError):
        dec.add_keys([(1, "x" * 26, (1 << 8) | 1)])
    with pytest.raises(ValueError):
        dec.add_keys([(6, "1", (1 << 8) | 1)])


def test_many_tokens_grow_the_table():
    dec = SmartStreamDecoder(1 << 14)
    frames = [encode_ltp(1 + (i % 2), str(i), i) for i in range(5000)]
    feed_all(frames, dec)
    ticks, _ = core_records(dec)
    assert len({t["instrument_token"] for t in ticks}) == 5000
    again = feed_all(frames, SmartStreamDecoder(1 << 14))
    assert [t["instrument_token"] for t in core_records(again)[0]] == \
        [t["instrument_token"] for t in ticks]   # the same order gives the same local keys


# -- the twin, by property ------------------------------------------------------------------

ETYPES = [1, 2, 3, 4, 5, 7, 13]
u32 = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF]))
i64s = st.one_of(u32, st.integers(-(1 << 63), (1 << 63) - 1),
                 st.sampled_from([-1, 1 << 32, (1 << 63) - 1, -(1 << 63)]))
# mostly in range, one field in ~50 anything
price = st.tuples(st.integers(0, 49), u32, i64s).map(lambda t: t[2] if t[0] == 0 else t[1])
floats = st.one_of(st.floats(0, 1e9, allow_nan=False),
                   st.floats(allow_nan=True, allow_infinity=True))
token = st.one_of(st.integers(0, 10**9).map(str), st.text("0123456789ABC-", min_size=1,
                                                         max_size=25))
etype = st.sampled_from(ETYPES)
five = st.lists(price, min_size=5, max_size=5)
orders5 = st.lists(st.integers(0, 0xFFFF), min_size=5, max_size=5)
level20 = st.tuples(st.integers(-(1 << 31), (1 << 31) - 1).filter(lambda v: v >= -5),
                    st.integers(0, (1 << 31) - 1), st.integers(0, 0xFFFF))

ltp_frame = st.builds(encode_ltp, etype, token, price, i64s, i64s)
quote_frame = st.builds(encode_quote, etype, token, price, i64s, i64s, price, price, price,
                        floats, floats, price, price, price, price)
snap_frame = st.builds(
    lambda head, bq, bp, bo, aq, ap, ao: encode_snap_quote(
        *head, bid_quantity=bq, bid_price=bp, bid_orders=bo, ask_quantity=aq, ask_price=ap,
        ask_orders=ao),
    st.tuples(etype, token, price, i64s, i64s, price, price, price, floats, floats, price,
              price, price, price, i64s, price, floats),
    five, five, orders5, five, five, orders5)
depth_frame = st.builds(encode_depth, etype, token, i64s, i64s,
                        st.lists(level20, max_size=20), st.lists(level20, max_size=20))
frame = st.one_of(ltp_frame, quote_frame, snap_frame, depth_frame)
frames = st.lists(frame, min_size=0, max_size=30)

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(frames, st.integers(1, 6))
def test_decoder_equals_twin(fs, capacity):
    """Small buffers: the not-enough-room path runs; every message ends up decoded once."""
    dec = SmartStreamDecoder(capacity, depth_capacity=max(1, capacity // 2))
    stats, keys = TwinStats(), Keys()
    got_t, got_d, want = [], [], []
    for seq, f in enumerate(fs):
        want += decode_message(f, 10 + seq, seq, stats, keys)
        if not dec.feed(f, 10 + seq, seq):
            t, d = core_records(dec)
            got_t, got_d = got_t + t, got_d + d
            dec.clear()
            assert dec.feed(f, 10 + seq, seq)
    t, d = core_records(dec)
    assert (got_t + t, got_d + d) == split_records(want)
    assert dec.stats() == stats.as_dict()
    assert dec.stats()["messages"] == len(fs)


def _record(recv_ns: int, kind: int, payload: bytes) -> bytes:
    return struct.pack("<QBI", recv_ns, kind, len(payload)) + payload


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from([1, 1, 1, 1, 2, 0, 9]), frame), max_size=40),
       st.integers(1, 5), st.integers(1, 3))
def test_feed_capture_equals_twin(items, capacity, text_capacity):
    chunk = b"".join(_record(1_000 + i, k, f if k != 2 else b"pong")
                     for i, (k, f) in enumerate(items))
    stats = TwinStats()
    want, want_texts, end, end_seq = walk_capture(chunk, 0, 100, stats, Keys())
    dec = SmartStreamDecoder(capacity, text_capacity=text_capacity)
    got_t, got_d, texts = [], [], []
    pos, seq = 0, 100
    while True:
        pos, seq, full = dec.feed_capture(chunk, pos, seq)
        t, d = core_records(dec)
        got_t, got_d = got_t + t, got_d + d
        texts += [tuple(int(x) for x in r) for r in dec.texts[:dec.n_texts].tolist()]
        dec.clear()
        if not full:
            break
    assert (pos, seq) == (end, end_seq) == (len(chunk), 100 + len(items))
    assert (got_t, got_d) == split_records(want)
    assert texts == want_texts
    assert dec.stats() == stats.as_dict()


def test_receive_time_window():
    chunk = _record(5, 1, golden_ltp()) + _record(50, 1, golden_ltp())
    dec = SmartStreamDecoder(8)
    dec.min_recv_ns = 10
    dec.feed_capture(chunk)
    assert dec.n_ticks == 1 and dec.stats()["bad_time"] == 1


# -- through the engine ---------------------------------------------------------------------

def test_engine_takes_smartstream_ticks():
    """The shared engine makes tick rows from SmartStream ticks as from Kite's: quantity and
    volume for QUOTE, OI and the best level for SNAP_QUOTE, the currency divisor, the
    exchange time to the millisecond (the golden LTP's is ...000123 ms)."""
    dec = feed_all([golden_ltp(), golden_quote_currency(), golden_snap_quote()])
    eng = Engine(tick_capacity=64, candle_capacity=256, snapshot_capacity=64)
    unknown = eng.unknown_tokens(dec)
    assert len(unknown) == 3
    eng.set_instruments(unknown, np.arange(1, 4, dtype=np.int64))
    assert eng.process(dec) == 3
    rows, _, _ = eng.output()
    by_key = {int(r["instrument_token"]): r for r in rows}
    ltp, quote, snap = (by_key[int(t["instrument_token"])]
                        for t in dec.ticks[:3])
    assert ltp["flags"] & _core.ROW_HAS_QUANTITY == 0
    assert ltp["flags"] & _core.ROW_HAS_EXCHANGE_TIME
    assert ltp["exchange_time_us"] == 1_700_000_000_123 * 1000
    assert int(dec.ticks[0]["exchange_timestamp"]) == 1_700_000_000
    assert int(dec.ticks[0]["exchange_ms"]) == 123
    assert quote["divisor"] == 10_000_000 and quote["price"] == 831_234_000
    assert quote["flags"] & _core.ROW_HAS_VOLUME and quote["volume"] == 987_654
    assert snap["flags"] & _core.ROW_HAS_BOOK and snap["flags"] & _core.ROW_HAS_OI
    assert (snap["bid_price"], snap["bid_quantity"]) == (260_000, 100)
    assert (snap["ask_price"], snap["ask_quantity"]) == (260_010, 20)
    assert snap["oi"] == 9_876_543
    # the exchange column comes from the segment: NFO for nse_fo, CDS for cde_fo
    from ingestor.store.instruments import EXCHANGES
    assert [EXCHANGES[int(r["segment"])] for r in (ltp, quote, snap)] == ["NSE", "CDS", "NFO"]


def test_nan_oi_change_is_never_read():
    f = bytearray(golden_snap_quote())
    for bits in (b"\xff" * 8, struct.pack("<d", math.inf)):
        f[139:147] = bits
        dec = feed_all([bytes(f)])
        assert dec.n_ticks == 1 and dec.stats()["bad_field"] == 0
