-- compat 001: the Quantitative Trading System's readers (reference schema 001), schema
-- compat_quant.
--
-- Run by ingestor.store.compat (`ingestor migrate --compat 001`) after it has (re)created the
-- schema and its settings functions:
--   compat_quant.granularity()          the timeframe behind market_data ('1m' by default;
--                                       --compat-timeframe 001=5m), a configured one
--   compat_quant.granularity_interval() its length, as an interval
--   compat_quant.listed(exchange)       whether an exchange's instruments are shown (all by
--                                       default; --compat-exchanges 001=NSE,NFO)
--   compat_quant.account_ok(placed_by)  whether an account's orders are shown: all by default;
--                                       with --compat-account-filter 001 only the account
--                                       the session names in app.current_user_id
-- They are IMMUTABLE SQL functions returning constants: the planner inlines and folds them,
-- so `timeframe = compat_quant.granularity()` is an index condition like a literal.
-- search_path is ingestor's schema, so unqualified names below are ingestor's tables.
--
-- Common decisions (docs/compat.md): prices stay ingestor's exact numeric (the seed's DOUBLE
-- PRECISION would round them), counts stay bigint (seed INTEGER); `symbol` is the bare
-- tradingsymbol (instruments.symbol), so a symbol listed on two exchanges gives one row per
-- exchange (narrow with --compat-exchanges); UUIDs are md5('ingestor:<kind>:' || id)::uuid.
-- Views run with their owner's rights (security_invoker off): the reader role is granted
-- SELECT on these views only.  Views of per-account rows (orders, executions, positions)
-- are security_barrier views: their account filter runs before any condition of the
-- reader's, so a leaky function in a reader's WHERE cannot see other accounts' rows.

-- ---------------------------------------------------------------------------------------------
-- market_data (seed: time, symbol, open, high, low, close, volume, vwap, bid, ask, bid_size,
-- ask_size; PRIMARY KEY (time, symbol); index (symbol, time DESC)).  One row per candle of
-- the schema's granularity.
--   time      <- ohlc_candles.time (bucket start)
--   symbol    <- instruments.symbol
--   open/high/low/close <- ohlc_candles.open_price/high_price/low_price/close_price
--   volume    <- ohlc_candles.volume (sum of increases of the cumulative day volume)
--   vwap      <- ohlc_candles.vwap
--   bid, ask, bid_size, ask_size <- tick_data.bid_price/ask_price/bid_quantity/ask_quantity
--             of the last tick in the bucket that carried a best bid/ask (null when none
--             did: LTP-mode and index instruments).  One probe of tick_data's (instrument_id,
--             time) index per row, in a LEFT JOIN LATERAL whose aggregate over a LIMIT 1
--             makes it provably one row: a reader that selects none of the four does not
--             pay for it (the planner removes the join).
-- A per-symbol time-range read: instruments_compat_symbol_idx, then
-- ohlc_candles_instrument_timeframe_time_idx (instrument_id, timeframe, time DESC).
CREATE VIEW compat_quant.market_data AS
SELECT c.time,
       i.symbol,
       c.open_price  AS open,
       c.high_price  AS high,
       c.low_price   AS low,
       c.close_price AS close,
       c.volume,
       c.vwap,
       q.bid,
       q.ask,
       q.bid_size,
       q.ask_size
FROM ohlc_candles c
JOIN instruments i ON i.id = c.instrument_id
LEFT JOIN LATERAL (
    -- max() of the one row: the aggregate is what lets the planner drop the join when unused
    SELECT max(t.bid_price) AS bid, max(t.ask_price) AS ask,
           max(t.bid_quantity) AS bid_size, max(t.ask_quantity) AS ask_size
    FROM (SELECT t.bid_price, t.ask_price, t.bid_quantity, t.ask_quantity
          FROM tick_data t
          WHERE t.instrument_id = c.instrument_id AND t.time >= c.time
            AND t.time < c.time + compat_quant.granularity_interval()
            AND t.bid_price IS NOT NULL
          ORDER BY t.time DESC LIMIT 1) t) q ON true
WHERE c.timeframe = compat_quant.granularity()
  AND compat_quant.listed(i.exchange);

-- ---------------------------------------------------------------------------------------------
-- market_data_daily (seed: a TimescaleDB continuous aggregate: day, symbol, open, high, low,
-- close, volume, avg_price over market_data).  A continuous aggregate cannot be defined over
-- a view; ingestor's 1d candles already are that aggregate, exactly, so this is a view over
-- them.  Differences from the seed: `day` is the exchange's midnight (the 1d bucket start:
-- 18:30 UTC of the day before for +05:30), not UTC midnight; open/high/low/close/volume come
-- from the 1d candle, which equals the aggregate of the day's market_data rows (one
-- definition of a candle; tested).  A service's refresh_continuous_aggregate() call fails on
-- a view (nothing to refresh: it is always current), and it is not listed in
-- timescaledb_information.continuous_aggregates.
--   day       <- ohlc_candles.time of the 1d candle
--   symbol    <- instruments.symbol
--   open/high/low/close/volume <- the 1d candle
--   avg_price <- avg(close) of the day's market_data rows (candles of the granularity)
CREATE VIEW compat_quant.market_data_daily AS
SELECT d.time        AS day,
       i.symbol,
       d.open_price  AS open,
       d.high_price  AS high,
       d.low_price   AS low,
       d.close_price AS close,
       d.volume,
       (SELECT avg(m.close_price) FROM ohlc_candles m
         WHERE m.instrument_id = d.instrument_id AND m.timeframe = compat_quant.granularity()
           AND m.time >= d.time AND m.time < d.time + interval '1 day') AS avg_price
FROM ohlc_candles d
JOIN instruments i ON i.id = d.instrument_id
WHERE d.timeframe = '1d'
  AND compat_quant.listed(i.exchange);

-- ---------------------------------------------------------------------------------------------
-- orders (seed: order_id uuid, created_at, updated_at, strategy_id, signal_id, symbol, side,
-- order_type, quantity, price, stop_price, time_in_force, status, filled_quantity,
-- avg_fill_price, broker_order_id, error_message).
--   order_id        <- orders.id (already a uuid)
--   created_at, updated_at, strategy_id, quantity, price, filled_quantity, broker_order_id
--                   <- the same-named orders columns
--   signal_id       <- no source: null
--   symbol          <- instruments.symbol
--   side            <- lower(orders.transaction_type): 'buy' / 'sell'
--   order_type      <- orders.order_type: MARKET 'market', LIMIT 'limit', SL 'stop_limit',
--                      SL-M 'stop'; anything else lower-cased
--   stop_price      <- orders.trigger_price
--   time_in_force   <- lower(orders.validity) ('day', 'ioc', 'ttl'); 'day' when absent
--   status          <- orders.current_status: OPEN 'open', COMPLETE 'filled', CANCELLED
--                      'cancelled', REJECTED 'rejected', anything else (TRIGGER PENDING, AMO
--                      REQ RECEIVED, ...) 'pending'
--   avg_fill_price  <- orders.average_price
--   error_message   <- orders.status_message
CREATE VIEW compat_quant.orders WITH (security_barrier) AS
SELECT o.id AS order_id,
       o.created_at,
       o.updated_at,
       o.strategy_id,
       NULL::uuid AS signal_id,
       i.symbol,
       lower(o.transaction_type) AS side,
       CASE o.order_type WHEN 'MARKET' THEN 'market' WHEN 'LIMIT' THEN 'limit'
                         WHEN 'SL' THEN 'stop_limit' WHEN 'SL-M' THEN 'stop'
                         ELSE lower(o.order_type) END AS order_type,
       o.quantity,
       o.price,
       o.trigger_price AS stop_price,
       coalesce(lower(o.validity), 'day') AS time_in_force,
       CASE o.current_status WHEN 'OPEN' THEN 'open' WHEN 'COMPLETE' THEN 'filled'
                             WHEN 'CANCELLED' THEN 'cancelled' WHEN 'REJECTED' THEN 'rejected'
                             ELSE 'pending' END AS status,
       o.filled_quantity,
       o.average_price AS avg_fill_price,
       o.broker_order_id,
       o.status_message AS error_message
FROM orders o
JOIN instruments i ON i.id = o.instrument_id
WHERE compat_quant.listed(i.exchange)
  AND compat_quant.account_ok(o.placed_by);

-- ---------------------------------------------------------------------------------------------
-- executions (seed: execution_id uuid, time, order_id uuid, symbol, side, quantity, price,
-- commission, venue, broker_exec_id).
--   execution_id   <- md5('ingestor:execution:' || executions.id)::uuid
--   time, order_id, quantity, price <- executions.time/order_id/quantity/price
--   symbol         <- instruments.symbol
--   side           <- lower(executions.transaction_type)
--   commission     <- no source (postbacks carry no charges): null
--   venue          <- instruments.exchange
--   broker_exec_id <- no source (a fill is derived from the increase of filled_quantity;
--                     Kite postbacks carry no trade id): null
CREATE VIEW compat_quant.executions WITH (security_barrier) AS
SELECT md5('ingestor:execution:' || e.id::text)::uuid AS execution_id,
       e.time,
       e.order_id,
       i.symbol,
       lower(e.transaction_type) AS side,
       e.quantity,
       e.price,
       NULL::numeric AS commission,
       i.exchange AS venue,
       NULL::text AS broker_exec_id
FROM executions e
JOIN orders o ON o.id = e.order_id
JOIN instruments i ON i.id = e.instrument_id
WHERE compat_quant.listed(i.exchange)
  AND compat_quant.account_ok(o.placed_by);

-- ---------------------------------------------------------------------------------------------
-- positions (seed: symbol PRIMARY KEY, quantity, average_cost, realized_pnl, strategy_id,
-- opened_at, updated_at): the open positions.  ingestor keeps one per (strategy,
-- instrument), so a symbol held by two strategies (or on two exchanges) is two rows.
--   symbol       <- instruments.symbol
--   quantity     <- positions.quantity (signed: negative is short)
--   average_cost <- positions.average_entry_price
--   realized_pnl, strategy_id, opened_at, updated_at <- the same-named positions columns
-- Its account (for the account filter) is that of the order whose fill opened it.
CREATE VIEW compat_quant.positions WITH (security_barrier) AS
SELECT i.symbol,
       p.quantity,
       p.average_entry_price AS average_cost,
       p.realized_pnl,
       p.strategy_id,
       p.opened_at,
       p.updated_at
FROM positions p
JOIN instruments i ON i.id = p.instrument_id
WHERE p.status = 'OPEN'
  AND compat_quant.listed(i.exchange)
  AND compat_quant.account_ok((SELECT o.placed_by FROM executions e JOIN orders o ON o.id = e.order_id
                          WHERE e.strategy_id = p.strategy_id AND e.instrument_id = p.instrument_id
                            AND e.time = p.opened_at
                          ORDER BY e.id LIMIT 1));
