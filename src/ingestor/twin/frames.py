"""Pure-Python twin of the Kite frame decoder, and a Kite frame encoder.

The decoder half is the test oracle of ``ingestor._core`` (``decode_kite``
and ``KiteDecoder``): it reads the same bytes with ``struct``, one field at a
time, and gives per packet a dict keyed exactly like ``FULL_DTYPE``'s field
names (raw wire integers; the depth as lists of five), with decoder
statistics counted under the same names and by the same rules as
``KiteDecoder.stats()``.

The encoder half builds packets and messages byte for byte as the broker
does, for golden tests, property tests and the simulator.

Layouts: Kite Connect v3 WebSocket docs ("Message structure", "Quote packet
structure", "Index packet structure") and the official Python client
(``kiteconnect`` 5.2.2, ``KiteTicker._parse_binary`` / ``_split_packets``).
A binary message is ``uint16 N`` then N times ``uint16 length,
packet[length]``, big-endian; a packet's mode is given by its length alone:
8 LTP, 28 index quote, 32 index full, 44 quote, 184 full.
"""

from __future__ import annotations

import struct
from typing import Iterable, Mapping, Sequence

__all__ = [
    "COUNTER_NAMES",
    "FIELD_NAMES",
    "KNOWN_LENGTHS",
    "MODE_FULL",
    "MODE_LTP",
    "MODE_QUOTE",
    "TwinStats",
    "change",
    "decode_message",
    "decode_packet",
    "divisor",
    "encode_full",
    "encode_index_full",
    "encode_index_quote",
    "encode_ltp",
    "encode_message",
    "encode_packet",
    "encode_quote",
    "walk_capture",
]

MODE_LTP, MODE_QUOTE, MODE_FULL = 1, 2, 3
KNOWN_LENGTHS = (8, 28, 32, 44, 184)

#: The keys of a decoded packet: ``FULL_DTYPE``'s field names, in its order.
FIELD_NAMES = (
    "recv_ns", "seq", "instrument_token", "last_price", "last_traded_quantity",
    "average_traded_price", "volume_traded", "total_buy_quantity",
    "total_sell_quantity", "open", "high", "low", "close", "net_change",
    "last_trade_time", "oi", "oi_day_high", "oi_day_low", "exchange_timestamp",
    "divisor", "length", "mode", "segment", "depth_row", "exchange_ms", "change",
    "bid_quantity", "bid_price", "bid_orders", "ask_quantity", "ask_price",
    "ask_orders",
)

#: ``KiteDecoder.stats()`` names, in the core's counter order.
COUNTER_NAMES = (
    "messages", "heartbeats", "text_messages", "bytes", "packets",
    "ltp", "quote", "full", "index_quote", "index_full",
    "malformed_messages", "empty_message", "unknown_length", "truncated",
    "trailing_bytes", "bad_records", "bad_time",
)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_LTP = struct.Struct(">II")
_INDEX_QUOTE = struct.Struct(">IIIIIIi")            # token, last, H, L, O, C, change
_INDEX_FULL = struct.Struct(">IIIIIIiI")            # ... + exchange_timestamp
_QUOTE = struct.Struct(">IIIIIIIIIII")              # token .. close (O, H, L, C)
_FULL_HEAD = struct.Struct(">IIIIIIIIIIIIIIII")     # quote + ltt, oi, oi_h, oi_l, ts
_LEVEL = struct.Struct(">IIHH")                     # quantity, price, orders, padding
_CAPTURE_RECORD = struct.Struct("<QBI")             # recv_ns, kind, payload length


def divisor(segment: int) -> int:
    """Price divisor of a segment (``instrument_token & 0xff``).

    KiteTicker._parse_binary: CDS (3) 1e7; BCD (6) and NCO (12) 1e4; every
    other segment 100.
    """
    if segment == 3:
        return 10_000_000
    if segment in (6, 12):
        return 10_000
    return 100


def change(last_price: int, close: int, div: int) -> float:
    """The official client's ``change``: a percentage, in double precision.

    ``(last - close) * 100 / close`` with both prices already divided, 0 when
    the close is 0 (KiteTicker._parse_binary, quote/full and index packets).
    """
    last = last_price / div
    c = close / div
    if c == 0:
        return 0.0
    return (last - c) * 100 / c


def _blank(recv_ns: int, seq: int) -> dict:
    d = dict.fromkeys(FIELD_NAMES, 0)
    d["recv_ns"] = recv_ns
    d["seq"] = seq
    d["depth_row"] = -1
    d["change"] = 0.0
    for k in ("bid_quantity", "bid_price", "bid_orders", "ask_quantity", "ask_price", "ask_orders"):
        d[k] = [0] * 5
    return d


def decode_packet(packet: bytes, recv_ns: int = 0, seq: int = 0) -> dict:
    """Decode one bare packet of a known length (8, 28, 32, 44 or 184 bytes)."""
    n = len(packet)
    if n not in KNOWN_LENGTHS:
        raise ValueError(f"no Kite packet is {n} bytes long")
    d = _blank(recv_ns, seq)
    token, last = _LTP.unpack_from(packet, 0)
    seg = token & 0xFF
    div = divisor(seg)
    d.update(instrument_token=token, last_price=last, segment=seg, divisor=div, length=n)
    if n == 8:
        d["mode"] = MODE_LTP
        return d
    if n in (28, 32):
        # Index packet: high, low, open, close (not O, H, L, C), then the
        # undocumented "price change" (kept raw, signed), then the timestamp.
        if n == 28:
            _, _, hi, lo, op, cl, net = _INDEX_QUOTE.unpack(packet)
            d["mode"] = MODE_QUOTE
        else:
            _, _, hi, lo, op, cl, net, ts = _INDEX_FULL.unpack(packet)
            d["mode"] = MODE_FULL
            d["exchange_timestamp"] = ts
        d.update(high=hi, low=lo, open=op, close=cl, net_change=net)
    else:
        if n == 44:
            v = _QUOTE.unpack(packet)
            d["mode"] = MODE_QUOTE
        else:
            v = _FULL_HEAD.unpack_from(packet, 0)
            d["mode"] = MODE_FULL
            (d["last_trade_time"], d["oi"], d["oi_day_high"], d["oi_day_low"],
             d["exchange_timestamp"]) = v[11:16]
            # Ten 12-byte entries from byte 64: five bids, then five offers.
            for i in range(10):
                q, p, o, _pad = _LEVEL.unpack_from(packet, 64 + 12 * i)
                side = "bid" if i < 5 else "ask"
                d[side + "_quantity"][i % 5] = q
                d[side + "_price"][i % 5] = p
                d[side + "_orders"][i % 5] = o
        (d["last_traded_quantity"], d["average_traded_price"], d["volume_traded"],
         d["total_buy_quantity"], d["total_sell_quantity"], d["open"], d["high"],
         d["low"], d["close"]) = v[2:11]
    d["change"] = change(d["last_price"], d["close"], div)
    return d


class TwinStats:
    """Decoder statistics counted as ``KiteDecoder`` counts them.

    The rules, per binary message: every message counts in ``messages`` and
    its length in ``bytes``; 1 byte is a heartbeat; 0 bytes is
    ``empty_message`` (too short for its header).  Otherwise each packet of
    a known length counts in ``packets`` and its mode's counter; each of an
    unknown length is skipped and counted in ``unknown_length``; a packet
    count or length running past the end counts once in ``truncated`` (the
    packets before it are kept); bytes after the last packet count once in
    ``trailing_bytes``.  A message with any of those four is one
    ``malformed_messages``.  Capture records add ``text_messages`` and
    ``bad_records`` (unknown record kinds).
    """

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTER_NAMES, 0)

    def __getitem__(self, name: str) -> int:
        return self.counts[name]

    def as_dict(self) -> dict:
        """The counters, keyed like ``KiteDecoder.stats()``."""
        return dict(self.counts)

    def __eq__(self, other) -> bool:
        if isinstance(other, TwinStats):
            return self.counts == other.counts
        if isinstance(other, Mapping):
            return self.counts == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"TwinStats({self.counts!r})"


_MODE_COUNTER = {8: "ltp", 28: "index_quote", 32: "index_full", 44: "quote", 184: "full"}


def decode_message(msg: bytes | bytearray | memoryview, recv_ns: int = 0, seq: int = 0,
                   stats: TwinStats | None = None) -> list[dict]:
    """Decode one Kite binary WebSocket message, packet by packet.

    Parameters
    ----------
    msg : bytes-like
        The message exactly as the broker sent it.
    recv_ns, seq : int
        Stored in every decoded packet (as ``decode_kite`` does).
    stats : TwinStats, optional
        Counters to update with this message.

    Returns
    -------
    list of dict
        One dict per packet of a known length, keyed like ``FULL_DTYPE``:
        raw wire integers, the client's ``change`` (0.0 for LTP packets),
        ``depth_row`` -1, the book as six lists of five (zeros where the
        packet has none).  Damage keeps the packets before it.
    """
    msg = bytes(msg)
    n = len(msg)
    st = stats.counts if stats is not None else dict.fromkeys(COUNTER_NAMES, 0)
    st["messages"] += 1
    st["bytes"] += n
    if n < 2:
        if n == 1:
            st["heartbeats"] += 1  # the broker's keep-alive, not an error
        else:
            st["empty_message"] += 1
            st["malformed_messages"] += 1
        return []
    (count,) = _U16.unpack_from(msg, 0)
    out: list[dict] = []
    j = 2
    truncated = False
    unknown = 0
    for _ in range(count):
        if j + 2 > n:
            truncated = True
            break
        (plen,) = _U16.unpack_from(msg, j)
        if j + 2 + plen > n:
            truncated = True
            break
        if plen in KNOWN_LENGTHS:
            out.append(decode_packet(msg[j + 2:j + 2 + plen], recv_ns, seq))
            st[_MODE_COUNTER[plen]] += 1
        else:
            unknown += 1  # skipped, as the official client does
        j += 2 + plen
    trailing = not truncated and j < n
    st["packets"] += len(out)
    st["unknown_length"] += unknown
    st["truncated"] += truncated
    st["trailing_bytes"] += trailing
    st["malformed_messages"] += bool(truncated or trailing or unknown)
    return out


def walk_capture(chunk: bytes | bytearray | memoryview, pos: int = 0, seq: int = 0,
                 stats: TwinStats | None = None) -> tuple[list[dict], list[tuple], int, int]:
    """Twin of ``KiteDecoder.feed_capture`` without buffer limits.

    Walks the whole capture records of ``chunk[pos:]`` (the part of a capture
    file after its header): binary records are decoded, text records noted
    as ``(seq, recv_ns, offset, length)``, records of another kind counted
    in ``bad_records``.

    Returns
    -------
    (ticks, texts, pos, seq)
        The decoded packets, the text records' places, where the first
        incomplete record starts (or the end) and its sequence number.
    """
    stats = stats if stats is not None else TwinStats()
    buf = bytes(chunk)
    n = len(buf)
    ticks: list[dict] = []
    texts: list[tuple] = []
    while n - pos >= _CAPTURE_RECORD.size:
        recv_ns, kind, plen = _CAPTURE_RECORD.unpack_from(buf, pos)
        if plen > n - pos - _CAPTURE_RECORD.size:
            break
        start = pos + _CAPTURE_RECORD.size
        if kind == 1:
            ticks.extend(decode_message(buf[start:start + plen], recv_ns, seq, stats))
        elif kind == 2:
            texts.append((seq, recv_ns, start, plen))
            stats.counts["text_messages"] += 1
        else:
            stats.counts["bad_records"] += 1
        pos = start + plen
        seq += 1
    return ticks, texts, pos, seq


# ---------------------------------------------------------------- encoder

def _levels(values: Sequence[int] | None) -> list[int]:
    if values is None:
        return [0] * 5
    v = list(values)
    if len(v) != 5:
        raise ValueError(f"a depth side has 5 levels, not {len(v)}")
    return v


def encode_ltp(instrument_token: int, last_price: int) -> bytes:
    """An 8-byte LTP packet (docs: "LTP packet")."""
    return _LTP.pack(instrument_token, last_price)


def encode_index_quote(instrument_token: int, last_price: int, high: int = 0, low: int = 0,
                       open: int = 0, close: int = 0, net_change: int = 0) -> bytes:
    """A 28-byte index quote packet; OHLC go on the wire as high, low, open, close."""
    return _INDEX_QUOTE.pack(instrument_token, last_price, high, low, open, close, net_change)


def encode_index_full(instrument_token: int, last_price: int, high: int = 0, low: int = 0,
                      open: int = 0, close: int = 0, net_change: int = 0,
                      exchange_timestamp: int = 0) -> bytes:
    """A 32-byte index full packet: the index quote plus the exchange timestamp."""
    return _INDEX_FULL.pack(instrument_token, last_price, high, low, open, close, net_change,
                            exchange_timestamp)


def encode_quote(instrument_token: int, last_price: int, last_traded_quantity: int = 0,
                 average_traded_price: int = 0, volume_traded: int = 0,
                 total_buy_quantity: int = 0, total_sell_quantity: int = 0, open: int = 0,
                 high: int = 0, low: int = 0, close: int = 0) -> bytes:
    """A 44-byte quote packet (OHLC on the wire as open, high, low, close)."""
    return _QUOTE.pack(instrument_token, last_price, last_traded_quantity, average_traded_price,
                       volume_traded, total_buy_quantity, total_sell_quantity, open, high, low,
                       close)


def encode_full(instrument_token: int, last_price: int, last_traded_quantity: int = 0,
                average_traded_price: int = 0, volume_traded: int = 0,
                total_buy_quantity: int = 0, total_sell_quantity: int = 0, open: int = 0,
                high: int = 0, low: int = 0, close: int = 0, last_trade_time: int = 0,
                oi: int = 0, oi_day_high: int = 0, oi_day_low: int = 0,
                exchange_timestamp: int = 0, bid_quantity: Sequence[int] | None = None,
                bid_price: Sequence[int] | None = None, bid_orders: Sequence[int] | None = None,
                ask_quantity: Sequence[int] | None = None,
                ask_price: Sequence[int] | None = None, ask_orders: Sequence[int] | None = None,
                padding: int = 0) -> bytes:
    """A 184-byte full packet: the quote, five more fields, 5+5 depth entries.

    Each depth entry is quantity u32, price u32, orders u16 and two padding
    bytes (``padding``, 0 on the real feed).
    """
    head = _FULL_HEAD.pack(instrument_token, last_price, last_traded_quantity,
                           average_traded_price, volume_traded, total_buy_quantity,
                           total_sell_quantity, open, high, low, close, last_trade_time, oi,
                           oi_day_high, oi_day_low, exchange_timestamp)
    parts = [head]
    for q, p, o in zip(_levels(bid_quantity), _levels(bid_price), _levels(bid_orders)):
        parts.append(_LEVEL.pack(q, p, o, padding))
    for q, p, o in zip(_levels(ask_quantity), _levels(ask_price), _levels(ask_orders)):
        parts.append(_LEVEL.pack(q, p, o, padding))
    return b"".join(parts)


_ENCODE_KEYS = {
    8: ("instrument_token", "last_price"),
    28: ("instrument_token", "last_price", "high", "low", "open", "close", "net_change"),
    32: ("instrument_token", "last_price", "high", "low", "open", "close", "net_change",
         "exchange_timestamp"),
    44: ("instrument_token", "last_price", "last_traded_quantity", "average_traded_price",
         "volume_traded", "total_buy_quantity", "total_sell_quantity", "open", "high", "low",
         "close"),
}
_FULL_KEYS = _ENCODE_KEYS[44] + (
    "last_trade_time", "oi", "oi_day_high", "oi_day_low", "exchange_timestamp",
    "bid_quantity", "bid_price", "bid_orders", "ask_quantity", "ask_price", "ask_orders")
_ENCODERS = {8: encode_ltp, 28: encode_index_quote, 32: encode_index_full, 44: encode_quote,
             184: encode_full}


def encode_packet(fields: Mapping) -> bytes:
    """Encode a decoded packet (a ``decode_packet`` dict or a ``FULL_DTYPE`` record).

    The layout is chosen by ``fields["length"]``; other keys the layout does
    not carry are ignored, so ``encode_packet(decode_packet(p)) == p`` for
    every packet whose depth padding is zero.
    """
    n = int(fields["length"])
    if n not in _ENCODERS:
        raise ValueError(f"no Kite packet is {n} bytes long")
    keys = _FULL_KEYS if n == 184 else _ENCODE_KEYS[n]
    kw = {}
    for k in keys:
        v = fields[k]
        kw[k] = [int(x) for x in v] if k.startswith(("bid_", "ask_")) else int(v)
    return _ENCODERS[n](**kw)


def encode_message(packets: Iterable[bytes]) -> bytes:
    """Frame packets as one binary WebSocket message: u16 count, then u16 length + packet."""
    packets = list(packets)
    if len(packets) > 0xFFFF:
        raise ValueError(f"a message holds at most 65535 packets, not {len(packets)}")
    parts = [_U16.pack(len(packets))]
    for p in packets:
        if len(p) > 0xFFFF:
            raise ValueError(f"a packet is at most 65535 bytes, not {len(p)}")
        parts.append(_U16.pack(len(p)))
        parts.append(bytes(p))
    return b"".join(parts)
