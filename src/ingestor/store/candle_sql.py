"""The candle definition in SQL, over the stored ``tick_data`` rows.

The core engine's candles must equal what SQL computes from the ticks it stored: the tests
check that (``tests/test_candles_sql.py``, ``tests/test_replay.py``) with :data:`CANDLES_SQL`,
and ``ingestor dead-letter replay`` uses the same definition (:data:`RECOMPUTE_SQL`) to make
the candles a re-applied batch touches right again.  Both are built from the same two
pieces, so there is one definition:

* the **volume** of a tick is the increase of the instrument's cumulative day volume since
  its previous tick that carried one (``lag()`` over those ticks): 0 for its first such
  tick and for ticks without a volume, the new value itself when the cumulative volume
  falls (a new day);
* a candle is the bucket's ticks (``date_bin`` with the engine's stride and origin; a
  bucket is ``[time, time + stride)``): open and close by time, high, low, the sum of the
  volumes, the tick count, the VWAP rounded half away from zero to 7 places exactly
  (``div()`` is integer division of exact numerics: a plain numeric division would round at
  its own scale first) or null without volume, and the last open interest.
"""

from __future__ import annotations

from ingestor.pipeline.tables import CANDLE_VALUE_COLUMNS

__all__ = ["CANDLES_SQL", "CANDLE_LIST", "FAST_SQL", "FAST_TIMEFRAMES", "RECOMPUTE_SQL",
           "SQL_KEYS_TABLE", "SQL_STAGE", "apply_staged", "aapply_staged"]

# the volume of tick ``d`` given ``prev``, the instrument's previous cumulative volume
_VOLUME_DELTA = """case when d.volume is null or v.prev is null then 0
                when d.volume >= v.prev then d.volume - v.prev
                else d.volume end"""

# a candle's values from the bucket's ticks (price, time, oi, dv), named as ohlc_candles'
_AGGREGATES = """(array_agg(price order by time))[1] as open_price,
       max(price) as high_price,
       min(price) as low_price,
       (array_agg(price order by time desc))[1] as close_price,
       sum(dv)::bigint as volume,
       count(*) as trade_count,
       case when sum(dv) = 0 then null
            else (div(sum(price * dv) * 20000000 + sum(dv), 2 * sum(dv)) / 10000000)::numeric(18,7)
       end as vwap,
       (array_agg(oi order by time desc) filter (where oi is not null))[1] as open_interest"""

#: Every candle of one timeframe over the whole of ``tick_data``: parameters ``stride``
#: (an interval) and ``origin`` (a timestamptz); rows ``(bucket, instrument_id,``
#: :data:`~ingestor.pipeline.tables.CANDLE_VALUE_COLUMNS` ``)`` by instrument and time.
CANDLES_SQL = f"""
with v as (
    select instrument_id, time, volume,
           lag(volume) over (partition by instrument_id order by time) as prev
    from tick_data where volume is not null
), t as (
    select d.instrument_id, d.time, d.price, d.oi,
           {_VOLUME_DELTA} as dv
    from tick_data d left join v using (instrument_id, time)
)
select date_bin(%(stride)s::interval, time, %(origin)s::timestamptz) as bucket,
       instrument_id,
       {_AGGREGATES}
from t
group by 1, 2
order by 2, 1
"""

#: The keys to recompute: bucket start, instrument, timeframe label and its stride.
SQL_KEYS_TABLE = ("CREATE TEMP TABLE IF NOT EXISTS ingestor_candle_keys "
                  "(time timestamptz, instrument_id integer, timeframe text, stride_us bigint) "
                  "ON COMMIT DELETE ROWS")

_VALUES = ", ".join(CANDLE_VALUE_COLUMNS)
#: ``ohlc_candles``' columns as the writer's COPYs and the statements below name them
CANDLE_LIST = f"time, instrument_id, timeframe, {_VALUES}"

# ---------------------------------------------------------------------------------------------
# Writing candles that may be stored already (sql/0007).  ``ohlc_candles`` has a unique key
# on every timeframe but the sub-minute ones, which are written once, when they close, with no
# B-tree entry each.  A candle that may be stored in another version (a forming one upserted
# as it grows, one a stop stored while forming and the resumed stream closed, a backfill's
# recomputed bucket) is staged in ``ingestor_candle_stage``, then :func:`apply_staged`
# upserts the keyed ones by their key and replaces the sub-minute ones: deletes the stored
# version by key, within the staged rows' time span and instruments (the BRIN index on time;
# on TimescaleDB the span and the instruments, a segmentby column, also bound the compressed
# batches a delete decompresses), and inserts them.  In a key staged twice the latest version
# (highest ``ord``) wins.  The writer's transactions that stage candles follow each other (the
# offset row's lock, and N+1's upserts wait for N's commit), so nothing inserts the same
# sub-minute candle between the delete and the insert.

#: The timeframes written once, without a key: exactly the predicate of sql/0007's indexes.
FAST_TIMEFRAMES = ("1s", "5s")
#: the same as an SQL list, ``('1s', '5s')``
FAST_SQL = "(" + ", ".join(f"'{t}'" for t in FAST_TIMEFRAMES) + ")"

SQL_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS ingestor_candle_stage "
             "(LIKE ohlc_candles, ord bigint GENERATED ALWAYS AS IDENTITY) ON COMMIT DELETE ROWS")
# DISTINCT ON: a key twice in one batch (a bucket reopened by a late tick) would make ON
# CONFLICT DO UPDATE affect a row twice, and insert a sub-minute candle twice
_LATEST = (f"SELECT DISTINCT ON (time, instrument_id, timeframe) {CANDLE_LIST} "
           f"FROM ingestor_candle_stage WHERE timeframe {{}} IN {FAST_SQL} "
           f"ORDER BY time, instrument_id, timeframe, ord DESC")
#: the keyed timeframes' upsert (a row already right is left alone)
SQL_UPSERT_KEYED = (
    f"INSERT INTO ohlc_candles AS o ({CANDLE_LIST}) {_LATEST.format('NOT')} "
    f"ON CONFLICT (time, instrument_id, timeframe) WHERE timeframe NOT IN {FAST_SQL} "
    f"DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in CANDLE_VALUE_COLUMNS)} "
    f"WHERE ({', '.join(f'o.{c}' for c in CANDLE_VALUE_COLUMNS)}) "
    f"IS DISTINCT FROM ({', '.join(f'excluded.{c}' for c in CANDLE_VALUE_COLUMNS)})")
#: the staged sub-minute candles' span: instruments, first and last bucket (NULLs: none)
SQL_FAST_SPAN = (f"SELECT array_agg(DISTINCT instrument_id), min(time), max(time) "
                 f"FROM ingestor_candle_stage WHERE timeframe IN {FAST_SQL}")
# no limit on the rows a delete may decompress in a columnstore chunk (TimescaleDB's
# default of 100k would refuse a resumed stream of many instruments): the span bounds them
SQL_FAST_NO_LIMIT = ("SELECT set_config("
                     "'timescaledb.max_tuples_decompressed_per_dml_transaction', '0', true)")
SQL_FAST_DELETE = (
    f"DELETE FROM ohlc_candles o USING ingestor_candle_stage s "
    f"WHERE o.timeframe IN {FAST_SQL} AND o.instrument_id = ANY(%(ids)s) "
    f"AND o.time >= %(lo)s AND o.time <= %(hi)s "
    f"AND s.timeframe = o.timeframe AND s.instrument_id = o.instrument_id AND s.time = o.time")
SQL_FAST_INSERT = f"INSERT INTO ohlc_candles ({CANDLE_LIST}) {_LATEST.format('')}"
SQL_STAGE_CLEAR = "DELETE FROM ingestor_candle_stage"


def apply_staged(conn) -> int:
    """Write the candles staged in ``ingestor_candle_stage`` (see above) and empty the stage,
    in ``conn``'s transaction; the rows written."""
    ids, lo, hi = conn.execute(SQL_FAST_SPAN).fetchone()
    n = 0
    if ids:
        conn.execute(SQL_FAST_NO_LIMIT)
        conn.execute(SQL_FAST_DELETE, {"ids": ids, "lo": lo, "hi": hi})
        n += conn.execute(SQL_FAST_INSERT).rowcount
    n += conn.execute(SQL_UPSERT_KEYED).rowcount
    conn.execute(SQL_STAGE_CLEAR)
    return n


async def aapply_staged(cur) -> int:
    """:func:`apply_staged` on an async cursor."""
    await cur.execute(SQL_FAST_SPAN)
    ids, lo, hi = await cur.fetchone()
    n = 0
    if ids:
        await cur.execute(SQL_FAST_NO_LIMIT)
        await cur.execute(SQL_FAST_DELETE, {"ids": ids, "lo": lo, "hi": hi})
        await cur.execute(SQL_FAST_INSERT)
        n += cur.rowcount
    await cur.execute(SQL_UPSERT_KEYED)
    n += cur.rowcount
    await cur.execute(SQL_STAGE_CLEAR)
    return n


#: Recompute the candles named in ``ingestor_candle_keys`` from ``tick_data`` into
#: ``ingestor_candle_stage``, for :func:`apply_staged` to write.  The same
#: definition as :data:`CANDLES_SQL`, restricted to the keys: the ticks of each key's
#: bucket, the previous cumulative volume looked up before the bucket where the bucket's
#: first tick with a volume needs it.  A key whose bucket holds no tick is left as it is.
RECOMPUTE_SQL = f"""
with k as (
    select distinct time as bucket, instrument_id, timeframe,
           stride_us * interval '1 microsecond' as stride
    from ingestor_candle_keys
), b as (
    select k.bucket, k.timeframe, d.instrument_id, d.time, d.price, d.oi, d.volume
    from k join tick_data d
      on d.instrument_id = k.instrument_id and d.time >= k.bucket and d.time < k.bucket + k.stride
), v as (
    select bucket, timeframe, instrument_id, time,
           coalesce(lag(volume) over (partition by bucket, timeframe, instrument_id order by time),
                    (select p.volume from tick_data p
                      where p.instrument_id = b.instrument_id and p.time < b.bucket
                        and p.volume is not null
                      order by p.time desc limit 1)) as prev
    from b where volume is not null
), t as (
    select d.bucket, d.timeframe, d.instrument_id, d.time, d.price, d.oi,
           {_VOLUME_DELTA} as dv
    from b d left join v using (bucket, timeframe, instrument_id, time)
)
insert into ingestor_candle_stage ({CANDLE_LIST})
select bucket, instrument_id, timeframe,
       {_AGGREGATES}
from t
group by bucket, instrument_id, timeframe
"""
