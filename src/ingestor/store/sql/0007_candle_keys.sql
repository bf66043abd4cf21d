-- 0007 candle keys: the sub-minute candles are written once, without a B-tree entry each.
--
-- Why.  The 1s and 5s candles are 420,116 of the 437,712 candles a 1M-tick, 400-instrument
-- replay writes, and their rows in the key (instrument_id, timeframe, time) were half of the
-- server's work for that replay: COPYing replay's closed candles into ohlc_candles on
-- TimescaleDB 2.28 (one transaction per flush, one connection, medians of 3) took 1.27 s
-- with that key on every row, 0.60 s with it on the other timeframes only, 0.72 s with the
-- BRIN index below added (0.53 s with no index at all).  Keying the sub-minute candles by
-- time instead (their inserts then append at the index's right end) still took 0.94 s.
--
-- What holds without the key.  A 1s or 5s candle is stored once, when it closes: the engine
-- closes each (instrument, timeframe, bucket) once along a stream, and a batch's rows commit
-- with its stream offset, so a retried or replayed batch is skipped (the same guarantee as
-- tick_data's, sql/0005 and ingestor.store.timescale).  The few stored in another version
-- first -- the forming candles a stop or the end of a capture wrote, closed after the stream
-- resumed; a backfill's recomputed buckets; forming ones, were pipeline.open_candles_from
-- set below a minute -- are replaced, never upserted: deleted by key, found through the BRIN
-- index within their time span, then inserted (ingestor.store.candle_sql.apply_staged).  The
-- other timeframes keep a unique key: their forming candles are upserted by it
-- (ON CONFLICT ... WHERE timeframe NOT IN ('1s', '5s')), as before.
--
-- What readers keep.  Every read of a minute or longer timeframe is served as before (the
-- key leads with the instrument).  A 1s or 5s read of one instrument finds its rows by time
-- (BRIN: the block ranges of the span) and filters the instrument: fine for the last minutes,
-- slow for a whole day while the day is written (README, "Reads"); on TimescaleDB a chunk in
-- the columnstore is segmented by (instrument_id, timeframe), so the days before are fast.
-- A deployment that reads sub-minute candles of one instrument over hours can add
--     CREATE INDEX ON ohlc_candles (instrument_id, timeframe, time) WHERE timeframe IN ('1s', '5s');
-- and pays the old cost per row at ingest; nothing in the writer depends on its absence.
--
-- Lock.  The key is rebuilt and the BRIN index built inside this migration's transaction:
-- writes to ohlc_candles wait until both are built (minutes for some hundred million rows).
-- Run `ingestor migrate` outside market hours on a large database (it warns first when the
-- table holds over a million rows); the daemon refuses to start on a schema that is not
-- current, so nothing writes in between.
--
-- ingestor: locks ohlc_candles

ALTER TABLE ohlc_candles DROP CONSTRAINT ohlc_candles_pkey;

CREATE UNIQUE INDEX ohlc_candles_key ON ohlc_candles (instrument_id, timeframe, time)
    WHERE timeframe NOT IN ('1s', '5s');

-- autosummarize: a block range is summarized once it fills (by autovacuum); the ranges not
-- summarized yet, the newest, are always read.
CREATE INDEX ohlc_candles_fast_time_idx ON ohlc_candles USING brin (time)
    WITH (autosummarize = on) WHERE timeframe IN ('1s', '5s');

COMMENT ON TABLE ohlc_candles IS
    'OHLCV candles per instrument and timeframe; open candles are upserted while they form. '
    '1s and 5s candles are written once, when they close (unique by construction: sql/0007).';
