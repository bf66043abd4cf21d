"""Compatibility schemas: the reference schemas' readers served by views over ingestor's tables.

Each reference schema 001-004 (``docs/compat.md``) gets a schema of its own holding views
with exactly the seed's relation and column names, so a service written for it sets
``search_path`` to that schema (or connects as its reader role) and runs its queries
unchanged, reading ingestor's tables without a copy.  ``ingestor migrate --compat
001,002,003,004`` creates them (any subset; ``all``), ``--drop-compat`` drops them.

* **SQL in files.**  ``000_base.sql`` (two indexes on ``instruments`` every schema needs),
  then one file per seed (``001_quant.sql`` ...) whose comments map each seed column to its
  source.  The files are run with ``search_path`` set to ingestor's schema; the views are
  created schema-qualified.
* **Settings per schema** are IMMUTABLE SQL functions in the schema returning constants,
  created here before the file runs: ``granularity()`` (the timeframe behind a
  ``market_data`` with no timeframe column, 001 and 004; ``1m`` by default),
  ``granularity_interval()``, ``listed(exchange)`` (which exchanges' instruments are
  shown; all by default) and ``account_ok(placed_by)`` (every account's orders and fills by
  default; with the account filter, only those of the account the session names in
  ``app.current_user_id``).  The planner inlines and folds them, so they cost what a literal
  costs and keep index conditions.
* **Idempotent.**  One transaction under the migrations' advisory lock: each schema named is
  dropped (with everything in it) and created again with the current settings, so a re-run
  applies changed settings and a failure leaves the previous state.  The schemas are
  ingestor's: objects a user adds to them are dropped with them.
* **Refused, not silently empty.**  A view built on a timeframe the daemon is not configured
  to aggregate (``pipeline.timeframes``: ``ohlcv_5m`` without ``5m``, a granularity not in
  the set) is a :class:`CompatError` naming the schema and the timeframe.
* **Roles.**  Each schema gets a ``NOLOGIN`` read-only group role ``<schema>_reader`` with
  ``SELECT`` on its views only (views run with their owner's rights: the role needs and has
  no privilege on ingestor's tables) and ``search_path`` set to the schema in this database
  (:func:`ingestor.store.roles.compat_reader_grants`).
* **Login users, only on request.**  ``--login-users 001=quant_svc`` also makes a ``LOGIN``
  user per schema named, a member of its reader role with its own ``search_path``; the
  password comes from the environment (``INGESTOR_COMPAT_PASSWORD_QUANT_SVC``:
  :data:`PASSWORD_ENV_PREFIX` and the name in capitals) and reaches the server as libpq's
  verifier only (:func:`ingestor.store.roles.password_verifier`).  A second run sets the
  password again.  The user carries a comment saying ingestor made it; ``--drop-compat``
  drops such users (and only those) once no other database configures them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources

from ingestor.errors import UsageError

#: The migrations' advisory lock (ingestor.store.migrate.LOCK_KEY): compat DDL waits for a
#: migration in progress and vice versa.
from ingestor.store.migrate import LOCK_KEY


class CompatError(UsageError):
    """A compatibility schema that cannot be created as asked (exit status 2)."""


@dataclass(frozen=True)
class Seed:
    """One reference schema served.

    Attributes
    ----------
    code : str
        ``001`` ...: the reference schema's number.
    schema : str
        The PostgreSQL schema holding its views.
    file : str
        The SQL file (in this package) creating them.
    title : str
        The system the reference schema describes.
    granular : bool
        It has a ``market_data`` with no timeframe column (a granularity setting).
    needs : tuple of str
        Timeframes its views are built on, besides the granularity.
    optional : tuple of str
        Timeframes some rows come from; missing ones only leave those rows out (reported).
    """

    code: str
    schema: str
    file: str
    title: str
    granular: bool = False
    needs: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    @property
    def role(self) -> str:
        """The schema's read-only group role."""
        return f"{self.schema}_reader"


SEEDS: dict[str, Seed] = {s.code: s for s in (
    Seed("001", "compat_quant", "001_quant.sql", "Quantitative Trading System",
         granular=True, needs=("1d",)),
    Seed("002", "compat_gogotrade", "002_gogotrade.sql", "GoGoTrade", needs=("1d", "5m")),
    Seed("003", "compat_algotrading", "003_algotrading.sql", "multi-user algotrading system",
         optional=("1m", "5m", "15m", "1h", "1d")),
    Seed("004", "compat_octopus", "004_octopus.sql", "Octopus Trading Platform", granular=True),
)}

BASE_FILE = "000_base.sql"
#: Indexes 000_base.sql creates on ingestor's instruments; dropped with the last schema.
BASE_INDEXES = ("instruments_compat_symbol_idx", "instruments_compat_uuid_idx")
DEFAULT_GRANULARITY = "1m"
#: The session setting naming the account a per-account view shows (reference 004's own).
ACCOUNT_SETTING = "app.current_user_id"
ACCOUNT_FILTER = (
    "SELECT coalesce(a.v = placed_by OR lower(a.v) = md5('ingestor:account:' || placed_by)"
    "::uuid::text, false) "
    f"FROM (SELECT nullif(current_setting('{ACCOUNT_SETTING}', true), '') AS v) a")

_EXCHANGE = re.compile(r"^[A-Z][A-Z0-9_]{0,15}$")

#: A login user's password is read from this prefix and the user's name in capitals.
PASSWORD_ENV_PREFIX = "INGESTOR_COMPAT_PASSWORD_"
#: Shorter passwords are refused (and could not be redacted reliably from text).
MIN_PASSWORD = 8
#: Login user names: lower case (the variable's name is the name in capitals, one to one;
#: PostgreSQL folds unquoted names to lower case), not pg_ (reserved by the server).
_LOGIN_NAME = re.compile(r"^(?!pg_)[a-z_][a-z0-9_]{0,62}$")


@dataclass
class CompatSettings:
    """What the schemas are created with.

    Attributes
    ----------
    granularity : dict
        Seed code -> timeframe of its ``market_data`` (granular seeds; default ``1m``).
    exchanges : dict
        Seed code -> exchanges whose instruments it shows (absent: all).
    configured : tuple of str
        The timeframes the daemon aggregates (``pipeline.timeframes``).
    account_filter : set of str
        Seed codes whose per-account views show only the account named by the session's
        ``app.current_user_id`` (nothing while it is unset).
    """

    granularity: dict[str, str] = field(default_factory=dict)
    exchanges: dict[str, tuple[str, ...]] = field(default_factory=dict)
    configured: tuple[str, ...] = ()
    account_filter: set[str] = field(default_factory=set)

    def __post_init__(self):
        if not self.configured:
            from ingestor.config import TIMEFRAMES

            self.configured = tuple(TIMEFRAMES)


@dataclass(frozen=True)
class LoginUser:
    """A login user ``--login-users`` asks for.

    Attributes
    ----------
    code : str
        The seed whose reader role it joins.
    name : str
        The role's name.
    password : str
        From the environment (not in the ``repr``).
    """

    code: str
    name: str
    password: str = field(repr=False)

    @property
    def variable(self) -> str:
        """The environment variable its password is read from."""
        return password_variable(self.name)


def password_variable(name: str) -> str:
    """``quant_svc`` -> ``INGESTOR_COMPAT_PASSWORD_QUANT_SVC``."""
    return PASSWORD_ENV_PREFIX + name.upper()


def parse_login_users(text: str, codes: list[str], environ=None) -> list[LoginUser]:
    """The ``--login-users`` flag: ``CODE=NAME`` items (a bare ``CODE``: ``<schema>_login``),
    comma-separated, or ``all`` (every schema of ``codes``, default names).

    Each password is read from the environment (:func:`password_variable`) and registered
    for redaction.  :class:`CompatError` (one line, naming the variable, never a value) for
    a malformed item, a code ``--compat`` does not name, a name given twice, or a password
    missing, empty or shorter than :data:`MIN_PASSWORD`.
    """
    import os

    from ingestor.logs import register_secret

    env = os.environ if environ is None else environ
    flag = "--login-users"
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if [t.lower() for t in items] == ["all"]:
        items = list(codes)
    if not items:
        raise CompatError(f"{flag}: name at least one schema, as CODE=NAME (e.g. 001=quant_svc)")
    wanted: dict[str, str] = {}
    for item in items:
        code_text, sep, name = item.partition("=")
        code = parse_codes(code_text, flag)[0]
        name = name.strip() if sep else f"{SEEDS[code].schema}_login"
        if not _LOGIN_NAME.match(name):
            raise CompatError(f"{flag}: invalid login user name {name!r}: lower-case letters, "
                              "digits and _ (at most 63, not starting with a digit or pg_)")
        if code not in codes:
            raise CompatError(f"{flag}: {code} is not among the schemas --compat creates")
        if code in wanted:
            raise CompatError(f"{flag}: {code} named twice (one login user per schema)")
        if name in wanted.values() or name in {s.role for s in SEEDS.values()}:
            raise CompatError(f"{flag}: {name!r} cannot be a login user here (taken)")
        wanted[code] = name
    out = []
    for code, name in wanted.items():
        var = password_variable(name)
        password = env.get(var, "")
        if not password:
            raise CompatError(f"{flag}: set {var} to the password of login user {name} "
                              f"(compat {code}); passwords are read from the environment only")
        register_secret(password)
        if len(password) < MIN_PASSWORD:
            raise CompatError(f"{flag}: the password in {var} is shorter than {MIN_PASSWORD} "
                              "characters")
        out.append(LoginUser(code, name, password))
    return out


def parse_codes(text: str, flag: str = "--compat") -> list[str]:
    """``"001,3"`` -> ``["001", "003"]``; ``all`` -> every seed.  :class:`CompatError` else."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise CompatError(f"{flag}: name at least one of {', '.join(SEEDS)} (or all)")
    if [t.lower() for t in items] == ["all"]:
        return list(SEEDS)
    out: list[str] = []
    for t in items:
        code = t.zfill(3) if t.isdigit() and len(t) <= 3 else t
        if code not in SEEDS:
            raise CompatError(f"{flag}: unknown reference schema {t!r} "
                              f"(one of {', '.join(SEEDS)}, or all)")
        if code not in out:
            out.append(code)
    return out


def parse_settings(granularity: list[str], exchanges: list[str],
                   configured: tuple[str, ...] = (), account_filter: str | None = None
                   ) -> CompatSettings:
    """The ``--compat-timeframe CODE=TF``, ``--compat-exchanges CODE=EX[,EX]`` and
    ``--compat-account-filter LIST`` flags."""
    from ingestor.config import TIMEFRAMES

    st = CompatSettings(configured=tuple(configured))
    if account_filter:
        st.account_filter = set(parse_codes(account_filter, "--compat-account-filter"))
    for item in granularity:
        code, tf = _pair(item, "--compat-timeframe")
        if not SEEDS[code].granular:
            raise CompatError(f"--compat-timeframe: {code}'s views have no granularity "
                              f"setting (only {', '.join(c for c, s in SEEDS.items() if s.granular)})")
        if tf not in TIMEFRAMES:
            raise CompatError(f"--compat-timeframe: {tf!r} is not a stored timeframe "
                              f"({', '.join(TIMEFRAMES)})")
        st.granularity[code] = tf
    for item in exchanges:
        code, value = _pair(item, "--compat-exchanges")
        names = tuple(dict.fromkeys(v.strip().upper() for v in value.split(",") if v.strip()))
        bad = [n for n in names if not _EXCHANGE.match(n)]
        if not names or bad:
            raise CompatError(f"--compat-exchanges: {value!r} is not a list of exchange names "
                              "(e.g. NSE,NFO)")
        st.exchanges[code] = names
    return st


def _pair(item: str, flag: str) -> tuple[str, str]:
    code, sep, value = item.partition("=")
    if not sep or not value.strip():
        raise CompatError(f"{flag}: expected CODE=VALUE (e.g. 001=5m), got {item!r}")
    return parse_codes(code, flag)[0], value.strip()


def check(codes: list[str], settings: CompatSettings) -> list[str]:
    """Refuse views built on a timeframe that is not configured; return notes on the rest."""
    notes: list[str] = []
    configured = set(settings.configured)
    for code in codes:
        seed = SEEDS[code]
        needs = list(seed.needs)
        if seed.granular:
            needs.append(settings.granularity.get(code, DEFAULT_GRANULARITY))
        missing = [tf for tf in dict.fromkeys(needs) if tf not in configured]
        if missing:
            raise CompatError(
                f"compat {code} ({seed.schema}) needs the timeframe(s) {', '.join(missing)}, "
                f"which the pipeline does not aggregate (pipeline.timeframes: "
                f"{', '.join(settings.configured)}): add them"
                + (", or choose another --compat-timeframe" if seed.granular else ""))
        absent = [tf for tf in seed.optional if tf not in configured]
        if absent:
            notes.append(f"compat {code}: no rows for timeframe(s) {', '.join(absent)} "
                         "(not in pipeline.timeframes)")
    return notes


def sql_text(name: str) -> str:
    """The text of one of this package's SQL files."""
    return (resources.files(__name__) / name).read_text(encoding="utf-8")


def _settings_sql(seed: Seed, settings: CompatSettings) -> list:
    """The schema's settings functions (IMMUTABLE constants, inlined by the planner)."""
    from psycopg import sql

    from ingestor._core import timeframe_us

    s = sql.Identifier(seed.schema)
    out = []
    if seed.granular:
        tf = settings.granularity.get(seed.code, DEFAULT_GRANULARITY)
        out.append(sql.SQL(
            "CREATE FUNCTION {s}.granularity() RETURNS text LANGUAGE sql IMMUTABLE "
            "PARALLEL SAFE AS {body}").format(
                s=s, body=sql.Literal(f"SELECT {_lit(tf)}::text")))
        out.append(sql.SQL(
            "CREATE FUNCTION {s}.granularity_interval() RETURNS interval LANGUAGE sql "
            "IMMUTABLE PARALLEL SAFE AS {body}").format(
                s=s, body=sql.Literal(f"SELECT interval '{timeframe_us(tf)} microseconds'")))
    names = settings.exchanges.get(seed.code)
    body = ("SELECT true" if names is None else
            "SELECT exchange = ANY (ARRAY[" + ", ".join(_lit(n) for n in names) + "]::text[])")
    out.append(sql.SQL(
        "CREATE FUNCTION {s}.listed(exchange text) RETURNS boolean LANGUAGE sql IMMUTABLE "
        "PARALLEL SAFE AS {body}").format(s=s, body=sql.Literal(body)))
    if seed.code in settings.account_filter:
        # STABLE (reads a setting); the account is the Kite user id or its derived UUID
        out.append(sql.SQL(
            "CREATE FUNCTION {s}.account_ok(placed_by text) RETURNS boolean LANGUAGE sql "
            "STABLE PARALLEL SAFE AS {body}").format(s=s, body=sql.Literal(ACCOUNT_FILTER)))
    else:
        out.append(sql.SQL(
            "CREATE FUNCTION {s}.account_ok(placed_by text) RETURNS boolean LANGUAGE sql "
            "IMMUTABLE PARALLEL SAFE AS 'SELECT true'").format(s=s))
    return out


def _lit(value: str) -> str:
    """A string literal of a value already checked to be [A-Za-z0-9_]."""
    assert re.fullmatch(r"[A-Za-z0-9_]+", value), value
    return f"'{value}'"


def _describe(seed: Seed, settings: CompatSettings) -> str:
    parts = [f"ingestor compatibility views for reference schema {seed.code} ({seed.title})"]
    if seed.granular:
        parts.append(f"granularity {settings.granularity.get(seed.code, DEFAULT_GRANULARITY)}")
    names = settings.exchanges.get(seed.code)
    parts.append("exchanges " + (",".join(names) if names else "all"))
    if seed.code in settings.account_filter:
        parts.append(f"accounts filtered by {ACCOUNT_SETTING}")
    return "; ".join(parts)


def create(conn, codes: list[str], settings: CompatSettings | None = None,
           login_users: list[LoginUser] = ()) -> list[str]:
    """Create (or re-create) the compatibility schemas of ``codes`` and their reader roles.

    Parameters
    ----------
    conn : psycopg.Connection
        A connection as the role that owns ingestor's tables (the migrating role, allowed
        to create roles), not inside a transaction; ingestor's schema is its
        ``current_schema()``.
    codes : list of str
        Seed codes (:func:`parse_codes`).
    settings : CompatSettings, optional
        Granularity and exchanges per schema; the configured timeframes.
    login_users : list of LoginUser, optional
        Login users to create, or whose password to set again (:func:`parse_login_users`).

    Returns
    -------
    list of str
        Notes for the user (timeframes some rows would come from but are not configured;
        each login user created or updated).

    Raises
    ------
    CompatError
        A view would be built on a timeframe that is not configured; a login user's name is
        taken by a role ingestor did not create (or by another schema's login user).  Nothing
        is changed then.
    """
    from psycopg import sql

    from ingestor.store import roles

    settings = settings or CompatSettings()
    notes = check(codes, settings)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        database, base = conn.execute(
            "SELECT current_database(), current_schema()").fetchone()
        conn.execute(sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(base)))
        conn.execute(sql_text(BASE_FILE))
        for code in codes:
            seed = SEEDS[code]
            s = sql.Identifier(seed.schema)
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(s))
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(s))
            conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                s, sql.Literal(_describe(seed, settings))))
            for stmt in _settings_sql(seed, settings):
                conn.execute(stmt)
            conn.execute(sql_text(seed.file))
            conn.execute(roles.create_role_sql(seed.role))
            for stmt in roles.compat_reader_grants(seed.role, database, seed.schema):
                conn.execute(stmt)
        for user in login_users:
            notes.append(_login_user(conn, user, database))
    return notes


def _login_user(conn, user: LoginUser, database: str) -> str:
    """Create or update one login user (inside :func:`create`'s transaction)."""
    from ingestor.store import roles

    seed = SEEDS[user.code]
    mark = roles.login_mark(seed.schema)
    row = conn.execute("SELECT shobj_description(oid, 'pg_authid') FROM pg_catalog.pg_roles "
                       "WHERE rolname = %s", (user.name,)).fetchone()
    if row is not None and row[0] != mark:
        other = [s.schema for s in SEEDS.values() if row[0] == roles.login_mark(s.schema)]
        raise CompatError(
            f"--login-users: {user.name} is the login user of {other[0]}, not {seed.schema}: "
            "one schema per login user" if other else
            f"--login-users: a role {user.name} exists that ingestor did not create: choose "
            f"another name (or grant it {seed.role} yourself)")
    verifier = roles.password_verifier(conn, user.name, user.password)
    for stmt in roles.login_user_sql(user.name, verifier, seed.role, database, seed.schema,
                                     create=row is None):
        conn.execute(stmt)
    return (f"compat {user.code}: login user {user.name} "
            f"{'created' if row is None else 'password set again'} (member of {seed.role}, "
            f"search_path {seed.schema}; password from {user.variable})")


def drop(conn, codes: list[str]) -> list[str]:
    """Drop the compatibility schemas of ``codes``; with the last one, the base indexes.

    The reader roles are cluster-wide (other databases may use them): they lose their
    privileges here and are kept; ``DROP ROLE`` is the operator's call.  Login users that
    ``--login-users`` created for these schemas (marked by their comment) lose their
    ``search_path`` here and are dropped, unless another database still configures them or
    objects depend on them (kept, with a note).  Login users made by hand are left alone.

    Returns
    -------
    list of str
        A note per login user dropped or kept.
    """
    import psycopg
    from psycopg import sql

    from ingestor.store import roles

    notes: list[str] = []

    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        database, base = conn.execute(
            "SELECT current_database(), current_schema()").fetchone()
        for code in codes:
            seed = SEEDS[code]
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(seed.schema)))
            for stmt in roles.compat_reader_revokes(seed.role, database):
                conn.execute(stmt)
            for (name,) in conn.execute(
                    "SELECT rolname FROM pg_catalog.pg_roles WHERE "
                    "shobj_description(oid, 'pg_authid') = %s ORDER BY 1",
                    (roles.login_mark(seed.schema),)).fetchall():
                u = sql.Identifier(name)
                conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} RESET search_path").format(
                    u, sql.Identifier(database)))
                elsewhere = [r[0] for r in conn.execute(
                    "SELECT d.datname FROM pg_catalog.pg_db_role_setting s "
                    "JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase "
                    "JOIN pg_catalog.pg_roles r ON r.oid = s.setrole "
                    "WHERE r.rolname = %s AND d.datname <> %s ORDER BY 1",
                    (name, database))]
                if elsewhere:
                    notes.append(f"login user {name} kept: database(s) {', '.join(elsewhere)} "
                                 "still configure it")
                    continue
                try:
                    with conn.transaction():
                        conn.execute(sql.SQL("DROP ROLE {}").format(u))
                    notes.append(f"login user {name} dropped")
                except psycopg.errors.DependentObjectsStillExist:
                    notes.append(f"login user {name} kept: objects depend on it "
                                 "(DROP OWNED BY it, then DROP ROLE)")
        left = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = ANY(%s)",
                            ([s.schema for s in SEEDS.values()],)).fetchone()[0]
        if not left:
            for name in BASE_INDEXES:
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}.{}").format(
                    sql.Identifier(base), sql.Identifier(name)))
    return notes


def present(conn) -> dict[str, str]:
    """The compatibility schemas of this database: code -> the schema's description."""
    rows = conn.execute(
        "SELECT nspname, coalesce(obj_description(oid, 'pg_namespace'), '') "
        "FROM pg_namespace WHERE nspname = ANY(%s)",
        ([s.schema for s in SEEDS.values()],)).fetchall()
    by_schema = {s.schema: c for c, s in SEEDS.items()}
    return dict(sorted((by_schema[n], d) for n, d in rows))
