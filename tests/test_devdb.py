"""Private PostgreSQL clusters and the demo's database choice (``ingestor.sim.devdb``).

Every test that stops or crashes a server does it to a cluster it started itself; the
machine's shared server is only asked for ``CREATE DATABASE``/``DROP DATABASE`` of a
randomly named database (and one refused login).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

import psycopg
import pytest

from ingestor.sim import devdb
from ingestor.sim.devdb import (ClusterError, DatabaseUnavailable, PgBinariesNotFound,
                            PrivateCluster, ensure_database, find_pg_bin)
from pg_private import DBNAME, pg_bin_or_skip, private_pg  # noqa: F401 (fixture)

try:
    find_pg_bin()
    _NO_BINARIES = None
except PgBinariesNotFound as exc:  # pragma: no cover - depends on the machine
    _NO_BINARIES = str(exc)

needs_binaries = pytest.mark.skipif(_NO_BINARIES is not None,
                                    reason=f"no PostgreSQL server binaries: {_NO_BINARIES}")


@pytest.fixture
def open_dir():
    """A fresh directory under the system temp dir that any user can traverse."""
    d = Path(tempfile.mkdtemp(prefix="ingestor-devdb-test-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """A private cluster with default (durable) settings, for the crash/restart tests."""
    pg_bin_or_skip()
    with PrivateCluster() as pg:
        yield pg


def _count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"select count(*) from {table}").fetchone()[0]


# --- binaries -------------------------------------------------------------------------

@needs_binaries
def test_find_pg_bin_holds_the_server_programs():
    d = find_pg_bin()
    for name in ("initdb", "pg_ctl", "postgres"):
        assert os.access(d / name, os.X_OK), name


def test_find_pg_bin_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(devdb.PG_BIN_ENV, str(tmp_path))
    with pytest.raises(PgBinariesNotFound, match=str(tmp_path)):
        find_pg_bin()
    if _NO_BINARIES is None:
        monkeypatch.delenv(devdb.PG_BIN_ENV)
        real = find_pg_bin()
        monkeypatch.setenv(devdb.PG_BIN_ENV, str(real))
        assert find_pg_bin() == real


# --- one cluster: settings, crash, restart, stop ----------------------------------------

@needs_binaries
def test_cluster_settings(cluster):
    with psycopg.connect(cluster.dsn()) as conn:
        show = {k: conn.execute(f"show {k}").fetchone()[0] for k in (
            "port", "listen_addresses", "unix_socket_directories", "fsync",
            "synchronous_commit", "server_encoding", "data_directory")}
        ident = conn.execute("select current_user, current_database()").fetchone()
    assert int(show["port"]) == cluster.port
    assert show["listen_addresses"] == "127.0.0.1"
    assert show["unix_socket_directories"] == str(cluster.datadir)
    assert (show["fsync"], show["synchronous_commit"]) == ("on", "on")
    assert show["server_encoding"] == "UTF8"
    assert Path(show["data_directory"]) == cluster.datadir
    assert ident == ("postgres", "postgres")
    assert cluster.port != 5432
    # The Unix socket in the data directory answers too.
    with psycopg.connect(host=str(cluster.datadir), port=cluster.port, user="postgres",
                         dbname="postgres") as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@needs_binaries
def test_cluster_runs_unprivileged(cluster):
    pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    with open(f"/proc/{pid}/status") as f:
        uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    if os.geteuid() == 0:
        assert uid != 0 and cluster.user is not None  # initdb/postgres refuse root
    else:
        assert uid == os.geteuid()
    assert cluster.datadir.stat().st_uid == uid
    assert cluster.datadir.stat().st_mode & 0o777 == 0o700


@needs_binaries
def test_crash_keeps_committed_and_drops_uncommitted(cluster):
    dsn = cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table crash_t (id int primary key, note text)")
        conn.execute("insert into crash_t select g, 'committed' from generate_series(1, 1000) g")
    pending = psycopg.connect(dsn)
    pending.execute("insert into crash_t values (5000, 'never committed')")

    assert cluster.stop("immediate") is True
    assert not cluster.is_running()
    with pytest.raises(psycopg.OperationalError):
        pending.execute("select 1")
    pending.close()

    cluster.start()
    assert cluster.is_running()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("select count(*), min(id), max(id) from crash_t").fetchone()
    assert rows == (1000, 1, 1000)
    # It was a crash: the start ran recovery from the WAL.
    assert "automatic recovery in progress" in cluster.log_tail(200)


@needs_binaries
def test_restart_breaks_connected_client_which_reconnects(cluster):
    dsn = cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table restart_t (id int)")
        conn.execute("insert into restart_t values (1), (2), (3)")
    client = psycopg.connect(dsn, autocommit=True)
    assert client.execute("select count(*) from restart_t").fetchone() == (3,)
    old_pid = client.info.backend_pid

    cluster.restart()

    with pytest.raises(psycopg.OperationalError):
        client.execute("select count(*) from restart_t")
    assert client.broken or client.closed
    client.close()
    with psycopg.connect(dsn, autocommit=True) as again:
        assert again.execute("select count(*) from restart_t").fetchone() == (3,)
        assert again.info.backend_pid != old_pid


@needs_binaries
def test_clean_stop_then_start(cluster):
    assert cluster.stop() is True
    assert not cluster.is_running()
    assert not (cluster.datadir / "postmaster.pid").exists()
    assert "database system is shut down" in cluster.log_tail(5)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(cluster.dsn(), connect_timeout=3)
    assert cluster.stop() is False  # already stopped: nothing to do
    cluster.start()
    assert _count(cluster.dsn(), "pg_database") >= 3


@needs_binaries
def test_stop_rejects_unknown_mode(cluster):
    with pytest.raises(ValueError, match="immediate"):
        cluster.stop("abrupt")
    assert cluster.is_running()


# --- lifecycle ----------------------------------------------------------------------------

@needs_binaries
def test_temporary_cluster_is_fast_and_removed():
    with PrivateCluster(fast=True) as pg:
        datadir = pg.datadir
        with psycopg.connect(pg.dsn()) as conn:
            assert conn.execute("show fsync").fetchone() == ("off",)
            assert conn.execute("show full_page_writes").fetchone() == ("off",)
            assert conn.execute("show synchronous_commit").fetchone() == ("on",)
        assert pg.is_running()
    assert not pg.is_running()
    assert not datadir.exists()


@needs_binaries
def test_explicit_datadir_is_kept_and_reused(open_dir):
    datadir = open_dir / "a" / "pgdata"
    with PrivateCluster(datadir) as pg:
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("create table kept (x int)")
            conn.execute("insert into kept values (42)")
    assert not pg.is_running()
    assert (datadir / "PG_VERSION").exists()
    with pytest.raises(ClusterError, match="already holds a cluster"):
        PrivateCluster(datadir).init()
    # A new object on the same directory: same data, maybe another port.
    with PrivateCluster(datadir) as again:
        with psycopg.connect(again.dsn()) as conn:
            assert conn.execute("select x from kept").fetchall() == [(42,)]
        # A third one while it runs (a leftover of an interrupted run) adopts its port.
        adopter = PrivateCluster(datadir)
        assert adopter.is_running()
        adopter.start()
        assert adopter.port == again.port
    assert not adopter.is_running()


@needs_binaries
def test_start_moves_off_a_taken_port(open_dir):
    pg = PrivateCluster(open_dir / "pgdata", fast=True)
    pg.init()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", pg.port))
    blocker.listen()
    taken = pg.port
    try:
        pg.start()
        assert pg.port != taken
        with psycopg.connect(pg.dsn()) as conn:
            assert int(conn.execute("show port").fetchone()[0]) == pg.port
    finally:
        blocker.close()
        pg.stop()


@needs_binaries
def test_fixed_port_taken_is_a_clear_error(open_dir):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        pg = PrivateCluster(open_dir / "pgdata", port=port, fast=True, timeout=20)
        pg.init()
        with pytest.raises(ClusterError, match="could not start") as err:
            pg.start()
    assert "already in use" in str(err.value)  # the log's tail explains it
    assert not pg.is_running()


@needs_binaries
@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to another user")
def test_unreachable_parent_is_named():
    closed = Path(tempfile.mkdtemp(prefix="ingestor-devdb-closed-"))  # mode 0700, root's
    try:
        pg = PrivateCluster(closed / "pgdata")
        with pytest.raises(ClusterError, match=str(closed)) as err:
            pg.init()
        assert pg.user in str(err.value)
        assert not (closed / "pgdata").exists()  # refused before creating anything
    finally:
        shutil.rmtree(closed, ignore_errors=True)


@needs_binaries
@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to another user")
def test_ensure_database_moves_out_of_an_unreachable_workdir():
    closed = Path(tempfile.mkdtemp(prefix="ingestor-devdb-closed-"))  # mode 0700, root's
    dead = f"host=127.0.0.1 port={devdb.free_port()} user=postgres connect_timeout=2"
    cluster = None
    try:
        dsn, cluster = ensure_database(dead, closed, dbname="demo_db")
        assert cluster is not None
        assert cluster.datadir.parent == Path(tempfile.gettempdir())
        assert not (closed / ".pgdata").exists()
        with psycopg.connect(dsn) as conn:
            assert conn.info.dbname == "demo_db"
    finally:
        if cluster is not None:
            cluster.cleanup()
        shutil.rmtree(closed, ignore_errors=True)


# --- the fixture for fault tests ----------------------------------------------------------

@needs_binaries
def test_private_pg_fixture_is_migrated(private_pg):
    from ingestor.store.migrate import current

    assert private_pg.is_running()
    assert private_pg.port != 5432
    with psycopg.connect(private_pg.dsn()) as conn:
        assert conn.info.dbname == DBNAME
        status = current(conn)
        assert status.current and status.applied, status.message
        assert conn.execute("select to_regclass('tick_data')").fetchone()[0] == "tick_data"


# --- ensure_database ---------------------------------------------------------------------

def test_ensure_database_uses_answering_server(pg_server_dsn, open_dir):
    name = f"ingestor_devdb_{secrets.token_hex(4)}"
    try:
        dsn, cluster = ensure_database(pg_server_dsn, open_dir, dbname=name)
        assert cluster is None
        assert not (open_dir / ".pgdata").exists()
        with psycopg.connect(dsn) as conn:
            assert conn.info.dbname == name
            assert (conn.info.host, conn.info.port) == (
                psycopg.conninfo.conninfo_to_dict(pg_server_dsn)["host"], 5432)
        # Again: the database exists now and is used as it is.
        assert ensure_database(pg_server_dsn, open_dir, dbname=name) == (dsn, None)
    finally:
        with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


def test_ensure_database_without_dsn_tries_defaults_then_local(pg_server_dsn, monkeypatch,
                                                               open_dir):
    params = psycopg.conninfo.conninfo_to_dict(pg_server_dsn)
    if (params.get("host"), str(params.get("port"))) != ("127.0.0.1", "5432"):
        pytest.skip("the test server is not the local 127.0.0.1:5432 this fallback names")
    # libpq's defaults point at a port nothing listens on; the fallback 127.0.0.1:5432
    # (the machine's shared server) answers.
    dead_port = devdb.free_port()
    for var in ("PGSERVICE", "PGDATABASE", "PGHOSTADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", str(dead_port))
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "2")
    name = f"ingestor_devdb_{secrets.token_hex(4)}"
    try:
        dsn, cluster = ensure_database(None, open_dir, dbname=name)
        assert cluster is None
        monkeypatch.delenv("PGPORT")
        with psycopg.connect(dsn) as conn:
            assert (conn.info.port, conn.info.dbname) == (5432, name)
    finally:
        with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


def test_ensure_database_keeps_a_named_database(pg_dsn, open_dir):
    name = f"ingestor_devdb_{secrets.token_hex(4)}"
    dsn, cluster = ensure_database(pg_dsn, open_dir, dbname=name)
    assert (dsn, cluster) == (pg_dsn, None)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("select 1 from pg_database where datname = %s",
                            (name,)).fetchone() is None


def test_ensure_database_refused_login_is_an_error(pg_server_dsn, open_dir):
    role = f"no_such_role_{secrets.token_hex(4)}"
    bad = psycopg.conninfo.make_conninfo(pg_server_dsn, user=role)
    with pytest.raises(DatabaseUnavailable, match=role):
        ensure_database(bad, open_dir)
    assert not (open_dir / ".pgdata").exists()


@needs_binaries
def test_ensure_database_starts_private_cluster(open_dir):
    dead = f"host=127.0.0.1 port={devdb.free_port()} user=postgres connect_timeout=2"
    # Nothing listens there.
    with pytest.raises(DatabaseUnavailable, match="no server answers"):
        ensure_database(dead, open_dir, fallback=False)

    dsn, cluster = ensure_database(dead, open_dir, dbname="demo_db")
    try:
        assert isinstance(cluster, PrivateCluster)
        assert cluster.datadir == open_dir / ".pgdata"
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.info.dbname == "demo_db"
            assert conn.info.port == cluster.port
            conn.execute("create table survives (x int)")
            conn.execute("insert into survives values (7)")
    finally:
        cluster.stop()
    # The next run reuses the cluster (and its data).
    dsn2, cluster2 = ensure_database(dead, open_dir, dbname="demo_db")
    try:
        assert cluster2 is not None and cluster2.datadir == cluster.datadir
        with psycopg.connect(dsn2) as conn:
            assert conn.execute("select x from survives").fetchall() == [(7,)]
    finally:
        cluster2.stop()
    assert not cluster2.is_running()
