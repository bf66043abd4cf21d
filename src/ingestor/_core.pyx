# cython: language_level=3
"""The compiled hot path of ingestor.

One extension built from files included by concern (the asyncpg/uvloop
layout), in pipeline order: ``core/frames.pyx`` decodes Kite binary frames
into numpy buffers (``core/smartstream.pyx``: Angel One SmartStream frames into the
same buffers), ``core/engine.pyx`` turns decoded ticks into tick rows,
candles and order-book snapshots in place, ``core/copy.pyx`` encodes numpy
rows as PostgreSQL binary COPY payloads, ``core/group.pyx`` groups a flush's tick
rows by instrument for the columnstore.
The record layouts are C structs declared in ``_core.pxd``; the numpy dtypes
below are built from those structs' real offsets, so the two cannot drift.
"""

cimport cython
cimport numpy as cnp
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdlib cimport abort, free, malloc, realloc
from libc.string cimport memchr, memcpy, memset
from libc.stdint cimport INT64_MAX, INT64_MIN

import numpy as np

cnp.import_array()

#: True when built with ``INGESTOR_DEBUG=1`` (bounds and invariant checks on).
DEBUG = bool(INGESTOR_DEBUG)

#: Bytes before a capture record's payload: u64 recv_ns, u8 kind, u32 length.
cdef enum:
    CAPTURE_RECORD_HEADER = 13

MODE_NAMES = {MODE_LTP: "ltp", MODE_QUOTE: "quote", MODE_FULL: "full"}

#: Names of ``KiteDecoder.stats()``, in counter order.
COUNTER_NAMES = (
    "messages", "heartbeats", "text_messages", "bytes", "packets",
    "ltp", "quote", "full", "index_quote", "index_full",
    "malformed_messages", "empty_message", "unknown_length", "truncated",
    "trailing_bytes", "bad_records", "bad_time",
)
assert len(COUNTER_NAMES) == C_NCOUNTERS


cdef tick_t _T
cdef levels_t _L
cdef depth_t _D
cdef full_t _F
cdef text_t _X
cdef tickrow_t _R
cdef candle_t _C
cdef snapshot_t _S


cdef Py_ssize_t _off(void *field, void *base):
    return <char *>field - <char *>base


def _tick_fields(Py_ssize_t base):
    return [
        ("recv_ns", "<i8", base + _off(&_T.recv_ns, &_T)),
        ("seq", "<i8", base + _off(&_T.seq, &_T)),
        ("instrument_token", "<u4", base + _off(&_T.instrument_token, &_T)),
        ("last_price", "<u4", base + _off(&_T.last_price, &_T)),
        ("last_traded_quantity", "<u4", base + _off(&_T.last_traded_quantity, &_T)),
        ("average_traded_price", "<u4", base + _off(&_T.average_traded_price, &_T)),
        ("volume_traded", "<u4", base + _off(&_T.volume_traded, &_T)),
        ("total_buy_quantity", "<u4", base + _off(&_T.total_buy_quantity, &_T)),
        ("total_sell_quantity", "<u4", base + _off(&_T.total_sell_quantity, &_T)),
        ("open", "<u4", base + _off(&_T.open, &_T)),
        ("high", "<u4", base + _off(&_T.high, &_T)),
        ("low", "<u4", base + _off(&_T.low, &_T)),
        ("close", "<u4", base + _off(&_T.close, &_T)),
        ("net_change", "<i4", base + _off(&_T.net_change, &_T)),
        ("last_trade_time", "<u4", base + _off(&_T.last_trade_time, &_T)),
        ("oi", "<u4", base + _off(&_T.oi, &_T)),
        ("oi_day_high", "<u4", base + _off(&_T.oi_day_high, &_T)),
        ("oi_day_low", "<u4", base + _off(&_T.oi_day_low, &_T)),
        ("exchange_timestamp", "<u4", base + _off(&_T.exchange_timestamp, &_T)),
        ("divisor", "<u4", base + _off(&_T.divisor, &_T)),
        ("length", "<u2", base + _off(&_T.length, &_T)),
        ("mode", "u1", base + _off(&_T.mode, &_T)),
        ("segment", "u1", base + _off(&_T.segment, &_T)),
        ("depth_row", "<i4", base + _off(&_T.depth_row, &_T)),
        ("exchange_ms", "<u2", base + _off(&_T.exchange_ms, &_T)),
    ]


def _book_fields(Py_ssize_t base):
    return [
        ("bid_quantity", ("<u4", (5,)), base + _off(&_L.bid_quantity, &_L)),
        ("bid_price", ("<u4", (5,)), base + _off(&_L.bid_price, &_L)),
        ("bid_orders", ("<u2", (5,)), base + _off(&_L.bid_orders, &_L)),
        ("ask_quantity", ("<u4", (5,)), base + _off(&_L.ask_quantity, &_L)),
        ("ask_price", ("<u4", (5,)), base + _off(&_L.ask_price, &_L)),
        ("ask_orders", ("<u2", (5,)), base + _off(&_L.ask_orders, &_L)),
    ]


def _dtype(fields, Py_ssize_t itemsize):
    names, formats, offsets = zip(*fields)
    return np.dtype({"names": list(names), "formats": list(formats),
                     "offsets": list(offsets), "itemsize": itemsize})


#: A decoded packet without its book (the pipeline's tick buffer).
TICK_DTYPE = _dtype(_tick_fields(0), sizeof(tick_t))
#: A full packet's book in the pipeline's depth buffer, with its tick row.
DEPTH_DTYPE = _dtype([("tick_row", "<u4", _off(&_D.tick_row, &_D))]
                     + _book_fields(_off(&_D.book, &_D)), sizeof(depth_t))
#: ``decode_kite``'s record: every field of a packet, ``change``, the book.
FULL_DTYPE = _dtype(_tick_fields(_off(&_F.tick, &_F))
                    + [("change", "<f8", _off(&_F.change, &_F))]
                    + _book_fields(_off(&_F.book, &_F)), sizeof(full_t))
#: Where a text message lies in a capture chunk given to ``feed_capture``.
TEXT_DTYPE = _dtype([
    ("seq", "<i8", _off(&_X.seq, &_X)),
    ("recv_ns", "<i8", _off(&_X.recv_ns, &_X)),
    ("offset", "<i8", _off(&_X.offset, &_X)),
    ("length", "<i8", _off(&_X.length, &_X)),
], sizeof(text_t))

#: One ``tick_data`` row (``Engine.tick_rows``); see ``ROW_HAS_*``.
TICKROW_DTYPE = _dtype([
    ("time_us", "<i8", _off(&_R.time_us, &_R)),
    ("exchange_time_us", "<i8", _off(&_R.exchange_time_us, &_R)),
    ("seq", "<i8", _off(&_R.seq, &_R)),
    ("instrument_id", "<i4", _off(&_R.instrument_id, &_R)),
    ("instrument_token", "<u4", _off(&_R.instrument_token, &_R)),
    ("price", "<u4", _off(&_R.price, &_R)),
    ("quantity", "<u4", _off(&_R.quantity, &_R)),
    ("volume", "<u4", _off(&_R.volume, &_R)),
    ("oi", "<u4", _off(&_R.oi, &_R)),
    ("bid_price", "<u4", _off(&_R.bid_price, &_R)),
    ("bid_quantity", "<u4", _off(&_R.bid_quantity, &_R)),
    ("ask_price", "<u4", _off(&_R.ask_price, &_R)),
    ("ask_quantity", "<u4", _off(&_R.ask_quantity, &_R)),
    ("divisor", "<u4", _off(&_R.divisor, &_R)),
    ("flags", "<u2", _off(&_R.flags, &_R)),
    ("segment", "u1", _off(&_R.segment, &_R)),
    ("mode", "u1", _off(&_R.mode, &_R)),
], sizeof(tickrow_t))
#: One ``ohlc_candles`` row (``Engine.candles``); see ``CANDLE_HAS_*``.
CANDLE_DTYPE = _dtype([
    ("time_us", "<i8", _off(&_C.time_us, &_C)),
    ("volume", "<i8", _off(&_C.volume, &_C)),
    ("trade_count", "<i8", _off(&_C.trade_count, &_C)),
    ("vwap_e7", "<i8", _off(&_C.vwap_e7, &_C)),
    ("open_interest", "<i8", _off(&_C.open_interest, &_C)),
    ("instrument_id", "<i4", _off(&_C.instrument_id, &_C)),
    ("instrument_token", "<u4", _off(&_C.instrument_token, &_C)),
    ("open", "<u4", _off(&_C.open, &_C)),
    ("high", "<u4", _off(&_C.high, &_C)),
    ("low", "<u4", _off(&_C.low, &_C)),
    ("close", "<u4", _off(&_C.close, &_C)),
    ("divisor", "<u4", _off(&_C.divisor, &_C)),
    ("timeframe", "u1", _off(&_C.timeframe, &_C)),
    ("flags", "u1", _off(&_C.flags, &_C)),
], sizeof(candle_t))
#: One ``order_book_snapshots`` row (``Engine.snapshots``, ``Engine.books``).
SNAPSHOT_DTYPE = _dtype([
    ("time_us", "<i8", _off(&_S.time_us, &_S)),
    ("instrument_id", "<i4", _off(&_S.instrument_id, &_S)),
    ("instrument_token", "<u4", _off(&_S.instrument_token, &_S)),
    ("divisor", "<u4", _off(&_S.divisor, &_S)),
    ("total_bid_quantity", "<u4", _off(&_S.total_bid_quantity, &_S)),
    ("total_ask_quantity", "<u4", _off(&_S.total_ask_quantity, &_S)),
] + _book_fields(_off(&_S.book, &_S)), sizeof(snapshot_t))


include "core/frames.pyx"
include "core/smartstream.pyx"
include "core/engine.pyx"
include "core/copy.pyx"
include "core/group.pyx"
