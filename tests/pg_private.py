"""A private PostgreSQL cluster for tests that stop, crash and restart the server.

The machine's shared server must never be stopped or reconfigured, so fault tests get a
cluster of their own (:class:`ingestor.sim.devdb.PrivateCluster`): started once per test
module, with the database :data:`DBNAME` created and migrated, removed at the end.

Use it from a test module with::

    from pg_private import private_pg  # noqa: F401  (the fixture)

    def test_survives_restart(private_pg):
        dsn = private_pg.dsn()          # the migrated database
        ...
        private_pg.stop("immediate")    # a crash; private_pg.start() recovers
        private_pg.restart()            # a clean stop and start

A test that stops the server should leave it running (``start()``) for the next test of
the module; a test that needs it running whatever happened before can ask for
``private_pg_running`` instead (import it too), which starts it again if needed.  The tests are skipped, with the
reason, where no PostgreSQL server binaries are installed.
"""

from __future__ import annotations

import pytest

#: The migrated database of :func:`private_pg` (what ``private_pg.dsn()`` names).
DBNAME = "ingestor"


def pg_bin_or_skip():
    """The server binaries' directory, or skip the test with the reason."""
    from ingestor.sim.devdb import PgBinariesNotFound, find_pg_bin

    try:
        return find_pg_bin()
    except PgBinariesNotFound as exc:
        pytest.skip(f"no private PostgreSQL cluster possible: {exc}")


@pytest.fixture(scope="module")
def private_pg():
    """A started :class:`~ingestor.sim.devdb.PrivateCluster` whose ``dsn()`` is a migrated database.

    ``fast=True``: fsync and full_page_writes off (safe against a server crash, which is
    what the tests cause), synchronous_commit on (an acknowledged commit survives
    ``stop("immediate")``).
    """
    import psycopg

    from ingestor.store.migrate import migrate
    from ingestor.sim.devdb import PrivateCluster

    bindir = pg_bin_or_skip()
    with PrivateCluster(bindir=bindir, fast=True, dbname=DBNAME) as pg:
        pg.create_database(DBNAME)
        with psycopg.connect(pg.dsn()) as conn:
            migrate(conn)
        yield pg


@pytest.fixture
def private_pg_running(private_pg):
    """:func:`private_pg`, started again first if an earlier test left it stopped."""
    if not private_pg.is_running():
        private_pg.start()
    return private_pg
