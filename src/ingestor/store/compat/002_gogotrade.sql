-- compat 002: GoGoTrade's readers (reference schema 002), schema compat_gogotrade.
--
-- Run by ingestor.store.compat (`ingestor migrate --compat 002`) after it has (re)created the
-- schema and its settings functions compat_gogotrade.listed(exchange) (which exchanges'
-- instruments are shown; all by default) and compat_gogotrade.account_ok(placed_by) (all
-- accounts by default; with --compat-account-filter 002 only the one the session names in
-- app.current_user_id).  trades, a view of per-account rows, is a security_barrier view.  search_path is ingestor's schema, so unqualified
-- names below are ingestor's tables.  Needs the 1d and 5m timeframes (daily_ohlcv,
-- ohlcv_5m): migrate refuses the schema when the configuration lacks them.
--
-- Common decisions (docs/compat.md): prices stay ingestor's exact numeric(18,7) (the seed's
-- Numeric(10,2)/(12,4) would round CDS prices), counts bigint; instrument UUIDs are
-- md5('ingestor:instrument:' || instruments.id)::uuid -- the same expression as the index
-- instruments_compat_uuid_idx (000_base.sql), so `instrument_id = '<uuid>'` is an index scan.

-- ---------------------------------------------------------------------------------------------
-- instruments (seed: id uuid, instrument_token, exchange_token, tradingsymbol, name,
-- last_price, expiry, strike, tick_size, lot_size, instrument_type, segment, exchange,
-- created_at, updated_at).
--   id              <- md5('ingestor:instrument:' || instruments.id)::uuid
--   instrument_token, exchange_token, name, tick_size, lot_size, segment, exchange,
--   created_at, updated_at <- the same-named instruments columns
--   tradingsymbol   <- instruments.symbol ('TOKEN:<n>' for a token seen on the feed before
--                      any dump named it)
--   last_price      <- tick_data.price of the instrument's latest tick (a backward probe of
--                      the (instrument_id, time) index, only when selected); null without ticks
--   expiry          <- instruments.expiry_date (a date; the seed's DateTime)
--   strike          <- instruments.strike_price
--   instrument_type <- the seed's enum from Kite's segment and type: CDS/BCD segments
--                      CURRENCY, MCX/NCO COMMODITY, else EQ EQUITY, FUT FUTURES, CE/PE
--                      OPTIONS; anything else (an index, a feed-registered token) as stored
CREATE VIEW compat_gogotrade.instruments AS
SELECT md5('ingestor:instrument:' || i.id::text)::uuid AS id,
       i.instrument_token,
       i.exchange_token,
       i.symbol AS tradingsymbol,
       i.name,
       (SELECT t.price FROM tick_data t WHERE t.instrument_id = i.id
         ORDER BY t.time DESC LIMIT 1) AS last_price,
       i.expiry_date AS expiry,
       i.strike_price AS strike,
       i.tick_size,
       i.lot_size,
       CASE WHEN i.segment LIKE 'CDS%' OR i.segment LIKE 'BCD%' THEN 'CURRENCY'
            WHEN i.segment LIKE 'MCX%' OR i.segment LIKE 'NCO%' THEN 'COMMODITY'
            WHEN i.instrument_type = 'EQ' THEN 'EQUITY'
            WHEN i.instrument_type = 'FUT' THEN 'FUTURES'
            WHEN i.instrument_type IN ('CE', 'PE') THEN 'OPTIONS'
            ELSE i.instrument_type END AS instrument_type,
       i.segment,
       i.exchange,
       i.created_at,
       i.updated_at
FROM instruments i
WHERE compat_gogotrade.listed(i.exchange);

-- ---------------------------------------------------------------------------------------------
-- ohlcv_data (seed: instrument_id uuid, timestamp, timeframe, open, high, low, close, volume,
-- open_interest, trades_count, created_at; PK (instrument_id, timestamp, timeframe)).
-- Every timeframe ingestor stores; the seed's labels (1m/5m/15m/1h/1d) are ingestor's own.
--   instrument_id <- md5('ingestor:instrument:' || instruments.id)::uuid
--   timestamp     <- ohlc_candles.time (bucket start)
--   timeframe     <- ohlc_candles.timeframe
--   open/high/low/close <- ohlc_candles.open_price/high_price/low_price/close_price
--   volume, open_interest <- ohlc_candles.volume / open_interest
--   trades_count  <- ohlc_candles.trade_count (ticks in the bucket: the feed's packets, not
--                    the exchange's trades)
--   created_at    <- no source (candles are upserted while they form): null
CREATE VIEW compat_gogotrade.ohlcv_data AS
SELECT md5('ingestor:instrument:' || i.id::text)::uuid AS instrument_id,
       c.time AS "timestamp",
       c.timeframe,
       c.open_price  AS open,
       c.high_price  AS high,
       c.low_price   AS low,
       c.close_price AS close,
       c.volume,
       c.open_interest,
       c.trade_count AS trades_count,
       NULL::timestamptz AS created_at
FROM ohlc_candles c
JOIN instruments i ON i.id = c.instrument_id
WHERE compat_gogotrade.listed(i.exchange);

-- ---------------------------------------------------------------------------------------------
-- daily_ohlcv (seed: a materialized view instrument_id, date, open, high, low, close, volume
-- over ohlcv_data WHERE timeframe = '1d' GROUP BY DATE(timestamp)).  A view over the 1d
-- candles: always current, no REFRESH MATERIALIZED VIEW needed (a service's REFRESH fails on
-- a view: drop that call).
--   date <- the exchange's date of the 1d candle.  The bucket starts at the exchange's
--           midnight (18:30 UTC of the day before at +05:30), so DATE(timestamp) in a UTC
--           session would give the day before; (bucket start + 12 hours) read in UTC gives
--           the exchange's date for any utc_offset within -12:00..+12:00, whatever the
--           session's TimeZone.
--   instrument_id, open, high, low, close, volume <- as in ohlcv_data, of the 1d candle
--           (one candle per instrument and date: the seed's first/max/min/last/sum over it)
CREATE VIEW compat_gogotrade.daily_ohlcv AS
SELECT md5('ingestor:instrument:' || i.id::text)::uuid AS instrument_id,
       ((c.time + interval '12 hours') AT TIME ZONE 'UTC')::date AS date,
       c.open_price  AS open,
       c.high_price  AS high,
       c.low_price   AS low,
       c.close_price AS close,
       c.volume
FROM ohlc_candles c
JOIN instruments i ON i.id = c.instrument_id
WHERE c.timeframe = '1d'
  AND compat_gogotrade.listed(i.exchange);

-- ---------------------------------------------------------------------------------------------
-- ohlcv_5m (seed: a continuous aggregate bucket, instrument_id, open, high, low, close,
-- volume of the 1m candles in 5-minute buckets).  ingestor aggregates 5m from the ticks
-- itself (the same definition as 1m, so the same values as aggregating its 1m candles,
-- with buckets aligned to the exchange's midnight as every timeframe); a view over them.
-- Not a continuous aggregate: refresh_continuous_aggregate('ohlcv_5m', ...) fails and it is
-- not listed in timescaledb_information.continuous_aggregates.
--   bucket <- ohlc_candles.time of the 5m candle; the rest as in ohlcv_data
CREATE VIEW compat_gogotrade.ohlcv_5m AS
SELECT c.time AS bucket,
       md5('ingestor:instrument:' || i.id::text)::uuid AS instrument_id,
       c.open_price  AS open,
       c.high_price  AS high,
       c.low_price   AS low,
       c.close_price AS close,
       c.volume
FROM ohlc_candles c
JOIN instruments i ON i.id = c.instrument_id
WHERE c.timeframe = '5m'
  AND compat_gogotrade.listed(i.exchange);

-- ---------------------------------------------------------------------------------------------
-- trades (seed: order_id, order_timestamp, instrument_id uuid, exchange_order_id,
-- transaction_type, quantity, price, order_type, order_status, executed_quantity,
-- pending_quantity, cancelled_quantity, average_price, algo_id, strategy_id, user_id,
-- exchange_timestamp, created_at, updated_at): one row per order.
--   order_id           <- orders.broker_order_id (the seed's String order id)
--   order_timestamp    <- orders.order_timestamp, else orders.created_at
--   instrument_id      <- md5('ingestor:instrument:' || orders.instrument_id)::uuid
--   exchange_order_id, transaction_type, quantity, price, pending_quantity,
--   cancelled_quantity, average_price, strategy_id, exchange_timestamp, created_at,
--   updated_at         <- the same-named orders columns
--   order_type         <- MARKET, LIMIT; SL STOP_LOSS; SL-M STOP_LOSS_MARKET
--   order_status       <- COMPLETE, CANCELLED, REJECTED, OPEN as stored; any other Kite
--                         status (TRIGGER PENDING, ...) PENDING
--   executed_quantity  <- orders.filled_quantity
--   algo_id            <- no source (Kite postbacks carry no exchange algo id): null
--   user_id            <- orders.placed_by (the Kite user id)
CREATE VIEW compat_gogotrade.trades WITH (security_barrier) AS
SELECT o.broker_order_id AS order_id,
       coalesce(o.order_timestamp, o.created_at) AS order_timestamp,
       md5('ingestor:instrument:' || i.id::text)::uuid AS instrument_id,
       o.exchange_order_id,
       o.transaction_type,
       o.quantity,
       o.price,
       CASE o.order_type WHEN 'SL' THEN 'STOP_LOSS' WHEN 'SL-M' THEN 'STOP_LOSS_MARKET'
                         ELSE o.order_type END AS order_type,
       CASE WHEN o.current_status IN ('COMPLETE', 'CANCELLED', 'REJECTED', 'OPEN')
            THEN o.current_status ELSE 'PENDING' END AS order_status,
       o.filled_quantity AS executed_quantity,
       o.pending_quantity,
       o.cancelled_quantity,
       o.average_price,
       NULL::text AS algo_id,
       o.strategy_id,
       o.placed_by AS user_id,
       o.exchange_timestamp,
       o.created_at,
       o.updated_at
FROM orders o
JOIN instruments i ON i.id = o.instrument_id
WHERE compat_gogotrade.listed(i.exchange)
  AND compat_gogotrade.account_ok(o.placed_by);
