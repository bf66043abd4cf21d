"""Closed candles on NATS subjects of their own (``log.publish_candles``, writer role).

After a batch commits, the writer publishes each candle the batch *closed* (its bucket
ended; not the forming candles a shutdown writes out) on::

    <log.candles_prefix>.<timeframe>.<instrument token>     e.g. ingestor-candles.1m.256265

as one JSON object (UTF-8), exact prices as decimal strings::

    {"token": 256265, "timeframe": "1m", "time": "2026-11-27T03:45:00Z",
     "time_us": 1795751100000000, "open": "24512.35", "high": "24519.9",
     "low": "24508.05", "close": "24515.1", "volume": 1350, "trade_count": 27,
     "vwap": "24513.6012345", "open_interest": null, "rewrite": false}

``time`` / ``time_us``: the bucket's start, UTC (ISO 8601 / µs since the Unix epoch), the
``ohlc_candles.time`` of the row.  ``vwap`` and ``open_interest`` are null where the feed
carries none.  ``rewrite``: a version of this candle may have been published before (a
candle reopened after a restart): the latest message for (token, timeframe, time) wins.

Core NATS, published after the commit: at most once.  A subscriber that is away, or a
writer killed between a commit and its publish, misses candles; ``ohlc_candles`` has every
one (a strategy that needs completeness reads the table for the interval it missed).
The subjects are outside the raw log's stream (``log.subject_prefix``): not stored there.
"""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal

import msgspec

from ingestor import _core

log = logging.getLogger(__name__)

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def price_text(raw: int, divisor: int) -> str:
    """The exact decimal of ``raw / divisor`` (the feed's divisors are powers of ten)."""
    if divisor <= 1:
        return str(raw)
    k = len(str(divisor)) - 1
    if divisor == 10 ** k:
        q = Decimal(raw).scaleb(-k)
    else:  # not a power of ten: exact to 12 places, as the stored numeric is
        q = (Decimal(raw) / Decimal(divisor)).quantize(Decimal(1).scaleb(-12))
    return format(q.normalize(), "f")


def candle_messages(closed, timeframes) -> list[tuple[str, bytes]]:
    """``(subject suffix, JSON)`` of each closed candle (``CANDLE_DTYPE`` rows)."""
    out = []
    for c in closed:
        flags = int(c["flags"])
        tf = timeframes[int(c["timeframe"])]
        token = int(c["instrument_token"])
        d = int(c["divisor"])
        t_us = int(c["time_us"])
        body = {
            "token": token, "timeframe": tf,
            "time": (_EPOCH + dt.timedelta(microseconds=t_us)).isoformat().replace("+00:00", "Z"),
            "time_us": t_us,
            "open": price_text(int(c["open"]), d), "high": price_text(int(c["high"]), d),
            "low": price_text(int(c["low"]), d), "close": price_text(int(c["close"]), d),
            "volume": int(c["volume"]), "trade_count": int(c["trade_count"]),
            "vwap": (format(Decimal(int(c["vwap_e7"])).scaleb(-7).normalize(), "f")
                     if flags & _core.CANDLE_HAS_VWAP else None),
            "open_interest": (int(c["open_interest"]) if flags & _core.CANDLE_HAS_OI
                              else None),
            "rewrite": bool(flags & _core.CANDLE_REWRITE),
        }
        out.append((f"{tf}.{token}", msgspec.json.encode(body)))
    return out


class CandlePublisher:
    """Publishes each committed batch's closed candles (``nc``: set once connected)."""

    def __init__(self, prefix: str, timeframes, metrics=None):
        self.prefix = prefix
        self.timeframes = tuple(timeframes)
        self.metrics = metrics
        self.nc = None
        self.published = 0
        self._said = False

    async def committed(self, batch) -> None:
        closed = getattr(batch, "closed", None)
        if closed is None or not len(closed) or self.nc is None:
            return
        try:
            for suffix, data in candle_messages(closed, self.timeframes):
                await self.nc.publish(f"{self.prefix}.{suffix}", data)
                self.published += 1
                if self.metrics is not None:
                    self.metrics.log_candles_published.inc()
        except Exception as exc:  # noqa: BLE001 - at most once: never stops the writer
            if not self._said:
                log.warning("closed candles not published (%s: %s); committed all the same",
                            type(exc).__name__, exc)
                self._said = True
