"""Shared fixtures: a fresh PostgreSQL database per test run, a seeded RNG.

The database server is named by ``INGESTOR_TEST_DSN`` (default: the local
server on 127.0.0.1:5432 as user postgres).  The run creates its own
database ``ingestor_test_<pid>_<random>`` and drops it at the end, so it can
never corrupt a shared one.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets

import pytest

ADMIN_DSN = os.environ.get("INGESTOR_TEST_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


def _conninfo(dsn: str, **overrides) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    params.update(overrides)
    return make_conninfo(**params)


@pytest.fixture(scope="session")
def pg_server_dsn() -> str:
    """DSN of the server's maintenance database (skips the DB tests if it is down)."""
    import psycopg

    try:
        with psycopg.connect(ADMIN_DSN, connect_timeout=5) as conn:
            conn.execute("select 1")
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {ADMIN_DSN!r}: {exc}")
    return ADMIN_DSN


@contextlib.contextmanager
def _scratch_database(server_dsn: str, prefix: str):
    """A database created for the caller and dropped (with its connections) after."""
    import psycopg

    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        yield _conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="session")
def pg_dsn(pg_server_dsn: str):
    """DSN of a database created for this test run and dropped after it."""
    with _scratch_database(pg_server_dsn, "ingestor_test") as dsn:
        yield dsn


@pytest.fixture
def fresh_db(pg_server_dsn: str):
    """A database of its own for one test (for tests that need an empty schema)."""
    with _scratch_database(pg_server_dsn, "ingestor_t") as dsn:
        yield dsn


@pytest.fixture
def rng(request) -> random.Random:
    """A seeded RNG; the seed is printed so a failure can be reproduced (INGESTOR_SEED=...)."""
    seed = int(os.environ.get("INGESTOR_SEED", random.randrange(1 << 32)))
    print(f"\n[{request.node.name}] INGESTOR_SEED={seed}")
    return random.Random(seed)


#: Real Kite frames, decoded expectations, a postback and instruments dumps
#: (from Zerodha's public repositories; see tests/data/vectors/README.md).
VECTORS = os.path.join(os.path.dirname(__file__), "data", "vectors")


#: A PostgreSQL server with TimescaleDB (what users run), apart from the main test server:
#: tests marked ``timescale`` run against scratch databases on it, and skip, saying why,
#: when it is not named.
TSDB_DSN = os.environ.get("INGESTOR_TEST_TSDB_DSN", "")


@pytest.fixture
def tsdb_db():
    """A fresh database on the TimescaleDB server (``INGESTOR_TEST_TSDB_DSN``)."""
    import psycopg

    if not TSDB_DSN:
        pytest.skip("INGESTOR_TEST_TSDB_DSN names no TimescaleDB server")
    try:
        with psycopg.connect(TSDB_DSN, connect_timeout=5, autocommit=True) as conn:
            if conn.execute("select 1 from pg_available_extensions "
                            "where name = 'timescaledb'").fetchone() is None:
                pytest.fail("INGESTOR_TEST_TSDB_DSN names a server without TimescaleDB")
    except psycopg.OperationalError as exc:
        pytest.fail(f"INGESTOR_TEST_TSDB_DSN is not reachable: {exc}")
    with _scratch_database(TSDB_DSN, "ingestor_tsdb") as dsn:
        yield dsn


@pytest.fixture
def db(fresh_db):
    """A fresh database with the schema migrated (a test module may define its own ``db``)."""
    import psycopg

    from ingestor.store.migrate import migrate

    with psycopg.connect(fresh_db, autocommit=True) as conn:
        migrate(conn)
    return fresh_db
