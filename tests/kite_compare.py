"""Helpers the decoder tests share: records as dicts, and comparisons.

Three readings of the same bytes are compared: the compiled core
(``decode_kite`` records, ``KiteDecoder`` buffers), the pure-Python twin
(``ingestor.twin.frames``) and the official Kite Connect client
(``KiteTicker._parse_binary``, kiteconnect 5.2.2).
"""

from __future__ import annotations

import struct
from datetime import datetime

import numpy as np
from kiteconnect import KiteTicker

from ingestor import FULL_DTYPE
from ingestor.twin.frames import FIELD_NAMES

BOOK = ("bid_quantity", "bid_price", "bid_orders", "ask_quantity", "ask_price", "ask_orders")
MODE_NAMES = {1: "ltp", 2: "quote", 3: "full"}

# The client's parser needs no connection: an instance without __init__ is enough.
_CLIENT = KiteTicker.__new__(KiteTicker)


def client_parse(msg: bytes) -> list[dict]:
    """The official client's ticks for one binary message."""
    return _CLIENT._parse_binary(msg)


def records(arr: np.ndarray) -> list[dict]:
    """``decode_kite`` output as twin-shaped dicts (book fields as lists)."""
    assert arr.dtype == FULL_DTYPE
    out = []
    for row in arr.tolist():
        d = dict(zip(FIELD_NAMES, row))
        for k in BOOK:
            d[k] = [int(x) for x in d[k]]
        out.append(d)
    return out


def decoder_rows(dec) -> list[dict]:
    """The rows buffered in a ``KiteDecoder``, twin-shaped (no ``change``).

    Checks the tick <-> book links on the way: a full packet's tick names
    its book row and the book row names the tick back; other ticks have -1.
    """
    ticks = dec.ticks[:dec.n_ticks]
    depth = dec.depth[:dec.n_depth]
    names = ticks.dtype.names
    out = []
    books_seen = 0
    for i, row in enumerate(ticks.tolist()):
        d = dict(zip(names, row))
        r = d["depth_row"]
        if d["length"] == 184:
            assert 0 <= r < dec.n_depth, (i, r)
            assert int(depth[r]["tick_row"]) == i
            books_seen += 1
            for k in BOOK:
                d[k] = [int(x) for x in depth[r][k]]
        else:
            assert r == -1, (i, r)
            for k in BOOK:
                d[k] = [0] * 5
        out.append(d)
    assert books_seen == dec.n_depth
    return out


def same_double(a: float, b: float) -> bool:
    """Bit-identical doubles (0 and 0.0 alike: the client's ``change`` may be int 0)."""
    return struct.pack("<d", float(a)) == struct.pack("<d", float(b))


def assert_twin_equal(ours: list[dict], twin: list[dict], *, skip=("depth_row",)) -> None:
    """Every field equal (``change`` bit for bit when both have it)."""
    assert len(ours) == len(twin)
    for i, (a, b) in enumerate(zip(ours, twin)):
        for k in FIELD_NAMES:
            if k in skip or k not in a:
                continue
            if k == "change":
                assert same_double(a[k], b[k]), (i, k, a[k], b[k])
            else:
                assert a[k] == b[k], (i, k, a[k], b[k], a, b)


def _client_time(seconds: int):
    # The client's own conversion: a naive local datetime, None on failure.
    try:
        return datetime.fromtimestamp(seconds)
    except Exception:  # noqa: BLE001 - mirrors KiteTicker._parse_binary
        return None


_KEYS = {
    8: {"tradable", "mode", "instrument_token", "last_price"},
    28: {"tradable", "mode", "instrument_token", "last_price", "ohlc", "change"},
}
_KEYS[32] = _KEYS[28] | {"exchange_timestamp"}
_KEYS[44] = _KEYS[28] | {"last_traded_quantity", "average_traded_price", "volume_traded",
                         "total_buy_quantity", "total_sell_quantity"}
_KEYS[184] = _KEYS[44] | {"last_trade_time", "oi", "oi_day_high", "oi_day_low",
                          "exchange_timestamp", "depth"}


def assert_client_equal(ours: dict, tick: dict) -> None:
    """Our decoded packet (a twin-shaped dict) against the client's tick dict.

    Every key the client sets is checked: prices as ``raw / divisor`` floats
    equal the client's floats, ``change`` bit for bit, timestamps converted
    from epoch seconds the client's way.
    """
    n = ours["length"]
    assert set(tick) == _KEYS[n], (n, sorted(tick))
    div = ours["divisor"]
    assert tick["instrument_token"] == ours["instrument_token"]
    assert tick["tradable"] == (ours["segment"] != 9)
    assert tick["mode"] == MODE_NAMES[ours["mode"]]
    assert tick["last_price"] == ours["last_price"] / div
    if n == 8:
        return
    for k in ("open", "high", "low", "close"):
        assert tick["ohlc"][k] == ours[k] / div, k
    assert same_double(tick["change"], ours["change"]), (tick["change"], ours["change"])
    if n in (32, 184):
        assert tick["exchange_timestamp"] == _client_time(ours["exchange_timestamp"])
    if n in (44, 184):
        assert tick["average_traded_price"] == ours["average_traded_price"] / div
        for k in ("last_traded_quantity", "volume_traded", "total_buy_quantity",
                  "total_sell_quantity"):
            assert tick[k] == ours[k], k
    if n == 184:
        assert tick["last_trade_time"] == _client_time(ours["last_trade_time"])
        for k in ("oi", "oi_day_high", "oi_day_low"):
            assert tick[k] == ours[k], k
        for side, pre in (("buy", "bid_"), ("sell", "ask_")):
            levels = tick["depth"][side]
            assert len(levels) == 5
            for i, lv in enumerate(levels):
                assert lv["quantity"] == ours[pre + "quantity"][i]
                assert lv["price"] == ours[pre + "price"][i] / div
                assert lv["orders"] == ours[pre + "orders"][i]
