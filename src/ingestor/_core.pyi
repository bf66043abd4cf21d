"""Type stub of the compiled core (``ingestor._core``)."""

from typing import Any

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
def capture_span(buf: _Buffer, max_payload: int) -> tuple[int, int]: ...

class KiteDecoder:
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
