"""Golden vectors: real Kite frames decoded to the values the spec gives.

Vectors (tests/data/vectors, see its README): the kiteconnectjs complete
messages (``*Mode_binary.packet``) and the kiteconnect-mocks bare packets
(``ticker_*.packet``, base64, wrapped here in a message header) with their
JSON expectations.  Expected raw values are those of broker-frames.md
section 1.9, golden vectors A and B.  The mocks' JSON ``change`` is the
absolute difference (section 1.7), so ``change`` is checked against the
official client's percentage formula instead.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from datetime import datetime, timezone

import pytest

from conftest import VECTORS
from ingestor import KiteDecoder, decode_kite
from ingestor.twin.frames import decode_message, encode_ltp, encode_message, encode_packet
from kite_compare import (assert_client_equal, assert_twin_equal, client_parse, decoder_rows,
                          records, same_double)


def _read(name: str) -> bytes:
    with open(os.path.join(VECTORS, name), "rb") as f:
        return f.read()


def _bare(name: str) -> bytes:
    return base64.b64decode(_read(name))


def _json(name: str) -> dict:
    return json.loads(_read(name))


def _wrap(packet: bytes) -> bytes:
    return encode_message([packet])


def _all_readings(msg: bytes) -> dict:
    """decode_kite's record, checked equal to the twin, the decoder buffers and the client."""
    ours = records(decode_kite(msg, recv_ns=123, seq=7))
    twin = decode_message(msg, recv_ns=123, seq=7)
    assert_twin_equal(ours, twin, skip=())
    dec = KiteDecoder(4)
    assert dec.feed(msg, 123, 7)
    assert_twin_equal(decoder_rows(dec), twin)
    client = client_parse(msg)
    assert len(client) == len(ours) == 1
    assert_client_equal(ours[0], client[0])
    return ours[0]


# broker-frames.md 1.9, golden vector A (K4 ticker_full.packet).
VECTOR_A = dict(
    instrument_token=408065, segment=1, divisor=100, length=184, mode=3,
    last_price=157370, last_traded_quantity=7, average_traded_price=157037,
    volume_traded=1192471, total_buy_quantity=256443, total_sell_quantity=363009,
    open=156915, high=157500, low=156105, close=156780,
    last_trade_time=1625461887, exchange_timestamp=1625461887, oi=0, oi_day_high=0,
    oi_day_low=0,
    bid_quantity=[5, 140, 2, 219, 50], bid_price=[157340, 157300, 157295, 157290, 157285],
    bid_orders=[1, 2, 1, 7, 1],
    ask_quantity=[172, 44, 302, 141, 724], ask_price=[157370, 157375, 157385, 157390, 157395],
    ask_orders=[3, 3, 3, 2, 5],
)

# broker-frames.md 1.9, golden vector B (K3 fullMode_binary.packet).
VECTOR_B = dict(
    instrument_token=884737, segment=1, divisor=100, length=184, mode=3,
    last_price=39295, last_traded_quantity=2, average_traded_price=40307,
    volume_traded=22261032, total_buy_quantity=5617, total_sell_quantity=0,
    open=42000, high=42090, low=39010, close=41410, last_trade_time=1655375264, oi=0,
    exchange_timestamp=1655378328,
    bid_quantity=[5617, 0, 0, 0, 0], bid_price=[39295, 0, 0, 0, 0], bid_orders=[30, 0, 0, 0, 0],
    ask_quantity=[0] * 5, ask_price=[0] * 5, ask_orders=[0] * 5,
)


def _client_change(last: int, close: int, div: int) -> float:
    # KiteTicker._parse_binary, written out: percentage of the divided prices.
    lp, cl = last / div, close / div
    return 0 if cl == 0 else (lp - cl) * 100 / cl


def test_vector_a_full_packet():
    packet = _bare("ticker_full.packet")
    assert len(packet) == 184
    assert packet[64 + 10:64 + 12] == b"\x00\x00"  # depth padding, always 0
    rec = _all_readings(_wrap(packet))
    for k, v in VECTOR_A.items():
        assert rec[k] == v, k
    assert rec["recv_ns"] == 123 and rec["seq"] == 7 and rec["depth_row"] == -1
    assert rec["net_change"] == 0
    assert same_double(rec["change"], _client_change(157370, 156780, 100))
    # 2021-07-05 05:11:27 UTC (10:41:27 IST).
    assert (datetime.fromtimestamp(rec["exchange_timestamp"], timezone.utc)
            == datetime(2021, 7, 5, 5, 11, 27, tzinfo=timezone.utc))
    assert encode_packet(rec) == packet


def test_vector_a_against_mock_json():
    rec = records(decode_kite(_wrap(_bare("ticker_full.packet"))))[0]
    exp = _json("ticker_full.json")
    div = rec["divisor"]
    assert exp["mode"] == "full" and exp["tradable"] is True
    assert rec["instrument_token"] == exp["instrument_token"]
    assert rec["last_price"] / div == exp["last_price"]
    # The mocks' older key names (broker-frames.md 1.7).
    assert rec["last_traded_quantity"] == exp["last_quantity"]
    assert rec["average_traded_price"] / div == exp["average_price"]
    assert rec["volume_traded"] == exp["volume"]
    assert rec["total_buy_quantity"] == exp["buy_quantity"]
    assert rec["total_sell_quantity"] == exp["sell_quantity"]
    for k in ("open", "high", "low", "close"):
        assert rec[k] / div == exp["ohlc"][k]
    for k in ("oi", "oi_day_high", "oi_day_low"):
        assert rec[k] == exp[k]
    assert rec["last_trade_time"] == datetime.fromisoformat(exp["last_trade_time"]).timestamp()
    assert rec["exchange_timestamp"] == datetime.fromisoformat(exp["timestamp"]).timestamp()
    for side, pre in (("buy", "bid_"), ("sell", "ask_")):
        for i, lv in enumerate(exp["depth"][side]):
            assert rec[pre + "quantity"][i] == lv["quantity"]
            assert rec[pre + "price"][i] / div == lv["price"]
            assert rec[pre + "orders"][i] == lv["orders"]
    # The mock's change is last - close (absolute); ours is the client's percentage.
    assert exp["change"] == pytest.approx(rec["last_price"] / div - rec["close"] / div)
    assert same_double(rec["change"], _client_change(rec["last_price"], rec["close"], div))


def test_vector_quote_against_mock_json():
    packet = _bare("ticker_quote.packet")
    assert len(packet) == 44
    rec = _all_readings(_wrap(packet))
    exp = _json("ticker_quote.json")
    div = rec["divisor"]
    assert rec["mode"] == 2 and exp["mode"] == "quote"
    assert rec["instrument_token"] == exp["instrument_token"] == 408065
    assert rec["last_price"] / div == exp["last_price"]
    assert rec["last_traded_quantity"] == exp["last_quantity"]
    assert rec["average_traded_price"] / div == exp["average_price"]
    assert rec["volume_traded"] == exp["volume"]
    assert rec["total_buy_quantity"] == exp["buy_quantity"]
    assert rec["total_sell_quantity"] == exp["sell_quantity"]
    for k in ("open", "high", "low", "close"):
        assert rec[k] / div == exp["ohlc"][k]
    # Quote packets carry no time, OI or book.
    for k in ("last_trade_time", "exchange_timestamp", "oi", "oi_day_high", "oi_day_low"):
        assert rec[k] == 0
    assert rec["bid_price"] == [0] * 5 and rec["ask_quantity"] == [0] * 5
    assert same_double(rec["change"], _client_change(rec["last_price"], rec["close"], div))
    assert encode_packet(rec) == packet


def test_vector_ltp_from_mock_json():
    # The mocks have no LTP packet: build one from the expectation and read it back.
    exp = _json("ticker_ltp.json")
    raw = round(exp["last_price"] * 100)
    msg = _wrap(encode_ltp(exp["instrument_token"], raw))
    assert len(msg) == 12
    rec = _all_readings(msg)
    assert rec["mode"] == 1 and rec["length"] == 8
    assert rec["last_price"] / rec["divisor"] == exp["last_price"]
    assert rec["change"] == 0.0 and rec["close"] == 0


def test_vector_b_full_message():
    msg = _read("fullMode_binary.packet")
    assert len(msg) == 188
    assert struct.unpack_from(">HH", msg) == (1, 0xB8)
    rec = _all_readings(msg)
    for k, v in VECTOR_B.items():
        assert rec[k] == v, k
    assert rec["last_price"] / 100 == 392.95
    assert same_double(rec["change"], _client_change(39295, 41410, 100))
    assert encode_message([encode_packet(rec)]) == msg


def test_kiteconnectjs_quote_and_ltp_messages():
    quote = _read("quoteMode_binary.packet")
    ltp = _read("ltpMode_binary.packet")
    assert (len(quote), len(ltp)) == (48, 12)
    assert struct.unpack_from(">HH", quote) == (1, 44)
    assert struct.unpack_from(">HH", ltp) == (1, 8)
    q = _all_readings(quote)
    lt = _all_readings(ltp)
    # Same instrument and moment as vector B.
    for k in ("instrument_token", "last_price", "last_traded_quantity", "average_traded_price",
              "volume_traded", "total_buy_quantity", "total_sell_quantity", "open", "high",
              "low", "close"):
        assert q[k] == VECTOR_B[k], k
    assert q["mode"] == 2 and q["length"] == 44
    assert lt["instrument_token"] == 884737 and lt["last_price"] == 39295 and lt["mode"] == 1
    assert encode_message([encode_packet(q)]) == quote
    assert encode_message([encode_packet(lt)]) == ltp


def test_all_vectors_in_one_message():
    # The three real packets framed together decode as they do alone.
    packets = [_bare("ticker_full.packet"), _bare("ticker_quote.packet"),
               _read("ltpMode_binary.packet")[4:], _read("fullMode_binary.packet")[4:]]
    msg = encode_message(packets)
    ours = records(decode_kite(msg))
    assert [r["length"] for r in ours] == [184, 44, 8, 184]
    assert_twin_equal(ours, decode_message(msg), skip=())
    for r, c in zip(ours, client_parse(msg)):
        assert_client_equal(r, c)
    dec = KiteDecoder(2, depth_capacity=1)
    assert dec.feed(msg)  # larger than the empty buffers: they grow to fit
    assert dec.n_ticks == 4 and dec.n_depth == 2
    assert dec.stats()["full"] == 2 and dec.stats()["packets"] == 4
