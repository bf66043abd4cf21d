-- 0006 broker-scoped instrument keys: Angel One SmartAPI (SmartStream) beside Kite; 20-level depth.
--
-- Kite names an instrument by a uint32 token whose low byte is its segment; Angel One by a
-- string of up to 25 characters scoped by an exchange type (1 nse_cm, 2 nse_fo, 3 bse_cm,
-- 4 bse_fo, 5 mcx_fo, 7 ncx_fo, 13 cde_fo), and its strings are mostly decimal numbers that
-- collide with Kite's tokens ("3045" on nse_cm is not Kite's token 3045).  So the registry's
-- key for Angel is (broker, exchange_type, broker_token).
--
-- The engine's key.  The compiled engine keys its per-instrument slots by a uint32 and reads
-- the price divisor from the key's low byte (Kite's segment rule); the state a restart
-- continues from (engine_state, ingestor.pipeline.state) is seeded by instruments.
-- instrument_token.  Rather than widen the engine's key (every slot, hash probe and state
-- record), an Angel instrument's instrument_token IS its engine key, assigned here once:
--     instrument_token = (n << 8) | segment code of its exchange type
-- (the Kite table's codes: nse_cm 1, nse_fo 2, bse_cm 4, bse_fo 5, mcx_fo 7, cde_fo 3 -- the
-- 10^7 currency divisor --, ncx_fo 14), n from instruments_angel_key_seq, counting DOWN from
-- 2^24 - 1.  Kite's keys are its tokens, whose upper 24 bits are exchange tokens (below ~1.1M
-- in every dump seen: the NSE/BSE/MCX scrip codes), so the two ranges do not meet for
-- millions of listings; and instrument_token stays UNIQUE across brokers, so if they ever
-- did, the second registration is refused (loudly: "could not register"), never merged
-- into the other broker's instrument.  Every connection, daemon and restart gets the same
-- key for a token (the daemon preloads them, and a token first met on the feed is
-- registered before its first tick is aggregated), so the state a restart reads back is
-- found under the same key.  The daemon's decoder maps (exchange type, token) to the key
-- (ingestor._core.SmartStreamDecoder); the engine, candles, snapshots, COPY and the writer
-- are the Kite ones, unchanged.
--
-- The same listing fed by two brokers (SBIN on NSE through Kite and through Angel) is TWO
-- instruments, one per broker.  tick_data's (time, instrument_id) is unique by construction
-- only within one stream (times strictly increase per instrument along a stream); two
-- brokers' streams of one instrument would interleave their times with nothing to order
-- them, and the brokers' ticks are not the same events (different conflation, different
-- timestamps).  Keeping them apart keeps the guarantee and lets a reader compare the two
-- feeds; a reader wanting "the" SBIN picks the broker.  So (exchange, symbol) is unique per
-- broker now: Angel's symbols (SBIN-EQ) mostly differ from Kite's (SBIN) but need not.
--
-- Costs: the new columns have constant defaults (no table rewrite); the CHECKs scan the
-- registry once (~10^5 rows); the unique index on (broker, exchange, symbol) replaces the one
-- on (exchange, symbol) and serves the same lookups (broker is the leading, two-valued
-- column, and every lookup names it or accepts both rows).

ALTER TABLE instruments
    -- which broker's feed names this instrument; every existing row is Kite's
    ADD COLUMN broker text NOT NULL DEFAULT 'kite',
    -- Angel: the SmartStream exchange type and the token string as the feed sends them
    ADD COLUMN exchange_type smallint,
    ADD COLUMN broker_token text;

ALTER TABLE instruments
    ADD CONSTRAINT instruments_broker_check CHECK (broker IN ('kite', 'angel')),
    -- a Kite row has no Angel key; an Angel row has a whole one, and an engine key whose low
    -- byte is its exchange type's segment code (what the decoder and the engine rely on)
    ADD CONSTRAINT instruments_broker_key_check CHECK (
        (broker = 'kite' AND exchange_type IS NULL AND broker_token IS NULL)
        OR (broker = 'angel'
            AND exchange_type IN (1, 2, 3, 4, 5, 7, 13)
            AND broker_token ~ '^[!-~]{1,25}$'
            AND instrument_token BETWEEN 256 AND 4294967295
            AND (instrument_token % 256) = CASE exchange_type
                WHEN 1 THEN 1 WHEN 2 THEN 2 WHEN 3 THEN 4 WHEN 4 THEN 5 WHEN 5 THEN 7
                WHEN 7 THEN 14 WHEN 13 THEN 3 END)),
    -- the Angel registry key: the instruments master load upserts by it, the feed's
    -- registration of unknown tokens keys on it (NULLs: Kite rows never conflict)
    ADD CONSTRAINT instruments_broker_token_key UNIQUE (broker, exchange_type, broker_token);

ALTER TABLE instruments DROP CONSTRAINT instruments_exchange_symbol_key;
ALTER TABLE instruments
    ADD CONSTRAINT instruments_broker_exchange_symbol_key UNIQUE (broker, exchange, symbol);

-- the upper 24 bits of Angel engine keys, from the top down (see above); only rows really
-- inserted draw from it (the loader inserts with an anti-join, not ON CONFLICT)
CREATE SEQUENCE instruments_angel_key_seq AS integer
    INCREMENT BY -1 MINVALUE 1 MAXVALUE 16777215 START WITH 16777215 NO CYCLE;

COMMENT ON COLUMN instruments.instrument_token IS
    'The engine key: Kite''s instrument token; for Angel One (n << 8) | segment code, '
    'assigned by the registry (0006_broker_keys.sql).';
COMMENT ON COLUMN instruments.broker_token IS
    'Angel One: the SmartStream token (with exchange_type, the broker''s key).';

-- ---------------------------------------------------------------------------------------------
-- order_book_depth20: SmartStream's DEPTH mode (20 buy and 20 sell levels, NSE cash only, at
-- most 50 tokens a session).  Its own table rather than 20-element arrays in
-- order_book_snapshots: every snapshot row of every other instrument and broker would carry
-- (or pad) 60 more array elements a side for the few instruments with 20 levels, and the
-- 5-level readers (reference schemas, compat views) would see a shape they do not expect.  A
-- DEPTH packet carries no trade price, so it is no tick row either: it is its own event,
-- timed by its receive time like a tick (strictly increasing per instrument within a
-- stream), and keyed like order_book_snapshots (instrument first: one instrument's book over
-- time is one range scan).  Arrays hold exactly 20 entries, empty levels as zeros, as the
-- snapshots' 5 do.  exchange_time: the packet's exchange timestamp word (the clients disagree
-- on which of its two words it is: see docs on Angel One in the README); NULL when 0.
CREATE TABLE order_book_depth20 (
    time           timestamptz     NOT NULL,
    instrument_id  integer         NOT NULL,
    bid_prices     numeric(18,7)[] NOT NULL,
    bid_quantities bigint[]        NOT NULL,
    bid_orders     integer[]       NOT NULL,
    ask_prices     numeric(18,7)[] NOT NULL,
    ask_quantities bigint[]        NOT NULL,
    ask_orders     integer[]       NOT NULL,
    exchange_time  timestamptz,
    CONSTRAINT order_book_depth20_pkey PRIMARY KEY (instrument_id, time),
    CONSTRAINT order_book_depth20_levels_check CHECK (
        cardinality(bid_prices) = 20 AND cardinality(bid_quantities) = 20
        AND cardinality(bid_orders) = 20 AND cardinality(ask_prices) = 20
        AND cardinality(ask_quantities) = 20 AND cardinality(ask_orders) = 20)
);

COMMENT ON TABLE order_book_depth20 IS
    'Angel One SmartStream DEPTH packets: 20 levels a side, apart from the 5-level '
    'order_book_snapshots (0006_broker_keys.sql).';
