"""The official Angel One client's parser (``smartapi-python`` 1.5.5,
``SmartWebSocketV2._parse_binary_data``) as the oracle of the SmartStream decoder.

It is loaded without a network call (``ingestor.twin.smartstream.official_parser``).  The
client checks no lengths: it reads well-formed frames, which is what this compares, over a
large random capture of every mode and exchange type.

Its quirks, documented here as the decoder's reading is documented: it reads the OI change
field as an int64 (the docs: a float64 "garbage" field; neither decoder stores it), the
20-level order counts as signed int16 (the core: unsigned, as counts are), and it files the
best-five entries by their flag, then swaps the lists, so that flag 1 lands under
``best_5_buy_data`` (the core: by position, buys at 147, sells at 247; the two agree when the
flags are as the docs say).
"""

from __future__ import annotations

import random

import pytest

from ingestor._core import SmartStreamDecoder
from ingestor.twin.smartstream import (core_records, encode_depth, encode_ltp, encode_quote,
                                       encode_snap_quote, official_parser)


def _client():
    client = official_parser()
    if client is None:
        pytest.skip("smartapi-python is not installed (pip install -e '.[test]')")
    return client


ETYPES = [1, 2, 3, 4, 5, 7, 13]


def _frames(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        et, tok = rng.choice(ETYPES), str(rng.randrange(1, 10**9))
        p = lambda: rng.randrange(0, 1 << 32)  # noqa: E731
        head = (et, tok, p(), rng.randrange(1 << 62), rng.randrange(4_000_000_000_000))  # ms
        mode = rng.randrange(1, 5)
        if mode == 1:
            out.append(encode_ltp(*head))
        elif mode == 2:
            out.append(encode_quote(*head, p(), p(), p(), float(p()), float(p()), p(), p(),
                                    p(), p()))
        elif mode == 3:
            out.append(encode_snap_quote(
                *head, p(), p(), p(), float(p()), float(p()), p(), p(), p(), p(), p(), p(), 0.0,
                [p() for _ in range(5)], [p() for _ in range(5)],
                [rng.randrange(1 << 16) for _ in range(5)], [p() for _ in range(5)],
                [p() for _ in range(5)], [rng.randrange(1 << 15) for _ in range(5)],
                p(), p(), p(), p()))
        else:
            side = lambda: [(rng.randrange(1 << 31), rng.randrange(1 << 31),  # noqa: E731
                             rng.randrange(1 << 15)) for _ in range(rng.randrange(21))]
            out.append(encode_depth(et, tok, rng.randrange(1 << 42), rng.randrange(1 << 42),
                                    side(), side()))
    return out


def test_decoder_agrees_with_the_official_client(rng):
    client = _client()
    frames = _frames(rng, 4000)
    dec = SmartStreamDecoder(1 << 15)      # room for all: depth20 holds capacity // 16
    for f in frames:
        assert dec.feed(f)
    ticks, depth20 = core_records(dec)
    assert len(ticks) + len(depth20) == len(frames)
    it, id20 = iter(ticks), iter(depth20)
    for f in frames:
        c = client._parse_binary_data(f)
        assert c["subscription_mode"] == f[0]
        if f[0] == 4:
            d = next(id20)
            assert dec.token_of(d["instrument_token"]) == (c["exchange_type"], c["token"])
            assert d["word35"] == c["exchange_timestamp"] == c["packet_received_time"]
            for side, pre in (("depth_20_buy_data", "bid"), ("depth_20_sell_data", "ask")):
                assert d[f"{pre}_quantity"] == [x["quantity"] for x in c[side]]
                assert d[f"{pre}_price"] == [x["price"] for x in c[side]]
                assert d[f"{pre}_orders"] == [x["num_of_orders"] for x in c[side]]
            continue
        t = next(it)
        assert dec.token_of(t["instrument_token"]) == (c["exchange_type"], c["token"])
        assert t["last_price"] == c["last_traded_price"]
        assert t["exchange_timestamp"] == c["exchange_timestamp"] // 1000
        if f[0] >= 2:
            assert (t["last_traded_quantity"], t["average_traded_price"], t["volume_traded"]) \
                == (c["last_traded_quantity"], c["average_traded_price"],
                    c["volume_trade_for_the_day"])
            assert (t["total_buy_quantity"], t["total_sell_quantity"]) == \
                (int(c["total_buy_quantity"]), int(c["total_sell_quantity"]))
            assert (t["open"], t["high"], t["low"], t["close"]) == \
                (c["open_price_of_the_day"], c["high_price_of_the_day"],
                 c["low_price_of_the_day"], c["closed_price"])
        if f[0] == 3:
            assert (t["oi"], t["last_trade_time"]) == (c["open_interest"],
                                                       c["last_traded_timestamp"])
            b = t["book"]
            for side, pre in (("best_5_buy_data", "bid"), ("best_5_sell_data", "ask")):
                assert b[f"{pre}_quantity"] == [x["quantity"] for x in c[side]]
                assert b[f"{pre}_price"] == [x["price"] for x in c[side]]
                assert b[f"{pre}_orders"] == [x["no of orders"] for x in c[side]]
    assert dec.stats()["malformed_messages"] == 0
