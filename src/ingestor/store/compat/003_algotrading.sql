-- compat 003: the multi-user algotrading system's readers (reference schema 003), schema
-- compat_algotrading.
--
-- Run by ingestor.store.compat (`ingestor migrate --compat 003`) after it has (re)created the
-- schema and its settings functions compat_algotrading.listed(exchange) (which exchanges'
-- instruments are shown; all by default) and compat_algotrading.account_ok(placed_by) (all
-- accounts by default; with --compat-account-filter 003 only the one the session names in
-- app.current_user_id: the Kite user id or its derived user_id UUID).  Views of per-account
-- rows (trades, positions, position_history) are security_barrier views.  search_path is ingestor's schema, so unqualified
-- names below are ingestor's tables.
--
-- Common decisions (docs/compat.md): prices stay ingestor's exact numeric (the seed's
-- DECIMAL(10,2) would round every price with more than 2 decimals: CDS, BCD, NCO), counts
-- bigint; `symbol` is the bare tradingsymbol; UUIDs are md5('ingestor:<kind>:' || id)::uuid.

-- ---------------------------------------------------------------------------------------------
-- market_data (seed: data_id uuid, symbol, timestamp, open, high, low, close, volume, oi,
-- interval IN ('tick','1min','5min','15min','30min','1hour','1day'), tick_data jsonb,
-- created_at).  One UNION ALL branch per interval, each with its interval as a constant, so
-- that a reader's `interval = '1min'` (or `IN (...)`) is decided at plan time: the planner
-- folds it to false on every other branch and drops them before planning them.
--   interval 'tick'  <- tick_data, one row per tick:
--       data_id   <- md5('ingestor:tick:' || instrument_id || ':' || epoch microseconds)
--       open/high/low/close <- tick_data.price
--       volume    <- tick_data.volume: the CUMULATIVE day volume the feed sends (null in LTP
--                    and index packets); the tick's own traded quantity is in tick_data->'quantity'
--       oi        <- tick_data.oi (full packets only)
--       tick_data <- a JSON object of the tick's other columns (quantity, volume, oi,
--                    bid_price, bid_quantity, ask_price, ask_quantity, exchange_time,
--                    exchange), built only when selected
--   interval '1min','5min','15min','1hour','1day' <- ohlc_candles of 1m, 5m, 15m, 1h, 1d:
--       data_id   <- md5('ingestor:candle:<timeframe>:' || instrument_id || ':' || epoch us)
--       timestamp <- bucket start; open/high/low/close <- *_price; volume <- volume (sum of
--                    increases); oi <- open_interest; tick_data <- null
--   interval '30min' <- no source: ingestor has no 30m timeframe (the schema's CHECK allows
--       1s 5s 1m 5m 15m 1h 1d); no branch, so such a read returns no rows.
--   symbol     <- instruments.symbol
--   created_at <- no source: null
--
-- Why each branch reads a subquery `(... ORDER BY NULL::int) AS x` (docs/compat.md, "Readers'
-- speed"): the planner drops a branch before planning it only when the branch is pulled up
-- into the UNION ALL, which it does for a branch reading one relation or subquery with no
-- WHERE of its own; a
-- branch that is itself the join to instruments is planned as a subquery, where the
-- reader's emptied `'1min' = 'tick'` is seen only after its relations are opened (on
-- TimescaleDB: every chunk of the hypertable expanded; six such branches planned in 4-6 ms
-- where the base read plans in 0.2).  So each branch reads one subquery holding the join:
-- the branch is pulled up and folded, and the subquery, which the ORDER BY keeps whole (the
-- planner does not pull a subquery with an ORDER BY into its parent; a constant sort key
-- sorts nothing and is dropped from the plan), still receives the reader's conditions on
-- symbol and timestamp, so the symbol is an index lookup on instruments and the time range
-- and the timeframe are index conditions of the scan, as in a read by instrument id.
-- The branch's interval is then a constant of its own; no VALUES list to join.  What planning
-- still costs is PostgreSQL pulling up the six branches (0.05-0.1 ms each, growing with the
-- size of their trees): the joins are written with commas, not JOIN ... ON, which would add
-- a join entry listing every column of both tables to each branch (up to 0.1 ms less
-- planning, measured).
CREATE VIEW compat_algotrading.market_data AS
SELECT k.data_id, k.symbol, k."timestamp", k.price AS open, k.price AS high, k.price AS low,
       k.price AS close, k.volume, k.oi, 'tick'::text AS "interval", k.tick_data,
       NULL::timestamptz AS created_at
FROM (SELECT md5('ingestor:tick:' || t.instrument_id::text || ':'
                 || (extract(epoch FROM t.time) * 1000000)::bigint::text)::uuid AS data_id,
             i.symbol, t.time AS "timestamp", t.price, t.volume, t.oi::numeric AS oi,
             jsonb_build_object('quantity', t.quantity, 'volume', t.volume, 'oi', t.oi,
                                'bid_price', t.bid_price, 'bid_quantity', t.bid_quantity,
                                'ask_price', t.ask_price, 'ask_quantity', t.ask_quantity,
                                'exchange_time', t.exchange_time, 'exchange', t.exchange)
                 AS tick_data
      FROM tick_data t, instruments i
      WHERE i.id = t.instrument_id AND compat_algotrading.listed(i.exchange)
      ORDER BY NULL::int) AS k
UNION ALL
SELECT c.data_id, c.symbol, c."timestamp", c.open, c.high, c.low, c.close, c.volume, c.oi,
       '1min'::text, NULL::jsonb, NULL::timestamptz
FROM (SELECT md5('ingestor:candle:1m:' || c.instrument_id::text || ':'
                 || (extract(epoch FROM c.time) * 1000000)::bigint::text)::uuid AS data_id,
             i.symbol, c.time AS "timestamp", c.open_price AS open, c.high_price AS high,
             c.low_price AS low, c.close_price AS close, c.volume,
             c.open_interest::numeric AS oi
      FROM ohlc_candles c, instruments i
      WHERE i.id = c.instrument_id AND c.timeframe = '1m' AND compat_algotrading.listed(i.exchange)
      ORDER BY NULL::int) AS c
UNION ALL
SELECT c.data_id, c.symbol, c."timestamp", c.open, c.high, c.low, c.close, c.volume, c.oi,
       '5min'::text, NULL::jsonb, NULL::timestamptz
FROM (SELECT md5('ingestor:candle:5m:' || c.instrument_id::text || ':'
                 || (extract(epoch FROM c.time) * 1000000)::bigint::text)::uuid AS data_id,
             i.symbol, c.time AS "timestamp", c.open_price AS open, c.high_price AS high,
             c.low_price AS low, c.close_price AS close, c.volume,
             c.open_interest::numeric AS oi
      FROM ohlc_candles c, instruments i
      WHERE i.id = c.instrument_id AND c.timeframe = '5m' AND compat_algotrading.listed(i.exchange)
      ORDER BY NULL::int) AS c
UNION ALL
SELECT c.data_id, c.symbol, c."timestamp", c.open, c.high, c.low, c.close, c.volume, c.oi,
       '15min'::text, NULL::jsonb, NULL::timestamptz
FROM (SELECT md5('ingestor:candle:15m:' || c.instrument_id::text || ':'
                 || (extract(epoch FROM c.time) * 1000000)::bigint::text)::uuid AS data_id,
             i.symbol, c.time AS "timestamp", c.open_price AS open, c.high_price AS high,
             c.low_price AS low, c.close_price AS close, c.volume,
             c.open_interest::numeric AS oi
      FROM ohlc_candles c, instruments i
      WHERE i.id = c.instrument_id AND c.timeframe = '15m' AND compat_algotrading.listed(i.exchange)
      ORDER BY NULL::int) AS c
UNION ALL
SELECT c.data_id, c.symbol, c."timestamp", c.open, c.high, c.low, c.close, c.volume, c.oi,
       '1hour'::text, NULL::jsonb, NULL::timestamptz
FROM (SELECT md5('ingestor:candle:1h:' || c.instrument_id::text || ':'
                 || (extract(epoch FROM c.time) * 1000000)::bigint::text)::uuid AS data_id,
             i.symbol, c.time AS "timestamp", c.open_price AS open, c.high_price AS high,
             c.low_price AS low, c.close_price AS close, c.volume,
             c.open_interest::numeric AS oi
      FROM ohlc_candles c, instruments i
      WHERE i.id = c.instrument_id AND c.timeframe = '1h' AND compat_algotrading.listed(i.exchange)
      ORDER BY NULL::int) AS c
UNION ALL
SELECT c.data_id, c.symbol, c."timestamp", c.open, c.high, c.low, c.close, c.volume, c.oi,
       '1day'::text, NULL::jsonb, NULL::timestamptz
FROM (SELECT md5('ingestor:candle:1d:' || c.instrument_id::text || ':'
                 || (extract(epoch FROM c.time) * 1000000)::bigint::text)::uuid AS data_id,
             i.symbol, c.time AS "timestamp", c.open_price AS open, c.high_price AS high,
             c.low_price AS low, c.close_price AS close, c.volume,
             c.open_interest::numeric AS oi
      FROM ohlc_candles c, instruments i
      WHERE i.id = c.instrument_id AND c.timeframe = '1d' AND compat_algotrading.listed(i.exchange)
      ORDER BY NULL::int) AS c;

-- ---------------------------------------------------------------------------------------------
-- trades (seed: trade_id, strategy_id, broker_id, symbol, exchange, instrument_type,
-- order_type, transaction_type, quantity, price, trigger_price, stoploss, target, status,
-- order_id, parent_order_id, order_timestamp, execution_timestamp, average_price,
-- filled_quantity, metadata, created_at, updated_at): one row per order.
--   trade_id        <- orders.id (already a uuid)
--   strategy_id     <- md5('ingestor:strategy:' || orders.strategy_id)::uuid
--   broker_id       <- md5('ingestor:broker:kite')::uuid: every order today comes from Kite
--                      postbacks (orders has no broker column)
--   symbol          <- instruments.symbol; exchange <- instruments.exchange
--   instrument_type <- instruments.instrument_type (Kite's EQ, FUT, CE, PE, ...)
--   order_type, transaction_type, quantity, price, trigger_price, parent_order_id,
--   order_timestamp, average_price, filled_quantity, created_at, updated_at
--                   <- the same-named orders columns (Kite's order types are the seed's)
--   stoploss, target <- no source (bracket legs are orders of their own): null
--   status          <- COMPLETE FILLED; OPEN with fills PARTIALLY_FILLED, else OPEN;
--                      CANCELLED, REJECTED as stored; any other Kite status PENDING
--   order_id        <- orders.broker_order_id
--   execution_timestamp <- orders.executed_at (set when the order completes)
--   metadata        <- orders.last_postback (the last postback as received)
CREATE VIEW compat_algotrading.trades WITH (security_barrier) AS
SELECT o.id AS trade_id,
       md5('ingestor:strategy:' || o.strategy_id)::uuid AS strategy_id,
       md5('ingestor:broker:kite')::uuid AS broker_id,
       i.symbol,
       i.exchange,
       i.instrument_type,
       o.order_type,
       o.transaction_type,
       o.quantity,
       o.price,
       o.trigger_price,
       NULL::numeric AS stoploss,
       NULL::numeric AS target,
       CASE WHEN o.current_status = 'COMPLETE' THEN 'FILLED'
            WHEN o.current_status = 'OPEN' AND o.filled_quantity > 0 THEN 'PARTIALLY_FILLED'
            WHEN o.current_status IN ('OPEN', 'CANCELLED', 'REJECTED') THEN o.current_status
            ELSE 'PENDING' END AS status,
       o.broker_order_id AS order_id,
       o.parent_order_id,
       o.order_timestamp,
       o.executed_at AS execution_timestamp,
       o.average_price,
       o.filled_quantity,
       o.last_postback AS metadata,
       o.created_at,
       o.updated_at
FROM orders o
JOIN instruments i ON i.id = o.instrument_id
WHERE compat_algotrading.listed(i.exchange)
  AND compat_algotrading.account_ok(o.placed_by);

-- ---------------------------------------------------------------------------------------------
-- positions (seed: position_id, trade_id, user_id, symbol, exchange, instrument_type,
-- quantity, average_price, current_price, unrealized_pnl, realized_pnl, status, opened_at,
-- closed_at, metadata, created_at, updated_at).  Open and closed ones, one row per ingestor
-- position (per strategy and instrument, average-cost method).
--   position_id     <- md5('ingestor:position:' || positions.id)::uuid
--   trade_id        <- the order of the fill that opened it (the execution of the same
--                      strategy and instrument at opened_at; the lowest id if several)
--   user_id         <- md5('ingestor:account:' || that order's placed_by)::uuid
--   symbol, exchange, instrument_type <- instruments
--   quantity        <- positions.quantity (signed: negative is short; 0 once CLOSED)
--   average_price   <- positions.average_entry_price
--   current_price, unrealized_pnl, realized_pnl, status ('OPEN'/'CLOSED'), opened_at,
--   closed_at, updated_at <- the same-named positions columns
--   metadata        <- no source: null
--   created_at      <- positions.opened_at
CREATE VIEW compat_algotrading.positions WITH (security_barrier) AS
SELECT md5('ingestor:position:' || p.id::text)::uuid AS position_id,
       (SELECT e.order_id FROM executions e
         WHERE e.strategy_id = p.strategy_id AND e.instrument_id = p.instrument_id
           AND e.time = p.opened_at
         ORDER BY e.id LIMIT 1) AS trade_id,
       (SELECT md5('ingestor:account:' || o.placed_by)::uuid
          FROM executions e JOIN orders o ON o.id = e.order_id
         WHERE e.strategy_id = p.strategy_id AND e.instrument_id = p.instrument_id
           AND e.time = p.opened_at
         ORDER BY e.id LIMIT 1) AS user_id,
       i.symbol,
       i.exchange,
       i.instrument_type,
       p.quantity,
       p.average_entry_price AS average_price,
       p.current_price,
       p.unrealized_pnl,
       p.realized_pnl,
       p.status,
       p.opened_at,
       p.closed_at,
       NULL::jsonb AS metadata,
       p.opened_at AS created_at,
       p.updated_at
FROM positions p
JOIN instruments i ON i.id = p.instrument_id
WHERE compat_algotrading.listed(i.exchange)
  AND compat_algotrading.account_ok((SELECT o.placed_by FROM executions e JOIN orders o ON o.id = e.order_id
                          WHERE e.strategy_id = p.strategy_id AND e.instrument_id = p.instrument_id
                            AND e.time = p.opened_at
                          ORDER BY e.id LIMIT 1));

-- ---------------------------------------------------------------------------------------------
-- position_history (seed: history_id, position_id, price, quantity, pnl, action, timestamp):
-- one row per fill per position it changed, derived from executions.  A position is a
-- stretch of fills of one (strategy, instrument) over which the net quantity keeps its sign
-- (ingestor's positions, average-cost method, in executions.id order: the order fills were
-- applied in).  `before` is the net quantity before the fill (running sum of the signed
-- fills), `after` the net after it.
--   history_id  <- md5('ingestor:position_history:' || executions.id || ':' || part)::uuid
--                  (part 1, or 2 for the opening half of a fill through zero)
--   position_id <- md5('ingestor:position:' || positions.id)::uuid of the position it
--                  changed: the k-th position of the (strategy, instrument) pair by id for
--                  the fill that leaves the k-th stretch open or closes it
--   price       <- executions.price; timestamp <- executions.time
--   quantity    <- the fill's quantity applied to this position (a fill through zero is two
--                  rows: |before| closes the old position, |after| opens the new one)
--   action      <- before = 0 OPEN; after = 0 CLOSE; through zero CLOSE then OPEN; |after| >
--                  |before| INCREASE; else DECREASE
--   pnl         <- no source per fill (ingestor accumulates realized_pnl on the position, with
--                  its average rounded at each fill; a recomputation here could differ in the
--                  last decimals): null.  positions.realized_pnl is the sum.
CREATE VIEW compat_algotrading.position_history WITH (security_barrier) AS
WITH f AS (
    SELECT e.id, e.strategy_id, e.instrument_id, e.time, e.price, o.placed_by,
           CASE e.transaction_type WHEN 'BUY' THEN e.quantity ELSE -e.quantity END AS q,
           coalesce(sum(CASE e.transaction_type WHEN 'BUY' THEN e.quantity ELSE -e.quantity END)
                    OVER (PARTITION BY e.strategy_id, e.instrument_id ORDER BY e.id
                          ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
    FROM executions e
    JOIN orders o ON o.id = e.order_id
), g AS (
    SELECT f.*, f.before + f.q AS after,
           (f.before <> 0 AND f.before + f.q <> 0
            AND sign(f.before + f.q) <> sign(f.before)) AS flip,
           -- the stretch this fill leaves open (a fill reaching zero: the one it closes)
           sum(CASE WHEN f.before = 0 OR (f.before + f.q <> 0
                                          AND sign(f.before + f.q) <> sign(f.before))
                    THEN 1 ELSE 0 END)
               OVER (PARTITION BY f.strategy_id, f.instrument_id ORDER BY f.id) AS stretch
    FROM f
), p AS (
    SELECT id, strategy_id, instrument_id,
           row_number() OVER (PARTITION BY strategy_id, instrument_id ORDER BY id) AS stretch
    FROM positions
)
SELECT md5('ingestor:position_history:' || g.id::text || ':' || r.part::text)::uuid
           AS history_id,
       md5('ingestor:position:' || p.id::text)::uuid AS position_id,
       g.price,
       r.quantity,
       NULL::numeric AS pnl,
       r.action,
       g.time AS "timestamp"
FROM g
CROSS JOIN LATERAL (VALUES
    (1, CASE WHEN g.flip THEN g.stretch - 1 ELSE g.stretch END,
        CASE WHEN g.flip THEN abs(g.before) ELSE abs(g.q) END,
        CASE WHEN g.before = 0 THEN 'OPEN'
             WHEN g.after = 0 OR g.flip THEN 'CLOSE'
             WHEN abs(g.after) > abs(g.before) THEN 'INCREASE'
             ELSE 'DECREASE' END),
    (2, g.stretch, abs(g.after), 'OPEN')) AS r(part, stretch, quantity, action)
JOIN p ON p.strategy_id = g.strategy_id AND p.instrument_id = g.instrument_id
      AND p.stretch = r.stretch
JOIN instruments i ON i.id = g.instrument_id
WHERE (r.part = 1 OR g.flip)
  AND compat_algotrading.listed(i.exchange)
  AND compat_algotrading.account_ok(g.placed_by);
