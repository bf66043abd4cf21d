"""The engine's continuation state: committed with every batch, read back at start.

A restarted daemon (or a later capture of the same instruments, replayed)
must go on as if it had never stopped.  Per instrument the engine needs its
last ``tick_data.time`` (later ticks get strictly later times), its last
cumulative volume (the next tick's increase is measured from it), every
timeframe's forming candle with its exact 128-bit price x volume sum, and
its latest book with its snapshot state: the open interval's book is not a
snapshot yet (a later book of the interval replaces it), or was written by a
shutdown's ``flush()`` already (then a later book of the interval replaces
that row: ``FlushBatch.retracted``).

The engine hands that out for the instruments each batch changed
(``Engine.take_state``: one fixed-size record per instrument, see
``ingestor._core.state_dtype``); ``encode_state`` makes it a binary COPY of
``engine_state`` and the writer upserts it in the batch's own transaction,
with the rows and the stream offset.  So the state in the database is always
that of the committed offset, instrument by instrument, and resuming there
continues exactly: candles, ticks and order-book snapshots end as after one
uninterrupted run.  Cost per batch: one ~700-byte row per instrument the
batch touched, whatever its ticks (see ``sql/0004_engine_state.sql``).

At start, ``load_state`` reads ``engine_state`` in one query and seeds the
engine (``seed``, ``seed_candle``, ``seed_book``): O(instruments), whatever
the day's ticks.  A candle is seeded as stored when the engine had written
it out unchanged (it is not written again unless a tick continues it); a
candle whose timeframe is no longer configured, or whose bucket no longer
aligns (another ``origin``), is dropped.

The fallback: a database migrated from before ``engine_state`` has rows
there with ``state`` NULL (the migration adds one per instrument with
ticks).  Those instruments are seeded by recomputing their forming candles
from ``tick_data`` in SQL (``SQL_CANDLE_STATE``, below: per instrument one
range scan of the window from the earliest bucket holding its last tick,
through the primary key ``(instrument_id, time)``) and marked so that the
first batch commits their state: each is recomputed once, then read like
the others.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from decimal import Decimal

import numpy as np

from ingestor import _core
from ingestor.store.candle_sql import FAST_SQL
from ingestor.store.instruments import divisor_of

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

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
    -- NULL: every instrument; else these ids (the legacy rows of engine_state)
    WHERE %(ids)s::int[] IS NULL OR i.id = ANY(%(ids)s::int[])
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
-- (the stored candle: one branch per index of sql/0007, each with the constant condition on
-- the timeframe that lets the planner use it -- the key, or the sub-minute ones' BRIN)
LEFT JOIN LATERAL (SELECT * FROM (
        SELECT * FROM ohlc_candles WHERE timeframe NOT IN """ + FAST_SQL + """
           AND time = agg.start AND instrument_id = base.id
           AND timeframe = (%(labels)s::text[])[agg.tf_index + 1]
        UNION ALL
        SELECT * FROM ohlc_candles WHERE timeframe IN """ + FAST_SQL + """
           AND time = agg.start AND instrument_id = base.id
           AND timeframe = (%(labels)s::text[])[agg.tf_index + 1]) c LIMIT 1) s ON true
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


def _params(clock: Clock, ids) -> dict:
    return {**clock.params, "ids": None if ids is None else [int(i) for i in ids]}


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


def query_candle_state(conn, clock: Clock, ids=None) -> list[dict]:
    """The forming candle state computed from ``tick_data`` (nothing seeded).

    Every instrument with ticks, or those of ``ids`` (instrument ids).  The
    fallback for instruments without a committed state (see the module
    docstring).

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
    return _candle_rows(conn.execute(SQL_CANDLE_STATE, _params(clock, ids)).fetchall())


async def aquery_candle_state(conn, clock: Clock, ids=None) -> list[dict]:
    """Async twin of :func:`query_candle_state` (a :class:`psycopg.AsyncConnection`)."""
    cur = await conn.execute(SQL_CANDLE_STATE, _params(clock, ids))
    return _candle_rows(await cur.fetchall())


def seed_engine(target, state: list[dict]) -> int:
    """Seed a pipeline or engine with ``query_candle_state``'s rows; returns instruments seeded.

    Per instrument: ``seed`` (last time and cumulative volume), then
    ``seed_candle`` for each timeframe (ids are set already).
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
    return len(seen)


# -- the committed state ----------------------------------------------------------------------

_PG_EPOCH_US = 946_684_800_000_000          # 2000-01-01 UTC, PostgreSQL's timestamp zero
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
#: ``engine_state``'s columns in the order of ``encode_state``'s rows
STATE_COLUMNS = ("instrument_id", "stream", "last_seq", "last_time", "last_volume", "state")


def encode_state(records, stream: str, last_seq: int) -> bytes:
    """``Engine.take_state`` records as a binary COPY of ``STATE_COLUMNS`` (b"" when none).

    Every field has a fixed size within a batch (the stream is the batch's,
    the record the engine's), so the rows are one numpy array, built without
    a per-row loop.  ``last_volume`` -1 stands for "none" (the upsert makes it
    NULL); ``state`` is the record's bytes.
    """
    n = len(records)
    if not n:
        return b""
    sb = stream.encode()
    size = records.dtype.itemsize
    fields = [("nf", ">i2"), ("l0", ">i4"), ("instrument_id", ">i4"), ("l1", ">i4")]
    if sb:
        fields.append(("stream", f"S{len(sb)}"))
    fields += [("l2", ">i4"), ("last_seq", ">i8"), ("l3", ">i4"), ("last_time", ">i8"),
               ("l4", ">i4"), ("last_volume", ">i8"), ("l5", ">i4"), ("state", f"V{size}")]
    out = np.empty(n, np.dtype(fields))
    out["nf"] = len(STATE_COLUMNS)
    out["l0"] = 4
    out["l1"] = len(sb)
    out["l2"] = out["l3"] = out["l4"] = 8
    out["l5"] = size
    out["instrument_id"] = records["instrument_id"]
    if sb:
        out["stream"] = sb
    out["last_seq"] = last_seq
    out["last_time"] = records["last_time_us"] - _PG_EPOCH_US
    out["last_volume"] = np.where(records["flags"] & _core.STATE_HAS_VOLUME,
                                  records["last_volume"].astype(np.int64), -1)
    out["state"] = np.ascontiguousarray(records).view(np.dtype(f"V{size}"))
    return _COPY_HEADER + out.tobytes() + _COPY_TRAILER


def decode_state(blobs) -> np.ndarray:
    """``engine_state.state`` values (bytes of one layout) as ``state_dtype`` records."""
    blobs = list(blobs)
    if not blobs:
        return np.zeros(0, _core.state_dtype(1))
    head = np.frombuffer(blobs[0], np.dtype([("version", "<u2"), ("ntf", "<u2")]), count=1)[0]
    if int(head["version"]) != _core.STATE_VERSION:
        raise ValueError(f"engine_state version {int(head['version'])}, this build reads "
                         f"{_core.STATE_VERSION}")
    return np.frombuffer(b"".join(blobs), _core.state_dtype(int(head["ntf"])))


#: The committed state of every instrument.  ``state`` NULL: a row the migration added for an
#: instrument with ticks from before engine_state.  A row is written in the transaction that
#: advances its stream's offset to ``last_seq``, so one whose stream is no longer committed that
#: far belongs to offsets someone reset (tables emptied to ingest again): stale.  Both kinds are
#: seeded from tick_data instead (as before engine_state; nothing when the ticks were emptied
#: too).  One probe of stream_offsets' key per row.
#: the last ``order_book_depth20`` row time (µs) of each Angel One instrument that has one
#: (DEPTH is nse_cm only): one backward index probe per instrument
SQL_DEPTH20_LAST = """
SELECT i.id, (EXTRACT(EPOCH FROM d.last) * 1000000)::bigint
  FROM instruments i
 CROSS JOIN LATERAL (SELECT max(time) AS last FROM order_book_depth20 x
                      WHERE x.instrument_id = i.id) d
 WHERE i.broker = 'angel' AND i.exchange_type = 1 AND d.last IS NOT NULL
"""

SQL_LOAD_STATE = """
SELECT i.instrument_token, e.instrument_id, e.last_time, e.last_volume,
       CASE WHEN EXISTS (SELECT FROM stream_offsets o
                         WHERE o.stream = e.stream AND o.committed_seq >= e.last_seq)
            THEN e.state END,
       e.state IS NULL
FROM engine_state e JOIN instruments i ON i.id = e.instrument_id
"""


@dataclass
class Loaded:
    """What ``load_state`` seeded."""

    #: instruments seeded from engine_state
    instruments: int = 0
    #: forming candles seeded
    candles: int = 0
    #: candles dropped: timeframe no longer configured, or bucket no longer aligned
    dropped: int = 0
    #: instruments recomputed from tick_data (engine_state rows without a state)
    legacy: int = 0
    seconds: float = 0.0


def _seed_records(eng, tokens: list, recs: np.ndarray, out: Loaded, candles: bool) -> None:
    ntf = recs.dtype["tf_us"].shape[0]
    index = {n: i for i, n in enumerate(_core.timeframe_us(t) for t in eng.timeframes)}
    flags = recs["flags"].tolist()
    last_time = recs["last_time_us"].tolist()
    last_volume = recs["last_volume"].tolist()
    rec_token = recs["token"].tolist()
    tf_us = recs["tf_us"].tolist()
    acc = recs["acc"]
    cols = {k: acc[k].tolist() for k in ("flags", "start_us", "open", "high", "low", "close",
                                         "volume", "count", "pv_lo", "pv_hi", "oi")}
    book_time = recs["book"]["time_us"].tolist()
    books = recs["book"]
    seed_book = getattr(eng, "seed_book", None)
    for r, token in enumerate(tokens):
        if rec_token[r] != token:
            # the row's instrument now has another token (a re-listed id): its state is not this one's
            continue
        fl = flags[r]
        eng.seed(token, last_time[r], last_volume[r] if fl & _core.STATE_HAS_VOLUME else None)
        out.instruments += 1
        if candles:
            af = cols["flags"][r]
            for j in range(ntf):
                if not af[j] & _core.ACC_FLAG_OPEN:
                    continue
                f = index.get(tf_us[r][j])
                if f is None:
                    out.dropped += 1
                    continue
                try:
                    eng.seed_candle(
                        token, f, cols["start_us"][r][j], cols["open"][r][j], cols["high"][r][j],
                        cols["low"][r][j], cols["close"][r][j], cols["volume"][r][j],
                        cols["count"][r][j], cols["pv_hi"][r][j] << 64 | cols["pv_lo"][r][j],
                        cols["oi"][r][j] if af[j] & _core.ACC_FLAG_OI else None,
                        stored=bool(af[j] & _core.ACC_FLAG_EMITTED))
                    out.candles += 1
                except ValueError:
                    out.dropped += 1        # misaligned under another origin/utc_offset
        if candles and seed_book is not None and book_time[r]:
            seed_book(token, books[r], bool(fl & _core.STATE_SNAP_PENDING),
                      bool(fl & _core.STATE_SNAP_STORED))


def _seed_rows(target, rows, candles: bool, tokens) -> tuple[Loaded, list]:
    # -> what was seeded, and the (token, id) of legacy rows still to compute
    eng = _engine_of(target)
    out = Loaded()
    wanted = None if tokens is None else {int(t) for t in tokens}
    groups: dict[int, tuple[list, list]] = {}
    legacy = []
    for token, iid, last_time, last_volume, blob, migrated in rows:
        token = int(token)
        if wanted is not None and token not in wanted:
            continue
        if blob is None:
            legacy.append((token, int(iid)))
            if not candles and migrated:
                eng.seed(token, to_us(last_time), None if last_volume is None else int(last_volume))
                out.instruments += 1
            continue
        toks, blobs = groups.setdefault(len(blob), ([], []))
        toks.append(token)
        blobs.append(blob)
    for toks, blobs in groups.values():
        _seed_records(eng, toks, decode_state(blobs), out, candles)
    return out, legacy


def _seeded_legacy(target, state: list[dict], out: Loaded) -> None:
    eng = _engine_of(target)
    out.legacy = seed_engine(target, state)
    out.instruments += out.legacy
    out.candles += len(state)
    if hasattr(eng, "touch"):
        # commit their state with the first batch: recomputed once, then read
        for token in {s["token"] for s in state}:
            eng.touch(token)


def load_state(conn, pipeline_or_engine, *, candles: bool = True, tokens=None) -> Loaded:
    """Everything a restart needs: every known instrument's id, then its committed state.

    Parameters
    ----------
    conn : psycopg.Connection
        The database (read only; not in a flush transaction).
    pipeline_or_engine : Pipeline or Engine
        A ``Pipeline`` (its ``engine`` is seeded) or a core ``Engine``.
    candles : bool
        False: seed only last times and volumes (forming candles and books
        start empty; a control for tests).
    tokens : iterable of int, optional
        Seed only these instruments' state (an engine that receives only
        them: another engine's pending candles and books are not its to
        write).  Ids are given for all.

    Returns
    -------
    Loaded
        Instruments and candles seeded, seconds spent.
    """
    from ingestor.store.instruments import load_ids

    t0 = time.perf_counter()
    _set_ids(pipeline_or_engine, load_ids(conn))
    if hasattr(pipeline_or_engine, "seed_depth20"):
        pipeline_or_engine.seed_depth20(conn.execute(SQL_DEPTH20_LAST).fetchall())
    out, legacy = _seed_rows(pipeline_or_engine, conn.execute(SQL_LOAD_STATE).fetchall(),
                             candles, tokens)
    if legacy and candles:
        clock = clock_of(pipeline_or_engine)
        _seeded_legacy(pipeline_or_engine,
                       query_candle_state(conn, clock, [i for _, i in legacy]), out)
    out.seconds = time.perf_counter() - t0
    return out


async def aload_state(conn, pipeline_or_engine, *, candles: bool = True, tokens=None) -> Loaded:
    """Async twin of :func:`load_state`."""
    from ingestor.store.instruments import aload_ids

    t0 = time.perf_counter()
    _set_ids(pipeline_or_engine, await aload_ids(conn))
    if hasattr(pipeline_or_engine, "seed_depth20"):
        cur = await conn.execute(SQL_DEPTH20_LAST)
        pipeline_or_engine.seed_depth20(await cur.fetchall())
    cur = await conn.execute(SQL_LOAD_STATE)
    out, legacy = _seed_rows(pipeline_or_engine, await cur.fetchall(), candles, tokens)
    if legacy and candles:
        clock = clock_of(pipeline_or_engine)
        _seeded_legacy(pipeline_or_engine,
                       await aquery_candle_state(conn, clock, [i for _, i in legacy]), out)
    out.seconds = time.perf_counter() - t0
    return out


def _set_ids(target, ids: dict) -> None:
    if hasattr(target, "set_ids"):
        target.set_ids(ids)
    else:
        for token, iid in ids.items():
            target.set_instrument(token, iid)
