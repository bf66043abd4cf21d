"""Database side of ingestor: migrations, TimescaleDB set-up, roles, instruments, offsets."""
