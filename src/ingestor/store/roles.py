"""Database roles: read-only for services, writer for the daemon; idempotent.

Roles are cluster-wide (several databases on one server share them) while privileges are
per database, so :func:`ensure_roles` does two things every time it runs:

* creates each role if no role of that name exists yet (``DO`` block testing ``pg_roles``;
  a concurrent creator is tolerated), as ``NOLOGIN`` group roles: log-in users are made
  members (``CREATE ROLE svc LOGIN IN ROLE ingestor_reader``).  The one exception is a
  compatibility schema's login user, made only on request (``ingestor migrate --compat ...
  --login-users``, :func:`login_user_sql`): its password comes from the environment and
  reaches the server only as the verifier libpq computes (SCRAM or MD5), never as text;
* grants, in this database and schema: ``CONNECT``/``TEMPORARY`` on the database (the
  writer COPYs into temporary staging tables), ``USAGE`` on the schema; ``SELECT`` on every
  table to the reader; ``SELECT, INSERT, UPDATE`` on every table and ``USAGE, SELECT`` on
  every sequence (identity columns) to the writer -- not ``DELETE``/``TRUNCATE``: the daemon
  only appends and upserts, and retention is TimescaleDB's job; and ``ALTER DEFAULT
  PRIVILEGES`` so tables a later migration creates (as the same migrating role) get the
  same grants.  ``schema_migrations`` is read-only for both: only ``ingestor migrate``
  (the owner) writes it.
"""

from __future__ import annotations

import re

DEFAULT_READER = "ingestor_reader"
DEFAULT_WRITER = "ingestor_writer"

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class RoleError(ValueError):
    """A role name that is not a plain identifier."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a plain SQL identifier (letters, digits, ``_``; <= 63)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise RoleError(f"invalid role name {name!r}: use letters, digits and _ "
                        "(at most 63, not starting with a digit)")
    return name


def create_role_sql(name: str):
    """The idempotent ``DO`` block creating one ``NOLOGIN`` role (a psycopg ``Composed``)."""
    from psycopg import sql

    check_name(name)
    # The name is validated above, so embedding it in the dollar-quoted body is safe; a
    # concurrent creator between the test and CREATE ROLE raises duplicate_object or
    # unique_violation (pg_authid's index), both meaning "it exists now".
    return sql.SQL(
        "DO $ingestor$ BEGIN "
        "IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {lit}) THEN "
        "CREATE ROLE {ident} NOLOGIN; "
        "END IF; "
        "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; "
        "END $ingestor$").format(lit=sql.Literal(name), ident=sql.Identifier(name))


def grant_statements(reader: str, writer: str, database: str, schema: str) -> list:
    """The grants of both roles in one database and schema (psycopg ``Composed`` list)."""
    from psycopg import sql

    r, w = sql.Identifier(check_name(reader)), sql.Identifier(check_name(writer))
    db, sc = sql.Identifier(database), sql.Identifier(schema)
    both = sql.SQL("{}, {}").format(r, w)
    stmts = [
        ("GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {both}", {}),
        ("GRANT USAGE ON SCHEMA {sc} TO {both}", {}),
        ("GRANT SELECT ON ALL TABLES IN SCHEMA {sc} TO {r}", {}),
        ("GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {sc} TO {w}", {}),
        ("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {sc} TO {w}", {}),
        ("ALTER DEFAULT PRIVILEGES IN SCHEMA {sc} GRANT SELECT ON TABLES TO {r}", {}),
        ("ALTER DEFAULT PRIVILEGES IN SCHEMA {sc} GRANT SELECT, INSERT, UPDATE ON TABLES TO {w}",
         {}),
        ("ALTER DEFAULT PRIVILEGES IN SCHEMA {sc} GRANT USAGE, SELECT ON SEQUENCES TO {w}", {}),
    ]
    out = [sql.SQL(s).format(db=db, sc=sc, r=r, w=w, both=both) for s, _ in stmts]
    out.append(sql.SQL(
        "DO $ingestor$ BEGIN "
        "IF to_regclass({mig}) IS NOT NULL THEN "
        "REVOKE INSERT, UPDATE ON {sc}.schema_migrations FROM {w}; "
        "END IF; END $ingestor$").format(
            mig=sql.Literal(f"{schema}.schema_migrations"), sc=sc, w=w))
    # The writer deletes a snapshot row a shutdown's flush() wrote mid-interval once a restart
    # continues that interval (engine state, sql/0004): DELETE on that table only.
    out.append(sql.SQL(
        "DO $ingestor$ BEGIN "
        "IF to_regclass({snap}) IS NOT NULL THEN "
        "GRANT DELETE ON {sc}.order_book_snapshots TO {w}; "
        "END IF; END $ingestor$").format(
            snap=sql.Literal(f"{schema}.order_book_snapshots"), sc=sc, w=w))
    return out


def ensure_roles(conn, reader: str = DEFAULT_READER, writer: str = DEFAULT_WRITER,
                 schema: str | None = None) -> None:
    """Create the reader and writer roles if missing and grant them on this database.

    Parameters
    ----------
    conn : psycopg.Connection
        A connection as a role allowed to create roles (``CREATEROLE``) that owns the
        schema's tables (the role that ran the migrations).  Runs in one transaction.
    reader, writer : str
        Role names (configurable: ``--reader-role`` / ``--writer-role``).
    schema : str, optional
        Default: the connection's ``current_schema()``.

    Notes
    -----
    Safe to run any number of times, from several databases of one cluster, and
    concurrently.
    """
    check_name(reader)
    check_name(writer)
    if reader == writer:
        raise RoleError("the reader and writer roles must differ")
    with conn.transaction():
        database, current = conn.execute("SELECT current_database(), current_schema()").fetchone()
        for name in (reader, writer):
            conn.execute(create_role_sql(name))
        for stmt in grant_statements(reader, writer, database, schema or current):
            conn.execute(stmt)


def compat_reader_grants(role: str, database: str, schema: str) -> list:
    """The grants of a compatibility schema's read-only role (psycopg ``Composed`` list).

    ``CONNECT`` on the database, ``USAGE`` on the compatibility schema, ``SELECT`` on its
    views and ``EXECUTE`` on its settings functions -- nothing on ingestor's own tables: the
    views run with their owner's rights (``security_invoker`` off), so reading through them
    needs no privilege on what they read.  Its ``search_path`` in this database is the
    schema; PostgreSQL applies a role's settings to sessions that log in as that role, not
    to its members, so a service's login user gets its own (docs/compat.md).
    """
    from psycopg import sql

    r, db, sc = (sql.Identifier(check_name(role)), sql.Identifier(database),
                 sql.Identifier(check_name(schema)))
    return [sql.SQL(s).format(r=r, db=db, sc=sc) for s in (
        "GRANT CONNECT ON DATABASE {db} TO {r}",
        "GRANT USAGE ON SCHEMA {sc} TO {r}",
        "GRANT SELECT ON ALL TABLES IN SCHEMA {sc} TO {r}",
        "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {sc} TO {r}",
        "ALTER ROLE {r} IN DATABASE {db} SET search_path = {sc}",
    )]


def compat_reader_revokes(role: str, database: str) -> list:
    """Undo :func:`compat_reader_grants` in one database (the schema's own grants go with
    it); a no-op when the role does not exist."""
    from psycopg import sql

    check_name(role)
    return [sql.SQL(
        "DO $ingestor$ BEGIN "
        "IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {lit}) THEN "
        "EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM %I', {db}, {lit}); "
        "EXECUTE format('ALTER ROLE %I IN DATABASE %I RESET search_path', {lit}, {db}); "
        "END IF; END $ingestor$").format(lit=sql.Literal(role), db=sql.Literal(database))]


#: The comment marking a login user ``--login-users`` created (``COMMENT ON ROLE``: roles are
#: cluster-wide, and so are their comments): ``--drop-compat`` drops only roles so marked.
LOGIN_MARK = "ingestor compat login user of {schema} (ingestor migrate --login-users)"


def login_mark(schema: str) -> str:
    """The comment a login user of ``schema`` created by ``--login-users`` carries."""
    return LOGIN_MARK.format(schema=check_name(schema))


def password_verifier(conn, user: str, password: str) -> str:
    """What the server stores for ``password``: libpq's ``PQencryptPasswordConn`` with the
    server's ``password_encryption`` (SCRAM-SHA-256, or MD5 on servers set so), as ``psql``'s
    ``\\password`` sends it.  The password itself never goes over the wire, nor into a server
    log that records statements.  Both values are registered for redaction."""
    from ingestor.logs import register_secret

    register_secret(password)
    algorithm = conn.execute("SHOW password_encryption").fetchone()[0]
    verifier = conn.pgconn.encrypt_password(
        password.encode(), user.encode(), algorithm.encode()).decode()
    register_secret(verifier)
    return verifier


def login_user_sql(user: str, verifier: str, group: str, database: str, schema: str,
                   create: bool) -> list:
    """Create (``create``) or update a compatibility schema's login user (``Composed`` list).

    A ``LOGIN`` role with the password ``verifier`` (see :func:`password_verifier`), a member
    of ``group`` (the schema's reader role, whose privileges it inherits), its
    ``search_path`` in ``database`` set to ``schema`` (role settings apply to the role that
    logs in, not to its groups), and, when created, the :func:`login_mark` comment.  Updating
    sets the password again and restores the membership and the setting: running it twice
    leaves one user with the latest password.
    """
    from psycopg import sql

    u, g = sql.Identifier(check_name(user)), sql.Identifier(check_name(group))
    db, sc = sql.Identifier(database), sql.Identifier(check_name(schema))
    pw = sql.Literal(verifier)
    if create:
        out = [sql.SQL("CREATE ROLE {u} LOGIN INHERIT PASSWORD {pw} IN ROLE {g}").format(
                   u=u, pw=pw, g=g),
               sql.SQL("COMMENT ON ROLE {u} IS {mark}").format(
                   u=u, mark=sql.Literal(login_mark(schema)))]
    else:
        out = [sql.SQL("ALTER ROLE {u} LOGIN PASSWORD {pw}").format(u=u, pw=pw),
               sql.SQL("GRANT {g} TO {u}").format(g=g, u=u)]
    out.append(sql.SQL("ALTER ROLE {u} IN DATABASE {db} SET search_path = {sc}").format(
        u=u, db=db, sc=sc))
    return out
