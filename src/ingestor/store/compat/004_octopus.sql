-- compat 004: the Octopus Trading Platform's readers (reference schema 004), schema
-- compat_octopus.
--
-- Run by ingestor.store.compat (`ingestor migrate --compat 004`) after it has (re)created the
-- schema and its settings functions:
--   compat_octopus.granularity()     the timeframe behind market_data ('1m' by default;
--                                    --compat-timeframe 004=5m), a configured one
--   compat_octopus.listed(exchange)  whether an exchange's instruments are shown (all by
--                                    default; --compat-exchanges 004=NSE)
--   compat_octopus.account_ok(placed_by)  all accounts by default; with
--                                    --compat-account-filter 004 only the one the session
--                                    names in app.current_user_id -- the seed's own setting
--                                    (its RLS policies use it): the portfolio_id UUID below,
--                                    or the Kite user id
-- search_path is ingestor's schema, so unqualified names below are ingestor's tables.
--
-- Common decisions (docs/compat.md): prices stay ingestor's exact numeric (the seed's
-- DECIMAL(20,2) would round every price with more than 2 decimals), counts bigint;
-- `symbol` is the bare tradingsymbol; account UUIDs are md5('ingestor:account:' ||
-- orders.placed_by)::uuid.  The seed's role pattern (an application role that writes, a
-- read-only role) is ingestor's writer role and this schema's reader role
-- (compat_octopus_reader), which can read these views and nothing else.

-- ---------------------------------------------------------------------------------------------
-- market_data (seed: symbol, timestamp, open_price, high_price, low_price, close_price,
-- volume, vwap, created_at; index (symbol, timestamp DESC)).  One row per candle of the
-- schema's granularity.
--   symbol    <- instruments.symbol
--   timestamp <- ohlc_candles.time (bucket start)
--   open_price, high_price, low_price, close_price, volume, vwap <- the same-named
--                ohlc_candles columns (volume: sum of increases of the cumulative volume)
--   created_at <- no source (candles are upserted while they form): null
CREATE VIEW compat_octopus.market_data AS
SELECT i.symbol,
       c.time AS "timestamp",
       c.open_price,
       c.high_price,
       c.low_price,
       c.close_price,
       c.volume,
       c.vwap,
       NULL::timestamptz AS created_at
FROM ohlc_candles c
JOIN instruments i ON i.id = c.instrument_id
WHERE c.timeframe = compat_octopus.granularity()
  AND compat_octopus.listed(i.exchange);

-- ---------------------------------------------------------------------------------------------
-- trade_executions (seed: id, order_id, portfolio_id, symbol, side, quantity, price,
-- commission, timestamp, broker, execution_id, created_at): one row per fill.
--   id           <- md5('ingestor:execution:' || executions.id)::uuid
--   order_id     <- executions.order_id (orders.id, a uuid)
--   portfolio_id <- md5('ingestor:account:' || orders.placed_by)::uuid: the Kite user who
--                   placed the order stands for the seed's portfolio (one per account)
--   symbol       <- instruments.symbol
--   side         <- lower(executions.transaction_type): 'buy' / 'sell' (the seed's orders)
--   quantity, price <- executions.quantity / price (price exact, derived from the change of
--                   average_price x filled_quantity)
--   commission   <- no source (postbacks carry no charges): null
--   timestamp    <- executions.time
--   broker       <- no source column (orders has no broker): null
--   execution_id <- no source (Kite postbacks carry no trade id): null
--   created_at   <- no source: null
CREATE VIEW compat_octopus.trade_executions WITH (security_barrier) AS
SELECT md5('ingestor:execution:' || e.id::text)::uuid AS id,
       e.order_id,
       md5('ingestor:account:' || o.placed_by)::uuid AS portfolio_id,
       i.symbol,
       lower(e.transaction_type) AS side,
       e.quantity,
       e.price,
       NULL::numeric AS commission,
       e.time AS "timestamp",
       NULL::text AS broker,
       NULL::text AS execution_id,
       NULL::timestamptz AS created_at
FROM executions e
JOIN orders o ON o.id = e.order_id
JOIN instruments i ON i.id = e.instrument_id
WHERE compat_octopus.listed(i.exchange)
  AND compat_octopus.account_ok(o.placed_by);
