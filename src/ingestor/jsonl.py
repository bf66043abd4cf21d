"""Decoded Kite ticks as JSON objects (``ingestor decode --jsonl``).

One object per tick with the key names, key order and values of the official
Kite Connect Python client's tick dicts (kiteconnect 5.2.2,
``KiteTicker._parse_binary``): keys present exactly when that client sets
them for the packet's length, prices as ``raw / divisor`` doubles, ``change``
as the client computes it (0 when close is 0), timestamps as Unix epoch
seconds where the client gives datetimes, plus ``recv_ns``.

Not the hot path: the conversion is vectorized per column with numpy (whose
float64 division is the same IEEE operation as Python's), then one dict per
tick is built for the output.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ingestor._core import MODE_NAMES

_INDEX_SEGMENT = 9


def _prices(arr: np.ndarray, div: np.ndarray) -> list[float]:
    return (arr / div).tolist()


def tick_dicts(ticks: np.ndarray, depth: np.ndarray | None = None) -> Iterator[dict]:
    """Client-shaped dicts for ``ticks`` (TICK_DTYPE or FULL_DTYPE records).

    ``depth`` is the DEPTH_DTYPE buffer that TICK_DTYPE rows point into
    (``depth_row``); FULL_DTYPE rows carry their book themselves.
    """
    if len(ticks) == 0:
        return
    div = ticks["divisor"].astype(np.float64)
    lp = _prices(ticks["last_price"], div)
    op = _prices(ticks["open"], div)
    hi = _prices(ticks["high"], div)
    lo = _prices(ticks["low"], div)
    cl = _prices(ticks["close"], div)
    atp = _prices(ticks["average_traded_price"], div)
    lengths = ticks["length"].tolist()
    tokens = ticks["instrument_token"].tolist()
    segments = ticks["segment"].tolist()
    recv = ticks["recv_ns"].tolist()
    ltq = ticks["last_traded_quantity"].tolist()
    vol = ticks["volume_traded"].tolist()
    tbq = ticks["total_buy_quantity"].tolist()
    tsq = ticks["total_sell_quantity"].tolist()
    ltt = ticks["last_trade_time"].tolist()
    oi = ticks["oi"].tolist()
    oih = ticks["oi_day_high"].tolist()
    oil = ticks["oi_day_low"].tolist()
    ets = ticks["exchange_timestamp"].tolist()
    inline_book = "bid_price" in ticks.dtype.names
    if inline_book:
        books = ticks
        rows = range(len(ticks))
    else:
        books = depth
        rows = ticks["depth_row"].tolist()
    for i, n in enumerate(lengths):
        d = {
            "tradable": segments[i] != _INDEX_SEGMENT,
            "mode": MODE_NAMES[1 if n == 8 else 2 if n in (28, 44) else 3],
            "instrument_token": tokens[i],
            "last_price": lp[i],
        }
        if n in (28, 32):
            d["ohlc"] = {"high": hi[i], "low": lo[i], "open": op[i], "close": cl[i]}
        elif n in (44, 184):
            d["last_traded_quantity"] = ltq[i]
            d["average_traded_price"] = atp[i]
            d["volume_traded"] = vol[i]
            d["total_buy_quantity"] = tbq[i]
            d["total_sell_quantity"] = tsq[i]
            d["ohlc"] = {"open": op[i], "high": hi[i], "low": lo[i], "close": cl[i]}
        if n != 8:
            c = cl[i]
            d["change"] = (lp[i] - c) * 100 / c if c != 0 else 0
        if n == 32:
            d["exchange_timestamp"] = ets[i]
        elif n == 184:
            d["last_trade_time"] = ltt[i]
            d["oi"] = oi[i]
            d["oi_day_high"] = oih[i]
            d["oi_day_low"] = oil[i]
            d["exchange_timestamp"] = ets[i]
            d["depth"] = _depth(books[rows[i]], float(div[i]))
        d["recv_ns"] = recv[i]
        yield d


def _depth(book, div: float) -> dict:
    def side(q, p, o):
        q = q.tolist()
        p = p.tolist()
        o = o.tolist()
        return [{"quantity": q[k], "price": p[k] / div, "orders": o[k]} for k in range(5)]

    return {
        "buy": side(book["bid_quantity"], book["bid_price"], book["bid_orders"]),
        "sell": side(book["ask_quantity"], book["ask_price"], book["ask_orders"]),
    }


# --------------------------------------------------------------------------------------------
# Angel One SmartStream packets (``ingestor decode --jsonl`` of a capture whose header says
# ``angel``): the dicts of the official client, smartapi-python 1.5.5
# (``SmartWebSocketV2._parse_binary_data``), key for key and value for value, so code written
# against that client reads ours unchanged.  Its values are as it gives them: prices raw in
# paise (it divides nothing), the total buy/sell quantities as doubles, the OI-change field
# read as an int64 (the docs call it a float64 "garbage" field), the best five filed by their
# flag and then swapped (flag 1 lands under ``best_5_buy_data``), the 20-level order counts as
# signed int16, and for DEPTH the word at byte 35 as both ``exchange_timestamp`` and
# ``packet_received_time`` (no sequence number, no price).  Plus ``recv_ns``, as the Kite
# lines have.  Only packets the decoder took are printed (it checks the lengths the client
# does not).

import struct as _struct

_A1_HEAD = _struct.Struct("<BB25sqqq")
_A1_QUOTE = _struct.Struct("<qqqddqqqq")
_A1_SNAP = _struct.Struct("<qqq")
_A1_TAIL = _struct.Struct("<qqqq")
_A1_BEST = _struct.Struct("<HqqH")
_A1_LEVEL = _struct.Struct("<iih")
_A1_MODES = {1: "LTP", 2: "QUOTE", 3: "SNAP_QUOTE", 4: "DEPTH"}
_A1_QUOTE_KEYS = ("last_traded_quantity", "average_traded_price", "volume_trade_for_the_day",
                  "total_buy_quantity", "total_sell_quantity", "open_price_of_the_day",
                  "high_price_of_the_day", "low_price_of_the_day", "closed_price")


def smartstream_dict(frame, recv_ns: int | None = None) -> dict:
    """The official client's dict of one well-formed SmartStream packet (see above)."""
    mode, etype, tok, seq, ts, ltp = _A1_HEAD.unpack_from(frame)
    token = tok.split(b"\0", 1)[0].decode("latin-1")
    d = {"subscription_mode": mode, "exchange_type": etype, "token": token,
         "sequence_number": seq, "exchange_timestamp": ts, "last_traded_price": ltp,
         "subscription_mode_val": _A1_MODES.get(mode)}
    if mode in (2, 3):
        d.update(zip(_A1_QUOTE_KEYS, _A1_QUOTE.unpack_from(frame, 51)))
    if mode == 3:
        d["last_traded_timestamp"], d["open_interest"], \
            d["open_interest_change_percentage"] = _A1_SNAP.unpack_from(frame, 123)
        d.update(zip(("upper_circuit_limit", "lower_circuit_limit", "52_week_high_price",
                      "52_week_low_price"), _A1_TAIL.unpack_from(frame, 347)))
        flag0, flag1 = [], []
        for i in range(10):
            flag, qty, price, orders = _A1_BEST.unpack_from(frame, 147 + 20 * i)
            (flag0 if flag == 0 else flag1).append(
                {"flag": flag, "quantity": qty, "price": price, "no of orders": orders})
        d["best_5_buy_data"], d["best_5_sell_data"] = flag1, flag0
    if mode == 4:
        del d["sequence_number"], d["last_traded_price"], d["subscription_mode_val"]
        d["packet_received_time"] = ts
        for side, base in (("depth_20_buy_data", 43), ("depth_20_sell_data", 243)):
            d[side] = [dict(zip(("quantity", "price", "num_of_orders"),
                                _A1_LEVEL.unpack_from(frame, base + 10 * i)))
                       for i in range(20)]
    if recv_ns is not None:
        d["recv_ns"] = recv_ns
    return d
