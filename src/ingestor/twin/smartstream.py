"""Pure-Python twin of the SmartStream decoder, and a SmartStream frame encoder.

The decoder half is the test oracle of ``ingestor._core.SmartStreamDecoder``: it reads the
same bytes with ``struct``, one field at a time, and gives per message what the core puts in
its buffers -- a tick record (``TICK_DTYPE``'s field names, raw integers) with the 5+5 book
of a SNAP_QUOTE packet, or the 20+20 book of a DEPTH packet -- with the statistics counted
under the same names and by the same rules as ``SmartStreamDecoder.stats()``.
``parse_packet`` gives every field of a packet at its wire width, under the key names of the
official client (``smartapi-python``, ``SmartWebSocketV2._parse_binary_data``).

The encoder half builds packets byte for byte as the broker does (one packet per binary
WebSocket message, little-endian), for golden tests, property tests and the simulator.

Layouts: the SmartAPI docs, "WebSocket Streaming 2.0", and the official clients
(smartapi-python ``smartWebSocketV2.py``, smartapi-java ``ByteUtils``); the table is at the
top of ``core/smartstream.pyx``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import struct
from typing import Iterable, Sequence

from ingestor.twin.frames import MODE_FULL, MODE_LTP, MODE_QUOTE, divisor

__all__ = [
    "COUNTER_NAMES",
    "LENGTHS",
    "MODE_DEPTH",
    "MODE_LTP",
    "MODE_QUOTE",
    "MODE_SNAP_QUOTE",
    "SEGMENTS",
    "Keys",
    "TwinStats",
    "core_records",
    "decode_message",
    "encode_depth",
    "encode_ltp",
    "encode_quote",
    "encode_snap_quote",
    "official_parser",
    "parse_packet",
    "split_records",
    "walk_capture",
]

SS_LTP, SS_QUOTE, SS_SNAP_QUOTE, SS_DEPTH = 1, 2, 3, 4
MODE_SNAP_QUOTE, MODE_DEPTH = SS_SNAP_QUOTE, SS_DEPTH
LENGTHS = {SS_LTP: 51, SS_QUOTE: 123, SS_SNAP_QUOTE: 379, SS_DEPTH: 443}
#: exchange type -> segment code of the Kite table (the low byte of the engine key)
SEGMENTS = {1: 1, 2: 2, 3: 4, 4: 5, 5: 7, 7: 14, 13: 3}
#: the Kite length whose fields a packet carries (what the engine reads by)
_KITE_LENGTH = {SS_LTP: 8, SS_QUOTE: 44, SS_SNAP_QUOTE: 184}
_KITE_MODE = {SS_LTP: MODE_LTP, SS_QUOTE: MODE_QUOTE, SS_SNAP_QUOTE: MODE_FULL}

#: ``SmartStreamDecoder.stats()`` names, in the core's counter order.
COUNTER_NAMES = (
    "messages", "text_messages", "bytes", "packets",
    "ltp", "quote", "snap_quote", "depth",
    "malformed_messages", "empty_message", "unknown_mode", "short", "trailing_bytes",
    "unknown_exchange", "bad_token", "out_of_range", "refused_token", "bad_field",
    "bad_records", "bad_time",
)

U32_MAX = 0xFFFFFFFF
_HEAD = struct.Struct("<BB25sqqq")          # mode, exchange type, token, seq, exch ts, ltp
_QUOTE = struct.Struct("<qqqddqqqq")        # ltq, atp, volume, tbq, tsq, O, H, L, C
_SNAP = struct.Struct("<qqd")               # ltt, oi, oi change %
_LEVEL5 = struct.Struct("<hqqH")            # flag, quantity, price, orders
_TAIL = struct.Struct("<qqqq")              # upper, lower circuit, 52-week high, low
_LEVEL20 = struct.Struct("<iiH")            # quantity, price, orders
_DEPTH_HEAD = struct.Struct("<BB25sqq")     # mode, exchange type, token, word27, word35
_CAPTURE_RECORD = struct.Struct("<QBI")

_BOOK5 = ("bid_quantity", "bid_price", "bid_orders", "ask_quantity", "ask_price", "ask_orders")


class TwinStats:
    """Decoder statistics counted as ``SmartStreamDecoder`` counts them."""

    def __init__(self):
        self.c = dict.fromkeys(COUNTER_NAMES, 0)

    def as_dict(self) -> dict:
        return dict(self.c)


class Keys:
    """The (exchange type, token) -> engine key table of a decoder without a resolver: tokens
    numbered in the order met, ``(n << 8) | segment``."""

    def __init__(self, resolver=None):
        self.table: dict[tuple[int, str], int] = {}
        self.resolver = resolver
        self._next = 1

    def key(self, etype: int, token: str) -> int:
        k = (etype, token)
        if k not in self.table:
            if self.resolver is not None:
                self.table[k] = self.resolver(etype, token) or 0
            else:
                self.table[k] = (self._next << 8) | SEGMENTS[etype]
                self._next += 1
        return self.table[k]


def token_of(raw: bytes) -> str | None:
    """The token of a packet's 25 token bytes: the characters before the first NUL, printable
    ASCII, at least one; else None."""
    text = raw.split(b"\0", 1)[0]
    if not text or any(c < 0x21 or c > 0x7E for c in text):
        return None
    return text.decode("ascii")


def parse_packet(frame: bytes) -> dict:
    """Every field of a well-formed packet at its wire width, under the official client's
    key names (prices raw, in paise)."""
    mode, etype, tok, seqno, ts, ltp = _HEAD.unpack_from(frame)
    d = {"subscription_mode": mode, "exchange_type": etype, "token": token_of(tok)}
    if mode == SS_DEPTH:
        _, _, _, w27, w35 = _DEPTH_HEAD.unpack_from(frame)
        d["word27"], d["word35"] = w27, w35
        for side, base in (("depth_20_buy_data", 43), ("depth_20_sell_data", 243)):
            d[side] = [dict(zip(("quantity", "price", "no_of_orders"),
                                _LEVEL20.unpack_from(frame, base + 10 * i))) for i in range(20)]
        return d
    d.update(sequence_number=seqno, exchange_timestamp=ts, last_traded_price=ltp)
    if mode >= SS_QUOTE:
        d.update(zip(("last_traded_quantity", "average_traded_price", "volume_trade_for_the_day",
                      "total_buy_quantity", "total_sell_quantity", "open_price_of_the_day",
                      "high_price_of_the_day", "low_price_of_the_day", "closed_price"),
                     _QUOTE.unpack_from(frame, 51)))
    if mode == SS_SNAP_QUOTE:
        d.update(zip(("last_traded_timestamp", "open_interest",
                      "open_interest_change_percentage"), _SNAP.unpack_from(frame, 123)))
        for side, base in (("best_5_buy_data", 147), ("best_5_sell_data", 247)):
            d[side] = [dict(zip(("flag", "quantity", "price", "no_of_orders"),
                                _LEVEL5.unpack_from(frame, base + 20 * i))) for i in range(5)]
        d.update(zip(("upper_circuit_limit", "lower_circuit_limit", "52_week_high_price",
                      "52_week_low_price"), _TAIL.unpack_from(frame, 347)))
    return d


def _u32(v: int) -> bool:
    return 0 <= v <= U32_MAX


def _reject(stats: TwinStats | None, n: int, reason: str) -> list:
    if stats is not None:
        for k in ("messages", "malformed_messages", reason):
            stats.c[k] += 1
        stats.c["bytes"] += n
    return []


def decode_message(msg: bytes | bytearray | memoryview, recv_ns: int = 0, seq: int = 0,
                   stats: TwinStats | None = None, keys: Keys | None = None) -> list[dict]:
    """What ``SmartStreamDecoder.feed`` appends for one binary message: ``[]`` (set aside) or
    one record, ``{"kind": "tick", **tick fields, "book": {...} or None}`` or
    ``{"kind": "depth20", ...}``."""
    msg = bytes(msg)
    keys = keys if keys is not None else Keys()
    n = len(msg)
    if n == 0:
        return _reject(stats, n, "empty_message")
    mode = msg[0]
    if mode not in LENGTHS:
        return _reject(stats, n, "unknown_mode")
    if n < LENGTHS[mode]:
        return _reject(stats, n, "short")
    etype = msg[1]
    if etype not in SEGMENTS:
        return _reject(stats, n, "unknown_exchange")
    tok = token_of(msg[2:27])
    if tok is None:
        return _reject(stats, n, "bad_token")
    key = keys.key(etype, tok)
    if not key:
        return _reject(stats, n, "refused_token")
    seg = SEGMENTS[etype]
    p = parse_packet(msg)
    bad = 0
    if mode == SS_DEPTH:
        rec = {"kind": "depth20", "recv_ns": recv_ns, "seq": seq, "word27": p["word27"],
               "word35": p["word35"], "instrument_token": key, "divisor": divisor(seg),
               "segment": seg, "exchange_type": etype}
        for side, pre in (("depth_20_buy_data", "bid"), ("depth_20_sell_data", "ask")):
            lv = p[side]
            if any(x["quantity"] < 0 or x["price"] < 0 for x in lv):
                return _reject(stats, n, "out_of_range")
            rec[f"{pre}_quantity"] = [x["quantity"] for x in lv]
            rec[f"{pre}_price"] = [x["price"] for x in lv]
            rec[f"{pre}_orders"] = [x["no_of_orders"] for x in lv]
        counter = "depth"
    else:
        t = dict.fromkeys(("last_price", "last_traded_quantity", "average_traded_price",
                           "volume_traded", "total_buy_quantity", "total_sell_quantity", "open",
                           "high", "low", "close", "net_change", "last_trade_time", "oi",
                           "oi_day_high", "oi_day_low", "exchange_timestamp", "exchange_ms"),
                          0)
        ms = p["exchange_timestamp"]
        if ms > 0 and ms // 1000 <= U32_MAX:
            t["exchange_timestamp"] = ms // 1000
            t["exchange_ms"] = ms % 1000
        elif ms != 0:
            bad += 1
        stored = [p["last_traded_price"]]
        t["last_price"] = p["last_traded_price"]
        if mode >= SS_QUOTE:
            for ours, theirs in (("last_traded_quantity", "last_traded_quantity"),
                                 ("average_traded_price", "average_traded_price"),
                                 ("volume_traded", "volume_trade_for_the_day"),
                                 ("open", "open_price_of_the_day"),
                                 ("high", "high_price_of_the_day"),
                                 ("low", "low_price_of_the_day"), ("close", "closed_price")):
                t[ours] = p[theirs]
                stored.append(p[theirs])
            for ours in ("total_buy_quantity", "total_sell_quantity"):
                f = p[ours]
                if math.isfinite(f) and 0 <= f <= U32_MAX:
                    t[ours] = int(f)
                else:
                    bad += 1
        book = None
        if mode == SS_SNAP_QUOTE:
            t["oi"] = p["open_interest"]
            stored.append(p["open_interest"])
            if _u32(p["last_traded_timestamp"]):
                t["last_trade_time"] = p["last_traded_timestamp"]
            else:
                bad += 1
            book = {}
            for side, pre in (("best_5_buy_data", "bid"), ("best_5_sell_data", "ask")):
                lv = p[side]
                book[f"{pre}_quantity"] = [x["quantity"] for x in lv]
                book[f"{pre}_price"] = [x["price"] for x in lv]
                book[f"{pre}_orders"] = [x["no_of_orders"] for x in lv]
                stored += book[f"{pre}_quantity"] + book[f"{pre}_price"]
        if not all(_u32(v) for v in stored):
            return _reject(stats, n, "out_of_range")
        rec = {"kind": "tick", "recv_ns": recv_ns, "seq": seq, "instrument_token": key, **t,
               "divisor": divisor(seg), "length": _KITE_LENGTH[mode], "mode": _KITE_MODE[mode],
               "segment": seg, "book": book}
        counter = {SS_LTP: "ltp", SS_QUOTE: "quote", SS_SNAP_QUOTE: "snap_quote"}[mode]
    if stats is not None:
        c = stats.c
        c["messages"] += 1
        c["bytes"] += n
        c["packets"] += 1
        c[counter] += 1
        c["bad_field"] += bad
        if n > LENGTHS[mode]:
            c["trailing_bytes"] += 1
            c["malformed_messages"] += 1
    return [rec]


def walk_capture(chunk: bytes | bytearray | memoryview, pos: int = 0, seq: int = 0,
                 stats: TwinStats | None = None, keys: Keys | None = None,
                 min_recv_ns: int = -(1 << 63), max_recv_ns: int = (1 << 63) - 1):
    """Decode every whole capture record of ``chunk[pos:]`` as ``feed_capture`` does.

    Returns ``(records, texts, pos, seq)``: the records in order, the text records'
    ``(seq, recv_ns, offset, length)``, where the walk stopped and the next sequence number.
    """
    chunk = bytes(chunk)
    keys = keys if keys is not None else Keys()
    out, texts = [], []
    n = len(chunk)
    while n - pos >= _CAPTURE_RECORD.size:
        recv_ns, kind, plen = _CAPTURE_RECORD.unpack_from(chunk, pos)
        if plen > n - pos - _CAPTURE_RECORD.size:
            break
        body = pos + _CAPTURE_RECORD.size
        if kind == 1 and not min_recv_ns <= recv_ns <= max_recv_ns:
            if stats is not None:
                stats.c["bad_time"] += 1
        elif kind == 1:
            out += decode_message(chunk[body:body + plen], recv_ns, seq, stats, keys)
        elif kind == 2:
            texts.append((seq, recv_ns, body, plen))
            if stats is not None:
                stats.c["text_messages"] += 1
        elif stats is not None:
            stats.c["bad_records"] += 1
        pos = body + plen
        seq += 1
    return out, texts, pos, seq


# --------------------------------------------------------------------------------------------
# encoding


def _token(token: str | bytes) -> bytes:
    raw = token.encode("ascii") if isinstance(token, str) else bytes(token)
    if len(raw) > 25:
        raise ValueError(f"token {raw!r} longer than 25 bytes")
    return raw


def _five(values: Sequence[int] | None) -> list[int]:
    v = list(values or [])
    return v + [0] * (5 - len(v))


def encode_ltp(exchange_type: int, token: str | bytes, last_traded_price: int,
               sequence_number: int = 0, exchange_timestamp: int = 0,
               mode: int = SS_LTP) -> bytes:
    """An LTP packet (51 bytes); the first 51 bytes of every other mode."""
    return _HEAD.pack(mode, exchange_type, _token(token), sequence_number, exchange_timestamp,
                      last_traded_price)


def encode_quote(exchange_type: int, token: str | bytes, last_traded_price: int,
                 sequence_number: int = 0, exchange_timestamp: int = 0,
                 last_traded_quantity: int = 0, average_traded_price: int = 0,
                 volume: int = 0, total_buy_quantity: float = 0.0,
                 total_sell_quantity: float = 0.0, open: int = 0, high: int = 0, low: int = 0,
                 close: int = 0, mode: int = SS_QUOTE) -> bytes:
    """A QUOTE packet (123 bytes); the first 123 bytes of a SNAP_QUOTE packet."""
    return encode_ltp(exchange_type, token, last_traded_price, sequence_number,
                      exchange_timestamp, mode) + _QUOTE.pack(
        last_traded_quantity, average_traded_price, volume, total_buy_quantity,
        total_sell_quantity, open, high, low, close)


def encode_snap_quote(exchange_type: int, token: str | bytes, last_traded_price: int,
                      sequence_number: int = 0, exchange_timestamp: int = 0,
                      last_traded_quantity: int = 0, average_traded_price: int = 0,
                      volume: int = 0, total_buy_quantity: float = 0.0,
                      total_sell_quantity: float = 0.0, open: int = 0, high: int = 0,
                      low: int = 0, close: int = 0, last_traded_timestamp: int = 0,
                      open_interest: int = 0, oi_change: float = 0.0,
                      bid_quantity=None, bid_price=None, bid_orders=None,
                      ask_quantity=None, ask_price=None, ask_orders=None,
                      upper_circuit: int = 0, lower_circuit: int = 0, week52_high: int = 0,
                      week52_low: int = 0) -> bytes:
    """A SNAP_QUOTE packet (379 bytes): five buy levels (flag 1), then five sell (flag 0)."""
    out = [encode_quote(exchange_type, token, last_traded_price, sequence_number,
                        exchange_timestamp, last_traded_quantity, average_traded_price, volume,
                        total_buy_quantity, total_sell_quantity, open, high, low, close,
                        mode=SS_SNAP_QUOTE),
           _SNAP.pack(last_traded_timestamp, open_interest, oi_change)]
    for flag, q, p, o in ((1, bid_quantity, bid_price, bid_orders),
                          (0, ask_quantity, ask_price, ask_orders)):
        out += [_LEVEL5.pack(flag, a, b, c) for a, b, c in zip(_five(q), _five(p), _five(o))]
    out.append(_TAIL.pack(upper_circuit, lower_circuit, week52_high, week52_low))
    return b"".join(out)


def encode_depth(exchange_type: int, token: str | bytes, word27: int = 0, word35: int = 0,
                 bids: Iterable[tuple[int, int, int]] = (),
                 asks: Iterable[tuple[int, int, int]] = ()) -> bytes:
    """A DEPTH packet (443 bytes): up to 20 ``(quantity, price, orders)`` levels a side."""
    out = [_DEPTH_HEAD.pack(SS_DEPTH, exchange_type, _token(token), word27, word35)]
    for side in (list(bids), list(asks)):
        if len(side) > 20:
            raise ValueError("at most 20 levels a side")
        side += [(0, 0, 0)] * (20 - len(side))
        out += [_LEVEL20.pack(*lv) for lv in side]
    return b"".join(out)


# --------------------------------------------------------------------------------------------
# comparing with the core


_TICK_KEYS = ("recv_ns", "seq", "instrument_token", "last_price", "last_traded_quantity",
              "average_traded_price", "volume_traded", "total_buy_quantity",
              "total_sell_quantity", "open", "high", "low", "close", "net_change",
              "last_trade_time", "oi", "oi_day_high", "oi_day_low", "exchange_timestamp",
              "exchange_ms", "divisor", "length", "mode", "segment")
_DEPTH20_KEYS = ("recv_ns", "seq", "word27", "word35", "instrument_token", "divisor",
                 "segment", "exchange_type", "bid_quantity", "bid_price", "bid_orders",
                 "ask_quantity", "ask_price", "ask_orders")


def core_records(dec) -> tuple[list[dict], list[dict]]:
    """A ``SmartStreamDecoder``'s buffers as twin-shaped records: ``(ticks, depth20)``, the
    ticks with their book (followed through ``depth_row``, checked linked both ways)."""
    ticks, books = [], dec.depth[:dec.n_depth]
    for i, row in enumerate(dec.ticks[:dec.n_ticks]):
        r = {"kind": "tick", **{k: int(row[k]) for k in _TICK_KEYS}, "book": None}
        if row["depth_row"] >= 0:
            b = books[int(row["depth_row"])]
            assert int(b["tick_row"]) == i, "depth row not linked back to its tick"
            r["book"] = {k: [int(x) for x in b[k]] for k in _BOOK5}
        ticks.append(r)
    depth20 = []
    for row in dec.depth20[:dec.n_depth20]:
        depth20.append({"kind": "depth20", **{
            k: [int(x) for x in row[k]] if row[k].shape else int(row[k]) for k in _DEPTH20_KEYS}})
    return ticks, depth20


def split_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Twin records as ``core_records`` gives them: ``(ticks, depth20)``."""
    return ([r for r in records if r["kind"] == "tick"],
            [r for r in records if r["kind"] == "depth20"])


def official_parser():
    """The official client's parser (``smartapi-python``, ``SmartWebSocketV2``: call its
    ``_parse_binary_data(frame)``), or None when the package is not installed (it is in the
    ``test`` extra).

    Importing the ``SmartApi`` package runs a network call with no timeout (in a class body
    of ``smartConnect``), so only its WebSocket module is loaded, from its file, under a
    private name; the instance is made without ``__init__`` (which sets up log files).
    """
    spec = importlib.util.find_spec("SmartApi")   # found, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "smartWebSocketV2.py")
    mod_spec = importlib.util.spec_from_file_location("_smartapi_ws_v2", path)
    if mod_spec is None or mod_spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.SmartWebSocketV2.__new__(mod.SmartWebSocketV2)
