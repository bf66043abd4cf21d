"""How the core's row buffers map to the tables: the binary COPY column specs.

One place names, for ``tick_data``, ``ohlc_candles`` and
``order_book_snapshots``, which field of the engine's records (``TICKROW``,
``CANDLE``, ``SNAPSHOT`` dtypes) becomes which column and when a column is
NULL.  The writer and the benchmarks build their encoders from here.
"""

from __future__ import annotations

import numpy as np

from ingestor import _core
from ingestor._core import CopyEncoder
from ingestor.store.instruments import EXCHANGES

_ROW = _core.TICKROW_DTYPE
_CANDLE = _core.CANDLE_DTYPE
_SNAP = _core.SNAPSHOT_DTYPE

_PRICE = {"divisor_field": "divisor"}


def _unless(flag: int) -> dict:
    return {"null_unless_flag": ("flags", flag)}


TICK_COLUMNS = [
    ("time", "timestamptz_us", {"field": "time_us"}),
    ("instrument_id", "int4"),
    ("exchange", "text_lookup", {"field": "segment", "table": EXCHANGES, "default": "SEG{}"}),
    ("price", "numeric", _PRICE),
    ("quantity", "int8", _unless(_core.ROW_HAS_QUANTITY)),
    ("volume", "int8", _unless(_core.ROW_HAS_VOLUME)),
    ("oi", "int8", _unless(_core.ROW_HAS_OI)),
    ("bid_price", "numeric", {**_PRICE, **_unless(_core.ROW_HAS_BOOK)}),
    ("bid_quantity", "int8", _unless(_core.ROW_HAS_BOOK)),
    ("ask_price", "numeric", {**_PRICE, **_unless(_core.ROW_HAS_BOOK)}),
    ("ask_quantity", "int8", _unless(_core.ROW_HAS_BOOK)),
    ("exchange_time", "timestamptz_us", {"field": "exchange_time_us",
                                         **_unless(_core.ROW_HAS_EXCHANGE_TIME)}),
]


#: The columnstore's order of ``tick_data`` within an instrument (TimescaleDB ``orderby``,
#: ``ingestor.store.timescale``), and the order the pipeline emits each instrument's rows in
#: (``_core.group_ticks``): direct-to-columnstore COPY with client-sorted batches takes the
#: rows as they come, so the two must agree, or reads that push a sort down return wrong rows.
TICK_ORDERBY = "time DESC"
TICK_ORDER_DESC = TICK_ORDERBY.endswith("DESC")


def candle_columns(timeframes) -> list:
    return [
        ("time", "timestamptz_us", {"field": "time_us"}),
        ("instrument_id", "int4"),
        ("timeframe", "text_lookup", {"table": dict(enumerate(timeframes))}),
        ("open_price", "numeric", {"field": "open", **_PRICE}),
        ("high_price", "numeric", {"field": "high", **_PRICE}),
        ("low_price", "numeric", {"field": "low", **_PRICE}),
        ("close_price", "numeric", {"field": "close", **_PRICE}),
        ("volume", "int8"),
        ("trade_count", "int8"),
        ("vwap", "numeric", {"field": "vwap_e7", "scale": 7, **_unless(_core.CANDLE_HAS_VWAP)}),
        ("open_interest", "int8", _unless(_core.CANDLE_HAS_OI)),
    ]


#: a book's columns, 5 levels (snapshots) or 20 (depth20): the same arrays
_BOOK_COLUMNS = [
    ("time", "timestamptz_us", {"field": "time_us"}),
    ("instrument_id", "int4"),
    ("bid_prices", "numeric[]", {"field": "bid_price", **_PRICE}),
    ("bid_quantities", "int8[]", {"field": "bid_quantity"}),
    ("bid_orders", "int4[]", {"field": "bid_orders"}),
    ("ask_prices", "numeric[]", {"field": "ask_price", **_PRICE}),
    ("ask_quantities", "int8[]", {"field": "ask_quantity"}),
    ("ask_orders", "int4[]", {"field": "ask_orders"}),
]

SNAPSHOT_COLUMNS = _BOOK_COLUMNS + [
    ("total_bid_quantity", "int8"),
    ("total_ask_quantity", "int8"),
]


#: ``order_book_depth20`` rows (Angel One's DEPTH packets), made by the pipeline from the
#: SmartStream decoder's ``depth20`` buffer (``_core.DEPTH20_DTYPE``)
DEPTH20ROW_DTYPE = np.dtype([
    ("time_us", "<i8"), ("exchange_time_us", "<i8"), ("instrument_id", "<i4"),
    ("divisor", "<u4"),
    ("bid_price", "<u4", (20,)), ("bid_quantity", "<u4", (20,)), ("bid_orders", "<u2", (20,)),
    ("ask_price", "<u4", (20,)), ("ask_quantity", "<u4", (20,)), ("ask_orders", "<u2", (20,)),
])

DEPTH20_COLUMNS = _BOOK_COLUMNS + [
    ("exchange_time", "timestamptz_us", {"field": "exchange_time_us", "null_if_zero": True}),
]


def depth20_encoder() -> CopyEncoder:
    return CopyEncoder(DEPTH20ROW_DTYPE, DEPTH20_COLUMNS)


def tick_encoder() -> CopyEncoder:
    return CopyEncoder(_ROW, TICK_COLUMNS)


def candle_encoder(timeframes) -> CopyEncoder:
    return CopyEncoder(_CANDLE, candle_columns(timeframes))


def snapshot_encoder() -> CopyEncoder:
    return CopyEncoder(_SNAP, SNAPSHOT_COLUMNS)


#: Candle columns updated by the upsert (all but the key).
CANDLE_VALUE_COLUMNS = ("open_price", "high_price", "low_price", "close_price", "volume",
                        "trade_count", "vwap", "open_interest")
