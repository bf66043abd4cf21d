"""Property tests: the compiled decoder equals its pure-Python twin.

Hypothesis draws valid frames (tokens in every segment and some unknown
ones, all five packet lengths, any uint32 values including the top bit
set) and checks ``decode_kite``, ``KiteDecoder.feed`` (small buffers, so the
not-enough-room path and growth both run) and the statistics against
``ingestor.twin.frames``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestor import KiteDecoder, decode_kite
from ingestor.twin.frames import (TwinStats, decode_message, decode_packet, encode_full,
                                  encode_index_full, encode_index_quote, encode_ltp,
                                  encode_message, encode_packet, encode_quote)
from kite_compare import assert_twin_equal, decoder_rows, records

U32_EDGES = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
u32 = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from(U32_EDGES))
u16 = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 1, 0x8000, 0xFFFF]))
i32 = st.integers(-(1 << 31), (1 << 31) - 1)
# Every Kite segment, plus bytes no segment uses (divisor 100, tradable).
segment = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 12]), st.integers(0, 255))
token = st.builds(lambda x, s: ((x << 8) | s) & 0xFFFFFFFF, st.integers(0, (1 << 24) - 1), segment)
levels = st.lists(u32, min_size=5, max_size=5)
orders = st.lists(u16, min_size=5, max_size=5)

ltp_packet = st.builds(encode_ltp, token, u32)
index_quote_packet = st.builds(encode_index_quote, token, u32, u32, u32, u32, u32, i32)
index_full_packet = st.builds(encode_index_full, token, u32, u32, u32, u32, u32, i32, u32)
quote_packet = st.builds(encode_quote, token, *[u32] * 10)
full_packet = st.builds(
    lambda head, bq, bp, bo, aq, ap, ao: encode_full(*head, bid_quantity=bq, bid_price=bp,
                                                     bid_orders=bo, ask_quantity=aq,
                                                     ask_price=ap, ask_orders=ao),
    st.tuples(token, *[u32] * 15), levels, levels, orders, levels, levels, orders)
packet = st.one_of(ltp_packet, index_quote_packet, index_full_packet, quote_packet, full_packet)
message = st.builds(encode_message, st.lists(packet, min_size=0, max_size=12))

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(message, st.integers(0, (1 << 63) - 1), st.integers(0, (1 << 63) - 1))
def test_decode_kite_equals_twin(msg, recv_ns, seq):
    ours = records(decode_kite(msg, recv_ns, seq))
    twin = decode_message(msg, recv_ns, seq)
    assert_twin_equal(ours, twin, skip=())
    # The encoder is the decoder's inverse on valid packets.
    assert encode_message([encode_packet(d) for d in twin]) == msg


@SETTINGS
@given(packet)
def test_packet_round_trip(p):
    d = decode_packet(p)
    assert d["length"] == len(p)
    assert encode_packet(d) == p
    assert d["divisor"] == {3: 10_000_000, 6: 10_000, 12: 10_000}.get(d["segment"], 100)
    assert d["segment"] == d["instrument_token"] & 0xFF


@SETTINGS
@given(st.lists(message, min_size=1, max_size=15), st.integers(1, 24), st.integers(1, 6))
def test_decoder_buffers_equal_twin(msgs, capacity, depth_capacity):
    dec = KiteDecoder(capacity, depth_capacity=depth_capacity)
    stats = TwinStats()
    got, want = [], []
    for seq, msg in enumerate(msgs):
        want.extend(decode_message(msg, 1000 + seq, seq, stats))
        if not dec.feed(msg, 1000 + seq, seq):
            # Not enough room: nothing was taken or counted; drain and retry.
            assert dec.n_ticks or dec.n_depth
            got.extend(decoder_rows(dec))
            dec.clear()
            assert dec.feed(msg, 1000 + seq, seq)
    got.extend(decoder_rows(dec))
    assert_twin_equal(got, want, skip=("depth_row", "change"))
    assert dec.stats() == stats.as_dict()
    assert stats["messages"] == len(msgs)
    assert stats["malformed_messages"] == 0
