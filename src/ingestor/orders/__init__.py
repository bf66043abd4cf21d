"""Order postbacks: decoding, transactional persistence, positions and a lifecycle simulator.

``decode_postback(raw)``
    A Kite order postback (WebSocket envelope or bare ``data``) to a validated
    :class:`Postback`; :class:`PostbackError` with the reason otherwise.
``OrderStore().apply(conn, messages)`` / ``apply_sync``
    One transaction per batch: orders, order history, executions, positions; dead letters
    for what does not decode.
``mark_to_market(conn, prices)`` / ``mark_from_ticks(conn)``
    Current prices and unrealized P&L of open positions, one statement per call.
``OrderFlow(instruments, seed).next_messages(n)``
    Simulated order lifecycles as postback messages (``ingestor.sim.orders``).
"""

from ingestor.orders.postback import (
    IST,
    TERMINAL_STATUSES,
    Postback,
    PostbackError,
    decode_message,
    decode_postback,
    encode_postback,
)
from ingestor.orders.store import (
    DEFAULT_STRATEGY,
    ApplyResult,
    OrderStore,
    amark_from_ticks,
    amark_to_market,
    mark_from_ticks,
    mark_to_market,
)

__all__ = [
    "DEFAULT_STRATEGY",
    "IST",
    "TERMINAL_STATUSES",
    "ApplyResult",
    "OrderStore",
    "Postback",
    "PostbackError",
    "amark_from_ticks",
    "amark_to_market",
    "decode_message",
    "decode_postback",
    "encode_postback",
    "mark_from_ticks",
    "mark_to_market",
]
