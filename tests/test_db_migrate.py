"""Migrations against a real PostgreSQL: order, idempotence, locking, no-transaction, tamper."""

from __future__ import annotations

import shutil
import threading
from importlib import resources
from pathlib import Path

import psycopg
import pytest

from ingestor.store import migrate as mig

SHIPPED_TABLES = {"instruments", "tick_data", "ohlc_candles", "order_book_snapshots",
                  "stream_offsets", "strategies", "orders", "order_history", "executions",
                  "positions", "feed_gaps", "postback_dead_letters", "schema_migrations"}


def _tables(conn) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}


def _copy_shipped(dst: Path) -> Path:
    src = resources.files("ingestor.store") / "sql"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.endswith(".sql"):
            (dst / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    return dst


def test_shipped_migrations_are_numbered_and_commented():
    ms = mig.discover()
    assert [m.version for m in ms] == list(range(1, len(ms) + 1))
    for m in ms:
        assert m.sql.lstrip().startswith("--"), f"{m.label} has no header comment"
        assert m.transactional


def test_migrate_applies_all_records_and_is_idempotent(fresh_db):
    with psycopg.connect(fresh_db) as conn:
        assert not mig.current(conn)
        applied = mig.migrate(conn)
        assert [m.label for m in applied] == [m.label for m in mig.discover()]
        assert SHIPPED_TABLES <= _tables(conn)
        rows = conn.execute(
            "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
        ).fetchall()
        assert [(v, n, c) for v, n, c, _ in rows] == [(m.version, m.name, m.checksum)
                                                     for m in mig.discover()]
        assert all(r[3] is not None for r in rows)
        assert mig.current(conn).current
        conn.commit()  # migrate() refuses to run inside the caller's transaction
        assert mig.migrate(conn) == []
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(rows)
        assert conn.autocommit is False  # restored


def test_concurrent_migrates_do_not_race(fresh_db, tmp_path):
    src = _copy_shipped(tmp_path / "sql")
    # a slow last migration widens the window in which an unlocked second runner would
    # also see everything pending and collide (duplicate tables / schema_migrations rows)
    (src / "0099_slow.sql").write_text("-- slow\nSELECT pg_sleep(0.5);\nCREATE TABLE slow (x int);\n")
    n = len(mig.discover(src))
    barrier = threading.Barrier(3)
    results, errors = [], []

    def runner():
        try:
            with psycopg.connect(fresh_db) as conn:
                barrier.wait()
                results.append([m.version for m in mig.migrate(conn, src)])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=runner) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    flat = sorted(v for r in results for v in r)
    assert flat == sorted(m.version for m in mig.discover(src))  # each applied exactly once
    assert sum(1 for r in results if r) == 1
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == n
        assert mig.current(conn, src)


def test_no_transaction_migration(fresh_db, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "0001_base.sql").write_text("-- base\nCREATE TABLE t (x int, note text);\n")
    (d / "0002_concurrent.sql").write_text(
        "-- builds an index without blocking writers\n"
        "-- ingestor: no-transaction\n"
        "DROP INDEX CONCURRENTLY IF EXISTS t_x_idx;\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_x_idx ON t (x);\n"
        "INSERT INTO t VALUES (1, 'semi;colon'), (2, $q$also;here$q$);\n"
        "DO $$ BEGIN PERFORM 1; PERFORM 2; END $$;\n"
        "/* a trailing comment; with a semicolon */\n")
    ms = mig.discover(d)
    assert [m.transactional for m in ms] == [True, False]
    with psycopg.connect(fresh_db) as conn:
        assert [m.version for m in mig.migrate(conn, d)] == [1, 2]
        valid = conn.execute("SELECT i.indisvalid FROM pg_index i "
                             "JOIN pg_class c ON c.oid = i.indexrelid "
                             "WHERE c.relname = 't_x_idx'").fetchone()
        assert valid == (True,)
        assert conn.execute("SELECT note FROM t ORDER BY x").fetchall() == [("semi;colon",),
                                                                           ("also;here",)]
        assert mig.current(conn, d)


def test_concurrent_index_without_marker_fails_and_leaves_nothing(fresh_db, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "0001_base.sql").write_text("-- base\nCREATE TABLE t (x int);\n")
    (d / "0002_bad.sql").write_text("-- no marker\nCREATE TABLE u (y int);\n"
                                    "CREATE INDEX CONCURRENTLY t_x_idx ON t (x);\n")
    with psycopg.connect(fresh_db) as conn:
        with pytest.raises(mig.MigrationError, match="0002_bad"):
            mig.migrate(conn, d)
        assert "t" in _tables(conn) and "u" not in _tables(conn)  # 0002 rolled back whole
        assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations")] == [1]
        status = mig.current(conn, d)
        assert not status and [m.version for m in status.pending] == [2]


def test_changed_checksum_is_refused(fresh_db, tmp_path):
    d = _copy_shipped(tmp_path / "sql")
    with psycopg.connect(fresh_db) as conn:
        mig.migrate(conn, d)
        f = d / "0002_orders.sql"
        f.write_text(f.read_text() + "\n-- an innocent-looking edit\n")
        status = mig.current(conn, d)
        assert not status and [m.label for m in status.changed] == ["0002_orders"]
        with pytest.raises(mig.MigrationError, match="0002_orders"):
            mig.migrate(conn, d)


def test_crlf_checkout_is_not_a_change():
    assert mig.checksum("a\r\nb\r\n") == mig.checksum("a\nb\n")


def test_unknown_applied_version_is_reported(fresh_db):
    with psycopg.connect(fresh_db) as conn:
        mig.migrate(conn)
        conn.execute("INSERT INTO schema_migrations (version, name, checksum) "
                     "VALUES (9999, 'from_the_future', 'x')")
        conn.commit()
        status = mig.current(conn)
        assert not status and status.unknown == [9999]
        assert "upgrade" in status.message
        with pytest.raises(mig.MigrationError):
            mig.migrate(conn)


def test_require_current_is_one_line(fresh_db):
    from ingestor.cli import Failure

    with psycopg.connect(fresh_db) as conn:
        with pytest.raises(Failure, match="ingestor migrate") as info:
            mig.require_current(conn)
        assert "\n" not in str(info.value)
        mig.migrate(conn)
        mig.require_current(conn)


def test_bad_file_names_and_duplicate_versions(tmp_path):
    (tmp_path / "0001_a.sql").write_text("--\n")
    (tmp_path / "0001_b.sql").write_text("--\n")
    with pytest.raises(mig.MigrationError, match="two migrations numbered 0001"):
        mig.discover(tmp_path)
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    (tmp_path / "1_a.sql").write_text("--\n")
    with pytest.raises(mig.MigrationError, match="NNNN_name"):
        mig.discover(tmp_path)


@pytest.mark.parametrize("text, expected", [
    ("select 1; select 2;", ["select 1", "select 2"]),
    ("select ';' ; select 'it''s;'", ["select ';'", "select 'it''s;'"]),
    ("select E'a\\';b'; select 2", ["select E'a\\';b'", "select 2"]),
    ('select 1 as "a;b"; select 2', ['select 1 as "a;b"', "select 2"]),
    ("do $$ begin perform 1; end $$; select 2", ["do $$ begin perform 1; end $$", "select 2"]),
    ("do $f$ x; $$ y; $f$; z", ["do $f$ x; $$ y; $f$", "z"]),
    ("select 1 -- c;\n; /* x; /* nested; */ y; */ select 2", ["select 1 -- c;",
                                                             "/* x; /* nested; */ y; */ select 2"]),
    ("-- only a comment;\n", []),
    ("select $1; select 2", ["select $1", "select 2"]),
])
def test_split_statements(text, expected):
    assert mig.split_statements(text) == expected


def test_a_migration_that_locks_a_large_table_says_so_first(fresh_db, tmp_path, caplog,
                                                             monkeypatch):
    """``-- ingestor: locks ...``: before such a migration runs, the tables it names that hold
    more rows than the threshold are named in a warning (a table that does not exist is not)."""
    import logging

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "0001_table.sql").write_text(
        "-- a table with rows\nCREATE TABLE big (x int);\n"
        "INSERT INTO big SELECT generate_series(1, 5000);\nANALYZE big;\n")
    (folder / "0002_index.sql").write_text(
        "-- an index built in the transaction\n-- ingestor: locks big, not_there\n"
        "CREATE INDEX ON big (x);\n")
    assert [m.locks for m in mig.discover(folder)] == [(), ("big", "not_there")]
    monkeypatch.setattr(mig, "LOCK_WARN_ROWS", 1_000)
    with psycopg.connect(fresh_db, autocommit=True) as conn, \
            caplog.at_level(logging.WARNING, logger="ingestor.store.migrate"):
        assert [m.version for m in mig.migrate(conn, folder)] == [1, 2]
    said = [r.getMessage() for r in caplog.records if "locked until it commits" in r.getMessage()]
    assert len(said) == 1
    assert said[0].startswith("migration 0002_index holds big (about 5,000 rows) locked")
    assert "not_there" not in said[0]
    # the shipped migration that rebuilds the candle key says which table it locks
    assert [m.locks for m in mig.discover() if m.version == 7] == [("ohlc_candles",)]


def _migrations_before(tmp_path, version: int):
    """A folder of the shipped migrations numbered below ``version``: an older schema."""
    from ingestor.store.migrate import discover

    folder = tmp_path / f"before-{version}"
    folder.mkdir()
    for m in discover():
        if m.version < version:
            (folder / f"{m.label}.sql").write_text(m.sql)
    return folder


def _old_rows(conn) -> None:
    """Rows of two days of 2024 in each time-series table (plain SQL: any schema version)."""
    conn.execute("INSERT INTO tick_data (time, instrument_id, exchange, price, volume) "
                 "SELECT timestamptz '2024-03-04 03:45+00' + g * INTERVAL '173 ms', g % 20 + 1, "
                 "'NSE', 100 + (g % 997) / 100.0, g FROM generate_series(1, 60000) g")
    conn.execute("INSERT INTO ohlc_candles (time, instrument_id, timeframe, open_price, "
                 "high_price, low_price, close_price, volume, trade_count) "
                 "SELECT timestamptz '2024-03-04 03:45+00' + (g / 20) * INTERVAL '1 minute', "
                 "g % 20 + 1, '1m', 1, 2, 0.5, 1.5, g, 3 FROM generate_series(1, 6000) g")
    conn.execute("INSERT INTO order_book_snapshots (time, instrument_id, bid_prices, "
                 "bid_quantities, bid_orders, ask_prices, ask_quantities, ask_orders) "
                 "SELECT timestamptz '2024-03-04 03:45+00' + (g / 20) * INTERVAL '1 s', "
                 "g % 20 + 1, '{1,2,3,4,5}', '{1,1,1,1,1}', '{1,1,1,1,1}', '{6,7,8,9,10}', "
                 "'{1,1,1,1,1}', '{1,1,1,1,1}' FROM generate_series(1, 8000) g")


def test_migration_0005_keeps_the_rows_of_an_older_schema(fresh_db, tmp_path):
    """A database of the schema before 0005, with rows: the candle and snapshot keys are
    rebuilt leading with the instrument, and every row stays."""
    import test_replay

    with psycopg.connect(fresh_db, autocommit=True) as conn:
        mig.migrate(conn, _migrations_before(tmp_path, 5))
        _old_rows(conn)
        before = test_replay._table_digest(conn)
        # up to 0005 exactly (later migrations are not this test's)
        assert [m.version for m in mig.migrate(conn, _migrations_before(tmp_path, 6))] == [5]
        assert test_replay._table_digest(conn) == before
        keys = dict(conn.execute(
            "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE contype = 'p' AND conrelid IN ('tick_data'::regclass, "
            "'ohlc_candles'::regclass, 'order_book_snapshots'::regclass)").fetchall())
        assert keys == {"tick_data": 'PRIMARY KEY (instrument_id, "time")',
                        "ohlc_candles": 'PRIMARY KEY (instrument_id, timeframe, "time")',
                        "order_book_snapshots": 'PRIMARY KEY (instrument_id, "time")'}
        # one index per table: the key
        assert conn.execute("SELECT count(*) FROM pg_indexes WHERE tablename IN "
                            "('tick_data', 'ohlc_candles', 'order_book_snapshots')"
                            ).fetchone()[0] == 3
        # the upsert's conflict target still infers the reordered key
        conn.execute("INSERT INTO ohlc_candles (time, instrument_id, timeframe, open_price, "
                     "high_price, low_price, close_price, volume, trade_count) VALUES "
                     "(timestamptz '2024-03-04 03:45+00', 1, '1m', 9, 9, 9, 9, 1, 1) "
                     "ON CONFLICT (time, instrument_id, timeframe) DO UPDATE SET "
                     "close_price = excluded.close_price")
