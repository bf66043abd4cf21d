-- 0002 orders: strategies, orders, order_history, executions, positions.
--
-- Written transactionally from Kite order postbacks (issue "Orders, fills and positions").
-- Services read these to know what the strategies hold, so here correctness beats ingest
-- cost: volumes are orders per day, not ticks per second, and every constraint below is a
-- guard a bug in the postback handler would otherwise get past silently.  They stay plain
-- tables on TimescaleDB (a unique key on a hypertable must include its time column, and
-- broker_order_id is unique on its own).
--
-- Names follow reference 000 with Kite's names where the base schema's are reversed:
-- orders.transaction_type is BUY/SELL and orders.order_type is MARKET/LIMIT/SL/SL-M
-- (reference 000 had them the other way round; reference 003 and Kite agree with this).
--
-- Numerics.  Prices the broker sends (price, trigger_price, average_price) are NUMERIC(18,7),
-- like market data.  Derived values (a fill's price from the change of average_price x
-- filled_quantity, an average entry price, P&L) are unconstrained NUMERIC: a derived average
-- has more decimals than any divisor, and rounding it to a column scale would make positions
-- differ from a recomputation over executions.

-- ---------------------------------------------------------------------------------------------
-- strategies: the order's tag names its strategy; unknown tags are registered automatically
-- (class_name is therefore nullable, unlike reference 000: an auto-registered strategy has
-- no class this project knows).
CREATE TABLE strategies (
    id             text PRIMARY KEY,
    name           text        NOT NULL,
    description    text,
    class_name     text,
    config         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    is_enabled     boolean     NOT NULL DEFAULT false,
    execution_mode text        NOT NULL DEFAULT 'PAPER',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT strategies_execution_mode_check CHECK (execution_mode IN ('LIVE', 'PAPER'))
);
-- No indexes on is_enabled / execution_mode (reference 000 has them): a table of a handful of
-- rows is read whole.

-- ---------------------------------------------------------------------------------------------
-- orders: one row per broker order, upserted by broker_order_id from each postback.
CREATE TABLE orders (
    id                        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- the upsert key (ON CONFLICT (broker_order_id)); also the lookup services use with the
    -- broker's id from their own order placement
    broker_order_id           text          NOT NULL,
    exchange_order_id         text,
    parent_order_id           text,
    strategy_id               text          NOT NULL REFERENCES strategies (id),
    -- FK: an order must name a registered instrument (unknown tokens are registered first)
    instrument_id             integer       NOT NULL REFERENCES instruments (id),
    exchange                  text,
    tradingsymbol             text,
    transaction_type          text          NOT NULL,
    order_type                text          NOT NULL,
    product                   text,
    variety                   text,
    validity                  text,
    quantity                  bigint        NOT NULL,
    disclosed_quantity        bigint,
    price                     numeric(18,7),
    trigger_price             numeric(18,7),
    filled_quantity           bigint        NOT NULL DEFAULT 0,
    pending_quantity          bigint,
    cancelled_quantity        bigint,
    average_price             numeric(18,7),
    current_status            text          NOT NULL,
    status_message            text,
    tag                       text,
    placed_by                 text,
    order_timestamp           timestamptz,
    -- with filled_quantity, what orders postbacks: an older postback (earlier exchange update,
    -- fewer fills) must not move an order back
    exchange_update_timestamp timestamptz,
    exchange_timestamp        timestamptz,
    -- the last postback as received, for audit and for fields this table does not model
    last_postback             jsonb,
    created_at                timestamptz   NOT NULL DEFAULT now(),
    updated_at                timestamptz   NOT NULL DEFAULT now(),
    executed_at               timestamptz,
    cancelled_at              timestamptz,
    CONSTRAINT orders_broker_order_id_key UNIQUE (broker_order_id),
    -- BUY/SELL is the whole domain; anything else would corrupt position signs.
    CONSTRAINT orders_transaction_type_check CHECK (transaction_type IN ('BUY', 'SELL')),
    -- Quantities: never negative, and never more filled than ordered (a fill derived from a
    -- garbled postback would otherwise reach positions).
    CONSTRAINT orders_quantities_check CHECK (
        quantity >= 0 AND filled_quantity >= 0 AND filled_quantity <= quantity
        AND coalesce(pending_quantity, 0) >= 0 AND coalesce(cancelled_quantity, 0) >= 0)
    -- order_type and current_status are not CHECKed: Kite's set of statuses is open-ended
    -- (TRIGGER PENDING, AMO REQ RECEIVED, MODIFY PENDING, ...), and a postback the daemon
    -- cannot store would be worse than an unfamiliar value; the postback decoder validates
    -- the documented order types.
);
-- Services: "orders of strategy S, newest first".
CREATE INDEX orders_strategy_created_idx ON orders (strategy_id, created_at DESC);
-- Services and the daemon at start: "orders still working".  Partial: terminal orders (the
-- vast majority by end of day) are not in it, so it stays tiny.
CREATE INDEX orders_open_idx ON orders (current_status)
    WHERE current_status NOT IN ('COMPLETE', 'CANCELLED', 'REJECTED');

-- ---------------------------------------------------------------------------------------------
-- order_history: one row per status change of an order (appended in the postback's
-- transaction when the status differs from the stored one).
CREATE TABLE order_history (
    id              bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    order_id        uuid        NOT NULL REFERENCES orders (id),
    status          text        NOT NULL,
    "timestamp"     timestamptz NOT NULL DEFAULT now(),   -- reference 000's name
    filled_quantity bigint,
    average_price   numeric(18,7),
    details         jsonb
);
-- "history of order O" (and the FK's own lookups when an order row is touched).
CREATE INDEX order_history_order_idx ON order_history (order_id, "timestamp");

-- ---------------------------------------------------------------------------------------------
-- executions: fills derived from the increase of an order's filled_quantity.
CREATE TABLE executions (
    id                    bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    order_id              uuid        NOT NULL REFERENCES orders (id),
    strategy_id           text        NOT NULL REFERENCES strategies (id),
    instrument_id         integer     NOT NULL REFERENCES instruments (id),
    transaction_type      text        NOT NULL,
    quantity              bigint      NOT NULL,
    price                 numeric     NOT NULL,   -- derived: unconstrained scale
    time                  timestamptz NOT NULL,
    -- the order's filled_quantity after this fill.  Unique per order: a fill is identified by
    -- where it leaves the order, so a duplicated or replayed postback cannot insert the same
    -- fill twice (ON CONFLICT DO NOTHING), whatever the handler's bookkeeping.
    filled_quantity_after bigint      NOT NULL,
    CONSTRAINT executions_order_fill_key UNIQUE (order_id, filled_quantity_after),
    CONSTRAINT executions_transaction_type_check CHECK (transaction_type IN ('BUY', 'SELL')),
    CONSTRAINT executions_quantity_check CHECK (quantity > 0 AND filled_quantity_after >= quantity)
);
-- "fills of strategy S on instrument I in time order": recomputing a position from its fills.
CREATE INDEX executions_strategy_instrument_time_idx
    ON executions (strategy_id, instrument_id, time);

-- ---------------------------------------------------------------------------------------------
-- positions: per (strategy, instrument), average-cost method.  At most one OPEN row per
-- pair; a position brought to zero is CLOSED and a fill through zero opens a new row.
CREATE TABLE positions (
    id                  bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    strategy_id         text        NOT NULL REFERENCES strategies (id),
    instrument_id       integer     NOT NULL REFERENCES instruments (id),
    quantity            bigint      NOT NULL,            -- signed: negative is short
    average_entry_price numeric     NOT NULL DEFAULT 0,
    current_price       numeric(18,7),                   -- marked to market at a cadence
    unrealized_pnl      numeric,
    realized_pnl        numeric     NOT NULL DEFAULT 0,
    status              text        NOT NULL DEFAULT 'OPEN',
    opened_at           timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    closed_at           timestamptz,
    CONSTRAINT positions_status_check CHECK (status IN ('OPEN', 'CLOSED')),
    -- OPEN exactly when it holds something: a flat OPEN row or a CLOSED row that still holds
    -- quantity would both be read wrongly by services.
    CONSTRAINT positions_open_iff_nonzero_check CHECK ((status = 'OPEN') = (quantity <> 0)),
    CONSTRAINT positions_closed_at_check CHECK ((status = 'CLOSED') = (closed_at IS NOT NULL))
);
-- At most one open position per (strategy, instrument); also the lookup of the postback
-- handler and of the mark-to-market statement.
CREATE UNIQUE INDEX positions_open_key ON positions (strategy_id, instrument_id)
    WHERE status = 'OPEN';
