-- 0005 storage: one key per candle and snapshot table, leading with the instrument.
--
-- Why.  With tick_data written straight into the columnstore (TimescaleDB) the candles became
-- the largest cost of a flush: a replay of 1M ticks over 400 instruments writes 437,712
-- candles (the 1s and 5s timeframes are most of them), and each candle row paid two B-trees,
-- the key (time, instrument_id, timeframe) and the readers' (instrument_id, timeframe, time
-- DESC).  The readers' index can be the key: a unique index is the same constraint whatever
-- its column order, so ON CONFLICT (time, instrument_id, timeframe) still infers it, and
-- (instrument_id, timeframe, time) serves every candle read services make: one instrument's
-- candles of a timeframe over a range (forwards or backwards), its latest candle, and the
-- upsert's probe.  Nothing reads candles by time across instruments.  Measured: the candles of
-- that replay COPYed into a 1-day-chunk hypertable (binary, one transaction per flush, the
-- same server, two rounds): 89k-136k rows/s with the two indexes, 167k-169k with the one key;
-- 550k-580k with none, which the upserts of forming candles rule out.  The same holds for
-- order_book_snapshots: "the latest book of instrument X" and "X's book at t" are both
-- served by (instrument_id, time); nothing reads books by time alone.
--
-- tick_data keeps its key on plain PostgreSQL: it is the one index readers need (instrument
-- over a time range, its latest tick) and a unique B-tree costs no more to maintain than a
-- plain one on the same columns.  On TimescaleDB the key goes (see ingestor.store.timescale:
-- the columnstore's direct COPY refuses a unique index), replaced by a plain index for the
-- rowstore chunks.
--
-- Lock.  Each table's key is rebuilt inside this migration's transaction: writes to the
-- table wait until its new index is built (minutes for a table of some hundred million rows).
-- Run `ingestor migrate` outside market hours on a large database; the daemon refuses to start
-- on a schema that is not current, so nothing writes in between.

ALTER TABLE ohlc_candles DROP CONSTRAINT ohlc_candles_pkey;
DROP INDEX ohlc_candles_instrument_timeframe_time_idx;
ALTER TABLE ohlc_candles
    ADD CONSTRAINT ohlc_candles_pkey PRIMARY KEY (instrument_id, timeframe, time);

ALTER TABLE order_book_snapshots DROP CONSTRAINT order_book_snapshots_pkey;
DROP INDEX order_book_snapshots_instrument_time_idx;
ALTER TABLE order_book_snapshots
    ADD CONSTRAINT order_book_snapshots_pkey PRIMARY KEY (instrument_id, time);
