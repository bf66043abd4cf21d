"""A PostgreSQL for demos and fault tests: the local server when one answers, else a private cluster.

Two jobs need a database nobody else depends on:

* The README demo must run on a machine that has the PostgreSQL server binaries installed
  but no server running (or none it may use): :func:`ensure_database` uses the server that
  answers at the given DSN (or libpq's defaults, or ``127.0.0.1:5432``), and otherwise
  starts a :class:`PrivateCluster` under the working directory.
* The daemon's fault tests stop, crash and restart a server mid-run.  They must never do
  that to the machine's shared server, so they start a :class:`PrivateCluster` of their own
  (``tests/pg_private.py``).

A private cluster is an ordinary PostgreSQL data directory created with ``initdb`` and run
with ``pg_ctl`` (both documented in the PostgreSQL manual, "Server Applications").  It
listens only on ``127.0.0.1`` at a free port and on a Unix socket inside its data
directory, with trust authentication for the superuser ``postgres``.

``initdb`` and ``postgres`` refuse to run as root (the manual: "initdb must be run as the
user that will own the server process").  When this process is root the cluster belongs to
an unprivileged user instead -- ``ingestor-pg`` where an operator created it, else
``nobody`` (never an account this tool creates) -- and every server program runs as that user (through
:class:`subprocess.Popen`'s ``user``/``group`` arguments, no ``su`` or ``runuser`` needed).
Deliberately not the ``postgres`` user: a bug here must not be able to touch the data of
the machine's own server.  That user must be able to reach the data directory, so every
parent directory has to be traversable by it; when one is not, :class:`ClusterError` names
it (``datadir=None`` picks a temporary directory that always is).

Durability: ``fast=True`` turns off ``fsync`` and ``full_page_writes``.  Both only matter
when the *operating system* crashes; a crash of the server (``stop("immediate")``, a
killed postmaster) loses no committed transaction, because what was written is in the OS
page cache.  ``synchronous_commit`` stays ``on`` even then: with it off, a commit is
acknowledged before its WAL leaves the server's shared memory, so an immediate stop would
lose acknowledged commits -- the very thing the fault tests check never happens.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Mapping, Sequence

log = logging.getLogger(__name__)

#: Environment variable naming the directory of the server binaries (wins over the search).
PG_BIN_ENV = "INGESTOR_PG_BIN"

#: The system user a cluster runs as when this process is root.
CLUSTER_USER = "ingestor-pg"

#: The superuser ``initdb`` creates (trust authentication, from 127.0.0.1 and the socket).
SUPERUSER = "postgres"

#: The database :func:`ensure_database` creates when the DSN names none of its own.
DEMO_DBNAME = "ingestor_demo"

#: The server binaries a private cluster needs.
_REQUIRED = ("initdb", "pg_ctl", "postgres")

#: The file of this module's settings, included from ``postgresql.conf``.
_CONF_NAME = "ingestor_private.conf"

#: Where ``pg_ctl`` sends the server's log (inside the data directory).
_LOG_NAME = "server.log"

#: Linux ``sun_path`` holds 108 bytes including the final NUL.
_SUN_PATH_MAX = 107

_MAINTENANCE_DBS = ("postgres", "template1", "template0")


class ClusterError(RuntimeError):
    """A private cluster could not be created, started or stopped (the message says why)."""


class DatadirUnreachable(ClusterError):
    """The cluster's user (root runs it as another) cannot traverse to the data directory."""


class PgBinariesNotFound(ClusterError):
    """No PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``) were found."""


class DatabaseUnavailable(RuntimeError):
    """A server answered but could not be used (login refused, no right to create a database)."""


# ---------------------------------------------------------------------------------------
# Finding the server binaries
# ---------------------------------------------------------------------------------------

def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED)


def _version_key(path: str) -> tuple:
    # /usr/lib/postgresql/<version>/bin: "9.6" < "15" < "16" (numerically, part by part).
    ver = Path(path).parent.name
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.]", ver))


def find_pg_bin() -> Path:
    """Locate the directory of the PostgreSQL server binaries.

    Tried in order: the ``INGESTOR_PG_BIN`` environment variable; ``pg_config --bindir``;
    the highest version of ``/usr/lib/postgresql/*/bin`` (Debian and Ubuntu install the
    server there, off ``PATH``); ``/usr/pgsql-*/bin`` (the PGDG RPMs); then ``initdb`` on
    ``PATH``.  A directory counts only if it holds ``initdb``, ``pg_ctl`` and ``postgres``.

    Returns
    -------
    pathlib.Path
        The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Raises
    ------
    PgBinariesNotFound
        None was found; the message lists every place looked at.
    """
    tried: list[str] = []

    env = os.environ.get(PG_BIN_ENV)
    if env:
        if _has_server(Path(env)):
            return Path(env)
        # An explicit setting that is wrong is an error, not a hint to look elsewhere.
        raise PgBinariesNotFound(
            f"{PG_BIN_ENV}={env} does not hold the PostgreSQL server binaries "
            f"({', '.join(_REQUIRED)})")

    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            tried.append(f"pg_config --bindir (failed: {exc})")
        else:
            if out and _has_server(Path(out)):
                return Path(out)
            tried.append(f"pg_config --bindir = {out or '(empty)'}")
    else:
        tried.append("pg_config (not on PATH)")

    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin"):
        for d in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            if _has_server(Path(d)):
                return Path(d)
        tried.append(pattern)

    initdb = shutil.which("initdb")
    if initdb:
        d = Path(initdb).resolve().parent
        if _has_server(d):
            return d
        tried.append(f"{d} (from PATH: initdb without pg_ctl/postgres)")
    else:
        tried.append("initdb on PATH")

    raise PgBinariesNotFound(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found; looked at: "
        + "; ".join(tried)
        + f". Install the PostgreSQL server package or set {PG_BIN_ENV} to its bin directory.")


# ---------------------------------------------------------------------------------------
# Users and permissions
# ---------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel's pick).

    Another process may take it before the server binds it; :meth:`PrivateCluster.start`
    retries with a new port when the server reports the address in use.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _lookup(user: str):
    import pwd

    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def cluster_user() -> str:
    """The unprivileged user a root process runs its clusters as.

    ``ingestor-pg`` if an operator created it, else ``nobody``.  The tool never creates a
    system user itself: a test or demo helper has no business adding accounts to a machine.
    """
    if _lookup(CLUSTER_USER):
        return CLUSTER_USER
    if _lookup("nobody"):
        return "nobody"
    raise ClusterError(
        f"running as root, and neither user {CLUSTER_USER} nor nobody exists to own the "
        "cluster (initdb refuses to run as root); create an unprivileged user and pass user=")


def _untraversable(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The first existing ancestor of ``path`` that ``uid`` cannot search, if any.

    Decided from the mode bits, as the kernel does without ACLs: the owner's bits for the
    owner, the group's for a member, the others' for the rest.
    """
    import stat

    for parent in reversed(path.parents):
        try:
            st = parent.stat()
        except FileNotFoundError:
            break  # it will be created, traversable (see _makedirs)
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in gids:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return parent
    return None


def _makedirs(path: Path) -> None:
    """Create ``path``'s missing parents, searchable by everyone whatever the umask."""
    missing = [p for p in reversed(path.parents) if not p.exists()]
    for p in missing:
        try:
            p.mkdir()
        except FileExistsError:
            continue
        os.chmod(p, 0o755)


# ---------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------

_live: "weakref.WeakSet[PrivateCluster]" = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    # A demo interrupted by an exception (or a test run that never reached its finalizer)
    # must not leave a postmaster behind.
    for cluster in list(_live):
        try:
            if cluster.is_running():
                cluster.stop("immediate")
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


class PrivateCluster:
    """A PostgreSQL cluster of its own: ``initdb``, ``pg_ctl start/stop``, at a free port.

    Parameters
    ----------
    datadir : str, pathlib.Path or None
        The data directory.  ``None`` makes a fresh temporary directory (removed on
        :meth:`cleanup` and when the context manager exits).  Its parents must be
        traversable by the cluster's user.
    port : int or None
        The TCP port; ``None`` picks a free one (and a new one if it is taken at start).
    host : str
        The only address the server listens on (default ``127.0.0.1``).
    user : str or None
        The operating-system user that owns the data directory and runs the server.
        ``None``: the current user, or when root, the existing data directory's owner or
        :func:`cluster_user`.  Ignored (must be ``None`` or the current user) unless root.
    bindir : str, pathlib.Path or None
        The server binaries; ``None`` uses :func:`find_pg_bin`.
    fast : bool
        Default for :meth:`init`'s ``fast``: ``fsync=off`` and ``full_page_writes=off``.
    settings : mapping, optional
        More ``postgresql.conf`` settings written at :meth:`init` (values verbatim, so
        quote strings: ``{"log_statement": "'all'"}``).
    dbname : str
        The database :meth:`dsn` names by default.
    remove : bool or None
        Whether leaving the context manager removes the data directory; ``None`` means
        "only if it was a temporary one (``datadir=None``)".
    timeout : float
        Seconds to wait for ``initdb``, a start or a stop.

    Notes
    -----
    Use as a context manager to get a started cluster (initialised first if needed) that
    is stopped on exit::

        with PrivateCluster(fast=True) as pg:
            conn = psycopg.connect(pg.dsn())

    ``stop("immediate")`` is the manual's "immediate" shutdown: every server process quits
    at once without a checkpoint, so the next start runs crash recovery.
    """

    def __init__(self, datadir: str | os.PathLike | None = None, port: int | None = None,
                 host: str = "127.0.0.1", user: str | None = None, *,
                 bindir: str | os.PathLike | None = None, fast: bool = False,
                 settings: Mapping[str, str] | None = None, dbname: str = "postgres",
                 remove: bool | None = None, timeout: float = 60.0) -> None:
        self._temporary = datadir is None
        if datadir is None:
            # mkdtemp's own directory becomes the data directory (0700, chowned below), so
            # its only parent is the system temp directory: traversable by anyone.
            datadir = tempfile.mkdtemp(prefix="ingestor-pg-")
        self.datadir = Path(datadir).absolute()
        self._auto_port = port is None
        self.port = free_port(host) if port is None else int(port)
        self.host = host
        self.bindir = Path(bindir) if bindir is not None else find_pg_bin()
        self.fast = fast
        self.settings = dict(settings or {})
        self.dbname = dbname
        self.remove = self._temporary if remove is None else remove
        self.timeout = timeout
        self.user = self._choose_user(user)

    # -- identity ------------------------------------------------------------------------

    def _choose_user(self, user: str | None) -> str | None:
        """The user to run server programs as, or ``None`` for "this process's user"."""
        if not _is_root():
            if user is not None and _lookup(user) and _lookup(user).pw_uid != os.geteuid():
                raise ClusterError(f"only root can run a cluster as another user ({user})")
            return None
        if user is None:
            if (self.datadir / "PG_VERSION").exists():
                owner = self.datadir.stat().st_uid
                if owner != 0:
                    import pwd

                    try:
                        return pwd.getpwuid(owner).pw_name
                    except KeyError:
                        pass
            user = cluster_user()
        pw = _lookup(user)
        if pw is None:
            raise ClusterError(f"user {user!r} does not exist")
        if pw.pw_uid == 0:
            raise ClusterError("the cluster cannot run as root (initdb and postgres refuse to)")
        return user

    def _ids(self) -> tuple[int, int] | None:
        if self.user is None:
            return None
        pw = _lookup(self.user)
        return pw.pw_uid, pw.pw_gid

    @property
    def logfile(self) -> Path:
        """The server's log (``pg_ctl -l``), inside the data directory."""
        return self.datadir / _LOG_NAME

    @property
    def socket_dir(self) -> Path | None:
        """The Unix socket directory (the data directory), or ``None`` if its path is too long.

        The socket's path is ``<dir>/.s.PGSQL.<port>`` and must fit in ``sun_path``; a
        longer data directory path gets TCP only.
        """
        if len(str(self.datadir)) + len("/.s.PGSQL.65535") > _SUN_PATH_MAX:
            return None
        return self.datadir

    def dsn(self, dbname: str | None = None) -> str:
        """The conninfo string for ``dbname`` (default :attr:`dbname`) over TCP.

        Parameters
        ----------
        dbname : str or None
            The database; ``None`` means :attr:`dbname`.

        Returns
        -------
        str
            ``host=... port=... user=postgres dbname=...``.
        """
        from psycopg.conninfo import make_conninfo

        return make_conninfo(host=self.host, port=self.port, user=SUPERUSER,
                             dbname=dbname or self.dbname)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"PrivateCluster({str(self.datadir)!r}, port={self.port}, {state})"

    # -- running programs ----------------------------------------------------------------

    def _run(self, args: Sequence[str], *, timeout: float | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        kwargs = {}
        ids = self._ids()
        if ids is not None:
            uid, gid = ids
            kwargs = dict(user=uid, group=gid, extra_groups=[])
            env["HOME"] = str(self.datadir)
            env["USER"] = env["LOGNAME"] = self.user
        cmd = [str(self.bindir / args[0]), *args[1:]]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  cwd=str(self.datadir), stdin=subprocess.DEVNULL,
                                  # pg_ctl -t gives up first and says why
                                  timeout=(timeout or self.timeout) + 10, **kwargs)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{args[0]} did not finish within {exc.timeout:.0f} s"
                               + self._tail_note()) from None
        if check and proc.returncode != 0:
            out = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}")
            raise ClusterError(f"{' '.join(args[:2])} failed: {out}" + self._tail_note())
        return proc

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server log (empty if there is none yet)."""
        try:
            with open(self.logfile, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _tail_note(self) -> str:
        tail = self.log_tail()
        return f"\n--- {self.logfile} (last lines) ---\n{tail}" if tail else ""

    # -- init ----------------------------------------------------------------------------

    def is_initialized(self) -> bool:
        """Whether the data directory holds a cluster (``PG_VERSION`` exists)."""
        return (self.datadir / "PG_VERSION").exists()

    def init(self, fast: bool | None = None, exist_ok: bool = False) -> None:
        """Create the cluster with ``initdb`` and write its settings.

        Trust authentication for the superuser ``postgres``, UTF8 encoding with the C
        locale, the server listening on :attr:`host` and a socket in the data directory,
        small memory (``shared_buffers=16MB``) and logging to :attr:`logfile`.

        Parameters
        ----------
        fast : bool or None
            ``fsync=off``, ``full_page_writes=off`` and ``initdb --no-sync``: safe against
            a server crash, not against an OS crash (see the module docstring for why
            ``synchronous_commit`` stays on).  ``None`` uses the constructor's ``fast``.
        exist_ok : bool
            Return quietly if the data directory already holds a cluster.

        Raises
        ------
        ClusterError
            The directory is not empty, not reachable by the cluster's user, or initdb failed.
        """
        fast = self.fast if fast is None else fast
        if self.is_initialized():
            if exist_ok:
                return
            raise ClusterError(f"{self.datadir} already holds a cluster")
        self._prepare_datadir()
        args = ["initdb", "-D", str(self.datadir), "-U", SUPERUSER, "--auth=trust",
                "--encoding=UTF8", "--locale=C", "--no-instructions"]
        if fast:
            args.append("--no-sync")
        self._run(args, timeout=max(self.timeout, 120))
        self.fast = fast
        self._write_settings(fast)

    def _prepare_datadir(self) -> None:
        d = self.datadir
        if d.exists():
            if not d.is_dir():
                raise ClusterError(f"{d} exists and is not a directory")
            if any(d.iterdir()):
                raise ClusterError(f"{d} exists and is not empty: initdb needs an empty directory")
        ids = self._ids()
        if ids is not None:
            # Checked before creating anything, so a refusal leaves nothing behind.
            uid, gid = ids
            blocked = _untraversable(d, uid, {gid} | _group_ids(self.user))
            if blocked is not None:
                mode = blocked.stat().st_mode & 0o777
                raise DatadirUnreachable(
                    f"the cluster runs as user {self.user} (initdb refuses root), who cannot "
                    f"reach {d}: {blocked} is not searchable by it (mode {mode:o}, owner uid "
                    f"{blocked.stat().st_uid}). Put the data directory under a directory "
                    "everyone can traverse (datadir=None uses a temporary one), or "
                    f"chmod o+x {blocked}.")
        if not d.exists():
            _makedirs(d)
            d.mkdir()
        os.chmod(d, 0o700)
        if ids is not None:
            os.chown(d, *ids)

    def _write_settings(self, fast: bool) -> None:
        lines = [
            "# Written by ingestor.sim.devdb: a private cluster for demos and tests.",
            f"port = {self.port}",
            f"listen_addresses = '{self.host}'",
            f"unix_socket_directories = '{self.socket_dir or ''}'",
            "shared_buffers = 16MB",
            "max_connections = 50",
            "max_wal_size = 256MB",
            "logging_collector = off",
            "log_line_prefix = '%m [%p] '",
        ]
        if fast:
            lines += ["fsync = off", "full_page_writes = off"]
        lines += [f"{k} = {v}" for k, v in self.settings.items()]
        conf = self.datadir / _CONF_NAME
        conf.write_text("\n".join(lines) + "\n")
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(f"\n# ingestor.sim.devdb\ninclude '{_CONF_NAME}'\n")
        ids = self._ids()
        if ids is not None:
            os.chown(conf, *ids)

    def _set_setting(self, key: str, value: str) -> None:
        conf = self.datadir / _CONF_NAME
        if not conf.exists():
            # A data directory initialised by something else: add our settings file.
            self._write_settings(self.fast)
        text = conf.read_text() if conf.exists() else ""
        line = f"{key} = {value}"
        pattern = re.compile(rf"^{re.escape(key)}\s*=.*$", re.M)
        text = pattern.sub(line, text) if pattern.search(text) else text + line + "\n"
        conf.write_text(text)

    # -- start / stop --------------------------------------------------------------------

    def _pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        """Whether this data directory's postmaster is alive (from ``postmaster.pid``)."""
        pid = self._pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A stale pid file whose number was reused by an unrelated process.
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return True
        return os.path.basename(exe.removesuffix(" (deleted)")) in ("postgres", "postmaster")

    def running_port(self) -> int | None:
        """The port the running postmaster listens on (line 4 of ``postmaster.pid``)."""
        try:
            return int((self.datadir / "postmaster.pid").read_text().split("\n")[3])
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> None:
        """Start the server and wait until it accepts connections.

        If the server is already running (say, left over from an interrupted run), this
        adopts it and its port.  With an automatically chosen port that turns out to be
        taken at the first start, a new one is picked (up to 5 times); after a successful
        start the port stays fixed, so DSNs handed out stay valid across restarts.

        Raises
        ------
        ClusterError
            It did not come up within :attr:`timeout`; the message ends with the log's tail.
        """
        if not self.is_initialized():
            raise ClusterError(f"{self.datadir} holds no cluster: call init() first")
        if self.is_running():
            self.port = self.running_port() or self.port
            self._wait_ready()
            return
        for attempt in range(5):
            self._set_setting("port", str(self.port))
            self._set_setting("unix_socket_directories", f"'{self.socket_dir or ''}'")
            log_size = self.logfile.stat().st_size if self.logfile.exists() else 0
            proc = self._run(["pg_ctl", "start", "-D", str(self.datadir), "-l", str(self.logfile),
                              "-w", "-t", str(int(self.timeout))], check=False)
            if proc.returncode == 0:
                break
            new_log = self._log_since(log_size)
            if self._auto_port and attempt < 4 and "could not bind" in new_log \
                    and "already in use" in new_log:
                log.info("port %d was taken; trying another", self.port)
                self.port = free_port(self.host)
                continue
            out = proc.stderr.strip() or proc.stdout.strip()
            raise ClusterError(f"could not start the private PostgreSQL in {self.datadir} "
                               f"on port {self.port}: {out}" + self._tail_note())
        # From now on the port is the cluster's: clients hold DSNs naming it and must find
        # the server there again after a restart, so a later start fails rather than moves.
        self._auto_port = False
        _live.add(self)
        self._wait_ready()

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        """Connect until the server accepts a query (``pg_ctl -w`` checked the pid file)."""
        import psycopg

        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=5) as conn:
                    conn.execute("select 1")
                return
            except psycopg.OperationalError as exc:
                last = exc
                if not self.is_running():
                    break
                time.sleep(0.05)
        raise ClusterError(f"the private PostgreSQL on port {self.port} does not accept "
                           f"connections: {last}" + self._tail_note())

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server and wait until it is gone.

        Parameters
        ----------
        mode : {"fast", "immediate", "smart"}
            ``fast`` disconnects clients, rolls back their transactions and checkpoints;
            ``immediate`` quits at once like a crash (the next start recovers from WAL);
            ``smart`` waits for clients to disconnect.

        Returns
        -------
        bool
            Whether it was running.
        """
        if mode not in ("fast", "immediate", "smart"):
            raise ValueError(f"mode must be fast, immediate or smart, not {mode!r}")
        if not self.is_running():
            return False
        self._run(["pg_ctl", "stop", "-D", str(self.datadir), "-m", mode,
                   "-w", "-t", str(int(self.timeout))])
        return True

    def restart(self, mode: str = "fast") -> None:
        """Stop (in ``mode``) and start again; clients see their connections broken."""
        self.stop(mode)
        self.start()

    def create_database(self, dbname: str, exist_ok: bool = True) -> str:
        """Create ``dbname`` in the running cluster and return its DSN.

        Parameters
        ----------
        dbname : str
            The database to create.
        exist_ok : bool
            Whether an existing database of that name is fine.

        Returns
        -------
        str
            :meth:`dsn` of ``dbname``.
        """
        _create_database(self.dsn("postgres"), dbname, exist_ok=exist_ok)
        return self.dsn(dbname)

    def cleanup(self) -> None:
        """Stop the server if it runs and remove the data directory."""
        try:
            if self.is_running():
                self.stop("immediate")
        finally:
            _live.discard(self)
            shutil.rmtree(self.datadir, ignore_errors=True)

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> "PrivateCluster":
        try:
            self.init(exist_ok=True)
            self.start()
        except BaseException:
            if self.remove:
                self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            try:
                self.stop("fast")
            except ClusterError:
                log.warning("fast stop failed; stopping %s immediately", self.datadir)
                self.stop("immediate")
        finally:
            _live.discard(self)
            if self.remove:
                self.cleanup()


def _group_ids(user: str) -> set[int]:
    """The supplementary groups ``user`` is a member of."""
    import grp

    return {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}


# ---------------------------------------------------------------------------------------
# A database for the demo
# ---------------------------------------------------------------------------------------

def _create_database(admin_dsn: str, dbname: str, exist_ok: bool = True) -> bool:
    """``CREATE DATABASE dbname`` through ``admin_dsn``; whether it was created."""
    import psycopg
    from psycopg import errors, sql

    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s",
                              (dbname,)).fetchone()
        if exists:
            if not exist_ok:
                raise DatabaseUnavailable(f"database {dbname} already exists")
            return False
        try:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(dbname)))
        except errors.DuplicateDatabase:
            if not exist_ok:
                raise
            return False  # created by a concurrent run in between
        except errors.InsufficientPrivilege as exc:
            raise DatabaseUnavailable(
                f"may not create database {dbname} on that server ({exc}); create it, or "
                "name an existing database in the DSN") from None
    return True


def _with_dbname(dsn: str, dbname: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    return make_conninfo(**params)


def _answers(dsn: str) -> bool:
    """Whether a server answers at ``dsn`` (libpq's ``PQping``: accepting connections)."""
    from psycopg import pq

    return pq.PGconn.ping(dsn.encode()) == pq.Ping.OK


def _usable(dsn: str) -> str | None:
    """Why ``dsn`` cannot be logged in to (``None`` if it can)."""
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        from ingestor.logs import redact

        return redact(str(exc).strip())
    return None


def ensure_database(dsn: str | None, workdir: str | os.PathLike, *,
                    dbname: str = DEMO_DBNAME, fast: bool = True,
                    fallback: bool = True) -> tuple[str, PrivateCluster | None]:
    """A database to run against: an answering server's, else a private cluster's.

    Parameters
    ----------
    dsn : str or None
        The server to try (conninfo or URI).  ``None`` tries libpq's defaults (``PGHOST``
        and friends, the local socket) and then ``host=127.0.0.1 port=5432 user=postgres``.
    workdir : str or os.PathLike
        Where a private cluster lives when none answers: ``workdir/.pgdata``, reused by the
        next call.  When root runs this in a directory the cluster's unprivileged user
        cannot reach, ``ingestor-pgdata-<hash of workdir>`` in the system temp directory
        is used instead (with a warning).
    dbname : str
        The database to use when the DSN names none of its own (no ``dbname``, or a
        maintenance database such as ``postgres``): created if missing.  A DSN that names
        another database is used as it is.
    fast : bool
        ``fast`` of a new private cluster (see :meth:`PrivateCluster.init`).
    fallback : bool
        Whether an explicit ``dsn`` that does not answer falls back to a private cluster
        (with a warning) instead of raising.

    Returns
    -------
    (str, PrivateCluster or None)
        The DSN to use, and the cluster this call started (or adopted) -- the caller stops
        it (``cluster.stop()``) when done -- or ``None`` when an existing server is used.

    Raises
    ------
    DatabaseUnavailable
        An explicit ``dsn`` answered but refused the login or the ``CREATE DATABASE``, or
        did not answer and ``fallback`` is false.
    PgBinariesNotFound
        No server answered and there are no server binaries to start one.
    """
    from psycopg.conninfo import conninfo_to_dict

    from ingestor.logs import redact

    candidates = [dsn] if dsn is not None else [
        "", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"]
    for cand in candidates:
        if not _answers(cand):
            continue
        why = _usable(cand)
        if why is not None:
            if dsn is not None:
                raise DatabaseUnavailable(f"the server at the DSN answers but refuses: {why}")
            log.info("a server answers at %r but refuses: %s", cand, why)
            continue
        named = conninfo_to_dict(cand).get("dbname")
        if named and named not in _MAINTENANCE_DBS:
            log.info("using database %s of the server that answers", named)
            return cand, None
        if _create_database(cand, dbname):
            log.info("created database %s on the server that answers", dbname)
        return _with_dbname(cand, dbname), None

    if dsn is not None:
        if not fallback:
            raise DatabaseUnavailable(f"no server answers at {redact(dsn)!r}")
        log.warning("no server answers at %r; starting a private cluster", redact(dsn))

    cluster = PrivateCluster(Path(workdir).absolute() / ".pgdata", fast=fast, dbname=dbname)
    new = not cluster.is_initialized()
    try:
        cluster.init(exist_ok=True)
    except DatadirUnreachable as exc:
        # Root in a private directory (its home, say): the unprivileged cluster user
        # cannot get there.  A directory in the system temp dir, named after the working
        # directory so the next run finds it again, always can.
        import hashlib

        key = hashlib.sha256(str(Path(workdir).absolute()).encode()).hexdigest()[:12]
        alt = Path(tempfile.gettempdir()) / f"ingestor-pgdata-{key}"
        log.warning("%s; using %s instead", exc, alt)
        cluster = PrivateCluster(alt, fast=fast, dbname=dbname)
        new = not cluster.is_initialized()
        cluster.init(exist_ok=True)
    cluster.start()
    log.info("%s private PostgreSQL cluster in %s on port %d",
             "created a" if new else "started the", cluster.datadir, cluster.port)
    return cluster.create_database(dbname), cluster
