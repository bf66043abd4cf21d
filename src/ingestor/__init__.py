"""ingestor: broker market-data WebSocket frames into TimescaleDB, through a Cython core.

The public entry points of the decoding stage:

``decode_kite(message)``
    One Kite binary WebSocket message to a structured numpy array
    (``FULL_DTYPE``), one record per packet.
``KiteDecoder``
    The pipeline's decoder: appends into preallocated, reusable buffers,
    one message at a time or a whole capture chunk at a time.
"""

from ingestor._core import (
    DEBUG,
    DEPTH_DTYPE,
    FULL_DTYPE,
    TEXT_DTYPE,
    TICK_DTYPE,
    KiteDecoder,
    decode_kite,
)

__version__ = "0.1.0"

__all__ = [
    "DEBUG",
    "DEPTH_DTYPE",
    "FULL_DTYPE",
    "TEXT_DTYPE",
    "TICK_DTYPE",
    "KiteDecoder",
    "decode_kite",
    "__version__",
]
