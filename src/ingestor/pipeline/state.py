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

Already stored?  Each computed candle is compared with the ``ohlc_candles``
row of its bucket (open/high/low/close, volume, trade count, the VWAP the
core would round, OI).  Equal: seeded as stored, written again only when a
tick continues it.  Missing or different (a crash before the upsert, a
forming 1s candle that was never upserted, a partial candle from an older
version): seeded as not written, so the engine writes the right one when the
bucket closes or at the next flush.  A second replay of a committed capture
therefore writes nothing.

Cost at start.  Per instrument, through the primary key ``(instrument_id,
time)``: its last tick and last tick carrying a volume (backwards, ``LIMIT
1``), the cumulative volume before the window (one more backwards probe,
only when needed), and one range scan of its window -- from the earliest
start of the buckets holding its last tick (the longest timeframe's, when
timeframes nest) to the end.  Every bucket here ends with the window, so
each tick is aggregated once, into the band between consecutive bucket
starts, and each timeframe combines the bands from its start on.  Then
point lookups by key per timeframe (open price, last OI, the stored candle).
No scan of the table: the work is each instrument's last day of ticks (with
the ``1d`` timeframe), whatever the history.  One caveat: the "last tick
carrying a volume" of an instrument that never carries one (an LTP-only
subscription, an index) is searched backwards through all its rows; a
partial index ``(instrument_id, time) WHERE volume IS NOT NULL`` would make
it a probe, at an ingest cost.

``load_state`` (ids, last times and volumes, candles) is what ``replay``
and the daemon call at start; ``query_candle_state`` returns the state
without seeding (tests, inspection).  Async twins share the SQL.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from decimal import Decimal

from ingestor.store.instruments import divisor_of

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
# the same order) and origin (a timestamptz: local midnight + origin, so date_bin's buckets
# are the engine's).  One row per (instrument with ticks, timeframe), with the stored candle
# of that bucket if any (to tell whether it is already right).
#
# Every bucket here holds the instrument's last tick: they all end with the window, their
# close is that tick's price, and they differ only in where they start.  So each tick of the
# window is aggregated once, into the band between two consecutive bucket starts
# (width_bucket over the sorted starts), and a timeframe's candle combines the bands from
# its start on (a handful of rows): one pass over the ticks, whatever the timeframes.
SQL_CANDLE_STATE = """
WITH last AS (
    -- each instrument's last tick and last tick carrying a volume (backwards by the key),
    -- and the start of each timeframe's bucket holding the last tick
    SELECT i.id, i.instrument_token, l.time AS last_time, l.price AS close_price,
           lv.time AS last_volume_time, lv.volume AS last_volume,
           ARRAY(SELECT date_bin(u.stride::interval, l.time, %(origin)s::timestamptz)
                 FROM unnest(%(strides)s::text[]) WITH ORDINALITY AS u(stride, k)
                 ORDER BY k) AS starts
    FROM instruments i
    CROSS JOIN LATERAL (SELECT time, price FROM tick_data
                        WHERE instrument_id = i.id ORDER BY time DESC LIMIT 1) l
    LEFT JOIN LATERAL (SELECT time, volume FROM tick_data
                       WHERE instrument_id = i.id AND volume IS NOT NULL
                       ORDER BY time DESC LIMIT 1) lv ON true
), base AS (
    -- edges: the distinct bucket starts, sorted (edges[1] is the window's start);
    -- volume_before: the cumulative volume the window's first increase is measured from,
    -- the last one before the window (the CASE probes only when the last volume lies
    -- inside the window)
    SELECT w.*,
           CASE WHEN w.last_volume_time IS NULL THEN NULL
                WHEN w.last_volume_time < w.edges[1] THEN w.last_volume
                ELSE (SELECT volume FROM tick_data
                      WHERE instrument_id = w.id AND time < w.edges[1] AND volume IS NOT NULL
                      ORDER BY time DESC LIMIT 1)
           END AS volume_before
    FROM (SELECT last.*, ARRAY(SELECT DISTINCT s FROM unnest(last.starts) s ORDER BY s) AS edges
          FROM last) w
), bands AS (
    SELECT base.id, b.*
    FROM base
    CROSS JOIN LATERAL (
        SELECT width_bucket(time, base.edges) AS band,
               min(time) AS open_time, max(time) FILTER (WHERE oi IS NOT NULL) AS oi_time,
               max(price) AS high_price, min(price) AS low_price, sum(dv) AS volume,
               count(*) AS trade_count, sum(price * dv) AS pv_price
        FROM (
            -- the window's ticks and their volume increases: lag() over the ticks that
            -- carry a volume (the partition), starting from volume_before
            SELECT time, price, oi,
                   CASE WHEN volume IS NULL OR prev IS NULL THEN 0
                        WHEN volume >= prev THEN volume - prev
                        ELSE volume END AS dv
            FROM (SELECT time, price, volume, oi,
                         lag(volume, 1, base.volume_before)
                             OVER (PARTITION BY volume IS NULL ORDER BY time) AS prev
                  FROM tick_data WHERE instrument_id = base.id AND time >= base.edges[1]) p
        ) t
        GROUP BY 1
    ) b
), agg AS (
    -- a timeframe's candle: the bands from its bucket's start on
    SELECT base.id, k.k - 1 AS tf_index, base.starts[k.k] AS start,
           min(b.open_time) AS open_time, max(b.oi_time) AS oi_time,
           max(b.high_price) AS high_price, min(b.low_price) AS low_price,
           sum(b.volume) AS volume, sum(b.trade_count) AS trade_count, sum(b.pv_price) AS pv_price
    FROM base
    CROSS JOIN generate_series(1, cardinality(base.starts)) AS k(k)
    JOIN bands b ON b.id = base.id AND b.band >= width_bucket(base.starts[k.k], base.edges)
    GROUP BY base.id, k.k, base.starts[k.k]
)
SELECT base.instrument_token, base.id, base.last_time, base.last_volume, agg.tf_index,
       agg.start, o.price, agg.high_price, agg.low_price, base.close_price,
       agg.volume, agg.trade_count, agg.pv_price, oi.oi,
       s.time IS NOT NULL AS has_stored, s.open_price, s.high_price, s.low_price,
       s.close_price, s.volume, s.trade_count, s.vwap, s.open_interest
FROM agg
JOIN base USING (id)
-- point lookups by key (LATERAL ... LIMIT 1 is not flattened into a join, which the planner
-- could hash over the whole table instead)
CROSS JOIN LATERAL (SELECT price FROM tick_data
                    WHERE instrument_id = base.id AND time = agg.open_time LIMIT 1) o
LEFT JOIN LATERAL (SELECT oi FROM tick_data
                   WHERE instrument_id = base.id AND time = agg.oi_time LIMIT 1) oi ON true
LEFT JOIN LATERAL (SELECT * FROM ohlc_candles
                   WHERE time = agg.start AND instrument_id = base.id
                     AND timeframe = (%(labels)s::text[])[agg.tf_index + 1] LIMIT 1) s ON true
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
    #: candles the database lacks or holds wrong: the engine writes them again
    unstored: int
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
    return Seeded(len(seen), len(state), sum(not s.get("stored", False) for s in state), 0.0)


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
    from ingestor.store.instruments import load_ids

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
    from ingestor.store.instruments import aload_ids

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
