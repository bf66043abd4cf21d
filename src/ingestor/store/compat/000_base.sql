-- compat 000: what every compatibility schema needs on ingestor's own tables.
--
-- Run (by ingestor.store.compat) with search_path set to the schema of ingestor's tables,
-- before any of 001-004; dropped again when the last compatibility schema is.  Both indexes
-- are on instruments, which is low volume (the daily dump, tokens first seen on the feed):
-- they cost nothing at tick ingest.

-- Per-symbol reads.  The seeds key market data by bare symbol (WHERE symbol = 'RELIANCE');
-- ingestor's unique (exchange, symbol) key leads with exchange and cannot serve that lookup,
-- so without this index every per-symbol read through a view would scan the instruments.
-- With it: index scan on instruments, then the time-series table's (instrument_id, ...) index.
CREATE INDEX IF NOT EXISTS instruments_compat_symbol_idx ON instruments (symbol);

-- Seeds 002 keys instruments by UUID (ohlcv_data.instrument_id = '<uuid>').  The UUID is
-- derived from ingestor's integer id (md5 of a namespace and the id, see docs/compat.md);
-- this expression index makes the reverse lookup (uuid -> id) an index scan.  The expression
-- must stay exactly the one the views use (text || text: immutable; 'x' || integer is not).
CREATE INDEX IF NOT EXISTS instruments_compat_uuid_idx
    ON instruments ((md5('ingestor:instrument:' || id::text)::uuid));
