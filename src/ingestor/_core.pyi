"""Type stub of the compiled core (``ingestor._core``)."""

from typing import Any, Callable, Iterable

import numpy as np
import numpy.typing as npt

DEBUG: bool
MODE_NAMES: dict[int, str]
COUNTER_NAMES: tuple[str, ...]
TICK_DTYPE: np.dtype
DEPTH_DTYPE: np.dtype
FULL_DTYPE: np.dtype
TEXT_DTYPE: np.dtype

_Buffer = bytes | bytearray | memoryview

def decode_kite(message: _Buffer, recv_ns: int = 0, seq: int = 0) -> npt.NDArray[Any]: ...
def capture_span(buf: _Buffer, max_payload: int, stop_at_bad: bool = False) -> tuple[int, int]: ...
CAPTURE2_MARKER: bytes
CAPTURE2_STATUS: dict[int, str]
def capture2_unframe(buf: _Buffer, pos: int, max_payload: int, seq: int,
                     out: bytearray | memoryview) -> tuple[int, int, int, int]: ...
def capture2_resync(buf: _Buffer, pos: int, max_payload: int) -> tuple[int, int]: ...
def capture2_frame(records: _Buffer, first_seq: int,
                   out: bytearray | memoryview) -> tuple[int, int]: ...

class KiteDecoder:
    min_recv_ns: int
    max_recv_ns: int
    ticks: npt.NDArray[Any]
    depth: npt.NDArray[Any]
    texts: npt.NDArray[Any]
    n_ticks: int
    n_depth: int
    n_texts: int
    capacity: int
    depth_capacity: int
    def __init__(self, capacity: int = 16384, depth_capacity: int | None = None,
                 text_capacity: int = 256) -> None: ...
    def feed(self, message: _Buffer, recv_ns: int = 0, seq: int = 0) -> bool: ...
    def feed_capture(self, chunk: _Buffer, pos: int = 0, seq: int = 0) -> tuple[int, int, bool]: ...
    def clear(self) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def reset_stats(self) -> None: ...

# -- Angel One SmartStream decoding (core/smartstream.pyx) ------------------

SS_LENGTHS: dict[int, int]
SS_SEGMENTS: dict[int, int]
SS_COUNTER_NAMES: tuple[str, ...]
DEPTH20_DTYPE: np.dtype

class SmartStreamDecoder(KiteDecoder):
    depth20: npt.NDArray[Any]
    n_depth20: int
    depth20_capacity: int
    resolver: Callable[[int, str], int | None] | None
    def add_keys(self, keys: Iterable[tuple[int, str | bytes, int | None]]) -> None: ...
    def token_of(self, key: int) -> tuple[int, str] | None: ...
    def keys(self) -> dict[int, tuple[int, str]]: ...

# -- aggregation engine (core/engine.pyx) ------------------------------------

TICKROW_DTYPE: np.dtype
CANDLE_DTYPE: np.dtype
SNAPSHOT_DTYPE: np.dtype
DEFAULT_TIMEFRAMES: tuple[str, ...]
ROW_HAS_QUANTITY: int
ROW_HAS_VOLUME: int
ROW_HAS_OI: int
ROW_HAS_BOOK: int
ROW_HAS_EXCHANGE_TIME: int
CANDLE_HAS_VWAP: int
CANDLE_HAS_OI: int
CANDLE_REWRITE: int
ACC_DTYPE: np.dtype
RETRACTION_DTYPE: np.dtype
STATE_HAS_VOLUME: int
STATE_SNAP_PENDING: int
STATE_SNAP_STORED: int
STATE_VERSION: int
ACC_FLAG_OPEN: int
ACC_FLAG_EMITTED: int
ACC_FLAG_OI: int

def timeframe_us(label: str) -> int: ...
def state_dtype(ntf: int) -> np.dtype: ...

class Engine:
    timeframes: tuple[str, ...]
    utc_offset_us: int
    origin_us: int
    snapshot_interval_us: int
    tick_rows: npt.NDArray[Any]
    candles: npt.NDArray[Any]
    snapshots: npt.NDArray[Any]
    books: npt.NDArray[Any]
    retractions: npt.NDArray[Any]
    state_dtype: np.dtype
    n_retractions: int
    n_tick_rows: int
    n_candles: int
    n_snapshots: int
    n_instruments: int
    last_seq: int
    capacities: tuple[int, int, int]
    def __init__(self, timeframes: Any = ..., utc_offset: Any = "+05:30", origin: Any = "00:00",
                 snapshot_interval_us: int = 1_000_000, tick_capacity: int = 16384,
                 candle_capacity: int = 65536, snapshot_capacity: int = 16384,
                 instrument_capacity: int = 1024) -> None: ...
    def set_instrument(self, token: int, instrument_id: int) -> None: ...
    def set_instruments(self, tokens: Any, instrument_ids: Any) -> None: ...
    def instrument_id(self, token: int) -> int | None: ...
    def seed(self, token: int, last_time_us: int, last_cum_volume: int | None = None) -> None: ...
    def seed_candle(self, token: int, timeframe_index: int, start_us: int, open: int, high: int,
                    low: int, close: int, volume: int, trade_count: int, pv: int,
                    oi: int | None = None, stored: bool = False) -> None: ...
    def seed_book(self, token: int, book: Any, pending: bool = False,
                  stored: bool = False) -> None: ...
    def touch(self, token: int) -> None: ...
    def last_times(self, tokens: Any) -> npt.NDArray[np.int64]: ...
    def park(self, token: int, parked: bool = True) -> None: ...
    def take_state(self, all: bool = False) -> npt.NDArray[Any]: ...
    def retracted(self) -> npt.NDArray[Any]: ...
    def unknown_tokens(self, source: Any, start: int = 0) -> npt.NDArray[Any]: ...
    def first_unseen(self, source: Any, start: int = 0) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.int64]]: ...
    def forget_seen(self) -> None: ...
    def process(self, source: Any, start: int = 0, n_ticks: int | None = None,
                depth: Any = None, n_depth: int | None = None) -> int: ...
    def advance(self, now_us: int) -> bool: ...
    def flush(self) -> bool: ...
    def open_candles(self) -> npt.NDArray[Any]: ...
    def output(self) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]: ...
    def latest_books(self) -> npt.NDArray[Any]: ...
    def clear(self) -> None: ...
    def stats(self) -> dict[str, int]: ...

# -- binary COPY encoder (core/copy.pyx) -------------------------------------

class CopyEncodeError(ValueError):
    column: str
    row: int
    value: Any

class CopyEncoder:
    dtype: np.dtype
    columns: tuple[Any, ...]
    plans: tuple[Any, ...]
    max_row_size: int
    rows: int
    nbytes: int
    capacity: int
    def __init__(self, dtype: np.dtype, columns: list[Any]) -> None: ...
    def encode(self, array: npt.NDArray[Any], start: int = 0, stop: int | None = None) -> bytes: ...
    def begin(self) -> None: ...
    def encode_rows(self, array: npt.NDArray[Any], start: int = 0, stop: int | None = None) -> int: ...
    def end(self) -> None: ...
    def take(self) -> bytes: ...
    def clear(self, release: bool = False) -> None: ...
    def copy_sql(self, table: str) -> str: ...

def group_ticks(rows: npt.NDArray[Any], out: npt.NDArray[Any], min_rows: int = 1,
                descending: bool = True) -> int: ...
def last_rows(rows: npt.NDArray[Any]) -> npt.NDArray[np.int64]: ...
