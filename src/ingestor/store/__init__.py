"""The database side: the writer (one transaction per batch), migrations and their SQL,
TimescaleDB set-up, roles, the instrument registry, stream offsets, DSN handling."""
