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
