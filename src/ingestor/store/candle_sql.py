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

__all__ = ["CANDLES_SQL", "RECOMPUTE_SQL", "SQL_KEYS_TABLE"]

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

#: Recompute the candles named in ``ingestor_candle_keys`` from ``tick_data`` and upsert
#: them into ``ohlc_candles`` (rows that are already right are left alone).  The same
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
insert into ohlc_candles as o (time, instrument_id, timeframe, {_VALUES})
select bucket, instrument_id, timeframe,
       {_AGGREGATES}
from t
group by bucket, instrument_id, timeframe
on conflict (time, instrument_id, timeframe) do update set
       {", ".join(f"{c} = excluded.{c}" for c in CANDLE_VALUE_COLUMNS)}
 where ({", ".join(f"o.{c}" for c in CANDLE_VALUE_COLUMNS)})
       is distinct from ({", ".join(f"excluded.{c}" for c in CANDLE_VALUE_COLUMNS)})
"""
