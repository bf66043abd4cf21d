"""Seeding the aggregation engine from the database, so a restart continues exactly.

A restarted daemon (or a later capture of the same instruments, replayed)
must go on as if it had never stopped.  Per instrument the engine needs:

* its last ``tick_data.time``, so later ticks get strictly later times;
* its last cumulative volume, from which the next tick's increase is measured;
* the forming candle of every timeframe: the bucket holding the instrument's
  last tick.  Without it the engine would start that bucket empty and the
  next upsert would overwrite the stored candle (which counts the bucket's
  earlier ticks) with a partial one.

All three are computed in SQL over ``tick_data``, with the definition of
the candles (issue "In-place candles", the SQL of
``tests/test_candles_sql.py``): OHLC of ``price`` by time; ``volume`` = sum
of the volume increases, each measured from the instrument's previous tick
that carried a volume (for the bucket's first such tick that previous tick
may lie in an earlier bucket), 0 for the first ever and for ticks without a
volume, the new value itself when the cumulative volume falls; the tick
count; ``pv`` = sum(price_raw x increase), exact (``numeric``, then times
the segment's divisor: an integer); the last OI.

Cost at start.  Per instrument the statement reads, through the primary key
``(instrument_id, time)``: its last tick and last tick carrying a volume
(backwards scans, ``LIMIT 1``), the previous volume before the window (one
more backwards probe, only when needed) and the ticks of one window -- from
the earliest start of the buckets holding its last tick (the longest
timeframe's bucket, for timeframes that divide each other) to its end; then
two point lookups per timeframe (open price, last OI).  Nothing scans the
table: the work is the instruments' last day of ticks (with the default
``1d`` timeframe), whatever the table's size.  One caveat: "last tick
carrying a volume" of an instrument that never carries one (an index, an
LTP-only subscription) scans that instrument's rows backwards to the first;
a partial index ``(instrument_id, time) WHERE volume IS NOT NULL`` would
make it a probe, at an ingest cost.

``load_state`` (ids, last times and volumes, candles) is what ``replay``
and the daemon call at start; ``query_candle_state`` returns the state
without seeding (tests, inspection).  Async twins share the SQL.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from decimal import Decimal

from ingestor.db.instruments import divisor_of

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

#: Each known instrument's last tick time and last cumulative volume (None: no tick
#: carried one).  The plain seeding, without candles.
SQL_LAST_TICKS = """
SELECT i.instrument_token, t.time, v.volume
FROM instruments i
CROSS JOIN LATERAL (SELECT time FROM tick_data
                    WHERE instrument_id = i.id ORDER BY time DESC LIMIT 1) t
LEFT JOIN LATERAL (SELECT volume FROM tick_data
                   WHERE instrument_id = i.id AND volume IS NOT NULL
                   ORDER BY time DESC LIMIT 1) v ON true
"""

# Parameters: strides (text[] of '<n> microseconds', in timeframe order), labels (text[],
# the same order) and origin (a timestamptz: local midnight + origin, so date_bin buckets
# are the engine's).  One row per (instrument with ticks, timeframe), with the stored candle
# of that bucket if any (to tell whether it is already right).  Every bucket here holds the
# instrument's last tick, so its close is that tick's price and its end is the window's end.
SQL_CANDLE_STATE = """
WITH tf AS (
    SELECT (k - 1)::int AS tf_index, stride::interval AS stride, label
    FROM unnest(%(strides)s::text[], %(labels)s::text[]) WITH ORDINALITY AS u(stride, label, k)
), last AS (
    SELECT i.id, i.instrument_token, l.time AS last_time, l.price AS close_price,
           lv.time AS last_volume_time, lv.volume AS last_volume,
           (SELECT min(date_bin(tf.stride, l.time, %(origin)s::timestamptz)) FROM tf) AS w0
    FROM instruments i
    CROSS JOIN LATERAL (SELECT time, price FROM tick_data
                        WHERE instrument_id = i.id ORDER BY time DESC LIMIT 1) l
    LEFT JOIN LATERAL (SELECT time, volume FROM tick_data
                       WHERE instrument_id = i.id AND volume IS NOT NULL
                       ORDER BY time DESC LIMIT 1) lv ON true
), base AS (
    -- the cumulative volume the window's first volume increase is measured from: the last
    -- one before the window (the CASE probes only when the last volume lies in the window)
    SELECT last.*,
           CASE WHEN last_volume_time IS NULL THEN NULL
                WHEN last_volume_time < w0 THEN last_volume
                ELSE (SELECT volume FROM tick_data
                      WHERE instrument_id = last.id AND time < last.w0 AND volume IS NOT NULL
                      ORDER BY time DESC LIMIT 1)
           END AS volume_before
    FROM last
), ticks AS (
    -- the window's ticks and their volume increases: lag() over the ticks that carry a
    -- volume (the partition), starting from volume_before
    SELECT base.id, d.time, d.price,
           CASE WHEN d.volume IS NULL OR d.prev IS NULL THEN 0
                WHEN d.volume >= d.prev THEN d.volume - d.prev
                ELSE d.volume END AS dv,
           d.oi IS NOT NULL AS has_oi
    FROM base
    CROSS JOIN LATERAL (
        SELECT time, price, volume, oi,
               lag(volume, 1, base.volume_before)
                   OVER (PARTITION BY volume IS NULL ORDER BY time) AS prev
        FROM tick_data WHERE instrument_id = base.id AND time >= base.w0) d
), agg AS (
    SELECT t.id, tf.tf_index, tf.label, b.start,
           min(t.time) AS open_time,
           max(t.time) FILTER (WHERE t.has_oi) AS oi_time,
           max(t.price) AS high_price, min(t.price) AS low_price,
           sum(t.dv) AS volume, count(*) AS trade_count, sum(t.price * t.dv) AS pv_price
    FROM ticks t
    JOIN base USING (id)
    CROSS JOIN tf
    CROSS JOIN LATERAL (SELECT date_bin(tf.stride, base.last_time, %(origin)s::timestamptz)
                            AS start) b
    WHERE t.time >= b.start
    GROUP BY t.id, tf.tf_index, tf.label, b.start
)
SELECT base.instrument_token, base.id, base.last_time, base.last_volume, agg.tf_index,
       agg.start, o.price AS open_price, agg.high_price, agg.low_price, base.close_price,
       agg.volume, agg.trade_count, agg.pv_price, oi.oi,
       s.time IS NOT NULL AS has_stored, s.open_price, s.high_price, s.low_price,
       s.close_price, s.volume, s.trade_count, s.vwap, s.open_interest
FROM agg
JOIN base USING (id)
JOIN tick_data o ON o.instrument_id = agg.id AND o.time = agg.open_time
LEFT JOIN tick_data oi ON oi.instrument_id = agg.id AND oi.time = agg.oi_time
LEFT JOIN ohlc_candles s
       ON s.time = agg.start AND s.instrument_id = agg.id AND s.timeframe = agg.label
ORDER BY base.instrument_token, agg.tf_index
"""


def to_us(t: dt.datetime) -> int:
    """A timestamptz as microseconds since the epoch."""
    return (t - _EPOCH) // dt.timedelta(microseconds=1)


def raw_price(value: Decimal, divisor: int, what: str = "price") -> int:
    """``value * divisor`` as an int, exactly; ValueError unless it is integral.

    Prices are stored as exactly raw/divisor, so this gives back the raw
    integer (and ``sum(price * dv) * divisor`` gives the exact pv).  Done on
    the decimal digits: ``Decimal`` arithmetic would round at its context's
    precision (28 digits), and a pv can have more.
    """
    sign, digits, exp = value.as_tuple()
    if not isinstance(exp, int):
        raise ValueError(f"{what} {value} is not a number")
    n = int("".join(map(str, digits)) or "0") * divisor
    if exp >= 0:
        n *= 10 ** exp
    else:
        n, rest = divmod(n, 10 ** -exp)
        if rest:
            raise ValueError(f"{what} {value} is not a multiple of 1/{divisor}")
    return -n if sign else n


@dataclass
class Clock:
    """What the SQL needs of an engine's configuration."""

    timeframes: tuple
    lengths_us: tuple
    utc_offset_us: int
    origin_us: int

    @property
    def params(self) -> dict:
        origin = _EPOCH + dt.timedelta(microseconds=self.origin_us - self.utc_offset_us)
        return {"strides": [f"{n} microseconds" for n in self.lengths_us],
                "labels": list(self.timeframes), "origin": origin}


def _engine_of(target):
    return getattr(target, "engine", target)


def clock_of(target, timeframes=None, utc_offset=None, origin=None) -> Clock:
    """The timeframes and alignment of a pipeline or engine (or given explicitly).

    Values given explicitly must agree with the engine's where it exposes
    them (``ingestor._core.Engine`` and the twin do).
    """
    from ingestor import _core

    eng = _engine_of(target)
    mine = None
    if hasattr(eng, "utc_offset_us"):                       # the core engine
        mine = (tuple(eng.timeframes), eng.utc_offset_us, eng.origin_us)
    elif hasattr(eng, "offset") and hasattr(eng, "timeframes"):   # the twin
        mine = (tuple(eng.timeframes), eng.offset, eng.origin)
    if timeframes is None and utc_offset is None and origin is None:
        if mine is None:
            raise TypeError(f"{type(eng).__name__} does not expose its timeframes and alignment: "
                            f"pass timeframes, utc_offset and origin")
        tfs, off, org = mine
    else:
        # parse and validate exactly as the engine does
        probe = _core.Engine(timeframes if timeframes is not None else mine[0],
                             utc_offset if utc_offset is not None else "+05:30",
                             origin if origin is not None else "00:00",
                             tick_capacity=1, candle_capacity=1, snapshot_capacity=1,
                             instrument_capacity=1)
        tfs, off, org = tuple(probe.timeframes), probe.utc_offset_us, probe.origin_us
        if mine is not None and (tfs, off, org) != mine:
            raise ValueError(f"timeframes/utc_offset/origin {(tfs, off, org)} differ from the "
                             f"engine's {mine}")
    return Clock(tfs, tuple(_core.timeframe_us(t) for t in tfs), off, org)


def vwap_e7(pv: int, volume: int, divisor: int) -> int:
    """The candle's VWAP in units of 1e-7, as the core computes it (``wide.h``).

    ``pv / volume / divisor`` rounded half away from zero to 7 places
    (everything is non-negative, so half up); ``divisor`` divides 10^7.
    """
    q, r = divmod(pv * (10_000_000 // divisor), volume)
    return q + (2 * r >= volume)


def _candle_rows(rows) -> list[dict]:
    out = []
    for (token, iid, last_time, last_volume, tf, start, o, h, lo, c, volume, count, pv_price,
         oi, has_stored, *stored) in rows:
        token = int(token)
        div = divisor_of(token)
        st = {
            "token": token, "instrument_id": int(iid), "timeframe_index": int(tf),
            "start_us": to_us(start),
            "open": raw_price(o, div), "high": raw_price(h, div), "low": raw_price(lo, div),
            "close": raw_price(c, div), "volume": int(volume), "trade_count": int(count),
            "pv": raw_price(pv_price, div, "sum(price * volume increase)"),
            "oi": None if oi is None else int(oi),
            "last_time_us": to_us(last_time),
            "last_cum_volume": None if last_volume is None else int(last_volume),
        }
        st["stored"] = bool(has_stored) and _same_candle(st, div, *stored)
        out.append(st)
    return out


def _same_candle(st: dict, div: int, o, h, lo, c, volume, count, vwap, oi) -> bool:
    # Is the stored row exactly the candle the engine would write for this state?
    want_vwap = vwap_e7(st["pv"], st["volume"], div) if st["volume"] else None
    return ((raw_price(o, div), raw_price(h, div), raw_price(lo, div), raw_price(c, div))
            == (st["open"], st["high"], st["low"], st["close"])
            and (volume, count, oi) == (st["volume"], st["trade_count"], st["oi"])
            and (None if vwap is None else raw_price(vwap, 10_000_000)) == want_vwap)


def query_candle_state(conn, clock: Clock) -> list[dict]:
    """The forming candle state of every instrument with ticks (nothing seeded).

    Returns
    -------
    list of dict
        One per (instrument, timeframe), ordered by token then timeframe:
        ``token``, ``instrument_id``, ``timeframe_index``, ``start_us``,
        ``open``, ``high``, ``low``, ``close`` (raw prices), ``volume``,
        ``trade_count``, ``pv`` (exact int), ``oi`` (None: none in the
        bucket), the instrument's ``last_time_us`` and ``last_cum_volume``
        (None: no tick carried one), and ``stored``: ``ohlc_candles``
        already holds exactly this candle.
    """
    return _candle_rows(conn.execute(SQL_CANDLE_STATE, clock.params).fetchall())


async def aquery_candle_state(conn, clock: Clock) -> list[dict]:
    """Async twin of :func:`query_candle_state` (a :class:`psycopg.AsyncConnection`)."""
    cur = await conn.execute(SQL_CANDLE_STATE, clock.params)
    return _candle_rows(await cur.fetchall())


@dataclass
class Seeded:
    """What ``load_candle_state`` seeded."""

    instruments: int
    candles: int
    seconds: float


def seed_engine(target, state: list[dict]) -> Seeded:
    """Seed a pipeline or engine with ``query_candle_state``'s rows.

    Per instrument: ``set_instrument`` (its id), ``seed`` (last time and
    cumulative volume), then ``seed_candle`` for each timeframe.
    """
    eng = _engine_of(target)
    seen = set()
    for s in state:
        if s["token"] not in seen:
            seen.add(s["token"])
            eng.set_instrument(s["token"], s["instrument_id"])
            eng.seed(s["token"], s["last_time_us"], s["last_cum_volume"])
        eng.seed_candle(s["token"], s["timeframe_index"], s["start_us"], s["open"], s["high"],
                        s["low"], s["close"], s["volume"], s["trade_count"], s["pv"], s["oi"],
                        stored=s.get("stored", False))
    return Seeded(len(seen), len(state), 0.0)


def load_candle_state(conn, pipeline_or_engine, timeframes=None, utc_offset=None,
                      origin=None) -> Seeded:
    """Seed each instrument's last time, last volume and forming candles from ``tick_data``.

    Parameters
    ----------
    conn : psycopg.Connection
        The database (read only; not in a flush transaction).
    pipeline_or_engine : Pipeline or Engine
        A ``Pipeline`` (its ``engine`` is seeded), a core ``Engine`` or the
        twin.
    timeframes, utc_offset, origin : optional
        The candle timeframes and alignment; by default the engine's (given
        values must agree with it).

    Returns
    -------
    Seeded
        Instruments and candles seeded, seconds spent.
    """
    t0 = time.perf_counter()
    clock = clock_of(pipeline_or_engine, timeframes, utc_offset, origin)
    out = seed_engine(pipeline_or_engine, query_candle_state(conn, clock))
    out.seconds = time.perf_counter() - t0
    return out


async def aload_candle_state(conn, pipeline_or_engine, timeframes=None, utc_offset=None,
                             origin=None) -> Seeded:
    """Async twin of :func:`load_candle_state`."""
    t0 = time.perf_counter()
    clock = clock_of(pipeline_or_engine, timeframes, utc_offset, origin)
    out = seed_engine(pipeline_or_engine, await aquery_candle_state(conn, clock))
    out.seconds = time.perf_counter() - t0
    return out


def _set_ids(target, ids: dict) -> None:
    if hasattr(target, "set_ids"):
        target.set_ids(ids)
    else:
        for token, iid in ids.items():
            target.set_instrument(token, iid)


def load_state(conn, pipeline_or_engine, *, candles: bool = True) -> int:
    """Everything a restart needs: every known instrument's id, then the seeding above.

    With ``candles=False`` only the last times and volumes are seeded (the
    forming candles start empty).  Returns the number of instruments seeded
    (those with ticks).
    """
    from ingestor.db.instruments import load_ids

    _set_ids(pipeline_or_engine, load_ids(conn))
    if candles:
        return load_candle_state(conn, pipeline_or_engine).instruments
    eng = _engine_of(pipeline_or_engine)
    n = 0
    for token, last_time, volume in conn.execute(SQL_LAST_TICKS):
        eng.seed(int(token), to_us(last_time), None if volume is None else int(volume))
        n += 1
    return n


async def aload_state(conn, pipeline_or_engine, *, candles: bool = True) -> int:
    """Async twin of :func:`load_state`."""
    from ingestor.db.instruments import aload_ids

    _set_ids(pipeline_or_engine, await aload_ids(conn))
    if candles:
        return (await aload_candle_state(conn, pipeline_or_engine)).instruments
    eng = _engine_of(pipeline_or_engine)
    n = 0
    cur = await conn.execute(SQL_LAST_TICKS)
    for token, last_time, volume in await cur.fetchall():
        eng.seed(int(token), to_us(last_time), None if volume is None else int(volume))
        n += 1
    return n
