"""``ingestor migrate`` / ``ingestor instruments load`` exit codes, DSN rules, TimescaleDB statements."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from conftest import VECTORS
from ingestor.cli import main
from ingestor.store import timescale as ts
from ingestor.store.dsn import describe, password_of, resolve_dsn

@pytest.fixture(autouse=True)
def _restore_logging():
    # cli.main() installs a handler on the (captured) stderr of the test that called it
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


# --------------------------------------------------------------------------------------------
# DSN resolution


def test_dsn_precedence():
    env = {"INGESTOR_DSN": "dbname=a", "DATABASE_URL": "postgresql:///b"}
    assert resolve_dsn("dbname=flag", environ=env) == "dbname=flag"
    assert resolve_dsn(None, environ=env) == "dbname=a"
    assert resolve_dsn(None, environ={"DATABASE_URL": "postgresql:///b"}) == "postgresql:///b"
    assert resolve_dsn(None, config_dsn="dbname=cfg", environ={}) == "dbname=cfg"
    assert resolve_dsn(None, environ={}) == ""  # libpq defaults


@pytest.mark.parametrize("dsn, pw", [
    ("postgresql://u:s3cretpw@h/db", "s3cretpw"),
    ("host=h password='s3 cret' dbname=d", "s3 cret"),
    ("postgresql://u:s3cretpw@[broken", "s3cretpw"),
    ("host=h dbname=d", None),
])
def test_password_of(dsn, pw):
    assert password_of(dsn) == pw


def test_describe_has_no_password():
    d = describe("postgresql://bob:hunter22@db.example:6543/market")
    assert d == "bob@db.example:6543/market" and "hunter22" not in d


# --------------------------------------------------------------------------------------------
# CLI


def _run(*argv, env=None):
    e = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("INGESTOR_DSN", "DATABASE_URL"):
        e.pop(k, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ingestor", *argv], capture_output=True,
                          text=True, env=e, timeout=60)


@pytest.mark.parametrize("dsn", [
    "postgresql://ingest:Sup3rSecretPw@127.0.0.1:1/market",       # nothing listens on port 1
    "host=127.0.0.1 port=1 user=ingest password=Sup3rSecretPw",
    "postgresql://ingest:Sup3rSecretPw@[::1",                      # malformed URI
])
def test_bad_dsn_is_one_line_exit_1_without_password(dsn):
    for how in (["--dsn", dsn], []):
        r = _run("migrate", *how, env=None if how else {"INGESTOR_DSN": dsn})
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ingestor: error:"), r.stderr
        assert "Sup3rSecretPw" not in r.stderr + r.stdout


def test_migrate_cli_then_check(fresh_db, capsys):
    assert main(["migrate", "--dsn", fresh_db, "--timescale", "auto"]) == 0
    out = capsys.readouterr().out
    assert "applied 0001_market_data" in out and "TimescaleDB not used" in out
    assert main(["migrate", "--dsn", fresh_db]) == 0
    assert "schema is current" in capsys.readouterr().out
    assert main(["migrate", "--dsn", fresh_db, "--check"]) == 0


def test_migrate_check_on_empty_database_exits_1(fresh_db, capsys):
    assert main(["migrate", "--dsn", fresh_db, "--check"]) == 1
    assert "run `ingestor migrate`" in capsys.readouterr().out


def test_timescale_on_without_timescaledb_fails(fresh_db, capsys):
    with psycopg.connect(fresh_db) as conn:
        if ts.detect(conn).available:
            pytest.skip("this server has TimescaleDB")
    assert main(["migrate", "--dsn", fresh_db, "--timescale", "on"]) == 1
    assert "not available" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--retention", "tick_data=30 days'; drop table x; --"],
    ["--chunk-interval", "nosuch_table=1 hour"],
    ["--chunk-interval", "off"],
    ["--roles", "--reader-role", "bad name"],
    ["--writer-role", "w"],
])
def test_migrate_bad_options_exit_2(argv, capsys):
    assert main(["migrate", "--dsn", "host=127.0.0.1 port=1", *argv]) == 2


def test_instruments_load_cli(fresh_db, tmp_path, capsys):
    dump = os.path.join(VECTORS, "instruments_nse.csv")
    assert main(["instruments", "load", dump, "--dsn", fresh_db]) == 1  # schema not migrated
    assert "ingestor migrate" in capsys.readouterr().err
    assert main(["migrate", "--dsn", fresh_db]) == 0
    capsys.readouterr()
    assert main(["instruments", "load", dump, "--dsn", fresh_db]) == 0
    out = capsys.readouterr().out
    with psycopg.connect(fresh_db) as conn:
        n = conn.execute("SELECT count(*) FROM instruments").fetchone()[0]
    assert n > 0 and out.startswith(f"{n} instruments: {n} new")

    bad = tmp_path / "bad.csv"
    lines = open(dump).read().splitlines()
    lines[4] = lines[4].replace(",EQ,", ",EQ,extra,")
    bad.write_text("\n".join(lines) + "\n")
    assert main(["instruments", "load", str(bad), "--dsn", fresh_db]) == 2
    assert "bad.csv:5:" in capsys.readouterr().err
    assert main(["instruments", "load", str(tmp_path / "missing.csv"), "--dsn", fresh_db]) == 2
    assert main(["instruments"]) == 2  # no action


def test_bad_csv_exit_2_as_a_process(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("not,a,dump\n")
    r = _run("instruments", "load", str(bad), "--dsn", "host=127.0.0.1 port=1")
    assert r.returncode == 2 and "x.csv:1:" in r.stderr


# --------------------------------------------------------------------------------------------
# TimescaleDB statements, both API generations (pure: no server needed)


def test_plan_columnstore_generation():
    sql = ts.plan("2.18.0")
    assert sql[0] == ("SELECT create_hypertable('tick_data', by_range('time', INTERVAL '1 hour'), "
                      "create_default_indexes => false, if_not_exists => true, "
                      "migrate_data => true)")
    assert ("ALTER TABLE tick_data SET (timescaledb.enable_columnstore = true, "
            "timescaledb.segmentby = 'instrument_id', timescaledb.orderby = 'time DESC')") in sql
    assert ("CALL add_columnstore_policy('tick_data', after => INTERVAL '1 hour', "
            "if_not_exists => true)") in sql
    # the lean layout: the readers' index, not a unique key (none exists on a fresh plan)
    assert ("CREATE INDEX IF NOT EXISTS tick_data_instrument_time_idx ON tick_data "
            "(instrument_id, time DESC) WITH (timescaledb.transaction_per_chunk)") in sql
    assert not any("DROP CONSTRAINT" in s for s in sql)
    assert ("SELECT add_retention_policy('tick_data', drop_after => INTERVAL '30 days', "
            "if_not_exists => true)") in sql
    assert ("ALTER TABLE ohlc_candles SET (timescaledb.enable_columnstore = true, "
            "timescaledb.segmentby = 'instrument_id, timeframe', "
            "timescaledb.orderby = 'time DESC')") in sql
    assert any("by_range('time', INTERVAL '1 day')" in s and "'ohlc_candles'" in s for s in sql)
    assert ("SELECT add_retention_policy('order_book_snapshots', drop_after => "
            "INTERVAL '7 days', if_not_exists => true)") in sql
    assert not any("compress_segmentby" in s or "add_compression_policy" in s for s in sql)
    assert len(sql) == 3 * 4 + 1


def test_plan_compression_generation():
    sql = ts.plan((2, 17, 2))
    assert ("ALTER TABLE tick_data SET (timescaledb.compress, "
            "timescaledb.compress_segmentby = 'instrument_id', "
            "timescaledb.compress_orderby = 'time DESC')") in sql
    assert ("SELECT add_compression_policy('tick_data', compress_after => INTERVAL '1 hour', "
            "if_not_exists => true)") in sql
    assert ("SELECT add_compression_policy('order_book_snapshots', compress_after => "
            "INTERVAL '1 hour', if_not_exists => true)") in sql
    assert not any("columnstore" in s for s in sql)
    assert "by_range" in sql[0]


def test_plan_before_generalized_create_hypertable():
    sql = ts.plan("2.11.2")
    assert sql[0] == ("SELECT create_hypertable('tick_data', 'time', chunk_time_interval => "
                      "INTERVAL '1 hour', create_default_indexes => false, "
                      "if_not_exists => true, migrate_data => true)")


def test_plan_rerun_applies_changed_settings_only():
    state = ts.TimescaleState(
        compression={"tick_data": True, "ohlc_candles": True, "order_book_snapshots": True},
        policies={("tick_data", "compression"): "1 hour", ("tick_data", "retention"): "30 days",
                  ("ohlc_candles", "compression"): "1 day", ("ohlc_candles", "retention"): "2 years",
                  ("order_book_snapshots", "compression"): "1 hour",
                  ("order_book_snapshots", "retention"): "7 days"},
        indexes={"tick_data_instrument_time_idx"})
    same = ts.plan("2.18.1", None, state)
    assert all(s.startswith("SELECT set_chunk_time_interval(") for s in same) and len(same) == 3
    # a database of the old layout: the readers' index first, then the key goes, and the
    # week-long columnstore policy becomes an hour
    old = ts.TimescaleState(compression=state.compression,
                            policies={**state.policies, ("tick_data", "compression"): "7 days"},
                            constraints={"tick_data_pkey"})
    sql = ts.plan("2.18.1", None, old)
    i = sql.index("CREATE INDEX IF NOT EXISTS tick_data_instrument_time_idx ON tick_data "
                  "(instrument_id, time DESC) WITH (timescaledb.transaction_per_chunk)")
    assert sql[i + 1] == "ALTER TABLE tick_data DROP CONSTRAINT IF EXISTS tick_data_pkey"
    assert "CALL remove_columnstore_policy('tick_data', if_exists => true)" in sql
    settings = ts.TimescaleSettings().with_overrides(
        retention={"tick_data": "90 days", "order_book_snapshots": None},
        chunk_interval={"tick_data": "30 minutes"})
    sql = ts.plan("2.18.1", settings, state)
    assert "SELECT set_chunk_time_interval('tick_data', INTERVAL '30 minutes')" in sql
    i = sql.index("SELECT remove_retention_policy('tick_data', if_exists => true)")
    assert sql[i + 1] == ("SELECT add_retention_policy('tick_data', drop_after => "
                          "INTERVAL '90 days', if_not_exists => true)")
    assert "SELECT remove_retention_policy('order_book_snapshots', if_exists => true)" in sql
    assert not any("add_retention_policy('order_book_snapshots'" in s for s in sql)
    off = ts.TimescaleSettings().with_overrides(compress_after={"tick_data": None})
    sql = ts.plan("2.18.1", off, state)
    assert "CALL remove_columnstore_policy('tick_data', if_exists => true)" in sql
    sql = ts.plan("2.15.0", off, state)
    assert "SELECT remove_compression_policy('tick_data', if_exists => true)" in sql


def test_plan_continuous_aggregate_is_created_without_data():
    sql = ts.plan("2.18.0", ts.TimescaleSettings(continuous_aggregate=True))
    cagg = [s for s in sql if "MATERIALIZED VIEW" in s]
    assert len(cagg) == 1
    assert cagg[0].startswith("CREATE MATERIALIZED VIEW tick_data_daily WITH "
                              "(timescaledb.continuous) AS SELECT time_bucket(INTERVAL '1 day', time)")
    assert cagg[0].endswith("WITH NO DATA")
    assert sql[-1] == ("SELECT add_continuous_aggregate_policy('tick_data_daily', "
                       "start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour', "
                       "schedule_interval => INTERVAL '1 hour', if_not_exists => true)")
    again = ts.plan("2.18.0", ts.TimescaleSettings(continuous_aggregate=True),
                    ts.TimescaleState(caggs={"tick_data_daily"}))
    assert not any("tick_data_daily" in s and "CREATE" in s for s in again)


@pytest.mark.parametrize("bad", ["7 days'; DROP TABLE tick_data; --", "", "days", "1 hour)"])
def test_interval_literal_refuses_injection(bad):
    with pytest.raises(ts.TimescaleError):
        ts.interval_literal(bad)


def test_parse_version():
    assert ts.parse_version("2.18.0") == (2, 18, 0)
    assert ts.parse_version("2.13.0-dev") == (2, 13, 0)
    assert ts.parse_version("2.9") == (2, 9, 0)


def test_setup_without_timescaledb_leaves_plain_tables(fresh_db):
    from ingestor.store.migrate import migrate

    with psycopg.connect(fresh_db) as conn:
        migrate(conn)
        info = ts.detect(conn)
        if info.available:
            pytest.skip("this server has TimescaleDB")
        assert info.installed is None
        res = ts.setup(conn, "auto")
        assert not res.enabled and res.statements == []
        with pytest.raises(ts.TimescaleError, match="not available"):
            ts.setup(conn, "on")
        assert ts.setup(conn, "off").reason.startswith("disabled")


# --------------------------------------------------------------------------------------------
# against a real TimescaleDB (skipped where the server has none)


@pytest.fixture
def tsdb(tsdb_db):
    with psycopg.connect(tsdb_db) as conn:
        assert ts.detect(conn).available
    return tsdb_db


@pytest.mark.timescale
def test_timescale_setup_creates_hypertables_and_policies(tsdb):
    from ingestor.store.migrate import migrate

    with psycopg.connect(tsdb, autocommit=True) as conn:
        migrate(conn)
        res = ts.setup(conn, "on", ts.TimescaleSettings(continuous_aggregate=True))
        assert res.enabled
        state = ts.read_state(conn)
        assert set(state.compression) == {"tick_data", "ohlc_candles", "order_book_snapshots"}
        assert all(state.compression.values())
        assert set(state.policies) == {(t, k) for t in state.compression
                                       for k in ("compression", "retention")}
        assert "tick_data_daily" in state.caggs
        rerun = ts.setup(conn, "on", ts.TimescaleSettings(continuous_aggregate=True))
        assert all(s.startswith("SELECT set_chunk_time_interval(") for s in rerun.statements)
        changed = ts.setup(conn, "on", ts.TimescaleSettings().with_overrides(
            retention={"tick_data": "90 days"}))
        assert any("remove_retention_policy('tick_data'" in s for s in changed.statements)
        assert ts.read_state(conn).policies[("tick_data", "retention")] == \
            conn.execute("SELECT '90 days'::interval::text").fetchone()[0]
        # the tables still take the writer's rows
        conn.execute("INSERT INTO tick_data (time, instrument_id, exchange, price) "
                     "VALUES (now(), 1, 'NSE', 1.2345678)")
