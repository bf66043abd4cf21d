-- 0004 engine state: what the aggregation engine needs to continue exactly, committed with each
-- batch, so a restart reads it in O(instruments) instead of re-aggregating the day's ticks.
--
-- Why.  A restart used to seed the engine by recomputing every instrument's forming candles
-- from tick_data in SQL (about a minute after a 20M-tick day, and a second copy of the candle
-- definition), and could not recover the order-book snapshot state at all: the open
-- interval's book was lost when a run stopped without its final flush (an interrupted replay
-- wrote fewer snapshots than a clean one) and written twice when a run flushed it and the next
-- one continued the interval (more).  Now each batch upserts, in its own transaction, the
-- state of the instruments it touched, so the state in the database is that of the committed
-- offset and resuming there continues exactly (ticks, candles and snapshots as one run).
--
-- Cost.  One row per instrument a batch touched, not per tick: COPY into a temporary staging
-- table, then one INSERT ... ON CONFLICT (instrument_id) DO UPDATE, inside the batch's
-- transaction (so no extra commit or fsync).  Measured (release build, a 2-core machine shared
-- with other jobs, load average ~6): 500 instruments' rows (360 kB) 5.3 ms median in the
-- transaction (COPY ~1-2 ms, the upsert the rest: ~7 us per row, a third of it from the
-- row's size), 50 rows 1.3 ms; the engine's take_state + encode for 500 instruments 0.13 ms.
-- End to end, the same precomputed batches of a 300k-tick, 500-instrument replay written with
-- and without their state rows, alternately: 5.02 s against 5.00 s (+2.5 ms per 50k-tick
-- batch, +0.5%, within the run-to-run spread).  A live batch touches only the instruments
-- that ticked in its 0.2 s.  Start-up reads the table in one query: bench/bench_startup.py,
-- 3,000 instruments after a 20M-tick day, 0.32 s (the SQL over tick_data it replaces: 8.3 s
-- on that synthetic day, about a minute on a real one).
-- ---------------------------------------------------------------------------------------------
-- engine_state: one row per instrument with ticks.
CREATE TABLE engine_state (
    -- Not a foreign key: the writer upserts this table in every batch and instruments are
    -- never deleted while their ticks exist (tick_data has no foreign key either).
    instrument_id integer     PRIMARY KEY,   -- the upsert's conflict target; start-up reads all
    -- the stream and sequence number of the batch that wrote the row (inspection: which
    -- connection or capture last moved this instrument)
    -- Start-up trusts a row only while stream_offsets still commits that stream this far (else
    -- the offsets were reset to ingest again, and the instrument is recomputed from tick_data):
    -- a stream's offset row must outlive the state rows that name it.
    stream        text        NOT NULL,
    last_seq      bigint      NOT NULL,
    -- the instrument's last tick_data.time and cumulative volume (NULL: no tick carried one),
    -- also inside state; kept as columns for people reading the table and for the fallback
    last_time     timestamptz NOT NULL,
    last_volume   bigint,
    -- The engine's record (ingestor._core.state_dtype, little-endian, version 1): a 160-byte
    -- head (version u16, timeframe count u16, flags u32: 1 has a volume, 2 the book is the
    -- open interval's pending snapshot, 4 flush() already wrote it; last time i64 us;
    -- instrument id i32; token u32; last volume u32; pad; the latest book as the engine's
    -- snapshot row) then each timeframe's length (i64 us) and its forming candle (64 bytes:
    -- bucket start i64, price x volume-increase sum as two u64 (exact, 128 bits), volume u64,
    -- open/high/low/close/count/oi u32, flags u32: 1 forming, 2 written out unchanged, 4 has
    -- an oi).  Opaque to SQL on purpose: it is exactly the engine's state, with no decimal
    -- round trip and no second definition of a candle.  About 700 bytes with 7 timeframes:
    -- stored inline (below the TOAST threshold).
    -- NULL: a row added below for an instrument with ticks from before this migration; the
    -- start-up recomputes that one from tick_data once and the next batch writes its state.
    state         bytea,
    updated_at    timestamptz NOT NULL DEFAULT now()
)
-- Every row is rewritten by the batches that touch its instrument (several times a second for
-- a busy one): free space on each page lets those updates stay HOT (no index is updated; the
-- only index is the key, which never changes), and autovacuum keeps up with the dead versions.
WITH (fillfactor = 50);

-- Instruments with ticks from before this migration: their last time and volume, state NULL
-- (see above).  One backward probe of the (instrument_id, time) key per instrument.
INSERT INTO engine_state (instrument_id, stream, last_seq, last_time, last_volume, state)
SELECT i.id, '', -1, t.time, v.volume, NULL
FROM instruments i
CROSS JOIN LATERAL (SELECT time FROM tick_data
                    WHERE instrument_id = i.id ORDER BY time DESC LIMIT 1) t
LEFT JOIN LATERAL (SELECT volume FROM tick_data
                   WHERE instrument_id = i.id AND volume IS NOT NULL
                   ORDER BY time DESC LIMIT 1) v ON true;
